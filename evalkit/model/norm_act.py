"""RMS norm and SwiGLU of the reference forward pass, in float32.

``evalkit::rms_norm`` and ``evalkit::swiglu`` run one-pass C kernels (kernels/norm_act.c,
AVX-512F) on torch's thread team (:mod:`evalkit.model.team`) and fall back to torch ops
elsewhere. RMS norm follows ggml's rms_norm: float squares summed in double, then
``1 / sqrtf(mean + eps)``; SwiGLU is ``g / (1 + e^-g) * u``.

On a non-CPU device (or on the CPU when forced, see :mod:`evalkit.devices`) both run
torch implementations of the same maths on the tensors' device: RMS norm with the squares
summed in float64 and ``(x * scale) * w`` rounded twice, as the C kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from evalkit import _kernels
from evalkit.devices import use_torch_kernels
from evalkit.formats.torch_dequant import f32_const
from evalkit.model.ops import evalkit_op
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


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """The C kernel's maths in torch ops on x's device: float squares summed in float64,
    mean rounded to float, scale = 1 / sqrt(mean + eps) in float32, out = (x * scale) * w."""
    sq = torch.square(x, out=out)                                                    # float products
    mean = (sq.sum(-1, keepdim=True, dtype=torch.float64) / x.shape[-1]).to(torch.float32)
    # sqrtf: torch's vectorised float32 sqrt on the CPU is not correctly rounded (about a
    # fifth of the results are 1 ulp off); the float64 root rounded to float32 is sqrtf's.
    root = torch.sqrt((mean + f32_const(eps, x.device)).to(torch.float64)).to(torch.float32)
    scale = torch.div(f32_const(1.0, x.device), root)                                # (..., 1)
    torch.mul(x, scale, out=out).mul_(weight)


@evalkit_op("rms_norm", mutates_args=("out",))
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> None:
    """out = x / sqrt(mean(x^2) + eps) * weight over the last dimension; out is contiguous,
    float32, of x's shape, and does not overlap x."""
    n = x.shape[-1]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (n,):
        raise ValueError(f"rms_norm: x must be float32 (..., n) and weight float32 (n,), got {x.dtype} "
                         f"{tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if out.dtype != torch.float32 or not out.is_contiguous() or out.shape != x.shape:
        raise ValueError(f"rms_norm: out must be a contiguous float32 tensor of shape {tuple(x.shape)}")
    if use_torch_kernels(x):
        _rms_norm_torch(x, weight, eps, out)
        return
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


@evalkit_op("swiglu", mutates_args=("out",))
def swiglu(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
    """out = silu(g) * u elementwise; all contiguous float32 of one shape (out may be g)."""
    for name, t in (("g", g), ("u", u), ("out", out)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != g.shape:
            raise ValueError(f"swiglu: {name} must be a contiguous float32 tensor of shape {tuple(g.shape)}, "
                             f"got {t.dtype} {tuple(t.shape)}")
    if use_torch_kernels(g):
        torch.mul(F.silu(g), u, out=out)        # silu(g) = g / (1 + e^-g), on g's device
        return
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
