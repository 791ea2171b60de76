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

Threads: each tile is dequantized by the C kernels on torch's own OpenMP team (see
:mod:`evalkit.model.team`: torch's threads are spinning anyway, and threads of our own
beside them would run at half speed), then multiplied by torch's GEMM on the same team.
Off the main thread the dequantization runs on the calling thread alone.

Devices: on any non-CPU device (and on the CPU when forced, see :mod:`evalkit.devices`)
the same ops dequantize each tile with the torch dequantizers of
:mod:`evalkit.formats.torch_dequant` (bit-identical to the C kernels) on the weight's
device and multiply with torch's GEMM there; the C-kernel path above is unchanged.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np
import torch
from torch import nn

from evalkit import _kernels
from evalkit.codec import DEQUANT_VARIANTS
from evalkit.devices import use_torch_kernels
from evalkit.formats import FORMATS_BY_ID, QuantFormat, get_format
from evalkit.formats.torch_dequant import TORCH_DEQUANTIZERS, dequantize_torch
from evalkit.model.ops import call, evalkit_op
from evalkit.model.team import team

__all__ = ["qlinear", "qlinear_out", "qembedding", "QLinear", "QEmbedding", "packed_tensor", "tile_rows_for",
           "TILE_ELEMENTS"]

_F32, _F16, _BF16 = 0, 1, 30
_TORCH_FLOAT = {_F16: torch.float16, _BF16: torch.bfloat16}

# Elements (rows x n_per_row) dequantized per tile (8 MiB of float32 per thread). Tiles
# this large amortise the per-call costs of the dequantizer and the GEMM; on 2 cores,
# 2 Mi elements beat 256 Ki..1 Mi by 2-10 % (bench/forward.py shapes, Q4_1).
TILE_ELEMENTS = 1 << 21
_MIN_TILE_ROWS = 64
# Off the CPU a tile is dequantized by a few dozen elementwise kernels: larger tiles
# amortise their launches (16 Mi elements: 64 MiB of float32 plus the integer temporaries).
DEVICE_TILE_ELEMENTS = 1 << 24

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


