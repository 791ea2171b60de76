"""The interface every tensor source offers: what the forward pass and the quantizer read.

A source presents a model the way a GGUF file holds it, whatever it is stored as: GGUF
tensor names, ggml-order shapes (ne0, the row length, first), ``{arch}.*`` metadata.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from evalkit.gguf.reader import TensorInfo

__all__ = ["TensorSource", "TensorInfo"]


@runtime_checkable
class TensorSource(Protocol):
    """A model's tensors and metadata, read lazily.

    ``path``: where it comes from (for messages). ``metadata`` / ``metadata_types``: GGUF
    key → value and key → (GGUFValueType, array item type or None). ``tensors``: one
    :class:`~evalkit.gguf.reader.TensorInfo` per tensor in file order (``name``, ``shape``
    in ggml order, ``type_name``, ``nbytes``, ``n_per_row``, ...). Sources that map pages
    in may also offer ``release(name)``: drop a finished tensor's pages (callers check
    with ``hasattr``). One source may later span several files (split GGUF): callers only
    ever go through these members, never through a file.
    """

    path: str
    tensors: list[TensorInfo]

    @property
    def metadata(self) -> dict[str, Any]: ...

    @property
    def metadata_types(self) -> dict[str, tuple[int, int | None]]: ...

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as uint8 rows (nrows, row_bytes), zero-copy where possible."""
        ...

    def rows_f32(self, name: str, threads: int | None = None) -> np.ndarray:
        """The tensor as float32 rows (nrows, ne0), exactly as the reference's to_float gives them."""
        ...

    def close(self) -> None:
        """Release the underlying files (views handed out earlier must no longer be used)."""
        ...
