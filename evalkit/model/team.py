"""torch's OpenMP thread team, lent to evalkit's C kernels.

torch runs its parallel regions on an OpenMP team whose threads keep spinning for
milliseconds after each region, waiting for the next one. Threads of our own started
next to them share the cores with those spinners and run at about half speed (the
2-thread forward measured 15-40 % slower that way), and a second OpenMP team makes
libgomp throttle every team for the rest of the process (20 % slower). So the kernels
take a "team runner" with GOMP_parallel's signature: passing the one in torch's own
OpenMP runtime makes the work run on torch's threads, which are already spinning and
pick it up at once.

:func:`team` says how the calling thread should run kernel work: with torch's thread
count on torch's team (the main thread, an OpenMP build of torch), or on the calling
thread alone (any other thread: a parallel region there would start a second team).
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import threading

import torch

__all__ = ["team", "runner"]

# libgomp (Linux wheels), LLVM libomp (macOS) and Intel's libiomp5 all export GOMP_parallel.
_OPENMP_LIB = re.compile(r"lib(gomp|omp|iomp5)[-.\w]*\.(so[.\d]*|dylib)$")


def _openmp_paths() -> list[str]:
    """Loaded OpenMP runtimes, torch's own lib directory first."""
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.rsplit(None, 1)[-1]
                if p.startswith("/") and _OPENMP_LIB.search(os.path.basename(p)) and p not in paths:
                    paths.append(p)
    except OSError:
        pass
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    if os.path.isdir(torch_lib):
        for name in sorted(os.listdir(torch_lib)):
            p = os.path.join(torch_lib, name)
            if _OPENMP_LIB.search(name) and p not in paths:
                paths.append(p)
    return sorted(paths, key=lambda p: not p.startswith(torch_lib))


def runner() -> int | None:
    """Address of GOMP_parallel in the OpenMP runtime torch runs on, or None (not an
    OpenMP build of torch, or the runtime was not found)."""
    return _lookup()[1]


@functools.cache
def _lookup() -> tuple[bool, int | None]:
    """(torch's parallel backend is OpenMP, GOMP_parallel's address or None), found once."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return False, None
    for path in _openmp_paths():
        try:
            fn = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError):
            continue
        return True, ctypes.cast(fn, ctypes.c_void_p).value
    return True, None


def team() -> tuple[int, int | None]:
    """(threads, runner) for kernel work issued by the calling thread.

    The main thread gets torch's thread count and torch's team (runner), other threads
    one thread. Without an OpenMP runtime to borrow, an OpenMP torch also gets one
    thread; a torch on another thread pool lets the kernels start their own threads.
    """
    n = torch.get_num_threads()
    if n <= 1 or threading.current_thread() is not threading.main_thread():
        return 1, None
    openmp, r = _lookup()
    if r is None and openmp:
        return 1, None
    return n, r
