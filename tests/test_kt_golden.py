"""Trellis types IQ1_KT, IQ2_KT, IQ3_KT, IQ4_KT (spec iqk-formats.md section 14)
against the golden vectors of the reference (ik_llama.cpp 8337e4cd3, -ffp-contract=off):

* ``.deq`` bit for bit from ``.q`` (CPU to_float) and ``.q`` byte for byte from the inputs
  are checked with every other type in test_golden_quant.py (the KT quantizer's reference
  search is AVX2-only; the kernels reproduce its lane order and FMAs in portable C);
* the "inference" variant (row scale x 1.05 for IQ2_KT, x 1.01 for IQ3_KT, x 1 otherwise)
  against an independent numpy decoding of the golden bytes from the spec layout;
* robustness: random bytes decode without crashing, edge inputs quantize (thread
  independence for every type is in test_codec_api.py).
"""
from __future__ import annotations

import numpy as np
import pytest

import evalkit
from evalkit.formats import FORMATS, get_format
from golden_quant import golden, manifest

KT_TYPES = [f.name for f in FORMATS.values() if f.family == "kt"]
CASES = manifest()["cases"]
BLOCK_BYTES = {"IQ1_KT": 56, "IQ2_KT": 68, "IQ3_KT": 100, "IQ4_KT": 128}
# factor the reference's matrix-multiplication kernels apply to the float row scale
INFERENCE_FACTOR = {"IQ1_KT": 1.0, "IQ2_KT": 1.05, "IQ3_KT": 1.01, "IQ4_KT": 1.0}

# IQ4_K / IQ4_NL base values (spec 2.4), the IQ1_KT / IQ2_KT block-scale table
V4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int64)


# --------------------------------------------------------------------------- numpy decoder

def _trellis(idx: np.ndarray, g: int, offset) -> np.ndarray:
    """Spec 14.1 generator: index (+offset) -> g integers in -126..126 (last axis)."""
    x = (idx.astype(np.uint64) + np.asarray(offset, dtype=np.uint64)) & 0xFFFFFFFF
    out = []
    for _ in range(g):
        x = (x * 0xCBAC1FED) & 0xFFFFFFFF
        s = x & 0x3F3F3F3F
        v = (s & 0xFF) + ((s >> 8) & 0xFF) + ((s >> 16) & 0xFF) + (s >> 24)
        out.append(v.astype(np.int64) - 126)
    return np.stack(out, axis=-1)


