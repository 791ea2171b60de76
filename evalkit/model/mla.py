"""Multi-head latent attention (MLA) of deepseek2 (DeepSeek-V2/V3, Kimi-K2), in float32.

Follows ik_llama.cpp's ``build_deepseek2`` (src/graphs/build_deepseek2.cpp, 8337e4cd3).
Shapes: B sequences, T tokens, H heads, Dn = qk_nope, R = qk_rope (= n_rot), Dv = v_head_dim,
L = kv_lora_rank, Q = q_lora_rank.

    q        = attn_q_b(rms(attn_q_a(h)) * attn_q_a_norm)      (Q > 0; else attn_q(h))   (B, T, H, Dn + R)
    q_nope, q_rope = q[..., :Dn], q[..., Dn:]
    kv       = attn_kv_a_mqa(h)                                                          (B, T, L + R)
    latent   = rms(kv[..., :L]) * attn_kv_a_norm                                         (B, T, L)
    k_rope   = kv[..., L:]                  one rope key shared by every head            (B, T, 1, R)
    q_rope, k_rope rotated by YaRN rope, adjacent pairs (GGML NORM)
    score    = (q_nope . k_nope + q_rope . k_rope) * kq_scale,  kq_scale = mscale^2 / sqrt(Dn + R)
    out      = attn_output(softmax(score) V)

Two equivalent forms of k_nope and V (both give the same result up to float rounding):

- ``kv_b``: decompress the latent, ``attn_kv_b(latent)`` -> per head (k_nope (Dn), v (Dv)); what
  the reference computes for ubatches of >= 128 tokens with -mla 2/3 and flash attention (its
  default llama-perplexity run);
- ``k_b``: absorb into the query, ``q_lat = attn_k_b[h] q_nope`` (L per head), attend over the
  latent itself (shared by all heads, like one key/value head), then ``v = attn_v_b[h] (P latent)``;
  what the reference computes for small ubatches and without flash attention. ik's converter
  writes attn_k_b / attn_v_b beside attn_kv_b ({Dn, H*L} and {L, H*Dv}); mainline files hold
  only them, as 3-D {Dn, L, H} and {L, Dv, H} (same bytes).

``half_kv``: round what the reference keeps in its f16 cache (the normed latent and the roped
k_rope) to fp16, and, in the ``kv_b`` form, the decompressed k_nope and v too (the reference
casts them to the cache type before its flash attention).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evalkit.model.yarn import YarnRope, deepseek2_kq_scale, deepseek2_rope_attn_factor

__all__ = ["MLAttention", "MLA_FORMS", "mla_attend"]

MLA_FORMS = ("kv_b", "k_b")
_BLOCK = 128          # query positions per block of scores (bounds the (B, n, H, T) score buffer)


def _round_half_(t: torch.Tensor) -> torch.Tensor:
    """Round t to fp16 values in place (round to nearest even, as ggml's f32 -> f16 store)."""
    return t.copy_(t.to(torch.float16))


def mla_attend(qn: torch.Tensor, qr: torch.Tensor, kn: torch.Tensor, kr: torch.Tensor, v: torch.Tensor,
               scale: float, q_from: int, out: torch.Tensor) -> torch.Tensor:
    """Causal attention whose score is (qn . kn + qr . kr) * scale; into ``out``.

    qn (B, T, H, D), qr (B, T, H, R): contiguous queries; kn (B, T, Hk, D) and v (B, T, Hk, Dv)
    with Hk = H (one key/value per head) or 1 (shared by all heads), kr (B, T, 1, R) shared.
    Query t (t >= q_from) sees keys s <= t. out (B, T - q_from, H, Dv).
    """
    B, T, H, D = qn.shape
    Hk = kn.shape[2]
    krt = kr[:, :, 0].transpose(1, 2)                                               # (B, R, T)
    for s in range(q_from, T, _BLOCK):
        e = min(T, s + _BLOCK)
        n = e - s
        # rope part: one shared key, so heads fold into the rows of one product
        scores = torch.bmm(qr[:, s:e].reshape(B, n * H, -1), krt[:, :, :e]).view(B, n, H, e)
        if Hk == 1:
            scores += torch.bmm(qn[:, s:e].reshape(B, n * H, D), kn[:, :e, 0].transpose(1, 2)).view(B, n, H, e)
        else:
            part = torch.matmul(qn[:, s:e].permute(0, 2, 1, 3), kn[:, :e].permute(0, 2, 3, 1))   # (B, H, n, e)
            scores += part.permute(0, 2, 1, 3)
        scores *= scale
        future = torch.arange(s, e).unsqueeze(1) < torch.arange(e).unsqueeze(0)       # (n, e)
        scores.masked_fill_(future.unsqueeze(1), float("-inf"))
        p = torch.softmax(scores, dim=-1)                                               # (B, n, H, e)
        if Hk == 1:
            o = torch.bmm(p.reshape(B, n * H, e), v[:, :e, 0]).view(B, n, H, -1)
        else:
            o = torch.matmul(p.permute(0, 2, 1, 3), v[:, :e].permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        out[:, s - q_from:e - q_from] = o
    return out


class MLAttention(nn.Module):
    """deepseek2's attention: normed hidden state (B, T, E) -> attention output (B, T', E).

    ``t``: the layer's tensors after ``blk.N.`` (QLinear matrices without ``.weight``, norm
    weights as float32 tensors). ``form``: ``kv_b`` or ``k_b`` (default: ``kv_b`` when the
    file has attn_kv_b, as the reference's default run computes).
    """

    def __init__(self, cfg, t: dict, form: str | None = None, half_kv: bool = False):
        super().__init__()
        from evalkit.model.model import RMSNorm
        self.n_head, self.n_rope, self.kv_lora = cfg.n_head, cfg.n_rot, cfg.kv_lora_rank
        self.n_nope, self.n_v = cfg.head_dim - cfg.n_rot, cfg.v_head_dim
        self.q_lora = cfg.q_lora_rank
        if self.q_lora:
            self.attn_q_a, self.attn_q_b = t["attn_q_a"], t["attn_q_b"]
            self.attn_q_a_norm = RMSNorm(t["attn_q_a_norm.weight"], cfg.rms_eps)
        else:
            self.attn_q = t["attn_q"]
        self.attn_kv_a_mqa = t["attn_kv_a_mqa"]
        self.attn_kv_a_norm = RMSNorm(t["attn_kv_a_norm.weight"], cfg.rms_eps)
        self.attn_output = t["attn_output"]
        self.forms = tuple(f for f in MLA_FORMS if f in cfg.mla_forms)
        if "kv_b" in self.forms:
            self.attn_kv_b = t["attn_kv_b"]
        if "k_b" in self.forms:
            # per-head row slices of the packed bytes (zero-copy): k_b rows h*L.., v_b rows h*Dv..
            self.attn_k_b = nn.ModuleList(_row_slice(t["attn_k_b"], h * self.kv_lora, self.kv_lora)
                                          for h in range(self.n_head))
            self.attn_v_b = nn.ModuleList(_row_slice(t["attn_v_b"], h * self.n_v, self.n_v)
                                          for h in range(self.n_head))
        self.half_kv = bool(half_kv)
        self.set_form(form or self.forms[0])
        self.rope = YarnRope(cfg.n_rot, cfg.rope_base, cfg.rope_yarn,
                             attn_factor=deepseek2_rope_attn_factor(cfg.rope_freq_scale),
                             freq_scale=cfg.rope_freq_scale)
        # the reference passes kq_scale to its kernels as a float
        self.kq_scale = float(np.float32(deepseek2_kq_scale(cfg.rope_yarn, cfg.head_dim)))

    def set_form(self, form: str) -> None:
        """Compute k_nope/V by ``kv_b`` (decompress) or ``k_b`` (absorb); ModelTensorError when the
        file lacks that form's tensors."""
        from evalkit.model.model import ModelTensorError
        if form not in self.forms:
            raise ModelTensorError(f"MLA form {form!r} needs tensors this model does not have (its forms: "
                                   f"{list(self.forms)}; kv_b: attn_kv_b, k_b: attn_k_b + attn_v_b)")
        self.form = form

    def _queries(self, h: torch.Tensor, ws) -> torch.Tensor:
        B, T, _ = h.shape
        width = self.n_head * (self.n_nope + self.n_rope)
        if not self.q_lora:
            return self.attn_q(h, out=ws("q", B, T, width))
        qa = self.attn_q_a(h, out=ws("mla_qa", B, T, self.q_lora))
        qa = self.attn_q_a_norm(qa, out=ws("mla_qan", B, T, self.q_lora))
        return self.attn_q_b(qa, out=ws("q", B, T, width))

    def forward(self, h: torch.Tensor, ws, keep_from: int = 0) -> torch.Tensor:
        """h (B, T, E) normed -> (B, T - keep_from, E) attention output (not yet added to the residual).

        Keys and values cover every position; queries only those from ``keep_from`` on.
        """
        B, T, _ = h.shape
        H, Dn, R, L, Dv = self.n_head, self.n_nope, self.n_rope, self.kv_lora, self.n_v
        q = self._queries(h, ws).view(B, T, H, Dn + R)
        q_rope = self.rope(q[..., Dn:].contiguous())                               # (B, T, H, R)
        kv = self.attn_kv_a_mqa(h, out=ws("mla_kva", B, T, L + R))
        latent = self.attn_kv_a_norm(kv[..., :L], out=ws("mla_lat", B, T, L))    # (B, T, L)
        k_rope = self.rope(kv[..., L:].contiguous().view(B, T, 1, R))             # (B, T, 1, R)
        if self.half_kv:                                                           # the f16 cache
            _round_half_(latent)
            _round_half_(k_rope)
        T2 = T - keep_from
        if self.form == "kv_b":
            kvb = self.attn_kv_b(latent, out=ws("mla_kvb", B, T, H * (Dn + Dv))).view(B, T, H, Dn + Dv)
            k_nope, v = kvb[..., :Dn].contiguous(), kvb[..., Dn:].contiguous()
            if self.half_kv:
                _round_half_(k_nope)
                _round_half_(v)
            y = mla_attend(q[..., :Dn].contiguous(), q_rope, k_nope, k_rope, v, self.kq_scale, keep_from,
                           ws("y", B, T2, H, Dv))
        else:
            q_nope = q[..., :Dn]
            q_lat = torch.empty(B, T, H, L)
            for i, k_b in enumerate(self.attn_k_b):
                q_lat[:, :, i] = k_b(q_nope[:, :, i].contiguous())
            lat = latent.view(B, T, 1, L)
            o_lat = mla_attend(q_lat, q_rope, lat, k_rope, lat, self.kq_scale, keep_from, torch.empty(B, T2, H, L))
            y = ws("y", B, T2, H, Dv)
            for i, v_b in enumerate(self.attn_v_b):
                y[:, :, i] = v_b(o_lat[:, :, i].contiguous())
        return self.attn_output(y.view(B, T2, H * Dv), out=ws("o", B, T2, h.shape[-1]))


def _row_slice(lin, first: int, n: int):
    """A QLinear over rows [first, first + n) of ``lin``'s packed weight (a view, no copy)."""
    from evalkit.model.qlinear import QLinear
    return QLinear(lin.weight[first:first + n], lin.type_id, lin.in_features, variant=lin.variant)
