"""Kernel failures reach Python as clear errors: a quantizer that cannot get its scratch
memory (forced with the library's test hook ek_test_fail_alloc) fails the call with
EK_ERR_NO_MEMORY, which evalkit.quantize raises as MemoryError naming the type; the
types that allocate nothing are unaffected, and the next call works again."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

import evalkit
from evalkit import _kernels
from evalkit.formats import FORMATS

QUANTIZED = [f.name for f in FORMATS.values() if f.family != "float" and f.quantizable]   # read-only types: no quantizer
# the types whose row kernels allocate scratch memory (row-scaled and trellis types)
ALLOCATING = {f.name for f in FORMATS.values() if f.family in ("iqks", "kt")}


@contextmanager
def failing_allocations():
    lib = _kernels.get_lib()
    lib.ek_test_fail_alloc(1)
    try:
        yield
    finally:
        lib.ek_test_fail_alloc(0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("type_name", QUANTIZED)
def test_out_of_memory_raises_memory_error(type_name, threads):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((70, 512)).astype(np.float32)
    im = rng.uniform(0.5, 2.0, 512).astype(np.float32)
    want = evalkit.quantize(x, type_name, imatrix=im, threads=threads)
    with failing_allocations():
        if type_name in ALLOCATING:
            with pytest.raises(MemoryError, match=f"quantize {type_name}: .*out of memory"):
                evalkit.quantize(x, type_name, imatrix=im, threads=threads)
        else:
            assert np.array_equal(evalkit.quantize(x, type_name, imatrix=im, threads=threads), want)
    # nothing is left behind: the same call gives the same bytes again
    assert np.array_equal(evalkit.quantize(x, type_name, imatrix=im, threads=threads), want)


def test_the_hook_reports_its_previous_setting():
    lib = _kernels.get_lib()
    assert lib.ek_test_fail_alloc(1) == 0
    assert lib.ek_test_fail_alloc(0) == 1
    assert lib.ek_test_fail_alloc(0) == 0


def test_status_codes_map_to_python_errors():
    _kernels.check_status(0, "quantize IQ2_KT")
    with pytest.raises(MemoryError, match="quantize IQ2_KT: the kernel library ran out of memory"):
        _kernels.check_status(_kernels.EK_ERR_NO_MEMORY, "quantize IQ2_KT")
    with pytest.raises(RuntimeError, match="dequantize Q4_0: unknown type"):
        _kernels.check_status(_kernels.EK_ERR_UNKNOWN_TYPE, "dequantize Q4_0")
    with pytest.raises(RuntimeError, match="kernel error -42"):
        _kernels.check_status(-42, "quantize Q4_0")
