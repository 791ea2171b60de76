"""evalkit.quantize / dequantize: thread independence, bad input, fuzzed bytes."""
from __future__ import annotations

import numpy as np
import pytest

import evalkit
from evalkit.formats import FORMATS, get_format
from test_golden_quant import TYPES   # every quantized type with golden vectors

rng = np.random.default_rng(1234)


@pytest.mark.parametrize("type_name", TYPES)
def test_bytes_identical_for_1_2_7_threads(type_name):
    x = rng.standard_t(4, size=(29, 512)).astype(np.float32)
    im = rng.random(512).astype(np.float32)
    for imatrix in (None, im):
        ref = evalkit.quantize(x, type_name, imatrix=imatrix, threads=1)
        for t in (2, 7):
            got = evalkit.quantize(x, type_name, imatrix=imatrix, threads=t)
            assert np.array_equal(got, ref), f"{type_name}: bytes differ with {t} threads"
        deq1 = evalkit.dequantize(ref, type_name, 512, threads=1)
        deq7 = evalkit.dequantize(ref, type_name, 512, threads=7)
        assert np.array_equal(deq1.view(np.uint32), deq7.view(np.uint32))


@pytest.mark.parametrize("type_name", TYPES)
def test_fuzzed_bytes_dequantize_without_crashing(type_name):
    fmt = get_format(type_name)
    n = 512
    q = rng.integers(0, 256, size=(3000, fmt.row_bytes(n)), dtype=np.uint8)
    out = evalkit.dequantize(q, type_name, n, threads=2)
    assert out.shape == (3000, n) and out.dtype == np.float32
    # the same bytes decode to the same values (no uninitialised memory)
    again = evalkit.dequantize(q, type_name, n, threads=1)
    assert np.array_equal(out.view(np.uint32), again.view(np.uint32))
    if type_name == "IQ6_K":
        evalkit.dequantize(q, type_name, n, variant="inference")


def test_row_length_not_multiple_of_block():
    x = np.zeros((2, 300), np.float32)
    with pytest.raises(ValueError, match="row length 300 is not a multiple of IQ4_K's block size 256"):
        evalkit.quantize(x, "IQ4_K")
    with pytest.raises(ValueError, match="not a multiple of Q8_0's block size 32"):
        evalkit.quantize(np.zeros((2, 40), np.float32), "Q8_0")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_names_row_and_column(bad):
    x = np.ones((4, 256), np.float32)
    x[2, 17] = bad
    with pytest.raises(ValueError, match=r"non-finite weight .* at row 2, column 17"):
        evalkit.quantize(x, "IQ4_K")


def test_wrong_dtype_and_rank():
    with pytest.raises(TypeError, match="float32"):
        evalkit.quantize(np.zeros((2, 256), np.float64), "IQ4_K")
    with pytest.raises(TypeError, match="numpy"):
        evalkit.quantize([[0.0] * 256], "IQ4_K")
    with pytest.raises(ValueError, match="2-D"):
        evalkit.quantize(np.zeros(256, np.float32), "IQ4_K")
    with pytest.raises(ValueError, match="2-D"):
        evalkit.quantize(np.zeros((1, 2, 256), np.float32), "IQ4_K")
    with pytest.raises(TypeError, match="uint8"):
        evalkit.dequantize(np.zeros((2, 144), np.int8), "IQ4_K", 256)
    with pytest.raises(ValueError, match="2-D"):
        evalkit.dequantize(np.zeros(144, np.uint8), "IQ4_K", 256)


def test_non_contiguous_input_is_copied():
    x = rng.standard_normal((8, 512), dtype=np.float32)
    strided = np.asfortranarray(x)
    assert not strided.flags.c_contiguous
    assert np.array_equal(evalkit.quantize(strided, "IQ4_K"), evalkit.quantize(x, "IQ4_K"))
    view = rng.standard_normal((8, 1024), dtype=np.float32)[:, ::2]
    assert np.array_equal(evalkit.quantize(view, "Q8_0"), evalkit.quantize(view.copy(), "Q8_0"))
    q = evalkit.quantize(x, "IQ4_K")
    qf = np.asfortranarray(q)
    assert np.array_equal(evalkit.dequantize(qf, "IQ4_K", 512), evalkit.dequantize(q, "IQ4_K", 512))


def test_bad_imatrix():
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ValueError, match=r"imatrix has shape \(128,\), expected \(256,\)"):
        evalkit.quantize(x, "IQ4_K", imatrix=np.ones(128, np.float32))
    im = np.ones(256, np.float32)
    im[5] = -1
    with pytest.raises(ValueError, match="imatrix entry 5 is negative"):
        evalkit.quantize(x, "IQ4_K", imatrix=im)
    im[5] = np.nan
    with pytest.raises(ValueError, match="imatrix entry 5 is nan"):
        evalkit.quantize(x, "IQ4_K", imatrix=im)


def test_unknown_type_lists_known_ones():
    with pytest.raises(ValueError, match="unknown quantization type 'IQ9_K'.*IQ4_K") as ei:
        evalkit.quantize(np.zeros((1, 256), np.float32), "IQ9_K")
    assert all(name in str(ei.value) for name in FORMATS)
    with pytest.raises(ValueError, match="unknown quantization type"):
        evalkit.dequantize(np.zeros((1, 144), np.uint8), "iq9_k", 256)


def test_byte_width_mismatch():
    with pytest.raises(ValueError, match="rows are 143 bytes wide but a IQ4_K row of 256 elements takes 144"):
        evalkit.dequantize(np.zeros((2, 143), np.uint8), "IQ4_K", 256)


def test_bad_threads_and_variant():
    x = np.zeros((1, 256), np.float32)
    with pytest.raises(ValueError, match="threads"):
        evalkit.quantize(x, "Q8_0", threads=0)
    with pytest.raises(ValueError, match="unknown variant"):
        evalkit.dequantize(np.zeros((1, 212), np.uint8), "IQ6_K", 256, variant="cubic")


def test_failed_call_writes_nothing_partial():
    # validation happens before any output exists: the first bad row is found up front
    x = rng.standard_normal((64, 256), dtype=np.float32)
    x[63, 255] = np.nan
    with pytest.raises(ValueError, match="row 63, column 255"):
        evalkit.quantize(x, "Q4_0", threads=4)


def test_registry_facts():
    f = get_format("IQ4_KS")
    assert (f.type_id, f.block_size, f.type_size, f.header_bytes) == (144, 256, 136, 4)
    assert f.row_bytes(512) == 4 + 2 * 136 and f.bpw == 4.25
    assert get_format("iq2_k").bpw == 2.375 and get_format(137).name == "IQ2_K"
    assert get_format("IQ1_KT").needs_imatrix and not get_format("IQ4_K").needs_imatrix
