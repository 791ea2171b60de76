"""`evalkit imatrix` on the command line, the run-config `imatrix: {corpus, chunks}` key, and
the named errors: short corpus, missing output folder, an imatrix of another model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import GOLDEN, SHARED
from evalkit.cli import main as run_cli
from evalkit.imatrix import ImatrixEntry, ImatrixStats, load_imatrix, read_imatrix_stats, write_imatrix_legacy
from evalkit.run_config import ConfigError, ImatrixSpec, config_from_dict

TINY = GOLDEN / "gguf" / "tiny-base.gguf"
CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_bytes(CORPUS.read_bytes()[:12000])
    return p


def test_cli_writes_both_formats_with_the_same_statistics(tmp_path, small_corpus, capsys):
    dat, gguf = tmp_path / "m.dat", tmp_path / "m.gguf"
    common = [str(TINY), "--corpus", str(small_corpus), "--ctx", "64", "--chunks", "3", "--threads", "2",
              "--batch", "128"]
    assert run_cli(["imatrix", *common, "-o", str(dat)]) == 0
    out = capsys.readouterr().out
    assert "[3]" in out and "Final estimate: PPL = " in out and "stored 14 entries after 3 chunks" in out
    assert run_cli(["imatrix", *common, "-o", str(gguf)]) == 0
    assert gguf.read_bytes()[:4] == b"GGUF" and dat.read_bytes()[:4] != b"GGUF"
    a, b = read_imatrix_stats(dat, chunk_size=64), read_imatrix_stats(gguf)
    assert list(a.entries) == list(b.entries) and b.chunks == 3 and b.chunk_size == 64
    for name, e in b.entries.items():
        assert e.counts.tolist() == [3 * 64] and a.entries[name].ncall == 3     # tokens; one call per chunk
        np.testing.assert_allclose(load_imatrix(dat).data[name], load_imatrix(gguf).data[name], rtol=1e-6)
    # --format wins over the extension
    assert run_cli(["imatrix", *common, "-o", str(tmp_path / "x.dat"), "--format", "gguf"]) == 0
    assert (tmp_path / "x.dat").read_bytes()[:4] == b"GGUF"


def test_cli_named_errors_exit_2_before_computing(tmp_path, small_corpus, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of tokens here .\n")
    assert run_cli(["imatrix", str(TINY), "--corpus", str(short), "-o", str(tmp_path / "m.dat")]) == 2
    assert "need at least 2*n_ctx = 1024 tokens" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "m.dat"
    assert run_cli(["imatrix", str(TINY), "--corpus", str(small_corpus), "-o", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_quantize_refuses_an_imatrix_of_another_model(tmp_path, capsys):
    """tiny-base's imatrix (same names, 256-wide) for SmolLM2 (576-wide), and one whose names
    belong to no tensor: each a named error (plan.py), exit 2, nothing written."""
    from evalkit.recipes.options import RuleError, TypeOptions
    from evalkit.recipes.plan import build_plan
    from evalkit.sources import open_source, smollm2_path

    source = open_source(smollm2_path())
    with pytest.raises(RuleError, match=r"has (256|768) values but tensor 'blk\.0\..*needs (576|1536)"):
        build_plan(source, "IQ4_K", TypeOptions(), load_imatrix(GOLDEN / "gguf" / "tiny-base.imatrix"))
    foreign = tmp_path / "foreign.dat"
    write_imatrix_legacy(foreign, ImatrixStats({"model.layers.0.mlp.down_proj": ImatrixEntry(np.ones((1, 576)),
                                                                                            [512], 1)}, 1))
    with pytest.raises(RuleError, match="no entry for any tensor"):
        build_plan(source, "IQ4_K", TypeOptions(), load_imatrix(foreign))
    out = tmp_path / "q.gguf"
    assert run_cli(["quantize", str(smollm2_path()), str(out), "--type", "IQ4_K", "--imatrix",
                    str(GOLDEN / "gguf" / "tiny-base.imatrix")]) == 2
    assert "does not belong to this model" in capsys.readouterr().err and not out.exists()


def _variant(imatrix) -> dict:
    return {"name": "x", "base": "smollm2", "variants": [{"name": "v", "ftype": "IQ4_K", "imatrix": imatrix}]}


def test_run_config_imatrix_mapping():
    cfg = config_from_dict(_variant({"corpus": "calib.txt", "chunks": 8}))
    assert cfg.variants[0].imatrix == ImatrixSpec("calib.txt", 8, 512)
    d = json.loads(json.dumps(cfg.to_dict()))                       # stays valid JSON
    assert d["variants"][0]["imatrix"] == {"corpus": "calib.txt", "chunks": 8, "ctx": 512}
    assert config_from_dict(_variant("file.imatrix")).variants[0].imatrix == "file.imatrix"
    bad = [({"corpus": "c", "chunk": 8}, "unknown key 'chunk'; valid keys: corpus, chunks, ctx"),
           ({"chunks": 8}, "'corpus' .* is required"), ({"corpus": "c", "chunks": 0}, "'chunks' must be positive"),
           ({"corpus": "c", "ctx": 8}, "'ctx' must be at least 16"), ({"corpus": "c", "ctx": "512"}, "'ctx' must be int"),
           (3, "must be a file path or a mapping")]
    for value, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(_variant(value))
    with pytest.raises(ConfigError, match="apply to an 'ftype' recipe"):
        config_from_dict({"name": "x", "variants": [{"name": "v", "gguf": "a.gguf", "imatrix": {"corpus": "c"}}]})


def test_run_computes_caches_and_uses_the_imatrix(tmp_path, small_corpus):
    from evalkit.evaluation.models import ModelEntry
    from evalkit.imatrix_tools.run_cache import cached_imatrix
    from evalkit.pipeline import run

    cfg = config_from_dict({"name": "imat", "base": str(TINY), "corpus": str(small_corpus), "ctx": 64, "chunks": 2,
                            "threads": 2, "batch": 128, "output_dir": str(tmp_path / "results"),
                            "variants": [{"name": "KT", "ftype": "IQ4_K", "attn_q_type": "IQ2_KT",
                                          "imatrix": {"corpus": small_corpus.name, "chunks": 3, "ctx": 64}}]},
                           "test", str(small_corpus.parent))
    out = run(cfg, progress=False)        # IQ2_KT needs an imatrix: the computed one is used
    dat, stamp = out / "imatrix" / "KT.dat", out / "imatrix" / "KT.json"
    im = load_imatrix(dat)
    assert len(im) == 14 and im.chunks == 3 and im.dataset == small_corpus.name
    assert json.loads(stamp.read_text())["n_chunks"] == 3
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["variants"][0]["imatrix"] == {"corpus": small_corpus.name, "chunks": 3, "ctx": 64}
    from evalkit.gguf import GGUFFile
    with GGUFFile(out / "models" / "KT.gguf") as f:
        assert f.get("quantize.imatrix.entries_count") == 14 and f.get("quantize.imatrix.chunks_count") == 3
    # cached: the same spec returns the file untouched; another chunk count recomputes it
    base = ModelEntry.of("base", TINY)
    mtime = dat.stat().st_mtime_ns
    spec = cfg.variants[0].imatrix
    assert cached_imatrix(spec, "KT", base, out / "imatrix", cfg.resolve, 2, False) == dat
    assert dat.stat().st_mtime_ns == mtime
    cached_imatrix(ImatrixSpec(spec.corpus, 2, 64), "KT", base, out / "imatrix", cfg.resolve, 2, False)
    assert load_imatrix(dat).chunks == 2
    assert not [p for p in (out / "imatrix").iterdir() if p.name.startswith(".")]   # no temporaries left


def test_run_imatrix_corpus_missing_is_named(tmp_path):
    from evalkit.errors import RunError
    from evalkit.evaluation.models import ModelEntry
    from evalkit.imatrix_tools.run_cache import cached_imatrix
    with pytest.raises(RunError, match="variant 'v': computing its imatrix: imatrix corpus .*nothing.txt not found"):
        cached_imatrix(ImatrixSpec(str(tmp_path / "nothing.txt")), "v", ModelEntry.of("base", TINY),
                       tmp_path / "imatrix", lambda p: p)
    assert not (tmp_path / "imatrix").exists()
