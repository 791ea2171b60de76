"""Row-scaled IQK types (IQ2_KS IQ3_KS IQ4_KS IQ4_KSS IQ5_KS IQ2_KL) beyond the golden
vectors (compared byte for byte / bit for bit in test_golden_quant.py; thread independence
and fuzzed bytes in test_codec_api.py): the IQ2_KS portable quantizer (no golden data) and
the round-trip error."""
from __future__ import annotations

import numpy as np
import pytest

import evalkit
from evalkit.formats import FORMATS, get_format
from golden_quant import case_inputs

TYPES = [f.name for f in FORMATS.values() if f.family == "iqks"]



def _rel_rmse(x, y):
    return float(np.sqrt(np.mean((x - y) ** 2)) / np.sqrt(np.mean(x ** 2)))


@pytest.mark.parametrize("use_imatrix", [False, True])
def test_iq2ks_slow_path(use_imatrix):
    """The portable quantizer writes valid rows with a sensible error, and they are not
    the fast path's bytes."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 1024)).astype(np.float32)
    im = rng.uniform(0.1, 2.0, 1024).astype(np.float32) if use_imatrix else None
    slow = evalkit.quantize(x, "IQ2_KS", imatrix=im, threads=1, slow_iq2ks=True)
    fast = evalkit.quantize(x, "IQ2_KS", imatrix=im, threads=1)
    assert slow.shape == fast.shape == (16, get_format("IQ2_KS").row_bytes(1024))
    ys = evalkit.dequantize(slow, "IQ2_KS", 1024, threads=1)
    yf = evalkit.dequantize(fast, "IQ2_KS", 1024, threads=1)
    assert np.isfinite(ys).all()
    es, ef = _rel_rmse(x, ys), _rel_rmse(x, yf)
    # 2.19 bpw on Gaussian data: both quantizers land near 0.33 relative RMS error
    assert es < 0.4 and ef < 0.4, (es, ef)
    assert abs(es - ef) < 0.05, (es, ef)
    assert not np.array_equal(slow, fast)
    # deterministic, and independent of the thread split
    again = evalkit.quantize(x, "IQ2_KS", imatrix=im, threads=3, slow_iq2ks=True)
    assert np.array_equal(slow, again)


def test_iq2ks_slow_path_edge_rows():
    x, _ = case_inputs("edge_256")
    q = evalkit.quantize(x, "IQ2_KS", threads=1, slow_iq2ks=True)
    y = evalkit.dequantize(q, "IQ2_KS", x.shape[1], threads=1)
    assert np.isfinite(y).all()


# Relative RMS error on Gaussian rows (measured: 0.33 0.16 0.075 0.105 0.036 0.24).
MAX_REL_RMSE = {"IQ2_KS": 0.36, "IQ3_KS": 0.18, "IQ4_KS": 0.09, "IQ4_KSS": 0.12, "IQ5_KS": 0.045,
                "IQ2_KL": 0.27}


@pytest.mark.parametrize("type_name", TYPES)
def test_round_trip_error(type_name):
    x = np.random.default_rng(11).standard_normal((16, 2048)).astype(np.float32)
    y = evalkit.dequantize(evalkit.quantize(x, type_name, threads=2), type_name, 2048, threads=2)
    assert _rel_rmse(x, y) < MAX_REL_RMSE[type_name]
