"""Structural GGUF surgery for the fuzz tests: a file as editable parts, rebuilt as bytes.

The parser here is independent of evalkit's reader (the reader is what is under test): it
walks a *valid* GGUF once and keeps every key/value entry and tensor info as raw fields,
so a corruption edits one field (a count, a type, a length, a dimension, an offset) and
:meth:`Layout.build` lays the bytes out again, tensor data untouched unless asked.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

# GGUF value types (gguf_type)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<B", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


def pack_str(s: str | bytes) -> bytes:
    """A GGUF string: u64 length + bytes."""
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def pack_scalar(vtype: int, value) -> bytes:
    """The payload of a scalar value of ``vtype``."""
    return struct.pack(_SCALAR[vtype], value)


def pack_array(itype: int, items, count: int | None = None) -> bytes:
    """The payload of an array (element type, length, elements); ``count`` overrides the length field."""
    n = len(items) if count is None else count
    body = b"".join(pack_str(v) if itype == STRING else pack_scalar(itype, v) for v in items)
    return struct.pack("<IQ", itype, n) + body


def nested_array(depth: int) -> bytes:
    """The payload of an array of arrays ``depth`` levels deep (innermost: one u32)."""
    return struct.pack("<IQ", ARRAY, 1) * depth + pack_array(UINT32, [7])


@dataclass
class KV:
    """One metadata entry as raw fields: key bytes, value type, value payload (after the type)."""

    key: bytes
    vtype: int
    payload: bytes
    key_len: int | None = None      # override of the stored key length

    def to_bytes(self) -> bytes:
        """The entry as stored."""
        n = len(self.key) if self.key_len is None else self.key_len
        return struct.pack("<Q", n) + self.key + struct.pack("<I", self.vtype) + self.payload


@dataclass
class Tensor:
    """One tensor info as raw fields; ``data`` is its (start, end) in the original data section."""

    name: bytes
    dims: list[int]
    type_id: int
    offset: int
    data: tuple[int, int] = (0, 0)
    n_dims: int | None = None       # override of the stored dimension count
    name_len: int | None = None     # override of the stored name length

    def to_bytes(self) -> bytes:
        """The tensor info as stored."""
        n = len(self.name) if self.name_len is None else self.name_len
        nd = len(self.dims) if self.n_dims is None else self.n_dims
        return (struct.pack("<Q", n) + self.name + struct.pack("<I", nd)
                + struct.pack(f"<{len(self.dims)}Q", *self.dims) + struct.pack("<IQ", self.type_id, self.offset))


@dataclass
class Layout:
    """A GGUF file as parts. ``n_tensors`` / ``n_kv`` override the header counts when set.

    ``data`` (the data section) is shared between copies until :meth:`values` edits it.
    """

    magic: bytes
    version: int
    kvs: list[KV]
    tensors: list[Tensor]
    data: bytes | bytearray
    alignment: int = 32
    n_tensors: int | None = None
    n_kv: int | None = None
    trailer: bytes = b""
    pad_to: int | None = None       # pad the header to this alignment (default: ``alignment``)

    # -- build -----------------------------------------------------------------
    def header(self) -> bytes:
        """Magic, version, counts, metadata and tensor infos, padded to the data section."""
        nt = len(self.tensors) if self.n_tensors is None else self.n_tensors
        nk = len(self.kvs) if self.n_kv is None else self.n_kv
        out = bytearray(self.magic + struct.pack("<IQQ", self.version, nt, nk))
        for kv in self.kvs:
            out += kv.to_bytes()
        for t in self.tensors:
            out += t.to_bytes()
        align = self.pad_to or self.alignment
        out += b"\0" * (-len(out) % align)
        return bytes(out)

    def build(self) -> bytes:
        """The whole file."""
        return self.header() + bytes(self.data) + self.trailer

    def write(self, path: Path) -> None:
        """Write the whole file to ``path`` (without joining the data section into one buffer)."""
        with open(path, "wb") as fh:
            fh.write(self.header())
            fh.write(self.data)
            fh.write(self.trailer)

    # -- edits -----------------------------------------------------------------
    def copy(self) -> "Layout":
        """A copy whose entries can be edited freely (the data section is copied on first edit)."""
        return replace(self, kvs=[replace(kv) for kv in self.kvs],
                       tensors=[replace(t, dims=list(t.dims)) for t in self.tensors], data=bytes(self.data)
                       if isinstance(self.data, bytearray) else self.data)

    def kv(self, key: str) -> KV:
        """The entry of ``key``."""
        return next(kv for kv in self.kvs if kv.key == key.encode())

    def set_kv(self, key: str, vtype: int, payload: bytes) -> "Layout":
        """Replace ``key``'s type and payload (append the entry if absent)."""
        for kv in self.kvs:
            if kv.key == key.encode():
                kv.vtype, kv.payload = vtype, payload
                return self
        self.kvs.append(KV(key.encode(), vtype, payload))
        return self

    def drop_kv(self, key: str) -> "Layout":
        """Remove ``key``'s entry."""
        self.kvs = [kv for kv in self.kvs if kv.key != key.encode()]
        return self

    def tensor(self, name: str) -> Tensor:
        """The tensor info of ``name``."""
        return next(t for t in self.tensors if t.name == name.encode())

    def drop_tensors(self, pred) -> "Layout":
        """Remove the tensor infos whose name (str) satisfies ``pred`` (their data stays)."""
        self.tensors = [t for t in self.tensors if not pred(t.name.decode())]
        return self

    def values(self, name: str, dtype) -> np.ndarray:
        """A writable view of tensor ``name``'s data as ``dtype`` (F32/F16 tensors)."""
        if not isinstance(self.data, bytearray):
            self.data = bytearray(self.data)          # this copy's own data from now on
        a, b = self.tensor(name).data
        return np.frombuffer(memoryview(self.data)[a:b], dtype=dtype)


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype == STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    if vtype == ARRAY:
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype == STRING:
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                pos += 8 + n
            return pos
        return pos + count * struct.calcsize(_SCALAR[itype])
    return pos + struct.calcsize(_SCALAR[vtype])


def parse(raw: bytes) -> Layout:
    """Split a valid GGUF file into a :class:`Layout` (tensor sizes from evalkit's format table)."""
    from evalkit.formats import FORMATS_BY_ID

    magic, version, nt, nk = raw[:4], *struct.unpack_from("<IQQ", raw, 4)
    pos, kvs, alignment = 24, [], 32
    for _ in range(nk):
        (n,) = struct.unpack_from("<Q", raw, pos)
        key = raw[pos + 8:pos + 8 + n]
        (vtype,) = struct.unpack_from("<I", raw, pos + 8 + n)
        start = pos + 12 + n
        end = _skip_value(raw, start, vtype)
        kvs.append(KV(key, vtype, raw[start:end]))
        if key == b"general.alignment":
            (alignment,) = struct.unpack_from("<I", raw, start)
        pos = end
    tensors = []
    for _ in range(nt):
        (n,) = struct.unpack_from("<Q", raw, pos)
        name = raw[pos + 8:pos + 8 + n]
        pos += 8 + n
        (nd,) = struct.unpack_from("<I", raw, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", raw, pos + 4))
        type_id, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        nbytes = FORMATS_BY_ID[type_id].tensor_bytes(tuple(dims))
        tensors.append(Tensor(name, dims, type_id, offset, (offset, offset + nbytes)))
    data_start = -(-pos // alignment) * alignment
    return Layout(magic, version, kvs, tensors, raw[data_start:], alignment)
