"""Where every bit of R plain blocks lands in one repacked ("_R4" / "_R8" / "_R16") block.

ik_llama.cpp's repack_* functions (ggml/src/iqk/iqk_quantize.cpp) interleave R rows' blocks
of one column into one block for its CPU kernels. Every lossless repack only moves bits:
scales, sign/shift flags and quant fields are copied to new positions, nothing is
recomputed. So each layout here is written once, as the reference's forward repack, but on
*bit labels* instead of values: the input is R plain blocks whose bits are numbered
0..R*B*8-1 (row k's block first), the output one repacked block saying which input bit each
of its bits holds. ``evalkit.formats.repack`` checks that this is a permutation (every bit
used once: lossless) and inverts it to turn repacked bytes back into plain ones.

A quant value ("L" in the reference's convert_* helpers) is a short label array, its low
bit first; bytes are 8 labels, multi-byte fields little-endian.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Labels", "LAYOUTS"]

_cat = np.concatenate


class Labels:
    """Bit labels of ``rows`` plain blocks of ``block_bytes`` (input) and of the repacked block (output)."""

    def __init__(self, rows: int, block_bytes: int):
        self.rows, self.block_bytes = rows, block_bytes
        self.x = np.arange(rows * block_bytes * 8, dtype=np.int64).reshape(rows, block_bytes * 8)
        self.out = np.full(rows * block_bytes * 8, -1, dtype=np.int64)

    def get(self, k: int, byte: int, bit: int = 0, n: int = 8) -> np.ndarray:
        """Labels of ``n`` bits of row k's plain block from bit ``bit`` of byte ``byte``."""
        start = 8 * byte + bit
        return self.x[k, start:start + n]

    def put(self, byte: int, bit: int, labels: np.ndarray) -> None:
        """Place labels at bit ``bit`` of output byte ``byte``; every output bit is written once."""
        start = 8 * byte + bit
        seg = self.out[start:start + len(labels)]
        if len(seg) != len(labels) or (seg != -1).any():
            raise AssertionError(f"repack layout writes output bits {start}..{start + len(labels) - 1} twice "
                                 "or past the block")
        seg[:] = labels


# ----------------------------------------------------------------- quant values (L)

