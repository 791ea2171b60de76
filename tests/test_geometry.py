"""Type geometry is defined twice, once per language: the Python registry
(evalkit/formats, sizes spelled out field by field) and the kernel library's format
table (kernels/dispatch.c, EK_FORMATS). Every registry type must agree with the library
on block size, bytes per block, row header and row size, and neither side may know a
type the other does not."""
from __future__ import annotations

import pytest

from evalkit import _kernels
from evalkit.formats import FORMATS, FORMATS_BY_ID

IDS = range(-2, 600)           # every id the library could know (EK_TYPE_COUNT = 512), and beyond


def _row_lengths(block_size: int) -> list[int]:
    """1, 2, 3 and 17 blocks, plus common model widths the block size divides."""
    ns = [k * block_size for k in (1, 2, 3, 17)]
    return ns + [n for n in (576, 1536, 2048, 4096, 11008) if n % block_size == 0]


@pytest.mark.parametrize("name", list(FORMATS))
def test_registry_matches_library(name):
    fmt = FORMATS[name]
    info = _kernels.format_info(fmt.type_id)
    assert info is not None, f"{name} (id {fmt.type_id}) is in the registry but unknown to the kernel library"
    assert info == (fmt.block_size, fmt.type_size, fmt.header_bytes), (
        f"{name}: library (block_size, type_size, header_bytes) = {info}, registry = "
        f"{(fmt.block_size, fmt.type_size, fmt.header_bytes)}")
    lib = _kernels.get_lib()
    for n in _row_lengths(fmt.block_size):
        assert fmt.row_bytes(n) == lib.ek_row_size(fmt.type_id, n), f"{name}: row of {n} elements"


def test_no_type_is_known_to_only_one_side():
    lib_ids = {i for i in IDS if _kernels.format_info(i) is not None}
    only_c = sorted(lib_ids - set(FORMATS_BY_ID))
    only_py = sorted(f"{f.name}={f.type_id}" for f in FORMATS.values() if f.type_id not in lib_ids)
    assert not only_c, f"type ids known to the kernel library but missing from evalkit.formats: {only_c}"
    assert not only_py, f"registry types unknown to the kernel library: {only_py}"


def test_unknown_ids_are_refused_by_the_library():
    lib = _kernels.get_lib()
    for i in IDS:
        if i not in FORMATS_BY_ID:
            assert lib.ek_row_size(i, 256) == _kernels.EK_ERR_UNKNOWN_TYPE, i
            assert not lib.ek_has_quantize(i) and not lib.ek_has_dequantize(i), i


@pytest.mark.parametrize("name", list(FORMATS))
def test_bad_row_lengths_agree(name):
    fmt = FORMATS[name]
    lib = _kernels.get_lib()
    bad = [0, -fmt.block_size] + ([fmt.block_size + 1, fmt.block_size // 2] if fmt.block_size > 1 else [])
    for n in bad:
        assert lib.ek_row_size(fmt.type_id, n) < 0, f"{name}: row of {n} elements"
        with pytest.raises(ValueError):
            fmt.row_bytes(n)


def test_bits_per_weight_of_the_spec_table():
    # (bpw column of the IQK summary table: block bytes only, the row header not counted)
    want = {"IQ2_K": 2.375, "IQ3_K": 3.4375, "IQ4_K": 4.5, "IQ5_K": 5.5, "IQ6_K": 6.625, "IQ4_KS": 4.25,
            "IQ2_KS": 2.1875, "IQ4_KSS": 4.0, "IQ5_KS": 5.25, "IQ2_KT": 2.125, "IQ3_KT": 3.125, "IQ4_KT": 4.0,
            "IQ3_KS": 3.1875, "IQ2_KL": 2.6875, "IQ1_KT": 1.75}
    assert {n: FORMATS[n].bpw for n in want} == want
