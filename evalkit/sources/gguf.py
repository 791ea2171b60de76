"""A GGUF file as a tensor source: metadata, tensor list, raw bytes, float32 rows."""
from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.gguf import GGUFFile, TensorInfo

__all__ = ["GGUFSource"]

_PAGE = mmap.PAGESIZE


class GGUFSource:
    """A memory-mapped GGUF model (a path, or a :class:`~evalkit.gguf.GGUFFile` already open).

    ``file`` is the underlying :class:`~evalkit.gguf.GGUFFile`, for readers of GGUF-only
    details (``ModelConfig.from_gguf``).
    """

    def __init__(self, path: str | Path | GGUFFile):
        self.file = path if isinstance(path, GGUFFile) else GGUFFile(path)
        self.path = str(self.file.path)
        self.metadata: dict[str, Any] = self.file.metadata
        self.metadata_types: dict[str, tuple[int, int | None]] = self.file.metadata_types
        self.tensors: list[TensorInfo] = list(self.file.tensors.values())

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy uint8 (rows, row_bytes) view of a tensor's stored bytes."""
        return self.file.tensor_bytes(name)

    def rows_f32(self, name: str, threads: int | None = None) -> np.ndarray:
        """The tensor as float32 rows (nrows, ne0), dequantized exactly like the reference."""
        from evalkit.codec import dequantize

        t = self.file.tensor(name)
        q = self.file.tensor_bytes(name)
        if t.type_name == "F32":
            return q.view(np.float32)   # already float: no copy
        return dequantize(q, t.type_name, t.n_per_row, threads=threads)

    def release(self, name: str) -> None:
        """Drop a finished tensor's pages from this process (the reference unmaps them too)."""
        mm = getattr(self.file, "_mm", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        t = self.file.tensor(name)
        start = t.offset - t.offset % _PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.nbytes - start)
        except (OSError, ValueError, AttributeError):
            pass  # only an optimisation

    def close(self) -> None:
        """Unmap the file."""
        self.file.close()
