"""YaRN rotary position embedding, as ggml's ``rope_yarn`` computes it (ggml.c, ik_llama.cpp 8337e4cd3).

For rotated pair i (dims 2i, 2i+1 of the first ``n_dims``) at position p:

    theta_extrap = p * base^(-2i / n_dims)
    theta_interp = freq_scale * theta_extrap                   (freq_scale = 1 / factor)
    ramp_mix     = ramp(i) * ext_factor,  ramp(i) = 1 - clamp((i - low) / max(0.001, high - low), 0, 1)
    theta        = theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix
    (cos, sin)   = (cos theta, sin theta) * mscale

with the correction dims ``low = max(0, floor(corr_dim(beta_fast)))``,
``high = min(n_dims - 1, ceil(corr_dim(beta_slow)))``,
``corr_dim(beta) = n_dims * ln(n_ctx_orig / (2 pi beta)) / (2 ln base)``, and the
magnitude ``mscale = attn_factor * (1 + 0.1 ln(1 / freq_scale))`` when ``ext_factor != 0``
(just ``attn_factor`` otherwise). With ``ext_factor == 0`` this is plain linearly scaled rope.

deepseek2's graph passes ``attn_factor = 1 / (1 + 0.1 ln(factor))``, which cancels ggml's
magnitude factor (the rotated parts keep their length), and moves the YaRN magnitude into
the attention scale instead: ``kq_scale = mscale^2 / sqrt(head_dim_k)`` with
``mscale = yarn_attn_factor * (1 + yarn_log_multiplier * ln(factor))``
(:func:`deepseek2_kq_scale`).

Here the angles are computed in float64 and cos/sin rounded once to float32 (as
:class:`evalkit.model.model.Rope` does); ggml iterates theta in float32. The correction
dims are computed in float32 as ggml does, since floor/ceil make them discrete.

Torch is imported only when :class:`YarnRope` builds its tables, so the config layer that
reads the GGUF keys into :class:`YarnScaling` stays torch-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["YarnScaling", "corr_dims", "rope_mscale", "deepseek2_rope_attn_factor", "deepseek2_kq_scale",
           "yarn_angles_cos_sin", "YarnRope"]


@dataclass(frozen=True)
class YarnScaling:
    """The YaRN parameters of a model, as llama.cpp's hparams/cparams hold them.

    ``factor`` is ``{arch}.rope.scaling.factor`` (freq_scale = 1/factor), ``n_ctx_orig``
    ``{arch}.rope.scaling.original_context_length`` (default: the training context),
    ``ext_factor`` 1 (llama.cpp's default for YaRN), ``attn_factor`` the cparams
    ``yarn_attn_factor`` (1, times ``rope.scaling.attn_factor`` when given),
    ``beta_fast``/``beta_slow`` 32/1 unless the file says otherwise, and ``log_mul``
    ``{arch}.rope.scaling.yarn_log_multiplier`` (0 when absent).
    """

    factor: float
    n_ctx_orig: int
    ext_factor: float = 1.0
    attn_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    log_mul: float = 0.0

    @property
    def freq_scale(self) -> float:
        """The angle multiplier 1/factor."""
        return 1.0 / self.factor


def corr_dims(n_dims: int, n_ctx_orig: int, base: float, beta_fast: float, beta_slow: float) -> tuple[float, float]:
    """ggml_rope_yarn_corr_dims: the (low, high) pair indices of the ramp, computed in float32."""
    f32 = np.float32

    def corr_dim(beta: float) -> np.float32:
        # n_dims * logf(n_ctx_orig / (beta * 2 * pi)) / (2 * logf(base)), every step in float32
        num = f32(n_dims) * np.log(f32(n_ctx_orig) / (f32(beta) * f32(2) * f32(math.pi)), dtype=f32)
        return num / (f32(2) * np.log(f32(base), dtype=f32))

    start = math.floor(float(corr_dim(beta_fast)))
    end = math.ceil(float(corr_dim(beta_slow)))
    return float(max(0, start)), float(min(n_dims - 1, end))


def rope_mscale(attn_factor: float, freq_scale: float, ext_factor: float) -> float:
    """The magnitude ggml's rope multiplies cos and sin by (see the module docstring)."""
    if ext_factor != 0.0:
        return attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    return attn_factor


def deepseek2_rope_attn_factor(freq_scale: float) -> float:
    """The ``attn_factor`` deepseek2's graph hands to rope: 1/(1 + 0.1 ln(1/freq_scale)), which
    cancels ggml's own YaRN magnitude factor."""
    return 1.0 / (1.0 + 0.1 * math.log(1.0 / freq_scale))


def deepseek2_kq_scale(yarn: YarnScaling | None, head_dim_k: int) -> float:
    """deepseek2's softmax scale mscale^2 / sqrt(head_dim_k), mscale = attn_factor (1 + log_mul ln factor).

    Without YaRN (or with a log multiplier of 0) this is the usual 1/sqrt(head_dim_k).
    """
    if yarn is None:
        return 1.0 / math.sqrt(head_dim_k)
    mscale = yarn.attn_factor * (1.0 + yarn.log_mul * math.log(yarn.factor))
    return mscale * mscale / math.sqrt(head_dim_k)


def yarn_angles_cos_sin(n_pos: int, n_dims: int, base: float, freq_scale: float, ext_factor: float,
                        n_ctx_orig: int, beta_fast: float, beta_slow: float, mscale: float):
    """cos, sin (n_pos, n_dims/2) float32 numpy arrays for positions 0..n_pos-1.

    ``mscale`` is the final magnitude (:func:`rope_mscale`); angles in float64.
    """
    if n_dims <= 0 or n_dims % 2:
        raise ValueError(f"yarn: the rotated dimension count must be even and positive, got {n_dims}")
    i = np.arange(n_dims // 2, dtype=np.float64)                        # pair index = i0 / 2
    theta_extrap = np.outer(np.arange(n_pos, dtype=np.float64), base ** (-2.0 * i / n_dims))
    theta_interp = freq_scale * theta_extrap
    if ext_factor != 0.0:
        low, high = corr_dims(n_dims, n_ctx_orig, base, beta_fast, beta_slow)
        y = (i - low) / max(0.001, high - low)
        ramp_mix = (1.0 - np.clip(y, 0.0, 1.0)) * ext_factor            # 1: extrapolate (fast pairs)
        theta = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix
    else:
        theta = theta_interp
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


class YarnRope:
    """YaRN rope (GGML mode NORM: adjacent pairs 2i, 2i+1) of the last ``n_dims`` of a tensor.

    ``attn_factor`` is what the graph passes to ggml's rope (deepseek2:
    :func:`deepseek2_rope_attn_factor`). ``yarn`` None: unscaled rope (with ``freq_scale``).
    """

    def __init__(self, n_dims: int, base: float, yarn: YarnScaling | None, attn_factor: float = 1.0,
                 freq_scale: float = 1.0):
        self.n_dims, self.base = int(n_dims), float(base)
        if yarn is None:
            self.params = dict(freq_scale=freq_scale, ext_factor=0.0, n_ctx_orig=0, beta_fast=32.0, beta_slow=1.0)
        else:
            self.params = dict(freq_scale=yarn.freq_scale, ext_factor=yarn.ext_factor, n_ctx_orig=yarn.n_ctx_orig,
                               beta_fast=yarn.beta_fast, beta_slow=yarn.beta_slow)
        self.mscale = rope_mscale(attn_factor, self.params["freq_scale"], self.params["ext_factor"])
        self._cache: dict = {}

    def tables(self, n_pos: int, device=None):
        """cos, sin torch float32 tensors (n_pos, 1, n_dims/2) for positions 0..n_pos-1 (cached)."""
        import torch
        key = (n_pos, str(device))
        if key not in self._cache:
            cos, sin = yarn_angles_cos_sin(n_pos, self.n_dims, self.base, mscale=self.mscale, **self.params)
            self._cache = {key: tuple(torch.from_numpy(a).unsqueeze(1).to(device) for a in (cos, sin))}
        return self._cache[key]

    def __call__(self, x):
        """Rotate x (B, T, heads, n_dims) by position 0..T-1 (adjacent pairs), in place; returns x."""
        B, T, h, n = x.shape
        if n != self.n_dims:
            raise ValueError(f"YarnRope: expected {self.n_dims} rotated dims, got {n}")
        cos, sin = self.tables(T, x.device)                              # (T, 1, n/2)
        x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)                     # even, odd dims (views)
        re = (x0 * cos).sub_(x1 * sin)                                   # a cos - b sin
        im = (x1 * cos).add_(x0 * sin)                                   # b cos + a sin
        x0.copy_(re)
        x1.copy_(im)
        return x
