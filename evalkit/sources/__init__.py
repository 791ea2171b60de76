"""Where model weights come from: the embedded default, GGUF files, HuggingFace checkpoints.

``resolve_model`` turns a user's model spec into a path; ``open_source`` opens that path
as a :class:`TensorSource` (:class:`GGUFSource` or :class:`HFSource`), the one way both
the forward pass and the quantizer read tensors.
"""
from __future__ import annotations

from pathlib import Path

from evalkit.sources.base import TensorInfo, TensorSource
from evalkit.sources.gguf import GGUFSource
from evalkit.sources.hf import HFSource, HFSourceError
from evalkit.sources.locate import EMBEDDED_MODELS, ModelNotFoundError, resolve_model, smollm2_path

__all__ = ["EMBEDDED_MODELS", "ModelNotFoundError", "resolve_model", "smollm2_path",
           "TensorSource", "TensorInfo", "GGUFSource", "HFSource", "HFSourceError", "open_source"]


def open_source(path: str | Path) -> GGUFSource | HFSource:
    """Open a GGUF file, or a HuggingFace checkpoint (directory with config.json, or that file).

    HF checkpoints are presented as convert_hf_to_gguf would write them (llama Q/K permuted).
    """
    p = Path(path)
    if p.is_dir() or p.name == "config.json":
        return HFSource(p if p.is_dir() else p.parent)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    return GGUFSource(p)
