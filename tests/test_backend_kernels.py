"""The emulated backend's kernels against an independent numpy reading of docs/backend-ik-cpu.md.

Activation rounding (§3: Q8_2_X4, Q8_K, BF16) and every weight conversion (§4: Q8_K_R16 with
each type's d0, Q8_1_R8, Q6_K -> Q8_0_R8, KT -> Q8_0_R8) are recomputed here from the spec's
formulas in numpy float32 arithmetic, with the integers taken from the blocks independently of
the C code (by dividing the library's dequantized values by the stored scale, or by reading
the bit fields), and compared bit for bit. Packed rows are random bytes (every bit pattern is
a valid block) with sane scale fields, so every sub-block scale and code value occurs.
"""
from __future__ import annotations

import numpy as np
import pytest

import evalkit
from evalkit.backend.kernels import convert_weights, has_convert, quantize_activations
from evalkit.formats import get_format

F32 = np.float32
IQ4K_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


# --------------------------------------------------------------------------- numpy references

def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and back."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def fp16_round(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def ref_q8_2(x: np.ndarray):
    """§3.1: per 32, d = bf16(amax/127), q = RNE(x * (1/d))."""
    xb = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    d = bf16_round(amax / F32(127))
    with np.errstate(divide="ignore"):
        idd = np.where(d > 0, F32(1) / d, F32(0)).astype(F32)
    q = np.clip(np.rint(xb * idd), -128, 127).astype(F32)
    return (q * d).reshape(x.shape), q.reshape(x.shape).astype(np.int8), d[..., 0]


def ref_q8_k(x: np.ndarray):
    """§3.2: per 256, d = amax/127, q = RNE(x * (127/amax))."""
    xb = x.reshape(x.shape[0], -1, 256)
    amax = np.abs(xb).max(-1, keepdims=True)
    d = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        idd = np.where(amax != 0, F32(127) / amax, F32(0)).astype(F32)
    q = np.clip(np.rint(xb * idd), -128, 127).astype(F32)
    return (q * d).reshape(x.shape), q.reshape(x.shape).astype(np.int8), d[..., 0]


def q8k_from_q16(q16: np.ndarray, dsup: np.ndarray, d0: float, divide: bool = False) -> np.ndarray:
    """§4.5 on (rows, nb, 256) integers and (rows, nb) super-block scales."""
    m = np.abs(q16).max(-1, keepdims=True).astype(F32)
    dnew = ((m / F32(127)) if divide else (m * F32(d0))).astype(F32)
    scaled = ~(dnew < 1)
    dnew = np.where(scaled, dnew, F32(1)).astype(F32)
    inv = (F32(1) / dnew).astype(F32)
    q8 = np.where(scaled, np.clip(np.rint(q16 * inv), -128, 127), q16).astype(F32)
    D = fp16_round(dsup[..., None].astype(F32) * dnew)
    return (D * q8).reshape(q16.shape[0], -1)


def blocks(q: np.ndarray, fmt, header: int = 0) -> np.ndarray:
    return q[:, header:].reshape(q.shape[0], -1, fmt.type_size)


def f16_field(b: np.ndarray, off: int) -> np.ndarray:
    return b[..., off:off + 2].copy().view(np.float16)[..., 0].astype(F32)


def q16_by_division(q: np.ndarray, type_name: str, n: int, dsup: np.ndarray) -> np.ndarray:
    """The integers scale x value: the library's dequantization divided by the stored scale."""
    w = evalkit.dequantize(q, type_name, n, variant="inference").reshape(q.shape[0], -1, 256)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(dsup[..., None] != 0, np.rint(w / dsup[..., None]), 0)
    return r.astype(F32)


D0 = {"IQ2_K": 1 / 120, "IQ2_KS": 1 / 125, "IQ2_KL": 1 / 125}


