"""The memory modes used the wrong way: what a hostile pass over base_cache, resident: one and
order: layer found, each a named error now (the rest of that pass is in the other test files:
mismatched, truncated and foreign caches, kill and resume, refused key combinations)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN, SHARED
from evalkit.errors import RunError
from evalkit.evaluation.corpus_chunks import chunk_corpus, encode_corpus
from evalkit.evaluation.layer_major import LayerMajor

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def test_spill_into_a_folder_that_cannot_be_made(tmp_path):
    """Hidden states that must spill, with spill_dir under a regular file: a RunError naming the
    folder (it was an uncaught FileExistsError/NotADirectoryError traceback)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    text = (SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:20000]
    enc = encode_corpus(TINY, text)
    cc = chunk_corpus(enc, enc.stream, "sha", "head", 64, 2)
    with LayerMajor([("base", TINY)], spill_dir=blocker / "hidden", spill=True) as lm:
        with pytest.raises(RunError, match=r"spill_dir .*a-file/hidden cannot be created"):
            lm.run(cc.chunks, range(2), 1, cc.window)


def test_perplexity_refuses_a_spill_dir_without_layer_order(tmp_path):
    from evalkit.evaluation.perplexity import perplexity
    corpus = tmp_path / "c.txt"
    corpus.write_text((SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:20000])
    with pytest.raises(RunError, match="--spill-dir applies to --order layer only"):
        perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, order="model",
                   spill_dir=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_layer_order_with_a_spill_dir_gives_the_model_orders_ppl(tmp_path):
    """The same command with --order layer and a spill folder works and equals --order model."""
    import io

    from evalkit.evaluation.perplexity import perplexity
    corpus = tmp_path / "c.txt"
    corpus.write_text((SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:20000])
    out = io.StringIO()
    a = perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, out=out, order="model")
    b = perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, out=out, order="layer",
                   spill_dir=str(tmp_path / "s"))
    assert np.array_equal(a["ppl"], b["ppl"])


def test_base_cache_pointing_at_a_folder(tmp_path):
    from evalkit.evaluation.base_cache import BaseCache, BaseCacheError
    with pytest.raises(BaseCacheError, match="is a folder; base_cache names the cache file"):
        BaseCache(tmp_path)


def test_a_damaged_cache_byte_is_a_named_error_not_another_kld(tmp_path):
    """One flipped byte in a chunk's stored hidden states fails that chunk's CRC-32 when read."""
    from evalkit.evaluation.base_cache import BaseCache, BaseCacheError, BaseCacheHeader, write_base_cache
    rng = np.random.default_rng(0)
    states = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]
    path = tmp_path / "c.ekc"
    write_base_cache(path, BaseCacheHeader("c", 16, 3, "b", 16, 8, "t"), states)
    cache = BaseCache(path)
    assert all(np.array_equal(cache.chunk(k), states[k]) for k in range(3))
    raw = bytearray(path.read_bytes())
    raw[-4 * 3 - 4 * 8 * 16 + 5] ^= 0x10          # a byte of chunk 2's states
    path.write_bytes(bytes(raw))
    cache = BaseCache(path)
    assert np.array_equal(cache.chunk(1), states[1])
    with pytest.raises(BaseCacheError, match="chunk 2 fail their checksum"):
        cache.chunk(2)


def test_a_format_1_cache_is_refused_by_name(tmp_path):
    import json
    import struct

    from evalkit.evaluation.base_cache import MAGIC, BaseCache, BaseCacheError
    head = json.dumps({"corpus_sha256": "c", "n_ctx": 16, "n_chunks": 1, "base_sha256": "b", "n_embd": 4,
                       "first_row": 8, "tokens_sha256": "t", "format": 1}, sort_keys=True).encode()
    blob = MAGIC + struct.pack("<I", len(head)) + head
    blob += b"\0" * (-len(blob) % 64) + np.zeros((8, 4), np.float32).tobytes()
    (tmp_path / "old.ekc").write_bytes(blob)
    with pytest.raises(BaseCacheError, match="format 1, this evalkit reads format 2"):
        BaseCache(tmp_path / "old.ekc")


# ---- second hostile pass (CLI runs with tiny configs): what it found, each fixed and kept here


def _run_cfg(tmp_path, **kw):
    from evalkit.run_config import config_from_dict
    d = {"name": "h", "base": str(TINY), "corpus": "c.txt", "ctx": 64, "chunks": 2, "output_dir": str(tmp_path / "r"),
         "variants": [{"name": "Q8_0", "ftype": "Q8_0"}]}
    d.update(kw)
    return config_from_dict(d, "test", str(tmp_path / "cfgdir"))


def test_base_cache_is_relative_to_the_config_folder_even_if_the_cwd_has_one(tmp_path, monkeypatch):
    """A same-named cache in the current folder (another corpus's) was picked instead of the
    config folder's new one: the run failed with 'made for another corpus' (or read the wrong one)."""
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "base.ekc").write_bytes(b"someone else's cache")
    monkeypatch.chdir(tmp_path)
    cfg = _run_cfg(tmp_path, base_cache="base.ekc")
    assert cfg.resolve_own(cfg.base_cache) == str(tmp_path / "cfgdir" / "base.ekc")
    assert cfg.resolve_own(str(tmp_path / "abs.ekc")) == str(tmp_path / "abs.ekc")


