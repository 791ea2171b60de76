"""Helpers to compare kernel output with the golden vectors of ../shared/golden/quant."""
from __future__ import annotations

import json
from functools import lru_cache

import numpy as np

from conftest import GOLDEN

QUANT = GOLDEN / "quant"


@lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((QUANT / "manifest.json").read_text())


@lru_cache(maxsize=None)
def inputs():
    return np.load(QUANT / "inputs.npz")


@lru_cache(maxsize=None)
def golden(type_name: str):
    return np.load(QUANT / f"{type_name}.npz")


def case_inputs(case: str):
    inp = inputs()
    x = inp[f"{case}.x"]
    im = inp[f"{case}.imatrix"] if f"{case}.imatrix" in inp.files else None
    return x, im


def describe_byte_mismatch(got: np.ndarray, want: np.ndarray, header: int, block_bytes: int) -> str:
    """Count differing blocks and show the first one side by side."""
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    rows, width = want.shape
    nblk = (width - header) // block_bytes
    bad = []
    for r in range(rows):
        if header and not np.array_equal(got[r, :header], want[r, :header]):
            bad.append((r, "header", got[r, :header], want[r, :header]))
        for b in range(nblk):
            s = slice(header + b * block_bytes, header + (b + 1) * block_bytes)
            if not np.array_equal(got[r, s], want[r, s]):
                bad.append((r, b, got[r, s], want[r, s]))
    if not bad:
        return ""
    r, b, g, w = bad[0]
    lines = [f"{len(bad)} of {rows * nblk} blocks differ; first: row {r}, block {b}",
             "  off  got  want"]
    for i, (gv, wv) in enumerate(zip(g, w)):
        mark = "  <--" if gv != wv else ""
        lines.append(f"  {i:4d}  {gv:02x}   {wv:02x}{mark}")
    return "\n".join(lines)


def assert_quantize_matches(type_name: str, case: str) -> None:
    """Quantize the case's inputs (with its imatrix, one thread) and compare with the golden bytes."""
    import evalkit
    from evalkit.formats import get_format

    fmt = get_format(type_name)
    assert manifest()["types"][type_name]["ggml_type"] == fmt.type_id
    x, im = case_inputs(case)
    want = golden(type_name)[f"{case}.q"]
    got = evalkit.quantize(x, type_name, imatrix=im, threads=1)
    assert got.shape == want.shape
    msg = describe_byte_mismatch(got, want, fmt.header_bytes, fmt.type_size)
    assert not msg, f"{type_name} {case}:\n{msg}"


def assert_dequantize_matches(type_name: str, case: str) -> None:
    """Dequantize the golden bytes and compare bit for bit with the golden floats."""
    import evalkit

    g = golden(type_name)
    q, want = g[f"{case}.q"], g[f"{case}.deq"]
    got = evalkit.dequantize(q, type_name, want.shape[1], threads=1)
    same = got.view(np.uint32) == want.view(np.uint32)
    if not same.all():
        r, c = np.argwhere(~same)[0]
        raise AssertionError(f"{type_name} {case}: {int((~same).sum())} values differ; first at row {r}, "
                             f"column {c}: got {got[r, c]!r}, want {want[r, c]!r}")
