"""The base-logits file of ``llama-perplexity --kl-divergence-base`` (docs/perplexity-kld.md §3).

Layout (little-endian, no padding): magic ``_logits_``, C (uint32), V (int32),
K (int32), K·C int32 tokens (unreplaced), then K·R records, R = C-1-⌊C/2⌋, each
``float32 scale, float32 min_log_prob, uint16 code[V]`` plus one uint16 of padding
when V is odd. A record decodes to b_i = scale·q_i + min_log_prob (float32), an
approximation of the base model's log-softmax.

Every problem with a file is a :class:`LogitsFileError` (a ``ValueError`` too) naming the
file and, for a record, its chunk and row: a non-regular file, bad magic or header values,
a size that differs from what the header implies (checked before anything is allocated),
tokens outside the vocabulary, and records no writer can produce (see
:meth:`LogitsFile.read_chunk`).
"""
from __future__ import annotations

import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.metrics.perplexity import (
    BLOCK_ROWS, PerplexityAccumulator, row_max_lse, token_nll)

__all__ = [
    "MAGIC",
    "CLAMP_IK",
    "CLAMP_MAINLINE",
    "LogitsChunk",
    "LogitsFile",
    "LogitsFileError",
    "LogitsFileWriter",
    "check_logits_file",
    "decode_records",
    "encode_records",
    "file_size",
    "record_units",
]

MAGIC = b"_logits_"
HEADER_BYTES = 20
CLAMP_IK = 24.0        # ik_llama.cpp writer since PR #325 (Apr 2025)
CLAMP_MAINLINE = 16.0  # mainline llama.cpp writer
_F32 = np.float32
_ROUND_MAGIC = _F32(12582912.0)  # 1.5·2²³: adding it rounds a float to an integer, ties to even


class LogitsFileError(EvalkitError, ValueError):
    """A base-logits file cannot be written or read: the message names the file (and chunk, row)."""


