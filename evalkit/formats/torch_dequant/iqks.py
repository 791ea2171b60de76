"""Row-scaled IQK types (kernels/iq2_ks.c … iq2_kl.c): IQ2_KS, IQ3_KS, IQ4_KS, IQ5_KS, IQ4_KSS, IQ2_KL.

Row = [row scale d (fp16 or float32)][super-blocks of 256 in 8 blocks of 32]. Block ib has
``dl = d * (float)scale`` and an element is ``dl * V[idx]``; the tables are those of
:mod:`.iqk` (IQ2_KL: a grid of value pairs).
"""
from __future__ import annotations

import numpy as np
import torch

from evalkit.formats.torch_dequant._common import consts, f16_scale, f32_scale, gather_bits, split_rows, u16
from evalkit.formats.torch_dequant.iqk import iqk_table

__all__ = ["iq2_ks", "iq3_ks", "iq4_ks", "iq5_ks", "iq4_kss", "iq2_kl"]

QK_K = 256
_E = np.arange(QK_K)
_IB, _H, _T = _E // 32, (_E % 32) // 16, _E % 16     # block of 32, half of it, position in the half

# IQ2_KL's 32 grid points, each a pair of IQ3 base values (kernels/iq2_kl.c)
IQ2KL_GRID = ((-63, -23), (-63, 13), (-40, -63), (-40, -10), (-40, 13), (-40, 47), (-23, -40), (-23, -23),
              (-23, 1), (-23, 13), (-23, 28), (-10, -63), (-10, 1), (-10, 13), (-10, 47), (1, -23),
              (1, -10), (1, 1), (1, 13), (1, 28), (13, -40), (13, -23), (13, -10), (13, 1),
              (13, 13), (28, -63), (28, -23), (28, 1), (28, 28), (28, 47), (47, -23), (47, 13))


def _maps(key: str, dev: torch.device, byte, shift) -> tuple[torch.Tensor, torch.Tensor]:
    return (consts(key + ":byte", dev, lambda: np.asarray(byte, dtype=np.int64)),
            consts(key + ":shift", dev, lambda: np.asarray(shift, dtype=np.int32)))


def _blk_consts(dev: torch.device, dtype=torch.int32) -> torch.Tensor:
    return consts(f"iqks:blk:{dtype}", dev, lambda: torch.arange(8, dtype=dtype))


