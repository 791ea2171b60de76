"""The float32 reference forward pass (llama, qwen2, qwen3) over packed quantized weights."""
from evalkit.model.config import ModelConfig, SUPPORTED_ARCHITECTURES, UnsupportedModelError
from evalkit.model.model import Model, ModelTensorError, Workspace
from evalkit.model.qlinear import QEmbedding, QLinear

__all__ = ["Model", "ModelConfig", "QLinear", "QEmbedding", "ModelTensorError", "UnsupportedModelError",
           "SUPPORTED_ARCHITECTURES", "Workspace"]
