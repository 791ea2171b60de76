"""The mixture-of-experts feed-forward layer: router, routed experts, optional shared experts.

As ik_llama.cpp's ``llm_build_moe_ffn`` (commit 8337e4cd), in exact float32:

    logits = ffn_gate_inp(h)                                  (N, n_expert)
    p      = softmax(logits) | sigmoid(logits)
    chosen = top-k of (p + exp_probs_b)                       the bias only selects ...
    w      = p[chosen]                                        ... the weights stay unbiased
    w      = w / sum(w)            (expert_weights_norm)      then  w *= expert_weights_scale
    out    = sum over slots s of  w_s * down_e(silu(gate_e(h)) * up_e(h)),  e = chosen_s
    out   += down_sh(silu(gate_sh(h)) * up_sh(h))             shared experts, unscaled

Route first, then group: each expert's tokens are gathered and multiplied through the
qlinear op over that expert's slice of the packed 3-D tensor (:class:`ExpertLinears`, zero
copy), so only routed experts are computed and no float copy of an expert ever exists.
Every (token, slot) result is written to its own row (no accumulation across experts) and
the slots are then summed in slot order, as the reference does: the result does not depend
on the order in which experts are visited or on thread scheduling.
"""
from __future__ import annotations

import torch
from torch import nn

import evalkit.model.norm_act  # noqa: F401  (registers evalkit::swiglu)
from evalkit.model.ops import call
from evalkit.model.qlinear import QLinear

__all__ = ["ExpertLinears", "MoEFFN", "route"]


class ExpertLinears(nn.Module):
    """One 3-D expert tensor (ggml ne0 x rows x n_expert) as ``n_expert`` :class:`QLinear` views.

    Expert ``e`` is the byte range of rows ``[e*rows, (e+1)*rows)`` of the packed
    (n_expert*rows, row_bytes) tensor: a contiguous view, never a copy.
    """

    def __init__(self, packed: QLinear, n_expert: int, name: str = "expert tensor"):
        super().__init__()
        from evalkit.model.model import ModelTensorError
        total = packed.out_features
        if n_expert <= 0 or total % n_expert:
            raise ModelTensorError(f"{name}: {total} rows do not split into {n_expert} experts")
        rows = total // n_expert
        w = packed.weight
        self.experts = nn.ModuleList(
            QLinear(w[e * rows:(e + 1) * rows], packed.type_name, packed.in_features, variant=packed.variant)
            for e in range(n_expert))
        self.rows, self.in_features, self.type_name = rows, packed.in_features, packed.type_name

    def __getitem__(self, e: int) -> QLinear:
        return self.experts[e]

    def __len__(self) -> int:
        return len(self.experts)

    def observe(self, fn) -> list:
        """Call ``fn(e, rows)`` with the (R, in_features) rows expert ``e`` is about to multiply
        (importance matrices: evalkit.imatrix_tools). The forward must call ``self[e]`` on
        exactly the rows routed to expert ``e``. Returns the hook handles (``.remove()`` them)."""
        return [q.register_forward_pre_hook(lambda m, args, e=e: fn(e, args[0])) for e, q in enumerate(self.experts)]

    def extra_repr(self) -> str:
        return f"n_expert={len(self.experts)}, in_features={self.in_features}, rows={self.rows}, type={self.type_name}"


