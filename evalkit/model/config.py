"""Model hyper-parameters, read from GGUF metadata or from a Hugging Face ``config.json``.

Supported architectures: dense decoder-only transformers of the llama family
(``llama``, ``qwen2``, ``qwen3``): RMS-norm, rotary position embeddings, grouped-query
attention, SwiGLU feed-forward. What differs between them is carried as flags:
rotary pairing (adjacent pairs vs halves), q/k/v biases (qwen2), per-head q/k RMS-norm
(qwen3), tied embeddings.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from evalkit.errors import EvalkitError
from evalkit.model.arch import ARCHITECTURES
from evalkit.model.moe_config import gguf_moe_fields
from evalkit.model.yarn import YarnScaling
from evalkit.sources.hf import HF_MODEL_TYPES

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "UnsupportedModelError"]

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


class UnsupportedModelError(EvalkitError, ValueError):
    """The model's architecture or hyper-parameters are outside what the forward pass implements."""


def _unsupported_arch(arch: Any, source: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{source}: unsupported architecture {arch!r}; supported architectures: "
        + ", ".join(SUPPORTED_ARCHITECTURES))


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a llama-family decoder.

    ``rope_neox`` selects the rotary pairing: False rotates adjacent pairs (2i, 2i+1)
    (GGML rope mode 0, what llama weights in GGUF need because convert_hf_to_gguf.py
    permuted their Q/K rows); True rotates (i, i + n_rot/2) (NEOX / HF ``rotate_half``).
    ``rope_freq_scale`` multiplies every angle (1/linear scaling factor);
    ``rope_freq_factors`` (llama3-style, length n_rot/2) divide the per-pair frequency.
    """

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    rms_eps: float
    rope_base: float = 10000.0
    n_rot: int = 0                      # rotated dimensions per head (0: head_dim)
    rope_neox: bool = False
    rope_freq_scale: float = 1.0
    rope_freq_factors: tuple[float, ...] | None = field(default=None, repr=False)
    tied_embeddings: bool = False
    qk_norm: bool = False
    attn_bias: bool = False
    n_ctx_train: int = 0
    # deepseek2 multi-head latent attention (evalkit.model.mla): q_lora_rank 0 = no q compression
    # (attn_q); head_dim is the key head size (qk_nope + qk_rope, qk_rope = n_rot); v_head_dim
    # 0 = head_dim; mla_forms: which forms the file's tensors allow ("kv_b": attn_kv_b,
    # "k_b": attn_k_b + attn_v_b). rope_yarn: YaRN scaling (None: none or linear).
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    v_head_dim: int = 0
    mla_forms: tuple[str, ...] = ()
    rope_yarn: YarnScaling | None = None
    # Mixture of experts (evalkit.model.moe; read by evalkit.model.moe_config): n_expert 0 = dense.
    # n_ff_exp: one routed expert's FFN width; n_expert_shared shared experts (n_ff_exp wide each);
    # the first n_layer_dense_lead layers are dense (n_ff). Router: expert_gating "softmax" or
    # "sigmoid" probabilities, top-n_expert_used, normalised (expert_weights_norm), scaled.
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_expert_shared: int = 0
    n_layer_dense_lead: int = 0
    expert_gating: str = "softmax"
    expert_weights_norm: bool = False
    expert_weights_scale: float = 1.0
    expert_probs_bias: bool = False     # a softmax deepseek2 router whose file has exp_probs_b (selection bias)

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported_arch(self.arch, "ModelConfig")
        if self.n_rot == 0:
            object.__setattr__(self, "n_rot", self.head_dim)
        if self.v_head_dim == 0:
            object.__setattr__(self, "v_head_dim", self.head_dim)
        for name in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ff", "n_vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UnsupportedModelError(f"ModelConfig: {name} must be a positive integer, got {v!r}")
        if self.n_head % self.n_head_kv:
            raise UnsupportedModelError(f"ModelConfig: n_head {self.n_head} is not a multiple of "
                                        f"n_head_kv {self.n_head_kv}")
        if self.n_rot % 2 or self.n_rot > self.head_dim:
            raise UnsupportedModelError(f"ModelConfig: rotary dimension {self.n_rot} must be even and at most "
                                        f"head_dim {self.head_dim}")
        if self.n_expert and not (0 < self.n_expert_used <= self.n_expert and self.n_ff_exp > 0
                                  and self.expert_gating in ("softmax", "sigmoid")):
            raise UnsupportedModelError(f"ModelConfig: bad mixture-of-experts settings: n_expert_used "
                                        f"{self.n_expert_used} of n_expert {self.n_expert}, n_ff_exp {self.n_ff_exp}, "
                                        f"gating {self.expert_gating!r}")
        if self.rope_freq_factors is not None and len(self.rope_freq_factors) != self.n_rot // 2:
            raise UnsupportedModelError(f"ModelConfig: rope_freq_factors has {len(self.rope_freq_factors)} "
                                        f"entries, expected n_rot/2 = {self.n_rot // 2}")

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head."""
        return self.n_head // self.n_head_kv

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, gguf) -> "ModelConfig":
        """Read hyper-parameters from an open :class:`evalkit.gguf.GGUFFile` (or a path).

        Reads ``{arch}.*`` keys as llama.cpp does; llama3-style frequency factors come from
        the ``rope_freqs.weight`` tensor, linear scaling from ``{arch}.rope.scaling.factor``
        (or the older ``{arch}.rope.scale_linear``). Every value is checked (type, range,
        consistency) before it is used, so bad metadata raises UnsupportedModelError naming
        the key, never a ZeroDivisionError or a loop over a corrupt layer count.
        """
        from evalkit.gguf import GGUFFile
        if not isinstance(gguf, GGUFFile):
            gguf = GGUFFile(gguf)
        md = gguf.metadata
        arch = md.get("general.architecture")
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported_arch(arch, gguf.path)
        k = _GGUFKeys(md, arch, gguf.path)

        n_layer = k.integer("block_count")
        _check_layer_count(gguf, k, n_layer)
        n_embd = k.integer("embedding_length")
        n_head = k.uniform_integer("attention.head_count")
        n_head_kv = k.uniform_integer("attention.head_count_kv", n_head)
        if n_head % n_head_kv:
            raise k.error("attention.head_count_kv", f"{n_head_kv} does not divide {arch}.attention.head_count "
                          f"{n_head}")
        if f"{arch}.attention.key_length" not in md and n_embd % n_head:
            raise k.error("attention.head_count", f"{n_head} does not divide {arch}.embedding_length {n_embd}")
        head_dim = k.integer("attention.key_length", n_embd // n_head)
        v_dim = k.integer("attention.value_length", head_dim)
        if v_dim != head_dim and f"{arch}.attention.kv_lora_rank" not in md:     # (MLA: v differs)
            raise k.error("attention.value_length", f"value head size {v_dim} differs from the key head size "
                                                    f"{head_dim}")
        n_rot = k.integer("rope.dimension_count", head_dim, minimum=0)
        if n_rot % 2 or n_rot > head_dim:
            raise k.error("rope.dimension_count", f"{n_rot} must be even and at most the head size {head_dim}")
        freq_scale, freq_factors, yarn = _gguf_rope_scaling(gguf, k)
        has = gguf.tensors.__contains__
        mla = _gguf_mla(gguf, k, n_head, n_head_kv, head_dim, n_rot, v_dim)
        n_ff = k.uniform_integer("feed_forward_length")
        moe = gguf_moe_fields(k, n_layer, n_ff, has)
        if k.number("attention.temperature_scale", 0.0):
            raise k.error("attention.temperature_scale", "attention temperature scaling is not supported")
        return cls(
            arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=n_ff,
            n_vocab=_gguf_vocab_size(gguf, k),
            rms_eps=k.number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=k.number("rope.freq_base", 10000.0, positive=True),
            n_rot=n_rot,
            # llama's Q/K rows were permuted by the converter -> adjacent pairs; qwen: NEOX.
            rope_neox=ARCHITECTURES[arch].rope_neox,
            rope_freq_scale=freq_scale,
            rope_freq_factors=freq_factors,
            tied_embeddings=not has("output.weight"),
            qk_norm=has("blk.0.attn_q_norm.weight"),
            attn_bias=has("blk.0.attn_q.bias"),
            n_ctx_train=k.integer("context_length", 0, minimum=0),
            rope_yarn=yarn,
            **mla,
            **moe,
        )

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, model_dir: str | Path) -> "ModelConfig":
        """Read ``config.json`` of a Hugging Face checkpoint directory.

        HF llama Q/K weights are not permuted, so every HF model uses NEOX pairing here.
        """
        path = Path(model_dir) / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{model_dir}: no config.json (not a Hugging Face checkpoint directory)") from None
        mt = cfg.get("model_type")
        arch = HF_MODEL_TYPES.get(mt)
        if arch is None:
            raise _unsupported_arch(mt, str(path))
        n_embd = _hf_int(cfg, "hidden_size", path)
        n_head = _hf_int(cfg, "num_attention_heads", path)     # positive: the division below is safe
        head_dim = int(cfg.get("head_dim") or n_embd // n_head)
        n_rot = int(head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
        base = float(cfg.get("rope_theta", 10000.0))

        freq_scale, freq_factors = 1.0, None
        rs = cfg.get("rope_scaling") or {}
        rtype = rs.get("rope_type", rs.get("type", "default")) if rs else "default"
        if rtype == "linear":
            freq_scale = 1.0 / float(rs["factor"])
        elif rtype == "llama3":
            freq_factors = tuple(_llama3_freq_factors(base, n_rot, rs))
        elif rtype not in ("default", None):
            raise UnsupportedModelError(f"{path}: rope scaling {rtype!r} is not supported "
                                        "(supported: none, linear, llama3)")
        attn_bias = arch == "qwen2" or bool(cfg.get("attention_bias", False))
        return cls(
            arch=arch,
            n_layer=_hf_int(cfg, "num_hidden_layers", path),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=head_dim,
            n_ff=_hf_int(cfg, "intermediate_size", path),
            n_vocab=_hf_int(cfg, "vocab_size", path),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_base=base,
            n_rot=n_rot,
            rope_neox=True,
            rope_freq_scale=freq_scale,
            rope_freq_factors=freq_factors,
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=arch == "qwen3",
            attn_bias=attn_bias,
            n_ctx_train=int(cfg.get("max_position_embeddings", 0) or 0),
        )

    # ------------------------------------------------------------------ shapes
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected tensors and their shapes in ggml order (ne0 = row length first)."""
        e = self.n_embd
        shapes: dict[str, tuple[int, ...]] = {
            "token_embd.weight": (e, self.n_vocab),
            "output_norm.weight": (e,),
        }
        if not self.tied_embeddings:
            shapes["output.weight"] = (e, self.n_vocab)
        layer_shapes = ARCHITECTURES[self.arch].layer_shapes          # per layer: leading dense vs MoE
        for i in range(self.n_layer):
            shapes.update({f"blk.{i}.{name}": shape for name, shape in layer_shapes(self, i).items()})
        return shapes


class _GGUFKeys:
    """Typed reads of one GGUF's ``{arch}.*`` keys; every error names the key and the file.

    As llama.cpp's ``llama_model_loader::get_key``, a value of the wrong type is an error
    (no float block counts, no string head counts), and counts must be positive.
    """

    def __init__(self, md: dict[str, Any], arch: str, src: str):
        self.md, self.arch, self.src = md, arch, src

    def error(self, name: str, problem: str) -> UnsupportedModelError:
        """The error for key ``{arch}.name``."""
        return UnsupportedModelError(f"{self.src}: metadata key {self.arch}.{name}: {problem}")

    def raw(self, name: str, default: Any = ...) -> Any:
        """The value as stored, ``default`` when absent (``...``: the key is required)."""
        full = f"{self.arch}.{name}"
        if full in self.md:
            return self.md[full]
        if default is ...:
            raise UnsupportedModelError(f"{self.src}: required metadata key {full!r} is missing")
        return default

    def _int(self, name: str, value: Any, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {_describe(value)}")
        if value < minimum:
            raise self.error(name, f"must be {'positive' if minimum == 1 else f'at least {minimum}'}, "
                                   f"got {value}")
        return value

    def integer(self, name: str, default: Any = ..., minimum: int = 1) -> int:
        """An integer key, at least ``minimum``."""
        return self._int(name, self.raw(name, default), minimum)

    def uniform_integer(self, name: str, default: Any = ..., minimum: int = 1) -> int:
        """An integer key that some converters store per layer; this forward needs one value for all."""
        value = self.raw(name, default)
        if isinstance(value, list):
            if not value or any(v != value[0] for v in value):
                raise self.error(name, f"per-layer values {str(value)[:80]} are not supported (they must "
                                       "all be equal)")
            value = value[0]
        return self._int(name, value, minimum)

    def number(self, name: str, default: Any, positive: bool = False) -> float:
        """A finite non-negative number (``positive``: > 0)."""
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"must be a number, got {_describe(value)}")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise self.error(name, f"must be a finite {'positive' if positive else 'non-negative'} number, "
                                   f"got {value}")
        return float(value)


def _describe(value: Any) -> str:
    kind = {str: "a string", float: "a float", list: "an array", bool: "a bool"}.get(type(value), type(value).__name__)
    return f"{kind} {str(value)[:40]!r}" if isinstance(value, (str, list)) else f"{kind} {value!r}"


def _check_layer_count(gguf, k: _GGUFKeys, n_layer: int) -> None:
    """``{arch}.block_count`` must match the ``blk.N`` layers present (llama.cpp's loader
    reports missing tensors, then a wrong tensor count, for either mismatch)."""
    layers = set()
    for name in gguf.tensors:
        head, _, rest = name.partition(".")
        idx = rest.split(".", 1)[0]
        if head == "blk" and idx.isdigit():
            layers.add(int(idx))
    if n_layer != len(layers):
        found = f"blk.{min(layers)} … blk.{max(layers)}" if layers else "none"
        raise k.error("block_count", f"{n_layer} layers declared but the file has tensors for "
                                     f"{len(layers)} layers ({found})")


def _gguf_vocab_size(gguf, k: _GGUFKeys) -> int:
    """{arch}.vocab_size, else the tokenizer's size, else token_embd's rows."""
    md = gguf.metadata
    if f"{k.arch}.vocab_size" in md:
        return k.integer("vocab_size")
    toks = md.get("tokenizer.ggml.tokens")
    if isinstance(toks, list) and toks:
        return len(toks)
    if "token_embd.weight" in gguf.tensors:
        return int(gguf.tensors["token_embd.weight"].shape[-1])
    raise UnsupportedModelError(f"{gguf.path}: cannot determine the vocabulary size "
                                f"(no {k.arch}.vocab_size, no tokenizer, no token_embd.weight)")


def _gguf_rope_scaling(gguf, k: _GGUFKeys) -> tuple[float, tuple[float, ...] | None, YarnScaling | None]:
    """(freq_scale, llama3 frequency factors or None, YaRN parameters or None) from a GGUF's rope
    keys and rope_freqs tensor; YaRN only for the architectures whose block implements it."""
    src = gguf.path
    # As llama.cpp: the factor (new key, else the old one) gives freq_scale = 1/factor;
    # the type defaults to "linear", and type "none" never scales.
    scaling = str(k.raw("rope.scaling.type", "linear") or "linear").lower()
    factor = k.number("rope.scaling.factor", 0.0)
    if factor == 0.0:
        factor = k.number("rope.scale_linear", 0.0)
    if factor == 0.0:
        factor = 1.0
    yarn_ok = ARCHITECTURES[k.arch].rope_yarn
    if scaling not in ("none", "linear") and not (scaling == "yarn" and (factor == 1.0 or yarn_ok)):
        # (YaRN with factor 1 is exactly unscaled rope.)
        raise UnsupportedModelError(f"{src}: rope scaling type {scaling!r} is not supported for {k.arch} "
                                    f"(supported: none, linear, {'yarn, ' if yarn_ok else ''}llama3 frequency "
                                    "factors)")
    freq_scale = 1.0 if scaling == "none" else 1.0 / factor
    yarn = _gguf_yarn(k, factor) if scaling == "yarn" and yarn_ok else None

    freq_factors = None
    if "rope_freqs.weight" in gguf.tensors:
        freq_factors = tuple(float(v) for v in gguf.dequantize("rope_freqs.weight").reshape(-1))
        if not all(math.isfinite(v) and v > 0 for v in freq_factors):
            raise UnsupportedModelError(f"{src}: tensor 'rope_freqs.weight' holds a value that is not a finite "
                                        "positive number")
    return freq_scale, freq_factors, yarn


def _gguf_yarn(k: _GGUFKeys, factor: float) -> YarnScaling:
    """YaRN parameters as ik_llama.cpp sets them for deepseek2: the original context (default the
    training context), ``rope.scaling.attn_factor`` (default 1) and ``yarn_log_multiplier``
    (default 0); ext_factor 1 and beta_fast/slow 32/1 are llama.cpp's defaults (deepseek2 reads
    no keys for them)."""
    n_ctx_orig = k.integer("rope.scaling.original_context_length", k.integer("context_length", 0, minimum=0),
                           minimum=0)
    if n_ctx_orig == 0:
        raise k.error("rope.scaling.original_context_length", "YaRN needs the original context length "
                      "(neither it nor context_length is given)")
    return YarnScaling(factor=factor, n_ctx_orig=n_ctx_orig,
                       attn_factor=k.number("rope.scaling.attn_factor", 1.0, positive=True),
                       log_mul=k.number("rope.scaling.yarn_log_multiplier", 0.0))


def _gguf_mla(gguf, k: _GGUFKeys, n_head: int, n_head_kv: int, head_dim: int, n_rot: int,
              v_dim: int) -> dict[str, Any]:
    """The multi-head latent attention fields (empty for a model without ``attention.kv_lora_rank``).

    Only ik_llama.cpp's layout (head_count_kv == head_count, key_length = qk_nope + qk_rope) is
    read; which MLA forms the tensors allow comes from layer 0 (every layer's tensors are then
    checked against it).
    """
    if f"{k.arch}.attention.kv_lora_rank" not in k.md:
        return {}
    if n_head_kv != n_head:
        raise k.error("attention.head_count_kv", f"{n_head_kv} differs from head_count {n_head}: the mainline "
                      "MLA layout (one kv head, key_length_mla) is not supported; convert with ik_llama.cpp")
    if n_rot >= head_dim:
        raise k.error("rope.dimension_count", f"{n_rot} leaves no non-rotated key dims in key_length {head_dim}")
    has = gguf.tensors.__contains__
    forms = tuple(f for f, names in (("kv_b", ("attn_kv_b",)), ("k_b", ("attn_k_b", "attn_v_b")))
                  if all(has(f"blk.0.{n}.weight") for n in names))
    if not forms:
        raise UnsupportedModelError(f"{gguf.path}: MLA tensor 'blk.0.attn_kv_b.weight' is missing, and so is the "
                                    "'blk.0.attn_k_b.weight' + 'blk.0.attn_v_b.weight' pair that can replace it")
    return dict(q_lora_rank=k.integer("attention.q_lora_rank", 0, minimum=0),
                kv_lora_rank=k.integer("attention.kv_lora_rank"), v_head_dim=v_dim, mla_forms=forms)


def _hf_int(cfg: dict, name: str, path: Path) -> int:
    """A required positive integer of a ``config.json``."""
    if name not in cfg:
        raise UnsupportedModelError(f"{path}: required key {name!r} is missing")
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise UnsupportedModelError(f"{path}: {name} must be a positive integer, got {v!r}")
    return v


def _llama3_freq_factors(base: float, n_rot: int, rs: dict) -> list[float]:
    """Per-pair frequency divisors of llama3 rope scaling, as convert_hf_to_gguf.py stores them."""
    factor = float(rs.get("factor", 8.0))
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, n_rot, 2):
        freq = 1.0 / (base ** (i / n_rot))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out
