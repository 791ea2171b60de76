"""Importance matrices: the reference's legacy binary format and mainline llama.cpp's GGUF format.

Two views of a file:

* :func:`load_imatrix` → :class:`Imatrix`, ``{tensor name: float32 vector}`` already divided
  by the call count, exactly as ``llama-quantize`` prepares them (ik_llama.cpp
  ``load_imatrix``; mainline's GGUF reader divides ``<name>.in_sum2`` by ``<name>.counts``
  per matrix and uses 1 where the count is 0).
* :func:`read_imatrix_stats` → :class:`ImatrixStats`, the raw statistics (Σx² per input
  column and matrix, activations counted per matrix, calls), which
  :func:`write_imatrix` writes in either format.

The two formats store the same statistics differently (see docs/imatrix.md):

* legacy (ik_llama.cpp ``save_imatrix``): per entry ``ncall`` and the values
  ``Σx² / count · ncall``; a trailer with the chunk count and the dataset name;
* GGUF (mainline ``save_imatrix``): ``<name>.in_sum2`` (ne0 = row length, ne1 = matrices)
  holding Σx², ``<name>.counts`` (1 × matrices) holding the activations counted, and the
  keys ``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count``,
  ``imatrix.chunk_size``.

A legacy entry becomes Σx² = value · S and count = ncall · S with S the chunk size (512
unless told), as mainline converts it; back, ncall = ⌈max count / S⌉. With S a power of
two both directions are exact, so legacy → GGUF → legacy gives the same bytes.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from evalkit.errors import EvalkitError

__all__ = ["ImatrixError", "Imatrix", "ImatrixEntry", "ImatrixStats", "IMATRIX_FORMATS", "check_output_path",
           "imatrix_format", "load_imatrix", "read_imatrix_stats", "write_imatrix", "write_imatrix_gguf",
           "write_imatrix_legacy"]

IMATRIX_FORMATS = ("dat", "gguf")
DEFAULT_CHUNK_SIZE = 512       # mainline's default n_ctx: its guess of a legacy file's chunk size


class ImatrixError(EvalkitError, ValueError):
    """An importance-matrix file is unreadable, does not fit the model, or cannot be written."""


@dataclass
class Imatrix:
    """Per-tensor importance vectors plus provenance (dataset, chunk count, source file)."""

    data: dict[str, np.ndarray]
    path: str = ""
    dataset: str = ""
    chunks: int = -1
    datasets: list[str] = field(default_factory=list)

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def __len__(self) -> int:
        return len(self.data)

    def get(self, name: str) -> np.ndarray | None:
        """The vector for a tensor name, or None."""
        return self.data.get(name)


@dataclass
class ImatrixEntry:
    """Raw statistics of one weight tensor (one matrix, or one per expert).

    ``sums`` float64 (n_mat, n_per_row): Σx² of the input activations per column;
    ``counts`` int64 (n_mat,): activations (token rows) summed into each matrix;
    ``ncall``: collection calls, the legacy format's per-entry count.
    """

    sums: np.ndarray
    counts: np.ndarray
    ncall: int

    def __post_init__(self) -> None:
        self.sums = np.asarray(self.sums, dtype=np.float64)
        if self.sums.ndim == 1:
            self.sums = self.sums.reshape(1, -1)
        self.counts = np.asarray(self.counts, dtype=np.int64).reshape(-1)
        if self.sums.ndim != 2 or self.counts.size != self.sums.shape[0]:
            raise ImatrixError(f"imatrix entry: {self.sums.shape[0] if self.sums.ndim == 2 else '?'} matrices "
                               f"but {self.counts.size} counts")

    @property
    def n_mat(self) -> int:
        """Matrices (experts) of the tensor: 1 for a dense weight."""
        return int(self.sums.shape[0])

    @property
    def n_per_row(self) -> int:
        """Input columns of each matrix."""
        return int(self.sums.shape[1])

    def sums_f32(self) -> np.ndarray:
        """Σx² rounded once to float32, the values both formats derive from (so they agree)."""
        return self.sums.astype(np.float32)


@dataclass
class ImatrixStats:
    """Every entry's raw statistics, in order, plus the provenance both formats record."""

    entries: dict[str, ImatrixEntry]
    chunks: int = 0                   # chunks the statistics cover (legacy trailer, imatrix.chunk_count)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # tokens per chunk (imatrix.chunk_size)
    datasets: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.entries)

    def to_imatrix(self, path: str = "") -> Imatrix:
        """The loaded form (Σx² / count per matrix, 1 where nothing was counted), as
        :func:`load_imatrix` returns it for the GGUF file of these statistics."""
        data = {}
        for name, e in self.entries.items():
            s = e.sums_f32()
            out = np.ones_like(s)
            for j, c in enumerate(e.counts):
                if c > 0:
                    out[j] = s[j] / np.float32(c)
            data[name] = out.reshape(-1)
        ds = self.datasets[-1] if self.datasets else ""
        return Imatrix(data, path, ds, self.chunks, list(self.datasets))


