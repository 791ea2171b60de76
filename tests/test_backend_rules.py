"""The emulated backend's dispatch rules (docs/backend-ik-cpu.md §0, §2, §9) and ubatch plan.

The rules are checked against the spec's own SmolLM2 table and against an independent
transcription of ``iqk_mul_mat`` / ``is_dequant_better`` over a grid of shapes, batch
sizes, thread counts and types.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from evalkit.backend.linear import UbatchPlan
from evalkit.backend.rules import (ACT_BF16, ACT_F32, ACT_Q8_2_X4, ACT_Q8_K, activation_kind, conversion_target,
                                   converts, get_profile)

FANCY, AVX2 = get_profile("ik-cpu"), get_profile("ik-cpu-avx2")

# §0 table: type -> (target, N threshold) on the AVX-512 build
SPEC_TABLE = {
    "Q8_0": ("Q8_0_R8", 32), "Q4_0": ("Q8_0_R8", 32), "Q5_0": ("Q8_0_R8", 32), "Q6_0": ("Q8_0_R8", 32),
    "IQ4_NL": ("Q8_0_R8", 32), "Q4_1": ("Q8_1", 32), "Q5_1": ("Q8_1", 32), "Q4_K": ("Q8_1", 32),
    "Q5_K": ("Q8_1", 32), "Q6_K": ("Q8_0_R8", 64), "IQ2_K": ("Q8_K_R16", 32), "IQ3_K": ("Q8_K_R16", 32),
    "IQ4_K": ("Q8_K_R16", 32), "IQ5_K": ("Q8_K_R16", 32), "IQ6_K": ("Q8_K_R16", 32), "IQ2_KS": ("Q8_K_R16", 32),
    "IQ4_KS": ("Q8_K_R16", 32), "IQ2_KT": ("Q8_0_R8", 16), "IQ3_KT": ("Q8_0_R8", 16), "IQ4_KT": ("Q8_0_R8", 24),
    # not in the §0 table but in is_dequant_better (iqk_mul_mat.cpp line 238)
    "IQ3_KS": ("Q8_K_R16", 32), "IQ4_KSS": ("Q8_K_R16", 32), "IQ5_KS": ("Q8_K_R16", 32),
    "IQ2_KL": ("Q8_K_R16", 32), "Q2_K": ("Q8_K_R16", 32), "Q3_K": ("Q8_K_R16", 32), "IQ1_KT": ("Q8_0_R8", 16),
}


def spec_converts(type_name, nx, ny, nth, fused, fancy=True):
    """iqk_mul_mat / iqk_moe_fused_up_gate as the spec's pseudo-code (§2.2, §2.3, §9)."""
    if type_name not in SPEC_TABLE:
        return False
    target, thr = SPEC_TABLE[type_name]
    if not fancy:
        target = "Q8_K_R8" if target == "Q8_K_R16" else target
        thr = 32 if type_name.endswith("_KT") else thr
    if ny < thr:
        return False
    if fused:
        return True
    if nx // nth < 32:
        return False
    num_rows = 16 if fancy else 8
    return -(-nx // nth) >= 16 and nx % num_rows == 0


def test_smollm2_conversion_table_by_thread_count():
    """§2.2's table: which SmolLM2 matmuls convert (IQ4_K weights, N = 512) for each nth."""
    for nth in range(1, 40):
        q = converts("IQ4_K", 576, 512, nth, False, FANCY)        # attn_q / attn_output / ffn_down
        kv = converts("IQ4_K", 192, 512, nth, False, FANCY)       # attn_k / attn_v
        out = converts("Q8_0", 49152, 512, nth, False, FANCY)     # the tied output
        up = converts("IQ4_K", 1536, 512, nth, True, FANCY)       # fused up/gate: any nth
        assert (q, kv, out, up) == (nth <= 18, nth <= 6, True, True), nth


def test_thresholds_and_the_thread_rule_match_the_spec_grid():
    types = list(SPEC_TABLE) + ["F32", "F16", "BF16"]
    grid = itertools.product(types, [32, 48, 192, 200, 576, 1536], [1, 8, 15, 16, 23, 24, 31, 32, 63, 64, 512],
                             [1, 2, 3, 7, 19, 64], [False, True], [True, False])
    for t, nx, ny, nth, fused, fancy in grid:
        got = converts(t, nx, ny, nth, fused, FANCY if fancy else AVX2)
        assert got == spec_converts(t, nx, ny, nth, fused, fancy), (t, nx, ny, nth, fused, fancy)


def test_conversion_targets_per_build():
    assert conversion_target("IQ4_K", 32, FANCY) == "Q8_K_R16" and conversion_target("IQ4_K", 31, FANCY) is None
    assert conversion_target("IQ4_K", 32, AVX2) == "Q8_K_R8"
    assert conversion_target("IQ2_KT", 16, FANCY) == "Q8_0_R8" and conversion_target("IQ2_KT", 16, AVX2) is None
    assert conversion_target("IQ4_KT", 23, FANCY) is None and conversion_target("IQ4_KT", 24, FANCY) == "Q8_0_R8"
    assert conversion_target("Q6_K", 63, FANCY) is None and conversion_target("Q6_K", 64, AVX2) == "Q8_0_R8"
    for t in ("F32", "F16", "BF16"):
        assert conversion_target(t, 4096, FANCY) is None


def test_activation_kinds():
    for t in ("IQ2_K", "IQ6_K", "IQ2_KS", "IQ4_KSS", "IQ2_KL", "Q2_K", "Q3_K"):
        assert activation_kind(t, FANCY) == ACT_Q8_K == activation_kind(t, AVX2)
    for t in ("Q4_0", "Q4_1", "Q8_0", "IQ4_NL", "Q6_0", "Q4_K", "Q6_K", "IQ1_KT", "IQ4_KT"):
        assert activation_kind(t, FANCY) == ACT_Q8_2_X4
    assert activation_kind("F16", FANCY) == ACT_F32 == activation_kind("F32", FANCY)
    assert activation_kind("BF16", FANCY) == ACT_BF16 and activation_kind("BF16", AVX2) == ACT_F32


@pytest.mark.parametrize("ctx,ub,expect", [(512, 512, [512] * 512), (512, 8, [8] * 512),
                                           (500, 64, [64] * 448 + [52] * 52), (512, 4096, [512] * 512)])
def test_ubatch_plan_kld_mode(ctx, ub, expect):
    plan = UbatchPlan(ub, 2048, "kld")
    plan.n_ctx = ctx
    assert plan.row_tokens(2, ctx).tolist() == expect * 2
    # the last block computes only the later positions: they keep their ubatch's size
    assert plan.row_tokens(1, 100).tolist() == expect[-100:]


def test_ubatch_plan_perplexity_mode_spans_sequences():
    plan = UbatchPlan(512, 2048, "ppl")
    plan.n_ctx = 256                      # 4 sequences of 256 per call: ubatches of 512 hold two
    assert set(plan.row_tokens(4, 256).tolist()) == {512}
    assert np.array_equal(plan.row_tokens(3, 256), [512] * 512 + [256] * 256)
