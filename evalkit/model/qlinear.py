"""Linear layers and embeddings that multiply straight out of packed quantized bytes.

``evalkit::qlinear`` computes ``x @ W.T`` in float32 where W exists only as its packed
ggml rows (a uint8 tensor (out_rows, row_bytes), usually a zero-copy view of a GGUF
memory map). Tiles of W's rows are dequantized by the C kernels into a float32 buffer
that is reused across calls (one per thread), and each tile is multiplied by torch's
GEMM straight into its columns of the output. The float32 copy of a large weight is
therefore never materialised, and the only error in the result is the weights' own
(plus float32 GEMM rounding).

Which dequantizer: the matrix-multiplication one of the reference ("inference" variant:
IQ6_K's integer table, the KT types' inference scale factors); token embeddings use the
reference's ``get_rows``, i.e. the CPU ``to_float`` (IQ6_K's cubic).

F32 weights are multiplied in place (a float32 view of the bytes). F16/BF16 tiles are
widened by torch, which is exact (every half/bfloat16 value is a float32), so it gives
the same values as the C converters, only vectorised.

Threads: with ``torch.get_num_threads()`` = T > 1 the weight rows are split into T ranges
worked on at once by T single-threaded (dequantize + GEMM) threads ("split" mode, see
below); with T = 1, or where torch's MKL/OpenMP per-thread controls are not reachable,
tiles are processed one after the other with all threads ("serial" mode). The two agree
to float32 GEMM rounding (bit for bit in every run we made).
"""
from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch
from torch import nn

from evalkit import _kernels
from evalkit.codec import DEQUANT_VARIANTS
from evalkit.formats import FORMATS_BY_ID, QuantFormat, get_format

__all__ = ["qlinear", "qembedding", "QLinear", "QEmbedding", "packed_tensor", "tile_rows_for",
           "TILE_ELEMENTS"]

_F32, _F16, _BF16 = 0, 1, 30
_TORCH_FLOAT = {_F16: torch.float16, _BF16: torch.bfloat16}

# Elements (rows x n_per_row) dequantized per tile (8 MiB of float32 per thread). Tiles
# this large amortise the per-call costs of the dequantizer and the GEMM; on 2 cores,
# 2 Mi elements beat 256 Ki..1 Mi by 2-10 % (bench/forward.py shapes, Q4_1).
TILE_ELEMENTS = 1 << 21
_MIN_TILE_ROWS = 64

_tls = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements owned by the calling thread."""
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.numel() < numel:
        # a normal tensor (not an inference one), so later calls in any grad mode may write it
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=torch.float32)
        _tls.buf = buf
    return buf[:numel]


def tile_rows_for(n_per_row: int, n_rows: int) -> int:
    """Rows of W dequantized per tile for rows of ``n_per_row`` elements."""
    rows = max(_MIN_TILE_ROWS, TILE_ELEMENTS // max(1, n_per_row))
    if rows >= n_rows:
        return n_rows
    # Split evenly so the last tile is not a sliver (keeps GEMM shapes efficient).
    n_tiles = -(-n_rows // rows)
    return -(-n_rows // n_tiles)


def _dequant_threads() -> int:
    return max(1, torch.get_num_threads())


# --------------------------------------------------------------------------- row-split workers
#
# With T torch threads, a qlinear call is split into T contiguous row ranges, each done by
# one thread that dequantizes its tiles and multiplies them with a *single-threaded* GEMM
# into its columns of the output. Dequantization and GEMM then run on every core at once,
# with no thread start-up per call and no fight between the C library's threads and
# torch's OpenMP team (measured on 2 cores: the C threads ran at half speed next to
# OpenMP's spinning workers, and "split" beat "serial" by 5-30 % per op).
# A single-threaded GEMM in one thread needs MKL's per-thread setting and libgomp's
# per-thread ICV; where this torch build does not expose them the op runs "serial":
# dequantize a tile with the C library's threads, then multiply it with torch's.

def _loaded_library(fragment: str) -> str | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if fragment in path.rsplit("/", 1)[-1]:
                    return path
    except OSError:
        pass
    return None


def _load_thread_controls():
    """(mkl_set_num_threads_local, omp_set_num_threads, omp_get_max_threads) of torch's runtime, or None."""
    import ctypes
    try:
        cpu, gomp = _loaded_library("libtorch_cpu"), _loaded_library("libgomp")
        if cpu is None or gomp is None:
            return None
        mkl_local = ctypes.CDLL(cpu).MKL_Set_Num_Threads_Local     # the C (by-value) entry point
        mkl_local.argtypes, mkl_local.restype = [ctypes.c_int], ctypes.c_int
        g = ctypes.CDLL(gomp)
        omp_set, omp_get = g.omp_set_num_threads, g.omp_get_max_threads
        omp_set.argtypes, omp_set.restype = [ctypes.c_int], None
        omp_get.argtypes, omp_get.restype = [], ctypes.c_int
        return mkl_local, omp_set, omp_get
    except (OSError, AttributeError):
        return None


