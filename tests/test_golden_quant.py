"""Every golden vector: .q byte for byte from the inputs, .deq bit for bit from .q."""
from __future__ import annotations

import pytest

from evalkit.formats import FORMATS
from golden_quant import assert_dequantize_matches, assert_quantize_matches, manifest

# Every quantized type of the registry (the row-scaled KS/KL and trellis types have further
# checks in test_ks_golden.py and test_kt_golden.py); each must have golden vectors. The
# read-only types (quantizable False: IQ4_XS, Q8_KV) have no quantizer and are checked in
# test_new_plain_types.py.
TYPES = [f.name for f in FORMATS.values() if f.family != "float" and f.quantizable]
CASES = manifest()["cases"]


def test_every_quantized_type_has_golden_vectors():
    assert sorted(TYPES) == sorted(manifest()["types"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_quantize_matches_golden(type_name, case):
    assert_quantize_matches(type_name, case)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_matches_golden(type_name, case):
    assert_dequantize_matches(type_name, case)
