"""IQ6_K has two dequantizers (spec iqk-formats.md 7.2): the CPU to_float evaluates a
cubic in the 6-bit code, the matrix-multiplication kernels use the integer table the
quantizer optimised for. Both are checked here against independent numpy decodings
of the golden IQ6_K bytes."""
from __future__ import annotations

import numpy as np
import pytest

import evalkit
from golden_quant import golden, manifest

CASES = manifest()["cases"]

# V6 base half (spec 2.4); the shifted half is each entry + 1.
V6 = np.array([
    -127, -121, -115, -109, -104, -98, -93, -88, -84, -79, -74, -70, -66, -62, -58, -54,
    -51, -47, -44, -40, -37, -34, -31, -28, -25, -22, -19, -16, -13, -11, -8, -5,
    -2, 0, 3, 6, 9, 12, 14, 17, 20, 23, 27, 30, 33, 36, 40, 44,
    47, 51, 55, 59, 63, 68, 72, 77, 82, 87, 92, 98, 103, 109, 115, 121], dtype=np.int32)

BLOCK_BYTES = 212


def _fields(q: np.ndarray):
    """Split (rows, nblk*212) bytes into per-element code, shift bit and block scale."""
    rows = q.shape[0]
    blk = q.reshape(rows, -1, BLOCK_BYTES)
    d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)        # (rows, nblk)
    extra = blk[..., 2:4].copy().view("<u2")[..., 0].astype(np.int32)           # (rows, nblk)
    scales = blk[..., 4:20].view(np.int8).astype(np.int32)                      # (rows, nblk, 16)
    qs = blk[..., 20:148].astype(np.int32)
    qh = blk[..., 148:212].astype(np.int32)
    e = np.arange(256)
    lo = (qs[..., 32 * (e // 64) + e % 32] >> (4 * ((e // 32) % 2))) & 0xF
    hi = (qh[..., 32 * (e // 128) + e % 32] >> (2 * ((e // 32) % 4))) & 0x3
    code = lo | (hi << 4)                                                       # (rows, nblk, 256)
    b = e // 16
    shift = (extra[..., None] >> b) & 1                                         # (rows, nblk, 256)
    scale = scales[..., b]                                                      # (rows, nblk, 256)
    return d, code, shift, scale


def _dl(d, scale):
    # fl(d * scale): the block scale is applied first, then the value (spec checklist 9)
    return (d[..., None] * scale.astype(np.float32)).astype(np.float32)


def decode_table(q: np.ndarray) -> np.ndarray:
    d, code, shift, scale = _fields(q)
    v = (V6[code] + shift).astype(np.float32)
    return (_dl(d, scale) * v).astype(np.float32).reshape(q.shape[0], -1)


def decode_cubic(q: np.ndarray) -> np.ndarray:
    """Horner evaluation with every step rounded to float32 (the canonical, unfused build)."""
    d, code, shift, scale = _fields(q)
    f = np.float32
    c = code.astype(np.float32)
    p = (c * f(0.0011972)).astype(np.float32)
    p = (f(-0.11218) + p).astype(np.float32)
    p = (c * p).astype(np.float32)
    p = (f(6.2568) + p).astype(np.float32)
    p = (c * p).astype(np.float32)
    p = (f(-127.0) + p).astype(np.float32)
    v = (p + shift.astype(np.float32)).astype(np.float32)
    return (_dl(d, scale) * v).astype(np.float32).reshape(q.shape[0], -1)


def _same_bits(got, want):
    return np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("case", CASES)
def test_iq6k_inference_variant_is_integer_table(case):
    g = golden("IQ6_K")
    q, deq = g[f"{case}.q"], g[f"{case}.deq"]
    got = evalkit.dequantize(q, "IQ6_K", deq.shape[1], threads=1, variant="inference")
    assert _same_bits(got, decode_table(q))


@pytest.mark.parametrize("case", CASES)
def test_iq6k_to_float_variant_is_golden_cubic(case):
    g = golden("IQ6_K")
    q, deq = g[f"{case}.q"], g[f"{case}.deq"]
    got = evalkit.dequantize(q, "IQ6_K", deq.shape[1], threads=1, variant="to_float")
    assert _same_bits(got, deq)
    # the golden values are the unfused cubic, and the default variant is to_float
    assert _same_bits(decode_cubic(q), deq)
    assert _same_bits(evalkit.dequantize(q, "IQ6_K", deq.shape[1], threads=1), deq)


def test_iq6k_variants_differ():
    # q = 33 decodes to 0 in the table but 0.334 * d * scale in the cubic (spec 7.2)
    g = golden("IQ6_K")
    q = g["gauss_256.q"]
    a = evalkit.dequantize(q, "IQ6_K", 256, variant="to_float")
    b = evalkit.dequantize(q, "IQ6_K", 256, variant="inference")
    assert not np.array_equal(a, b)
    d, _, _, scale = _fields(q)
    dl = np.abs(_dl(d, scale)).reshape(q.shape[0], -1)
    assert np.all(np.abs(a - b) <= 0.5 * dl)  # |P(q) - V6[q]| < 0.49 for every code
