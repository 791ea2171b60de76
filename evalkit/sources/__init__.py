"""Where model weights come from: the embedded default, GGUF files, HuggingFace checkpoints.

``resolve_model`` turns a user's model spec into a path; the tensor sources that read
those paths (for the forward pass and the quantizer alike) live beside it.
"""
from evalkit.sources.locate import EMBEDDED_MODELS, ModelNotFoundError, resolve_model, smollm2_path

__all__ = ["EMBEDDED_MODELS", "ModelNotFoundError", "resolve_model", "smollm2_path"]
