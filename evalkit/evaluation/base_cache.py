"""A compact, exact base for later runs: the base's final hidden states instead of its logits.

llama-perplexity keeps a base as its log-probabilities, 2·(n_vocab + 4) bytes per scored
token. The input of the output projection (after the final norm) determines those logits
exactly, and is n_embd floats per position: for SmolLM2 (576 wide, 49152 tokens) the cache
is ~42× smaller than the logits file, and recomputing ``output(hidden)`` with the same op
and the same chunk grouping gives bit-identical logits. A run that reads the cache loads
only the base's output tensor, never the base model.

File layout (little-endian): magic ``EKBASEC1``, u32 header length, a JSON header
(corpus sha256, n_ctx, n_chunks, base sha256, n_embd, first_row, the chunks' tokens'
sha256), zero padding to 64 bytes, then float32 hidden states (K, C - first_row, n_embd):
for every chunk the positions from ``first_row`` to C-1, as the forward computes them; then
K u32 CRC-32s, one per chunk's states, checked as each chunk is read (a damaged byte is a
named error, never a silently different KLD).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from evalkit.errors import RunError
from evalkit.evaluation.window import ScoredWindow
from evalkit.files import temp_path

__all__ = ["BaseCache", "BaseCacheError", "BaseCacheHeader", "CachedBaseForward", "HiddenCapture",
           "output_projection", "tokens_sha256", "write_base_cache"]

MAGIC = b"EKBASEC1"
_ALIGN = 64
FORMAT = 2                      # 1: no checksums (refused: written before they existed)


class BaseCacheError(RunError):
    """The base cache is unreadable or belongs to another corpus, model, context or chunk set."""


@dataclass(frozen=True)
class BaseCacheHeader:
    """What a cache was made from: checked against the run that reads it."""

    corpus_sha256: str
    n_ctx: int
    n_chunks: int
    base_sha256: str
    n_embd: int
    first_row: int
    tokens_sha256: str
    format: int = FORMAT

    @property
    def rows(self) -> int:
        """Stored positions per chunk (first_row … C-1)."""
        return self.n_ctx - self.first_row


def tokens_sha256(chunks: np.ndarray) -> str:
    """sha256 of the evaluated chunks' tokens (int32), to recognise the same chunk set."""
    return hashlib.sha256(np.ascontiguousarray(chunks, dtype=np.int32).tobytes()).hexdigest()


def _data_offset(header_bytes: bytes) -> int:
    n = len(MAGIC) + 4 + len(header_bytes)
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def write_base_cache(path: Path, header: BaseCacheHeader, per_chunk: Iterable[np.ndarray]) -> None:
    """Write the cache atomically from each chunk's hidden states (rows, n_embd), in order."""
    head = json.dumps(asdict(header), sort_keys=True).encode()
    offset = _data_offset(head)
    tmp = temp_path(Path(path))
    try:
        with open(tmp, "wb") as fh:
            fh.write(MAGIC + struct.pack("<I", len(head)) + head)
            fh.write(b"\0" * (offset - fh.tell()))
            crcs = []
            for h in per_chunk:
                h = np.ascontiguousarray(h, dtype="<f4")
                if h.shape != (header.rows, header.n_embd):
                    raise BaseCacheError(f"{path}: chunk {len(crcs)} has hidden states of shape {h.shape}, "
                                         f"expected {(header.rows, header.n_embd)}")
                data = h.tobytes()
                fh.write(data)
                crcs.append(zlib.crc32(data))
            if len(crcs) != header.n_chunks:
                raise BaseCacheError(f"{path}: {len(crcs)} chunks written, the header says {header.n_chunks}")
            fh.write(np.asarray(crcs, dtype="<u4").tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class BaseCache:
    """A base cache file, memory-mapped and validated."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise BaseCacheError(f"base cache {self.path}: is a folder; base_cache names the cache file "
                                 "(e.g. base.ekc), created by the first run")
        if not self.path.is_file():
            raise BaseCacheError(f"base cache {self.path}: not found (or not a regular file)")
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            lead = fh.read(len(MAGIC) + 4)
            if len(lead) < len(MAGIC) + 4 or lead[:len(MAGIC)] != MAGIC:
                raise BaseCacheError(f"base cache {self.path}: not an evalkit base cache (bad magic)")
            (n,) = struct.unpack("<I", lead[len(MAGIC):])
            if n > 1 << 20:
                raise BaseCacheError(f"base cache {self.path}: header length {n} is impossible")
            if len(MAGIC) + 4 + n > size:
                raise BaseCacheError(f"base cache {self.path}: {size} bytes, shorter than its {n}-byte header "
                                     "(truncated)")
            self.header = self._parse_header(fh.read(n))
            offset = _data_offset(json.dumps(asdict(self.header), sort_keys=True).encode())
        h = self.header
        data = 4 * h.n_chunks * h.rows * h.n_embd
        want = offset + data + 4 * h.n_chunks
        if size != want:
            raise BaseCacheError(f"base cache {self.path}: {size} bytes, its header needs {want} "
                                 "(truncated or damaged)")
        self.hidden = np.memmap(self.path, dtype="<f4", mode="r", offset=offset,
                                shape=(h.n_chunks, h.rows, h.n_embd))
        self.crc32 = np.fromfile(self.path, dtype="<u4", count=h.n_chunks, offset=offset + data)

    def chunk(self, k: int) -> np.ndarray:
        """Chunk ``k``'s hidden states (rows, n_embd), checked against its CRC-32 (a new array)."""
        x = np.array(self.hidden[k])
        if zlib.crc32(x.tobytes()) != int(self.crc32[k]):
            raise BaseCacheError(f"base cache {self.path}: the hidden states of chunk {k} fail their "
                                 "checksum (the file is damaged): delete it and run again to rewrite it")
        return x

    def _parse_header(self, raw: bytes) -> BaseCacheHeader:
        try:
            d = json.loads(raw.decode("utf-8"))
            header = BaseCacheHeader(**d)
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            raise BaseCacheError(f"base cache {self.path}: unreadable header: {e}") from None
        ints = (header.n_ctx, header.n_chunks, header.n_embd, header.first_row)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints) \
                or header.n_embd == 0 or not 0 <= header.first_row < header.n_ctx:
            raise BaseCacheError(f"base cache {self.path}: header values out of range: {d}")
        if header.format != FORMAT:
            raise BaseCacheError(f"base cache {self.path}: format {header.format!r}, this evalkit reads format "
                                 f"{FORMAT} (per-chunk checksums): delete it; the next run writes it again")
        return header

    def check(self, corpus_sha256: str, n_ctx: int, chunks: np.ndarray, base_sha256: str) -> None:
        """BaseCacheError unless the cache was made for this corpus, context, chunk set and base."""
        h = self.header
        for what, have, want in (("corpus", h.corpus_sha256, corpus_sha256), ("n_ctx", h.n_ctx, n_ctx),
                                 ("chunk count", h.n_chunks, int(chunks.shape[0])),
                                 ("chunk tokens", h.tokens_sha256, tokens_sha256(chunks)),
                                 ("base model", h.base_sha256, base_sha256)):
            if have != want:
                raise BaseCacheError(f"base cache {self.path} was made for another {what} "
                                     f"({have} there, {want} here): delete it or point base_cache elsewhere")


