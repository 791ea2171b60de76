"""`base_cache:` in `evalkit run`: written by the first run, read by later ones without the base model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import GOLDEN, SHARED
from evalkit.errors import RunError
from evalkit.evaluation.base_cache import BaseCache, BaseCacheError
from evalkit.metrics.logits_file import file_size
from evalkit.pipeline import run
from evalkit.run_config import ConfigError, config_from_dict

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def _cfg(tmp, corpus, **kw):
    # 3 chunks of 64, 2 per forward call: groups [0, 1], [2]
    d = {"name": "writer", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 3, "threads": 2,
         "batch": 128, "output_dir": str(tmp / "results"), "base_cache": "base.ekc",
         "variants": [{"name": "IQ4_K", "ftype": "IQ4_K"}, {"name": "Q8_0", "ftype": "Q8_0"}]}
    d.update(kw)
    return config_from_dict(d, "test", str(tmp))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A run that computes the base and writes the cache; its variants' GGUFs for later runs."""
    tmp = tmp_path_factory.mktemp("cache_run")
    corpus = tmp / "small.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:12000])
    out = run(_cfg(tmp, corpus), progress=False)
    ggufs = [{"name": n, "gguf": str(out / "models" / f"{n}.gguf")} for n in ("IQ4_K", "Q8_0")]
    return tmp, corpus, out, ggufs


def _metrics(out):
    res = json.loads((out / "results.json").read_text())
    drop = {"tokens_per_s", "model"}
    return res["base"]["ppl"], {n: {k: v for k, v in st.items() if k not in drop} for n, st in res["variants"].items()}


def _count_loads(monkeypatch):
    """Record every model file the forward pass loads."""
    import evalkit.evaluation.forward as fw
    real, loaded = fw.load_model, []

    def counting(path, device="cpu"):
        loaded.append(str(path))
        return real(path, device)
    monkeypatch.setattr(fw, "load_model", counting)
    return loaded


def test_first_run_writes_a_small_cache_and_keeps_no_hidden_states(written):
    tmp, _, out, _ = written
    cache = BaseCache(tmp / "base.ekc")
    assert (cache.header.n_ctx, cache.header.n_chunks, cache.header.first_row) == (64, 3, 32)
    assert not list((out / "partial").glob("hidden_*")) and not list(tmp.glob(".base.ekc*"))
    n_vocab = 49152
    # llama-perplexity's base-logits file for the same chunks (spec/perplexity-kld.md)
    assert (tmp / "base.ekc").stat().st_size * 20 <= file_size(64, n_vocab, 3)


def test_second_run_reads_the_cache_without_the_base_model(written, monkeypatch):
    tmp, corpus, out, ggufs = written
    loaded = _count_loads(monkeypatch)
    out2 = run(_cfg(tmp, corpus, name="reader", variants=ggufs), progress=False)
    assert str(TINY) not in loaded and len(loaded) == 2       # the two variants, never the base
    assert _metrics(out2) == _metrics(out)                     # bit-identical base logits
    a, b = pd.read_parquet(out / "tokens.parquet"), pd.read_parquet(out2 / "tokens.parquet")
    pd.testing.assert_frame_equal(a, b)


def test_a_run_that_now_finds_the_cache_keeps_its_chunks(written, monkeypatch):
    """Reading the cache or computing the base give the same chunk files: same fingerprint."""
    tmp, corpus, out, _ = written
    import evalkit.evaluation.forward as fw
    calls = []
    monkeypatch.setattr(fw, "model_logits", lambda *a, **k: calls.append(1))
    before = json.loads((out / "partial" / "state.json").read_text())["fingerprint"]
    run(_cfg(tmp, corpus), progress=False)
    assert calls == [] and json.loads((out / "partial" / "state.json").read_text())["fingerprint"] == before


@pytest.mark.parametrize("change, what", [({"chunks": 2}, "chunk count"), ({"ctx": 32, "chunks": 3}, "n_ctx"),
                                          ({"corpus": "other"}, "corpus"), ({"base": "variant"}, "base model")])
def test_a_cache_of_another_run_is_a_named_error(written, change, what):
    tmp, corpus, out, _ = written
    change = dict(change)
    if change.get("corpus") == "other":
        other = tmp / "other.txt"
        other.write_text(corpus.read_text()[::-1])
        change["corpus"] = str(other)
    if change.get("base") == "variant":
        change["base"] = str(out / "models" / "Q8_0.gguf")
    with pytest.raises(BaseCacheError, match=f"another {what}"):
        run(_cfg(tmp, change.pop("corpus", corpus), name="mismatch", variants=[], **change), progress=False)


@pytest.mark.parametrize("damage, msg", [("truncate", "truncated"), ("foreign", "bad magic")])
def test_a_truncated_or_foreign_cache_is_a_named_error(written, tmp_path, damage, msg):
    tmp, corpus, _, _ = written
    data = (tmp / "base.ekc").read_bytes()
    bad = tmp_path / "bad.ekc"
    bad.write_bytes(data[:-64] if damage == "truncate" else TINY.read_bytes()[:4096])
    with pytest.raises(BaseCacheError, match=msg):
        run(_cfg(tmp, corpus, name="damaged", variants=[], base_cache=str(bad)), progress=False)
    assert bad.read_bytes() == (data[:-64] if damage == "truncate" else TINY.read_bytes()[:4096])  # never overwritten


def test_a_cache_in_a_missing_folder_is_a_named_error(written):
    tmp, corpus, _, _ = written
    with pytest.raises(RunError, match="does not exist"):
        run(_cfg(tmp, corpus, name="nofolder", variants=[], base_cache="no/such/base.ekc"), progress=False)


@pytest.mark.parametrize("keys, msg", [({"resident": "one", "base_cache": None}, "resident: one"),
                                       ({"base_logits": "x.kld"}, "at most one"),
                                       ({"resident": "some"}, "'resident' must be one of")])
def test_config_errors(tmp_path, keys, msg):
    d = {"name": "x", "base_cache": "c.ekc", **keys}
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(d)


def test_killed_cache_writer_resumes_and_writes_the_same_cache(written, tmp_path, monkeypatch):
    tmp, corpus, _, ggufs = written
    import evalkit.evaluation.forward as fw
    real, calls = fw.model_logits, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:          # the second group's base: chunks 0 and 1 are finished
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(fw, "model_logits", dying)
    cfg = _cfg(tmp_path, corpus, name="killed", base_cache=str(tmp_path / "c.ekc"), variants=ggufs)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    part = tmp_path / "results" / "killed" / "partial"
    assert sorted(p.name for p in part.glob("hidden_*")) == ["hidden_00000.npy", "hidden_00001.npy"]
    assert not (tmp_path / "c.ekc").exists()
    monkeypatch.setattr(fw, "model_logits", real)
    run(cfg, progress=False)
    a, b = BaseCache(tmp / "base.ekc"), BaseCache(tmp_path / "c.ekc")
    assert a.header == b.header and np.array_equal(a.hidden, b.hidden)
