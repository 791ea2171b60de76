"""The process heap: give freed memory back to the OS, so a long run's RSS is what it holds.

glibc keeps freed heap pages (and, after a large block is freed, raises its mmap threshold so
that the next blocks of that size come from the heap too, where they stay after being freed).
A run that loads models one after another and allocates tens of MiB of temporaries per chunk
would otherwise keep the high-water mark of every stage. Elsewhere than glibc these do nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["bound_heap", "return_freed_memory"]

_M_MMAP_THRESHOLD = -3          # mallopt parameter numbers of glibc's malloc.h
# Blocks of this size and more get pages of their own, returned to the OS when freed: the
# per-chunk temporaries (MiBs) do; Python's and torch's small objects stay on the heap.
_MMAP_THRESHOLD = 1 << 20


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallopt, lib.malloc_trim       # both glibc: absent elsewhere (AttributeError)
        return lib
    except (OSError, AttributeError):
        return None


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (no dynamic raise); True where it took effect."""
    lib = _libc()
    return bool(lib is not None and lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1)


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
