"""Fuzz: the (SSE2) row dequantizers of the 32-element legacy formats, IQ4_NL and IQ4_K
against independent numpy decoders, bit for bit, on random blocks.

Every byte is random except the fp16 scales, which are forced finite (zeros and
subnormals are planted on purpose: they take the scalar fp16 path). numpy float32
operations round like the kernels' single float operations (no fused multiply-add),
so e.g. Q4_1 is checked as fl(fl(q * d) + m).
"""
from __future__ import annotations

import numpy as np
import pytest

import evalkit
from evalkit.formats import get_format

IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                        dtype=np.int32)
ROWS, N = 257, 512


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    """fp16 at byte offset ``off`` of every block, as float32 (exact), shape (..., 1)."""
    return blocks[..., off:off + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 code bytes -> 32 codes: byte j's low nibble is element j, its high one j + 16."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5 4-byte mask: bit e (little-endian) is the fifth bit of element e."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits.astype(np.int32) << 4


def ref_q4_0(b):
    return (_nibbles(b[..., 2:18]) - 8).astype(np.float32) * _f16(b, 0)


def ref_q4_1(b):
    return _nibbles(b[..., 4:20]).astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def ref_q5_0(b):
    q = _nibbles(b[..., 6:22]) | _fifth_bits(b[..., 2:6])
    return (q - 16).astype(np.float32) * _f16(b, 0)


def ref_q5_1(b):
    q = _nibbles(b[..., 8:24]) | _fifth_bits(b[..., 4:8])
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def ref_q6_0(b):
    qh = b[..., 2:10].astype(np.int32)
    h = np.concatenate([qh & 0x0F, qh >> 4], axis=-1)  # h[j], j < 16: the 4 high bits of j and j + 16
    q = _nibbles(b[..., 10:26]) | np.concatenate([(h << 4) & 0x30, (h << 2) & 0x30], axis=-1)
    return (q - 32).astype(np.float32) * _f16(b, 0)


def ref_q8_0(b):
    return b[..., 2:34].view(np.int8).astype(np.float32) * _f16(b, 0)


def ref_iq4_nl(b):
    return _f16(b, 0) * IQ4NL_VALUES[_nibbles(b[..., 2:18])].astype(np.float32)


def ref_iq4_k(b):
    """144-byte super-blocks: d | extra | scales_h (2 bits each) | scales_l[8] | qs[128]."""
    d = _f16(b, 0)                                                   # (..., 1)
    extra = b[..., 2].astype(np.int32) | (b[..., 3].astype(np.int32) << 8)
    sh = b[..., 4:8].copy().view("<u4").astype(np.int64)[..., 0]
    out = np.empty(b.shape[:-1] + (256,), np.float32)
    for ib in range(16):
        g, h = divmod(ib, 2)
        code = ((b[..., 8 + g].astype(np.int32) >> (4 * h)) & 0xF) | (((sh >> (2 * ib)) & 3).astype(np.int32) << 4)
        dl = d[..., 0] * (code - 32).astype(np.float32)
        k = (b[..., 16 + 16 * g:32 + 16 * g].astype(np.int32) >> (4 * h)) & 0xF
        v = IQ4NL_VALUES[k] + 4 * ((extra >> ib) & 1)[..., None]      # V4: shifted half = base + 4
        out[..., 16 * ib:16 * ib + 16] = dl[..., None] * v.astype(np.float32)
    return out


# type -> (numpy decoder, byte offsets of the fp16 scales in a block)
REFS = {
    "Q4_0": (ref_q4_0, (0,)),
    "Q4_1": (ref_q4_1, (0, 2)),
    "Q5_0": (ref_q5_0, (0,)),
    "Q5_1": (ref_q5_1, (0, 2)),
    "Q6_0": (ref_q6_0, (0,)),
    "Q8_0": (ref_q8_0, (0,)),
    "IQ4_NL": (ref_iq4_nl, (0,)),
    "IQ4_K": (ref_iq4_k, (0,)),
}


def random_blocks(type_name: str, seed: int) -> np.ndarray:
    """(ROWS, row_bytes) random rows whose fp16 scales are finite; about 1/16 of the
    scales are forced to +-0 and 1/16 to subnormals."""
    fmt = get_format(type_name)
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, size=(ROWS, fmt.row_bytes(N)), dtype=np.uint8)
    blocks = q.reshape(ROWS, N // fmt.block_size, fmt.type_size)
    for off in REFS[type_name][1]:
        h = blocks[..., off:off + 2].copy().view("<u2")
        inf_nan = (h & 0x7C00) == 0x7C00
        h[inf_nan] &= np.uint16(~0x4000 & 0xFFFF)                     # exponent 31 -> 15: finite
        pick = rng.integers(0, 16, size=h.shape)
        h[pick == 0] &= np.uint16(0x8000)                              # +-0
        h[pick == 1] &= np.uint16(0x83FF)                              # subnormal (or +-0)
        blocks[..., off:off + 2] = h.view(np.uint8).reshape(h.shape[:-1] + (2,))
    return q


@pytest.mark.parametrize("type_name", list(REFS))
def test_fuzz_dequant_matches_numpy_bitwise(type_name):
    fmt = get_format(type_name)
    ref_fn = REFS[type_name][0]
    for seed in (1, 2):
        q = random_blocks(type_name, seed)
        want = ref_fn(q.reshape(ROWS, N // fmt.block_size, fmt.type_size)).reshape(ROWS, N)
        assert np.isfinite(want).all()
        for variant in ("to_float", "inference"):
            got = evalkit.dequantize(q, type_name, N, threads=1, variant=variant)
            same = got.view(np.uint32) == want.view(np.uint32)
            if not same.all():
                r, c = np.argwhere(~same)[0]
                raise AssertionError(f"{type_name} ({variant}, seed {seed}): {int((~same).sum())} values differ; "
                                     f"first row {r} col {c}: got {got[r, c]!r}, want {want[r, c]!r}")
