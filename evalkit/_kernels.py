"""ctypes binding to the compiled kernel library (kernels/*.c).

The library is built by ``pip install -e .`` as the extension
``evalkit/_evalkit_kernels*.so``; ``EVALKIT_KERNELS_LIB`` may point at another
build (used while developing a kernel).  ctypes releases the GIL during calls.
"""
from __future__ import annotations

import ctypes
import glob
import os
from evalkit.errors import EvalkitError

__all__ = ["lib", "has_quantize", "has_dequantize", "KernelLibraryError", "status_message"]


class KernelLibraryError(EvalkitError, RuntimeError):
    """The compiled kernel library is missing or unusable."""


def _find_library() -> str:
    override = os.environ.get("EVALKIT_KERNELS_LIB")
    if override:
        if not os.path.exists(override):
            raise KernelLibraryError(f"EVALKIT_KERNELS_LIB={override!r} does not exist")
        return override
    here = os.path.dirname(os.path.abspath(__file__))
    hits = sorted(glob.glob(os.path.join(here, "_evalkit_kernels*.so")) +
                  glob.glob(os.path.join(here, "_evalkit_kernels*.pyd")) +
                  glob.glob(os.path.join(here, "_evalkit_kernels*.dylib")))
    if not hits:
        raise KernelLibraryError(
            "evalkit's compiled kernels are not built (no evalkit/_evalkit_kernels*.so); "
            "run `pip install -e .` in the repository root")
    return hits[0]


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(_find_library())
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.ek_row_size.argtypes = [ci, i64]
    lib.ek_row_size.restype = i64
    lib.ek_has_quantize.argtypes = [ci]
    lib.ek_has_quantize.restype = ci
    lib.ek_has_dequantize.argtypes = [ci]
    lib.ek_has_dequantize.restype = ci
    lib.ek_quantize.argtypes = [ci, vp, vp, i64, i64, vp, ci, ci]
    lib.ek_quantize.restype = ci
    lib.ek_dequantize.argtypes = [ci, vp, vp, i64, i64, ci, ci]
    lib.ek_dequantize.restype = ci
    lib.ek_dequantize_team.argtypes = [ci, vp, vp, i64, i64, ci, ci, vp]
    lib.ek_dequantize_team.restype = ci
    lib.ek_has_causal_attention.argtypes = [i64]
    lib.ek_has_causal_attention.restype = ci
    lib.ek_causal_attention.argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, i64, i64, ctypes.c_float, ci, vp]
    lib.ek_causal_attention.restype = ci
    lib.ek_has_norm_act.argtypes = []
    lib.ek_has_norm_act.restype = ci
    lib.ek_rms_norm.argtypes = [vp, vp, vp, i64, i64, i64, i64, i64, ctypes.c_float, ci, vp]
    lib.ek_rms_norm.restype = ci
    lib.ek_swiglu.argtypes = [vp, vp, vp, i64, ci, vp]
    lib.ek_swiglu.restype = ci
    return lib


lib = _load()

_STATUS = {
    -1: "unknown type",
    -2: "not implemented in the kernel library",
    -3: "row length is not a multiple of the block size",
    -4: "bad argument",
    -5: "out of memory",
}


def status_message(code: int) -> str:
    """Human-readable text for an ek_status code."""
    return _STATUS.get(code, f"kernel error {code}")


def has_quantize(type_id: int) -> bool:
    """True when the library has a quantizer for this ggml type id."""
    return bool(lib.ek_has_quantize(type_id))


def has_dequantize(type_id: int) -> bool:
    """True when the library has a dequantizer for this ggml type id."""
    return bool(lib.ek_has_dequantize(type_id))
