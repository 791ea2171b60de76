"""`quantize` / `dequantize`: numpy arrays in, numpy arrays out, through the C kernels.

Validation happens here, before any byte is written, so bad input raises a
clear ``ValueError`` / ``TypeError`` and never reaches the kernels. A kernel that
runs out of memory raises ``MemoryError`` naming the type.
"""
from __future__ import annotations

import os

import numpy as np

from evalkit import _kernels
from evalkit.formats import QuantFormat, get_format

__all__ = ["quantize", "dequantize", "DEQUANT_VARIANTS", "default_threads"]

# "to_float": the reference's CPU to_float (golden .deq); "inference": what its
# matrix-multiplication kernels use (IQ6_K integer table, KT scale factors).
DEQUANT_VARIANTS = {"to_float": 0, "inference": 1}
_QFLAG_IQ2KS_SLOW = 1


def default_threads() -> int:
    """Threads used when none are given: every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _resolve_threads(threads: int | None) -> int:
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return int(threads)


def _first_nonfinite(a: np.ndarray) -> tuple[int, ...]:
    bad = np.argwhere(~np.isfinite(a))
    return tuple(int(v) for v in bad[0])


def _expect_matrix(a, dtype, fn: str, shape_desc: str) -> None:
    """TypeError unless ``a`` is a numpy array of ``dtype``; ValueError unless it is 2-D."""
    name = np.dtype(dtype).name
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{fn}: expected a numpy {name} array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{fn}: expected dtype {name}, got {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{fn}: expected {shape_desc}, got shape {a.shape}")


def _check_weights(x: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    _expect_matrix(x, np.float32, "quantize", "a 2-D array (rows, n_per_row)")
    rows, n = x.shape
    if n == 0 or n % fmt.block_size:
        raise ValueError(f"quantize: row length {n} is not a multiple of {fmt.name}'s block size "
                         f"{fmt.block_size}")
    if not np.isfinite(x).all():
        r, c = _first_nonfinite(x)
        raise ValueError(f"quantize: non-finite weight {x[r, c]} at row {r}, column {c}")
    return np.ascontiguousarray(x)


def _check_imatrix(imatrix, n: int) -> np.ndarray | None:
    if imatrix is None:
        return None
    im = np.asarray(imatrix)
    if im.dtype.kind not in "fiu":
        raise TypeError(f"quantize: imatrix must be numeric, got dtype {im.dtype}")
    im = np.ascontiguousarray(im, dtype=np.float32)
    if im.ndim != 1 or im.shape[0] != n:
        raise ValueError(f"quantize: imatrix has shape {im.shape}, expected ({n},) (one entry per column)")
    if not np.isfinite(im).all():
        (c,) = _first_nonfinite(im)
        raise ValueError(f"quantize: imatrix entry {c} is {im[c]} (must be finite)")
    if (im < 0).any():
        c = int(np.argmax(im < 0))
        raise ValueError(f"quantize: imatrix entry {c} is negative ({im[c]})")
    return im


def quantize(x: np.ndarray, type_name: str, imatrix=None, threads: int | None = None, *,
             slow_iq2ks: bool = False) -> np.ndarray:
    """Quantize float32 rows (rows, n_per_row) to ``type_name``; returns uint8 (rows, row_bytes).

    ``imatrix`` is an optional importance vector of length n_per_row shared by all rows.
    ``slow_iq2ks`` selects IQ2_KS's portable quantizer instead of the reference's
    default AVX2 "fast" path. The bytes do not depend on ``threads``.
    """
    fmt = get_format(type_name)
    nthreads = _resolve_threads(threads)
    x = _check_weights(x, fmt)
    rows, n = x.shape
    im = _check_imatrix(imatrix, n)
    fmt.require_quantizable()      # ReadOnlyTypeError: a type evalkit only reads
    if not fmt.can_quantize:
        raise NotImplementedError(f"quantize: {fmt.name} has no quantizer in this build of evalkit")
    out = np.empty((rows, fmt.row_bytes(n)), dtype=np.uint8)
    flags = _QFLAG_IQ2KS_SLOW if slow_iq2ks else 0
    rc = _kernels.get_lib().ek_quantize(fmt.type_id, x.ctypes.data, out.ctypes.data, rows, n,
                                        None if im is None else im.ctypes.data, nthreads, flags)
    _kernels.check_status(rc, f"quantize {fmt.name}")
    return out


def dequantize(q: np.ndarray, type_name: str, n_per_row: int, threads: int | None = None, *,
               variant: str = "to_float") -> np.ndarray:
    """Dequantize uint8 rows (rows, row_bytes) of ``type_name`` to float32 (rows, n_per_row).

    ``variant="to_float"`` reproduces the reference's CPU to_float (the default);
    ``variant="inference"`` the values its matrix-multiplication kernels use.
    """
    fmt = get_format(type_name)
    nthreads = _resolve_threads(threads)
    if variant not in DEQUANT_VARIANTS:
        raise ValueError(f"dequantize: unknown variant {variant!r}; choose one of {list(DEQUANT_VARIANTS)}")
    if isinstance(n_per_row, bool) or not isinstance(n_per_row, (int, np.integer)):
        raise TypeError(f"dequantize: n_per_row must be an integer, got {n_per_row!r}")
    n = int(n_per_row)
    if n <= 0 or n % fmt.block_size:
        raise ValueError(f"dequantize: row length {n} is not a multiple of {fmt.name}'s block size "
                         f"{fmt.block_size}")
    _expect_matrix(q, np.uint8, "dequantize", "a 2-D byte array (rows, row_bytes)")
    rb = fmt.row_bytes(n)
    if q.shape[1] != rb:
        raise ValueError(f"dequantize: rows are {q.shape[1]} bytes wide but a {fmt.name} row of {n} "
                         f"elements takes {rb} bytes")
    if not fmt.can_dequantize:
        raise NotImplementedError(f"dequantize: {fmt.name} has no dequantizer in this build of evalkit")
    q = np.ascontiguousarray(q)
    rows = q.shape[0]
    out = np.empty((rows, n), dtype=np.float32)
    rc = _kernels.get_lib().ek_dequantize(fmt.type_id, q.ctypes.data, out.ctypes.data, rows, n, nthreads,
                                          DEQUANT_VARIANTS[variant])
    _kernels.check_status(rc, f"dequantize {fmt.name}")
    return out
