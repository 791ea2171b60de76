"""Mixture-of-experts hyper-parameters from GGUF metadata, per architecture, as ik_llama.cpp reads them.

Torch-free (imported by :mod:`evalkit.model.config`). What each architecture's graph does with
the router (ik_llama.cpp 8337e4cd, ``src/llama-hparams.cpp`` and ``src/graphs/build_*.cpp``):

* ``llama`` / ``mistral3`` (Mixtral style) and ``qwen3moe``: softmax over all experts, top-k,
  the chosen weights always renormalised (the graphs pass ``norm_w = true``; the
  ``expert_weights_norm`` key is not read), no scale. Expert FFN width: ``n_ff`` for
  llama/mistral3, ``expert_feed_forward_length`` (else ``n_ff / n_expert_used``) for qwen3moe.
* ``deepseek2`` / ``glm4moe``: the gating function from ``expert_gating_func`` (1 softmax,
  2 sigmoid; a missing key means softmax for deepseek2 unless it has 47/48 layers, sigmoid
  for glm4moe; a softmax deepseek2 router that carries ``exp_probs_b`` selects with it too),
  normalised only when ``expert_weights_norm`` is true, then multiplied by the
  (required) ``expert_weights_scale``; ``expert_shared_count`` shared experts of width
  ``n_ff_exp`` each, the first ``leading_dense_block_count`` layers dense.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["GATING_FUNCS", "MOE_ARCHS", "gguf_moe_fields", "moe_layer_shapes"]

GATING_FUNCS = {1: "softmax", 2: "sigmoid"}     # llm_expert_gating_func_type values in GGUF

# arch -> (router kind, expert width key or None): "fixed" routers are softmax + always
# renormalised; "keyed" routers read gating / norm / scale from the file.
MOE_ARCHS: dict[str, str] = {"llama": "fixed", "mistral3": "fixed", "qwen3moe": "fixed",
                             "deepseek2": "keyed", "glm4moe": "keyed"}
_ALWAYS_MOE = ("qwen3moe", "deepseek2", "glm4moe")          # expert_count is required


def gguf_moe_fields(k, n_layer: int, n_ff: int, has: Callable[[str], bool] | None = None) -> dict[str, Any]:
    """The MoE fields of :class:`~evalkit.model.config.ModelConfig` from the keys reader ``k``
    (``config._GGUFKeys``); empty for a dense model. ``has(tensor name)``: whether the file holds
    a tensor (a softmax deepseek2 router uses ``exp_probs_b`` when present, as the reference's
    optional tensor). Errors name the key and the file."""
    arch = k.arch
    if arch not in MOE_ARCHS:
        return {}
    required = arch in _ALWAYS_MOE
    n_expert = k.integer("expert_count", ... if required else 0, minimum=0)
    if n_expert == 0:
        if required:
            raise k.error("expert_count", f"must be positive for {arch}")
        return {}
    n_used = k.integer("expert_used_count")
    if n_used > n_expert:
        raise k.error("expert_used_count", f"{n_used} experts used per token but the model has only "
                                           f"{n_expert} (expert_count)")
    if arch in ("llama", "mistral3"):
        n_ff_exp = n_ff
    else:
        n_ff_exp = k.integer("expert_feed_forward_length", 0, minimum=0) or n_ff // n_used
    out = dict(n_expert=n_expert, n_expert_used=n_used, n_ff_exp=n_ff_exp)
    if MOE_ARCHS[arch] == "fixed":
        return {**out, "expert_gating": "softmax", "expert_weights_norm": True, "expert_weights_scale": 1.0}
    lead = k.integer("leading_dense_block_count", ... if arch == "deepseek2" else 0, minimum=0)
    if lead > n_layer:
        raise k.error("leading_dense_block_count", f"{lead} exceeds the {n_layer} layers")
    if k.integer("nextn_predict_layers", 0, minimum=0):
        raise k.error("nextn_predict_layers", "multi-token-prediction (NextN) layers are not supported")
    gating = _gating(k, arch, n_layer)
    # ik_llama.cpp's deepseek2 loader creates exp_probs_b as optional and llm_build_moe_ffn adds
    # it to the probabilities for selection whatever the gating function
    probs_bias = (arch == "deepseek2" and gating == "softmax" and has is not None
                  and has(f"blk.{lead}.exp_probs_b.bias"))
    return {**out, "n_layer_dense_lead": lead, "n_expert_shared": k.integer("expert_shared_count", minimum=0),
            "expert_gating": gating, "expert_probs_bias": probs_bias,
            "expert_weights_norm": _bool(k, "expert_weights_norm", False),
            "expert_weights_scale": k.number("expert_weights_scale", ..., positive=True)}


def _gating(k, arch: str, n_layer: int) -> str:
    """The router's gating function (the reference's defaults when the key is absent)."""
    if arch == "deepseek2":
        default = 2 if n_layer in (47, 48) else 1       # GLM-4.7-Flash vs DeepSeek-V2/2.5
    else:
        default = 2
    code = k.integer("expert_gating_func", 0, minimum=0) or default
    if code not in GATING_FUNCS:
        raise k.error("expert_gating_func", f"gating function {code} is not supported (supported: "
                      + ", ".join(f"{c} {n}" for c, n in GATING_FUNCS.items()) + ")")
    return GATING_FUNCS[code]


def _bool(k, name: str, default: bool) -> bool:
    value = k.raw(name, default)
    if not isinstance(value, bool):
        raise k.error(name, f"must be a bool, got {value!r}")
    return value


def moe_layer_shapes(cfg, il: int, dense: Callable[..., dict[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """Layer ``il``'s tensors for the llama-style MoE architectures: ``dense(cfg)``'s attention
    and norms, and either its dense FFN (leading dense layers, or a model without experts) or
    the router and the 3-D expert tensors (ggml order: ne0, rows, expert), plus shared experts
    and the selection bias where the architecture has them. glm4moe names its FFN norm
    ``post_attention_norm``."""
    shapes = dict(dense(cfg))
    if cfg.arch == "glm4moe":
        shapes["post_attention_norm.weight"] = shapes.pop("ffn_norm.weight")
    if cfg.n_expert == 0 or il < cfg.n_layer_dense_lead:
        return shapes
    for name in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"):
        del shapes[name]
    e, X, F = cfg.n_embd, cfg.n_expert, cfg.n_ff_exp
    shapes.update({"ffn_gate_inp.weight": (e, X), "ffn_gate_exps.weight": (e, F, X),
                   "ffn_up_exps.weight": (e, F, X), "ffn_down_exps.weight": (F, e, X)})
    if cfg.arch == "glm4moe":
        shapes["exp_probs_b.bias"] = (X,)
    if cfg.n_expert_shared:
        S = cfg.n_ff_exp * cfg.n_expert_shared
        shapes.update({"ffn_gate_shexp.weight": (e, S), "ffn_up_shexp.weight": (e, S), "ffn_down_shexp.weight": (S, e)})
    return shapes