def tile_rows_for(n_per_row: int, n_rows: int, elements: int | None = None) -> int:
    """Rows of W dequantized per tile for rows of ``n_per_row`` elements (tiles of about
    ``elements`` weights, default :data:`TILE_ELEMENTS`)."""
    rows = max(_MIN_TILE_ROWS, (TILE_ELEMENTS if elements is None else elements) // max(1, n_per_row))
    if rows >= n_rows:
        return n_rows
    # Split evenly so the last tile is not a sliver (keeps GEMM shapes efficient).
    n_tiles = -(-n_rows // rows)
    return -(-n_rows // n_tiles)


def _fmt(type_id: int) -> QuantFormat:
    fmt = FORMATS_BY_ID.get(int(type_id))
    if fmt is None:
        raise ValueError(f"qlinear: unknown ggml type id {type_id}")
    return fmt


def _check_packed(w: torch.Tensor, fmt: QuantFormat, n_per_row: int, what: str, torch_path: bool = False) -> None:
    if w.dtype != torch.uint8 or w.dim() != 2:
        raise TypeError(f"{what}: packed weight must be a 2-D uint8 tensor (rows, row_bytes), "
                        f"got {w.dtype} of shape {tuple(w.shape)}")
    rb = fmt.row_bytes(n_per_row)
    if w.shape[1] != rb:
        raise ValueError(f"{what}: packed rows are {w.shape[1]} bytes but a {fmt.name} row of "
                         f"{n_per_row} elements takes {rb} bytes")
    if not w.is_contiguous():
        raise ValueError(f"{what}: packed weight must be contiguous")
    if torch_path:
        if fmt.name not in TORCH_DEQUANTIZERS:
            raise NotImplementedError(f"{what}: {fmt.name} has no torch dequantizer")
    elif fmt.type_id not in (_F32, _F16, _BF16) and not fmt.can_dequantize:
        raise NotImplementedError(f"{what}: {fmt.name} has no dequantizer in this build of the kernels")


def _dequantize_rows(w: torch.Tensor, fmt: QuantFormat, n: int, out: torch.Tensor, variant: int,
                     nthreads: int = 1, runner: int | None = None) -> None:
    """Dequantize all rows of the packed (contiguous) ``w`` into the contiguous float32 ``out``,
    on ``nthreads`` threads of the team ``runner`` (:func:`evalkit.model.team.team`)."""
    rows = w.shape[0]
    if rows == 0:
        return
    if fmt.type_id == _F32:
        out.view(torch.uint8).view(rows, n * 4).copy_(w)
    elif fmt.type_id in _TORCH_FLOAT:
        out.view(rows, n).copy_(w.view(_TORCH_FLOAT[fmt.type_id]))
    else:
        rc = _kernels.get_lib().ek_dequantize_team(fmt.type_id, w.data_ptr(), out.data_ptr(), rows, n, variant,
                                                   nthreads, runner)
        if rc != 0:
            raise RuntimeError(f"dequantize {fmt.name}: {_kernels.status_message(rc)}")


def _f32_view(w: torch.Tensor, n: int) -> torch.Tensor | None:
    """W as a float32 (rows, n) view of its bytes, when alignment allows (zero-copy)."""
    if w.data_ptr() % 4:
        return None
    return w.view(torch.float32).view(w.shape[0], n)


def _check_activations(x: torch.Tensor, n_per_row: int, what: str) -> None:
    if x.dtype != torch.float32:
        raise TypeError(f"{what}: activations must be float32, got {x.dtype}")
    if x.shape[-1] != n_per_row:
        raise ValueError(f"{what}: activations have {x.shape[-1]} features, weight rows have {n_per_row}")


def _matmul_into(x2: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, n_per_row: int, out: torch.Tensor,
                 variant: int) -> None:
    """out (M, out_rows) = x2 (M, n_per_row) @ W.T, W dequantized tile by tile (out contiguous)."""
    out_rows = w.shape[0]
    if fmt.type_id == _F32:
        wf = _f32_view(w, n_per_row)
        if wf is not None:
            torch.mm(x2, wf.t(), out=out)
            return
    tile = tile_rows_for(n_per_row, out_rows)
    buf = _scratch(tile * n_per_row)
    nthreads, runner = team()
    for r0 in range(0, out_rows, tile):
        r1 = min(out_rows, r0 + tile)
        wt = buf[:(r1 - r0) * n_per_row].view(r1 - r0, n_per_row)
        _dequantize_rows(w[r0:r1], fmt, n_per_row, wt, variant, nthreads, runner)
        # The output slice has strides (out_rows, 1): BLAS writes it in place (ldc).
        torch.mm(x2, wt.t(), out=out[:, r0:r1])


def _rows_2d(x: torch.Tensor, n_per_row: int) -> torch.Tensor:
    x2 = x.reshape(-1, n_per_row)
    return x2 if x2.is_contiguous() else x2.contiguous()


# ------------------------------------------------------------------ torch (device) path

def _check_same_device(x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    if x.device != w.device:
        raise ValueError(f"{what}: activations are on {x.device} but the packed weight is on {w.device} "
                         "(move the model with evalkit.devices.move_to_device)")


def _matmul_into_torch(x2: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, n_per_row: int, out: torch.Tensor,
                       variant: int) -> None:
    """:func:`_matmul_into` on w's device: each tile dequantized by the torch dequantizers
    (bit-identical to the C kernels), then torch's GEMM into the tile's output columns."""
    out_rows = w.shape[0]
    if fmt.type_id == _F32:
        wf = _f32_view(w, n_per_row)
        if wf is not None:
            torch.mm(x2, wf.t(), out=out)
            return
    elements = TILE_ELEMENTS if w.device.type == "cpu" else DEVICE_TILE_ELEMENTS
    tile = tile_rows_for(n_per_row, out_rows, elements)
    for r0 in range(0, out_rows, tile):
        r1 = min(out_rows, r0 + tile)
        wt = dequantize_torch(w[r0:r1], fmt.name, n_per_row, variant)
        torch.mm(x2, wt.t(), out=out[:, r0:r1])


def _qembedding_torch(ids: torch.Tensor, w: torch.Tensor, fmt: QuantFormat, n_per_row: int,
                      variant: int) -> torch.Tensor:
    """:func:`qembedding` on w's device: the requested rows gathered there, then dequantized."""
    flat = ids.reshape(-1).to(device=w.device, dtype=torch.int64)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())       # one device sync per lookup
        if lo < 0 or hi >= w.shape[0]:
            bad = lo if lo < 0 else hi
            raise IndexError(f"qembedding: token id {bad} out of range [0, {w.shape[0]})")
    rows = w.index_select(0, flat)
    return dequantize_torch(rows, fmt.name, n_per_row, variant).reshape(*ids.shape, n_per_row)


@evalkit_op("qlinear")
def qlinear(x: torch.Tensor, w: torch.Tensor, type_id: int, n_per_row: int, variant: int) -> torch.Tensor:
    """``x @ W.T`` for float32 x (..., n_per_row) and W packed as ggml ``type_id`` rows (out, row_bytes).

    ``variant`` is 0 (reference to_float) or 1 (reference matmul dequantizer). Returns (..., out).
    """
    fmt = _fmt(type_id)
    device_path = use_torch_kernels(w)
    _check_packed(w, fmt, n_per_row, "qlinear", device_path)
    _check_activations(x, n_per_row, "qlinear")
    x2 = _rows_2d(x, n_per_row)
    if device_path:
        _check_same_device(x, w, "qlinear")
        out = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.float32, device=w.device)
        _matmul_into_torch(x2, w, fmt, n_per_row, out, variant)
        return out.reshape(*x.shape[:-1], w.shape[0])
    out = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.float32)
    _matmul_into(x2, w, fmt, n_per_row, out, variant)
    return out.reshape(*x.shape[:-1], w.shape[0])


@qlinear.register_fake
def _qlinear_fake(x, w, type_id, n_per_row, variant):
    torch._check(x.shape[-1] == n_per_row)
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@evalkit_op("qlinear_out", mutates_args=("out",))
def qlinear_out(x: torch.Tensor, w: torch.Tensor, type_id: int, n_per_row: int, variant: int,
                out: torch.Tensor) -> None:
    """:func:`qlinear` written into the caller's contiguous float32 ``out`` (..., out_rows).

    The forward pass reuses its activation buffers through this: a fresh multi-MiB result
    per call costs page faults and cold caches (about 9 % of the GEMM time on CPU).
    """
    fmt = _fmt(type_id)
    device_path = use_torch_kernels(w)
    _check_packed(w, fmt, n_per_row, "qlinear_out", device_path)
    _check_activations(x, n_per_row, "qlinear_out")
    if out.dtype != torch.float32 or not out.is_contiguous() or \
            tuple(out.shape) != (*x.shape[:-1], w.shape[0]):
        raise ValueError(f"qlinear_out: out must be a contiguous float32 tensor of shape "
                         f"{(*x.shape[:-1], w.shape[0])}, got {out.dtype} {tuple(out.shape)}")
    if device_path:
        _check_same_device(x, w, "qlinear_out")
        _check_same_device(out, w, "qlinear_out (out)")
        _matmul_into_torch(_rows_2d(x, n_per_row), w, fmt, n_per_row, out.view(-1, w.shape[0]), variant)
        return
    _matmul_into(_rows_2d(x, n_per_row), w, fmt, n_per_row, out.view(-1, w.shape[0]), variant)


@qlinear_out.register_fake
def _qlinear_out_fake(x, w, type_id, n_per_row, variant, out):
    torch._check(x.shape[-1] == n_per_row)


@evalkit_op("qembedding")
def qembedding(ids: torch.Tensor, w: torch.Tensor, type_id: int, n_per_row: int, variant: int) -> torch.Tensor:
    """Rows ``ids`` (any shape, int64) of the packed table W, dequantized: (*ids.shape, n_per_row).

    Only the requested rows are dequantized (the reference's ``get_rows``; use variant 0).
    """
    fmt = _fmt(type_id)
    device_path = use_torch_kernels(w)
    _check_packed(w, fmt, n_per_row, "qembedding", device_path)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"qembedding: ids must be int32/int64, got {ids.dtype}")
    if device_path:
        return _qembedding_torch(ids, w, fmt, n_per_row, variant)
    flat = ids.reshape(-1).to(torch.int64)
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= w.shape[0]:
            bad = lo if lo < 0 else hi
            raise IndexError(f"qembedding: token id {bad} out of range [0, {w.shape[0]})")
    rows = w.index_select(0, flat)  # (n, row_bytes), contiguous packed copies of the rows
    out = torch.empty((flat.numel(), n_per_row), dtype=torch.float32)
    _dequantize_rows(rows, fmt, n_per_row, out, variant, 1)
    return out.reshape(*ids.shape, n_per_row)


