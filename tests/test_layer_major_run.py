"""`evalkit run` with `order: layer`: the same run folder as the ordinary order (dense and MoE,
in memory and spilled under the run folder), router statistics in results.json / summary.md,
resume after a kill, a finished rerun that computes nothing, perplexity on an MoE model, config errors."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest

from conftest import GOLDEN, SHARED
from evalkit.evaluation import layer_major, layer_major_run
from evalkit.evaluation.layer_major import LayerMajor, LayerMajorForward
from evalkit.pipeline import run
from evalkit.run_config import ConfigError, config_from_dict
from test_layer_major import _perturbed_router

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:12000])
    return p


def _cfg(tmp_path, corpus, **kw):
    # batch 128 = 2 chunks of 64 per call: the 3 chunks go as [0, 1], [2]
    d = {"name": "tiny", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 3, "threads": 2,
         "batch": 128, "output_dir": str(tmp_path / "results"),
         "variants": [{"name": "IQ4_K", "ftype": "IQ4_K"}, {"name": "Q8_0", "ftype": "Q8_0"}]}
    d.update(kw)
    return config_from_dict(d, "test", str(tmp_path))


def _numbers(out):
    """results.json without what legitimately differs between two runs (times, paths, the order key)."""
    res = json.loads((out / "results.json").read_text())
    res.pop("wall_time_s")
    res.pop("config")
    res["base"].pop("tokens_per_s")
    for v in res["variants"].values():
        v.pop("tokens_per_s")
        v.pop("model")
    return res


def _same_folder(a, b, router: bool = False) -> None:
    """Run folders ``a`` (ordinary) and ``b`` (layer order) hold identical numbers."""
    ra, rb = _numbers(a), _numbers(b)
    stats = rb.pop("router_stats", None)
    assert (stats is not None) is router
    assert ra == rb
    pd.testing.assert_frame_equal(pd.read_parquet(a / "tokens.parquet"), pd.read_parquet(b / "tokens.parquet"))
    sa, sb = (a / "summary.md").read_text(), (b / "summary.md").read_text()
    if router:
        assert sb.startswith(sa) and "## Router statistics (vs the base)" in sb[len(sa):]
    else:
        assert sa == sb
    assert np.array_equal(np.load(a / "chunks.npy"), np.load(b / "chunks.npy"))
    assert not (b / layer_major_run.SPILL_FOLDER).exists()


@pytest.fixture(scope="module")
def ordinary(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("ordinary")
    return tmp, run(_cfg(tmp, corpus), progress=False)


class _Spy:
    """Records the hidden-state files LayerMajor creates and the chunks each pass runs."""

    def __init__(self, monkeypatch):
        self.paths, self.todos = [], []
        real_states, real_run = layer_major.HiddenStates, LayerMajor.run
        spy = self

        class States(real_states):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                spy.paths.append(self.path)

        def run_(lm, chunks, todo, *a, **kw):
            spy.todos.append(list(todo))
            return real_run(lm, chunks, todo, *a, **kw)
        monkeypatch.setattr(layer_major, "HiddenStates", States)
        monkeypatch.setattr(LayerMajor, "run", run_)


@pytest.mark.slow
@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
def test_dense_run_layer_order_writes_the_same_folder(tmp_path, corpus, ordinary, monkeypatch, spill):
    spy = _Spy(monkeypatch)
    if spill:           # no memory to spare: the hidden states go to files under the run folder
        monkeypatch.setattr(layer_major, "available_memory", lambda: 1)
    out = run(_cfg(tmp_path, corpus, order="layer"), progress=False)
    _same_folder(ordinary[1], out)
    assert spy.todos == [[0, 1, 2]]
    want = [out / layer_major_run.SPILL_FOLDER / f"hidden-{i}.f32" for i in range(3)] if spill else [None] * 3
    assert spy.paths == want
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["order"] == "layer" and res["base"]["tokens_per_s"] > 0


@pytest.mark.slow
def test_killed_layer_run_resumes_and_finished_rerun_computes_nothing(tmp_path, corpus, ordinary, monkeypatch):
    cfg = _cfg(tmp_path, corpus, order="layer")
    out = tmp_path / "results" / "tiny"
    real_call = LayerMajorForward.__call__
    calls = {"n": 0}

    def dying(self, tokens):
        calls["n"] += 1
        if calls["n"] == 4:     # the second group's base: chunks 0 and 1 are saved
            raise KeyboardInterrupt("killed")
        return real_call(self, tokens)
    monkeypatch.setattr(LayerMajorForward, "__call__", dying)
    monkeypatch.setattr(layer_major, "available_memory", lambda: 1)     # spilling when killed
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    assert sorted(p.name for p in (out / "partial").glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    assert not (out / layer_major_run.SPILL_FOLDER).exists() and not (out / "results.json").exists()
    monkeypatch.setattr(LayerMajorForward, "__call__", real_call)
    spy = _Spy(monkeypatch)
    run(cfg, progress=False)
    assert spy.todos == [[2]]                   # only the chunk not yet saved
    _same_folder(ordinary[1], out)
    before = (out / "results.json").read_text()
    run(cfg, progress=False)                    # finished: no layer pass at all
    assert spy.todos == [[2]]
    after = json.loads((out / "results.json").read_text())
    assert {k: v for k, v in after.items() if k != "wall_time_s"} == \
        {k: v for k, v in json.loads(before).items() if k != "wall_time_s"}


# --------------------------------------------------------------------------- MoE

@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory, moe_model):
    base = moe_model("tiny-qwen3moe")
    variant = tmp_path_factory.mktemp("moe") / "router-noise.gguf"
    _perturbed_router(base, variant, layer=1)
    return base, variant


def _moe_cfg(tmp_path, corpus, base, variant, **kw):
    # one chunk per call: the 2 chunks go in 2 groups
    return _cfg(tmp_path, corpus, base=str(base), ctx=128, batch=128, chunks=2,
                variants=[{"name": "noisy", "gguf": str(variant)}, {"name": "Q8_0", "ftype": "Q8_0"}], **kw)


def _router_of_whole_pass(base, variant, q8, cc_chunks, window) -> dict:
    """Router statistics of one LayerMajor pass over all chunks at once (checked against an
    independent count in test_layer_major.py)."""
    with LayerMajor([("(base)", base), ("noisy", variant), ("Q8_0", q8)]) as lm:
        lm.run(cc_chunks, range(len(cc_chunks)), 2, window)
        return lm.router_stats.to_dict()


@pytest.mark.slow
def test_moe_run_layer_order_same_numbers_and_router_stats(tmp_path, corpus, moe_pair, monkeypatch):
    from evalkit.evaluation.corpus_chunks import chunk_corpus, tokenizer_for
    base, variant = moe_pair
    a = run(_moe_cfg(tmp_path / "a", corpus, base, variant), progress=False)
    # killed in the scoring after the first group: the resumed run's router statistics cover both pieces
    cfg = _moe_cfg(tmp_path / "b", corpus, base, variant, order="layer")
    real_call, calls = LayerMajorForward.__call__, {"n": 0}

    def dying(self, tokens):
        calls["n"] += 1
        if calls["n"] == 4:     # the second group's base: chunk 0 is saved
            raise KeyboardInterrupt("killed")
        return real_call(self, tokens)
    monkeypatch.setattr(LayerMajorForward, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    partial = tmp_path / "b" / "results" / "tiny" / "partial"
    assert [p.name for p in partial.glob("chunk_*")] == ["chunk_00000.npz"]
    monkeypatch.setattr(LayerMajorForward, "__call__", real_call)
    b = run(cfg, progress=False)
    assert b / "partial" == partial
    _same_folder(a, b, router=True)
    stats = json.loads((b / "results.json").read_text())["router_stats"]
    assert stats["n_chunks"] == 2 and stats["variants"] == ["noisy", "Q8_0"] and stats["base"] == "base"
    tok = tokenizer_for(base)
    cc = chunk_corpus(tok, tok.encode(corpus.read_text()), "x", "x", 128, 2)
    whole = _router_of_whole_pass(base, variant, b / "models" / "Q8_0.gguf", cc.chunks, cc.window)
    assert set(stats["layers"]) == set(whole["layers"]) == {"0", "1", "2", "3"}
    for il, row in whole["layers"].items():
        for v in ("noisy", "Q8_0"):
            for key, value in row[v].items():
                assert stats["layers"][il][v][key] == pytest.approx(value, abs=1e-12), (il, v, key)
        assert stats["layers"][il]["n_tokens"] == row["n_tokens"]
    assert stats["layers"]["0"]["noisy"]["topk_agreement"] == 1.0     # the noise starts at layer 1's router
    assert stats["layers"]["1"]["noisy"]["topk_agreement"] < 1.0
    md = (b / "summary.md").read_text()
    assert "| **mean** |" in md and "Over the 2 chunks evaluated in layer order." in md


@pytest.mark.slow
def test_moe_perplexity_order_layer_equals_order_model(moe_pair, corpus, tmp_path, monkeypatch):
    from evalkit.evaluation.perplexity import perplexity
    base, _ = moe_pair
    monkeypatch.setattr(layer_major, "available_memory", lambda: 1)     # spilled, to the folder given
    runs = {order: perplexity(str(base), str(corpus), ctx=128, chunks=3, threads=2, batch=256, progress=False,
                              out=io.StringIO(), order=order,
                              spill_dir=str(tmp_path / "spill") if order == "layer" else None)
            for order in ("model", "layer")}
    assert runs["layer"]["running_ppl"] == runs["model"]["running_ppl"]
    assert runs["layer"]["ppl"] == runs["model"]["ppl"]
    assert runs["layer"]["layer_major"]["spilled"] is True
    assert not list((tmp_path / "spill").glob("*"))


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("keys, msg", [
    ({"order": "rows"}, "'order' must be one of model, layer, got 'rows'"),
    ({"order": 1}, "'order' must be str"),
    ({"spill_dir": "/tmp/x"}, "'spill_dir' applies to 'order: layer' only"),
    ({"order": "layer", "device": "cuda"}, "does not combine with device: cuda"),
    ({"order": "layer", "base_cache": "b.ekc"}, "does not combine with base_cache"),
    ({"order": "layer", "variants": [{"name": "x", "ftype": "IQ4_K", "backend": "ik-cpu"}]},
     r"does not combine with an emulated backend \(variants \['x'\]\)"),
])
def test_order_config_errors(tmp_path, corpus, keys, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(tmp_path, corpus, **keys)


def test_order_config_accepted(tmp_path, corpus):
    cfg = _cfg(tmp_path, corpus, order="layer", spill_dir="spill")
    assert (cfg.order, cfg.spill_dir) == ("layer", "spill")
    assert cfg.to_dict()["order"] == "layer" and _cfg(tmp_path, corpus).order == "model"


def test_layer_order_refuses_another_forward_factory(tmp_path, corpus):
    from evalkit.errors import RunError
    from evalkit.evaluation.forward import exact_forward
    with pytest.raises(RunError, match="cannot use another forward factory"):
        run(_cfg(tmp_path, corpus, order="layer", variants=[]), progress=False,
            make_forward=lambda p, w, b: exact_forward(p, w, b))
