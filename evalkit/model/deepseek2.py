"""The deepseek2 block (DeepSeek-V2/V3, Kimi-K2) and its tensors, as ik_llama.cpp's ``build_deepseek2``.

    x += attn_output(MLA(rms(x) * attn_norm))                       (evalkit.model.mla)
    h  = rms(x) * ffn_norm
    x += SwiGLU FFN(h)                                  (the leading_dense_block_count first layers)
    x += MoE(h) + shared expert(h)                      (the others; evalkit.model.moe.MoEFFN)

The MoE: sigmoid (or softmax) router, top-k chosen by ``sigmoid + exp_probs_b`` but weighted
by the unbiased probabilities, normalised, times ``expert_weights_scale``; the shared expert
is added unscaled (MoEFFN does all of it). Rope is YaRN on the rope part of q and k only.
"""
from __future__ import annotations

import torch
from torch import nn

from evalkit.model.mla import MLAttention
from evalkit.model.ops import call

__all__ = ["Deepseek2Block", "deepseek2_layer_shapes", "set_mla_options"]


def deepseek2_layer_shapes(cfg, il: int = 0) -> dict[str, tuple[int, ...]]:
    """Layer ``il``'s tensors (names after ``blk.N.``) in ggml order (ne0 first), as
    ik_llama.cpp's loader creates them for the ik converter's layout."""
    e, H, R, L = cfg.n_embd, cfg.n_head, cfg.n_rot, cfg.kv_lora_rank
    Dk, Dn, Dv = cfg.head_dim, cfg.head_dim - cfg.n_rot, cfg.v_head_dim
    shapes = {"attn_norm.weight": (e,), "attn_kv_a_norm.weight": (L,),
              "attn_kv_a_mqa.weight": (e, L + R), "attn_output.weight": (H * Dv, e), "ffn_norm.weight": (e,)}
    if cfg.q_lora_rank:
        Q = cfg.q_lora_rank
        shapes.update({"attn_q_a_norm.weight": (Q,), "attn_q_a.weight": (e, Q), "attn_q_b.weight": (Q, H * Dk)})
    else:
        shapes["attn_q.weight"] = (e, H * Dk)
    if "kv_b" in cfg.mla_forms:
        shapes["attn_kv_b.weight"] = (L, H * (Dn + Dv))
        if "k_b" in cfg.mla_forms:                     # the ik converter's 2-D companions
            shapes.update({"attn_k_b.weight": (Dn, H * L), "attn_v_b.weight": (L, H * Dv)})
    elif "k_b" in cfg.mla_forms:                       # mainline: 3-D, and no attn_kv_b
        shapes.update({"attn_k_b.weight": (Dn, L, H), "attn_v_b.weight": (L, Dv, H)})
    if il < cfg.n_layer_dense_lead:
        shapes.update({"ffn_gate.weight": (e, cfg.n_ff), "ffn_up.weight": (e, cfg.n_ff),
                       "ffn_down.weight": (cfg.n_ff, e)})
        return shapes
    X, F, S = cfg.n_expert, cfg.n_ff_exp, cfg.n_ff_exp * cfg.n_expert_shared
    shapes.update({"ffn_gate_inp.weight": (e, X), "ffn_gate_exps.weight": (e, F, X),
                   "ffn_up_exps.weight": (e, F, X), "ffn_down_exps.weight": (F, e, X)})
    if cfg.expert_gating == "sigmoid" or cfg.expert_probs_bias:
        # The selection bias comes with the sigmoid router (DeepSeek-V3, Kimi-K2, GLM-4.7-Flash);
        # DeepSeek-V2/2.5's softmax router has none, but one whose file carries it uses it
        # (the reference adds it whatever the gating function).
        shapes["exp_probs_b.bias"] = (X,)
    if S:
        shapes.update({"ffn_gate_shexp.weight": (e, S), "ffn_up_shexp.weight": (e, S),
                       "ffn_down_shexp.weight": (S, e)})
    return shapes


class Deepseek2Block(nn.Module):
    """One deepseek2 layer: MLA self-attention, then a dense SwiGLU FFN or the MoE FFN.

    ``mla_form`` / ``half_kv``: see :class:`~evalkit.model.mla.MLAttention` (defaults: the
    reference's default computation, exact float32). The model's shared ``rope`` argument
    is not used: MLA carries its own YaRN rope.
    """

    def __init__(self, cfg, t: dict, mla_form: str | None = None, half_kv: bool = False):
        super().__init__()
        from evalkit.model.model import RMSNorm
        self.attn_norm = RMSNorm(t["attn_norm.weight"], cfg.rms_eps)
        self.attention = MLAttention(cfg, t, form=mla_form, half_kv=half_kv)
        self.ffn_norm = RMSNorm(t["ffn_norm.weight"], cfg.rms_eps)
        self.moe = None
        if "ffn_gate_inp" in t:
            from evalkit.model.moe import MoEFFN
            self.moe = MoEFFN(cfg, t)
        else:
            self.ffn_gate, self.ffn_up, self.ffn_down = t["ffn_gate"], t["ffn_up"], t["ffn_down"]
            self.n_ff = cfg.n_ff

    def forward(self, x: torch.Tensor, rope, ws, keep_from: int = 0) -> torch.Tensor:
        """x (B, T, E) -> x + attention + FFN, (B, T - keep_from, E) (see Block.forward)."""
        B, T, E = x.shape
        h = self.attn_norm(x, out=ws("h", B, T, E))
        a = self.attention(h, ws, keep_from=keep_from)                   # (B, T', E)
        if keep_from:
            x, T = x[:, keep_from:], T - keep_from
        x.add_(a)
        h = self.ffn_norm(x, out=ws("h", B, T, E))
        if self.moe is not None:
            return x.add_(self.moe(h.view(B * T, E), ws).view(B, T, E))
        g = self.ffn_gate(h, out=ws("g", B, T, self.n_ff))
        u = self.ffn_up(h, out=ws("u", B, T, self.n_ff))
        call("swiglu", g, u, g)                                # silu(g) * u, in place
        return x.add_(self.ffn_down(g, out=ws("o", B, T, E)))


def set_mla_options(model, form: str | None = None, half_kv: bool | None = None) -> None:
    """Switch every MLA layer of ``model`` to the ``kv_b`` or ``k_b`` form and/or on/off the fp16
    rounding of the reference's KV cache (None: leave as is). ModelTensorError for a form whose
    tensors the file lacks; ValueError for a model without MLA layers."""
    layers = [m for m in model.modules() if isinstance(m, MLAttention)]
    if not layers:
        raise ValueError("set_mla_options: the model has no MLA attention layers (not deepseek2)")
    for m in layers:
        if form is not None:
            m.set_form(form)
        if half_kv is not None:
            m.half_kv = bool(half_kv)
