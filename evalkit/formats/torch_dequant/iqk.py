"""IQ2_K … IQ6_K (kernels/iq2_k.c … iq6_k.c): super-blocks of 256 in 16 sub-blocks of 16.

Each sub-block ib has a signed scale (``dl = d * (float)scale``) and picks the base or the
shifted half of its value table by bit ib of ``extra``; an element is ``dl * V[idx]``
(ek_iqk_scale16). Index fields are gathered through per-format index maps; the tables
are the reference's iq*nl_values (base half, then shifted half). IQ6_K's ``to_float``
evaluates a cubic instead of the table; its values are tabulated here from the same
float32 operations (checked against the C table by the bit-identity tests).
"""
from __future__ import annotations

import numpy as np
import torch

from evalkit.formats.torch_dequant._common import consts, f16_scale, gather_bits, split_rows, u16, u32

__all__ = ["iq2_k", "iq3_k", "iq4_k", "iq5_k", "iq6_k", "IQK_VALUES", "iqk_table"]

QK_K = 256

# iq2nl_values ... iq6nl_values: base half, then shifted half (kernels/iqk_common.c)
IQK_VALUES = {
    2: (-31, -13, 1, 17, -26, -8, 6, 22),
    3: (-63, -40, -23, -10, 1, 13, 28, 47, -59, -36, -19, -6, 5, 17, 32, 51),
    4: (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
        -123, -100, -79, -61, -45, -31, -18, -6, 5, 17, 29, 42, 57, 73, 93, 117),
    5: (-126, -114, -103, -92, -83, -74, -65, -57, -50, -43, -36, -30, -24, -18, -12, -6,
        -1, 5, 11, 17, 23, 29, 36, 43, 51, 59, 68, 77, 87, 97, 109, 121,
        -124, -112, -101, -90, -81, -72, -63, -55, -48, -41, -34, -28, -22, -16, -10, -4,
        1, 7, 13, 19, 25, 31, 38, 45, 53, 61, 70, 79, 89, 99, 111, 123),
    6: (-127, -121, -115, -109, -104, -98, -93, -88, -84, -79, -74, -70, -66, -62, -58, -54,
        -51, -47, -44, -40, -37, -34, -31, -28, -25, -22, -19, -16, -13, -11, -8, -5,
        -2, 0, 3, 6, 9, 12, 14, 17, 20, 23, 27, 30, 33, 36, 40, 44,
        47, 51, 55, 59, 63, 68, 72, 77, 82, 87, 92, 98, 103, 109, 115, 121,
        -126, -120, -114, -108, -103, -97, -92, -87, -83, -78, -73, -69, -65, -61, -57, -53,
        -50, -46, -43, -39, -36, -33, -30, -27, -24, -21, -18, -15, -12, -10, -7, -4,
        -1, 1, 4, 7, 10, 13, 15, 18, 21, 24, 28, 31, 34, 37, 41, 45,
        48, 52, 56, 60, 64, 69, 73, 78, 83, 88, 93, 99, 104, 110, 116, 122),
}


def _iq6k_cubic() -> np.ndarray:
    """IQ6_K's to_float values: P(q) = -127 + q*(6.2568 + q*(-0.11218 + q*0.0011972)), Horner
    from the innermost bracket, each float32 operation rounded (no FMA), then + 1 for the
    shifted half (dequantize_row_iq6_k; docs/iqk-formats.md §7.2)."""
    f = np.float32
    q = np.arange(64, dtype=np.float32)
    p = f(-127) + q * (f(6.2568) + q * (f(-0.11218) + q * f(0.0011972)))
    return np.concatenate([p, p + f(1)]).astype(np.float32)


def iqk_table(bits: int, device: torch.device) -> torch.Tensor:
    """The ``bits``-bit IQK value table (both halves) as float32 on ``device``."""
    return consts(f"iqk:v{bits}", device, lambda: np.array(IQK_VALUES[bits], dtype=np.float32))