def decode_numpy(q: np.ndarray, type_name: str, factor: float = 1.0) -> np.ndarray:
    """Independent decoding of KT rows per spec 14.2: y = fl(fl(D' * ls) * v), with
    D' = fl(D * factor) (factor 1: the stored row scale, as the CPU to_float)."""
    rows = q.shape[0]
    D = q[:, :4].copy().view("<f4")[:, 0].astype(np.float32)
    D = (D * np.float32(factor)).astype(np.float32)
    blk = q[:, 4:].reshape(rows, -1, BLOCK_BYTES[type_name]).astype(np.int64)
    nb = blk.shape[1]
    b = np.arange(8)
    if type_name == "IQ1_KT":
        sh, ql, qh = blk[..., 0:8], blk[..., 8:40], blk[..., 40:56]
        c = np.arange(4)
        G = 4 * b[:, None] + c[None, :]                                    # (8, 4)
        nib = (qh[..., 4 * (b[:, None] % 4) + c[None, :]] >> (4 * (b[:, None] // 4))) & 0xF
        idx = ql[..., G] | (nib << 8) | (((sh[..., :, None] >> (4 + c[None, :])) & 1) << 12)
        v = _trellis(idx, 8, 4096)                                          # (rows, nb, 8, 4, 8)
        ls = V4[sh & 0xF]                                                   # (rows, nb, 8)
    elif type_name in ("IQ2_KT", "IQ3_KT"):
        sc, words = blk[..., 0:4], blk[..., 4:68]
        idx = (words[..., 0::2] | (words[..., 1::2] << 8)).reshape(rows, nb, 8, 4)
        code = (sc[..., b % 4] >> (4 * (b // 4))) & 0xF                     # (rows, nb, 8)
        v = _trellis(idx, 8, 4096)
        if type_name == "IQ2_KT":
            ls = V4[code]
        else:
            ls = code
            v = np.abs(v)
    else:  # IQ4_KT
        W = blk[..., 0:32].reshape(rows, nb, 8, 4)
        W = W[..., 0] | (W[..., 1] << 8) | (W[..., 2] << 16) | (W[..., 3] << 24)   # (rows, nb, 8)
        ql, qh = blk[..., 32:96], blk[..., 96:128]
        c = np.arange(8)
        G = 8 * b[:, None] + c[None, :]                                    # (8, 8)
        idx = ql[..., G] | (((qh[..., G % 32] >> (4 * (G // 32))) & 0xF) << 8) \
            | (((W[..., :, None] >> (8 + 3 * c[None, :])) & 7) << 12)
        offset = np.where((W & 1) == 1, 4096 + 32768, 4096)[..., None]    # (rows, nb, 8, 1)
        v = _trellis(idx, 4, offset)
        ls = ((W & 0xFF) >> 1) - 64
    sl = (D[:, None, None] * ls.astype(np.float32)).astype(np.float32)     # (rows, nb, 8)
    y = (sl[..., None, None] * v.astype(np.float32)).astype(np.float32).reshape(rows, nb, 8, 32)
    if type_name == "IQ3_KT":
        qh = blk[..., 68:100]                                               # bit b of qh[j]: element 32b + j
        neg = ((qh[..., None, :] >> b[None, :, None]) & 1) == 1             # (rows, nb, 8, 32)
        y = np.where(neg, -y, y)
    return y.reshape(rows, -1)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((a.view(np.uint32) == b.view(np.uint32)).all())


# --------------------------------------------------------------------------- golden tests

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", KT_TYPES)
def test_kt_numpy_decoder_matches_golden(type_name, case):
    """The independent numpy decoder used below agrees with the reference's to_float."""
    g = golden(type_name)
    assert _bits_equal(decode_numpy(g[f"{case}.q"], type_name), g[f"{case}.deq"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", KT_TYPES)
def test_kt_inference_variant(type_name, case):
    g = golden(type_name)
    q, deq = g[f"{case}.q"], g[f"{case}.deq"]
    got = evalkit.dequantize(q, type_name, deq.shape[1], threads=1, variant="inference")
    want = decode_numpy(q, type_name, INFERENCE_FACTOR[type_name])
    assert _bits_equal(got, want)
    if INFERENCE_FACTOR[type_name] == 1.0:
        assert _bits_equal(got, deq)
    elif np.any(deq != 0):
        # the factor really is applied (a scaled copy of to_float, up to rounding)
        nz = deq != 0
        ratio = (got[nz].astype(np.float64) / deq[nz].astype(np.float64))
        assert np.allclose(ratio, INFERENCE_FACTOR[type_name], rtol=1e-6)


# --------------------------------------------------------------------------- robustness

@pytest.mark.parametrize("type_name", KT_TYPES)
def test_kt_random_bytes_decode(type_name):
    """Arbitrary bytes (NaN/inf/denormal row scales, any index) decode without crashing
    and agree with the numpy decoder (NaN payloads aside)."""
    rng = np.random.default_rng(1234)
    n = 512
    rb = get_format(type_name).row_bytes(n)
    q = rng.integers(0, 256, size=(64, rb), dtype=np.uint8)
    heads = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3e38, -1.5], dtype=np.float32)
    q[:len(heads), :4] = heads.view(np.uint8).reshape(-1, 4)
    for variant, factor in (("to_float", 1.0), ("inference", INFERENCE_FACTOR[type_name])):
        got = evalkit.dequantize(q, type_name, n, threads=2, variant=variant)
        with np.errstate(invalid="ignore", over="ignore"):
            want = decode_numpy(q, type_name, factor)
        both_nan = np.isnan(got) & np.isnan(want)
        assert ((got.view(np.uint32) == want.view(np.uint32)) | both_nan).all()


@pytest.mark.parametrize("type_name", KT_TYPES)
def test_kt_edge_inputs_quantize(type_name):
    """Degenerate rows quantize without crashing, decode to finite values, and an
    all-zero row is stored as zero."""
    n = 512
    rows = [np.zeros(n), np.full(n, 1e-20), np.full(n, 1e-38), np.full(n, 1e30),
            np.r_[np.zeros(n - 1), 5.0], np.tile([1e30, -1e-30], n // 2), -np.ones(n),
            np.linspace(-1, 1, n)]
    x = np.array(rows, dtype=np.float32)
    for im in (None, np.zeros(n, np.float32), np.abs(np.random.default_rng(0).standard_normal(n)).astype(np.float32)):
        q = evalkit.quantize(x, type_name, imatrix=im, threads=1)
        assert q.shape == (len(rows), get_format(type_name).row_bytes(n))
        y = evalkit.dequantize(q, type_name, n, threads=1)
        assert not np.any(q[0]) and not np.any(y[0])
        assert np.isfinite(y[[0, 1, 4, 6, 7]]).all()