def ref_iqk(q: np.ndarray, type_name: str, n: int) -> np.ndarray:
    fmt = get_format(type_name)
    if fmt.header_bytes == 2:
        dsup = np.repeat(q[:, :2].copy().view(np.float16).astype(F32), n // 256, axis=1)
    elif fmt.header_bytes == 4:
        dsup = np.repeat(q[:, :4].copy().view(np.float32), n // 256, axis=1)
    else:
        dsup = f16_field(blocks(q, fmt), 0)
    q16 = q16_by_division(q, type_name, n, dsup)
    return q8k_from_q16(q16, dsup, F32(1) / F32(round(1 / D0.get(type_name, 1 / 127))))


def ref_q3k(q: np.ndarray, n: int) -> np.ndarray:
    dsup = f16_field(blocks(q, get_format("Q3_K")), 108)
    return q8k_from_q16(q16_by_division(q, "Q3_K", n, dsup), dsup, 0, divide=True)


def ref_q2k(q: np.ndarray, n: int) -> np.ndarray:
    """iqk_convert_q2_k_q8_k_r8: v = fma(q*sc, d, -dmin*m) from the bit fields, re-quantized per 256."""
    b = blocks(q, get_format("Q2_K"))
    sc, qs = b[..., :16], b[..., 16:80]
    d, dmin = f16_field(b, 80), f16_field(b, 82)
    e = np.arange(256)
    byte = qs[..., 32 * (e // 128) + e % 32]
    code = (byte >> (2 * ((e // 32) % 4))) & 3
    s = sc[..., e // 16]
    q16 = (code * (s & 15)).astype(np.float64)
    m1 = (-dmin[..., None] * (s >> 4).astype(F32)).astype(F32)
    v = (q16 * d[..., None].astype(np.float64) + m1).astype(F32)        # one rounding: fma
    amax = np.abs(v).max(-1, keepdims=True)
    dd = (amax / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        idd = np.where(dd != 0, F32(1) / dd, F32(0)).astype(F32)
    return (fp16_round(dd) * np.clip(np.rint(v * idd), -128, 127)).reshape(q.shape[0], -1)


def scale_min_k4(s: np.ndarray, j: int):
    if j < 4:
        return s[..., j] & 63, s[..., j + 4] & 63
    return (s[..., j + 4] & 15) | ((s[..., j - 4] >> 6) << 4), (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)


def ref_q45k(q: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """§4.3: w = fp16(d*sc)*q + fp16(-dmin*m) per 32, codes read from the nibbles (and qh)."""
    b = blocks(q, get_format(type_name))
    d, dmin = f16_field(b, 0), f16_field(b, 2)
    qs = b[..., 48:] if type_name == "Q5_K" else b[..., 16:]
    out = np.empty(b.shape[:2] + (256,), F32)
    for j in range(8):
        sc, m = scale_min_k4(b[..., 4:16].astype(np.int64), j)
        byte = qs[..., 32 * (j // 2): 32 * (j // 2) + 32]
        code = (byte >> 4) if j % 2 else (byte & 15)
        if type_name == "Q5_K":
            code = code + 16 * ((b[..., 16:48] >> j) & 1)
        D = fp16_round(d * sc.astype(F32))[..., None]
        M = fp16_round(-dmin * m.astype(F32))[..., None]
        out[..., 32 * j:32 * j + 32] = D * code.astype(F32) + M
    return out.reshape(q.shape[0], -1)


def ref_q6k(q: np.ndarray, n: int) -> np.ndarray:
    """§4.4: per 32, q8 = RNE(q16 / (M/127)), scale fp16(d*M/127)."""
    d = f16_field(blocks(q, get_format("Q6_K")), 208)
    q16 = q16_by_division(q, "Q6_K", n, d).reshape(q.shape[0], -1, 8, 32)
    mx = (np.abs(q16).max(-1, keepdims=True) / F32(127)).astype(F32)
    S = fp16_round(d[..., None, None] * mx)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > F32(1e-9), F32(1) / mx, F32(0)).astype(F32)
    q8 = np.where(mx > F32(1e-9), np.clip(np.rint(q16 * inv), -128, 127), 0).astype(F32)
    return (S * q8).reshape(q.shape[0], -1)


KT_FACTOR = {"IQ1_KT": 1.0, "IQ2_KT": 1.05, "IQ3_KT": 1.01, "IQ4_KT": 1.0}


def kt_scales(q: np.ndarray, type_name: str) -> np.ndarray:
    """(rows, nb, 8) float block scales (f*d_row)*ls of §4.6."""
    fmt = get_format(type_name)
    drow = (q[:, :4].copy().view(np.float32)[:, 0] * F32(KT_FACTOR[type_name])).astype(F32)
    b = blocks(q, fmt, 4).astype(np.int64)
    ib = np.arange(8)
    if type_name == "IQ1_KT":
        ls = IQ4K_VALUES[b[..., ib] & 15]
    elif type_name == "IQ2_KT":
        ls = IQ4K_VALUES[(b[..., ib % 4] >> (4 * (ib // 4))) & 15]
    elif type_name == "IQ3_KT":
        ls = ((b[..., ib % 4] >> (4 * (ib // 4))) & 15).astype(F32)
    else:
        ls = (((b[..., 4 * ib]) >> 1) - 64).astype(F32)
    return (drow[:, None, None] * ls).astype(F32)


def ref_kt(q: np.ndarray, type_name: str, n: int) -> np.ndarray:
    """§4.6: the trellis integers exactly, the block scale rounded to fp16."""
    sl = kt_scales(q, type_name)[..., None]
    w = evalkit.dequantize(q, type_name, n, variant="inference").reshape(q.shape[0], -1, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(sl != 0, np.rint(w / sl), 0).astype(F32)
    return (fp16_round(sl) * t).reshape(q.shape[0], -1)


# --------------------------------------------------------------------------- packed test rows

def random_rows(type_name: str, rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Random packed rows with finite, moderate scale fields (every code and sub-scale occurs)."""
    rng = np.random.default_rng(seed)
    fmt = get_format(type_name)
    q = rng.integers(0, 256, (rows, fmt.row_bytes(n)), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.05, rows * (n // fmt.block_size) * 2).astype(F32)
    if fmt.header_bytes == 2:
        q[:, :2] = scales[:rows].astype(np.float16)[:, None].view(np.uint8)
    elif fmt.header_bytes == 4:
        q[:, :4] = scales[:rows, None].view(np.uint8)
    b = blocks(q, fmt, fmt.header_bytes)
    offs = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}.get(
        type_name, (0,) if fmt.header_bytes == 0 else ())
    for k, off in enumerate(offs):
        vals = scales[k::2][: b.shape[0] * b.shape[1]].reshape(b.shape[:2]).astype(np.float16)
        b[..., off:off + 2] = vals[..., None].view(np.uint8)
    q[:, fmt.header_bytes:] = b.reshape(rows, -1)
    q[0] = evalkit.quantize(np.zeros((1, n), F32), type_name)[0]    # an all-zero row
    return q


IQK = ["IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K", "IQ2_KS", "IQ3_KS", "IQ4_KS", "IQ4_KSS", "IQ5_KS", "IQ2_KL"]
KT = ["IQ1_KT", "IQ2_KT", "IQ3_KT", "IQ4_KT"]
EXACT = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "IQ4_NL"]


def reference_conversion(q: np.ndarray, type_name: str, n: int) -> np.ndarray:
    if type_name in IQK:
        return ref_iqk(q, type_name, n)
    if type_name in KT:
        return ref_kt(q, type_name, n)
    if type_name in ("Q4_K", "Q5_K"):
        return ref_q45k(q, type_name, n)
    return {"Q2_K": ref_q2k, "Q3_K": ref_q3k, "Q6_K": ref_q6k}[type_name](q, n)


# --------------------------------------------------------------------------- activation tests

@pytest.mark.parametrize("kind,ref,bs", [("q8_2_x4", ref_q8_2, 32), ("q8_k", ref_q8_k, 256)])
def test_activation_quantizer_matches_spec(kind, ref, bs):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((37, 1536)) * rng.uniform(1e-3, 30, (37, 1))).astype(F32)
    x[3, :bs] = 0                                       # an all-zero block
    x[5, 7] = 1e4                                       # an outlier owning its block's scale
    got = quantize_activations(x, kind, threads=2)
    vals, q, d = ref(x)
    np.testing.assert_array_equal(got.values, vals)
    np.testing.assert_array_equal(got.q, q)
    np.testing.assert_array_equal(got.d, d)
    assert not got.values[3, :bs].any() and not got.q[3, :bs].any() and got.d[3, 0] == 0
    assert np.abs(got.q).max() <= 127                   # |x|/d <= 127.5: the clamp never acts


@pytest.mark.parametrize("kind,bs", [("q8_2_x4", 32), ("q8_k", 256)])
def test_activation_rounding_ties_to_even(kind, bs):
    # amax = 127 makes d = 1 exactly (also in bf16), so x = k + 0.5 are exact ties
    x = np.zeros((1, bs), F32)
    x[0, :6] = [127, 2.5, 3.5, -2.5, -0.5, 0.5]
    got = quantize_activations(x, kind)
    assert got.q[0, :6].tolist() == [127, 2, 4, -2, 0, 0]
    assert got.d[0, 0] == 1.0


def test_q8_2_scale_is_bf16_rounded_before_the_reciprocal():
    x = np.zeros((1, 32), F32)
    x[0, 0], x[0, 1] = 100.0, 50.0                       # d = 100/127 is not a bf16 value
    got = quantize_activations(x, "q8_2_x4")
    d = bf16_round(np.array([F32(100) / F32(127)]))[0]
    assert got.d[0, 0] == d != F32(100) / F32(127)
    assert got.q[0, 0] == np.rint(F32(100) * (F32(1) / d)) and got.values[0, 0] == got.q[0, 0] * d


def test_bf16_activations_round_to_nearest_even_and_flush_group_denormals():
    x = np.zeros((2, 40), F32)
    x[0, 0] = F32(1 + 2 ** -8)                           # exactly halfway: ties to even (1.0)
    x[0, 1] = F32(1 + 3 * 2 ** -8)                       # halfway: rounds up to 1 + 2^-6
    x[0, 2:32] = np.random.default_rng(2).standard_normal(30)
    x[1, 3] = np.float32(1e-40)                          # denormal in a full 32-group: flushed
    x[1, 35] = np.float32(1e-40)                         # denormal in the tail: kept (RNE)
    got = quantize_activations(x, "bf16").values
    assert got[0, 0] == 1.0 and got[0, 1] == F32(1 + 2 ** -6)
    np.testing.assert_array_equal(got[0, 2:32], bf16_round(x[0, 2:32]))
    assert got[1, 3] == 0 and got[1, 35] == bf16_round(x[1, 35:36])[0] != 0


def test_activation_errors():
    with pytest.raises(ValueError):
        quantize_activations(np.zeros((2, 48), F32), "q8_2_x4")
    with pytest.raises(ValueError):
        quantize_activations(np.zeros((2, 288), F32), "q8_k")
    with pytest.raises(ValueError):
        quantize_activations(np.zeros((2, 32), F32), "q4_0")
    with pytest.raises(TypeError):
        quantize_activations(np.zeros((2, 32)), "q8_2_x4")


# --------------------------------------------------------------------------- conversion tests

@pytest.mark.parametrize("type_name", IQK + KT + ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_conversion_matches_spec(type_name):
    n = 512
    q = random_rows(type_name, 20, n, seed=hash(type_name) % 1000)
    got = convert_weights(q, type_name, n, threads=2)
    np.testing.assert_array_equal(got, reference_conversion(q, type_name, n))
    assert not got[0].any()                              # an all-zero row converts to zeros


@pytest.mark.parametrize("type_name", EXACT)
def test_exact_conversions_are_the_dequantized_weights(type_name):
    q = random_rows(type_name, 8, 576, seed=3)
    q[:, ::get_format(type_name).type_size] = 0          # keep the fp16 d finite
    np.testing.assert_array_equal(convert_weights(q, type_name, 576),
                                  evalkit.dequantize(q, type_name, 576, variant="inference"))


@pytest.mark.parametrize("type_name,levels", [("IQ2_K", 120), ("IQ4_K", 127), ("IQ2_KS", 125)])
def test_q8_k_r16_rescales_to_the_types_levels(type_name, levels):
    """dnew = M*d0 >= 1: the largest |q16| of a super-block maps to 120 / 127 / 125 (1/d0)."""
    q = random_rows(type_name, 4, 256, seed=5)
    got = convert_weights(q, type_name, 256)
    np.testing.assert_array_equal(got, ref_iqk(q, type_name, 256))
    fmt = get_format(type_name)
    dsup = q[:, :2].copy().view(np.float16).astype(F32) if fmt.header_bytes else f16_field(blocks(q, fmt), 0)
    q16 = q16_by_division(q, type_name, 256, dsup)[:, 0]
    for r in range(1, 4):
        dnew = F32(np.abs(q16[r]).max()) * (F32(1) / F32(levels))
        assert dnew >= 1
        assert np.abs(got[r]).max() == fp16_round(dsup[r, 0] * dnew) * levels


def test_iq2_k_small_scales_take_the_copy_path():
    """Every sub-block scale ls = 1: M <= 31 < 120, so q16 is kept and the scale is d*1 in fp16,
    i.e. the converted weights are the exact ones."""
    q = random_rows("IQ2_K", 3, 256, seed=6)
    q[:, 4:12] = 0x99
    w = evalkit.dequantize(q, "IQ2_K", 256, variant="inference")
    np.testing.assert_array_equal(convert_weights(q, "IQ2_K", 256), w)
    d = f16_field(blocks(q, get_format("IQ2_K")), 0)
    assert np.abs(w[1:] / d[1:]).max() <= 31


def test_conversion_rejects_float_types_and_bad_rows():
    assert not has_convert("F16") and has_convert("IQ4_K") and has_convert("Q8_0")
    with pytest.raises(RuntimeError):
        convert_weights(np.zeros((2, 512), np.uint8), "F16", 256)
    with pytest.raises(ValueError):
        convert_weights(np.zeros((2, 10), np.uint8), "IQ4_K", 256)