def record_units(n_vocab: int) -> int:
    """nv = 2·⌈V/2⌉ + 4, the record length in uint16 units (record bytes = 2·nv)."""
    return 2 * ((n_vocab + 1) // 2) + 4


def file_size(n_ctx: int, n_vocab: int, n_chunks: int) -> int:
    """Exact size in bytes of a file with these header values (§3.2)."""
    r = n_ctx - 1 - n_ctx // 2
    return HEADER_BYTES + 4 * n_chunks * n_ctx + n_chunks * r * 2 * record_units(n_vocab)


def _record_dtype(n_vocab: int) -> np.dtype:
    return np.dtype([("scale", "<f4"), ("min_log_prob", "<f4"),
                     ("q", "<u2", (record_units(n_vocab) - 4,))])


# --------------------------------------------------------------------------
# encoding / decoding of records
# --------------------------------------------------------------------------

def encode_records(logits, clamp: float = CLAMP_IK) -> np.ndarray:
    """Encode float32 logits rows (n, V) into records, as the reference writer does (§3.3).

    Returns a structured array of n records (fields ``scale``, ``min_log_prob``, ``q``;
    ``q`` has the padding slot when V is odd, always 0). ``clamp`` is D: 24 for
    ik_llama.cpp, 16 for mainline. The caller checks finiteness first.
    """
    z = np.asarray(logits)
    if z.ndim != 2 or z.dtype != np.float32:
        raise LogitsFileError(f"logits must be a float32 (rows, n_vocab) array, got {z.dtype} "
                              f"{z.shape}")
    n, v = z.shape
    out = np.zeros(n, dtype=_record_dtype(v))
    d = _F32(clamp)
    for a in range(0, n, BLOCK_ROWS):
        zb = z[a:a + BLOCK_ROWS]
        m_max, _, s = row_max_lse(zb)
        m_min = np.maximum(zb.min(axis=1), m_max - d)  # m = max(min z, M - D) in float
        lam = np.log(s).astype(_F32)
        out["min_log_prob"][a:a + BLOCK_ROWS] = (m_min - m_max) - lam
        scale = (m_max - m_min) / _F32(65535.0)
        out["scale"][a:a + BLOCK_ROWS] = scale
        # errstate: scale = 0 rows give inf/nan here; their codes are zeroed below.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = _F32(1.0) / scale
            x = inv[:, None] * (zb - m_min[:, None])  # float product, as the reference
            # nearest_int: round through the float add of 1.5·2²³ (ties to even), then keep
            # the low 16 bits as the uint16 store does.
            x = (x + _ROUND_MAGIC) - _ROUND_MAGIC
            x[~np.isfinite(x)] = 0
            qi = x.astype(np.int64)
        qi[~(zb > m_min[:, None])] = 0
        qi[scale == 0] = 0  # scale = 0: all codes 0
        out["q"][a:a + BLOCK_ROWS, :v] = qi.astype(np.uint16)
    return out


def decode_records(records: np.ndarray, n_vocab: int) -> np.ndarray:
    """Decode records to float32 log-probabilities (n, V): b = scale·q + min_log_prob.

    Multiply then add, each rounded to float32, no renormalization (§3.4).
    """
    q = records["q"][:, :n_vocab].astype(_F32)
    q *= records["scale"][:, None]
    q += records["min_log_prob"][:, None]
    return q


# --------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------

class LogitsFileWriter:
    """Write a base-logits file chunk by chunk; the file appears only on a complete ``close()``.

    ``tokens`` is the token stream (unreplaced: the original stream tokens, BOS at
    t₀ only if tokenization added it); the first ``n_chunks``·``n_ctx`` of them are
    stored (``n_chunks`` None: ⌊T/C⌋). Data go to a temporary file beside ``path``,
    renamed over ``path`` by :meth:`close` once all chunks are written; an exception
    inside a ``with`` block, or :meth:`abort`, removes it.
    """

    def __init__(self, path, n_ctx: int, n_vocab: int, tokens, n_chunks: int | None = None,
                 *, clamp: float = CLAMP_IK) -> None:
        self.path = Path(path)
        self.n_ctx = int(n_ctx)
        self.n_vocab = int(n_vocab)
        if self.n_ctx < 3 or self.n_vocab < 1:
            raise LogitsFileError(f"{self.path}: invalid n_ctx={self.n_ctx} / n_vocab={self.n_vocab}")
        toks = np.asarray(tokens)
        if toks.ndim != 1 or (toks.size and not np.issubdtype(toks.dtype, np.integer)):
            raise LogitsFileError(f"{self.path}: tokens must be a 1-D integer array")
        k_max = toks.size // self.n_ctx
        self.n_chunks = k_max if n_chunks is None else int(n_chunks)
        if not 1 <= self.n_chunks <= k_max:
            raise LogitsFileError(f"{self.path}: n_chunks={self.n_chunks} needs "
                                  f"{self.n_chunks * self.n_ctx} tokens (n_ctx={self.n_ctx}); "
                                  f"the stream has {toks.size}")
        self.tokens = toks[: self.n_chunks * self.n_ctx].astype("<i4")
        if self.tokens.min() < 0 or self.tokens.max() >= self.n_vocab:
            raise LogitsFileError(f"{self.path}: token ids must lie in [0, {self.n_vocab})")
        self.clamp = float(clamp)
        self.first = self.n_ctx // 2
        self.n_rows = self.n_ctx - 1 - self.first
        self.chunks_written = 0
        self.accumulator = PerplexityAccumulator()  # the PPL the writing run prints
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".partial",
                                   dir=self.path.parent)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(MAGIC)
        self._fh.write(np.array([self.n_ctx, self.n_vocab, self.n_chunks], dtype="<i4").tobytes())
        self._fh.write(self.tokens.tobytes())

    def write_chunk(self, logits) -> np.ndarray:
        """Encode and append the next chunk; return its per-token NLLs (float NLL of §3.3.6).

        ``logits``: float32, either the full chunk (C, V) or only the scored rows
        ⌊C/2⌋ … C-2 (R, V). NaN/Inf raise ValueError naming chunk and position.
        """
        if self._fh is None:
            raise LogitsFileError(f"{self.path}: writer is closed")
        k = self.chunks_written
        if k >= self.n_chunks:
            raise LogitsFileError(f"{self.path}: all {self.n_chunks} chunks already written")
        z = np.asarray(logits)
        if z.ndim != 2 or z.shape[1] != self.n_vocab or z.shape[0] not in (self.n_ctx, self.n_rows):
            raise LogitsFileError(f"{self.path}: chunk {k}: logits must have shape "
                                  f"({self.n_ctx} or {self.n_rows}, {self.n_vocab}), got {z.shape}")
        if z.shape[0] == self.n_ctx:
            z = z[self.first:self.n_ctx - 1]
        start = k * self.n_ctx + self.first + 1
        targets = self.tokens[start:start + self.n_rows]
        # token_nll validates dtype and finiteness (naming chunk and position) before anything is written
        nll = token_nll(z, targets, writer=True, chunk=k, first_row=self.first)
        self._fh.write(encode_records(z, self.clamp).tobytes())
        self.chunks_written += 1
        self.accumulator.add(nll)
        return nll

    def write_encoded(self, records: np.ndarray) -> None:
        """Append the next chunk's records already produced by :func:`encode_records`.

        Lets a resumable pass keep each chunk's records on disk and assemble the file at the end.
        """
        if self._fh is None:
            raise LogitsFileError(f"{self.path}: writer is closed")
        k = self.chunks_written
        if k >= self.n_chunks:
            raise LogitsFileError(f"{self.path}: all {self.n_chunks} chunks already written")
        expected = _record_dtype(self.n_vocab)
        if records.dtype != expected or records.shape != (self.n_rows,):
            raise LogitsFileError(f"{self.path}: chunk {k}: expected {self.n_rows} records of dtype "
                                  f"{expected}, got shape {records.shape} dtype {records.dtype}")
        self._fh.write(records.tobytes())
        self.chunks_written += 1

    def close(self) -> Path:
        """Finish: check that every chunk was written, then rename the temporary file to ``path``."""
        if self._fh is None:
            raise LogitsFileError(f"{self.path}: writer already closed")
        if self.chunks_written != self.n_chunks:
            self.abort()
            raise LogitsFileError(f"{self.path}: only {self.chunks_written} of {self.n_chunks} chunks "
                                  f"were written; no file was produced")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Discard everything written so far (the temporary file is removed)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        try:
            self._tmp.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "LogitsFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._fh is not None:
            self.close()


