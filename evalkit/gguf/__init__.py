"""GGUF in and out: memory-mapped reading and streaming, atomic writing, IQK types included."""
from evalkit.gguf.reader import GGUFError, GGUFFile, TensorInfo
from evalkit.gguf.writer import TensorSpec, atomic_output, write_gguf

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "TensorSpec", "write_gguf", "atomic_output"]
