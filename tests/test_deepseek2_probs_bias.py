"""A softmax-router deepseek2 file that carries ``exp_probs_b``: ik_llama.cpp 8337e4cd loads the
tensor as optional (create_deepseek2_tensors) and llm_build_moe_ffn adds it to the probabilities
for the top-k selection whatever the gating function; evalkit does the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.model import Model
from evalkit.model.config import ModelConfig
from evalkit.model.moe import route

TOKENS = torch.arange(1, 65)


def _rewrite(src: Path, out: Path, meta: dict, drop=lambda name: False) -> Path:
    """A copy of ``src`` with metadata keys replaced and some tensors dropped."""
    f = GGUFFile(src)
    md = {**f.metadata, **meta}
    specs = [TensorSpec(t.name, t.shape, t.type_id) for t in f.tensors.values() if not drop(t.name)]
    write_gguf(out, md, specs, lambda s: f.tensor_bytes(s.name), f.metadata_types)
    return out


@pytest.fixture(scope="module")
def softmax_files(moe_model, tmp_path_factory):
    """tiny-deepseek2 switched to the softmax router (expert_gating_func 1), with and without its
    exp_probs_b tensors."""
    src = moe_model("tiny-deepseek2")
    d = tmp_path_factory.mktemp("ds2-softmax")
    meta = {"deepseek2.expert_gating_func": 1}
    return (_rewrite(src, d / "with-bias.gguf", meta),
            _rewrite(src, d / "no-bias.gguf", meta, drop=lambda n: n.endswith("exp_probs_b.bias")))


def test_softmax_router_uses_the_bias_when_present(softmax_files):
    """The bias is loaded (the file's values) and changes the routing; the model without it equals
    the one with it once its routers are given the same bias (it only acts through selection)."""
    with_bias, no_bias = softmax_files
    assert ModelConfig.from_gguf(with_bias).expert_probs_bias
    assert not ModelConfig.from_gguf(no_bias).expert_probs_bias
    a, b = Model.from_gguf(with_bias), Model.from_gguf(no_bias)
    f = GGUFFile(with_bias)
    moes = [(i, blk.moe) for i, blk in enumerate(a.blk) if blk.moe is not None]
    assert moes
    for i, moe in moes:
        name = f"blk.{i}.exp_probs_b.bias"
        assert f.tensor(name).type_name == "F32"
        want = np.asarray(f.tensor_bytes(name)).view(np.float32).reshape(-1)
        assert np.array_equal(moe.exp_probs_b.numpy(), want)
        assert b.blk[i].moe.exp_probs_b is None
    za, zb = a(TOKENS).clone(), b(TOKENS).clone()
    assert not torch.equal(za, zb)
    for i, moe in moes:
        b.blk[i].moe.exp_probs_b = moe.exp_probs_b
    assert torch.equal(b(TOKENS), za)


def test_route_softmax_with_bias_against_numpy():
    """Selection by softmax + bias, weights the unbiased softmax at the chosen experts, renormalised
    and scaled: an independent float64 computation (no ties in these draws)."""
    g = np.random.default_rng(5)
    logits = g.normal(size=(50, 8)).astype(np.float32)
    bias = (0.2 * g.normal(size=8)).astype(np.float32)
    chosen, w = route(torch.from_numpy(logits), 3, "softmax", torch.from_numpy(bias), norm=True, scale=2.5)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.argsort(-(p + bias), axis=1, kind="stable")[:, :3]
    assert np.array_equal(chosen.numpy(), want)
    pw = np.take_along_axis(p, want, 1)
    np.testing.assert_allclose(w.numpy(), 2.5 * pw / pw.sum(1, keepdims=True), rtol=1e-5)
