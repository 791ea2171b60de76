"""Read GGUF v2/v3 files with memory-mapped, zero-copy access to every tensor's bytes.

The pip ``gguf`` package cannot size tensors of the IQK types (ids 137..158, Q6_0 = 133:
its size table lacks them and ignores the per-row header of the KS/KL/KT types), so the
header is parsed here with gguf's value-type constants and sizes come from
``evalkit.formats``.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from evalkit.formats import FORMATS_BY_ID, QuantFormat
from evalkit.errors import EvalkitError

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "GGUF_DEFAULT_ALIGNMENT"]

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32

# struct format and numpy dtype of each GGUF value type (shared with the writer)
SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


class GGUFError(EvalkitError, ValueError):
    """A GGUF file is malformed, truncated, foreign, or uses something evalkit cannot read."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's directory entry. ``shape`` is in ggml order: shape[0] (ne0) is the row length."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int      # absolute file offset of the first byte
    nbytes: int

    @property
    def format(self) -> QuantFormat:
        return FORMATS_BY_ID[self.type_id]

    @property
    def type_name(self) -> str:
        return self.format.name

    @property
    def n_per_row(self) -> int:
        return int(self.shape[0])

    @property
    def nrows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= int(d)
        return n

    @property
    def n_elements(self) -> int:
        return self.n_per_row * self.nrows


class _Cursor:
    """Bounds-checked little-endian reader over a bytes-like buffer."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"file has {len(self.buf)}")
        mv = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return mv

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what + " length")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise GGUFError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}") from None
        if vt == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        if vt == GGUFValueType.ARRAY:
            itype = self.scalar("<I", f"array type of {key!r}")
            count = self.scalar("<Q", f"array length of {key!r}")
            if itype in NUMPY_DTYPES:
                dt = np.dtype(NUMPY_DTYPES[GGUFValueType(itype)])
                arr = np.frombuffer(self.take(count * dt.itemsize, f"array {key!r}"), dtype=dt)
                return arr.tolist()
            if itype == GGUFValueType.STRING:
                return [self.string(f"element of {key!r}") for _ in range(count)]
            if itype == GGUFValueType.ARRAY:
                return [self.value(GGUFValueType.ARRAY, key) for _ in range(count)]
            raise GGUFError(f"{self.path}: metadata array {key!r} has unknown element type {itype}")
        return self.scalar(SCALAR_FORMATS[vt], f"value of {key!r}")


def _array_type(cur: _Cursor) -> int:
    return cur.scalar("<I", "array type")


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped.

    ``metadata`` maps keys to Python values; ``metadata_types`` keeps each key's GGUF value
    type (and, for arrays, the element type) so a writer can carry them over unchanged.
    ``tensors`` maps names to :class:`TensorInfo` in file order.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open: {e.strerror}") from None
        size = Path(self.path).stat().st_size
        if size == 0:
            self._fh.close()
            raise GGUFError(f"{self.path}: empty file, not a GGUF model")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    # -- parsing ---------------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.path)
        magic = bytes(cur.take(4, "magic")) if len(self._mm) >= 4 else b""
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = cur.scalar("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (only 2 and 3)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_tensors > len(self._mm) // 8 or n_kv > len(self._mm) // 8:
            raise GGUFError(f"{self.path}: implausible header counts ({n_tensors} tensors, {n_kv} keys)")
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[int, int | None]] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.scalar("<I", f"type of {key!r}")
            itype = None
            if vtype == GGUFValueType.ARRAY:
                save = cur.pos
                itype = cur.scalar("<I", f"array type of {key!r}")
                cur.pos = save
            if key in self.metadata:
                raise GGUFError(f"{self.path}: duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(vtype, key)
            self.metadata_types[key] = (vtype, itype)
        self.alignment = int(self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {self.alignment} is not a power of two")
        raw = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.scalar("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..4 allowed)")
            shape = tuple(cur.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims))
            type_id = cur.scalar("<I", f"type of {name!r}")
            offset = cur.scalar("<Q", f"offset of {name!r}")
            raw.append((name, shape, type_id, offset))
        data_start = -(-cur.pos // self.alignment) * self.alignment
        self.data_offset = data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in raw:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
            fmt = FORMATS_BY_ID.get(type_id)
            if fmt is None:
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown ggml type id {type_id}")
            if any(d <= 0 for d in shape):
                raise GGUFError(f"{self.path}: tensor {name!r} has an empty dimension in shape {shape}")
            if shape[0] % fmt.block_size:
                raise GGUFError(f"{self.path}: tensor {name!r}: row length {shape[0]} is not a multiple of "
                                f"{fmt.name}'s block size {fmt.block_size}")
            if offset % self.alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} data offset {offset} is not aligned to "
                                f"{self.alignment}")
            nbytes = fmt.tensor_bytes(shape)
            start = data_start + offset
            if start + nbytes > len(self._mm):
                raise GGUFError(f"{self.path}: tensor {name!r} data [{start}, {start + nbytes}) lies beyond the "
                                f"end of the file ({len(self._mm)} bytes): truncated or corrupt")
            self.tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)

    # -- access ----------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        """The directory entry of a tensor; KeyError names the file when absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """Zero-copy uint8 view (nrows, row_bytes) of a tensor's packed data."""
        t = self.tensor(name)
        flat = self._buf[t.offset:t.offset + t.nbytes]
        return flat.reshape(t.nrows, t.nbytes // t.nrows)

    def dequantize(self, name: str, threads: int | None = None, variant: str = "to_float") -> np.ndarray:
        """The tensor as float32, shaped like numpy/torch (reversed ggml shape)."""
        from evalkit.codec import dequantize
        t = self.tensor(name)
        rows = dequantize(self.tensor_bytes(name), t.type_name, t.n_per_row, threads=threads, variant=variant)
        return rows.reshape(tuple(reversed(t.shape)))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or ``default``."""
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def close(self) -> None:
        """Release the mapping (views obtained earlier must no longer be used)."""
        buf = getattr(self, "_buf", None)
        self._buf = None
        del buf
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # numpy views are still alive; the OS releases the map with them
        fh = getattr(self, "_fh", None)
        if fh is not None:
            fh.close()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"