def _sub16(dl: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """dl (R, nb, 16) times values (R, nb, 256) per sub-block of 16 → (R, n)."""
    return (dl.unsqueeze(-1) * values.reshape(*values.shape[:-1], 16, 16)).reshape(values.shape[0], n)


def _maps(key: str, dev: torch.device, byte, shift) -> tuple[torch.Tensor, torch.Tensor]:
    return (consts(key + ":byte", dev, lambda: np.asarray(byte, dtype=np.int64)),
            consts(key + ":shift", dev, lambda: np.asarray(shift, dtype=np.int32)))


_E = np.arange(QK_K)
_IB, _T = _E // 16, _E % 16          # sub-block of 16 and position in it, per element
_SUB = np.arange(16)


def _half_offset(b: torch.Tensor, half_size: int) -> torch.Tensor:
    """Per element: ``half_size`` where bit ib of the super-block's ``extra`` (bytes 2-3) is set."""
    extra = u16(b, 2)                                                   # (R, nb, 1)
    ib = consts("iqk:ib", b.device, lambda: _IB.astype(np.int32))
    return ((extra >> ib) & 1) * half_size                              # (R, nb, 256)


def _nibble_scales(b: torch.Tensor, off: int) -> torch.Tensor:
    """Sub-block ib's 4-bit scale: nibble ib % 2 of byte off + ib / 2, int32 (..., 16)."""
    s = b[..., off:off + 8].to(torch.int32)
    return torch.stack((s & 0xF, s >> 4), dim=-1).reshape(*s.shape[:-1], 16)


def iq2_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ2_K {d; extra; scales[8]; qs[64]}: dl = d * (scale - 8), 2-bit index."""
    b = split_rows(q, 0, 76)[1]
    d = f16_scale(u16(b, 0))
    dl = d * (_nibble_scales(b, 4) - 8).to(torch.float32)
    byte, shift = _maps("iq2_k", q.device, 12 + 32 * (_IB // 8) + 16 * (_IB % 2) + _T, 2 * ((_IB // 2) % 4))
    idx = gather_bits(b, byte, shift, 3) + _half_offset(b, 4)
    return _sub16(dl, iqk_table(2, q.device)[idx], n)


def iq3_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ3_K {d; extra; scales_h; scales_l[8]; qs[64]; qh[32]}: dl = d * ±(2 * scale + 1)."""
    b = split_rows(q, 0, 110)[1]
    d = f16_scale(u16(b, 0))
    sub = consts("iqk:sub", q.device, lambda: _SUB.astype(np.int32))
    sign = 1 - 2 * ((u16(b, 4) >> sub) & 1)                             # bit ib of scales_h: negative
    dl = d * ((2 * _nibble_scales(b, 6) + 1) * sign).to(torch.float32)
    ib32, off = _IB // 2, 16 * (_IB % 2) + _T
    byte, shift = _maps("iq3_k:qs", q.device, 14 + 32 * (ib32 // 4) + off, 2 * (ib32 % 4))
    hbyte, hshift = _maps("iq3_k:qh", q.device, 78 + off, ib32)
    idx = gather_bits(b, byte, shift, 3) | (gather_bits(b, hbyte, hshift, 1) << 2)
    return _sub16(dl, iqk_table(3, q.device)[idx + _half_offset(b, 8)], n)


def _six_bit_scales(b: torch.Tensor, lo_off: int, hi_off: int) -> torch.Tensor:
    """IQ4_K/IQ5_K's 6-bit scales: nibble of scales_l | 2 bits (2*ib) of scales_h, minus 32."""
    sub = consts("iqk:sub64", b.device, lambda: _SUB.astype(np.int64))
    high = (u32(b, hi_off) >> (2 * sub)) & 3                            # (R, nb, 16)
    return (_nibble_scales(b, lo_off) | (high.to(torch.int32) << 4)) - 32


def iq4_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ4_K {d; extra; scales_h[4]; scales_l[8]; qs[128]}: dl = d * (scale - 32), 4-bit index."""
    b = split_rows(q, 0, 144)[1]
    d = f16_scale(u16(b, 0))
    dl = d * _six_bit_scales(b, 8, 4).to(torch.float32)
    byte, shift = _maps("iq4_k", q.device, 16 + 16 * (_IB // 2) + _T, 4 * (_IB % 2))
    idx = gather_bits(b, byte, shift, 0xF) + _half_offset(b, 16)
    return _sub16(dl, iqk_table(4, q.device)[idx], n)


def iq5_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ5_K {d; extra; scales_h[4]; scales_l[8]; qs[128]; qh[32]}: 5-bit index."""
    b = split_rows(q, 0, 176)[1]
    d = f16_scale(u16(b, 0))
    dl = d * _six_bit_scales(b, 8, 4).to(torch.float32)
    c, off = _IB // 2, 16 * (_IB % 2) + _T
    byte, shift = _maps("iq5_k:qs", q.device, 16 + 32 * (c // 2) + off, 4 * (c % 2))
    hbyte, hshift = _maps("iq5_k:qh", q.device, 144 + off, c)
    idx = gather_bits(b, byte, shift, 0xF) | (gather_bits(b, hbyte, hshift, 1) << 4)
    return _sub16(dl, iqk_table(5, q.device)[idx + _half_offset(b, 32)], n)


def iq6_k(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ6_K {d; extra; scales[16] int8; qs[128]; qh[64]}: 6-bit index; to_float (variant 0) uses
    the cubic values, inference (1) the integer table."""
    b = split_rows(q, 0, 212)[1]
    d = f16_scale(u16(b, 0))
    sc = b[..., 4:20].to(torch.int32)
    dl = d * (sc - ((sc & 0x80) << 1)).to(torch.float32)                 # int8 scales
    c, off = _IB // 2, 16 * (_IB % 2) + _T
    byte, shift = _maps("iq6_k:qs", q.device, 20 + 32 * (c // 2) + off, 4 * (c % 2))
    hbyte, hshift = _maps("iq6_k:qh", q.device, 148 + 32 * (c // 4) + off, 2 * (c % 4))
    idx = gather_bits(b, byte, shift, 0xF) | (gather_bits(b, hbyte, hshift, 3) << 4)
    table = consts("iqk:iq6k_cubic", q.device, _iq6k_cubic) if variant == 0 else iqk_table(6, q.device)
    return _sub16(dl, table[idx + _half_offset(b, 64)], n)
