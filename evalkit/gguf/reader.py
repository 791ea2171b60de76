"""Read GGUF v2/v3 files with memory-mapped, zero-copy access to every tensor's bytes.

The pip ``gguf`` package cannot size tensors of the IQK types (ids 137..158, Q6_0 = 133:
its size table lacks them and ignores the per-row header of the KS/KL/KT types), so the
header is parsed here with gguf's value-type constants and sizes come from
``evalkit.formats``.

Every count in the header is bounded by what the file can hold before anything is
allocated for it, and every tensor's bytes must lie inside the file without overlapping
another tensor's, so a hostile or corrupt file ends in a :class:`GGUFError` naming the
file and the problem, never in a huge allocation, a hang or a traceback.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from evalkit.formats import FORMATS_BY_ID, QuantFormat
from evalkit.errors import EvalkitError

__all__ = ["GGUFError", "GGUFFile", "TensorInfo", "GGUF_DEFAULT_ALIGNMENT", "forget_headers"]

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64          # ggml's tensor name buffer, NUL included
_INT64_MAX = 2**63 - 1
# The fewest bytes one entry can take on disk, to bound the header's counts by the file
# size before reading them: a metadata entry is key length + value type + a 1-byte value,
# a tensor info name length + n_dims + one dimension + type + offset.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
_U64 = struct.Struct("<Q")

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
INTEGER_TYPES = frozenset({
    GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
    GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
})


class GGUFError(EvalkitError, ValueError):
    """A GGUF file is malformed, truncated, foreign, or uses something evalkit cannot read."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's directory entry. ``shape`` is in ggml order: shape[0] (ne0) is the row length."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int      # absolute file offset of the first byte
    nbytes: int      # bytes of the rows evalkit hands out (the plain type's for a repacked tensor)
    stored_type_id: int | None = None   # the file's repacked type id ("_R4"/"_R8"), None when plain
    stored_nbytes: int | None = None    # bytes in the file, when they differ from ``nbytes``' count
    shard: int = 0                      # which file of a split model holds the data (0: the first)

    @property
    def format(self) -> QuantFormat:
        return FORMATS_BY_ID[self.type_id]

    @property
    def file_nbytes(self) -> int:
        """Bytes the tensor occupies in its file."""
        return self.nbytes if self.stored_nbytes is None else self.stored_nbytes

    @property
    def stored_type_name(self) -> str:
        """The type as stored in the file (a repacked name such as IQ4_K_R4, else the plain name)."""
        if self.stored_type_id is None:
            return self.type_name
        from evalkit.formats.repack import REPACKED_BY_ID
        return REPACKED_BY_ID[self.stored_type_id].name

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


def _type_name(vtype: int) -> str:
    try:
        return GGUFValueType(vtype).name
    except ValueError:
        return f"type {vtype}"


