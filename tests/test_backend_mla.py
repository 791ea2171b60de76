"""The backend lens on deepseek2 (multi-head latent attention, shared experts): the ik-cpu emulation
rounds what the reference's f16 cache holds (the normed latent and k_rope, MLAttention.half_kv),
and runs through the MoE layer's shared expert.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from evalkit.backend.forward import emulate
from evalkit.backend.linear import UbatchPlan
from evalkit.evaluation.forward import load_model
from evalkit.model.deepseek2 import set_mla_options

TOKENS = torch.arange(1, 97)


class _Passthrough(nn.Module):
    """An 'emulated' linear layer that multiplies exactly: isolates what emulate() changes besides
    the matmuls."""

    def __init__(self, base, profile, n_threads, plan, fused=False, role=""):
        super().__init__()
        self.base = base

    def forward(self, x, out=None):
        return self.base(x, out=out)


@pytest.fixture(scope="module")
def tiny_deepseek2(moe_model):
    """tiny-deepseek2.gguf (tests/moe_models.py: generated once per machine, sha256 checked)."""
    return moe_model("tiny-deepseek2")


def test_emulate_turns_on_the_mla_f16_cache(tiny_deepseek2):
    """With exact matmuls, the emulated model's logits are bit-identical to the exact model with
    half_kv on, and differ from it with half_kv off (so the switch is what changed them)."""
    exact = load_model(tiny_deepseek2)
    plain = exact(TOKENS).clone()
    set_mla_options(exact, half_kv=True)
    cached = exact(TOKENS).clone()
    emu = emulate(load_model(tiny_deepseek2), "ik-cpu", 2, UbatchPlan(), linear_cls=_Passthrough)
    flags = [b.attention.half_kv for b in emu.blk]
    assert flags and all(flags)
    got = emu(TOKENS)
    assert torch.equal(got, cached)
    assert not torch.equal(got, plain)


def test_ik_cpu_emulation_runs_the_shared_expert(tiny_deepseek2):
    """The full emulation (8-bit activations for quantized weights, fp16 for F16 ones) through MoE
    layers with a shared expert: finite logits, close to the exact ones but not equal."""
    exact = load_model(tiny_deepseek2)(TOKENS).clone()
    model = emulate(load_model(tiny_deepseek2), "ik-cpu", 2, UbatchPlan())
    assert any(b.moe is not None and b.moe.ffn_gate_shexp is not None for b in model.blk)
    got = model(TOKENS)
    assert torch.isfinite(got).all()
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 0 < rel < 0.05, rel
