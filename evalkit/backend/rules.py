"""Which arithmetic the reference CPU backend applies to one matrix multiplication.

Pure functions of the weight type, the matmul's shape, the number of tokens in the ubatch
and the thread count, written from docs/backend-ik-cpu.md (§0 table, §2 dispatch, §9
AVX2-only builds):

* the activation ("B") type a weight type is multiplied against (``vec_dot_type``, §2.1);
* whether the weight rows are converted on the fly before the GEMM
  (``MulMat::is_dequant_better`` with its batch thresholds, and iqk_mul_mat's
  ``Nx/nth >= 32`` / ``Nx % num_rows == 0`` conditions, §2.2; the fused FFN up/gate op
  converts without the thread condition, §2.3).

Nothing here touches data: :mod:`evalkit.backend.linear` applies the decisions.
"""
from __future__ import annotations

from dataclasses import dataclass

from evalkit.formats import get_format

__all__ = ["ACT_BF16", "ACT_F32", "ACT_Q8_2_X4", "ACT_Q8_K", "BACKENDS", "EMULATED", "Profile", "activation_kind",
           "conversion_target", "converts", "get_profile", "is_quantized", "num_rows"]

# Activation kinds, numbered as kernels/evalkit_kernels.h's ek_act_kind.
ACT_F32, ACT_Q8_2_X4, ACT_Q8_K, ACT_BF16 = 0, 1, 2, 3


@dataclass(frozen=True)
class Profile:
    """One emulated build of the reference: its name and the ISA facts the dispatch depends on."""

    name: str
    fancy_simd: bool          # HAVE_FANCY_SIMD (AVX-512 F/BW/DQ/VL/VNNI): R16 targets, KT thresholds 16/24
    bf16_activations: bool    # __AVX512BF16__: BF16 weights meet BF16-rounded activations


_PROFILES = {p.name: p for p in (Profile("ik-cpu", True, True), Profile("ik-cpu-avx2", False, False))}
EMULATED = tuple(_PROFILES)
BACKENDS = ("exact",) + EMULATED
"""Every value a variant's ``backend`` may take; "exact" is evalkit's float32 forward."""

_FLOAT_TYPES = ("F32", "F16", "BF16")
# vec_dot_type under GGML_USE_IQK_MULMAT and __AVX2__ (§2.1): Q8_K for the 256-block
# integer-scale families, Q8_2_X4 for the legacy, K-quant (Q4_K..Q6_K) and trellis types.
_Q8_K_TYPES = ("Q2_K", "Q3_K", "IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K", "IQ2_KS", "IQ3_KS", "IQ4_KS",
               "IQ4_KSS", "IQ5_KS", "IQ2_KL")
_Q8_2_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "IQ4_NL", "Q4_K", "Q5_K", "Q6_K", "IQ1_KT",
               "IQ2_KT", "IQ3_KT", "IQ4_KT")

# MulMat::is_dequant_better: (conversion target, batch threshold) with HAVE_FANCY_SIMD; the
# AVX2 build uses Q8_K_R8 for Q8_K_R16 and 32 for every trellis threshold (§9).
_CONVERSION = {
    **{t: ("Q8_K_R16", 32) for t in _Q8_K_TYPES},
    **{t: ("Q8_0_R8", 32) for t in ("Q4_0", "Q5_0", "Q6_0", "Q8_0", "IQ4_NL")},
    **{t: ("Q8_1", 32) for t in ("Q4_1", "Q5_1", "Q4_K", "Q5_K")},
    "Q6_K": ("Q8_0_R8", 64),
    "IQ1_KT": ("Q8_0_R8", 16), "IQ2_KT": ("Q8_0_R8", 16), "IQ3_KT": ("Q8_0_R8", 16), "IQ4_KT": ("Q8_0_R8", 24),
}

# iqk_mul_mat's minimum rows per thread for branch B (k_min_step).
K_MIN_STEP = 32


def get_profile(name: str) -> Profile:
    """The emulated build called ``name`` (``ik-cpu`` or ``ik-cpu-avx2``); KeyError otherwise."""
    return _PROFILES[name]


def _name(type_name: str | int) -> str:
    return get_format(type_name).name


def is_quantized(type_name: str | int) -> bool:
    """ggml_is_quantized: every type but F32, F16 and BF16."""
    return _name(type_name) not in _FLOAT_TYPES


def activation_kind(type_name: str | int, profile: Profile) -> int:
    """How the activations of a matmul with weights of ``type_name`` are rounded (ACT_*)."""
    t = _name(type_name)
    if t in _Q8_K_TYPES:
        return ACT_Q8_K
    if t in _Q8_2_TYPES:
        return ACT_Q8_2_X4
    if t == "BF16" and profile.bf16_activations:
        return ACT_BF16
    return ACT_F32       # F32/F16 (and BF16 without AVX512_BF16) take the float32 rows


def conversion_target(type_name: str | int, n_tokens: int, profile: Profile) -> str | None:
    """``is_dequant_better``: the type the weights are converted to for a ubatch of
    ``n_tokens`` tokens, or None when they are used as stored."""
    t = _name(type_name)
    rule = _CONVERSION.get(t)
    if rule is None:
        return None
    target, threshold = rule
    if not profile.fancy_simd:
        target = "Q8_K_R8" if target == "Q8_K_R16" else target
        threshold = 32 if t.endswith("_KT") else threshold
    return target if n_tokens >= threshold else None


def num_rows(target: str, profile: Profile) -> int:
    """``MulMat::num_rows`` of a conversion target: rows interleaved per block."""
    if profile.fancy_simd:
        return {"Q8_0_R8": 16, "Q8_1": 16, "Q8_K_R16": 16, "Q8_K_R8": 8}.get(target, 1)
    return {"Q8_0_R8": 8, "Q8_1": 8, "Q8_K_R8": 8, "Q8_K_R16": 16}.get(target, 1)


def converts(type_name: str | int, n_out: int, n_tokens: int, n_threads: int, fused: bool,
             profile: Profile) -> bool:
    """Whether a matmul re-encodes its weights before multiplying (§2.2, §2.3).

    ``n_out`` is Nx (output rows), ``n_tokens`` Ny (tokens in the ubatch), ``n_threads``
    the backend's thread count, ``fused`` True for the fused FFN up/gate op.
    """
    target = conversion_target(type_name, n_tokens, profile)
    if target is None:
        return False
    if fused:                       # iqk_moe_fused_up_gate: no Nx/nth or Nx % num_rows check
        return True
    if n_out // n_threads < K_MIN_STEP:     # branch A: tiles, never converted
        return False
    npt = -(-n_out // n_threads)
    return npt >= 16 and n_out % num_rows(target, profile) == 0