def route(logits: torch.Tensor, k: int, gating: str, bias: torch.Tensor | None = None, norm: bool = True,
          scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen experts (N, k) int64, their weights (N, k) float32) from router logits (N, X).

    Selection uses ``p + bias`` (DeepSeek-V3's ``exp_probs_b``), the weights the unbiased
    ``p``; normalised over the k chosen when ``norm``; times ``scale`` unless it is 1 (the
    reference skips a scale within 1e-5 of 1).
    """
    if gating == "softmax":
        probs = torch.softmax(logits, dim=-1)
    elif gating == "sigmoid":
        probs = torch.sigmoid(logits)
    else:
        raise ValueError(f"route: unknown gating function {gating!r} (softmax, sigmoid)")
    select = probs if bias is None else probs + bias
    chosen = torch.topk(select, k, dim=-1, sorted=True).indices          # (N, k), best first
    weights = probs.gather(1, chosen)
    if norm:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if abs(scale - 1.0) > 1e-5:
        weights = weights * scale
    return chosen, weights


class MoEFFN(nn.Module):
    """Router + routed experts (+ optional shared expert) of one MoE layer.

    ``t``: the layer's tensors after ``blk.N.`` as the block receives them: ``ffn_gate_inp``
    (router, a QLinear), ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` (QLinears over
    the whole packed 3-D tensors; split per expert here), optional ``exp_probs_b.bias``
    (float32 (n_expert,)), optional ``ffn_gate_shexp`` / ``ffn_up_shexp`` / ``ffn_down_shexp``.
    """

    def __init__(self, cfg, t: dict, prefix_free: bool = True):
        super().__init__()
        from evalkit.model.model import ModelTensorError
        need = ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
        missing = [n for n in need if n not in t]
        if missing:
            raise ModelTensorError(f"MoE layer: tensor(s) {', '.join(missing)} missing")
        X = cfg.n_expert
        self.n_expert, self.k = X, cfg.n_expert_used
        self.gating, self.norm_w, self.scale_w = cfg.expert_gating, cfg.expert_weights_norm, cfg.expert_weights_scale
        self.ffn_gate_inp = t["ffn_gate_inp"]
        self.ffn_gate_exps = ExpertLinears(t["ffn_gate_exps"], X, "ffn_gate_exps")
        self.ffn_up_exps = ExpertLinears(t["ffn_up_exps"], X, "ffn_up_exps")
        self.ffn_down_exps = ExpertLinears(t["ffn_down_exps"], X, "ffn_down_exps")
        self.register_buffer("exp_probs_b", t.get("exp_probs_b.bias"), persistent=False)
        shared = [t.get(f"ffn_{n}_shexp") for n in ("gate", "up", "down")]
        if any(s is not None for s in shared) and not all(s is not None for s in shared):
            raise ModelTensorError("MoE layer: the shared expert needs ffn_gate_shexp, ffn_up_shexp and "
                                   "ffn_down_shexp together")
        self.ffn_gate_shexp, self.ffn_up_shexp, self.ffn_down_shexp = shared
        self.n_ff_exp = self.ffn_gate_exps.rows
        # widths kept here: the backend lens swaps the QLinears for modules without out_features
        self.n_ff_shexp = shared[0].out_features if shared[0] is not None else 0

    def forward(self, h: torch.Tensor, ws, residual: torch.Tensor | None = None) -> torch.Tensor:
        """h (N, E) normed activations -> (N, E) FFN output (routed + shared), in a ``ws`` buffer.

        With ``residual`` (N*E elements, any shape ending in E, e.g. the block's (B, T, E)
        stream): adds in the reference's order, ``(residual + routed) + shared``, in place, and
        returns ``residual``.
        """
        N, E = h.shape
        logits = self.ffn_gate_inp(h, out=ws("moe_logits", N, self.n_expert))
        chosen, weights = route(logits, self.k, self.gating, self.exp_probs_b, self.norm_w, self.scale_w)
        per_slot = self._experts(h, chosen, weights, ws).view(N, self.k, E)
        routed = ws("moe_out", N, E)
        routed.copy_(per_slot[:, 0])
        for s in range(1, self.k):                      # slot order: the reference's sum
            routed.add_(per_slot[:, s])
        shared = self._shared(h, ws) if self.ffn_gate_shexp is not None else None
        if residual is not None:
            residual.add_(routed.view(residual.shape))
            if shared is not None:
                residual.add_(shared.view(residual.shape))
            return residual
        return routed if shared is None else routed.add_(shared)

    def _experts(self, h: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor, ws) -> torch.Tensor:
        """(N*k, E): row t*k+s = weights[t, s] * expert chosen[t, s] applied to token t."""
        N, E = h.shape
        F, k = self.n_ff_exp, self.k
        flat = chosen.reshape(-1)                                        # (N*k,) expert per (token, slot)
        order = torch.argsort(flat, stable=True)                        # grouped by expert, token order kept
        counts = torch.bincount(flat, minlength=self.n_expert).tolist()
        wflat = weights.reshape(-1)
        y = ws("moe_y", N * k, E)
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue                                                 # unrouted experts cost nothing
            pos = order[start:start + c]
            start += c
            xe = torch.index_select(h, 0, torch.div(pos, k, rounding_mode="floor"), out=ws("moe_x", c, E))
            g = self.ffn_gate_exps[e](xe, out=ws("moe_g", c, F))
            u = self.ffn_up_exps[e](xe, out=ws("moe_u", c, F))
            call("swiglu", g, u, g)                            # silu(g) * u, in place
            d = self.ffn_down_exps[e](g, out=ws("moe_d", c, E))
            d.mul_(wflat.index_select(0, pos).unsqueeze(1))
            y.index_copy_(0, pos, d)                                     # each row written once
        return y

    def _shared(self, h: torch.Tensor, ws) -> torch.Tensor:
        """The shared expert(s): a plain SwiGLU FFN over every token, unweighted."""
        N, E = h.shape
        S = self.n_ff_shexp
        g = self.ffn_gate_shexp(h, out=ws("moe_sg", N, S))
        u = self.ffn_up_shexp(h, out=ws("moe_su", N, S))
        call("swiglu", g, u, g)
        return self.ffn_down_shexp(g, out=ws("moe_so", N, E))
