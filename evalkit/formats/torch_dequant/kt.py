"""Trellis types (kernels/kt_quants.c): IQ1_KT, IQ2_KT, IQ3_KT, IQ4_KT.

Row = [float32 D][super-blocks of 256 in 8 blocks of 32]. Each group of 8 (IQ4_KT: 4)
weights is one index i into a codebook that is not stored but generated: x = i + offset,
then ``x *= 0xCBAC1FED`` (mod 2^32) once per value, and the value is the sum of the four
bytes of ``x & 0x3F3F3F3F`` minus 126 (ek_kt_gen). Here the k-th value comes from
``x0 * M^(k+1) mod 2^32`` with the powers precomputed, and the 32-bit products are formed
from 16-bit halves in int64 so that no operation overflows on any device. A value is
``sl * (float)v`` with the block scale ``sl = d * (float)scale``; the inference variant
multiplies the row scale by the type's factor first (IQ2_KT 1.05f, IQ3_KT 1.01f, else 1.0f).
"""
from __future__ import annotations

import numpy as np
import torch

from evalkit.formats.torch_dequant._common import consts, f32_const, f32_scale, split_rows, with_sign
from evalkit.formats.torch_dequant.legacy import IQ4NL_VALUES

__all__ = ["iq1_kt", "iq2_kt", "iq3_kt", "iq4_kt", "trellis_values"]

_MULT = 0xCBAC1FED
_OFFSET = 4096
_MASK32 = 0xFFFFFFFF


def _powers(g: int) -> np.ndarray:
    """M^(k+1) mod 2^32 for k < g, as int64."""
    out, p = [], 1
    for _ in range(g):
        p = (p * _MULT) & _MASK32
        out.append(p)
    return np.array(out, dtype=np.int64)


def _mul32(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(x * p) mod 2^32 for 0 <= x, p < 2^32 (int64), without an int64 overflow."""
    xl, xh = x & 0xFFFF, x >> 16
    pl, ph = p & 0xFFFF, p >> 16
    return (xl * pl + (((xh * pl + xl * ph) & 0xFFFF) << 16)) & _MASK32


def trellis_values(idx: torch.Tensor, g: int, is_abs: bool) -> torch.Tensor:
    """The generator's ``g`` integer values (int32 in -126..126, or |v|) per index ``idx`` (offset
    included, int64): (...,) → (..., g)."""
    x = _mul32(idx.unsqueeze(-1), consts(f"kt:pow{g}", idx.device, lambda: _powers(g)))
    s = x & 0x3F3F3F3F
    v = ((s & 0xFF) + ((s >> 8) & 0xFF) + ((s >> 16) & 0xFF) + (s >> 24)).to(torch.int32) - 126
    return v.abs() if is_abs else v


def _row_d(head: torch.Tensor, variant: int, factor: float) -> torch.Tensor:
    """The row scale as used (kt_row_d): D for to_float, fl(D * factor) for inference; (R, 1, 1)."""
    d = f32_scale(head, 0)
    if variant == 1:
        d = d * f32_const(factor, head.device)
    return d.unsqueeze(-1)


def _kt_v4(device: torch.device) -> torch.Tensor:
    return consts("kt:v4", device, lambda: np.array(IQ4NL_VALUES, dtype=np.float32))


def _scaled(sl: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """sl (R, nb, 8) times the values (R, nb, 8 blocks, groups, g) → (R, n)."""
    return (sl[..., None, None] * v.to(torch.float32)).reshape(v.shape[0], n)


def _nibble_scales(b: torch.Tensor) -> torch.Tensor:
    """IQ2_KT/IQ3_KT block ib's scale: nibble ib/4 of byte ib%4, int64 (R, nb, 8)."""
    s = b[..., 0:4].to(torch.int64)
    return torch.cat((s & 0xF, s >> 4), dim=-1)


def _u16_indices(b: torch.Tensor) -> torch.Tensor:
    """The 32 little-endian u16 group indices at bytes 4..67, int64 (R, nb, 8 blocks, 4 groups)."""
    w = b[..., 4:68].reshape(*b.shape[:-1], 8, 4, 2).to(torch.int64)
    return w[..., 0] | (w[..., 1] << 8)


