"""Legacy 32-element block types (kernels/legacy_quants.c): Q4_0, Q4_1, Q5_0, Q5_1, Q6_0, Q8_0, IQ4_NL.

In every 4-bit array byte j holds element j (low nibble) and element j + 16 (high), so
the 32 codes of a block are the 16 low nibbles followed by the 16 high ones. The float
expressions are the C kernel's: ``(float)(q - z) * d``, ``(float)q * d + m`` (a multiply,
then an add: two roundings) and ``d * T[q]``.
"""
from __future__ import annotations

import numpy as np
import torch

from evalkit.formats.torch_dequant._common import consts, f16_scale, split_rows, u16

__all__ = ["q4_0", "q4_1", "q5_0", "q5_1", "q6_0", "q8_0", "iq4_nl", "IQ4NL_VALUES"]

QK = 32
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _blocks(q: torch.Tensor, block_bytes: int) -> torch.Tensor:
    return split_rows(q, 0, block_bytes)[1]


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(..., 16) bytes → (..., 32) codes: low nibbles (elements 0..15), then high (16..31)."""
    qs = qs.to(torch.int32)
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _fifth_bits(b: torch.Tensor, off: int) -> torch.Tensor:
    """Bit j of the little-endian 32-bit mask at ``off``, for j = 0..31, as int32 (..., 32)."""
    dev = b.device
    byte = consts("q5:byte", dev, lambda: np.arange(QK, dtype=np.int64) // 8 + 0)
    shift = consts("q5:shift", dev, lambda: (np.arange(QK) % 8).astype(np.int32))
    return (b[..., off + byte].to(torch.int32) >> shift) & 1


def _out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(x.shape[0], n)


def q4_0(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q4_0 {d; qs[16]}: x = (float)(q - 8) * d."""
    b = _blocks(q, 18)
    d = f16_scale(u16(b, 0))
    return _out((_nibbles(b[..., 2:18]) - 8).to(torch.float32) * d, n)


def q4_1(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q4_1 {d; m; qs[16]}: x = (float)q * d + m."""
    b = _blocks(q, 20)
    d, m = f16_scale(u16(b, 0)), f16_scale(u16(b, 2))
    return _out(_nibbles(b[..., 4:20]).to(torch.float32) * d + m, n)


def q5_0(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q5_0 {d; qh[4]; qs[16]}: x = (float)(q - 16) * d, bit 4 of element j is bit j of qh."""
    b = _blocks(q, 22)
    d = f16_scale(u16(b, 0))
    codes = _nibbles(b[..., 6:22]) | (_fifth_bits(b, 2) << 4)
    return _out((codes - 16).to(torch.float32) * d, n)


def q5_1(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q5_1 {d; m; qh[4]; qs[16]}: x = (float)q * d + m."""
    b = _blocks(q, 24)
    d, m = f16_scale(u16(b, 0)), f16_scale(u16(b, 2))
    codes = _nibbles(b[..., 8:24]) | (_fifth_bits(b, 4) << 4)
    return _out(codes.to(torch.float32) * d + m, n)


def q6_0(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q6_0 {d; qh[8]; qs[16]}: x = (float)(q - 32) * d; bits 4-5 of elements j and j + 16
    sit in the nibble 4*(j/8) of qh[j % 8] (j's pair low, j + 16's pair high)."""
    b = _blocks(q, 26)
    d = f16_scale(u16(b, 0))
    dev = q.device
    j = np.arange(QK // 2)
    byte = consts("q6_0:byte", dev, lambda: (2 + j % 8).astype(np.int64))
    shift = consts("q6_0:shift", dev, lambda: (4 * (j // 8)).astype(np.int32))
    h = (b[..., byte].to(torch.int32) >> shift) & 0xF                       # (..., 16)
    high = torch.cat(((h << 4) & 0x30, (h << 2) & 0x30), dim=-1)            # elements j, then j + 16
    return _out(((_nibbles(b[..., 10:26]) | high) - 32).to(torch.float32) * d, n)


def q8_0(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q8_0 {d; qs[32] int8}: x = (float)q * d."""
    b = _blocks(q, 34)
    d = f16_scale(u16(b, 0))
    codes = b[..., 2:34].to(torch.int32)
    codes = codes - ((codes & 0x80) << 1)                                    # int8 sign extension
    return _out(codes.to(torch.float32) * d, n)


def iq4_nl(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ4_NL {d; qs[16]}: x = d * T[q], T the 16-entry non-linear table."""
    b = _blocks(q, 18)
    d = f16_scale(u16(b, 0))
    table = consts("iq4nl", q.device, lambda: np.array(IQ4NL_VALUES, dtype=np.float32))
    return _out(d * table[_nibbles(b[..., 2:18])], n)
