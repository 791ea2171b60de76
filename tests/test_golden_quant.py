"""Every golden vector: .q byte for byte from the inputs, .deq bit for bit from .q."""
from __future__ import annotations

import pytest

from golden_quant import assert_dequantize_matches, assert_quantize_matches, manifest

# The types issue 2 delivers; later issues extend this list.
TYPES = ["IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K",
         "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "IQ4_NL",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
CASES = manifest()["cases"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_golden(type_name, case):
    assert_quantize_matches(type_name, case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_golden(type_name, case):
    assert_dequantize_matches(type_name, case)
