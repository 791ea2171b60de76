"""ctypes binding to the compiled kernel library (kernels/*.c).

The library is built by ``pip install -e .`` as the extension
``evalkit/_evalkit_kernels<suffix>`` (suffix: one of the interpreter's extension
suffixes); ``EVALKIT_KERNELS_LIB`` may point at another build (used while developing
a kernel).  It is loaded on first use (:func:`get_lib`, or the module attribute
``lib``), so ``import evalkit`` and ``evalkit --help`` work before it is built.
ctypes releases the GIL during calls.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os

from evalkit.errors import EvalkitError

__all__ = ["get_lib", "has_quantize", "has_dequantize", "format_info", "KernelLibraryError",
           "status_message", "check_status", "EK_ERR_UNKNOWN_TYPE", "EK_ERR_NO_MEMORY"]

_BASENAME = "_evalkit_kernels"
_BUILD_HINT = ("build it with `pip install -e .` (or `python setup.py build_ext --inplace`) in the "
               "repository root, or set EVALKIT_KERNELS_LIB to a built library")

# ek_status codes of kernels/evalkit_kernels.h
EK_ERR_UNKNOWN_TYPE = -1
EK_ERR_NO_MEMORY = -5
_STATUS = {
    -1: "unknown type",
    -2: "not implemented in the kernel library",
    -3: "row length is not a multiple of the block size",
    -4: "bad argument",
    -5: "out of memory",
}


class KernelLibraryError(EvalkitError, RuntimeError):
    """The compiled kernel library is missing or unusable."""


def _find_library() -> str:
    override = os.environ.get("EVALKIT_KERNELS_LIB")
    if override:
        if not os.path.exists(override):
            raise KernelLibraryError(f"EVALKIT_KERNELS_LIB={override!r} does not exist")
        return override
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:   # most specific first
        path = os.path.join(here, _BASENAME + suffix)
        if os.path.exists(path):
            return path
    raise KernelLibraryError(
        f"evalkit's compiled kernel library is not built (no {_BASENAME}"
        f"{importlib.machinery.EXTENSION_SUFFIXES[0]} in {here}); {_BUILD_HINT}")


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of every entry point Python calls."""
    i64, vp, ci, pi = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int)
    signatures = {
        "ek_row_size": ([ci, i64], i64),
        "ek_format_info": ([ci, pi, pi, pi], ci),
        "ek_has_quantize": ([ci], ci),
        "ek_has_dequantize": ([ci], ci),
        "ek_quantize": ([ci, vp, vp, i64, i64, vp, ci, ci], ci),
        "ek_dequantize": ([ci, vp, vp, i64, i64, ci, ci], ci),
        "ek_dequantize_team": ([ci, vp, vp, i64, i64, ci, ci, vp], ci),
        "ek_has_causal_attention": ([i64], ci),
        "ek_causal_attention": ([vp, vp, vp, vp, i64, i64, i64, i64, i64, i64, ctypes.c_float, ci, vp], ci),
        "ek_has_norm_act": ([], ci),
        "ek_rms_norm": ([vp, vp, vp, i64, i64, i64, i64, i64, ctypes.c_float, ci, vp], ci),
        "ek_swiglu": ([vp, vp, vp, i64, ci, vp], ci),
        "ek_test_fail_alloc": ([ci], ci),
        # emulated reference CPU backend (kernels/backend_act.c, kernels/backend_convert.c)
        "ek_backend_quantize_act": ([ci, vp, vp, vp, vp, i64, i64, ci, vp], ci),
        "ek_backend_has_convert": ([ci], ci),
        "ek_backend_convert": ([ci, vp, vp, i64, i64, ci, vp], ci),
        # repacked tensors → plain rows (kernels/repack.c)
        "ek_unrepack": ([vp, i64, i64, i64, i64, vp, i64, i64, i64, i64, vp, i64], ci),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype


@functools.cache
def get_lib() -> ctypes.CDLL:
    """The kernel library, loaded on first call; KernelLibraryError says how to build it."""
    path = _find_library()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise KernelLibraryError(f"cannot load evalkit's kernel library {path}: {e}; {_BUILD_HINT}") from e
    try:
        _declare(lib)
    except AttributeError as e:
        raise KernelLibraryError(f"evalkit's kernel library {path} is out of date ({e}); {_BUILD_HINT}") from e
    return lib


def __getattr__(name: str):
    # `_kernels.lib` stays available (loaded on first access) for callers of the old name.
    if name == "lib":
        return get_lib()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def status_message(code: int) -> str:
    """Human-readable text for an ek_status code."""
    return _STATUS.get(code, f"kernel error {code}")


def check_status(rc: int, what: str) -> None:
    """Raise for a failed kernel call: MemoryError for EK_ERR_NO_MEMORY, else RuntimeError.

    ``what`` names the operation and type, e.g. ``"quantize IQ2_KT"``.
    """
    if rc == 0:
        return
    if rc == EK_ERR_NO_MEMORY:
        raise MemoryError(f"{what}: the kernel library ran out of memory (status {rc})")
    raise RuntimeError(f"{what}: {status_message(rc)}")


def has_quantize(type_id: int) -> bool:
    """True when the library has a quantizer for this ggml type id."""
    return bool(get_lib().ek_has_quantize(type_id))


def has_dequantize(type_id: int) -> bool:
    """True when the library has a dequantizer for this ggml type id."""
    return bool(get_lib().ek_has_dequantize(type_id))


def format_info(type_id: int) -> tuple[int, int, int] | None:
    """(block_size, type_size, header_bytes) the library uses for a type id; None if unknown to it."""
    bs, ts, hb = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    rc = get_lib().ek_format_info(type_id, ctypes.byref(bs), ctypes.byref(ts), ctypes.byref(hb))
    if rc == EK_ERR_UNKNOWN_TYPE:
        return None
    check_status(rc, f"format_info {type_id}")
    return bs.value, ts.value, hb.value