_THREAD_CONTROLS = _load_thread_controls()
# "split" (row ranges on single-threaded workers) or "serial" (tile after tile, all threads).
MODE = "split" if _THREAD_CONTROLS is not None else "serial"


class _Workers:
    """Persistent helper threads whose torch / MKL / OpenMP work runs single-threaded."""

    def __init__(self):
        self.pool = None
        self.size = 0
        self.lock = threading.Lock()

    @staticmethod
    def _init():
        mkl_local, omp_set, _ = _THREAD_CONTROLS
        torch.ones(1 << 16).sum()          # torch's lazy per-thread thread setup runs first ...
        omp_set(1)                         # ... so that these stay
        mkl_local(1)

    def get(self, n: int):
        """A pool of at least ``n`` workers."""
        from concurrent.futures import ThreadPoolExecutor
        with self.lock:
            if self.pool is None or self.size < n:
                if self.pool is not None:
                    self.pool.shutdown(wait=False)
                self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="evalkit-qlinear",
                                               initializer=self._init)
                self.size = n
            return self.pool

    def forget(self):
        """After fork: the parent's threads do not exist in the child."""
        self.pool, self.size, self.lock = None, 0, threading.Lock()


_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WORKERS.forget)


def _run_rows(x2, w, fmt, n, out, r0, r1, tile, variant):
    """Dequantize rows [r0, r1) of w tile by tile and multiply into out[:, r0:r1] (one thread)."""
    buf = _scratch(tile * n)
    # inference mode is per thread: follow the caller's, or writing into `out` is refused
    with torch.inference_mode(out.is_inference()):
        for s in range(r0, r1, tile):
            e = min(r1, s + tile)
            wt = buf[:(e - s) * n].view(e - s, n)
            _dequantize_rows(w[s:e], fmt, n, wt, variant, 1)
            # The output slice has strides (out_rows, 1): BLAS writes it in place (ldc).
            torch.mm(x2, wt.t(), out=out[:, s:e])


