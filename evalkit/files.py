"""File facts and atomic writes shared by the commands: content hashes, model sizes, JSON."""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from pathlib import Path

import numpy as np

__all__ = ["atomic_write_text", "is_leftover_temp", "json_default", "model_size", "sha256_file", "sha256_model",
           "temp_path"]

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """sha256 of a file (cached per path, size and mtime); of every file for a folder."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file():
                h.update(f.name.encode() + sha256_file(f).encode())
        return h.hexdigest()
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


_FIRST_SHARD = re.compile(r"-00001-of-(\d{5})\.gguf$")


def sha256_model(path: str | Path) -> str:
    """The identity of a model: :func:`sha256_file`, over every shard for a split GGUF's first
    shard (``<prefix>-00001-of-0000N.gguf``), so a changed later shard changes it too."""
    p = Path(path)
    m = _FIRST_SHARD.search(p.name)
    first = sha256_file(p)
    if p.is_dir() or m is None or int(m.group(1)) <= 1:
        return first
    count, prefix = int(m.group(1)), p.name[:m.start()]
    h = hashlib.sha256(first.encode())
    for i in range(2, count + 1):
        shard = p.with_name(f"{prefix}-{i:05d}-of-{count:05d}.gguf")
        # a missing shard is the loader's named error; here it only makes another identity
        h.update(f"{shard.name}:{sha256_file(shard) if shard.is_file() else 'missing'}".encode())
    return h.hexdigest()


def model_size(path: str | Path) -> tuple[int, float]:
    """(bytes of all tensors, bits per weight over all tensors) of a GGUF file."""
    from evalkit.gguf import GGUFFile
    with GGUFFile(path) as f:
        nbytes = sum(t.file_nbytes for t in f.tensors.values())     # as stored (a repack may be smaller)
        nel = sum(t.n_elements for t in f.tensors.values())
    return nbytes, 8.0 * nbytes / nel


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (``.<name>.<pid>.<random>.tmp``): unique, so two
    writers never share one, and recognisable as a leftover by :func:`is_leftover_temp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def is_leftover_temp(path: Path) -> bool:
    """True for the temporaries evalkit's atomic writes make (a killed writer leaves them)."""
    return path.name.startswith(".") and (path.name.endswith(".tmp") or ".tmp." in path.name)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_default(o):
    """``json.dumps`` fallback for numpy scalars and arrays."""
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
