"""The float32 reference forward pass of a llama-family decoder, straight from GGUF bytes.

Read it top to bottom: RMSNorm, rotary embedding, one transformer block, the model.
Module and attribute names mirror the GGUF tensor names (``token_embd``,
``blk[i].attn_q``, ``output_norm``, ``output`` ...). Every linear layer is a
:class:`~evalkit.model.qlinear.QLinear` that multiplies through the packed quantized
bytes, so activations and arithmetic are exact float32 and the only error left is the
weights' own.

Shapes: B sequences, T tokens, E = n_embd, H / Hkv query / key-value heads, D = head_dim,
F = n_ff, V = n_vocab.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evalkit.model.arch import get_architecture
from evalkit.model.attention import CausalAttention
from evalkit.model.config import ModelConfig
import evalkit.model.norm_act  # noqa: F401  (registers evalkit::rms_norm, evalkit::swiglu)
from evalkit.model.ops import call
from evalkit.model.qlinear import QEmbedding, QLinear
from evalkit.errors import EvalkitError

__all__ = ["Model", "Block", "RMSNorm", "Rope", "CausalAttention", "Workspace", "ModelTensorError"]


class ModelTensorError(EvalkitError, ValueError):
    """A tensor the architecture needs is missing, misshapen, or of an unusable type."""


# --------------------------------------------------------------------------- pieces

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise x (..., n) over its last dimension (into the contiguous ``out`` when given,
        which must not overlap x)."""
        out = torch.empty(x.shape) if out is None else out
        call("rms_norm", x, self.weight, self.eps, out)
        return out


