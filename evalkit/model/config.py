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

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported_arch(self.arch, "ModelConfig")
        if self.n_rot == 0:
            object.__setattr__(self, "n_rot", self.head_dim)
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
        (or the older ``{arch}.rope.scale_linear``).
        """
        from evalkit.gguf import GGUFFile
        if not isinstance(gguf, GGUFFile):
            gguf = GGUFFile(gguf)
        md = gguf.metadata
        src = gguf.path
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise _unsupported_arch(arch, src)

        def key(name: str, default: Any = ...) -> Any:
            full = f"{arch}.{name}"
            if full in md:
                return md[full]
            if default is ...:
                raise UnsupportedModelError(f"{src}: required metadata key {full!r} is missing")
            return default

        def uniform(name: str, value: Any) -> int:
            # Some converters store per-layer arrays; this forward needs one value for all.
            if isinstance(value, list):
                if not value or any(v != value[0] for v in value):
                    raise UnsupportedModelError(f"{src}: per-layer {arch}.{name} values {value} are not "
                                                "supported (they must all be equal)")
                value = value[0]
            return int(value)

        n_embd = int(key("embedding_length"))
        n_head = uniform("attention.head_count", key("attention.head_count"))
        n_head_kv = uniform("attention.head_count_kv", key("attention.head_count_kv", n_head))
        head_dim = int(key("attention.key_length", n_embd // n_head))
        v_dim = int(key("attention.value_length", head_dim))
        if v_dim != head_dim:
            raise UnsupportedModelError(f"{src}: value head size {v_dim} differs from key head size {head_dim}")
        n_ff = uniform("feed_forward_length", key("feed_forward_length"))
        n_vocab = _gguf_vocab_size(gguf, arch)

        freq_scale, freq_factors = _gguf_rope_scaling(gguf, key)

        has = gguf.tensors.__contains__
        return cls(
            arch=arch,
            n_layer=int(key("block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_ff=n_ff,
            n_vocab=int(n_vocab),
            rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(key("rope.freq_base", 10000.0)),
            n_rot=int(key("rope.dimension_count", head_dim)),
            # llama's Q/K rows were permuted by the converter -> adjacent pairs; qwen: NEOX.
            rope_neox=ARCHITECTURES[arch].rope_neox,
            rope_freq_scale=freq_scale,
            rope_freq_factors=freq_factors,
            tied_embeddings=not has("output.weight"),
            qk_norm=has("blk.0.attn_q_norm.weight"),
            attn_bias=has("blk.0.attn_q.bias"),
            n_ctx_train=int(key("context_length", 0)),
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
        n_embd = int(cfg["hidden_size"])
        n_head = int(cfg["num_attention_heads"])
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
            n_layer=int(cfg["num_hidden_layers"]),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=head_dim,
            n_ff=int(cfg["intermediate_size"]),
            n_vocab=int(cfg["vocab_size"]),
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
        layer = ARCHITECTURES[self.arch].layer_shapes(self)
        for i in range(self.n_layer):
            shapes.update({f"blk.{i}.{name}": shape for name, shape in layer.items()})
        return shapes


def _gguf_vocab_size(gguf, arch: str) -> int:
    """{arch}.vocab_size, else the tokenizer's size, else token_embd's rows."""
    md = gguf.metadata
    n_vocab = md.get(f"{arch}.vocab_size")
    if n_vocab is None:
        toks = md.get("tokenizer.ggml.tokens")
        if toks:
            n_vocab = len(toks)
        elif "token_embd.weight" in gguf.tensors:
            n_vocab = gguf.tensors["token_embd.weight"].shape[-1]
        else:
            raise UnsupportedModelError(f"{gguf.path}: cannot determine the vocabulary size "
                                        f"(no {arch}.vocab_size, no tokenizer, no token_embd.weight)")
    return int(n_vocab)


def _gguf_rope_scaling(gguf, key) -> tuple[float, tuple[float, ...] | None]:
    """(freq_scale, llama3 frequency factors or None) from a GGUF's rope keys and rope_freqs tensor."""
    src = gguf.path
    # As llama.cpp: the factor (new key, else the old one) gives freq_scale = 1/factor;
    # the type defaults to "linear", and type "none" never scales.
    scaling = str(key("rope.scaling.type", "linear") or "linear").lower()
    factor = float(key("rope.scaling.factor", 0.0) or 0.0)
    if factor == 0.0:
        factor = float(key("rope.scale_linear", 0.0) or 0.0)
    if factor == 0.0:
        factor = 1.0
    if scaling not in ("none", "linear") and not (scaling == "yarn" and factor == 1.0):
        # (YaRN with factor 1 is exactly unscaled rope.)
        raise UnsupportedModelError(f"{src}: rope scaling type {scaling!r} is not supported "
                                    "(supported: none, linear, llama3 frequency factors)")
    freq_scale = 1.0 if scaling == "none" else 1.0 / factor

    freq_factors = None
    if "rope_freqs.weight" in gguf.tensors:
        freq_factors = tuple(float(v) for v in gguf.dequantize("rope_freqs.weight").reshape(-1))
    return freq_scale, freq_factors


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
