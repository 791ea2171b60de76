"""The reference's own roundings that reach the activations of a float model, for the imatrix pass.

llama-imatrix runs a float (F32/F16) model through ik_llama.cpp's CPU backend, whose
arithmetic is float32 like evalkit's except in two places that shift every later
activation (docs/backend-ik-cpu.md §0, §6.2):

* **fp16 KV cache** (its default ``-ctk f16 -ctv f16``): the attention reads
  K = fp16(rope(k)) and V = fp16(v) (round to nearest even at store, widened exactly).
* **RoPE angles**: θ_i(p) = p · s^i is built by the recurrence θ ← θ · s in float32 with
  s = powf(base, -2/n_rot), so θ_i carries i roundings (evalkit computes it in float64);
  cos/sin of that float32 angle.

Without them the attention output's Σx² differs from the reference's by about 2e-4 of
its largest value (tiny-base); with them by a few 1e-6. :func:`reference_numerics` applies
both to a loaded :class:`~evalkit.model.Model` for the duration of a ``with`` block and
restores it afterwards; nothing in the model's files or code changes.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from evalkit.errors import RunError

__all__ = ["reference_numerics", "reference_rope_angles"]


class _HalfKV:
    """An attention callable that first rounds keys and values to fp16 in place, as the
    reference's KV cache stores them."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, q, k, v, *args, **kwargs):
        import torch
        k.copy_(k.to(torch.float16))
        v.copy_(v.to(torch.float16))
        return self.inner(q, k, v, *args, **kwargs)


def reference_rope_angles(cfg, n_pos: int) -> np.ndarray:
    """float32 (n_pos, n_rot/2): the reference's rope angles (ggml ``ggml_rope_cache_init``:
    θ = p, then θ ← θ·s per pair in float32; freq_factors divide, freq_scale multiplies)."""
    n_pairs = cfg.n_rot // 2
    # powf is correctly rounded on these arguments: float64 then one rounding gives its result
    s = np.float32(np.float64(np.float32(cfg.rope_base)) ** np.float64(np.float32(-2.0) / np.float32(cfg.n_rot)))
    theta = np.arange(n_pos, dtype=np.float32)
    out = np.empty((n_pos, n_pairs), dtype=np.float32)
    factors = cfg.rope_freq_factors
    scale = np.float32(cfg.rope_freq_scale)
    for i in range(n_pairs):
        t = theta / np.float32(factors[i]) if factors is not None else theta
        out[:, i] = t * scale if scale != 1 else t
        theta = theta * s
    return out


def _reference_tables(cfg):
    import torch
    cache: dict[int, tuple] = {}

    def tables(T: int):
        if T not in cache:
            ang = reference_rope_angles(cfg, T).astype(np.float64)
            # cosf/sinf of a float argument, correctly rounded: float64 then one rounding
            cos = torch.from_numpy(np.cos(ang).astype(np.float32)).unsqueeze(1)
            sin = torch.from_numpy(np.sin(ang).astype(np.float32)).unsqueeze(1)
            cache.clear()
            cache[T] = (cos, sin, torch.complex(cos, sin))
        return cache[T]
    return tables


@contextmanager
def reference_numerics(model):
    """Within the block, ``model``'s attention sees fp16 keys/values and its rotary embedding
    uses the reference's float32 angles (MLA models: their own fp16-cache switch only)."""
    blocks = list(model.blk)
    if any(_is_mla(b) for b in blocks):
        with _mla_half_kv(blocks):
            yield model
        return
    missing = [i for i, b in enumerate(blocks) if not callable(getattr(b, "attention", None))]
    rope = getattr(model, "rope", None)
    if missing or not callable(getattr(rope, "tables", None)):
        raise RunError(f"imatrix: {'layer %d has no attention callable' % missing[0] if missing else 'no rope tables'}"
                       " to reproduce the reference's numerics with; use exact numerics instead")
    saved = [b.attention for b in blocks]
    try:
        for b in blocks:
            b.attention = _HalfKV(b.attention)
        rope.tables = _reference_tables(model.config)      # an instance attribute shadows the method
        yield model
    finally:
        for b, a in zip(blocks, saved):
            b.attention = a
        rope.__dict__.pop("tables", None)


def _is_mla(block) -> bool:
    return hasattr(getattr(block, "attention", None), "half_kv")


@contextmanager
def _mla_half_kv(blocks):
    """MLA layers (deepseek2) round what the reference keeps in its fp16 cache themselves
    (``MLAttention.half_kv``); their YaRN rope is their own, left exact (float64 angles)."""
    layers = [b.attention for b in blocks if _is_mla(b)]
    saved = [a.half_kv for a in layers]
    try:
        for a in layers:
            a.half_kv = True
        yield
    finally:
        for a, h in zip(layers, saved):
            a.half_kv = h