class Rope(nn.Module):
    """Rotary position embedding of the first ``n_rot`` dims of every head.

    Pair i (i < n_rot/2) is rotated by angle  pos * freq_scale * base^(-2i/n_rot) / factor_i:
    (a, b) -> (a cos - b sin, a sin + b cos).
    ``neox=False`` pairs adjacent dims (2i, 2i+1) (GGML mode 0, llama in GGUF);
    ``neox=True`` pairs (i, i + n_rot/2) (qwen, and every HF checkpoint).
    Angles are computed in float64 and their cos/sin rounded once to float32.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_rot, self.neox = cfg.n_rot, cfg.rope_neox
        i = torch.arange(0, cfg.n_rot, 2, dtype=torch.float64)
        inv_freq = cfg.rope_freq_scale * cfg.rope_base ** (-i / cfg.n_rot)           # (n_rot/2,)
        if cfg.rope_freq_factors is not None:
            inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float64)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def tables(self, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos, sin (T, 1, n_rot/2) float32 and cos + i sin (complex64) for positions 0..T-1."""
        if T not in self._cache:
            ang = torch.outer(torch.arange(T, dtype=torch.float64), self.inv_freq)      # (T, n_rot/2)
            cos, sin = ang.cos().float().unsqueeze(1), ang.sin().float().unsqueeze(1)
            self._cache = {T: (cos, sin, torch.complex(cos, sin))}                       # keep one length
        return self._cache[T]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, T, heads, D) by position (0..T-1), in place; returns x."""
        B, T, h, D = x.shape
        n = self.n_rot
        cos, sin, cis = self.tables(T)
        if not self.neox and n == D and x.is_contiguous():
            # adjacent pairs are complex numbers a + ib; one complex multiply rotates them
            # ((a cos - b sin) + i(a sin + b cos), each product rounded once, no FMA).
            torch.view_as_complex(x.view(B, T, h, D // 2, 2)).mul_(cis)
            return x
        if self.neox:
            x0, x1 = x[..., :n // 2], x[..., n // 2:n]                     # (B, T, h, n/2) each
        else:
            x0, x1 = x[..., :n].unflatten(-1, (-1, 2)).unbind(-1)          # even, odd dims
        re = (x0 * cos).sub_(x1 * sin)                                    # a cos - b sin
        im = (x1 * cos).add_(x0 * sin)                                    # b cos + a sin
        x0.copy_(re)
        x1.copy_(im)
        return x


class Block(nn.Module):
    """One pre-norm transformer block: causal GQA self-attention, then a SwiGLU MLP, or the
    mixture-of-experts FFN (:class:`~evalkit.model.moe.MoEFFN`) in a layer with a router."""

    def __init__(self, cfg: ModelConfig, t: dict):
        super().__init__()
        self.n_head, self.n_head_kv, self.head_dim = cfg.n_head, cfg.n_head_kv, cfg.head_dim
        self.n_ff = cfg.n_ff
        self.attn_norm = RMSNorm(t["attn_norm.weight"], cfg.rms_eps)
        self.attn_q = t["attn_q"]
        self.attn_k = t["attn_k"]
        self.attn_v = t["attn_v"]
        self.attn_q_norm = RMSNorm(t["attn_q_norm.weight"], cfg.rms_eps) if cfg.qk_norm else None
        self.attn_k_norm = RMSNorm(t["attn_k_norm.weight"], cfg.rms_eps) if cfg.qk_norm else None
        self.attn_output = t["attn_output"]
        # (glm4moe names its FFN norm post_attention_norm)
        self.ffn_norm = RMSNorm(t.get("ffn_norm.weight", t.get("post_attention_norm.weight")), cfg.rms_eps)
        self.moe = None
        if "ffn_gate_inp" in t:                                           # a mixture-of-experts layer
            from evalkit.model.moe import MoEFFN
            self.moe = MoEFFN(cfg, t)
        else:
            self.ffn_gate = t["ffn_gate"]
            self.ffn_up = t["ffn_up"]
            self.ffn_down = t["ffn_down"]
        self.attention = CausalAttention()

    def forward(self, x: torch.Tensor, rope: Rope, ws: "Workspace", keep_from: int = 0) -> torch.Tensor:
        """x (B, T, E) -> x + attention + feed-forward, (B, T - keep_from, E).

        Activations go into ``ws``'s reused buffers and the residual stream is updated in
        place. ``keep_from`` > 0 (the last block, when only later positions' logits are
        wanted): keys and values cover every position, everything after the attention
        (the attention's queries included) only the positions from ``keep_from`` on, as
        llama.cpp's last layer does.
        """
        B, T, E = x.shape                                                 # x: (B, T, E)
        H, Hkv, D = self.n_head, self.n_head_kv, self.head_dim

        # --- attention
        h = self.attn_norm(x, out=ws("h", B, T, E))                       # (B, T, E)
        q = self.attn_q(h, out=ws("q", B, T, H * D)).view(B, T, H, D)     # (B, T, H, D)
        k = self.attn_k(h, out=ws("k", B, T, Hkv * D)).view(B, T, Hkv, D)  # (B, T, Hkv, D)
        v = self.attn_v(h, out=ws("v", B, T, Hkv * D)).view(B, T, Hkv, D)  # (B, T, Hkv, D)
        if self.attn_q_norm is not None:                                  # qwen3: per-head RMS norm
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k = rope(q), rope(k)                                           # in place
        if keep_from:
            x, T = x[:, keep_from:], T - keep_from                        # (B, T', E) from here on
        y = self.attention(q, k, v, out=ws("y", B, T, H, D), q_from=keep_from)   # (B, T', H, D)
        x.add_(self.attn_output(y.view(B, T, H * D), out=ws("o", B, T, E)))      # (B, T', E)

        # --- feed-forward
        h = self.ffn_norm(x, out=ws("h", B, T, E))                        # (B, T, E)
        if self.moe is not None:                                          # (x + routed) + shared, in place
            return self.moe(h.view(B * T, E), ws, residual=x)
        g = self.ffn_gate(h, out=ws("g", B, T, self.n_ff))                # (B, T, F)
        u = self.ffn_up(h, out=ws("u", B, T, self.n_ff))                  # (B, T, F)
        call("swiglu", g, u, g)                                 # silu(g) * u, in place
        a = g                                                             # (B, T, F)
        return x.add_(self.ffn_down(a, out=ws("o", B, T, E)))             # (B, T, E)


class Workspace:
    """Named float32 buffers, grown as needed and reused: one forward call's activations
    (reused by every block), or the logits of successive calls (evalkit run, perplexity).

    A fresh multi-MiB tensor per operation costs page faults and cold caches (about a
    tenth of the GEMM time on CPU); one buffer per role, reused 30-odd times, does not.
    """

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        """The buffer ``name`` viewed as a contiguous float32 tensor of ``shape``."""
        n = 1
        for d in shape:
            n *= d
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self._bufs[name] = torch.empty(n, dtype=torch.float32)
        return buf[:n].view(shape)


# --------------------------------------------------------------------------- the model

class Model(nn.Module):
    """token_embd -> n_layer x Block -> output_norm -> output, all float32.

    Build with :meth:`from_gguf`, :meth:`from_hf` or :meth:`from_source`; call ``model(tokens)``.
    """

    def __init__(self, cfg: ModelConfig, tensors: dict, source=None):
        super().__init__()
        self.config = cfg
        self.source = source          # keeps the memory maps alive while weights point into them
        self.token_embd = tensors["token_embd"]
        self.rope = Rope(cfg)
        block = get_architecture(cfg.arch).block_class()           # Block for the llama family
        self.blk = nn.ModuleList(
            block(cfg, {k[len(f"blk.{i}."):]: v for k, v in tensors.items() if k.startswith(f"blk.{i}.")})
            for i in range(cfg.n_layer))
        self.output_norm = RMSNorm(tensors["output_norm.weight"], cfg.rms_eps)
        self.output = tensors["output"]

    @torch.inference_mode()
    def forward(self, tokens, logits_start: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for one sequence (T,) -> (T, V), or a batch of sequences (B, T) -> (B, T, V).

        Every sequence starts at position 0 with an empty cache. ``logits_start`` skips the
        output projection of positions before it (perplexity scores only the second half
        of a chunk); the result then has T - logits_start rows per sequence. ``out``: a
        contiguous float32 tensor of the result's shape to write the logits into (reusing
        it across calls saves a quarter of the output projection's time: fresh pages).
        """
        tokens = torch.as_tensor(tokens)
        single = tokens.dim() == 1
        if single:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (T,) or (B, T) with T > 0, got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        if not 0 <= logits_start < tokens.shape[1]:
            raise ValueError(f"logits_start {logits_start} outside [0, {tokens.shape[1]})")

        x = self.token_embd(tokens.long())                                # (B, T, E)
        ws = Workspace()
        last = len(self.blk) - 1
        for i, blk in enumerate(self.blk):
            x = blk(x, self.rope, ws, keep_from=logits_start if i == last else 0)
        x = self.output_norm(x)                                           # (B, T', E)
        if out is not None and single:
            out = out.unsqueeze(0)
        logits = self.output(x, out=out)                                  # (B, T', V)
        return logits[0] if single else logits

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_gguf(cls, path_or_gguf) -> "Model":
        """Build from a GGUF file (path or open :class:`~evalkit.gguf.GGUFFile`), weights zero-copy.

        The thread count is the caller's (torch's team, set once at the entry point).
        """
        from evalkit.sources import GGUFSource
        source = GGUFSource(path_or_gguf)
        return cls.from_source(source, ModelConfig.from_gguf(source.file))

    @classmethod
    def from_hf(cls, model_dir) -> "Model":
        """Build from a Hugging Face checkpoint directory (config.json + *.safetensors).

        F32/F16/BF16 tensors are used in their stored precision (memory-mapped, widened to
        float32 tile by tile). HF Q/K rows are not permuted, so rope uses NEOX pairing.
        """
        from evalkit.sources import HFSource
        cfg = ModelConfig.from_hf(model_dir)            # first: its errors name the architecture
        return cls.from_source(HFSource(model_dir, permute_qk=False), cfg)

    @classmethod
    def from_source(cls, source, cfg: ModelConfig) -> "Model":
        """Build from an open :class:`~evalkit.sources.TensorSource` whose tensors ``cfg`` describes.

        Matrices stay in the source's stored bytes (zero-copy); norms and biases are widened
        to float32. ``cfg.rope_neox`` must match the source's Q/K row order. The model keeps
        the source open (its weights point into it).
        """
        infos = {t.name: t for t in source.tensors}
        _check_layer_count(cfg, infos, source.path)
        _check_shapes(cfg, {n: tuple(t.shape) for n, t in infos.items()}, source.path)
        tensors = {}
        for name in cfg.tensor_shapes():
            info = infos[name]
            try:
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    vec = np.array(source.rows_f32(name), dtype=np.float32).reshape(-1)
                    _check_finite(vec, name, source.path)
                    tensors[name] = torch.from_numpy(vec)
                elif name == "token_embd.weight":
                    # get_rows: the reference's to_float dequantizer
                    tensors["token_embd"] = QEmbedding(source.raw(name), info.type_name, info.n_per_row)
                else:
                    tensors[name[:-len(".weight")]] = QLinear(source.raw(name), info.type_name, info.n_per_row)
            except NotImplementedError as e:
                raise NotImplementedError(f"{source.path}: tensor {name!r} ({info.type_name}): {e}") from None
        _attach_biases(tensors)
        if cfg.tied_embeddings:
            # The reference multiplies by token_embd in its matmul: use the matmul dequantizer.
            t = infos["token_embd.weight"]
            tensors["output"] = QLinear(source.raw("token_embd.weight"), t.type_name, t.n_per_row)
        return cls(cfg, tensors, source=source)


# --------------------------------------------------------------------------- helpers

def _check_layer_count(cfg: ModelConfig, infos: dict, src: str) -> None:
    """The config's layer count must be the ``blk.N`` layers present, checked before anything
    loops over it (a corrupt count of 2^31 would otherwise build billions of names)."""
    layers = {name.split(".")[1] for name in infos if name.startswith("blk.")}
    if cfg.n_layer != len(layers):
        raise ModelTensorError(f"{src}: the model has {cfg.n_layer} layers but its tensors cover "
                               f"{len(layers)} (blk.N names)")


def _check_finite(vec: np.ndarray, name: str, src: str) -> None:
    """Norm weights and biases are few: a NaN/Inf among them is found here, not as NaN logits."""
    bad = np.flatnonzero(~np.isfinite(vec))
    if bad.size:
        raise ModelTensorError(f"{src}: tensor {name!r} holds a non-finite value {vec[bad[0]]} at element "
                               f"{int(bad[0])} ({bad.size} in all)")


def _check_shapes(cfg: ModelConfig, have: dict[str, tuple[int, ...]], src: str) -> None:
    """Every tensor the config implies must exist with its exact shape (ggml order)."""
    for name, want in cfg.tensor_shapes().items():
        got = have.get(name)
        if got is None:
            raise ModelTensorError(f"{src}: tensor {name!r} is missing (expected shape {want}, ggml order "
                                   f"ne0 first)")
        # a 1-D tensor may be stored with trailing unit dimensions
        if tuple(got) != want and not (len(want) == 1 and tuple(got[:1]) == want and all(d == 1 for d in got[1:])):
            raise ModelTensorError(f"{src}: tensor {name!r} has shape {tuple(got)}, expected {want} "
                                   f"(ggml order, ne0 first)")


def _attach_biases(tensors: dict) -> None:
    for name in [n for n in tensors if n.endswith(".bias")]:
        lin = tensors.get(name[:-len(".bias")])
        if isinstance(lin, QLinear):
            lin.bias = tensors.pop(name)