def _split_matmul(x2, w, fmt, n, out, tile, variant, nthreads):
    rows = w.shape[0]
    n_tiles = -(-rows // tile)
    parts = min(nthreads, n_tiles)
    bounds = [min(rows, (n_tiles * i // parts) * tile) for i in range(parts)] + [rows]
    futures = []
    if parts > 1:
        pool = _WORKERS.get(parts - 1)
        futures = [pool.submit(_run_rows, x2, w, fmt, n, out, bounds[i], bounds[i + 1], tile, variant)
                   for i in range(1, parts)]
    mkl_local, omp_set, omp_get = _THREAD_CONTROLS
    prev_omp = omp_get()
    prev_mkl = mkl_local(1)                  # this thread's share runs single-threaded too
    omp_set(1)
    try:
        _run_rows(x2, w, fmt, n, out, bounds[0], bounds[1], tile, variant)
    finally:
        mkl_local(prev_mkl)                  # (0 restores "follow the global setting")
        omp_set(prev_omp)
        for f in futures:
            f.result()


def _fmt(type_id: int) -> QuantFormat:
    fmt = FORMATS_BY_ID.get(int(type_id))
    if fmt is None:
        raise ValueError(f"qlinear: unknown ggml type id {type_id}")
    return fmt


def _check_packed(w: torch.Tensor, fmt: QuantFormat, n_per_row: int, what: str) -> None:
    if w.dtype != torch.uint8 or w.dim() != 2:
        raise TypeError(f"{what}: packed weight must be a 2-D uint8 tensor (rows, row_bytes), "
                        f"got {w.dtype} of shape {tuple(w.shape)}")
    rb = fmt.row_bytes(n_per_row)
    if w.shape[1] != rb:
        raise ValueError(f"{what}: packed rows are {w.shape[1]} bytes but a {fmt.name} row of "
                         f"{n_per_row} elements takes {rb} bytes")
    if not w.is_contiguous():
        raise ValueError(f"{what}: packed weight must be contiguous")
    if fmt.type_id not in (_F32, _F16, _BF16) and not fmt.can_dequantize:
        raise NotImplementedError(f"{what}: {fmt.name} has no dequantizer in this build of the kernels")


def _dequantize_rows(w: torch.Tensor, fmt: QuantFormat, n: int, out: torch.Tensor, variant: int,
                     nthreads: int) -> None:
    """Dequantize all rows of the packed (contiguous) ``w`` into the contiguous float32 ``out``."""
    rows = w.shape[0]
    if rows == 0:
        return
    if fmt.type_id == _F32:
        out.view(torch.uint8).view(rows, n * 4).copy_(w)
    elif fmt.type_id in _TORCH_FLOAT:
        out.view(rows, n).copy_(w.view(_TORCH_FLOAT[fmt.type_id]))
    else:
        rc = _kernels.lib.ek_dequantize(fmt.type_id, w.data_ptr(), out.data_ptr(), rows, n, nthreads, variant)
        if rc != 0:
            raise RuntimeError(f"dequantize {fmt.name}: {_kernels.status_message(rc)}")


def _f32_view(w: torch.Tensor, n: int) -> torch.Tensor | None:
    """W as a float32 (rows, n) view of its bytes, when alignment allows (zero-copy)."""
    if w.data_ptr() % 4:
        return None
    return w.view(torch.float32).view(w.shape[0], n)


@torch.library.custom_op("evalkit::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, w: torch.Tensor, type_id: int, n_per_row: int, variant: int) -> torch.Tensor:
    """``x @ W.T`` for float32 x (..., n_per_row) and W packed as ggml ``type_id`` rows (out, row_bytes).

    ``variant`` is 0 (reference to_float) or 1 (reference matmul dequantizer). Returns (..., out).
    """
    fmt = _fmt(type_id)
    _check_packed(w, fmt, n_per_row, "qlinear")
    if x.dtype != torch.float32:
        raise TypeError(f"qlinear: activations must be float32, got {x.dtype}")
    if x.shape[-1] != n_per_row:
        raise ValueError(f"qlinear: activations have {x.shape[-1]} features, weight rows have {n_per_row}")
    out_rows = w.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, n_per_row)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if fmt.type_id == _F32:
        wf = _f32_view(w, n_per_row)
        if wf is not None:
            return torch.mm(x2, wf.t()).reshape(*lead, out_rows)
    out = torch.empty((x2.shape[0], out_rows), dtype=torch.float32)
    nthreads = _dequant_threads()
    if MODE == "split" and nthreads > 1:
        tile = tile_rows_for(n_per_row, -(-out_rows // nthreads))
        _split_matmul(x2, w, fmt, n_per_row, out, tile, variant, nthreads)
        return out.reshape(*lead, out_rows)
    tile = tile_rows_for(n_per_row, out_rows)
    buf = _scratch(tile * n_per_row)
    for r0 in range(0, out_rows, tile):
        r1 = min(out_rows, r0 + tile)
        wt = buf[:(r1 - r0) * n_per_row].view(r1 - r0, n_per_row)
        _dequantize_rows(w[r0:r1], fmt, n_per_row, wt, variant, nthreads)
        # The output slice has strides (out_rows, 1): BLAS writes it in place (ldc).
        torch.mm(x2, wt.t(), out=out[:, r0:r1])
    return out.reshape(*lead, out_rows)


@qlinear.register_fake
def _qlinear_fake(x, w, type_id, n_per_row, variant):
    torch._check(x.shape[-1] == n_per_row)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("evalkit::qembedding", mutates_args=())
def qembedding(ids: torch.Tensor, w: torch.Tensor, type_id: int, n_per_row: int, variant: int) -> torch.Tensor:
    """Rows ``ids`` (any shape, int64) of the packed table W, dequantized: (*ids.shape, n_per_row).

    Only the requested rows are dequantized (the reference's ``get_rows``; use variant 0).
    """
    fmt = _fmt(type_id)
    _check_packed(w, fmt, n_per_row, "qembedding")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"qembedding: ids must be int32/int64, got {ids.dtype}")
    flat = ids.reshape(-1).to(torch.int64)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= w.shape[0]:
            bad = lo if lo < 0 else hi
            raise IndexError(f"qembedding: token id {bad} out of range [0, {w.shape[0]})")
    rows = w.index_select(0, flat)  # (n, row_bytes), contiguous packed copies of the rows
    out = torch.empty((flat.numel(), n_per_row), dtype=torch.float32)
    _dequantize_rows(rows, fmt, n_per_row, out, variant, _dequant_threads())
    return out.reshape(*ids.shape, n_per_row)


@qembedding.register_fake
def _qembedding_fake(ids, w, type_id, n_per_row, variant):
    return ids.new_empty((*ids.shape, n_per_row), dtype=torch.float32)


def packed_tensor(data) -> torch.Tensor:
    """A uint8 torch tensor sharing memory with packed bytes (numpy array or tensor), no copy.

    Read-only memory maps are wrapped too: torch warns that it cannot enforce read-only,
    and evalkit never writes through these tensors.
    """
    if isinstance(data, torch.Tensor):
        return data if data.dtype == torch.uint8 else data.contiguous().view(torch.uint8)
    arr = np.asarray(data)
    if arr.dtype != np.uint8:
        raise TypeError(f"packed_tensor: expected uint8 bytes, got {arr.dtype}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


def _variant_id(variant: str | int) -> int:
    if isinstance(variant, str):
        if variant not in DEQUANT_VARIANTS:
            raise ValueError(f"unknown dequantization variant {variant!r}; choose one of {list(DEQUANT_VARIANTS)}")
        return DEQUANT_VARIANTS[variant]
    return int(variant)


class QLinear(nn.Module):
    """A bias-optional linear layer whose weight stays packed in a ggml type.

    ``weight`` is the packed uint8 tensor (out_features, row_bytes) (a buffer, never a
    parameter); ``bias`` an optional float32 (out_features,) tensor.
    """

    def __init__(self, packed, type_name: str | int, in_features: int, bias: torch.Tensor | None = None,
                 variant: str | int = "inference"):
        super().__init__()
        fmt = get_format(type_name)
        w = packed_tensor(packed)
        _check_packed(w, fmt, in_features, f"QLinear({fmt.name})")
        self.type_id = fmt.type_id
        self.type_name = fmt.name
        self.in_features = int(in_features)
        self.out_features = int(w.shape[0])
        self.variant = _variant_id(variant)
        self.register_buffer("weight", w, persistent=False)
        if bias is not None:
            bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
            if bias.numel() != self.out_features:
                raise ValueError(f"QLinear: bias has {bias.numel()} entries, expected {self.out_features}")
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) float32 -> (..., out_features)."""
        y = torch.ops.evalkit.qlinear(x, self.weight, self.type_id, self.in_features, self.variant)
        if self.bias is not None:
            y = y + self.bias
        return y

    def dequantized(self) -> torch.Tensor:
        """The full float32 weight (out_features, in_features); for tests and small layers only."""
        fmt = get_format(self.type_id)
        out = torch.empty((self.out_features, self.in_features), dtype=torch.float32)
        _dequantize_rows(self.weight, fmt, self.in_features, out, self.variant, _dequant_threads())
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}, "
                f"bias={self.bias is not None}")


class QEmbedding(nn.Module):
    """Token-embedding table kept packed; a lookup dequantizes only the requested rows."""

    def __init__(self, packed, type_name: str | int, embedding_dim: int, variant: str | int = "to_float"):
        super().__init__()
        fmt = get_format(type_name)
        w = packed_tensor(packed)
        _check_packed(w, fmt, embedding_dim, f"QEmbedding({fmt.name})")
        self.type_id = fmt.type_id
        self.type_name = fmt.name
        self.embedding_dim = int(embedding_dim)
        self.num_embeddings = int(w.shape[0])
        self.variant = _variant_id(variant)
        self.register_buffer("weight", w, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int64 -> (..., embedding_dim) float32."""
        return torch.ops.evalkit.qembedding(ids, self.weight, self.type_id, self.embedding_dim, self.variant)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type_name}"