def _per32(dl: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """dl (R, nb, 8) times values (R, nb, 256) per block of 32 → (R, n)."""
    return (dl.unsqueeze(-1) * values.reshape(*values.shape[:-1], 8, 32)).reshape(values.shape[0], n)


def _per_elem(v: torch.Tensor) -> torch.Tensor:
    """(..., 8) per block → (..., 256) per element."""
    return v.unsqueeze(-1).expand(*v.shape, 32).reshape(*v.shape[:-1], QK_K)


def iq2_ks(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ2_KS [fp16 d] {extra; scales[4]; qs[64]}: scale = nibble | extra bit 8+ib, minus 16;
    table half by extra bit ib."""
    head, b = split_rows(q, 2, 70)
    d = f16_scale(u16(head, 0)).unsqueeze(-1)                           # (R, 1, 1)
    extra, blk = u16(b, 0), _blk_consts(q.device)
    s = b[..., 2:6].to(torch.int32)
    nib = torch.stack((s & 0xF, s >> 4), dim=-1).reshape(*s.shape[:-1], 8)   # ib: byte ib/2, nibble ib%2
    dl = d * ((nib | (((extra >> (8 + blk)) & 1) << 4)) - 16).to(torch.float32)
    byte, shift = _maps("iq2_ks", q.device, 6 + 32 * (_IB // 4) + 16 * _H + _T, 2 * (_IB % 4))
    idx = gather_bits(b, byte, shift, 3) + _per_elem(((extra >> blk) & 1) * 4)
    return _per32(dl, iqk_table(2, q.device)[idx], n)


def iq3_ks(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ3_KS [fp16 d] {extra; scales[4]; qs[64]; qh[32]}: scale = nibble ib/4 of byte ib%4 |
    extra bit ib, minus 16; table half by extra bit 8+ib."""
    head, b = split_rows(q, 2, 102)
    d = f16_scale(u16(head, 0)).unsqueeze(-1)
    extra, blk = u16(b, 0), _blk_consts(q.device)
    s = b[..., 2:6].to(torch.int32)
    nib = torch.cat((s & 0xF, s >> 4), dim=-1)                           # ib < 4 low nibbles, then high
    dl = d * ((nib | (((extra >> blk) & 1) << 4)) - 16).to(torch.float32)
    byte, shift = _maps("iq3_ks:qs", q.device, 6 + 32 * (_IB // 4) + 16 * _H + _T, 2 * (_IB % 4))
    hbyte, hshift = _maps("iq3_ks:qh", q.device, 70 + 16 * _H + _T, _IB)
    idx = gather_bits(b, byte, shift, 3) | (gather_bits(b, hbyte, hshift, 1) << 2)
    idx = idx + _per_elem(((extra >> (8 + blk)) & 1) * 8)
    return _per32(dl, iqk_table(3, q.device)[idx], n)


def _odd7(b: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IQ4_KS/IQ5_KS scale bytes: dl = d * ((s & 0xFE) - 127), table half s & 1 (per block)."""
    s = b[..., 0:8].to(torch.int32)
    return d * ((s & 0xFE) - 127).to(torch.float32), s & 1


def iq4_ks(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ4_KS [float32 d] {scales[8]; qs[128]}: block ib's 16 bytes, low nibbles then high."""
    head, b = split_rows(q, 4, 136)
    dl, half = _odd7(b, f32_scale(head, 0).unsqueeze(-1))
    byte, shift = _maps("iq4_ks", q.device, 8 + 16 * _IB + _T, 4 * _H)
    idx = gather_bits(b, byte, shift, 0xF) + _per_elem(half * 16)
    return _per32(dl, iqk_table(4, q.device)[idx], n)


def iq5_ks(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ5_KS [float32 d] {scales[8]; qs[128]; qh[32]}: 5-bit index, bit 4 from qh bit ib."""
    head, b = split_rows(q, 4, 168)
    dl, half = _odd7(b, f32_scale(head, 0).unsqueeze(-1))
    byte, shift = _maps("iq5_ks:qs", q.device, 8 + 32 * (_IB // 2) + 16 * _H + _T, 4 * (_IB % 2))
    hbyte, hshift = _maps("iq5_ks:qh", q.device, 136 + 16 * _H + _T, _IB)
    idx = gather_bits(b, byte, shift, 0xF) | (gather_bits(b, hbyte, hshift, 1) << 4)
    return _per32(dl, iqk_table(5, q.device)[idx + _per_elem(half * 32)], n)


def _iq4kss_positions() -> np.ndarray:
    """Element (within its block of 32) of nibble j of word k: 2k + 16*(j & 1) + (j >> 1),
    listed in (k, j) order; its inverse permutation puts the (k, j) values in element order."""
    pos = np.array([2 * k + 16 * (j & 1) + (j >> 1) for k in range(8) for j in range(4)])
    return np.argsort(pos).astype(np.int64)


def iq4_kss(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ4_KSS [float32 d] {8 blocks of 8 u16 words}: bit 0 of word k is bit k of the block's
    scale byte; the other 15 bits J give four 4-bit indices as (J << 1) ^ J."""
    head, b = split_rows(q, 4, 128)
    d = f32_scale(head, 0).unsqueeze(-1)
    w = b.reshape(*b.shape[:-1], 8, 8, 2).to(torch.int32)
    words = w[..., 0] | (w[..., 1] << 8)                                # (R, nb, 8 blocks, 8 words)
    kbits = consts("iq4kss:k", q.device, lambda: torch.arange(8, dtype=torch.int32))
    sbyte = ((words & 1) << kbits).sum(-1, dtype=torch.int32)           # (R, nb, 8): disjoint bits
    dl = d * ((sbyte & 0xFE) - 127).to(torch.float32)
    j = words >> 1
    v = ((j << 1) ^ j) & 0xFFFF
    nib = consts("iq4kss:j", q.device, lambda: torch.arange(0, 16, 4, dtype=torch.int32))
    idx = (v.unsqueeze(-1) >> nib) & 0xF                                # (R, nb, 8, 8 words, 4)
    idx = idx.reshape(*idx.shape[:-2], 32)[..., consts("iq4kss:perm", q.device, _iq4kss_positions)]
    idx = idx + ((sbyte & 1) * 16).unsqueeze(-1)
    values = iqk_table(4, q.device)[idx]                                # (R, nb, 8, 32)
    return (dl.unsqueeze(-1) * values).reshape(q.shape[0], n)


def iq2_kl(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ2_KL [fp16 d] {scales_h; scales_l[4]; qs[64]; qh[16]}: 5-bit index k per pair of
    elements, x = dl * grid[k]; scale = nibble ib/4 of byte ib%4 | 2 bits 2ib of scales_h, minus 32."""
    head, b = split_rows(q, 2, 86)
    d = f16_scale(u16(head, 0)).unsqueeze(-1)
    sh, blk = u16(b, 0), _blk_consts(q.device)
    s = b[..., 2:6].to(torch.int32)
    nib = torch.cat((s & 0xF, s >> 4), dim=-1)
    dl = d * ((nib | (((sh >> (2 * blk)) & 3) << 4)) - 32).to(torch.float32)
    p = np.arange(128)                                                  # pair p = 16 * ib + t
    ib, t = p // 16, p % 16
    byte, shift = _maps("iq2_kl:qs", q.device, 6 + 16 * (ib // 2) + t, 4 * (ib % 2))
    hbyte, hshift = _maps("iq2_kl:qh", q.device, 70 + t, ib)
    k = gather_bits(b, byte, shift, 0xF) | (gather_bits(b, hbyte, hshift, 1) << 4)   # (R, nb, 128)
    grid = consts("iq2kl:grid", q.device, lambda: np.array(IQ2KL_GRID, dtype=np.float32))
    return _per32(dl, grid[k].reshape(*k.shape[:-1], QK_K), n)