class _Cursor:
    """Bounds-checked little-endian reader over a bytes-like buffer."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    @property
    def left(self) -> int:
        """Bytes from the cursor to the end of the file."""
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left:
            raise GGUFError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"file has {len(self.buf)}")
        mv = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return mv

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, strict: bool = False) -> str:
        """A length-prefixed string; ``strict``: it must be UTF-8 (keys and tensor names are looked up)."""
        start = self.pos
        n = self.scalar("<Q", what + " length")
        if n > self.left:
            raise GGUFError(f"{self.path}: {what} at offset {start} claims {n} bytes, but only {self.left} "
                            "remain in the file: corrupt or truncated")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise GGUFError(f"{self.path}: {what} at offset {start} is not valid UTF-8 "
                                f"({raw[:48]!r}: {e.reason} at byte {e.start})") from None
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str) -> Any:
        """One metadata value of GGUF type ``vtype`` (arrays hold scalars or strings, never arrays)."""
        if vtype == GGUFValueType.STRING:
            return self.string(f"value of {key!r}")
        if vtype == GGUFValueType.ARRAY:
            return self.array(key)
        if vtype in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[GGUFValueType(vtype)], f"value of {key!r}")
        raise GGUFError(f"{self.path}: metadata key {key!r} has unknown value type {vtype}")

    def array(self, key: str) -> list:
        """An array value, its length bounded by the bytes left before any list is built."""
        itype = self.scalar("<I", f"array type of {key!r}")
        count = self.scalar("<Q", f"array length of {key!r}")
        if itype == GGUFValueType.ARRAY:
            # gguf_init_from_file rejects nested arrays too; refusing them here keeps the
            # reader free of recursion whatever the nesting depth
            raise GGUFError(f"{self.path}: metadata key {key!r} is an array of arrays (nested arrays are "
                            "not supported by GGUF readers)")
        if itype == GGUFValueType.STRING:
            itemsize = 8                     # each string needs its 8-byte length at least
        elif itype in NUMPY_DTYPES:
            itemsize = np.dtype(NUMPY_DTYPES[GGUFValueType(itype)]).itemsize
        else:
            raise GGUFError(f"{self.path}: metadata array {key!r} has unknown element type {itype}")
        if count * itemsize > self.left:
            raise GGUFError(f"{self.path}: metadata array {key!r} claims {count} elements of "
                            f"{_type_name(itype)}, more than the {self.left} bytes left in the file can hold")
        if itype == GGUFValueType.STRING:
            return self.string_array(count, key)
        dt = np.dtype(NUMPY_DTYPES[GGUFValueType(itype)])
        return np.frombuffer(self.take(count * dt.itemsize, f"array {key!r}"), dtype=dt).tolist()

    def string_array(self, count: int, key: str) -> list[str]:
        """``count`` strings (a vocabulary: 10^5 of them, hence the tight loop)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        unpack = _U64.unpack_from
        out = []
        for i in range(count):
            if pos + 8 > end:
                self.pos = pos
                self.take(8, f"length of element {i} of {key!r}")   # raises: truncated
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise GGUFError(f"{self.path}: element {i} of metadata array {key!r} at offset {pos - 8} "
                                f"claims {n} bytes, but only {end - pos} remain in the file")
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out


@dataclass(frozen=True)
class _Header:
    """Everything parsed from one file's header (what :class:`GGUFFile` keeps besides the map)."""

    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    metadata_types: dict[str, tuple[int, int | None]]
    tensors: dict[str, TensorInfo]


# Parsed headers of the last few files opened, keyed by the file's identity and change
# times: ``evalkit run`` opens the same base model four times (tokenizer, size, vocabulary
# check, model), and a 150k-token vocabulary takes a tenth of a second to parse each time.
_HEADER_CACHE: dict[tuple, _Header] = {}
_HEADER_CACHE_SIZE = 4
_HEADER_CACHE_LOCK = threading.Lock()


def forget_headers() -> None:
    """Drop the cached headers (a vocabulary is ~10 MB of Python strings): for a run that
    has released the models whose files they describe."""
    with _HEADER_CACHE_LOCK:
        _HEADER_CACHE.clear()


