"""Backend lens: how much of a published KLD is the weights, how much a backend's arithmetic.

evalkit's exact forward measures what the quantized weights cost. This package adds what
ik_llama.cpp's CPU backend does on top (docs/backend-ik-cpu.md), and reads what a real
backend produced:

* :mod:`.rules`    — which activation rounding and weight conversion a matmul gets (§0-§2, §9);
* :mod:`.kernels`  — the compiled activation quantizers and weight conversions (array API);
* :mod:`.linear`   — the emulated matmul and the fp16 K/V cache, as drop-in modules;
* :mod:`.forward`  — :func:`backend_forward`: forward factories for ``exact``, ``ik-cpu``,
  ``ik-cpu-avx2``;
* :mod:`.measured` — a ``llama-perplexity --kl-divergence-base`` file of a variant's model
  as a forward callable (the "measured" backend);
* :mod:`.verdict`  — the paired per-token test of measured against emulated logits, and the
  per-variant decomposition exact / emulated / measured.
"""
from evalkit.backend.rules import BACKENDS, EMULATED

__all__ = ["BACKENDS", "EMULATED", "BackendError", "backend_forward", "check_backend", "physical_cores"]


def __getattr__(name: str):
    # torch-dependent pieces load on first use, so the config layer can import BACKENDS cheaply
    if name in ("BackendError", "backend_forward", "check_backend", "physical_cores"):
        from evalkit.backend import forward
        return getattr(forward, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