# --------------------------------------------------------------------------- reading

def _load_legacy(path: str, raw: bytes) -> Imatrix:
    chunks, dataset, ncalls, values = _parse_legacy(path, raw)
    data = {}
    for name, v in values.items():
        # as llama-quantize: divided by ncall in float32 (entries with ncall 0 kept as stored)
        data[name] = v / np.float32(ncalls[name]) if ncalls[name] > 0 else v
    return Imatrix(data, path, dataset, chunks, [dataset] if dataset else [])


def _parse_legacy(path: str, raw: bytes) -> tuple[int, str, dict[str, int], dict[str, np.ndarray]]:
    """(chunk count or -1, dataset name, each entry's ncall, each entry's stored values)."""
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ImatrixError(f"{path}: truncated imatrix file while reading {what} at offset {pos}")
        vals = struct.unpack_from(fmt, raw, pos)
        pos += size
        return vals

    (n_entries,) = take("<i", "the entry count")
    if n_entries < 1 or n_entries > 1_000_000:
        raise ImatrixError(f"{path}: not an imatrix file (entry count {n_entries})")
    ncalls: dict[str, int] = {}
    values: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        (name_len,) = take("<i", f"the name length of entry {i}")
        if not 0 < name_len < 4096:
            raise ImatrixError(f"{path}: entry {i} has an implausible name length {name_len}")
        if pos + name_len > len(raw):
            raise ImatrixError(f"{path}: truncated imatrix file in the name of entry {i}")
        name = raw[pos:pos + name_len].decode("utf-8", errors="replace")
        pos += name_len
        ncall, nval = take("<ii", f"the counts of {name!r}")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name!r} has {nval} values")
        if pos + 4 * nval > len(raw):
            raise ImatrixError(f"{path}: truncated imatrix file in the values of {name!r}")
        values[name] = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        ncalls[name] = int(ncall)
        pos += 4 * nval
    chunks, dataset = -1, ""
    if pos < len(raw):
        (chunks,) = take("<i", "the chunk count")
        (dlen,) = take("<i", "the dataset name length")
        if dlen < 0 or pos + dlen > len(raw):
            raise ImatrixError(f"{path}: truncated dataset name")
        dataset = raw[pos:pos + dlen].decode("utf-8", errors="replace")
    return chunks, dataset, ncalls, values


def _legacy_stats(path: str, raw: bytes, chunk_size: int) -> ImatrixStats:
    chunks, dataset, ncalls, values = _parse_legacy(path, raw)
    stats = ImatrixStats({}, max(chunks, 0), chunk_size, [dataset] if dataset else [])
    for name, v in values.items():
        n = ncalls[name]
        if n < 1:
            raise ImatrixError(f"{path}: entry {name!r} has ncall {n}: its sums cannot be recovered")
        # one matrix per entry: the legacy format keeps no per-expert counts (mainline's reading too)
        stats.entries[name] = ImatrixEntry(v.astype(np.float64).reshape(1, -1) * chunk_size,
                                           [n * chunk_size], n)
    return stats


def _gguf_sums_counts(f, path: str, name: str, info) -> tuple[str, np.ndarray, np.ndarray]:
    base = name[: -len(".in_sum2")]
    counts_info = f.tensors.get(base + ".counts")
    if counts_info is None:
        raise ImatrixError(f"{path}: {name!r} has no matching {base + '.counts'!r} tensor")
    sums = f.dequantize(name).astype(np.float32).reshape(-1, info.shape[0])
    counts = f.dequantize(base + ".counts").reshape(-1)
    if counts.size != sums.shape[0]:
        raise ImatrixError(f"{path}: {base!r} has {sums.shape[0]} matrices but {counts.size} counts")
    return base, sums, counts