def _cache_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _open_regular(path: str) -> tuple[Any, os.stat_result]:
    """(binary file object, its fstat) of ``path``, which must be a non-empty regular file.

    A FIFO or a character device would block the open or the read forever (or never end),
    so the kind of file is checked with ``os.stat`` before opening, and again on the
    descriptor (opened non-blocking) in case the path was swapped in between.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError(f"{path}: is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(f"{path}: not a regular file ({_file_kind(st.st_mode)}), not a GGUF file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise GGUFError(f"{path}: not a regular file ({_file_kind(st.st_mode)}), not a GGUF file")
    if st.st_size == 0:
        os.close(fd)
        raise GGUFError(f"{path}: empty file, not a GGUF model")
    return os.fdopen(fd, "rb"), st


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped.

    ``metadata`` maps keys to Python values; ``metadata_types`` keeps each key's GGUF value
    type (and, for arrays, the element type) so a writer can carry them over unchanged.
    ``tensors`` maps names to :class:`TensorInfo` in file order.

    A split model (llama.cpp's gguf-split: ``split.count`` > 1) given as its first shard
    is read as one model: the metadata are the first shard's, ``tensors`` holds every
    shard's, and each tensor's bytes come from its own shard (``evalkit.gguf.split``).
    ``shards=False`` reads one shard alone.
    """

    def __init__(self, path: str | Path, shards: bool = True):
        self.path = str(path)
        self._shards: list["GGUFFile"] = []
        self._fh, st = _open_regular(self.path)
        try:
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            self._fh.close()
            raise GGUFError(f"{self.path}: cannot map the file: {e}") from None
        self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        self._bufs = [self._buf]          # one per shard, indexed by TensorInfo.shard
        try:
            self._load_header(_cache_key(st))
            if shards:
                from evalkit.gguf.split import attach_shards
                attach_shards(self)
        except Exception:
            self.close()
            raise

    # -- parsing ---------------------------------------------------------------
    def _load_header(self, key: tuple) -> None:
        """Parse the header, or take it from the cache when this very file was parsed before."""
        with _HEADER_CACHE_LOCK:
            h = _HEADER_CACHE.pop(key, None)
        if h is None:
            self._parse()
            h = _Header(self.version, self.alignment, self.data_offset, self.metadata, self.metadata_types,
                        self.tensors)
        with _HEADER_CACHE_LOCK:
            _HEADER_CACHE[key] = h                 # most recently used last
            while len(_HEADER_CACHE) > _HEADER_CACHE_SIZE:
                del _HEADER_CACHE[next(iter(_HEADER_CACHE))]
        # every instance gets its own containers: a caller editing them cannot reach the cache
        self.version, self.alignment, self.data_offset = h.version, h.alignment, h.data_offset
        self.metadata = {k: list(v) if isinstance(v, list) else v for k, v in h.metadata.items()}
        self.metadata_types = dict(h.metadata_types)
        self.tensors = dict(h.tensors)

    def _parse(self) -> None:
        cur = _Cursor(self._mm, self.path)
        n_tensors, n_kv = self._parse_header(cur)
        self._parse_metadata(cur, n_kv)
        self.alignment = self._parse_alignment()
        raw = [self._parse_tensor_info(cur) for _ in range(n_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        if raw and self.data_offset > len(self._mm):
            raise GGUFError(f"{self.path}: the tensor data would start at offset {self.data_offset} "
                            f"(alignment {self.alignment}), past the end of the file ({len(self._mm)} bytes)")
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in raw:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor name {name!r}")
            self.tensors[name] = self._place_tensor(name, shape, type_id, offset)
        self._check_no_overlap()

    def _parse_header(self, cur: _Cursor) -> tuple[int, int]:
        """Magic, version, and the two counts, bounded by what the file can hold."""
        magic = bytes(cur.take(4, "magic")) if len(self._mm) >= 4 else bytes(self._mm[:])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        self.version = cur.scalar("<I", "version")
        if self.version and not self.version & 0xFFFF:
            # as gguf_init_from_file: a byte-swapped small version means a big-endian file
            raise GGUFError(f"{self.path}: GGUF version {self.version} is implausibly large: the file was "
                            "written with the other byte order (big-endian)")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (only 2 and 3)")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        left = cur.left
        for what, n, least in (("tensor", n_tensors, _MIN_TENSOR_INFO_BYTES), ("metadata", n_kv, _MIN_KV_BYTES)):
            if n > left // least:
                raise GGUFError(f"{self.path}: the header's {what} count {n} is more than the file can hold "
                                f"({left // least} at most in its {left} remaining bytes): truncated or corrupt")
        if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > left:
            raise GGUFError(f"{self.path}: the header's counts ({n_tensors} tensors, {n_kv} metadata entries) "
                            f"are more than the file's {left} remaining bytes can hold: truncated or corrupt")
        return n_tensors, n_kv

    def _parse_metadata(self, cur: _Cursor, n_kv: int) -> None:
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[int, int | None]] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", strict=True)
            vtype = cur.scalar("<I", f"type of {key!r}")
            itype = None
            if vtype == GGUFValueType.ARRAY:
                itype = struct.unpack("<I", cur.take(4, f"array type of {key!r}"))[0]
                cur.pos -= 4
            if key in self.metadata:
                raise GGUFError(f"{self.path}: duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(vtype, key)
            self.metadata_types[key] = (vtype, itype)

    def _parse_alignment(self) -> int:
        """general.alignment: an unsigned integer power of two (gguf_init_from_file's rule)."""
        if "general.alignment" not in self.metadata:
            return GGUF_DEFAULT_ALIGNMENT
        value = self.metadata["general.alignment"]
        vtype = self.metadata_types["general.alignment"][0]
        if vtype not in INTEGER_TYPES:
            raise GGUFError(f"{self.path}: general.alignment must be an unsigned integer, got a "
                            f"{_type_name(vtype)} value {str(value)[:40]}")
        if value <= 0 or value & (value - 1):
            raise GGUFError(f"{self.path}: general.alignment {value} is not a power of two")
        return int(value)

    def _parse_tensor_info(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        """One tensor info: name, dims (count checked before they are read), type id, offset."""
        name = cur.string("tensor name", strict=True)
        if len(name.encode("utf-8")) >= GGML_MAX_NAME:
            raise GGUFError(f"{self.path}: tensor name {name[:80]!r} is too long: "
                            f"{len(name.encode('utf-8'))} bytes, ggml allows {GGML_MAX_NAME - 1}")
        n_dims = cur.scalar("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..{GGML_MAX_DIMS} allowed)")
        shape = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims, f"shape of {name!r}"))
        type_id = cur.scalar("<I", f"type of {name!r}")
        offset = cur.scalar("<Q", f"offset of {name!r}")
        return name, shape, type_id, offset

    def _place_tensor(self, name: str, shape: tuple[int, ...], type_id: int, offset: int) -> TensorInfo:
        """Check one tensor's type, shape and data range (inside the file) and make its entry.

        A repacked tensor is entered with its plain type (``stored_type_id`` keeps the file's):
        every reader of the entry sees the plain type, :meth:`tensor_bytes` converts its rows.
        """
        from evalkit.formats.repack import codec_for
        codec = codec_for(type_id, f"{self.path}: tensor {name!r}")
        fmt = codec.plain if codec is not None else FORMATS_BY_ID.get(type_id)
        if fmt is None:
            raise GGUFError(f"{self.path}: tensor {name!r} has unknown ggml type id {type_id}")
        if any(d == 0 for d in shape):
            raise GGUFError(f"{self.path}: tensor {name!r} has an empty dimension in shape {shape}")
        n = 1
        for d in shape:
            n *= d
        if n > _INT64_MAX:
            # ggml counts elements in int64_t (gguf_init_from_file checks the same overflow)
            raise GGUFError(f"{self.path}: tensor {name!r} has shape {shape}: {n} elements overflow int64")
        if shape[0] % fmt.block_size:
            raise GGUFError(f"{self.path}: tensor {name!r}: row length {shape[0]} is not a multiple of "
                            f"{fmt.name}'s block size {fmt.block_size}")
        if offset % self.alignment:
            raise GGUFError(f"{self.path}: tensor {name!r} data offset {offset} is not aligned to "
                            f"{self.alignment}")
        nbytes = stored = fmt.tensor_bytes(shape)
        if codec is not None:
            nrows = n // shape[0]
            codec.check_shape(shape[0], nrows, f"{self.path}: tensor {name!r}")
            stored = nrows * codec.stored_row_bytes(shape[0])
        start = self.data_offset + offset
        if start + stored > len(self._mm):
            raise GGUFError(f"{self.path}: tensor {name!r} ({fmt.name}, shape {shape}) data [{start}, "
                            f"{start + stored}) lies beyond the end of the file ({len(self._mm)} bytes): "
                            "truncated or corrupt")
        if codec is None:
            return TensorInfo(name, tuple(shape), type_id, start, nbytes)
        return TensorInfo(name, tuple(shape), fmt.type_id, start, nbytes, stored_type_id=type_id,
                          stored_nbytes=None if stored == nbytes else stored)

    def _check_no_overlap(self) -> None:
        """No two tensors may share bytes: each one's data must end before the next one starts."""
        by_start = sorted(self.tensors.values(), key=lambda t: (t.offset, t.name))
        for a, b in zip(by_start, by_start[1:]):
            if a.offset == b.offset:
                raise GGUFError(f"{self.path}: tensors {a.name!r} and {b.name!r} both start at data offset "
                                f"{a.offset - self.data_offset}: their data overlap")
            if a.offset + a.file_nbytes > b.offset:
                raise GGUFError(f"{self.path}: tensor {a.name!r} ({a.stored_type_name}, shape {a.shape}, "
                                f"{a.file_nbytes} bytes at file offset {a.offset}) overlaps tensor {b.name!r} starting at "
                                f"{b.offset}: its type and shape do not fit the space before it")

    # -- access ----------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        """The directory entry of a tensor; KeyError names the file when absent."""
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def stored_bytes(self, name: str) -> np.ndarray:
        """Zero-copy flat uint8 view of a tensor's bytes exactly as the file stores them."""
        t = self.tensor(name)
        return self._bufs[t.shard][t.offset:t.offset + t.file_nbytes]

    def tensor_bytes(self, name: str) -> np.ndarray:
        """uint8 rows (nrows, row_bytes) of a tensor in its plain type: a zero-copy view of the
        map, or, for a repacked tensor, its rows de-interleaved into a new array (converted on
        each call, nothing cached: the caller keeps what it needs, so no second copy lingers)."""
        t = self.tensor(name)
        flat = self.stored_bytes(name)
        if t.stored_type_id is None:
            return flat.reshape(t.nrows, t.nbytes // t.nrows)
        from evalkit.formats.repack import REPACKED_BY_ID, unpack_rows
        return unpack_rows(flat, REPACKED_BY_ID[t.stored_type_id], t.n_per_row, t.nrows)

    def rows_f32(self, name: str, threads: int | None = None, variant: str = "to_float") -> np.ndarray:
        """The tensor as float32 rows (nrows, ne0). A repacked tensor's ``to_float`` values are the
        reference's for the repacked type (``evalkit.formats.repack.repacked_to_float``)."""
        from evalkit.codec import dequantize
        t = self.tensor(name)
        q = self.tensor_bytes(name)
        if t.stored_type_id is not None and variant == "to_float":
            from evalkit.formats.repack import REPACKED_BY_ID, repacked_to_float
            x = repacked_to_float(q, REPACKED_BY_ID[t.stored_type_id], t.n_per_row)
            if x is not None:
                return x
        return dequantize(q, t.type_name, t.n_per_row, threads=threads, variant=variant)

    def dequantize(self, name: str, threads: int | None = None, variant: str = "to_float") -> np.ndarray:
        """The tensor as float32, shaped like numpy/torch (reversed ggml shape)."""
        t = self.tensor(name)
        return self.rows_f32(name, threads, variant).reshape(tuple(reversed(t.shape)))

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or ``default``."""
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def mapping(self, shard: int = 0) -> mmap.mmap | None:
        """The memory map of shard ``shard`` (0: this file), None once closed."""
        return self._mm if shard == 0 else getattr(self._shards[shard - 1], "_mm", None)

    def close(self) -> None:
        """Release the mapping and any other shards' (views obtained earlier must no longer be used)."""
        for shard in getattr(self, "_shards", ()):
            shard.close()
        buf = getattr(self, "_buf", None)
        self._buf = None
        self._bufs = []
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