def iq1_kt(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ1_KT [D] {sh[8]; ql[32]; qh[16]}: 13-bit indices of 8 values, sl = d * T[sh & 15]."""
    head, b = split_rows(q, 4, 56)
    d = _row_d(head, variant, 1.0)
    sh = b[..., 0:8].to(torch.int64)                                     # (R, nb, 8)
    sl = d * _kt_v4(q.device)[sh & 0xF]
    ql = b[..., 8:40].reshape(*b.shape[:-1], 8, 4).to(torch.int64)       # (R, nb, ib, ig)
    # qh[4 * (ib % 4) + ig] nibble ib / 4: blocks 0-3 the low nibbles of the 16 bytes, 4-7 the high
    qh = b[..., 40:56].reshape(*b.shape[:-1], 4, 4).to(torch.int64)
    qh = torch.cat((qh & 0xF, qh >> 4), dim=-2)                          # (R, nb, ib, ig)
    ig = consts("kt:ig4", q.device, lambda: torch.arange(4, dtype=torch.int64))
    top = (sh.unsqueeze(-1) >> (4 + ig)) & 1
    idx = ql | (qh << 8) | (top << 12)
    return _scaled(sl, trellis_values(idx + _OFFSET, 8, False), n)


def iq2_kt(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ2_KT [D] {scales[4]; 32 u16 indices}: sl = d * T[scale]; inference d = D * 1.05f."""
    head, b = split_rows(q, 4, 68)
    d = _row_d(head, variant, 1.05)
    sl = d * _kt_v4(q.device)[_nibble_scales(b)]
    return _scaled(sl, trellis_values(_u16_indices(b) + _OFFSET, 8, False), n)


def iq3_kt(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ3_KT [D] {scales[4]; 32 u16 indices; qh[32]}: |values|, sl = d * scale, then the sign
    bit ib of qh[8 * ig + j] flips element (ib, ig, j) (a sign-bit xor, as the C kernel);
    inference d = D * 1.01f."""
    head, b = split_rows(q, 4, 100)
    d = _row_d(head, variant, 1.01)
    sl = d * _nibble_scales(b).to(torch.float32)
    x = _scaled(sl, trellis_values(_u16_indices(b) + _OFFSET, 8, True), n)
    blk = consts("kt:blk8", q.device, lambda: torch.arange(8, dtype=torch.int32).reshape(8, 1))
    signs = (b[..., 68:100].to(torch.int32).unsqueeze(-2) >> blk) & 1       # (R, nb, ib, 32 = ig*8 + j)
    bits = x.view(torch.int32).reshape(signs.shape)
    return with_sign(bits & 0x7FFFFFFF, (bits < 0) ^ (signs != 0)).reshape(q.shape[0], n)


def iq4_kt(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ4_KT [D] {8 u32 words; ql[64]; qh[32]}: word ib = offset flag (bit 0), scale
    (bits 1-7, minus 64), index bits 12-14 of its 8 groups (3 bits each from bit 8)."""
    head, b = split_rows(q, 4, 128)
    d = _row_d(head, variant, 1.0)
    w = b[..., 0:32].reshape(*b.shape[:-1], 8, 4).to(torch.int64)
    word = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)     # (R, nb, 8)
    sl = d * (((word & 0xFF) >> 1) - 64).to(torch.float32)
    ql = b[..., 32:96].reshape(*b.shape[:-1], 8, 8).to(torch.int64)      # group G = 8 ib + ig
    qh = b[..., 96:128].to(torch.int64)
    qh = torch.cat((qh & 0xF, qh >> 4), dim=-1).reshape(ql.shape)        # qh[G % 32] nibble G / 32
    ig = consts("kt:ig8", q.device, lambda: torch.arange(8, dtype=torch.int64))
    top = (word.unsqueeze(-1) >> (8 + 3 * ig)) & 7
    offset = _OFFSET + (word & 1).unsqueeze(-1) * 32768
    idx = ql | (qh << 8) | (top << 12)
    return _scaled(sl, trellis_values(idx + offset, 4, False), n)
