"""Forward callables of an emulated backend: evalkit's model with its modules swapped.

:func:`emulate` replaces, in a loaded :class:`~evalkit.model.Model`, every
:class:`~evalkit.model.qlinear.QLinear` by an :class:`~evalkit.backend.linear.EmulatedLinear`
(the FFN up/gate pair flagged as the reference's fused op when both halves have the same
quantized type) and every attention by :class:`~evalkit.backend.linear.HalfKVAttention`
(multi-head latent attention instead rounds its own cached latent: ``MLAttention.half_kv``).
Token embeddings, norms, RoPE and SiLU stay evalkit's float32 ones (the reference computes
them in float32 too, §6). :func:`backend_forward` returns a forward factory for
``pipeline.run(make_forward=...)``; the exact backend is evalkit's own forward.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from evalkit.backend.linear import EmulatedLinear, HalfKVAttention, UbatchPlan
from evalkit.backend.rules import BACKENDS, get_profile, is_quantized
from evalkit.errors import InputError
from evalkit.evaluation.forward import ForwardFactory, ModelForward, exact_forward, load_model
from evalkit.evaluation.window import ScoredWindow

__all__ = ["BackendError", "EmulatedForward", "backend_forward", "check_backend", "emulate", "physical_cores"]


class BackendError(InputError):
    """A backend setting is invalid (unknown backend, non-positive thread count or ubatch)."""


def physical_cores() -> int:
    """The reference's default thread count (``cpu_get_num_physical_cores``): the number of
    distinct ``thread_siblings`` sets in sysfs; the logical CPU count where sysfs says nothing."""
    sibs = set()
    for p in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings"):
        try:
            with open(p) as fh:
                sibs.add(fh.read().strip())
        except OSError:
            continue
    return len(sibs) if sibs else max(1, os.cpu_count() or 1)


def check_backend(backend: str, threads=None, ubatch=None) -> None:
    """BackendError unless ``backend`` is known and ``threads`` / ``ubatch`` are positive ints."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    for key, value in (("backend_threads", threads), ("ubatch", ubatch)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                  or value < 1):
            raise BackendError(f"{key} must be a positive integer, got {value!r}")


def _fused(module) -> bool:
    """ggml_fused_up_gate builds the fused op only for quantized up/gate of one type and shape."""
    up, gate = getattr(module, "ffn_up", None), getattr(module, "ffn_gate", None)
    from evalkit.model.qlinear import QLinear
    return (isinstance(up, QLinear) and isinstance(gate, QLinear) and is_quantized(up.type_id)
            and up.type_id == gate.type_id and up.weight.shape == gate.weight.shape)


def emulate(model, backend: str, n_threads: int, plan: UbatchPlan, linear_cls=EmulatedLinear):
    """Swap ``model``'s linear layers and attention for the emulated backend's, in place.

    ``linear_cls`` builds each layer (a subclass may alter the arithmetic, e.g. a test's
    deliberately faulty kernel). Returns the model.
    """
    from evalkit.model.attention import CausalAttention
    from evalkit.model.qlinear import QLinear

    profile = get_profile(backend)
    for module in list(model.modules()):
        fused = _fused(module)
        for name, child in list(module.named_children()):
            if isinstance(child, QLinear):
                setattr(module, name, linear_cls(child, profile, n_threads, plan,
                                                 fused=fused and name in ("ffn_up", "ffn_gate"), role=name))
        att = getattr(module, "attention", None)
        if isinstance(att, CausalAttention):
            module.attention = HalfKVAttention(att)
        elif hasattr(att, "half_kv"):
            # MLA (deepseek2) caches the normed latent and the roped k_rope, not K and V: it
            # rounds what the reference's f16 cache holds itself (MLAttention.half_kv)
            att.half_kv = True
    return model


class EmulatedForward:
    """A forward callable over an emulated model: tells the ubatch plan the chunk length,
    then runs evalkit's :class:`~evalkit.evaluation.forward.ModelForward`."""

    def __init__(self, model, plan: UbatchPlan, window: ScoredWindow, buffer=None):
        self.plan = plan
        self.inner = ModelForward(model, window, buffer)
        self.model = model

    @property
    def n_vocab(self) -> int:
        """Width of the logits rows."""
        return self.model.config.n_vocab

    def __call__(self, chunks: np.ndarray) -> np.ndarray:
        """(B, C) tokens → (B, n_rows, V) logits of the scored rows."""
        self.plan.n_ctx = int(chunks.shape[-1])
        return self.inner(chunks)


def backend_forward(backend: str = "exact", threads: int | None = None, ubatch: int = 512, batch: int = 2048,
                    mode: str = "kld", linear_cls=EmulatedLinear) -> ForwardFactory:
    """A forward factory ``(path, window, buffer) → callable`` for ``backend``.

    ``threads``: the emulated backend's thread count (default: the physical cores, as the
    reference); ``ubatch``/``batch``: llama-perplexity's ``-ub``/``-b``; ``mode``: "kld"
    (``--kl-divergence``, every chunk decoded alone) or "ppl" (plain perplexity).
    """
    check_backend(backend, threads, ubatch)
    if backend == "exact":
        return exact_forward
    n_threads = threads or physical_cores()

    def factory(path: Path, window: ScoredWindow, buffer=None) -> EmulatedForward:
        """The emulated model of ``path`` as a forward callable."""
        plan = UbatchPlan(ubatch, batch, mode)
        model = emulate(load_model(path), backend, n_threads, plan, linear_cls)
        return EmulatedForward(model, plan, window, buffer)

    return factory