def test_a_bad_spill_dir_fails_before_the_pass_not_when_it_first_spills(tmp_path):
    """spill_dir naming a file was accepted and only failed if the hidden states ever spilled."""
    from evalkit.evaluation.layer_major_run import _spill_folder
    (tmp_path / "cfgdir").mkdir()
    (tmp_path / "cfgdir" / "afile").write_text("x")
    for spill, msg in (("afile", "spill_dir .*afile is a file, not a folder"),
                       ("afile/sub", "spill_dir .*afile/sub cannot be created")):
        with pytest.raises(RunError, match=msg):
            _spill_folder(_run_cfg(tmp_path, order="layer", spill_dir=spill), store=None)
    folder = _spill_folder(_run_cfg(tmp_path, order="layer", spill_dir="new/deeper"), store=None)
    assert folder.parent == tmp_path / "cfgdir" / "new" / "deeper" and folder.parent.is_dir()


def test_a_killed_runs_spill_folder_is_removed_by_the_next_run(tmp_path):
    """A SIGKILLed run left <spill_dir>/<name>-hidden-<pid> (gigabytes for a real model) forever;
    a live process's folder and other runs' folders are kept."""
    import os
    import subprocess
    import sys

    from evalkit.evaluation.layer_major_run import _spill_folder
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    spill = tmp_path / "cfgdir" / "sp"
    for name in (f"h-hidden-{dead.pid}", "h-hidden-1", f"other-hidden-{dead.pid}"):
        (spill / name).mkdir(parents=True)
        (spill / name / "hidden-0.f32").write_bytes(b"\0" * 16)
    folder = _spill_folder(_run_cfg(tmp_path, order="layer", spill_dir="sp"), store=None)
    assert folder.name == f"h-hidden-{os.getpid()}"
    assert sorted(p.name for p in spill.iterdir()) == sorted(["h-hidden-1", f"other-hidden-{dead.pid}"])


def test_layer_order_with_a_device_from_the_command_line_is_a_named_error(tmp_path):
    """`evalkit run --device cpu-torch` on an order: layer config skipped the config check and
    failed after quantizing, naming a functools.partial repr."""
    from evalkit.pipeline import run
    cfg = _run_cfg(tmp_path, order="layer")
    cfg.device = "cpu-torch"            # as the CLI's --device sets it
    with pytest.raises(RunError, match="order 'layer' runs the exact forward on the CPU; device 'cpu-torch'"):
        run(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_perplexity_spills_into_a_folder_of_its_own(tmp_path, monkeypatch):
    """Two `evalkit perplexity --order layer --spill-dir D` at once truncated each other's
    D/hidden-0.f32 (O_TRUNC): silently other numbers. Each pass now spills into its own folder
    under D, removed at the end; a D that is a file fails before any work."""
    import io

    import evalkit.evaluation.layer_major as layer_major
    from evalkit.evaluation.perplexity import perplexity
    corpus = tmp_path / "c.txt"
    corpus.write_text((SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:20000])
    spill = tmp_path / "s"
    spill.mkdir()
    (spill / "hidden-0.f32").write_bytes(b"another run's states")
    out = io.StringIO()
    a = perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, out=out, order="model")
    monkeypatch.setattr(layer_major, "available_memory", lambda: 1)        # it must spill
    b = perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, out=out, order="layer",
                   spill_dir=str(spill))
    assert b["layer_major"]["spilled"] is True and np.array_equal(a["ppl"], b["ppl"])
    assert [p.name for p in spill.iterdir()] == ["hidden-0.f32"]
    assert (spill / "hidden-0.f32").read_bytes() == b"another run's states"
    with pytest.raises(RunError, match="spill_dir .*hidden-0.f32 is a file, not a folder"):
        perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, order="layer",
                   spill_dir=str(spill / "hidden-0.f32"))


def test_the_progress_bar_never_passes_its_total(capsys):
    """Three models sharing a group of two chunks advance the bar by 2/3 each: the float sum
    passed the total and every such run printed tqdm's 'clamping frac' warning."""
    import warnings

    from evalkit.evaluation.loop import evaluate
    chunks = np.zeros((3, 4), dtype=np.int32)         # groups [0, 1], [2]: 3 × 2/3 + 3 × 1/3 > 3.0
    fns = [(n, lambda t: np.zeros((t.shape[0], 1, 1), np.float32)) for n in ("a", "b", "c")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _group, outputs in evaluate(fns, chunks, range(3), 2, progress=True):
            assert len(list(outputs)) == 3
    assert "3.0/3" in capsys.readouterr().err


def test_a_cache_cut_inside_its_header_says_truncated(tmp_path):
    """A cache cut inside its header said 'header length 326 is impossible' (it is a truncation)."""
    from evalkit.evaluation.base_cache import BaseCache, BaseCacheError, BaseCacheHeader, write_base_cache
    path = tmp_path / "c.ekc"
    write_base_cache(path, BaseCacheHeader("c", 16, 1, "b", 4, 8, "t"), [np.zeros((8, 4), np.float32)])
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(BaseCacheError, match=r"20 bytes, shorter than its \d+-byte header \(truncated\)"):
        BaseCache(path)
