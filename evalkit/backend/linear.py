"""The emulated backend's matmul and K/V cache: drop-in replacements for the model's modules.

:class:`EmulatedLinear` wraps a :class:`~evalkit.model.qlinear.QLinear` and multiplies the
way the reference CPU backend does (docs/backend-ik-cpu.md §2-§5): the activation rows are
rounded to the weight type's ``vec_dot_type`` (Q8_2_X4 / Q8_K / BF16) by a compiled kernel,
and the weight tiles are either dequantized exactly (the inference variant, as evalkit's
exact forward) or converted as the reference converts them (Q8_K_R16, Q8_1_R8, ...), also by
a compiled kernel, before torch's GEMM. Which of the two happens depends on the number of
tokens of the reference's ubatch that each row belongs to, which :class:`UbatchPlan` knows.

:class:`HalfKVAttention` rounds keys (after RoPE) and values to fp16 before attention, as the
reference stores them in its f16 K/V cache (§7).
"""
from __future__ import annotations

import threading
import weakref

import numpy as np
import torch
from torch import nn

from evalkit import _kernels
from evalkit.backend.kernels import convert_rows_into, quantize_rows_into
from evalkit.backend.rules import ACT_F32, Profile, activation_kind, converts
from evalkit.model.qlinear import QLinear, tile_rows_for
from evalkit.model.team import team

__all__ = ["EmulatedLinear", "HalfKVAttention", "UbatchPlan"]

_F32, _F16, _BF16 = 0, 1, 30
_TORCH_FLOAT = {_F16: torch.float16, _BF16: torch.bfloat16}
_tls = threading.local()


