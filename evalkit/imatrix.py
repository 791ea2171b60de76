"""Importance matrices: the reference's legacy binary format and mainline llama.cpp's GGUF format.

Both load to ``{tensor name: float32 vector}`` already divided by the call count, exactly
as ``llama-quantize`` prepares them (ik_llama.cpp ``load_imatrix``; mainline's GGUF reader
divides ``<name>.in_sum2`` by ``<name>.counts`` per matrix and uses 1 where the count is 0).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from evalkit.errors import EvalkitError

__all__ = ["ImatrixError", "Imatrix", "load_imatrix"]


class ImatrixError(EvalkitError, ValueError):
    """An importance-matrix file is unreadable or does not fit the model."""


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


def _load_legacy(path: str, raw: bytes) -> Imatrix:
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
    data: dict[str, np.ndarray] = {}
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
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        if ncall > 0:
            vals = vals / np.float32(ncall)
        data[name] = vals
    chunks, dataset = -1, ""
    if pos < len(raw):
        (chunks,) = take("<i", "the chunk count")
        (dlen,) = take("<i", "the dataset name length")
        if dlen < 0 or pos + dlen > len(raw):
            raise ImatrixError(f"{path}: truncated dataset name")
        dataset = raw[pos:pos + dlen].decode("utf-8", errors="replace")
    return Imatrix(data, path, dataset, chunks, [dataset] if dataset else [])


def _load_gguf(path: str) -> Imatrix:
    from evalkit.gguf import GGUFFile

    with GGUFFile(path) as f:
        data: dict[str, np.ndarray] = {}
        for name, info in f.tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            base = name[: -len(".in_sum2")]
            counts_info = f.tensors.get(base + ".counts")
            if counts_info is None:
                raise ImatrixError(f"{path}: {name!r} has no matching {base + '.counts'!r} tensor")
            sums = f.dequantize(name).astype(np.float32).reshape(-1, info.shape[0])
            counts = f.dequantize(base + ".counts").reshape(-1)
            if counts.size != sums.shape[0]:
                raise ImatrixError(f"{path}: {base!r} has {sums.shape[0]} matrices but {counts.size} counts")
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


def load_imatrix(path: str | Path) -> Imatrix:
    """Load an importance matrix (legacy ``.dat``/``.imatrix`` or GGUF), divided by call counts."""
    path = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ImatrixError(f"{path}: cannot read imatrix file: {e.strerror}") from None
    if raw[:4] == b"GGUF":
        return _load_gguf(path)
    if len(raw) < 4:
        raise ImatrixError(f"{path}: file too short to be an imatrix")
    return _load_legacy(path, raw)
