"""Every golden vector: .q byte for byte from the inputs, .deq bit for bit from .q."""
from __future__ import annotations

import pytest

from golden_quant import assert_dequantize_matches, assert_quantize_matches, manifest

# Every quantized type with golden vectors: issue 2's, the row-scaled KS/KL types and the
# trellis types (their other checks are in test_ks_golden.py and test_kt_golden.py).
TYPES = ["IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K",
         "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "IQ4_NL",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ2_KS", "IQ3_KS", "IQ4_KS", "IQ4_KSS", "IQ5_KS", "IQ2_KL",
         "IQ1_KT", "IQ2_KT", "IQ3_KT", "IQ4_KT"]
CASES = manifest()["cases"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_golden(type_name, case):
    assert_quantize_matches(type_name, case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_golden(type_name, case):
    assert_dequantize_matches(type_name, case)
