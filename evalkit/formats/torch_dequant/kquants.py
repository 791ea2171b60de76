"""k-quants (kernels/k_quants.c): Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, super-blocks of 256.

Each element's code is a few bits at a fixed byte and shift of its super-block; those
positions are index maps built once (numpy, from the C loops' arithmetic) and applied with
one gather per field. Scales follow the C expressions: ``dl * (float)q - ml`` with
``dl = d * (float)sc``, ``ml = dmin * (float)m`` (Q2_K, Q4_K, Q5_K), ``dl * (float)q``
(Q3_K) and ``(d * (float)sc) * (float)q`` (Q6_K).
"""
from __future__ import annotations

import numpy as np
import torch

from evalkit.formats.torch_dequant._common import consts, f16_scale, gather_bits, split_rows, u16

__all__ = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]

QK_K = 256
_E = np.arange(QK_K)


def _maps(key: str, dev: torch.device, byte: np.ndarray, shift: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (consts(key + ":byte", dev, lambda: byte.astype(np.int64)),
            consts(key + ":shift", dev, lambda: shift.astype(np.int32)))


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(R, nb, 256) → (R, nb, groups, 256 / groups) view, for per-group scales (R, nb, groups, 1)."""
    return x.reshape(*x.shape[:-1], groups, -1)


def _out(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.reshape(x.shape[0], n)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 6-bit scales and mins of Q4_K/Q5_K's 12 packed bytes (kq_scale_min_k4), int32 (..., 8)."""
    s = sc.to(torch.int32)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    scales = torch.cat((lo & 63, (hi & 0xF) | ((lo >> 6) << 4)), dim=-1)
    mins = torch.cat((mid & 63, (hi >> 4) | ((mid >> 6) << 4)), dim=-1)
    return scales, mins


def q2_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q2_K {scales[16]; qs[64]; d; dmin}: 16 groups of 16, x = dl * q - ml."""
    b = split_rows(q, 0, 84)[1]
    d, dmin = f16_scale(u16(b, 80)), f16_scale(u16(b, 82))                    # (R, nb, 1)
    r = _E % 128
    byte, shift = _maps("q2_k", q.device, 16 + 32 * (_E // 128) + 16 * ((r % 32) // 16) + r % 16, 2 * (r // 32))
    codes = _grouped(gather_bits(b, byte, shift, 3), 16).to(torch.float32)   # (R, nb, 16, 16)
    sc = b[..., 0:16].to(torch.int32)
    dl = (d * (sc & 0xF).to(torch.float32)).unsqueeze(-1)
    ml = (dmin * (sc >> 4).to(torch.float32)).unsqueeze(-1)
    return _out(dl * codes - ml, n)


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's 16 6-bit scales minus 32 (kq_q3_scale), int32 (..., 16)."""
    s = s.to(torch.int32)
    low = torch.cat((s[..., 0:8] & 0xF, s[..., 0:8] >> 4), dim=-1)            # j < 8, then j >= 8
    j = torch.arange(16, device=s.device)
    high = (s[..., 8 + j % 4] >> (2 * (j // 4)).to(torch.int32)) & 3
    return (low | (high << 4)) - 32


def q3_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q3_K {hmask[32]; qs[64]; scales[12]; d}: x = dl * (q - (hmask bit ? 0 : 4))."""
    b = split_rows(q, 0, 110)[1]
    d = f16_scale(u16(b, 108))
    byte, shift = _maps("q3_k:q", q.device, 32 + 32 * (_E // 128) + _E % 32, 2 * ((_E // 32) % 4))
    hbyte, hshift = _maps("q3_k:h", q.device, _E % 32, _E // 32)
    codes = gather_bits(b, byte, shift, 3) - 4 * (1 - gather_bits(b, hbyte, hshift, 1))
    dl = (d * _q3_scales(b[..., 96:108]).to(torch.float32)).unsqueeze(-1)     # (R, nb, 16, 1)
    return _out(dl * _grouped(codes, 16).to(torch.float32), n)


def _q45_k(b: torch.Tensor, codes: torch.Tensor, n: int) -> torch.Tensor:
    """x = d1 * q - m1 per 32-group, d1 = d * sc, m1 = dmin * m (Q4_K, Q5_K)."""
    d, dmin = f16_scale(u16(b, 0)), f16_scale(u16(b, 2))
    sc, m = _scale_min_k4(b[..., 4:16])
    d1 = (d * sc.to(torch.float32)).unsqueeze(-1)                             # (R, nb, 8, 1)
    m1 = (dmin * m.to(torch.float32)).unsqueeze(-1)
    return _out(d1 * _grouped(codes, 8).to(torch.float32) - m1, n)


def q4_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q4_K {d; dmin; scales[12]; qs[128]}: 64 elements per 32 bytes, low nibbles first."""
    b = split_rows(q, 0, 144)[1]
    byte, shift = _maps("q4_k", q.device, 16 + 32 * (_E // 64) + _E % 32, 4 * ((_E // 32) % 2))
    return _q45_k(b, gather_bits(b, byte, shift, 0xF), n)


def q5_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q5_K {d; dmin; scales[12]; qh[32]; qs[128]}: Q4_K's nibbles plus bit e/32 of qh[e % 32]."""
    b = split_rows(q, 0, 176)[1]
    byte, shift = _maps("q5_k:q", q.device, 48 + 32 * (_E // 64) + _E % 32, 4 * ((_E // 32) % 2))
    hbyte, hshift = _maps("q5_k:h", q.device, 16 + _E % 32, _E // 32)
    codes = gather_bits(b, byte, shift, 0xF) + (gather_bits(b, hbyte, hshift, 1) << 4)
    return _q45_k(b, codes, n)


def q6_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q6_K {ql[128]; qh[64]; scales[16] int8; d}: x = (d * sc) * (q - 32), 16 groups of 16."""
    b = split_rows(q, 0, 210)[1]
    d = f16_scale(u16(b, 208))
    h, r = _E // 128, _E % 128
    quarter, l = r // 32, r % 32
    byte, shift = _maps("q6_k:l", q.device, 64 * h + l + 32 * (quarter % 2), 4 * (quarter // 2))
    hbyte, hshift = _maps("q6_k:h", q.device, 128 + 32 * h + l, 2 * quarter)
    codes = (gather_bits(b, byte, shift, 0xF) | (gather_bits(b, hbyte, hshift, 3) << 4)) - 32
    # element e uses scale 8h + l/16 + 2*quarter; as 16 groups of 16 that is group e // 16
    sc = b[..., 192:208].to(torch.int32)
    sc = sc - ((sc & 0x80) << 1)                                              # int8
    ds = (d * sc.to(torch.float32)).unsqueeze(-1)                             # (R, nb, 16, 1)
    return _out(ds * _grouped(codes, 16).to(torch.float32), n)
