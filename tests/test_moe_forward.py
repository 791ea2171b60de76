"""Mixture-of-experts forward pass (qwen3moe, glm4moe, llama/mistral3 with experts) against the reference.

The test models come from ../shared/tools/make_moe_models.py (tests/moe_models.py: generated
once per machine, sha256 checked against moe-reference.json). The MoE layer is compared with
an independent float64 computation from the dequantized expert matrices, the routing rules
with hand-computed cases, and whole-model perplexities with ik_llama.cpp's figures.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from moe_models import plain_moe_layer, reference
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.model import Model, ModelConfig, Workspace
from evalkit.model.config import UnsupportedModelError
from evalkit.model.model import ModelTensorError
from evalkit.model.moe import MoEFFN, route

REF = reference()["models"]
CORPUS = str(__import__("conftest").SHARED / "data" / "wikitext-2-raw-test.txt")


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize("key", ["tiny-qwen3moe", "tiny-glm4moe", "smol-moe", "smol-moe-mistral3"])
def test_config_reads_moe_hyperparameters(moe_model, key):
    cfg = ModelConfig.from_gguf(moe_model(key))
    hp = REF[key]["hyperparameters"]
    assert (cfg.arch, cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp) == \
        (hp["architecture"], hp["n_expert"], hp["n_expert_used"], hp["n_ff_exp"])
    assert (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_rot) == \
        (hp["n_head"], hp["n_head_kv"], hp["head_dim"], hp["n_rot"])
    assert cfg.n_layer_dense_lead == hp.get("n_layer_dense_lead", 0)
    assert cfg.n_expert_shared == hp.get("n_expert_shared", 0)
    assert cfg.expert_gating == hp.get("expert_gating_func", "softmax")
    assert cfg.expert_weights_scale == hp.get("expert_weights_scale", 1.0)
    assert cfg.expert_weights_norm is True                 # softmax routers always renormalise
    assert cfg.rope_neox is ("NEOX" in hp["rope_type"])
    assert cfg.tied_embeddings is hp["tied_output"]


# --------------------------------------------------------------------------- routing

def test_route_softmax_renormalises_topk():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    chosen, w = route(logits, 2, "softmax")
    p = np.exp([0.0, 2.0, 1.0, -1.0])
    p /= p.sum()
    assert chosen.tolist() == [[1, 2]]
    np.testing.assert_allclose(w.numpy()[0], [p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2])], rtol=1e-6)


def test_route_sigmoid_selects_with_bias_but_weighs_unbiased():
    logits = torch.tensor([[3.0, 0.5, 0.0, -2.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])              # lifts expert 3 into the top 2 ...
    chosen, w = route(logits, 2, "sigmoid", bias, norm=True, scale=2.5)
    s = 1 / (1 + np.exp(-np.array([3.0, 0.5, 0.0, -2.0])))
    assert chosen.tolist() == [[3, 0]]                     # 0.119 + 2 > sigmoid(3) = 0.953
    expect = np.array([s[3], s[0]]) / (s[3] + s[0]) * 2.5  # ... but is weighted by sigmoid alone
    np.testing.assert_allclose(w.numpy()[0], expect, rtol=1e-6)
    _, w_raw = route(logits, 2, "sigmoid", bias, norm=False, scale=1.0)
    np.testing.assert_allclose(w_raw.numpy()[0], [s[3], s[0]], rtol=1e-6)


# --------------------------------------------------------------------------- one MoE layer

@pytest.mark.parametrize("key,il", [("tiny-qwen3moe", 0), ("tiny-glm4moe", 1)])
def test_moe_layer_matches_plain_float64(moe_model, key, il):
    path = moe_model(key)
    model, g = Model.from_gguf(path), GGUFFile(path)
    moe = model.blk[il].moe
    assert isinstance(moe, MoEFFN) and (moe.exp_probs_b is not None) == (key == "tiny-glm4moe")
    h = torch.from_numpy(np.random.default_rng(7).standard_normal((61, model.config.n_embd), dtype=np.float32))
    got = moe(h.clone(), Workspace()).clone()
    again = moe(h.clone(), Workspace())
    assert torch.equal(got, again)                          # deterministic, bit for bit
    want, margin = plain_moe_layer(g, model.config, il, h.numpy())
    ok = margin > 1e-5                                      # near-ties may legitimately flip
    assert ok.sum() >= 55
    np.testing.assert_allclose(got.numpy()[ok], want[ok], rtol=2e-4, atol=2e-5 * np.abs(want).max())
    # with a residual: (x + routed) + shared, in place
    x = torch.ones_like(h)
    assert torch.allclose(moe(h, Workspace(), residual=x), 1 + got, rtol=1e-6, atol=1e-6)


def test_moe_multiplies_only_routed_experts_over_packed_slices(moe_model, monkeypatch):
    model = Model.from_gguf(moe_model("tiny-qwen3moe"))
    moe = model.blk[0].moe
    packed = moe.ffn_up_exps[0].weight
    for e in range(moe.n_expert):                           # views into one packed tensor, no copies
        w = moe.ffn_up_exps[e].weight
        assert w.dtype == torch.uint8 and w.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
        assert w.data_ptr() == packed.data_ptr() + e * w.numel()
    calls = []
    for e in range(moe.n_expert):
        lin = moe.ffn_gate_exps[e]
        monkeypatch.setattr(lin, "forward", lambda x, out=None, _e=e, _f=lin.forward: (calls.append(_e), _f(x, out))[1])
    h = torch.from_numpy(np.random.default_rng(1).standard_normal((1, model.config.n_embd), dtype=np.float32))
    chosen, _ = route(moe.ffn_gate_inp(h), moe.k, moe.gating)
    moe(h, Workspace())
    assert sorted(calls) == sorted(chosen[0].tolist())      # k experts run, the others never


# --------------------------------------------------------------------------- perplexity vs the reference

def _ppl(path, chunks: int = 8, half_kv: bool = False, monkeypatch=None) -> dict:
    """evalkit.evaluation.perplexity over the bundled corpus (optionally with fp16 K/V)."""
    import evalkit.evaluation.perplexity as P
    if half_kv:
        from evalkit.backend.linear import HalfKVAttention
        load = P.load_model

        def load_half(p, device="cpu"):
            m = load(p, device)
            for b in m.blk:
                b.attention = HalfKVAttention(b.attention)
            return m
        monkeypatch.setattr(P, "load_model", load_half)
    return P.perplexity(str(path), CORPUS, chunks=chunks, threads=2, out=io.StringIO(), progress=False)


def _check_ppl(r: dict, ref: dict, tol: float = 5e-4) -> None:
    ppl, err = r["ppl"]
    assert abs(ppl / ref["ppl"] - 1) < tol, (ppl, ref["ppl"])
    assert abs(err / ref["ppl_err"] - 1) < 0.01, (err, ref["ppl_err"])


@pytest.mark.slow
@pytest.mark.parametrize("key", ["tiny-qwen3moe", "tiny-glm4moe"])
def test_tiny_moe_perplexity_matches_reference(moe_model, key):
    _check_ppl(_ppl(moe_model(key)), REF[key]["base_ppl"]["chunks8"]["default"])


@pytest.mark.slow
@pytest.mark.parametrize("key", ["smol-moe-mistral3", "smol-moe"])
def test_smol_moe_perplexity_matches_mistral3_reference(moe_model, key):
    # the llama-arch file too: the reference mis-evaluates it (see moe-reference.json notes);
    # the same tensors must give the same, correct figure under either architecture name
    _check_ppl(_ppl(moe_model(key)), REF["smol-moe-mistral3"]["base_ppl"]["chunks8"]["default"])


def _chunk_nll_sums(running: list[float], n_scored: int = 255) -> list[float]:
    """Per-chunk NLL sums from running PPL values."""
    tot = [k * n_scored * math.log(v) for k, v in enumerate(running, 1)]
    return [tot[0]] + [b - a for a, b in zip(tot, tot[1:])]


@pytest.mark.slow
def test_qwen3moe_residual_is_fp16_kv_plus_one_near_tie(moe_model, monkeypatch):
    """The exact forward is within 0.05 % of the reference; what is left is the reference's fp16
    K/V cache: with K/V rounded to fp16 the first batch (chunks 1-4) agrees within 0.002 %, and
    chunk 5's gap is one near-tie routing (relative top-k margin ~6e-5): flipping that single
    choice closes it."""
    path = moe_model("tiny-qwen3moe")
    ref = REF["tiny-qwen3moe"]["base_ppl"]["chunks8"]["default"]["running"]
    r = _ppl(path, chunks=4, half_kv=True, monkeypatch=monkeypatch)
    assert all(abs(a / b - 1) < 2e-5 for a, b in zip(r["running_ppl"], ref[:4])), r["running_ppl"]
    gap_plain, gap_flipped = _chunk5_gaps(path, _chunk_nll_sums(ref)[4], monkeypatch)
    assert gap_plain > 0.3 and gap_flipped < 0.01, (gap_plain, gap_flipped)


def _chunk5_gaps(path, ref_sum: float, monkeypatch) -> tuple[float, float]:
    """|NLL sum - reference| of chunk 5 with fp16 K/V, as computed and with its closest
    top-k decision flipped."""
    import evalkit.model.moe as moe_mod
    from evalkit.backend.linear import HalfKVAttention
    from evalkit.corpus import load_corpus_text
    from evalkit.evaluation.corpus_chunks import chunk_corpus, tokenizer_for
    from evalkit.metrics import token_nll
    from evalkit.run_config import CorpusSpec
    text, sha, desc = load_corpus_text(CorpusSpec(path=CORPUS))
    tok = tokenizer_for(path)
    cc = chunk_corpus(tok, tok.encode(text), sha, desc, 512, 5)
    model = Model.from_gguf(path)
    for b in model.blk:
        b.attention = HalfKVAttention(b.attention)
    plain, state = moe_mod.route, {"layer": 0, "margins": [], "flip": None}

    def spy(logits, k, gating, bias=None, norm=True, scale=1.0):
        layer, state["layer"] = state["layer"], state["layer"] + 1
        p = torch.softmax(logits, -1) if gating == "softmax" else torch.sigmoid(logits)
        top = torch.topk(p if bias is None else p + bias, k + 1, dim=-1)
        state["margins"].append((top.values[:, k - 1] - top.values[:, k]) / top.values[:, k - 1])
        if state["flip"] is None or state["flip"][0] != layer:
            return plain(logits, k, gating, bias, norm, scale)
        chosen = top.indices[:, :k].clone()
        chosen[state["flip"][1], k - 1] = top.indices[state["flip"][1], k]
        w = p.gather(1, chosen)
        return chosen, w / w.sum(-1, keepdim=True)         # qwen3moe: softmax, renormalised
    monkeypatch.setattr(moe_mod, "route", spy)

    def gap() -> float:
        state.update(layer=0, margins=[])
        logits = model(torch.as_tensor(cc.chunks[4:5]), logits_start=cc.window.first_row)[0, :-1].numpy()
        return abs(float(np.sum(token_nll(logits, cc.targets(4), chunk=4, first_row=cc.window.first_row))) - ref_sum)
    g_plain = gap()
    # the closest call over every layer (the last one routes only the scored half's rows)
    best = min((float(m.min()), layer, int(m.argmin())) for layer, m in enumerate(state["margins"]))
    state["flip"] = best[1:]
    return g_plain, gap()


# --------------------------------------------------------------------------- bad input

def _rewrite(src, out, meta: dict | None = None, drop=lambda name: False):
    """A copy of ``src`` with metadata changed (value None: removed) and some tensors dropped."""
    f = GGUFFile(src)
    md = {k: v for k, v in f.metadata.items() if k not in (meta or {})}
    md.update({k: v for k, v in (meta or {}).items() if v is not None})
    specs = [TensorSpec(t.name, t.shape, t.type_id) for t in f.tensors.values() if not drop(t.name)]
    write_gguf(out, md, specs, lambda s: f.tensor_bytes(s.name), f.metadata_types)
    return out


def test_missing_expert_tensor_is_named(moe_model, tmp_path):
    bad = _rewrite(moe_model("tiny-qwen3moe"), tmp_path / "m.gguf", drop=lambda n: n == "blk.2.ffn_up_exps.weight")
    with pytest.raises(ModelTensorError, match=r"blk\.2\.ffn_up_exps\.weight.*missing"):
        Model.from_gguf(bad)


def test_more_experts_used_than_exist_is_named(moe_model, tmp_path):
    bad = _rewrite(moe_model("tiny-qwen3moe"), tmp_path / "m.gguf", meta={"qwen3moe.expert_used_count": 9})
    with pytest.raises(UnsupportedModelError, match=r"qwen3moe\.expert_used_count.*9 experts used.*only 8"):
        ModelConfig.from_gguf(bad)


def test_unsupported_rope_scaling_is_named(moe_model, tmp_path):
    bad = _rewrite(moe_model("tiny-glm4moe"), tmp_path / "m.gguf",
                   meta={"glm4moe.rope.scaling.type": "yarn", "glm4moe.rope.scaling.factor": 4.0})
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf.*rope scaling type 'yarn' is not supported for glm4moe"):
        ModelConfig.from_gguf(bad)
