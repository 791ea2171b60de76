"""RMS norm and SwiGLU of the reference forward pass, in float32.

``evalkit::rms_norm`` and ``evalkit::swiglu`` run one-pass C kernels (kernels/norm_act.c,
AVX-512F) on torch's thread team (:mod:`evalkit.model.team`) and fall back to torch ops
elsewhere. RMS norm follows ggml's rms_norm: float squares summed in double, then
``1 / sqrtf(mean + eps)``; SwiGLU is ``g / (1 + e^-g) * u``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from evalkit import _kernels
from evalkit.model.team import team

__all__ = ["rms_norm", "swiglu", "kernels_available"]


def kernels_available() -> bool:
    """True when the C kernels serve these ops on this CPU."""
    return bool(_kernels.get_lib().ek_has_norm_act())


def _rows(x: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(outer, inner, outer stride, inner stride) of x's rows for the kernel, or None."""
    if x.stride(-1) != 1:
        return None
    if x.dim() == 1:
        return 1, 1, 0, 0
    if x.is_contiguous():
        return 1, x.numel() // x.shape[-1], 0, x.shape[-1]
    if x.dim() == 3:                     # e.g. x[:, keep_from:] of a (B, T, E) buffer
        return x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    return None


@torch.library.custom_op("evalkit::rms_norm", mutates_args=("out",))
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """out = x / sqrt(mean(x^2) + eps) * weight over the last dimension; out is contiguous,
    float32, of x's shape, and does not overlap x."""
    n = x.shape[-1]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (n,):
        raise ValueError(f"rms_norm: x must be float32 (..., n) and weight float32 (n,), got {x.dtype} "
                         f"{tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != x.shape:
        raise ValueError(f"rms_norm: out must be a contiguous float32 tensor of shape {tuple(x.shape)}")
    rows = _rows(x) if kernels_available() and weight.is_contiguous() else None
    if rows is not None and x.numel():
        nthreads, runner = team()
        rc = _kernels.get_lib().ek_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), *rows[:2], n, *rows[2:],
                                            eps, nthreads, runner)
        if rc != 0:
            raise RuntimeError(f"rms_norm: {_kernels.status_message(rc)}")
        return
    r = torch.rsqrt(torch.square(x, out=out).mean(-1, keepdim=True).add_(eps))       # (..., 1)
    torch.mul(x, r, out=out).mul_(weight)


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps, out):
    torch._check(out.shape == x.shape)


@torch.library.custom_op("evalkit::swiglu", mutates_args=("out",))
def swiglu(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(g) * u elementwise; all contiguous float32 of one shape (out may be g)."""
    for name, t in (("g", g), ("u", u), ("out", out)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != g.shape:
            raise ValueError(f"swiglu: {name} must be a contiguous float32 tensor of shape {tuple(g.shape)}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if kernels_available():
        nthreads, runner = team()
        rc = _kernels.get_lib().ek_swiglu(g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), nthreads, runner)
        if rc != 0:
            raise RuntimeError(f"swiglu: {_kernels.status_message(rc)}")
        return
    torch.mul(F.silu(g), u, out=out)


@swiglu.register_fake
def _swiglu_fake(g, u, out):
    torch._check(out.shape == g.shape)
