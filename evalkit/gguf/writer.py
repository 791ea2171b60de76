"""Write GGUF v3 files, streaming tensor data, atomically (temp file + rename).

Tensor sizes come from ``evalkit.formats`` so IQK types (per-row headers included)
are laid out exactly as ggml expects; value types of carried-over metadata are kept.
"""
from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from gguf import GGUFValueType

from evalkit.formats import FORMATS_BY_ID
from evalkit.gguf.reader import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, NUMPY_DTYPES, SCALAR_FORMATS

__all__ = ["TensorSpec", "write_gguf", "atomic_output"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: name, ggml-order shape (ne0 first) and ggml type id."""

    name: str
    shape: tuple[int, ...]
    type_id: int

    @property
    def nbytes(self) -> int:
        return FORMATS_BY_ID[self.type_id].tensor_bytes(self.shape)


def _infer_type(value: Any) -> tuple[int, int | None]:
    if isinstance(value, bool):
        return GGUFValueType.BOOL, None
    if isinstance(value, int):
        if 0 <= value < 2**32:
            return GGUFValueType.UINT32, None
        return GGUFValueType.INT64, None
    if isinstance(value, float):
        return GGUFValueType.FLOAT32, None
    if isinstance(value, str):
        return GGUFValueType.STRING, None
    if isinstance(value, (list, tuple)):
        if not value:
            return GGUFValueType.ARRAY, GGUFValueType.STRING
        return GGUFValueType.ARRAY, _infer_type(value[0])[0]
    raise TypeError(f"cannot store metadata value of type {type(value).__name__}")


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(vtype: int, itype: int | None, value: Any, key: str) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _pack_string(str(value))
    if vtype == GGUFValueType.ARRAY:
        if itype is None:
            itype = _infer_type(value)[1]
        head = struct.pack("<IQ", int(itype), len(value))
        if itype == GGUFValueType.STRING:
            return head + b"".join(_pack_string(str(v)) for v in value)
        if itype in NUMPY_DTYPES:
            return head + np.asarray(value, dtype=NUMPY_DTYPES[GGUFValueType(itype)]).tobytes()
        raise TypeError(f"metadata {key!r}: unsupported array element type {itype}")
    if vtype in SCALAR_FORMATS:
        return struct.pack(SCALAR_FORMATS[GGUFValueType(vtype)], value)
    raise TypeError(f"metadata {key!r}: unsupported value type {vtype}")


class atomic_output:
    """Context manager yielding a temp file beside ``path``; renamed over it only on success."""

    def __init__(self, path: str | Path, mode: str = "wb"):
        self.path = Path(path)
        self.mode = mode

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        # mkstemp creates 0600; give the result the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        self.fh = os.fdopen(fd, self.mode)
        return self.fh

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.fh.flush()
                os.fsync(self.fh.fileno())
            self.fh.close()
        finally:
            if exc_type is None:
                os.replace(self.tmp, self.path)
            else:
                try:
                    os.unlink(self.tmp)
                except FileNotFoundError:
                    pass
        return False


def write_gguf(path: str | Path, metadata: dict[str, Any], tensors: Iterable[TensorSpec],
               tensor_data: Callable[[TensorSpec], np.ndarray | bytes],
               metadata_types: dict[str, tuple[int, int | None]] | None = None,
               alignment: int | None = None, on_tensor_written: Callable[[TensorSpec], None] | None = None) -> None:
    """Write a GGUF v3 file.

    ``tensor_data(spec)`` is called once per tensor, in order, and must return exactly
    ``spec.nbytes`` bytes; only one tensor's data is held at a time. On any error the
    partial file is removed and ``path`` is left untouched.
    """
    metadata_types = metadata_types or {}
    specs = list(tensors)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"duplicate tensor name {dup!r}")
    align = int(alignment or metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    header = bytearray()
    header += GGUF_MAGIC + struct.pack("<IQQ", 3, len(specs), len(metadata))
    for key, value in metadata.items():
        vtype, itype = metadata_types.get(key) or _infer_type(value)
        header += _pack_string(key) + struct.pack("<I", int(vtype)) + _pack_value(vtype, itype, value, key)
    offset = 0
    offsets = []
    for s in specs:
        offsets.append(offset)
        header += _pack_string(s.name) + struct.pack("<I", len(s.shape))
        header += struct.pack(f"<{len(s.shape)}Q", *s.shape) + struct.pack("<IQ", s.type_id, offset)
        offset += -(-s.nbytes // align) * align
    header += b"\0" * (-len(header) % align)
    with atomic_output(path) as fh:
        fh.write(header)
        for s in specs:
            data = tensor_data(s)
            buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else memoryview(data)
            if buf.nbytes != s.nbytes:
                raise ValueError(f"tensor {s.name!r}: got {buf.nbytes} bytes, expected {s.nbytes}")
            fh.write(buf)
            fh.write(b"\0" * (-s.nbytes % align))
            if on_tensor_written is not None:
                on_tensor_written(s)