def _load_gguf(path: str) -> Imatrix:
    from evalkit.gguf import GGUFFile

    with GGUFFile(path) as f:
        data: dict[str, np.ndarray] = {}
        for name, info in f.tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            base, sums, counts = _gguf_sums_counts(f, path, name, info)
            out = np.ones_like(sums)
            for j, c in enumerate(counts):
                if c > 0:
                    out[j] = sums[j] / np.float32(c)
            data[base] = out.reshape(-1)
        if not data:
            raise ImatrixError(f"{path}: GGUF file holds no '*.in_sum2' tensors: not an imatrix")
        datasets = f.get("imatrix.datasets", []) or []
        chunks = int(f.get("imatrix.chunk_count", -1))
    return Imatrix(data, path, datasets[0] if datasets else "", chunks, list(datasets))


def _gguf_stats(path: str) -> ImatrixStats:
    from evalkit.gguf import GGUFFile

    with GGUFFile(path) as f:
        chunk_size = int(f.get("imatrix.chunk_size", DEFAULT_CHUNK_SIZE) or DEFAULT_CHUNK_SIZE)
        entries: dict[str, ImatrixEntry] = {}
        for name, info in f.tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            base, sums, counts = _gguf_sums_counts(f, path, name, info)
            if not np.all(np.isfinite(counts)) or np.any(counts < 0):
                raise ImatrixError(f"{path}: {base!r} has invalid counts {counts[:4].tolist()}")
            icounts = np.rint(counts).astype(np.int64)          # mainline: std::lround
            # mainline's legacy writer: ncall = ⌈max count / chunk size⌉
            ncall = int(-(-int(icounts.max(initial=0)) // chunk_size))
            entries[base] = ImatrixEntry(sums.astype(np.float64), icounts, ncall)
        if not entries:
            raise ImatrixError(f"{path}: GGUF file holds no '*.in_sum2' tensors: not an imatrix")
        datasets = [str(d) for d in (f.get("imatrix.datasets", []) or [])]
        chunks = int(f.get("imatrix.chunk_count", 0) or 0)
    return ImatrixStats(entries, chunks, chunk_size, datasets)


def _read_bytes(path: str) -> bytes:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ImatrixError(f"{path}: cannot read imatrix file: {e.strerror}") from None
    if raw[:4] != b"GGUF" and len(raw) < 4:
        raise ImatrixError(f"{path}: file too short to be an imatrix")
    return raw


def load_imatrix(path: str | Path) -> Imatrix:
    """Load an importance matrix (legacy ``.dat``/``.imatrix`` or GGUF), divided by call counts."""
    path = str(path)
    raw = _read_bytes(path)
    if raw[:4] == b"GGUF":
        return _load_gguf(path)
    return _load_legacy(path, raw)


def read_imatrix_stats(path: str | Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ImatrixStats:
    """The raw statistics of an imatrix file of either format (for converting and merging).

    ``chunk_size`` is the tokens per chunk assumed for a legacy file, which does not record
    it (a GGUF file's own ``imatrix.chunk_size`` is used for it).
    """
    path = str(path)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ImatrixError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    raw = _read_bytes(path)
    if raw[:4] == b"GGUF":
        return _gguf_stats(path)
    return _legacy_stats(path, raw, chunk_size)


# --------------------------------------------------------------------------- writing

def imatrix_format(path: str | Path, fmt: str | None = None) -> str:
    """The format to write: ``fmt`` ("dat" or "gguf") when given, else by extension (.gguf → GGUF)."""
    if fmt is not None:
        if fmt not in IMATRIX_FORMATS:
            raise ImatrixError(f"unknown imatrix format {fmt!r}; use one of {', '.join(IMATRIX_FORMATS)}")
        return fmt
    return "gguf" if str(path).lower().endswith(".gguf") else "dat"


def check_output_path(path: str | Path) -> Path:
    """``path`` if a file can be written there: its folder exists and it is not a folder itself
    (checked before a long computation, so a typo does not cost the run)."""
    p = Path(path)
    if p.is_dir():
        raise ImatrixError(f"output {p} is a folder, not a file name")
    if not p.parent.is_dir():
        raise ImatrixError(f"output {p}: the folder {p.parent} does not exist")
    return p


def _c_round(x: float) -> int:
    # C's round(): halves away from zero (Python's round() goes to even)
    return int(math.floor(x + 0.5))


def _legacy_values(name: str, e: ImatrixEntry) -> tuple[np.ndarray | None, str | None]:
    """The stored values Σx²/count·ncall of one entry, or None to skip it, with a warning.

    ik_llama.cpp ``save_imatrix``: an entry with no data is skipped; one whose experts
    partly have none is stored only when fewer than round(5 %) of them lack data, those
    experts then set to count 1 and Σx² 1.
    """
    sums, counts = e.sums_f32().astype(np.float64), e.counts.astype(np.float64)
    empty = np.flatnonzero(e.counts == 0)
    if empty.size == e.n_mat:
        return None, f"entry {name!r} has no data - skipping"
    warning = None
    if empty.size:
        if e.n_mat > 1 and empty.size < _c_round(e.n_mat * 0.05):
            sums[empty], counts[empty] = 1.0, 1.0
            warning = f"entry {name!r}: {empty.size} of {e.n_mat} experts have no data; stored as 1"
        else:
            return None, f"entry {name!r}: {empty.size} of {e.n_mat} matrices have no data - skipping"
    # float64 then one rounding: for count = 2^k · ncall this is exactly Σx²(f32) / 2^k
    vals = (sums / counts[:, None] * float(e.ncall)).astype(np.float32)
    return vals.reshape(-1), warning


def _legacy_bytes(stats: ImatrixStats) -> tuple[bytes, list[str]]:
    parts, warnings, n = [], [], 0
    for name, e in stats.entries.items():
        vals, warning = _legacy_values(name, e)
        if warning:
            warnings.append(warning)
        if vals is None:
            continue
        raw = name.encode("utf-8")
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", int(e.ncall), vals.size),
                  vals.astype("<f4").tobytes()]
        n += 1
    if n == 0:
        raise ImatrixError("no imatrix entry has data: nothing to write")
    dataset = (stats.datasets[-1] if stats.datasets else "").encode("utf-8")
    parts += [struct.pack("<ii", int(stats.chunks), len(dataset)), dataset]
    return struct.pack("<i", n) + b"".join(parts), warnings


def write_imatrix_legacy(path: str | Path, stats: ImatrixStats) -> list[str]:
    """Write ik_llama.cpp's legacy binary imatrix atomically; returns warnings (skipped entries)."""
    from evalkit.gguf import atomic_output

    p = check_output_path(path)
    data, warnings = _legacy_bytes(stats)
    with atomic_output(p) as fh:
        fh.write(data)
    return warnings


def write_imatrix_gguf(path: str | Path, stats: ImatrixStats) -> list[str]:
    """Write mainline llama.cpp's GGUF imatrix atomically (every entry, per-matrix counts)."""
    from gguf import GGUFValueType
    from evalkit.gguf import TensorSpec, write_gguf

    p = check_output_path(path)
    if not stats.entries:
        raise ImatrixError("no imatrix entries: nothing to write")
    meta = {"general.type": "imatrix", "imatrix.datasets": list(stats.datasets),
            "imatrix.chunk_count": int(stats.chunks), "imatrix.chunk_size": int(stats.chunk_size)}
    types = {"general.type": (GGUFValueType.STRING, None),
             "imatrix.datasets": (GGUFValueType.ARRAY, GGUFValueType.STRING),
             "imatrix.chunk_count": (GGUFValueType.UINT32, None),
             "imatrix.chunk_size": (GGUFValueType.UINT32, None)}
    arrays: dict[str, np.ndarray] = {}
    specs = []
    for name, e in stats.entries.items():
        arrays[name + ".in_sum2"] = e.sums_f32()
        arrays[name + ".counts"] = e.counts.astype(np.float32).reshape(-1, 1)
        specs += [TensorSpec(name + ".in_sum2", (e.n_per_row, e.n_mat), 0),
                  TensorSpec(name + ".counts", (1, e.n_mat), 0)]
    empty = [n for n, e in stats.entries.items() if not e.counts.any()]
    write_gguf(p, meta, specs, lambda s: arrays[s.name].astype("<f4"), types)
    return [f"entry {n!r} has no data (written with count 0)" for n in empty]


def write_imatrix(path: str | Path, stats: ImatrixStats, fmt: str | None = None) -> list[str]:
    """Write ``stats`` as ``fmt`` ("dat" or "gguf"; by default chosen by ``path``'s extension)."""
    if imatrix_format(path, fmt) == "gguf":
        return write_imatrix_gguf(path, stats)
    return write_imatrix_legacy(path, stats)
