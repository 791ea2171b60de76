"""F32, F16 and BF16 rows (kernels/float_types.c) as float32, bit for bit.

Each takes the packed rows (R, row_bytes) uint8 and returns (R, n) float32; the bits of
every value are reproduced exactly, NaN payloads included.
"""
from __future__ import annotations

import torch

from evalkit.formats.torch_dequant._common import f16_scale, with_sign

__all__ = ["f32", "f16", "bf16"]


def _halves(q: torch.Tensor) -> torch.Tensor:
    """(R, 2n) bytes → (R, n) little-endian uint16 values as int32."""
    b = q.reshape(q.shape[0], -1, 2).to(torch.int32)
    return b[..., 0] | (b[..., 1] << 8)


def f32(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """F32 rows: the bytes reinterpreted (a fresh tensor, never a view of ``q``)."""
    return q.reshape(q.shape[0], n, 4).clone().view(torch.float32).reshape(q.shape[0], n)


def f16(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """F16 rows, widened exactly as ``ek_fp16_to_fp32`` (integer bit manipulation)."""
    return f16_scale(_halves(q))


def bf16(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """BF16 rows: the 16 bits become the float32's top half."""
    h = _halves(q)
    return with_sign((h & 0x7FFF) << 16, (h & 0x8000) != 0)
