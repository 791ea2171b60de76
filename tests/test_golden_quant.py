"""Every golden vector: .q byte for byte from the inputs, .deq bit for bit from .q."""
from __future__ import annotations

import numpy as np
import pytest

import evalkit
from evalkit.formats import get_format
from golden_quant import case_inputs, describe_byte_mismatch, golden, manifest

# The types issue 2 delivers; later issues extend this list.
TYPES = ["IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K",
         "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "IQ4_NL",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
CASES = manifest()["cases"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_golden(type_name, case):
    fmt = get_format(type_name)
    assert manifest()["types"][type_name]["ggml_type"] == fmt.type_id
    x, im = case_inputs(case)
    want = golden(type_name)[f"{case}.q"]
    got = evalkit.quantize(x, type_name, imatrix=im, threads=1)
    assert got.shape == want.shape
    msg = describe_byte_mismatch(got, want, fmt.header_bytes, fmt.type_size)
    assert not msg, f"{type_name} {case}:\n{msg}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_golden(type_name, case):
    g = golden(type_name)
    q, want = g[f"{case}.q"], g[f"{case}.deq"]
    got = evalkit.dequantize(q, type_name, want.shape[1], threads=1)
    same = got.view(np.uint32) == want.view(np.uint32)
    if not same.all():
        r, c = np.argwhere(~same)[0]
        pytest.fail(f"{type_name} {case}: {int((~same).sum())} values differ; first at row {r}, "
                    f"column {c}: got {got[r, c]!r}, want {want[r, c]!r}")
