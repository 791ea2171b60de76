"""Kernel work on torch's own OpenMP team (evalkit.model.team) gives the same bytes as
the single-threaded kernels, and is only offered where it is safe."""
from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

from evalkit import _kernels, quantize
from evalkit.formats import FORMATS, get_format
from evalkit.model import team


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the wheel's OpenMP runtime is libgomp on Linux")
def test_torch_openmp_team_is_found():
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch does not run on OpenMP")
    assert team.runner() is not None
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert team.team() == (2, team.runner())
        torch.set_num_threads(1)
        assert team.team() == (1, None)
    finally:
        torch.set_num_threads(saved)


def test_other_threads_work_alone():
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("team", team.team()))
    t.start()
    t.join()
    assert box["team"] == (1, None)


@pytest.mark.parametrize("type_name", [f.name for f in FORMATS.values() if f.family != "float"])
def test_dequantize_on_a_team_is_bit_identical(type_name):
    fmt = get_format(type_name)
    if not (fmt.can_quantize and fmt.can_dequantize):
        pytest.skip(f"{type_name}: kernels not in this build")
    rng = np.random.default_rng(1)
    n, rows = 512, 101                       # rows not a multiple of the 32-row work item
    imatrix = rng.uniform(0.5, 2.0, n).astype(np.float32) if fmt.needs_imatrix else None
    q = quantize((rng.standard_normal((rows, n)) * 0.05).astype(np.float32), type_name, imatrix=imatrix)
    lib = _kernels.lib
    want = np.empty((rows, n), np.float32)
    assert lib.ek_dequantize(fmt.type_id, q.ctypes.data, want.ctypes.data, rows, n, 1, 1) == 0
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for nthreads, runner in ((2, team.runner()), (3, None), (1, None)):
            got = np.full((rows, n), np.nan, np.float32)
            rc = lib.ek_dequantize_team(fmt.type_id, q.ctypes.data, got.ctypes.data, rows, n, 1, nthreads, runner)
            assert rc == 0
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (nthreads, runner)
    finally:
        torch.set_num_threads(saved)
    assert lib.ek_dequantize_team(fmt.type_id, q.ctypes.data, want.ctypes.data, rows, 100, 1, 2, None) == -3
