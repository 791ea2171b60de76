"""Every dequantizer a second time, in plain torch ops: the same float32 bits on any device.

``dequantize_torch(q, type, n_per_row, variant)`` takes packed ggml rows as a uint8 tensor
(rows, row_bytes) on any torch device and returns their float32 values (rows, n_per_row)
on that device, bit for bit what the C kernels of ``kernels/*.c`` write (the golden
vectors and random rows are checked in tests/test_torch_dequant.py). Integer fields are
unpacked with shifts and masks, codebooks are table lookups (indexing), the trellis of the
KT types is generated with integer ops on the device, and scales are multiplied in the C
expression's order, one rounding per operation (see ``_common``).

One module per format family, like the C kernels; :data:`TORCH_DEQUANTIZERS` is the one
table that maps each registered type (``evalkit.formats``) to its function. The C side
stays the reference and the CPU's fast path; these run the forward pass on GPUs
(``device: cuda``) and on the CPU when forced (``device: cpu-torch``).
"""
from __future__ import annotations

from typing import Callable

import torch

from evalkit.formats import QuantFormat, get_format
from evalkit.formats.torch_dequant import floats, iqk, iqks, kquants, kt, legacy, read_only
from evalkit.formats.torch_dequant._common import f32_const

__all__ = ["dequantize_torch", "TORCH_DEQUANTIZERS", "TorchDequantizer", "variant_id", "f32_const"]

TorchDequantizer = Callable[[torch.Tensor, int, int], torch.Tensor]
"""(packed rows (R, row_bytes) uint8, n_per_row, variant id) → float32 (R, n_per_row)."""

# type name -> torch dequantizer; one row per registered type (tests check the coverage)
TORCH_DEQUANTIZERS: dict[str, TorchDequantizer] = {
    # float
    "F32": floats.f32, "F16": floats.f16, "BF16": floats.bf16,
    # legacy 32-element blocks
    "Q4_0": legacy.q4_0, "Q4_1": legacy.q4_1, "Q5_0": legacy.q5_0, "Q5_1": legacy.q5_1,
    "Q6_0": legacy.q6_0, "Q8_0": legacy.q8_0, "IQ4_NL": legacy.iq4_nl,
    # k-quants
    "Q2_K": kquants.q2_k, "Q3_K": kquants.q3_k, "Q4_K": kquants.q4_k, "Q5_K": kquants.q5_k,
    "Q6_K": kquants.q6_k,
    # IQ*_K
    "IQ2_K": iqk.iq2_k, "IQ3_K": iqk.iq3_k, "IQ4_K": iqk.iq4_k, "IQ5_K": iqk.iq5_k, "IQ6_K": iqk.iq6_k,
    # row-scaled IQK
    "IQ2_KS": iqks.iq2_ks, "IQ3_KS": iqks.iq3_ks, "IQ4_KS": iqks.iq4_ks, "IQ4_KSS": iqks.iq4_kss,
    "IQ5_KS": iqks.iq5_ks, "IQ2_KL": iqks.iq2_kl,
    # trellis
    "IQ1_KT": kt.iq1_kt, "IQ2_KT": kt.iq2_kt, "IQ3_KT": kt.iq3_kt, "IQ4_KT": kt.iq4_kt,
    # read only (the plain side of repacked IQ4_XS_R8 / Q8_KV_R8 tensors)
    "IQ4_XS": read_only.iq4_xs, "Q8_KV": read_only.q8_kv,
}

# the C side's variant ids (evalkit.codec.DEQUANT_VARIANTS), repeated to keep this torch-only
_VARIANTS = {"to_float": 0, "inference": 1}


def variant_id(variant: str | int) -> int:
    """0 for ``"to_float"``, 1 for ``"inference"`` (ids pass through); ValueError otherwise."""
    if isinstance(variant, str):
        if variant not in _VARIANTS:
            raise ValueError(f"unknown dequantization variant {variant!r}; choose one of {list(_VARIANTS)}")
        return _VARIANTS[variant]
    if int(variant) not in _VARIANTS.values():
        raise ValueError(f"unknown dequantization variant id {variant!r}; choose one of {list(_VARIANTS.values())}")
    return int(variant)


def _check(q: torch.Tensor, fmt: QuantFormat, n: int) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8 or q.dim() != 2:
        raise TypeError(f"dequantize_torch: expected a 2-D uint8 tensor (rows, row_bytes), got "
                        f"{getattr(q, 'dtype', type(q).__name__)} of shape {tuple(getattr(q, 'shape', ()))}")
    rb = fmt.row_bytes(n)          # ValueError for a row length that is not a block multiple
    if q.shape[1] != rb:
        raise ValueError(f"dequantize_torch: rows are {q.shape[1]} bytes wide but a {fmt.name} row of {n} "
                         f"elements takes {rb} bytes")


def dequantize_torch(q: torch.Tensor, type_name: str | int, n_per_row: int,
                     variant: str | int = "to_float") -> torch.Tensor:
    """Packed rows ``q`` (rows, row_bytes) uint8 of ``type_name`` → float32 (rows, n_per_row) on q's device.

    ``variant`` as :func:`evalkit.dequantize`: ``"to_float"`` (the reference's CPU to_float)
    or ``"inference"`` (its matrix-multiplication values: IQ6_K's integer table, the
    IQ2_KT / IQ3_KT row scale times 1.05 / 1.01). Bit-identical to the C kernels.
    """
    fmt = get_format(type_name)
    n = int(n_per_row)
    _check(q, fmt, n)
    fn = TORCH_DEQUANTIZERS.get(fmt.name)
    if fn is None:
        raise NotImplementedError(f"dequantize_torch: {fmt.name} has no torch dequantizer")
    if q.shape[0] == 0:
        return torch.empty((0, n), dtype=torch.float32, device=q.device)
    return fn(q.contiguous(), n, variant_id(variant))
