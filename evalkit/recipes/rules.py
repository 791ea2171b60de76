"""Per-tensor target types: ik_llama.cpp's ``llama_tensor_get_type`` and friends, as pure functions.

Transcribed from ``src/llama-quantize.cpp`` (commit 8337e4cd3; docs/iqk-formats.md §15
is authoritative for IQ2_K..IQ6_K). The KS/KL/KT/IQ3_KL branches follow the reference
versions whose fallback table matches §15 (row widths not divisible by 256 fall back
to IQ4_NL / Q5_0 / Q6_0 / Q8_0; later versions send IQ2_*/IQ3_* to IQ3_KT / IQ4_KT
instead) and whose imatrix check refuses IQ1_KT / IQ2_KT (docs/iqk-formats.md §14.3):

* :func:`should_quantize` — which tensors are quantized at all (main loop of
  ``llama_model_quantize_internal``);
* :func:`mix_type` — the ftype's rules, then the regex overrides (``--custom-q``), then the
  fallback for rows not divisible by 256 (``change_type_if_necessary``);
* :func:`tensor_type` — the whole decision for one tensor, including ``--pure``, the
  exact-name command-line overrides applied afterwards and the "already in that type →
  copy" rule.

Everything here is pure: the only state the reference keeps (how many ``attn_v`` /
``ffn_down`` / ... tensors were seen before) is passed in as :class:`Position` and
advanced by :func:`assign_types`, which walks a model's tensors in file order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Sequence

from evalkit.formats import get_format
from evalkit.recipes.ftypes import FType, get_ftype
from evalkit.recipes.options import CLASS_OPTIONS, RuleError, TypeOptions

# RuleError and TypeOptions are defined in evalkit.recipes.options; the rules take and raise them.
__all__ = [
    "RuleError", "ModelFacts", "TypeOptions", "Position", "Decision",
    "should_quantize", "fallback_type", "mix_type", "tensor_type", "assign_types",
    "model_size_label", "IGNORED_CLASS_OPTIONS",
]

QK_K = 256

# change_type_if_necessary: the types whose rows must hold whole 256-element super-blocks,
# and where each one falls back to when they do not (then F16 if even that does not fit).
# IQ3_S is not an evalkit type, but the IQ3_KT mix picks it for token_embd and the
# fallback may still turn it into IQ4_NL.
_FALLBACK = {
    **dict.fromkeys(["Q2_K", "Q3_K", "IQ2_K", "IQ3_K", "IQ2_KS", "IQ3_KS", "IQ2_KL", "IQ4_KS",
                     "IQ4_KSS", "IQ1_KT", "IQ2_KT", "IQ3_KT", "IQ4_KT", "IQ3_S"], "IQ4_NL"),
    **dict.fromkeys(["IQ4_K", "IQ5_KS", "Q4_K"], "Q5_0"),
    **dict.fromkeys(["IQ5_K", "Q5_K"], "Q6_0"),
    **dict.fromkeys(["IQ6_K", "Q6_K"], "Q8_0"),
}

# Ftypes with their own branch in llama_tensor_get_type that replaces the per-class chain
# for layer tensors: the reference then never looks at these options (and their exact-name
# re-application cannot match blk.N.* names), so they are silently ignored.
IGNORED_CLASS_OPTIONS = {
    "IQ2_KS": ("attn_q_type", "attn_k_type", "attn_v_type", "ffn_gate_type", "ffn_up_type",
               "ffn_down_type"),
    "IQ2_KT": ("attn_q_type", "attn_k_type", "attn_v_type", "attn_output_type", "ffn_gate_type",
               "ffn_up_type"),
}

# output.weight (or the tied token_embd): ftypes that take IQ4_K (tied) / Q5_K (own output) ...
_OUT_IQ4K_Q5K = frozenset({"IQ2_K", "IQ3_K", "IQ2_KS", "IQ3_KS", "IQ2_KL", "IQ1_KT", "IQ2_KT",
                           "IQ3_KT"})
# ... and those that take IQ5_K for a tied token_embd (Q6_K for an own output.weight)
_OUT_IQ5K_TIED = frozenset({"IQ3_KL", "IQ4_KS", "IQ4_KSS"})
# attn_output with >= 4 experts → Q5_K (llama-quantize's list, restricted to evalkit's ftypes)
_ATTN_OUT_MOE_Q5K = frozenset({"IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_K", "IQ4_KSS", "IQ4_KS", "IQ5_KS",
                               "IQ2_K", "IQ3_K", "IQ3_KL", "IQ3_KT", "IQ3_KS"})


def model_size_label(arch: str, n_layer: int, n_vocab: int, n_head: int, n_head_kv: int,
                     n_embd: int, n_expert: int) -> str | None:
    """llama.cpp's size label (``model.type``) for the architectures evalkit loads, else None.

    Only "8B" and "70B" matter to the rules (attn_v / attn_q of IQ5_K, Q5_K_S and IQ3_K).
    """
    if arch == "llama":
        if n_expert == 8:
            return {32: "8x7B", 56: "8x22B"}.get(n_layer)
        if n_layer == 32:
            return "3B" if n_vocab == 49152 else ("7B" if n_vocab < 40000 else "8B")
        if n_layer == 80:
            return "65B" if n_head == n_head_kv else "70B"
        return {22: "1B", 26: "3B", 36: "8B", 40: "13B", 48: "34B", 60: "30B"}.get(n_layer)
    if arch == "qwen2":
        if n_layer == 24:
            return "0.5B" if n_embd == 1024 else "1B"
        if n_layer == 40:
            return "4B" if n_head == 20 else "13B"
        return {32: "7B", 80: "70B"}.get(n_layer)
    if arch == "qwen3":
        if n_layer == 28:
            return "0.6B" if n_embd == 1024 else "1.7B"
        if n_layer == 36:
            return "4B" if n_embd == 2560 else "8B"
        return {40: "14B", 64: "32B"}.get(n_layer)
    return None


@dataclass(frozen=True)
class ModelFacts:
    """What the rules need to know about a model (llm_load_hparams' view of its metadata)."""

    arch: str
    n_layer: int
    n_head: int          # layer 0
    n_head_kv: int       # layer 0
    n_expert: int
    n_vocab: int
    n_embd: int
    has_output: bool     # the model has its own output.weight (no tied embeddings)
    n_attention_wv: int = 0   # tensors named *attn_v.weight or *attn_qkv.weight
    size_label: str | None = None

    @property
    def n_gqa(self) -> int:
        """n_head / n_head_kv of layer 0 (integer division), 0 without KV heads."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], tensor_names: Sequence[str]) -> "ModelFacts":
        """Read the facts from GGUF metadata (``{arch}.*`` keys) and the tensor names."""
        arch = str(metadata.get("general.architecture", ""))

        def key(k: str, default: Any = 0) -> Any:
            return metadata.get(f"{arch}.{k}", default)

        def first(v: Any) -> int:
            if isinstance(v, (list, tuple)):
                return int(v[0]) if v else 0
            return int(v)

        n_layer = int(key("block_count"))
        n_head = first(key("attention.head_count"))
        kv = key("attention.head_count_kv", None)
        n_head_kv = n_head if kv is None else first(kv)
        n_expert = int(key("expert_count"))
        n_vocab = key("vocab_size", None)
        if n_vocab is None:
            n_vocab = len(metadata.get("tokenizer.ggml.tokens", []) or [])
        n_embd = int(key("embedding_length"))
        has_output = "output.weight" in tensor_names
        n_wv = sum(1 for n in tensor_names if "attn_v.weight" in n or "attn_qkv.weight" in n)
        label = model_size_label(arch, n_layer, int(n_vocab), n_head, n_head_kv, n_embd, n_expert)
        return cls(arch, n_layer, n_head, n_head_kv, n_expert, int(n_vocab), n_embd, has_output,
                   n_wv, label)


@dataclass(frozen=True)
class Position:
    """How many tensors of each counted class came before this one (reference's qs.i_* counters)."""

    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    def advanced(self, counter: str | None) -> "Position":
        """The position after a tensor that bumped ``counter`` (None: unchanged)."""
        if counter is None:
            return self
        return replace(self, **{counter: getattr(self, counter) + 1})


@dataclass(frozen=True)
class Decision:
    """The outcome for one tensor: its output type, whether it is (re)quantized, and why."""

    type_name: str
    quantize: bool
    reason: str
    counter: str | None = None     # which Position counter this tensor advanced


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: 1 + index of the last dimension larger than 1 (trailing 1s do not count)."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


def should_quantize(name: str, shape: Sequence[int]) -> tuple[bool, str]:
    """Whether the reference quantizes this tensor at all, and if not, why not."""
    if not name.endswith("weight"):
        return False, "not a weight"
    if ggml_n_dims(shape) < 2:
        return False, "1-D"
    if "_norm.weight" in name:
        return False, "norm"
    if "ffn_gate_inp.weight" in name:
        return False, "expert gate"
    if name in ("position_embd.weight", "token_types.weight"):
        return False, "positional / token-type embedding"
    for s in ("ssm_conv1d", "shortconv.conv", "ssm_x.weight", "ssm_dt.weight", "attn_rel_b.weight"):
        if s in name:
            return False, f"{s} is never quantized"
    return True, ""


def fallback_type(type_name: str, ne0: int) -> tuple[str, str | None]:
    """change_type_if_necessary: the type to use when rows of ``ne0`` do not fit ``type_name``."""
    if type_name in _FALLBACK and ne0 % QK_K:
        new = _FALLBACK[type_name]
        if ne0 % get_format(new).block_size:
            new = "F16"
        return new, f"fallback {type_name}→{new} ({ne0} % 256 ≠ 0)"
    return type_name, None


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_info(i_layer: int, n_layer: int, name: str, model: ModelFacts) -> tuple[int, int]:
    # With experts the reference parses the layer from the name ("blk.N."); otherwise the
    # running count of this tensor class is the layer index.
    if max(1, model.n_expert) > 1:
        m = re.match(r"blk\.(-?\d+)\.", name)
        if not m:
            raise RuleError(f"failed to determine layer for tensor {name}")
        i_layer = int(m.group(1))
        if not 0 <= i_layer < n_layer:
            raise RuleError(f"bad layer {i_layer} for tensor {name}: must be in [0, {n_layer})")
    return i_layer, n_layer


def _iq2_ks_rules(name: str, t: str, model: ModelFacts, opts: TypeOptions,
                  pos: Position) -> tuple[str, str, str | None]:
    """IQ2_KS's branch (shared in the reference with IQ2_XXS/XS/S/M and IQ1_S/M).

    It replaces the per-class chain: only --attn-output-type is honoured, ffn_down uses the
    raw running count (no layer parsed from the name), ffn_gate/ffn_up counters stay put.
    """
    gqa, nx = model.n_gqa, model.n_expert
    if "attn_v.weight" in name:
        c = "i_attention_wv"
        if gqa >= 4 or nx >= 4:
            return "IQ4_K", f"attn_v of IQ2_KS, n_gqa={gqa}, n_expert={nx} → IQ4_K", c
        if gqa >= 2 or nx >= 2:
            return "IQ3_K", f"attn_v of IQ2_KS, n_gqa={gqa}, n_expert={nx} → IQ3_K", c
        return "Q2_K", f"attn_v of IQ2_KS, n_gqa={gqa} → Q2_K", c
    if nx >= 8 and "attn_k" in name:
        return "Q4_K", "attn_k of IQ2_KS with ≥8 experts → Q4_K", None
    if nx >= 8 and "attn_q" in name:
        return "Q4_K", "attn_q of IQ2_KS with ≥8 experts → Q4_K", None
    if "attn_qkv.weight" in name:
        return "IQ2_K", "attn_qkv of IQ2_KS → IQ2_K", None
    if "ffn_down" in name:
        c = "i_ffn_down"
        if pos.i_ffn_down < model.n_layer // 8:
            return "Q2_K", f"ffn_down #{pos.i_ffn_down} < n_layer/8 of IQ2_KS → Q2_K", c
        return t, "ftype default", c
    if "attn_output.weight" in name:
        if opts.attn_output_type:
            return opts.attn_output_type, "--attn-output-type", None
        if nx >= 4:
            return "Q5_K", "attn_output of IQ2_KS with ≥4 experts → Q5_K", None
    return t, "ftype default", None


def _iq2_kt_rules(name: str, t: str, model: ModelFacts, opts: TypeOptions,
                  pos: Position) -> tuple[str, str, str | None]:
    """IQ2_KT's own branch: replaces the per-class chain, only --ffn-down-type is honoured."""
    gqa, nx = model.n_gqa, model.n_expert
    if "attn_v.weight" in name:
        c = "i_attention_wv"
        if nx >= 4 or gqa >= 4:
            return "IQ4_K", f"attn_v of IQ2_KT, n_gqa={gqa}, n_expert={nx} → IQ4_K", c
        if gqa >= 2:
            return "IQ3_K", f"attn_v of IQ2_KT, n_gqa={gqa} → IQ3_K", c
        return "Q2_K", f"attn_v of IQ2_KT, n_gqa={gqa} → Q2_K", c
    if nx >= 8 and "attn_k" in name:
        return "Q4_K", "attn_k of IQ2_KT with ≥8 experts → Q4_K", None
    if nx >= 8 and any(f"blk.0.{s}" in name for s in ("ffn_down", "ffn_gate", "ffn_up")):
        return "IQ3_K", "layer-0 FFN of IQ2_KT with ≥8 experts → IQ3_K", None
    if nx >= 8 and "attn_q" in name:
        return "Q4_K", "attn_q of IQ2_KT with ≥8 experts → Q4_K", None
    if "attn_qkv.weight" in name:
        return "IQ3_K", "attn_qkv of IQ2_KT → IQ3_K", None
    if "_shexp.weight" in name:
        return "IQ4_K", "shared expert of IQ2_KT → IQ4_K", None
    if "ffn_down" in name:
        c = "i_ffn_down"
        i_layer, n_layer = _layer_info(pos.i_ffn_down, model.n_layer, name, model)
        if opts.ffn_down_type:
            return opts.ffn_down_type, "--ffn-down-type", c
        if i_layer < n_layer // 8:
            return "IQ3_K", f"ffn_down layer {i_layer} < n_layer/8 of IQ2_KT → IQ3_K", c
        return t, "ftype default", c
    if "attn_output.weight" in name:
        new = "Q5_K" if nx >= 4 else "IQ3_K"
        return new, f"attn_output of IQ2_KT (n_expert={nx}) → {new}", None
    return t, "ftype default", None


def _ftype_rules(name: str, ne0: int, t: str, ft: str, model: ModelFacts, opts: TypeOptions,
                 pos: Position) -> tuple[str, str, str | None]:
    """The ftype's branches of llama_tensor_get_type (before --custom-q and the fallback)."""
    is_8b_or_70b = model.size_label in ("8B", "70B")
    big_vocab = model.n_vocab >= 127999
    gqa = model.n_gqa

    # 1. the output matrix, or the token embedding when it doubles as output (tied).
    if name == "output.weight" or (not model.has_output and name == "token_embd.weight"):
        what = "output" if name == "output.weight" else "tied token_embd (used as output)"
        if opts.output_tensor_type:
            return opts.output_tensor_type, f"{what}: --output-tensor-type", None
        if model.arch == "falcon" or ne0 % QK_K:
            return "Q8_0", f"{what}: falcon or {ne0} % 256 ≠ 0 → Q8_0", None
        if ft in _OUT_IQ4K_Q5K:
            new = "IQ4_K" if not model.has_output else "Q5_K"
            return new, f"{what} of {ft} → {new}", None
        if ft in _OUT_IQ5K_TIED and not model.has_output:
            return "IQ5_K", f"{what} of {ft} → IQ5_K", None
        if t not in ("Q8_0", "IQ6_K"):
            return "Q6_K", f"{what} → Q6_K", None
        return t, f"{what} keeps {t}", None

    # 2. the token embedding of a model with its own output matrix.
    if name == "token_embd.weight":
        if opts.token_embedding_type:
            return opts.token_embedding_type, "--token-embedding-type", None
        if ft == "IQ3_KT":
            return "IQ3_S", "token_embd of IQ3_KT → IQ3_S", None
        return t, "ftype default", None

    # ftypes whose own branch replaces everything below for the layer tensors
    if ft == "IQ2_KT":
        return _iq2_kt_rules(name, t, model, opts, pos)
    if ft == "IQ2_KS":
        return _iq2_ks_rules(name, t, model, opts, pos)

    if "attn_v.weight" in name:
        c = "i_attention_wv"
        if opts.attn_v_type:
            return opts.attn_v_type, "--attn-v-type", c
        if model.n_expert >= 4:
            return "Q8_0", "attn_v with ≥4 experts → Q8_0", c
        if model.size_label == "70B":
            # only these default types change; every other ftype keeps its own (IQ3_KL: IQ3_K)
            new = {"Q3_K": "Q5_K", "Q4_K": "Q5_K", "IQ3_K": "IQ5_K"}.get(t, t)
            return new, "attn_v of a 70B model", c
        if ft == "IQ2_K":
            new = "IQ4_K" if gqa >= 2 else "IQ3_K"
            return new, f"attn_v of IQ2_K, n_gqa={gqa} → {new}", c
        if ft in ("IQ3_KT", "IQ4_KT"):
            new = {"IQ3_KT": ("IQ4_K", "IQ3_K"), "IQ4_KT": ("IQ5_K", "IQ4_K")}[ft][gqa < 4]
            return new, f"attn_v of {ft}, n_gqa={gqa} → {new}", c
        if ft == "IQ3_K" and gqa >= 2:
            return "IQ4_K", f"attn_v of IQ3_K, n_gqa={gqa} ≥ 2 → IQ4_K", c
        if ft in ("IQ3_KS", "IQ2_KL") and gqa >= 2:
            return "IQ4_KS", f"attn_v of {ft}, n_gqa={gqa} ≥ 2 → IQ4_KS", c
        if ft == "IQ3_KL":
            new = "IQ5_K" if gqa >= 2 else "IQ4_K"
            return new, f"attn_v of IQ3_KL, n_gqa={gqa} → {new}", c
        if ft in ("IQ4_NL", "IQ4_KS", "IQ4_KSS") and gqa >= 2:
            return "IQ5_K", f"attn_v of {ft}, n_gqa={gqa} ≥ 2 → IQ5_K", c
        if ft == "IQ4_K" and gqa >= 2:
            return "IQ5_K", f"attn_v of IQ4_K, n_gqa={gqa} ≥ 2 → IQ5_K", c
        if ft in ("Q4_K_M", "Q5_K_M") and _use_more_bits(pos.i_attention_wv, model.n_attention_wv):
            return "Q6_K", f"attn_v #{pos.i_attention_wv} of {ft} (use_more_bits) → Q6_K", c
        if ft == "Q4_K_S" and pos.i_attention_wv < 4:
            return "Q5_K", f"attn_v #{pos.i_attention_wv} of Q4_K_S → Q5_K", c
        if ft == "Q5_K_S":
            if big_vocab and is_8b_or_70b:
                return "Q6_K", "attn_v of Q5_K_S, 8B/70B with n_vocab ≥ 127999 → Q6_K", c
            return t, "ftype default", c
        if ft in ("IQ5_K", "IQ5_KS"):
            # this branch is taken for every IQ5_K/IQ5_KS model: no n_gqa bump for them
            if big_vocab and is_8b_or_70b:
                return "IQ6_K", f"attn_v of {ft}, 8B/70B with n_vocab ≥ 127999 → IQ6_K", c
            return t, "ftype default", c
        if gqa >= 4:
            bump = {"Q3_K": "Q4_K", "IQ3_K": "IQ4_K", "IQ3_KS": "IQ4_KS", "IQ2_KL": "IQ4_KS",
                    "Q4_K": "Q5_K", "IQ4_NL": "Q5_K", "IQ4_K": "IQ5_K", "IQ4_KS": "IQ5_K",
                    "Q5_K": "Q6_K", "IQ5_K": "IQ6_K", "IQ5_KS": "IQ6_K"}
            if t in bump:
                return bump[t], f"attn_v, n_gqa={gqa} ≥ 4: {t} → {bump[t]}", c
        return t, "ftype default", c

    if "attn_k" in name:   # also attn_k_b, attn_kv_a_mqa, attn_kv_b
        if opts.attn_k_type:
            return opts.attn_k_type, "--attn-k-type", None
        if model.n_expert >= 4:
            return "Q8_0", "attn_k with ≥4 experts → Q8_0", None
        return t, "ftype default", None

    if "attn_q" in name:   # also attn_qkv: the reference's attn_qkv branch never fires
        if opts.attn_q_type:
            return opts.attn_q_type, "--attn-q-type", None
        if big_vocab and is_8b_or_70b:
            new = {"Q5_K_S": "Q4_K", "IQ5_K": "IQ4_K", "IQ5_KS": "IQ4_KS"}.get(ft)
            if new:
                return new, f"attn_q of {ft}, 8B/70B with n_vocab ≥ 127999 → {new}", None
        return t, "ftype default", None

    if "ffn_down" in name:
        c = "i_ffn_down"
        i_layer, n_layer = _layer_info(pos.i_ffn_down, model.n_layer, name, model)
        if opts.ffn_down_type:
            return opts.ffn_down_type, "--ffn-down-type", c
        if ft == "IQ3_KT" and not opts.has_imatrix:
            new = "IQ4_K" if i_layer < n_layer // 8 else "IQ3_K"
            return new, f"ffn_down layer {i_layer} of IQ3_KT without imatrix → {new}", c
        if ft == "IQ3_KL":
            new = "IQ4_KS" if _use_more_bits(i_layer, n_layer) else "IQ3_K"
            return new, f"ffn_down layer {i_layer} of IQ3_KL (use_more_bits: {new == 'IQ4_KS'}) → {new}", c
        if ft == "Q4_K_M":
            if model.arch == "falcon":
                new = ("Q6_K" if i_layer < n_layer // 16 else
                       "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
                return new, f"ffn_down layer {i_layer} of falcon Q4_K_M", c
            if _use_more_bits(i_layer, n_layer):
                return "Q6_K", f"ffn_down layer {i_layer} of Q4_K_M (use_more_bits) → Q6_K", c
            return t, "ftype default", c
        if ft in ("IQ4_NL", "IQ4_KS", "IQ4_KSS") and i_layer < n_layer // 8 and not opts.has_imatrix:
            return "Q5_K", f"ffn_down layer {i_layer} < n_layer/8 of {ft} without imatrix → Q5_K", c
        if ft == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            return "Q6_K", f"ffn_down layer {i_layer} of Q5_K_M (use_more_bits) → Q6_K", c
        if ft == "Q4_K_S" and model.arch != "falcon" and i_layer < n_layer // 8:
            return "Q5_K", f"ffn_down layer {i_layer} < n_layer/8 of Q4_K_S → Q5_K", c
        if ft in ("Q4_0", "Q5_0") and opts.has_imatrix and i_layer < n_layer // 8:
            new = "Q4_1" if ft == "Q4_0" else "Q5_1"
            return new, f"ffn_down layer {i_layer} < n_layer/8 of {ft} with imatrix → {new}", c
        return t, "ftype default", c

    if "attn_output.weight" in name:
        if opts.attn_output_type:
            return opts.attn_output_type, "--attn-output-type", None
        if model.arch != "falcon":
            if model.n_expert >= 4:
                if ft in _ATTN_OUT_MOE_Q5K:
                    return "Q5_K", f"attn_output of {ft} with ≥4 experts → Q5_K", None
                if ft == "IQ2_KL":
                    return "IQ4_KS", "attn_output of IQ2_KL with ≥4 experts → IQ4_KS", None
            elif ft == "IQ3_KT" and gqa >= 4:
                return "IQ3_K", f"attn_output of IQ3_KT, n_gqa={gqa} ≥ 4 → IQ3_K", None
            elif ft == "IQ2_K":
                return "IQ3_K", "attn_output of IQ2_K → IQ3_K", None
            elif ft == "IQ3_KL":
                return "IQ4_KS", "attn_output of IQ3_KL → IQ4_KS", None
        return t, "ftype default", None

    for cls in ("ffn_gate", "ffn_up"):
        if cls in name:
            c = f"i_{cls}"
            i_layer, n_layer = _layer_info(getattr(pos, c), model.n_layer, name, model)
            v = getattr(opts, f"{cls}_type")
            if v:
                return v, f"--{cls.replace('_', '-')}-type", c
            if ft == "IQ3_KL" and _use_more_bits(i_layer, n_layer):
                return "IQ4_KS", f"{cls} layer {i_layer} of IQ3_KL (use_more_bits) → IQ4_KS", c
            return t, "ftype default", c

    return t, "ftype default", None


def mix_type(name: str, shape: Sequence[int], ftype: FType | str, model: ModelFacts,
             opts: TypeOptions, pos: Position = Position()) -> Decision:
    """llama_tensor_get_type: the ftype's rules, then --override, then the 256-fallback.

    Only for tensors :func:`should_quantize` accepts, with a quantized (non-float) ftype
    and without --pure. NotImplementedError for ftypes whose special branches are missing.
    """
    ft = get_ftype(ftype)
    if not ft.has_mix_rules:
        raise NotImplementedError(
            f"the mix rules of ftype {ft.name} are not implemented in evalkit yet; use --pure "
            f"(every tensor {ft.default_type}, with the reference's fallbacks) or one of the ftypes "
            "IQ2_K..IQ6_K, IQ2_KS, IQ3_KS, IQ4_KS, IQ4_KSS, IQ5_KS, IQ2_KL, IQ3_KL, IQ1_KT..IQ4_KT, "
            "Q4_0..Q8_0, IQ4_NL, Q4_K_S/M, Q5_K_S/M, Q6_K")
    ne0 = int(shape[0])
    t, reason, counter = _ftype_rules(name, ne0, ft.default_type, ft.name, model, opts, pos)
    custom = opts.custom_type(name)
    if custom is not None:
        t, reason = custom[0], f"--override {custom[1]!r}"
    t2, note = fallback_type(t, ne0)
    if note:
        reason = f"{reason}; {note}"
    if t2 == "IQ3_S":
        # the reference's IQ3_KT mix puts token_embd in IQ3_S, a type evalkit does not have
        raise NotImplementedError(
            f"tensor {name!r}: the reference's {ft.name} mix uses IQ3_S here ({reason}), a type evalkit "
            "does not implement; choose its type with --token-embedding-type or --override")
    return Decision(t2, True, reason, counter)


def tensor_type(name: str, shape: Sequence[int], src_type: str, ftype: FType | str,
                model: ModelFacts, opts: TypeOptions, pos: Position = Position()) -> Decision:
    """The reference's full decision for one tensor (main loop of llama_model_quantize_internal).

    Returns the output type, whether the tensor is (re)quantized (False: its bytes are
    copied unchanged) and a short human-readable reason.
    """
    ft = get_ftype(ftype)
    ok, why = should_quantize(name, shape)
    if not ok:
        return Decision(src_type, False, f"kept: {why}")
    counter = None
    t = ft.default_type
    reason = "ftype default"
    if opts.pure:
        t, note = fallback_type(t, int(shape[0]))
        reason = "--pure" + (f"; {note}" if note else "")
    elif not ft.is_float:
        d = mix_type(name, shape, ft, model, opts, pos)
        t, reason, counter = d.type_name, d.reason, d.counter
    # The reference then re-applies the per-class options by *exact* tensor name. Only
    # token_embd.weight / output.weight can match (layer tensors are named blk.N.*), and
    # this happens after the fallback, so an unsuitable type is not corrected here.
    # When token_embd/output already have that type (the mix rules applied the option),
    # their reason is kept.
    for opt in CLASS_OPTIONS:
        v = getattr(opts, opt.attr)
        if v and name == opt.exact_name and (opt.layer or t != v):
            t, reason = v, opt.flag
    fmt = get_format(t)
    if int(shape[0]) % fmt.block_size:
        raise RuleError(f"tensor {name!r}: {t} needs rows that are a multiple of {fmt.block_size} "
                        f"elements, but the rows have {shape[0]} (chosen by: {reason})")
    if t == src_type:
        return Decision(t, False, f"copy: already {t} ({reason})", counter)
    return Decision(t, True, reason, counter)


def assign_types(tensors: Iterable[tuple[str, Sequence[int], str]], ftype: FType | str,
                 model: ModelFacts, opts: TypeOptions) -> list[Decision]:
    """Decide every tensor of a model, given as (name, ggml shape, source type) in file order."""
    pos = Position()
    out = []
    for name, shape, src_type in tensors:
        d = tensor_type(name, shape, src_type, ftype, model, opts, pos)
        pos = pos.advanced(d.counter)
        out.append(d)
    return out