def _nl(lab: Labels, k: int, qs: int, nsub: int) -> list[np.ndarray]:
    """4-bit values of 32-element sub-blocks stored as 16 bytes each: byte j holds element j
    (low nibble) and j + 16 (high) (IQ4_NL, IQ4_XS, IQ4_K, IQ4_KS)."""
    return [lab.get(k, qs + 16 * (e // 32) + e % 16, 4 * ((e % 32) // 16), 4) for e in range(32 * nsub)]


def _q45k(lab: Labels, k: int, qs: int, qh: int | None) -> list[np.ndarray]:
    """Q4_K / Q5_K values: 64-element chunks c of 32 bytes, low nibbles then high; the fifth
    bit of element 64c + j (+32) is bit 2c (2c + 1) of qh[j] (convert_q4_k / convert_q5_k)."""
    L = [None] * 256
    for c in range(4):
        for j in range(32):
            for half in range(2):
                v = lab.get(k, qs + 32 * c + j, 4 * half, 4)
                L[64 * c + 32 * half + j] = v if qh is None else _cat((v, lab.get(k, qh + j, 2 * c + half, 1)))
    return L


def _q6k(lab: Labels, k: int) -> list[np.ndarray]:
    """Q6_K values {ql[128]; qh[64]; ...} as convert_q6_k: 4 low bits from ql, 2 from qh."""
    L = [None] * 256
    for h in range(2):
        for l in range(32):
            for t, (ql, nib) in enumerate(((l, 0), (l + 32, 0), (l, 1), (l + 32, 1))):
                L[128 * h + 32 * t + l] = _cat((lab.get(k, 64 * h + ql, 4 * nib, 4),
                                                lab.get(k, 128 + 32 * h + l, 2 * t, 2)))
    return L


def _q5_0(lab: Labels, k: int) -> list[np.ndarray]:
    """Q5_0 {d; qh u32; qs[16]}: element j's fifth bit is bit j of qh."""
    return [_cat((lab.get(k, 6 + e % 16, 4 * (e // 16), 4), lab.get(k, 2 + e // 8, e % 8, 1))) for e in range(32)]


def _q6_0(lab: Labels, k: int) -> list[np.ndarray]:
    """Q6_0 {d; qh[8]; qs[16]}: bits 4-5 of element j (j + 16) in nibble j/8 of qh[j%8], low (high) pair."""
    return [_cat((lab.get(k, 10 + e % 16, 4 * (e // 16), 4),
                  lab.get(k, 2 + (e % 16) % 8, 4 * ((e % 16) // 8) + 2 * (e // 16), 2))) for e in range(32)]


def _iq5(lab: Labels, k: int, qs: int, qh: int) -> list[np.ndarray]:
    """IQ5_K / IQ5_KS values as convert_iq5_k: per 64 elements, 32 qs bytes (low nibbles: elements
    0..31, high: 32..63) and the fifth bit from qh[j % 32], bit 2c (+1 for the high nibbles)."""
    L = [None] * 256
    for c in range(4):
        for j in range(32):
            for half in range(2):
                L[64 * c + 32 * half + j] = _cat((lab.get(k, qs + 32 * c + j, 4 * half, 4),
                                                  lab.get(k, qh + j, 2 * c + half, 1)))
    return L


def _iq23(lab: Labels, k: int, qs: int, qh: int | None) -> list[np.ndarray]:
    """IQ2_K / IQ3_K (and Q2_K / Q3_K, same order) values as convert_iq2_k / convert_iq3_k /
    convert_q2_k / convert_q3_k: sub-block b's 2-bit fields at shift 2(b%4) of the 32 qs bytes
    of b/4; the third bit (IQ3_K's qh, Q3_K's hmask) is bit b of qh[j]."""
    L = []
    for b in range(8):
        for j in range(32):
            v = lab.get(k, qs + 32 * (b // 4) + j, 2 * (b % 4), 2)
            L.append(v if qh is None else _cat((v, lab.get(k, qh + j, b, 1))))
    return L


# ----------------------------------------------------------------- repacked fields

# (output byte offset, first element, second element) of the 4-row nibble interleave every
# 4-bit "_R4" layout shares: 4 consecutive bytes per row, rows side by side
_NIB_R4 = ((0, 0, 8), (16, 16, 24), (32, 4, 12), (48, 20, 28))
_NIB_R8 = ((0, 0, 4), (32, 8, 12), (64, 16, 20), (96, 24, 28))   # IQ4_XS_R8


def _put_nibbles(lab: Labels, L: list, k: int, base: int, pattern, stride: int, nsub: int) -> None:
    """Low 4 bits of two values per byte: sub-block ib at base + stride*ib, row k's 4 bytes at 4k."""
    for ib in range(nsub):
        for off, a, b in pattern:
            for i in range(4):
                lab.put(base + stride * ib + off + 4 * k + i, 0,
                        _cat((L[32 * ib + a + i][:4], L[32 * ib + b + i][:4])))


def _put_high(lab: Labels, L: list, k: int, base: int, stride: int, order, lo: int, width: int) -> None:
    """Bits lo..lo+width of eight (or four) values per byte: row k's 4 bytes at 4k of each sub-block."""
    for ib in range(8):
        for i in range(4):
            for t, e in enumerate(order):
                lab.put(base + stride * ib + 4 * k + i, width * t, L[32 * ib + e + i][lo:lo + width])


def _put_d(lab: Labels, k: int, src: int = 0, dst: int | None = None) -> None:
    """Row k's fp16 scale at byte ``src`` of its block → d[k] of the repacked block."""
    lab.put(2 * k if dst is None else dst, 0, lab.get(k, src, 0, 16))


def _put_extra(lab: Labels, k: int) -> None:
    """IQ*_K extra (u16 at byte 2): bit 2ib → bit ib of extra[k], bit 2ib+1 → bit ib of extra[k+4]."""
    for ib in range(8):
        for h in range(2):
            lab.put(8 + k + 4 * h, ib, lab.get(k, 2 + (2 * ib + h) // 8, (2 * ib + h) % 8, 1))


def _put_split_scales(lab: Labels, k: int, lo_nib, hi_field, hi_width: int, sl: int, sh: int, nsh: int) -> None:
    """The IQ*_K 6-bit-ish scales: the 16 half-sub-block scales of row k, i = 8ib + k (+4 for the
    second half): low nibble → nibble i/32 of scales_l[i%32], high bits → field i/nsh of scales_h[i%nsh]."""
    for ib in range(8):
        for h in range(2):
            i = 8 * ib + k + 4 * h
            lab.put(sl + i % 32, 4 * (i // 32), lo_nib(ib, h))
            if hi_field is not None:
                lab.put(sh + i % nsh, hi_width * (i // nsh), hi_field(ib, h))


# ----------------------------------------------------------------- one function per layout

def _legacy_r8(lab: Labels, qs_bytes: int) -> None:
    """Q4_0_R8 / Q8_0_R8: d[8], then 4-byte groups of each row's qs, rows side by side."""
    for k in range(8):
        _put_d(lab, k)
        for g in range(qs_bytes // 4):
            for i in range(4):
                dst = 16 + 32 * (g % 4) + 128 * (g // 4) + 4 * k + i
                lab.put(dst, 0, lab.get(k, 2 + 4 * g + i))


def _q4_0_r8(lab: Labels) -> None:
    _legacy_r8(lab, 16)


def _q8_0_r8(lab: Labels) -> None:
    _legacy_r8(lab, 32)


def _iq4_nl_r4(lab: Labels) -> None:
    """IQ4_NL_R4 {d[4]; qs[64]}."""
    for k in range(4):
        _put_d(lab, k)
        _put_nibbles(lab, _nl(lab, k, 2, 1), k, 8, _NIB_R4, 64, 1)


def _q5_0_r4(lab: Labels) -> None:
    """Q5_0_R4 {d[4]; qh[16]; qs[64]}: bit l of qh[4k+i] / l+4 the fifth bits of the nibble pattern."""
    for k in range(4):
        _put_d(lab, k)
        L = _q5_0(lab, k)
        _put_nibbles(lab, L, k, 24, _NIB_R4, 64, 1)
        for l, (_, a, b) in enumerate(_NIB_R4):
            for i in range(4):
                lab.put(8 + 4 * k + i, l, L[a + i][4:5])
                lab.put(8 + 4 * k + i, l + 4, L[b + i][4:5])


def _q6_0_r4(lab: Labels) -> None:
    """Q6_0_R4 {d[4]; qh[32]; qs[64]}: bits 4-5 of pattern l go to qh[4k+i+16(l%2)] at 2(l/2) (+4)."""
    for k in range(4):
        _put_d(lab, k)
        L = _q6_0(lab, k)
        _put_nibbles(lab, L, k, 40, _NIB_R4, 64, 1)
        for l, (_, a, b) in enumerate(_NIB_R4):
            for i in range(4):
                byte = 8 + 4 * k + i + 16 * (l % 2)
                lab.put(byte, 2 * (l // 2), L[a + i][4:6])
                lab.put(byte, 4 + 2 * (l // 2), L[b + i][4:6])


def _get_scale_min(lab: Labels, k: int, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of Q4_K/Q5_K's 6-bit scale and min of sub-block j (get_scale_min_k4 on scales at byte 4)."""
    if j < 4:
        return lab.get(k, 4 + j, 0, 6), lab.get(k, 8 + j, 0, 6)
    return (_cat((lab.get(k, 12 + j - 4, 0, 4), lab.get(k, 4 + j - 4, 6, 2))),
            _cat((lab.get(k, 12 + j - 4, 4, 4), lab.get(k, 4 + j, 6, 2))))


def _q45k_r4(lab: Labels, five: bool) -> None:
    """Q4_K_R4 / Q5_K_R4 {d[8] (d, then dmin); scales_h[16]; scales_l[32]; (qh[128];) qs[512]}."""
    qs_out = 192 if five else 64
    for k in range(4):
        _put_d(lab, k, 0, 2 * k)
        _put_d(lab, k, 2, 2 * (k + 4))
        for ib in range(8):
            ld, lm = _get_scale_min(lab, k, ib)
            lab.put(32 + 4 * ib + k, 0, _cat((ld[:4], lm[:4])))
            i = 4 * ib + k
            lab.put(16 + i % 16, 4 * (i // 16), _cat((ld[4:], lm[4:])))
        L = _q45k(lab, k, 48 if five else 16, 16 if five else None)
        _put_nibbles(lab, L, k, qs_out, _NIB_R4, 64, 8)
        if five:
            _put_high(lab, L, k, 64, 16, (0, 8, 4, 12, 16, 24, 20, 28), 4, 1)


def _q4_k_r4(lab: Labels) -> None:
    _q45k_r4(lab, False)


def _q5_k_r4(lab: Labels) -> None:
    _q45k_r4(lab, True)


def _q6_k_r4(lab: Labels) -> None:
    """Q6_K_R4 {d[4]; scales[64]; qh[256]; ql[512]}."""
    for k in range(4):
        _put_d(lab, k, 208)
        for ib in range(8):
            lab.put(8 + 8 * ib + k, 0, lab.get(k, 192 + 2 * ib))
            lab.put(8 + 8 * ib + k + 4, 0, lab.get(k, 192 + 2 * ib + 1))
        L = _q6k(lab, k)
        _put_nibbles(lab, L, k, 328, _NIB_R4, 64, 8)
        for half, order in ((0, (0, 8, 4, 12)), (16, (16, 24, 20, 28))):
            _put_high(lab, L, k, 72 + half, 32, order, 4, 2)


def _iq4_xs_r8(lab: Labels) -> None:
    """IQ4_XS_R8 {d[8]; scales_h[16]; scales_l[32]; qs[1024]}."""
    for k in range(8):
        _put_d(lab, k)
        for ib in range(8):
            i = 8 * ib + k
            lab.put(32 + i % 32, 4 * (i // 32), lab.get(k, 4 + ib // 2, 4 * (ib % 2), 4))
            lab.put(16 + i % 16, 2 * (i // 16), lab.get(k, 2 + (2 * ib) // 8, (2 * ib) % 8, 2))
        _put_nibbles(lab, _nl(lab, k, 8, 8), k, 64, _NIB_R8, 128, 8)


def _iqks_r4(lab: Labels, five: bool) -> None:
    """IQ4_KS_R4 / IQ5_KS_R4 blocks {scales[32]; qs[512]; (qh[128])} (row scales handled apart)."""
    for k in range(4):
        for ib in range(8):
            lab.put(4 * ib + k, 0, lab.get(k, ib))
        L = _iq5(lab, k, 8, 136) if five else _nl(lab, k, 8, 8)
        _put_nibbles(lab, L, k, 32, _NIB_R4, 64, 8)
        if five:
            _put_high(lab, L, k, 544, 16, (0, 8, 16, 24, 4, 12, 20, 28), 4, 1)


def _iq4_ks_r4(lab: Labels) -> None:
    _iqks_r4(lab, False)


def _iq5_ks_r4(lab: Labels) -> None:
    _iqks_r4(lab, True)


def _iq23_k_r4(lab: Labels, three: bool) -> None:
    """IQ2_K_R4 {d[4]; extra[8]; scales[32]; qs[256]} / IQ3_K_R4 {...; scales_h[8]; scales_l[32];
    qs[256]; qh[128]}: four 2-bit values per qs byte, IQ3_K's third bits eight per qh byte."""
    sl, qs_out = (24, 56) if three else (16, 48)
    for k in range(4):
        _put_d(lab, k)
        _put_extra(lab, k)
        scl = 6 if three else 4
        _put_split_scales(lab, k, lambda ib, h: lab.get(k, scl + ib, 4 * h, 4),
                          (lambda ib, h: lab.get(k, 4 + (2 * ib + h) // 8, (2 * ib + h) % 8, 1)) if three else None,
                          1, sl, 16, 8)
        L = _iq23(lab, k, 14 if three else 12, 78 if three else None)
        for half in range(2):
            _put_high(lab, L, k, qs_out + 16 * half, 32, tuple(16 * half + 4 * t for t in range(4)), 0, 2)
        if three:
            _put_high(lab, L, k, 312, 16, tuple(range(0, 32, 4)), 2, 1)


def _iq2_k_r4(lab: Labels) -> None:
    _iq23_k_r4(lab, False)


def _iq3_k_r4(lab: Labels) -> None:
    _iq23_k_r4(lab, True)


def _q2_k_r4(lab: Labels) -> None:
    """Q2_K_R4 {d[8] (d, then dmin); scales[64]; qs[256]} from Q2_K {scales[16]; qs[64]; d; dmin}:
    scale byte ib of row k → scales[4ib + k]; four 2-bit values per qs byte as IQ2_K_R4."""
    for k in range(4):
        _put_d(lab, k, 80, 2 * k)
        _put_d(lab, k, 82, 2 * (k + 4))
        for ib in range(16):
            lab.put(16 + 4 * ib + k, 0, lab.get(k, ib))
        L = _iq23(lab, k, 16, None)
        for half in range(2):
            _put_high(lab, L, k, 80 + 16 * half, 32, tuple(16 * half + 4 * t for t in range(4)), 0, 2)


def _q3k_scale(lab: Labels, k: int, s: int) -> np.ndarray:
    """Labels of Q3_K's 6-bit scale s (as convert_q3_k unpacks the 12 bytes at 96): low nibble
    s/8 of byte s%8, high 2 bits at 2(s/4) of byte 8 + s%4."""
    return _cat((lab.get(k, 96 + s % 8, 4 * (s // 8), 4), lab.get(k, 104 + s % 4, 2 * (s // 4), 2)))


def _q3_k_r4(lab: Labels) -> None:
    """Q3_K_R4 {d[4]; scales_h[16]; scales_l[32]; qh[128]; qs[256]} from Q3_K {hmask[32]; qs[64];
    scales[12]; d}: the 6-bit scales split as IQ3_K_R4's low nibbles and IQ4_K_R4's 2-bit highs."""
    for k in range(4):
        _put_d(lab, k, 108)
        _put_split_scales(lab, k, lambda ib, h: _q3k_scale(lab, k, 2 * ib + h)[:4],
                          lambda ib, h: _q3k_scale(lab, k, 2 * ib + h)[4:], 2, 24, 8, 16)
        L = _iq23(lab, k, 32, 0)
        for half in range(2):
            _put_high(lab, L, k, 184 + 16 * half, 32, tuple(16 * half + 4 * t for t in range(4)), 0, 2)
        _put_high(lab, L, k, 56, 16, tuple(range(0, 32, 4)), 2, 1)


def _iq45_k_r4(lab: Labels, five: bool) -> None:
    """IQ4_K_R4 / IQ5_K_R4 {d[4]; extra[8]; scales_h[16]; scales_l[32]; qs[512]; (qh[128])}."""
    for k in range(4):
        _put_d(lab, k)
        _put_extra(lab, k)
        _put_split_scales(lab, k, lambda ib, h: lab.get(k, 8 + ib, 4 * h, 4),
                          lambda ib, h: lab.get(k, 4 + ib // 2, 4 * (ib % 2) + 2 * h, 2), 2, 32, 16, 16)
        L = _iq5(lab, k, 16, 144) if five else _nl(lab, k, 16, 8)
        _put_nibbles(lab, L, k, 64, _NIB_R4, 64, 8)
        if five:
            _put_high(lab, L, k, 576, 16, (0, 8, 16, 24, 4, 12, 20, 28), 4, 1)


def _iq4_k_r4(lab: Labels) -> None:
    _iq45_k_r4(lab, False)


def _iq5_k_r4(lab: Labels) -> None:
    _iq45_k_r4(lab, True)


def _q8_kv_r8(lab: Labels) -> None:
    """Q8_KV_R8 quants, 16 per row and chunk: byte 32l + 4k + i holds row k's byte 4l + i."""
    for k in range(8):
        for l in range(4):
            for i in range(4):
                lab.put(32 * l + 4 * k + i, 0, lab.get(k, 4 * l + i))


def _bf16_r16(lab: Labels) -> None:
    """BF16_R16: two bf16 of each of 16 rows per 64-byte block, row k's 4 bytes at 4k (repack_bf16)."""
    for k in range(16):
        lab.put(4 * k, 0, lab.get(k, 0, 0, 32))


# repacked type name -> its layout function (the block geometry lives in repack.py's table)
LAYOUTS = {
    "Q4_0_R8": _q4_0_r8, "Q8_0_R8": _q8_0_r8, "Q5_0_R4": _q5_0_r4, "Q6_0_R4": _q6_0_r4,
    "IQ4_NL_R4": _iq4_nl_r4, "Q4_K_R4": _q4_k_r4, "Q5_K_R4": _q5_k_r4, "Q6_K_R4": _q6_k_r4,
    "IQ4_XS_R8": _iq4_xs_r8, "IQ2_K_R4": _iq2_k_r4, "IQ3_K_R4": _iq3_k_r4, "IQ4_K_R4": _iq4_k_r4,
    "IQ5_K_R4": _iq5_k_r4, "IQ4_KS_R4": _iq4_ks_r4, "IQ5_KS_R4": _iq5_ks_r4, "Q8_KV_R8": _q8_kv_r8,
    "Q2_K_R4": _q2_k_r4, "Q3_K_R4": _q3_k_r4, "BF16_R16": _bf16_r16,
}
