"""One layer of a model at a time: build its modules from the tensor source, use them, release them.

:class:`~evalkit.model.model.Model` builds every layer up front. Its weights are zero-copy
views of the file's memory map, so building costs nothing, but every page a forward call
touches stays in the process's memory while the file is mapped: after one pass the whole
model is resident. Layer-major evaluation (:mod:`evalkit.evaluation.layer_major`) instead
asks this class for the embedding, then block 0, 1, ... and the head, each built only when
needed (a repacked tensor's converted copy exists only while its layer does) and each
layer's pages dropped from the process (``madvise(MADV_DONTNEED)``) once every chunk has
gone through it. The modules are the very ones ``Model`` builds (same classes, same
tensors), so the arithmetic is bit-identical.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evalkit.errors import EvalkitError
from evalkit.model.arch import get_architecture
from evalkit.model.config import ModelConfig
from evalkit.model.model import (ModelTensorError, RMSNorm, Rope, _attach_biases, _check_finite,
                                 _check_layer_count, _check_shapes)
from evalkit.model.qlinear import QEmbedding, QLinear

__all__ = ["LayerwiseModel", "RoutingCapture", "layer_tensor_names"]


def layer_tensor_names(cfg: ModelConfig, names, il: int) -> list[str]:
    """The tensors of layer ``il`` among ``names`` (full GGUF names, ``blk.<il>.`` prefix)."""
    prefix = f"blk.{il}."
    return [n for n in names if n.startswith(prefix)]


class LayerwiseModel:
    """A model file opened for layer-by-layer use: ``embedding()``, ``block(i)``, ``head()``,
    ``release_layer(i)`` / ``release(name)``.

    Every check :meth:`Model.from_source` makes (layer count, shapes) is made at open, so a
    bad file fails before any layer runs. ``path``: a GGUF file or a Hugging Face folder.
    """

    def __init__(self, path: str | Path):
        from evalkit.sources import GGUFSource, HFSource
        self.path = Path(path)
        try:
            if self.path.is_dir():
                self.config = ModelConfig.from_hf(self.path)
                self.source = HFSource(self.path, permute_qk=False)
            else:
                self.source = GGUFSource(self.path)
                self.config = ModelConfig.from_gguf(self.source.file)
        except EvalkitError:
            raise
        except (ValueError, KeyError) as e:
            from evalkit.evaluation.forward import ModelLoadError
            raise ModelLoadError(f"{path}: {e}") from None
        self.infos = {t.name: t for t in self.source.tensors}
        _check_layer_count(self.config, self.infos, self.source.path)
        _check_shapes(self.config, {n: tuple(t.shape) for n, t in self.infos.items()}, self.source.path)
        self._names = list(self.config.tensor_shapes())
        self.rope = Rope(self.config)
        self._block_class = get_architecture(self.config.arch).block_class()

    @property
    def n_layer(self) -> int:
        """Number of transformer blocks."""
        return self.config.n_layer

    def _tensors(self, names: list[str]) -> dict:
        """The modules/vectors of ``names`` as Model.from_source builds them (full names, biases
        attached to their linear layers)."""
        out = {}
        for name in names:
            info = self.infos[name]
            try:
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    vec = np.array(self.source.rows_f32(name), dtype=np.float32).reshape(-1)   # a copy
                    _check_finite(vec, name, self.source.path)
                    out[name] = torch.from_numpy(vec)
                else:
                    out[name[:-len(".weight")]] = QLinear(self.source.raw(name), info.type_name, info.n_per_row)
            except NotImplementedError as e:
                raise NotImplementedError(f"{self.source.path}: tensor {name!r} ({info.type_name}): {e}") from None
        _attach_biases(out)
        return out

    def embedding(self) -> QEmbedding:
        """The token embedding (the reference's get_rows dequantizer)."""
        info = self.infos["token_embd.weight"]
        return QEmbedding(self.source.raw("token_embd.weight"), info.type_name, info.n_per_row)

    def block(self, il: int) -> torch.nn.Module:
        """Block ``il`` built from its tensors (the architecture's block class, as Model builds it)."""
        if not 0 <= il < self.n_layer:
            raise ModelTensorError(f"{self.source.path}: layer {il} outside 0..{self.n_layer - 1}")
        prefix = f"blk.{il}."
        t = self._tensors(layer_tensor_names(self.config, self._names, il))
        return self._block_class(self.config, {k[len(prefix):]: v for k, v in t.items()})

    def head(self) -> tuple[RMSNorm, QLinear]:
        """(output_norm, output): the output projection is ``token_embd`` when the embeddings are tied
        (with the matmul dequantizer, as the reference multiplies by it)."""
        norm = RMSNorm(self._tensors(["output_norm.weight"])["output_norm.weight"], self.config.rms_eps)
        name = "token_embd.weight" if self.config.tied_embeddings else "output.weight"
        info = self.infos[name]
        return norm, QLinear(self.source.raw(name), info.type_name, info.n_per_row)

    @property
    def output_name(self) -> str:
        """The GGUF tensor the output projection multiplies by."""
        return "token_embd.weight" if self.config.tied_embeddings else "output.weight"

    def layer_bytes(self, il: int | None = None) -> int:
        """Stored bytes of layer ``il``'s tensors, or (None) of the largest "layer" of the file:
        a block, the embedding, or output_norm + output."""
        if il is not None:
            return sum(self.infos[n].nbytes for n in layer_tensor_names(self.config, self._names, il))
        head = self.infos["output_norm.weight"].nbytes + self.infos[self.output_name].nbytes
        return max([self.infos["token_embd.weight"].nbytes, head] + [self.layer_bytes(i) for i in range(self.n_layer)])

    def release(self, name: str) -> None:
        """Drop one tensor's pages from this process (a no-op for sources that cannot)."""
        rel = getattr(self.source, "release", None)
        if rel is not None:
            rel(name)

    def release_layer(self, il: int) -> None:
        """Drop every page of layer ``il``'s tensors: call it once its modules are no longer used."""
        for name in layer_tensor_names(self.config, self._names, il):
            self.release(name)

    def close(self) -> None:
        """Unmap the file (modules built earlier must no longer be used)."""
        self.source.close()


class RoutingCapture:
    """Records the experts a block's MoE layer chooses for every token, call after call.

    A forward hook on the router (``MoEFFN.ffn_gate_inp``) re-applies
    :func:`evalkit.model.moe.route` to the router logits it just produced (the selection is a
    pure function of them), so the block's own computation is untouched. ``chosen()`` is
    the (N, k) int16 expert ids of every token seen so far, best first, in call order; None
    when the block has no MoE layer.
    """

    def __init__(self, block: torch.nn.Module):
        from evalkit.model.moe import MoEFFN
        self.moes = [m for m in block.modules() if isinstance(m, MoEFFN)]
        self.n_expert = self.moes[0].n_expert if self.moes else 0
        self._dtype = np.int16 if self.n_expert <= np.iinfo(np.int16).max else np.int32
        self._parts: list[np.ndarray] = []
        self._handles = [m.ffn_gate_inp.register_forward_hook(self._hook(m)) for m in self.moes]

    def _hook(self, moe):
        from evalkit.model.moe import route

        def hook(module, args, logits):
            # the logits live in a reused workspace buffer: turn them into ids right away
            chosen, _ = route(logits, moe.k, moe.gating, moe.exp_probs_b, moe.norm_w, moe.scale_w)
            self._parts.append(chosen.numpy().astype(self._dtype))
        return hook

    def chosen(self) -> np.ndarray | None:
        """Every recorded token's expert ids (N, k), or None without an MoE layer."""
        if not self.moes:
            return None
        return np.concatenate(self._parts) if self._parts else np.zeros((0, self.moes[0].k), np.int16)

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
