"""The architectures the forward pass implements: one row each, in one table.

A row says what differs between architectures at the level of the GGUF file: the rotary
pairing its Q/K rows were written for, which tensors one layer holds (with their shapes),
and which module class computes one layer. A new architecture is one more row plus the
module that defines its block and layer shapes (the dense llama family's are
:class:`evalkit.model.model.Block` and :func:`dense_layer_shapes`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from evalkit.model.config import ModelConfig

__all__ = ["ARCHITECTURES", "Architecture", "dense_layer_shapes", "get_architecture", "moe_layer_shapes"]


def dense_layer_shapes(cfg: "ModelConfig", il: int = 0) -> dict[str, tuple[int, ...]]:
    """One dense llama-family layer's tensors (names after ``blk.N.``), ggml order (ne0 first);
    the same for every layer ``il``."""
    e, q, kv = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    shapes = {
        "attn_norm.weight": (e,), "attn_q.weight": (e, q), "attn_k.weight": (e, kv),
        "attn_v.weight": (e, kv), "attn_output.weight": (q, e), "ffn_norm.weight": (e,),
        "ffn_gate.weight": (e, cfg.n_ff), "ffn_up.weight": (e, cfg.n_ff), "ffn_down.weight": (cfg.n_ff, e),
    }
    if cfg.attn_bias:
        shapes.update({"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)})
    if cfg.qk_norm:
        shapes.update({"attn_q_norm.weight": (cfg.head_dim,), "attn_k_norm.weight": (cfg.head_dim,)})
    return shapes


def _deepseek2_layer_shapes(cfg: "ModelConfig", il: int = 0) -> dict[str, tuple[int, ...]]:
    """deepseek2's layer shapes (imported on first use: the table stays torch-free)."""
    from evalkit.model.deepseek2 import deepseek2_layer_shapes
    return deepseek2_layer_shapes(cfg, il)


def moe_layer_shapes(cfg: "ModelConfig", il: int = 0) -> dict[str, tuple[int, ...]]:
    """A llama-style layer whose FFN may be a mixture of experts (llama/mistral3 with experts,
    qwen3moe, glm4moe): see :func:`evalkit.model.moe_config.moe_layer_shapes`."""
    from evalkit.model.moe_config import moe_layer_shapes as shapes
    return shapes(cfg, il, dense_layer_shapes)


@dataclass(frozen=True)
class Architecture:
    """One ``general.architecture`` the forward pass implements."""

    name: str
    rope_neox: bool          # GGUF Q/K rows in NEOX order (qwen); False: the converter permuted them (llama)
    layer_shapes: Callable[["ModelConfig", int], dict[str, tuple[int, ...]]]   # (cfg, layer index)
    block: str               # "module:Class" of the layer module, built as Class(cfg, layer_tensors)
    rope_yarn: bool = False  # the block implements YaRN rope scaling (rope.scaling.type yarn)

    def block_class(self) -> type:
        """The layer module's class (imported on first use: the table stays torch-free)."""
        mod, cls = self.block.split(":")
        return getattr(importlib.import_module(mod), cls)


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    # llama / mistral3: dense, or Mixtral-style experts in every layer (evalkit.model.moe)
    Architecture("llama", rope_neox=False, layer_shapes=moe_layer_shapes, block="evalkit.model.model:Block"),
    Architecture("qwen2", rope_neox=True, layer_shapes=dense_layer_shapes, block="evalkit.model.model:Block"),
    Architecture("qwen3", rope_neox=True, layer_shapes=dense_layer_shapes, block="evalkit.model.model:Block"),
    Architecture("qwen3moe", rope_neox=True, layer_shapes=moe_layer_shapes, block="evalkit.model.model:Block"),
    # glm4moe: q/k/v biases, q/k norms, NEOX rope on the first rope.dimension_count dims only
    Architecture("glm4moe", rope_neox=True, layer_shapes=moe_layer_shapes, block="evalkit.model.model:Block"),
    Architecture("mistral3", rope_neox=False, layer_shapes=moe_layer_shapes, block="evalkit.model.model:Block"),
    # deepseek2: MLA attention with YaRN, leading dense layers then MoE (evalkit.model.deepseek2)
    Architecture("deepseek2", rope_neox=False, layer_shapes=_deepseek2_layer_shapes,
                 block="evalkit.model.deepseek2:Deepseek2Block", rope_yarn=True),
]}


def get_architecture(name: str) -> Architecture | None:
    """The table's row for ``name``, or None when the forward pass does not implement it."""
    return ARCHITECTURES.get(name)
