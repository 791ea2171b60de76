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

    A split model given as its first shard is one source (the file reads every shard). A
    repacked ("_R4"/"_R8") tensor is listed with its plain type and :meth:`raw` returns its
    rows de-interleaved into a new array, after which the file's pages of it are dropped:
    the converted copy is the only one kept (converting lazily, per tensor, never holds two
    copies of the model). ``file`` is the underlying :class:`~evalkit.gguf.GGUFFile`, for
    readers of GGUF-only details (``ModelConfig.from_gguf``).
    """

    def __init__(self, path: str | Path | GGUFFile):
        self.file = path if isinstance(path, GGUFFile) else GGUFFile(path)
        self.path = str(self.file.path)
        self.metadata: dict[str, Any] = self.file.metadata
        self.metadata_types: dict[str, tuple[int, int | None]] = self.file.metadata_types
        self.tensors: list[TensorInfo] = list(self.file.tensors.values())

    def raw(self, name: str) -> np.ndarray:
        """uint8 (rows, row_bytes) of a tensor in its plain type: zero-copy, or converted if repacked."""
        rows = self.file.tensor_bytes(name)
        if self.file.tensor(name).stored_type_id is not None:
            self.release(name)
        return rows

    def rows_f32(self, name: str, threads: int | None = None) -> np.ndarray:
        """The tensor as float32 rows (nrows, ne0), dequantized exactly like the reference."""
        t = self.file.tensor(name)
        if t.type_name == "F32":
            return self.file.tensor_bytes(name).view(np.float32)   # already float: no copy
        return self.file.rows_f32(name, threads=threads)

    def release(self, name: str) -> None:
        """Drop a finished tensor's pages from this process (the reference unmaps them too)."""
        t = self.file.tensor(name)
        mm = self.file.mapping(t.shard) if hasattr(self.file, "mapping") else None
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = t.offset - t.offset % _PAGE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.offset + t.file_nbytes - start)
        except (OSError, ValueError, AttributeError):
            pass  # only an optimisation

    def close(self) -> None:
        """Unmap the file (and the other shards of a split model)."""
        self.file.close()
