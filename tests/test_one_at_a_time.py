"""`resident: one`: one model loaded at a time, the same results as all together, resume per model and chunk."""
from __future__ import annotations

import json
import weakref

import pandas as pd
import pytest

from conftest import GOLDEN, SHARED
from evalkit.pipeline import run
from evalkit.run_config import config_from_dict

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def _cfg(tmp, corpus, **kw):
    # 3 chunks of 64, 2 per forward call: each model makes two calls, [0, 1] and [2]
    d = {"name": "all", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 3, "threads": 2,
         "batch": 128, "output_dir": str(tmp / "results"),
         "variants": [{"name": "IQ4_K", "ftype": "IQ4_K"}, {"name": "Q8_0", "ftype": "Q8_0"}]}
    d.update(kw)
    return config_from_dict(d, "test", str(tmp))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The all-resident run with a fresh base pass; its variants' GGUFs for the other runs."""
    tmp = tmp_path_factory.mktemp("one")
    corpus = tmp / "small.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:12000])
    out = run(_cfg(tmp, corpus), progress=False)
    ggufs = [{"name": n, "gguf": str(out / "models" / f"{n}.gguf")} for n in ("IQ4_K", "Q8_0")]
    return tmp, corpus, out, ggufs


def _same_results(a, b):
    """results.json's figures (not timings, paths or the config) and tokens.parquet are equal."""
    ra, rb = (json.loads((o / "results.json").read_text()) for o in (a, b))
    drop = {"tokens_per_s", "model"}
    for r in (ra, rb):
        r["base"].pop("tokens_per_s")
        r["base"].pop("logits_file")
        r["variants"] = {n: {k: v for k, v in st.items() if k not in drop} for n, st in r["variants"].items()}
    assert ra["base"] == rb["base"] and ra["variants"] == rb["variants"]
    pd.testing.assert_frame_equal(pd.read_parquet(a / "tokens.parquet"), pd.read_parquet(b / "tokens.parquet"))


def _watch_loads(monkeypatch):
    """Every model the forward pass loads; fails if one is loaded while another is still alive."""
    import evalkit.evaluation.forward as fw
    real, loaded = fw.load_model, []

    def watched(path, device="cpu"):
        alive = [p for p, ref in loaded if ref() is not None]
        assert not alive, f"loading {path} while {alive} is still resident"
        model = real(path, device)
        loaded.append((str(path), weakref.ref(model)))
        return model
    monkeypatch.setattr(fw, "load_model", watched)
    return loaded


def test_one_at_a_time_writes_the_cache_and_gives_identical_results(reference, monkeypatch):
    tmp, corpus, out, ggufs = reference
    loaded = _watch_loads(monkeypatch)
    blf = tmp / "base.kld"
    out1 = run(_cfg(tmp, corpus, name="one", resident="one", base_cache="one.ekc", variants=ggufs,
                    write_base_logits=str(blf)), progress=False)
    assert [p for p, _ in loaded] == [str(TINY), ggufs[0]["gguf"], ggufs[1]["gguf"]]
    assert (tmp / "one.ekc").is_file() and blf.is_file()
    assert sorted(p.name for p in (out1 / "partial").glob("*.np*")) == [f"{w}_0000{k}.np{'z' if w == 'chunk' else 'y'}"
                                                                          for w in ("chunk", "records") for k in range(3)]
    _same_results(out, out1)


def test_one_at_a_time_reading_the_cache_never_loads_the_base(reference, monkeypatch):
    tmp, corpus, out, ggufs = reference
    if not (tmp / "one.ekc").is_file():
        pytest.skip("needs the cache of the test above")
    loaded = _watch_loads(monkeypatch)
    out2 = run(_cfg(tmp, corpus, name="one-read", resident="one", base_cache="one.ekc", variants=ggufs),
               progress=False)
    assert [p for p, _ in loaded] == [ggufs[0]["gguf"], ggufs[1]["gguf"]]
    _same_results(out, out2)


def test_one_at_a_time_against_a_logits_file_equals_all_resident(reference):
    tmp, corpus, _, ggufs = reference
    if not (tmp / "base.kld").is_file():
        pytest.skip("needs the base-logits file of the first test")
    a = run(_cfg(tmp, corpus, name="file-all", base_logits="base.kld", variants=ggufs), progress=False)
    b = run(_cfg(tmp, corpus, name="file-one", base_logits="base.kld", resident="one", variants=ggufs),
            progress=False)
    _same_results(a, b)


def test_killed_one_at_a_time_run_resumes_per_model_and_chunk(reference, tmp_path, monkeypatch):
    tmp, corpus, out, ggufs = reference
    import evalkit.evaluation.forward as fw
    real, calls = fw.model_logits, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:     # base: calls 1-2, IQ4_K: 3-4, Q8_0: 5 (chunks 0, 1) then 6 (chunk 2)
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(fw, "model_logits", dying)
    cfg = _cfg(tmp, corpus, name="killed", resident="one", base_cache=str(tmp_path / "c.ekc"), variants=ggufs,
               output_dir=str(tmp_path / "results"))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    part = tmp_path / "results" / "killed" / "partial"
    assert sorted(p.name for p in part.glob("piece-*")) == sorted(
        [f"piece-base_0000{k}.npz" for k in range(3)] + [f"piece-v0_0000{k}.npz" for k in range(3)]
        + ["piece-v1_00000.npz", "piece-v1_00001.npz"])
    assert (tmp_path / "c.ekc").is_file() and not list(part.glob("chunk_*"))
    monkeypatch.setattr(fw, "model_logits", real)
    loaded = _watch_loads(monkeypatch)
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(fw, "model_logits", counting)
    out2 = run(cfg, progress=False)
    assert [p for p, _ in loaded] == [ggufs[1]["gguf"]] and counted["n"] == 1   # Q8_0 on chunk 2 only
    assert not list(part.glob("piece-*"))
    _same_results(out, out2)