# --------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------

@dataclass
class LogitsChunk:
    """One chunk of a base-logits file, decoded.

    ``tokens``: the C stored (unreplaced) tokens; ``targets``: tokens at chunk positions
    ⌊C/2⌋+1 … C-1; ``logprobs``: float32 (R, V), row r pairs with logits row ⌊C/2⌋+r;
    ``scale`` / ``min_log_prob``: the per-record header floats.
    """

    index: int
    tokens: np.ndarray
    targets: np.ndarray
    logprobs: np.ndarray
    scale: np.ndarray
    min_log_prob: np.ndarray


def _open_regular(path: Path):
    """Open ``path`` for reading; a directory, FIFO, socket or device is a LogitsFileError.

    O_NONBLOCK keeps the open of a FIFO without a writer from hanging; it has no effect on
    the regular files that are then read. A missing or unreadable file stays an OSError.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
            raise LogitsFileError(f"{path}: is {kind}, not a regular base-logits file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class LogitsFile:
    """Reader of a base-logits file; validates magic, header and exact size on open.

    Attributes: ``path``, ``n_ctx``, ``n_vocab``, ``n_chunks``, ``n_rows`` (R per chunk),
    ``tokens`` (int32, K·C). Iterating yields :class:`LogitsChunk` in order.
    """

    def __init__(self, path) -> None:
        self.path = Path(path)
        self._fh = _open_regular(self.path)
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _fail(self, what: str) -> LogitsFileError:
        return LogitsFileError(f"{self.path}: {what}")

    def _read_header(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        head = self._fh.read(HEADER_BYTES)
        if len(head) < len(MAGIC) and MAGIC.startswith(head) and head:
            raise self._fail(f"truncated: only {size} bytes, not even a complete header")
        if len(head) < len(MAGIC) or head[:8] != MAGIC:
            raise self._fail(f"not a llama-perplexity base-logits file (magic {head[:8]!r}, "
                             f"expected {MAGIC!r})")
        if len(head) < HEADER_BYTES:
            raise self._fail(f"truncated header: {size} bytes, the header alone needs {HEADER_BYTES}")
        n_ctx = int(np.frombuffer(head, "<u4", 1, 8)[0])
        n_vocab, n_chunks = (int(x) for x in np.frombuffer(head, "<i4", 2, 12))
        # Forks write "_logits_v2" (a different, stride-based layout) with the same first
        # 8 bytes; a v1 reader would take "v2" as part of C. Confirmed by the size check.
        is_v2 = head[8:10] == b"v2"
        valid = 3 <= n_ctx < 2**31 and n_vocab >= 1 and n_chunks >= 1
        expected = file_size(n_ctx, n_vocab, n_chunks) if valid else -1
        if is_v2 and expected != size:
            raise self._fail("is a '_logits_v2' file (a fork's stride-based format), "
                             "which is not supported; re-create it with llama.cpp or ik_llama.cpp")
        if not valid:
            raise self._fail(f"invalid header values n_ctx={n_ctx}, n_vocab={n_vocab}, "
                             f"n_chunks={n_chunks}")
        if size < expected:
            raise self._fail(f"truncated: n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunks={n_chunks} "
                             f"require {expected} bytes, the file has {size}")
        if size > expected:
            raise self._fail(f"{size - expected} unexpected trailing bytes: n_ctx={n_ctx}, "
                             f"n_vocab={n_vocab}, n_chunks={n_chunks} require {expected} bytes, "
                             f"the file has {size}")
        self.n_ctx, self.n_vocab, self.n_chunks = n_ctx, n_vocab, n_chunks
        self.first = n_ctx // 2
        self.n_rows = n_ctx - 1 - self.first
        raw = self._fh.read(4 * n_ctx * n_chunks)
        if len(raw) != 4 * n_ctx * n_chunks:  # the file shrank after the size check
            raise self._fail("truncated while reading the tokens")
        self.tokens = np.frombuffer(raw, "<i4").astype(np.int32)
        if self.tokens.min() < 0 or self.tokens.max() >= n_vocab:
            bad = int(np.argmax((self.tokens < 0) | (self.tokens >= n_vocab)))
            raise self._fail(f"token {bad} has id {int(self.tokens[bad])}, outside [0, {n_vocab}): "
                             f"corrupt or foreign file")
        self._dtype = _record_dtype(n_vocab)
        self._records_at = HEADER_BYTES + 4 * n_ctx * n_chunks

    def read_chunk(self, k: int) -> LogitsChunk:
        """Read and decode chunk ``k`` (0-based).

        Every record is checked as it is decoded: a scale, min_log_prob or largest value no
        writer can produce raises :class:`LogitsFileError` naming the chunk and row.
        """
        if not 0 <= k < self.n_chunks:
            raise IndexError(f"{self.path}: chunk {k} out of range (file has {self.n_chunks})")
        if self._fh.closed:
            raise self._fail("file is closed")
        rec_bytes = self._dtype.itemsize
        self._fh.seek(self._records_at + k * self.n_rows * rec_bytes)
        raw = self._fh.read(self.n_rows * rec_bytes)
        if len(raw) != self.n_rows * rec_bytes:  # the file shrank after the size check
            raise self._fail(f"truncated while reading chunk {k}")
        rec = np.frombuffer(raw, self._dtype)
        self._check_record_headers(rec, k)
        with np.errstate(over="ignore"):  # a huge scale decodes to inf, refused just below
            logprobs = decode_records(rec, self.n_vocab)
        self._check_decoded(rec, logprobs, k)
        toks = self.tokens[k * self.n_ctx:(k + 1) * self.n_ctx]
        return LogitsChunk(index=k, tokens=toks, targets=toks[self.first + 1:],
                           logprobs=logprobs,
                           scale=rec["scale"].copy(), min_log_prob=rec["min_log_prob"].copy())

    def _where(self, k: int, r: int) -> str:
        return f"chunk {k}, row {r} (logits row {self.first + r} of the chunk)"

    def _check_record_headers(self, rec: np.ndarray, k: int) -> None:
        """scale and min_log_prob as the writer makes them (§3.3): scale = (M − m)/65535 is
        finite and ≥ 0 (0 for a constant row), min_log_prob = (m − M) − λ is finite and ≤ 0."""
        scale, mlp = rec["scale"], rec["min_log_prob"]
        bad_scale = ~(np.isfinite(scale) & (scale >= 0))
        bad_mlp = ~(np.isfinite(mlp) & (mlp <= 0))
        if bad_scale.any():
            r = int(np.argmax(bad_scale))
            raise self._fail(f"{self._where(k, r)}: scale {float(scale[r]):.8g} is not a finite "
                             f"number ≥ 0: corrupt record")
        if bad_mlp.any():
            r = int(np.argmax(bad_mlp))
            raise self._fail(f"{self._where(k, r)}: min_log_prob {float(mlp[r]):.8g} is not a "
                             f"finite number ≤ 0: corrupt record")

    def _check_decoded(self, rec: np.ndarray, logprobs: np.ndarray, k: int) -> None:
        """The largest decoded value of a row is the log of its top probability, so it lies
        in [−ln V, 0]: the writer's top code is 65535 (all 0 when scale = 0), which decodes to
        −λ = −ln Σ exp(z − M), and 1 ≤ Σ ≤ V. The slack covers the float rounding of
        scale, min_log_prob and the decode (≈ 1e-7 relative to the row's range)."""
        top = logprobs.max(axis=1).astype(np.float64)
        slack = 1e-5 + 1e-6 * np.abs(rec["min_log_prob"].astype(np.float64))
        low = -math.log(self.n_vocab) - slack
        bad = ~((top <= slack) & (top >= low))  # written so that NaN counts as bad
        if bad.any():
            r = int(np.argmax(bad))
            if not top[r] <= slack[r]:
                i = int(np.argmax(logprobs[r]))
                problem = (f"decodes to log-probability {top[r]:.6g} > 0 at token {i} "
                           f"(scale {float(rec['scale'][r]):.8g}, min_log_prob "
                           f"{float(rec['min_log_prob'][r]):.8g})")
            else:
                problem = (f"its largest log-probability {top[r]:.6g} is below −ln(n_vocab) = "
                           f"{-math.log(self.n_vocab):.6g}, so its probabilities cannot sum to 1")
            raise self._fail(f"{self._where(k, r)}: {problem}: corrupt record")

    def __iter__(self) -> Iterator[LogitsChunk]:
        for k in range(self.n_chunks):
            yield self.read_chunk(k)

    def check(self, n_ctx: int | None = None, tokens=None, n_vocab: int | None = None) -> None:
        """Raise :class:`LogitsFileError` unless the header matches: equal ``n_ctx``, ``n_vocab``, and the
        stored tokens equal the first K·C of ``tokens`` (the unreplaced corpus stream)."""
        if n_ctx is not None and int(n_ctx) != self.n_ctx:
            raise self._fail(f"was written with n_ctx={self.n_ctx}, expected n_ctx={int(n_ctx)}")
        if n_vocab is not None and int(n_vocab) != self.n_vocab:
            raise self._fail(f"has n_vocab={self.n_vocab}, the model's vocabulary is {int(n_vocab)}")
        if tokens is not None:
            exp = np.asarray(tokens).ravel()
            need = self.tokens.size
            if exp.size < need:
                raise self._fail(f"holds {self.n_chunks} chunks of {self.n_ctx} = {need} tokens, "
                                 f"but the corpus has only {exp.size} tokens")
            diff = np.flatnonzero(exp[:need] != self.tokens)
            if diff.size:
                i = int(diff[0])
                raise self._fail(
                    f"tokens differ from the corpus at stream index {i} (chunk {i // self.n_ctx}, "
                    f"position {i % self.n_ctx}): file has {int(self.tokens[i])}, corpus has "
                    f"{int(exp[i])} ({diff.size} of {need} tokens differ)")

    def close(self) -> None:
        """Close the underlying file."""
        self._fh.close()

    def __enter__(self) -> "LogitsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_logits_file(path, n_ctx: int | None = None, tokens=None,
                      n_vocab: int | None = None) -> None:
    """Open ``path`` and check its header against the expected n_ctx, tokens and n_vocab
    (see :meth:`LogitsFile.check`); raises :class:`LogitsFileError` with the mismatch."""
    with LogitsFile(path) as f:
        f.check(n_ctx=n_ctx, tokens=tokens, n_vocab=n_vocab)
