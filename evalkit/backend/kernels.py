"""The emulated backend's compiled kernels: activation rounding and weight conversion.

Array API in the manner of :mod:`evalkit.codec` (numpy in, numpy out, checked first), and
the two tile-path entry points :mod:`evalkit.backend.linear` calls on torch tensors
(contiguous float32, on torch's thread team). The arithmetic is in
``kernels/backend_act.c`` and ``kernels/backend_convert.c``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evalkit import _kernels
from evalkit.backend.rules import ACT_BF16, ACT_F32, ACT_Q8_2_X4, ACT_Q8_K
from evalkit.codec import _resolve_threads
from evalkit.formats import get_format

__all__ = ["ACT_KINDS", "ActivationCodes", "act_block", "convert_rows_into", "convert_weights", "has_convert",
           "quantize_activations", "quantize_rows_into"]

ACT_KINDS = {"f32": ACT_F32, "q8_2_x4": ACT_Q8_2_X4, "q8_k": ACT_Q8_K, "bf16": ACT_BF16}
_BLOCK = {ACT_F32: 1, ACT_Q8_2_X4: 32, ACT_Q8_K: 256, ACT_BF16: 1}


def act_block(kind: int) -> int:
    """Elements per block of an activation kind (1 for the float kinds)."""
    return _BLOCK[kind]


@dataclass
class ActivationCodes:
    """Quantized activations: ``values`` = codes × block scales (what the GEMM multiplies),
    ``q`` the int8 codes and ``d`` the block scales (None for the float kinds)."""

    values: np.ndarray
    q: np.ndarray | None
    d: np.ndarray | None


def _kind_id(kind: str | int) -> int:
    if isinstance(kind, str):
        if kind.lower() not in ACT_KINDS:
            raise ValueError(f"unknown activation kind {kind!r}; choose one of {list(ACT_KINDS)}")
        return ACT_KINDS[kind.lower()]
    if kind not in _BLOCK:
        raise ValueError(f"unknown activation kind {kind!r}")
    return int(kind)


def quantize_activations(x: np.ndarray, kind: str | int, threads: int | None = None) -> ActivationCodes:
    """Round float32 activation rows (rows, n) as the reference does before a quantized
    matmul: ``kind`` is "q8_2_x4", "q8_k", "bf16" or "f32" (docs/backend-ik-cpu.md §3)."""
    k = _kind_id(kind)
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
        raise TypeError(f"quantize_activations: expected a 2-D float32 numpy array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    rows, n = x.shape
    bs = _BLOCK[k]
    if n == 0 or n % bs:
        raise ValueError(f"quantize_activations: row length {n} is not a multiple of the block size {bs}")
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    codes = k in (ACT_Q8_2_X4, ACT_Q8_K)
    q = np.empty((rows, n), np.int8) if codes else None
    d = np.empty((rows, n // bs), np.float32) if codes else None
    rc = _kernels.get_lib().ek_backend_quantize_act(k, x.ctypes.data, out.ctypes.data,
                                                    q.ctypes.data if codes else None,
                                                    d.ctypes.data if codes else None, rows, n,
                                                    _resolve_threads(threads), None)
    _kernels.check_status(rc, f"quantize activations ({kind})")
    return ActivationCodes(out, q, d)


def has_convert(type_name: str | int) -> bool:
    """True when the library implements the reference's weight conversion of this type."""
    return bool(_kernels.get_lib().ek_backend_has_convert(get_format(type_name).type_id))


def convert_weights(q: np.ndarray, type_name: str | int, n_per_row: int, threads: int | None = None) -> np.ndarray:
    """The float32 weights (rows, n_per_row) that the reference's on-the-fly conversion of the
    packed rows ``q`` (uint8, rows × row_bytes) represents (docs/backend-ik-cpu.md §4)."""
    fmt = get_format(type_name)
    if not isinstance(q, np.ndarray) or q.dtype != np.uint8 or q.ndim != 2:
        raise TypeError("convert_weights: expected a 2-D uint8 numpy array (rows, row_bytes)")
    if q.shape[1] != fmt.row_bytes(n_per_row):
        raise ValueError(f"convert_weights: rows are {q.shape[1]} bytes wide but a {fmt.name} row of "
                         f"{n_per_row} elements takes {fmt.row_bytes(n_per_row)} bytes")
    q = np.ascontiguousarray(q)
    out = np.empty((q.shape[0], n_per_row), np.float32)
    rc = _kernels.get_lib().ek_backend_convert(fmt.type_id, q.ctypes.data, out.ctypes.data, q.shape[0],
                                               n_per_row, _resolve_threads(threads), None)
    _kernels.check_status(rc, f"convert {fmt.name}")
    return out


def quantize_rows_into(x, out, kind: int, nthreads: int, runner) -> None:
    """Tile path: round the contiguous float32 torch tensor ``x`` (rows, n) into ``out``."""
    rc = _kernels.get_lib().ek_backend_quantize_act(kind, x.data_ptr(), out.data_ptr(), None, None, x.shape[0],
                                                    x.shape[1], nthreads, runner)
    _kernels.check_status(rc, "quantize activations")


def convert_rows_into(w, type_id: int, n: int, out, nthreads: int, runner) -> None:
    """Tile path: convert the packed uint8 torch rows ``w`` into the float32 tensor ``out``."""
    rc = _kernels.get_lib().ek_backend_convert(type_id, w.data_ptr(), out.data_ptr(), w.shape[0], n,
                                               nthreads, runner)
    _kernels.check_status(rc, f"convert type {type_id}")
