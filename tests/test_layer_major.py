"""Layer-major evaluation: bit-identical to the ordinary order (dense and MoE, in memory and
spilled), perplexity's --order layer, and the router statistics against an independent count."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from conftest import GOLDEN, SHARED
from evalkit.errors import EvalkitError, InputError, RunError
from evalkit.evaluation.corpus_chunks import chunk_corpus, tokenizer_for
from evalkit.evaluation.forward import ModelForward, load_model
from evalkit.evaluation.layer_major import LayerMajor
from evalkit.evaluation.loop import batched
from evalkit.evaluation.perplexity import perplexity
from evalkit.model import Workspace
from evalkit.report.router_stats import RouterStats, router_markdown, routing_agreement

CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"
TINY = GOLDEN / "gguf" / "tiny-base.gguf"
CTX, N_CHUNKS, PER_CALL = 128, 5, 2          # groups [0, 1] [2, 3] [4]: the last one shorter


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _chunks(path):
    tok = tokenizer_for(path)
    text = CORPUS.read_text()[:40000]
    return chunk_corpus(tok, tok.encode(text), "sha", "wikitext head", CTX, N_CHUNKS)


def _ordinary(path, cc, router_logits: dict | None = None) -> dict[tuple, np.ndarray]:
    """The ordinary order's scored logits, per group; with ``router_logits`` (a dict) also every
    MoE layer's router logits of every token, in evaluation order (forward hooks)."""
    model = load_model(path)
    logs: dict[int, list] = {}
    hooks = [] if router_logits is None else [blk.moe.ffn_gate_inp.register_forward_hook(
        lambda m, a, out, i=i: logs.setdefault(i, []).append(out.detach().numpy().copy()))
        for i, blk in enumerate(model.blk) if blk.moe is not None]
    fwd = ModelForward(model, cc.window, Workspace())
    want = {tuple(g): fwd(cc.chunks[g]).copy() for g in batched(range(N_CHUNKS), PER_CALL)}
    for h in hooks:
        h.remove()
    if router_logits is not None:
        router_logits.update({i: np.concatenate(v) for i, v in logs.items()})
    return want


def _check_identical(lm: LayerMajor, names, cc, want) -> None:
    for g, ref in want.items():
        for name in names:
            got = lm.forwards[name](cc.chunks[list(g)])
            assert np.array_equal(got, ref), (name, g, float(np.abs(got - ref).max()))


@pytest.mark.parametrize("spill", [False, True], ids=["in-memory", "spilled"])
def test_dense_layer_major_logits_are_bit_identical(tmp_path, spill):
    cc = _chunks(TINY)
    want = _ordinary(TINY, cc)
    spill_dir = tmp_path / "hidden"
    with LayerMajor([("base", TINY), ("copy", TINY)], spill_dir=spill_dir, spill=spill) as lm:
        lm.run(cc.chunks, range(N_CHUNKS), PER_CALL, cc.window)
        assert lm.info()["spilled"] is spill
        assert sorted(p.name for p in spill_dir.glob("*")) == (["hidden-0.f32", "hidden-1.f32"] if spill else [])
        _check_identical(lm, ["base", "copy"], cc, want)
        assert lm.router_stats is None                     # a dense model routes nothing
        with pytest.raises(RunError, match="not in the layer-major pass"):
            lm.forwards["base"](cc.chunks[:1][:, ::-1].copy())
    assert not list(spill_dir.glob("*"))                   # spill files removed at close


def test_budget_decides_the_spill(tmp_path):
    cc = _chunks(TINY)
    need = N_CHUNKS * CTX * 4 * load_model(TINY).config.n_embd
    for budget, spilled in ((need - 1, True), (need, False)):
        with LayerMajor([("m", TINY)], spill_dir=tmp_path, hidden_budget=budget) as lm:
            lm.run(cc.chunks, range(N_CHUNKS), PER_CALL, cc.window)
            assert lm.info()["spilled"] is spilled and lm.info()["hidden_bytes"] == need


def test_perplexity_order_layer_equals_order_model():
    runs = {order: perplexity(str(TINY), str(CORPUS), ctx=CTX, chunks=4, threads=2, batch=2 * CTX,
                              progress=False, out=io.StringIO(), order=order) for order in ("model", "layer")}
    assert runs["layer"]["running_ppl"] == runs["model"]["running_ppl"]
    assert runs["layer"]["ppl"] == runs["model"]["ppl"]
    assert runs["layer"]["layer_major"]["spilled"] is False and runs["model"]["layer_major"] is None