def _scratch(name: str, numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` elements owned by the calling thread."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = bufs[name] = torch.empty(numel, dtype=torch.float32)
    return buf[:numel]


class UbatchPlan:
    """How llama-perplexity cuts the evaluated tokens into ubatches, hence Ny of every matmul row.

    ``mode`` "kld" (``--kl-divergence``): every chunk is decoded on its own, in batches of
    min(batch, n_ctx) tokens, each split into ubatches of ``ubatch`` tokens. "ppl" (plain
    perplexity): the chunks of one forward call are decoded together (n_batch / n_ctx
    sequences), and their concatenation is split into ubatches. The forward callable sets
    ``n_ctx`` before each call.
    """

    def __init__(self, ubatch: int = 512, batch: int = 2048, mode: str = "kld"):
        if mode not in ("kld", "ppl"):
            raise ValueError(f"UbatchPlan: mode must be 'kld' or 'ppl', got {mode!r}")
        self.ubatch, self.batch, self.mode = int(ubatch), int(batch), mode
        self.n_ctx: int | None = None
        self.activations = ActivationCache()

    def row_tokens(self, n_seq: int, n_rows: int) -> np.ndarray:
        """Ny of each of the n_seq × n_rows activation rows, the rows being the last
        ``n_rows`` positions of each sequence of ``n_ctx`` tokens (b-major)."""
        T = self.n_ctx if self.n_ctx is not None else n_rows
        t = np.arange(T - n_rows, T)
        if self.mode == "ppl" and self.batch >= T:
            flat = (np.arange(n_seq)[:, None] * T + t[None, :]).ravel()
            size = n_seq * T
            ub = min(self.ubatch, size)
            return np.minimum(ub, size - (flat // ub) * ub)
        nb = min(self.batch, T)
        start = (t // nb) * nb
        size = np.minimum(nb, T - start)
        ub = min(self.ubatch, nb)
        off = t - start
        return np.tile(np.minimum(ub, size - (off // ub) * ub), n_seq)


class ActivationCache:
    """The last rounded activations of each kind, reused while the same input tensor feeds
    several layers (Q, K and V share one normalised input, so do FFN up and gate; the
    reference likewise quantizes a shared ``src1`` once, §2.1). An entry is valid only for
    the very tensor object it was computed from (a weak reference), and only while a sample
    of its values is unchanged: the forward pass's activations are inference tensors, which
    have no version counter to tell an in-place change."""

    _SAMPLE = 4096

    def __init__(self):
        self._entries: dict[int, tuple] = {}

    def _sample(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1)
        return flat[:: max(1, flat.numel() // self._SAMPLE)].clone()

    def get(self, x: torch.Tensor, kind: int) -> torch.Tensor | None:
        """The cached rounding of ``x`` as ``kind``, or None."""
        e = self._entries.get(kind)
        if e is None or e[0]() is not x or not torch.equal(e[1], self._sample(x)):
            return None
        return e[2]

    def put(self, x: torch.Tensor, kind: int, a: torch.Tensor) -> None:
        """Remember ``a`` as the rounding of ``x`` (replacing the previous entry of ``kind``)."""
        self._entries[kind] = (weakref.ref(x), self._sample(x), a)


class EmulatedLinear(nn.Module):
    """A :class:`QLinear` multiplied with the reference CPU backend's arithmetic.

    ``fused``: the layer is one half of the fused FFN up/gate op (converted without the
    thread condition). ``n_threads``: the backend's thread count (the ``Nx/nth >= 32`` rule).
    """

    def __init__(self, base: QLinear, profile: Profile, n_threads: int, plan: UbatchPlan, fused: bool = False,
                 role: str = ""):
        super().__init__()
        self.base, self.profile, self.n_threads, self.plan = base, profile, int(n_threads), plan
        self.fused, self.role = bool(fused), role
        self.act_kind = activation_kind(base.type_id, profile)
        self._decisions: dict[int, bool] = {}

    def converted(self, n_tokens: int) -> bool:
        """Whether the reference re-encodes this layer's weights for a ubatch of ``n_tokens``."""
        if n_tokens not in self._decisions:
            self._decisions[n_tokens] = converts(self.base.type_id, self.base.out_features, n_tokens,
                                                 self.n_threads, self.fused, self.profile)
        return self._decisions[n_tokens]

    def activations(self, x2: torch.Tensor, converted: bool, source: torch.Tensor | None = None) -> torch.Tensor:
        """The activation rows the GEMM multiplies: x2 rounded to the weight type's vec_dot_type
        (shared with the other layers fed by the same ``source`` tensor; do not modify it). A
        subclass may return other rows, e.g. to emulate a faulty kernel in a test."""
        if self.act_kind == ACT_F32:
            return x2
        cache = self.plan.activations
        a = cache.get(source, self.act_kind) if source is not None else None
        if a is None or a.shape != x2.shape:
            a = _scratch(f"act{self.act_kind}", x2.numel()).view(x2.shape)
            quantize_rows_into(x2, a, self.act_kind, *team())
            if source is not None:
                cache.put(source, self.act_kind, a)
        return a

    def _weights_into(self, r0: int, r1: int, converted: bool, out: torch.Tensor) -> None:
        """Rows r0..r1 of the effective weight (converted or exactly dequantized) into ``out``."""
        b = self.base
        w = b.weight[r0:r1]
        if b.type_id in _TORCH_FLOAT:
            out.copy_(w.view(_TORCH_FLOAT[b.type_id]))
        elif b.type_id == _F32:
            out.view(torch.uint8).view(r1 - r0, b.in_features * 4).copy_(w)
        elif converted:
            convert_rows_into(w, b.type_id, b.in_features, out, *team())
        else:
            rc = _kernels.get_lib().ek_dequantize_team(b.type_id, w.data_ptr(), out.data_ptr(), r1 - r0,
                                                       b.in_features, b.variant, *team())
            _kernels.check_status(rc, f"dequantize type {b.type_id}")

    def _matmul(self, x2: torch.Tensor, out2: torch.Tensor, converted: bool, source=None) -> None:
        """out2 (M, out) = activations(x2) @ W_eff.T, W_eff tile by tile."""
        a = self.activations(x2, converted, source)
        K, n_out = self.base.in_features, self.base.out_features
        tile = tile_rows_for(K, n_out)
        buf = _scratch("w", tile * K)
        for r0 in range(0, n_out, tile):
            r1 = min(n_out, r0 + tile)
            wt = buf[:(r1 - r0) * K].view(r1 - r0, K)
            self._weights_into(r0, r1, converted, wt)
            torch.mm(a, wt.t(), out=out2[:, r0:r1])

    def _row_conversions(self, n_seq: int, n_rows: int) -> np.ndarray:
        """Per activation row: is the weight converted for the ubatch that row belongs to."""
        ny = self.plan.row_tokens(n_seq, n_rows)
        sizes = np.unique(ny)
        if len(sizes) == 1:
            return np.full(len(ny), self.converted(int(sizes[0])))
        return np.isin(ny, [n for n in sizes if self.converted(int(n))])

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, in) or (T, in) float32 → (..., out), into ``out`` when given."""
        b = self.base
        lead = x.shape[:-1]
        n_seq, n_rows = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, x.reshape(-1, b.in_features).shape[0])
        x2 = x.reshape(-1, b.in_features).contiguous()
        y = out if out is not None else torch.empty((*lead, b.out_features), dtype=torch.float32)
        out2 = y.view(-1, b.out_features)
        conv = self._row_conversions(n_seq, n_rows)
        if conv.all() or not conv.any():
            self._matmul(x2, out2, bool(conv.any()), x)
        else:                                   # rows of ubatches on both sides of a threshold
            for flag in (False, True):
                idx = torch.from_numpy(np.flatnonzero(conv == flag))
                part = torch.empty((len(idx), b.out_features), dtype=torch.float32)
                self._matmul(x2.index_select(0, idx), part, flag)
                out2.index_copy_(0, idx, part)
        return y if b.bias is None else y.add_(b.bias)

    def extra_repr(self) -> str:
        return (f"{self.base.extra_repr()}, backend={self.profile.name}, threads={self.n_threads}, "
                f"fused={self.fused}")


class HalfKVAttention:
    """Attention over keys and values rounded to fp16, as the reference's f16 K/V cache holds
    them (store: round to nearest even; every position, itself included, reads them back).
    Queries stay float32. Wraps the model's attention callable."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
                 q_from: int = 0) -> torch.Tensor:
        """As the wrapped attention; ``k`` and ``v`` are rounded in place (the block does not
        use them afterwards)."""
        k.copy_(k.to(torch.float16))
        v.copy_(v.to(torch.float16))
        return self.inner(q, k, v, out=out, q_from=q_from)
