"""evalkit: exact quality evaluation of quantized LLMs, centred on ik_llama.cpp's IQ*_K types.

The IQ*_K quantization formats were created by Iwan Kawrakow in ik_llama.cpp (MIT);
evalkit is an independent implementation (see NOTICE).
"""
from evalkit import formats
from evalkit.codec import dequantize, quantize

__version__ = "0.1.0"
__all__ = ["formats", "quantize", "dequantize", "__version__"]
