"""The torch dequantizers (evalkit.formats.torch_dequant) against the C kernels, bit for bit.

Every type, both variants: all golden vectors (and the reference's own ``.deq`` floats) and
3000 rows of random bytes. Random bytes make NaN/Inf scales in some types; where two NaN
operands meet (``q * d + m`` with d and m both NaN) the hardware's choice of payload
depends on operand order, so the comparison is on the uint32 views with any NaN equal to
any NaN ("NaN-aware bitwise"). Everything else, NaN included, must have identical bits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evalkit
from evalkit.formats import FORMATS, get_format
from evalkit.formats.torch_dequant import TORCH_DEQUANTIZERS, dequantize_torch, variant_id
from golden_quant import QUANT, golden, manifest

VARIANTS = ("to_float", "inference")
GOLDEN_TYPES = sorted(manifest()["types"])
RANDOM_ROWS = 3000


def assert_bits_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Identical uint32 views, except that a NaN equals any NaN (payloads of NaN-NaN operations)."""
    assert got.dtype == np.float32 and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    gu, wu = got.view(np.uint32), want.view(np.uint32)
    bad = (gu != wu) & ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} values differ; first at row {r}, column "
                             f"{c}: torch {got[r, c]!r} ({gu[r, c]:#010x}) vs C {want[r, c]!r} ({wu[r, c]:#010x})")


def torch_deq(q: np.ndarray, name: str, n: int, variant: str) -> np.ndarray:
    return dequantize_torch(torch.from_numpy(q), name, n, variant).numpy()


def test_every_registered_type_has_a_torch_dequantizer():
    assert set(TORCH_DEQUANTIZERS) == set(FORMATS)
    assert len(GOLDEN_TYPES) == 27 and set(GOLDEN_TYPES) <= set(TORCH_DEQUANTIZERS)


@pytest.mark.parametrize("name", GOLDEN_TYPES)
def test_golden_vectors_bit_identical(name):
    g = golden(name)
    cases = [k[:-2] for k in g.files if k.endswith(".q")]
    assert cases, f"no golden cases for {name} in {QUANT}"
    for case in cases:
        q, deq = g[f"{case}.q"], g[f"{case}.deq"]
        n = deq.shape[1]
        for variant in VARIANTS:
            got = torch_deq(q, name, n, variant)
            assert_bits_equal(got, evalkit.dequantize(q, name, n, threads=1, variant=variant),
                              f"{name} {case} {variant}")
        # the reference's own to_float output, strictly (golden rows hold no NaN)
        np.testing.assert_array_equal(torch_deq(q, name, n, "to_float").view(np.uint32), deq.view(np.uint32))


@pytest.mark.parametrize("name", list(FORMATS))
def test_random_rows_bit_identical(name):
    fmt = get_format(name)
    n = 256      # one super-block (8 legacy blocks) per row; the golden rows cover longer rows
    rng = np.random.default_rng(fmt.type_id)
    q = rng.integers(0, 256, (RANDOM_ROWS, fmt.row_bytes(n)), dtype=np.uint8)
    for variant in VARIANTS:
        assert_bits_equal(torch_deq(q, name, n, variant), evalkit.dequantize(q, name, n, threads=1, variant=variant),
                          f"{name} random {variant}")


@pytest.mark.parametrize("name", ["F16", "BF16"])
def test_every_half_bit_pattern(name):
    """All 65536 patterns, strictly bitwise (subnormals, Inf, every NaN payload)."""
    q = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(1, -1)
    got = torch_deq(q, name, 1 << 16, "to_float")
    np.testing.assert_array_equal(got.view(np.uint32), evalkit.dequantize(q, name, 1 << 16).view(np.uint32))


def test_variants_differ_where_the_reference_does():
    """IQ6_K's to_float cubic vs table, the KT inference factors; other types ignore the variant."""
    rng = np.random.default_rng(1)
    for name, differs in (("IQ6_K", True), ("IQ2_KT", True), ("IQ3_KT", True), ("IQ4_KT", False), ("IQ4_K", False)):
        fmt = get_format(name)
        q = rng.integers(0, 256, (4, fmt.row_bytes(256)), dtype=np.uint8)
        q[:, :fmt.header_bytes] = np.frombuffer(np.float32(0.01).tobytes()[:fmt.header_bytes], np.uint8)
        if not fmt.header_bytes:
            q[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)     # a finite block scale
        a, b = torch_deq(q, name, 256, "to_float"), torch_deq(q, name, 256, "inference")
        assert (not np.array_equal(a.view(np.uint32), b.view(np.uint32))) == differs, name


def test_zero_rows_and_device_of_result():
    out = dequantize_torch(torch.empty((0, 144), dtype=torch.uint8), "IQ4_K", 256)
    assert out.shape == (0, 256) and out.dtype == torch.float32
    q = torch.from_numpy(evalkit.quantize(np.ones((2, 256), np.float32), "Q8_0"))
    out = dequantize_torch(q, "q8_0", 256, 1)   # names are case-insensitive, variant ids accepted
    assert out.device == q.device and out.shape == (2, 256)


def test_bad_input_is_refused():
    q = torch.zeros((2, 144), dtype=torch.uint8)
    with pytest.raises(TypeError, match="2-D uint8"):
        dequantize_torch(q.float(), "IQ4_K", 256)
    with pytest.raises(TypeError, match="2-D uint8"):
        dequantize_torch(q[0], "IQ4_K", 256)
    with pytest.raises(ValueError, match="144 bytes wide but a IQ4_K row of 512"):
        dequantize_torch(q, "IQ4_K", 512)
    with pytest.raises(ValueError, match="not a positive multiple"):
        dequantize_torch(q, "IQ4_K", 100)
    with pytest.raises(ValueError, match="unknown dequantization variant"):
        dequantize_torch(q, "IQ4_K", 256, "fast")
    with pytest.raises(ValueError, match="unknown"):
        dequantize_torch(q, "IQ9_K", 256)
    assert variant_id("inference") == 1 and variant_id(0) == 0