@qembedding.register_fake
def _qembedding_fake(ids, w, type_id, n_per_row, variant):
    return w.new_empty((*ids.shape, n_per_row), dtype=torch.float32)


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


class _PackedWeight(nn.Module):
    """A weight kept as packed ggml rows: ``weight`` is the uint8 tensor (rows, row_bytes), a
    buffer (never a parameter), checked against its type and row length."""

    def __init__(self, packed, type_name: str | int, n_per_row: int, variant: str | int):
        super().__init__()
        fmt = get_format(type_name)
        w = packed_tensor(packed)
        _check_packed(w, fmt, n_per_row, f"{type(self).__name__}({fmt.name})")
        self.type_id = fmt.type_id
        self.type_name = fmt.name
        self.variant = _variant_id(variant)
        self.register_buffer("weight", w, persistent=False)


class QLinear(_PackedWeight):
    """A bias-optional linear layer whose weight stays packed in a ggml type.

    ``weight`` is the packed uint8 tensor (out_features, row_bytes) (a buffer, never a
    parameter); ``bias`` an optional float32 (out_features,) tensor.
    """

    def __init__(self, packed, type_name: str | int, in_features: int, bias: torch.Tensor | None = None,
                 variant: str | int = "inference"):
        super().__init__(packed, type_name, in_features, variant)
        self.in_features = int(in_features)
        self.out_features = int(self.weight.shape[0])
        if bias is not None:
            bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
            if bias.numel() != self.out_features:
                raise ValueError(f"QLinear: bias has {bias.numel()} entries, expected {self.out_features}")
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in_features) float32 -> (..., out_features), into ``out`` when given."""
        if out is None:
            y = call("qlinear", x, self.weight, self.type_id, self.in_features, self.variant)
            return y if self.bias is None else y.add_(self.bias)
        call("qlinear_out", x, self.weight, self.type_id, self.in_features, self.variant, out)
        return out if self.bias is None else out.add_(self.bias)

    def dequantized(self) -> torch.Tensor:
        """The full float32 weight (out_features, in_features); for tests and small layers only."""
        fmt = get_format(self.type_id)
        if use_torch_kernels(self.weight):
            return dequantize_torch(self.weight, fmt.name, self.in_features, self.variant)
        out = torch.empty((self.out_features, self.in_features), dtype=torch.float32)
        _dequantize_rows(self.weight, fmt, self.in_features, out, self.variant, *team())
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}, "
                f"bias={self.bias is not None}")


class QEmbedding(_PackedWeight):
    """Token-embedding table kept packed; a lookup dequantizes only the requested rows."""

    def __init__(self, packed, type_name: str | int, embedding_dim: int, variant: str | int = "to_float"):
        super().__init__(packed, type_name, embedding_dim, variant)
        self.embedding_dim = int(embedding_dim)
        self.num_embeddings = int(self.weight.shape[0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int64 -> (..., embedding_dim) float32."""
        return call("qembedding", ids, self.weight, self.type_id, self.embedding_dim, self.variant)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type_name}"