def output_projection(path: Path):
    """The base's output projection alone (``output.weight``, or the tied ``token_embd.weight``)
    as the forward pass builds it, without loading anything else of the model."""
    from evalkit.model.qlinear import QLinear
    from evalkit.sources import GGUFSource, HFSource

    source = HFSource(path, permute_qk=False) if Path(path).is_dir() else GGUFSource(path)
    infos = {t.name: t for t in source.tensors}
    name = "output.weight" if "output.weight" in infos else "token_embd.weight"
    if name not in infos:
        raise BaseCacheError(f"{path}: no output.weight or token_embd.weight to recompute logits with")
    layer = QLinear(source.raw(name), infos[name].type_name, infos[name].n_per_row)
    layer.source = source          # the weight points into the source's memory map
    return layer


class HiddenCapture:
    """Copies the input of a model's output projection (the final-norm hidden states) on each
    forward call: ``with HiddenCapture(model) as cap: ...; cap.last`` is (B, T', n_embd)."""

    def __init__(self, model):
        self.model, self.last, self._handle = model, None, None

    def _hook(self, module, args, kwargs):
        self.last = args[0].detach().cpu().numpy().copy()     # .cpu(): a model on a device

    def __enter__(self) -> "HiddenCapture":
        self._handle = self.model.output.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class CachedBaseForward:
    """The base as a forward callable read from a :class:`BaseCache`: chunks are recognised by
    their tokens, and their logits recomputed from the stored hidden states."""

    def __init__(self, cache: BaseCache, output, window: ScoredWindow, chunks: np.ndarray, buffer=None):
        if cache.header.first_row != window.first_row:
            raise BaseCacheError(f"base cache {cache.path}: stored from row {cache.header.first_row}, "
                                 f"the run scores from row {window.first_row}")
        self.cache, self.output, self.window, self.buffer = cache, output, window, buffer
        self._index = {np.ascontiguousarray(c, dtype=np.int32).tobytes(): k for k, c in enumerate(chunks)}

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """(B, C) tokens of cached chunks → (B, n_rows, V) logits of the scored rows."""
        import torch
        try:
            ks = [self._index[np.ascontiguousarray(t, dtype=np.int32).tobytes()] for t in tokens]
        except KeyError:
            raise BaseCacheError(f"base cache {self.cache.path}: a chunk to evaluate is not in the cache") from None
        x = torch.from_numpy(np.stack([self.cache.chunk(k) for k in ks]))      # (B, C - first, E)
        shape = (*x.shape[:-1], self.output.out_features)
        out = self.buffer("logits", *shape) if self.buffer is not None else None
        with torch.no_grad():
            z = self.output(x, out=out)
        return self.window.scored_rows(z.numpy())