def test_order_errors(tmp_path):
    with pytest.raises(RunError, match="order must be"):
        perplexity(str(TINY), str(CORPUS), ctx=CTX, chunks=2, out=io.StringIO(), order="rows")
    with pytest.raises(RunError, match="exact forward pass on the CPU only"):
        perplexity(str(TINY), str(CORPUS), ctx=CTX, chunks=2, out=io.StringIO(), order="layer", backend="ik-cpu")
    with pytest.raises(RunError, match="distinct model names"):
        LayerMajor([("a", TINY), ("a", TINY)])
    with pytest.raises(EvalkitError):
        LayerMajor([("a", TINY), ("b", tmp_path / "missing.gguf")])


# --------------------------------------------------------------------------- MoE and router stats

def _perturbed_router(src_path, dst, layer: int) -> None:
    """A copy of an MoE model whose layer ``layer`` router weights get 30 % noise (a 'variant')."""
    from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
    src = GGUFFile(src_path)
    name = f"blk.{layer}.ffn_gate_inp.weight"

    def data(spec):
        b = src.tensor_bytes(spec.name)
        if spec.name != name:
            return b
        w = b.view(np.float32)
        noise = np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
        return (w + 0.3 * w.std() * noise).astype(np.float32).view(np.uint8)
    write_gguf(dst, dict(src.metadata), [TensorSpec(t.name, t.shape, t.type_id) for t in src.tensors.values()],
               data, src.metadata_types)


def _independent_stats(lb: np.ndarray, lv: np.ndarray, k: int) -> dict[str, float]:
    """Agreement counted token by token with Python sets from the logits (softmax keeps the order)."""
    tb, tv = np.argsort(-lb, axis=1, kind="stable")[:, :k], np.argsort(-lv, axis=1, kind="stable")[:, :k]
    agree = np.mean([len(set(a) & set(b)) / k for a, b in zip(tb.tolist(), tv.tolist())])
    X = lb.shape[1]
    load_b = np.array([np.sum(tb == e) for e in range(X)]) / tb.size
    load_v = np.array([np.sum(tv == e) for e in range(X)]) / tv.size
    return {"topk_agreement": agree, "top1_agreement": float(np.mean(tb[:, 0] == tv[:, 0])),
            "load_tvd": 0.5 * float(np.abs(load_b - load_v).sum())}


def test_moe_layer_major_identical_and_router_stats(tmp_path, moe_model):
    base = moe_model("tiny-qwen3moe")
    variant = tmp_path / "variant.gguf"
    _perturbed_router(base, variant, layer=1)
    cc = _chunks(base)
    lb, lv = {}, {}
    want = {"base": _ordinary(base, cc, lb), "variant": _ordinary(variant, cc, lv)}
    with LayerMajor([("base", base), ("variant", variant)], spill=True, spill_dir=tmp_path / "h") as lm:
        lm.run(cc.chunks, range(N_CHUNKS), PER_CALL, cc.window)
        for name in ("base", "variant"):
            _check_identical(lm, [name], cc, want[name])
        stats = lm.router_stats.to_dict()
    assert sorted(int(i) for i in stats["layers"]) == sorted(lb) == [0, 1, 2, 3]
    for il, row in stats["layers"].items():
        k = row["k"]
        ref = _independent_stats(lb[int(il)], lv[int(il)], k)
        assert row["n_tokens"] == lb[int(il)].shape[0]
        for key, value in ref.items():
            assert row["variant"][key] == pytest.approx(value, abs=1e-12), (il, key)
    assert stats["layers"]["0"]["variant"]["topk_agreement"] == 1.0          # before the perturbed router
    assert stats["layers"]["1"]["variant"]["topk_agreement"] < 1.0
    md = router_markdown(stats)
    assert md.count("\n| ") == 4 + 1 + 1 and "| **mean** |" in md         # header, 4 layers, mean


def test_routing_agreement_small_case():
    base = np.array([[0, 1], [2, 3], [1, 0]])
    var = np.array([[1, 0], [2, 1], [3, 2]])
    got = routing_agreement(base, var, n_expert=4)
    # shared: {0,1}: 2, {2}: 1, {}: 0 -> (1 + .5 + 0) / 3; top-1 equal only for token 1
    # loads: base (2, 2, 1, 1)/6, variant (1, 2, 2, 1)/6 -> TVD = (1 + 0 + 1 + 0)/12
    assert got == pytest.approx({"topk_agreement": 0.5, "top1_agreement": 1 / 3, "load_tvd": 1 / 6})
    with pytest.raises(InputError, match="do not pair"):
        routing_agreement(base, var[:2], n_expert=4)
    with pytest.raises(InputError, match="n_expert=3"):
        routing_agreement(base, var, n_expert=3)
    rs = RouterStats("b", ["v"])
    rs.add_layer(0, 4, base, {"v": var})
    assert rs.means()["v"]["load_tvd"] == pytest.approx(1 / 6)
    assert router_markdown({"layers": {}, "variants": ["v"]}) == ""
