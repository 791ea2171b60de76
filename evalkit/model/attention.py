"""Causal grouped-query self-attention of the reference forward pass, in float32.

``evalkit::causal_attention`` computes, for query positions t >= q_from,

    out[b, t, h] = sum_{s <= t} softmax_s(q[b, t, h] . k[b, s, h // G] / sqrt(D)) v[b, s, h // G]

with G = H / Hkv query heads per key/value head. Where the CPU has AVX-512F and D is a
multiple of 16 it runs the C kernel (kernels/attention.c) on torch's own thread team
(:mod:`evalkit.model.team`); elsewhere a torch implementation of the same maths. The
kernel fuses scores, mask, softmax and P V per block of queries, so the scores never
leave L2 and no layout copies are made: on SmolLM2's shapes about 1.7x faster than the
torch path at 2 threads and 2.3x at 1 thread (bench/forward.py).

On a non-CPU device (or on the CPU when forced, see :mod:`evalkit.devices`) the op runs
torch's ``scaled_dot_product_attention`` on the tensors' device instead (the fused
kernels of a GPU), with the causal mask aligned to the last query positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from evalkit import _kernels
from evalkit.devices import use_torch_kernels
from evalkit.model.ops import call, evalkit_op
from evalkit.model.team import team

__all__ = ["causal_attention", "CausalAttention", "kernel_available"]

_BLOCK = 64          # torch path: query positions per block
_future: dict[int, torch.Tensor] = {}


def kernel_available(head_dim: int) -> bool:
    """True when the C kernel serves this head size on this CPU."""
    return bool(_kernels.get_lib().ek_has_causal_attention(int(head_dim)))


def _torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_from: int, out: torch.Tensor) -> None:
    """The same maths with torch ops: query heads folded under their kv head into the rows
    of one matrix product; blocks of queries stop at their last key (skipping the masked
    upper triangle) and only the diagonal sub-block is masked."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    qg = (q.view(B, T, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B * Hkv, T * G, D) * D ** -0.5)
    kh = k.permute(0, 2, 1, 3).reshape(B * Hkv, T, D)                                  # (B·Hkv, T, D)
    vh = v.permute(0, 2, 1, 3).reshape(B * Hkv, T, D)
    o5 = out.view(B, T - q_from, Hkv, G, D)
    if _BLOCK not in _future:                      # (block, 1, block) "key after query" mask
        _future[_BLOCK] = torch.ones(_BLOCK, _BLOCK, dtype=torch.bool).triu(1).unsqueeze(1)
    future = _future[_BLOCK]
    for s in range(q_from, T, _BLOCK):
        e = min(T, s + _BLOCK)
        n = e - s
        scores = torch.bmm(qg[:, s * G:e * G], kh[:, :e].transpose(1, 2))             # (B·Hkv, n·G, e)
        scores.view(B * Hkv, n, G, e)[..., s:e].masked_fill_(future[:n, :, :n], float("-inf"))
        o = torch.bmm(torch.softmax(scores, dim=-1), vh[:, :e])                       # (B·Hkv, n·G, D)
        o5[:, s - q_from:e - q_from] = o.view(B, Hkv, n, G, D).permute(0, 2, 1, 3, 4)


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_from: int, out: torch.Tensor) -> None:
    """The same maths through torch's scaled_dot_product_attention (the device path).

    Heads move in front of positions; each kv head is repeated for its G query heads (SDPA's
    own GQA support depends on the backend). Query t (from q_from on) sees keys s <= t: for
    q_from = 0 that is SDPA's causal mask, otherwise an explicit mask whose diagonal is
    offset by q_from (SDPA's is_causal aligns queries to the first keys, not the last).
    """
    B, T, H, D = q.shape
    G = H // k.shape[2]
    qh = q[:, q_from:].transpose(1, 2)                                                # (B, H, T', D)
    kh = k.transpose(1, 2).repeat_interleave(G, dim=1) if G > 1 else k.transpose(1, 2)   # (B, H, T, D)
    vh = v.transpose(1, 2).repeat_interleave(G, dim=1) if G > 1 else v.transpose(1, 2)
    if q_from == 0:
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=D ** -0.5)
    else:
        mask = torch.ones(T - q_from, T, dtype=torch.bool, device=q.device).tril(q_from)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=D ** -0.5)
    out.copy_(o.transpose(1, 2))                                                      # (B, T', H, D)


def _check(q, k, v, q_from, out) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.dtype != torch.float32 or t.dim() != 4 or not t.is_contiguous():
            raise ValueError(f"causal_attention: {name} must be a contiguous 4-D float32 tensor, "
                             f"got {t.dtype} {tuple(t.shape)}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if tuple(k.shape) != (B, T, Hkv, D) or tuple(v.shape) != tuple(k.shape) or Hkv == 0 or H % Hkv:
        raise ValueError(f"causal_attention: q {tuple(q.shape)} needs k and v of shape (B, T, Hkv, D) with "
                         f"Hkv dividing H; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 0 <= q_from < T:
        raise ValueError(f"causal_attention: q_from {q_from} outside [0, {T})")
    if tuple(out.shape) != (B, T - q_from, H, D):
        raise ValueError(f"causal_attention: out must have shape {(B, T - q_from, H, D)}, got {tuple(out.shape)}")


@evalkit_op("causal_attention", mutates_args=("out",))
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_from: int, out: torch.Tensor) -> None:
    """Causal attention of q (B, T, H, D) over k, v (B, T, Hkv, D) for positions >= q_from,
    written into out (B, T - q_from, H, D). All contiguous float32."""
    _check(q, k, v, q_from, out)
    B, T, H, D = q.shape
    if B == 0:
        return
    if use_torch_kernels(q):
        _sdpa_attention(q, k, v, q_from, out)
        return
    if kernel_available(D):
        nthreads, runner = team()
        rc = _kernels.get_lib().ek_causal_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, T, H,
                                                    k.shape[2], D, q_from, D ** -0.5, nthreads, runner)
        if rc != 0:
            raise RuntimeError(f"causal_attention: {_kernels.status_message(rc)}")
    else:
        _torch_attention(q, k, v, q_from, out)


@causal_attention.register_fake
def _causal_attention_fake(q, k, v, q_from, out):
    torch._check(out.shape[1] == q.shape[1] - q_from)


class CausalAttention:
    """Callable wrapper of ``evalkit::causal_attention`` that allocates ``out`` when not given."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None,
                 q_from: int = 0) -> torch.Tensor:
        """q (B, T, H, D), k and v (B, T, Hkv, D) -> (B, T - q_from, H, D) (into ``out`` when given)."""
        B, T, H, D = q.shape
        if out is None:
            out = torch.empty(B, T - q_from, H, D, device=q.device)
        call("causal_attention", q, k, v, q_from, out)
        return out
