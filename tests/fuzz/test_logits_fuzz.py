"""Corrupt llama-perplexity base-logits files: opening one and reading every chunk raises
LogitsFileError naming the file (and the chunk and row of a bad record) within a second and
with bounded memory, never a silently wrong number."""
from __future__ import annotations

import math
import os
import signal
import struct
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest

from evalkit.errors import EvalkitError
from evalkit.metrics import LogitsFile, LogitsFileError, LogitsFileWriter, file_size, record_units

C, V, K = 16, 64, 3                 # chunk length, vocabulary, chunks
R = C - 1 - C // 2                  # records per chunk
REC = 2 * record_units(V)           # bytes per record
TOKENS_AT = 20
RECORDS_AT = TOKENS_AT + 4 * K * C


def _record_at(k: int, r: int) -> int:
    return RECORDS_AT + (k * R + r) * REC


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid file written from random logits, and the exact log-softmax of its rows."""
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("valid") / "base.kld"
    stream = rng.integers(0, V, K * C).astype(np.int32)
    rows = []
    with LogitsFileWriter(path, C, V, stream) as w:
        for _ in range(K):
            z = (rng.standard_normal((C, V)) * 4.0).astype(np.float32)
            z[:, 3] -= 80.0  # below the clamp: decoded at the floor
            w.write_chunk(z)
            rows.append(z[C // 2:C - 1])
    assert path.stat().st_size == file_size(C, V, K)
    return path.read_bytes(), rows


def _put(offset: int, fmt: str, *values):
    def edit(data: bytearray) -> bytearray:
        struct.pack_into(fmt, data, offset, *values)
        return data
    return edit


def _scale(k, r, value):
    return _put(_record_at(k, r), "<f", value)


def _mlp(k, r, value):
    return _put(_record_at(k, r) + 4, "<f", value)


def _times_scale(k, r, factor):
    def edit(data):
        (s,) = struct.unpack_from("<f", data, _record_at(k, r))
        struct.pack_into("<f", data, _record_at(k, r), s * factor)
        return data
    return edit


def _codes(k, r, value):
    def edit(data):
        at = _record_at(k, r) + 8
        data[at:at + 2 * V] = struct.pack(f"<{V}H", *([value] * V))
        return data
    return edit


def _fill_record(k, r, byte):
    def edit(data):
        at = _record_at(k, r)
        data[at:at + REC] = bytes([byte]) * REC
        return data
    return edit


def _cut(n):
    return lambda data: data[:n] if n >= 0 else data[:n]


def _bytes(b):
    return lambda data: bytearray(b)


# (case id, edit of the valid file's bytes, fragment of the message)
CORRUPTIONS = [
    ("empty", _bytes(b""), "not a llama-perplexity base-logits file"),
    ("magic-prefix", _bytes(b"_log"), "truncated"),
    ("wrong-magic", _put(0, "8s", b"GGUF\x03\0\0\0"), "not a llama-perplexity base-logits file"),
    ("v2-magic", _put(8, "2s", b"v2"), "_logits_v2"),
    ("header-cut", _cut(15), "truncated header"),
    ("n_ctx-0", _put(8, "<I", 0), "invalid header values"),
    ("n_ctx-2", _put(8, "<I", 2), "invalid header values"),
    ("n_ctx-max-u32", _put(8, "<I", 2**32 - 1), "invalid header values"),
    ("n_ctx-huge", _put(8, "<I", 2**31 - 1), "require"),
    ("n_ctx-plus-1", _put(8, "<I", C + 1), "require"),
    ("n_vocab-0", _put(12, "<i", 0), "invalid header values"),
    ("n_vocab-negative", _put(12, "<i", -V), "invalid header values"),
    ("n_vocab-huge", _put(12, "<i", 2**31 - 1), "require"),
    ("n_chunks-0", _put(16, "<i", 0), "invalid header values"),
    ("n_chunks-negative", _put(16, "<i", -1), "invalid header values"),
    ("n_chunks-huge", _put(16, "<i", 2**31 - 1), "require"),
    ("all-huge", _put(8, "<Iii", 2**31 - 1, 2**31 - 1, 2**31 - 1), "require"),
    ("cut-1-byte", _cut(-1), "truncated"),
    ("cut-in-tokens", _cut(TOKENS_AT + 10), "truncated"),
    ("trailing-byte", lambda d: d + b"\0", "unexpected trailing bytes"),
    ("token-negative", _put(TOKENS_AT + 4 * 7, "<i", -1), "token 7 has id -1"),
    ("token-equals-vocab", _put(TOKENS_AT + 4 * 20, "<i", V), f"token 20 has id {V}"),
    ("token-huge", _put(TOKENS_AT + 4 * (K * C - 1), "<i", 2**31 - 1), "outside [0, 64)"),
    ("scale-nan", _scale(0, 0, math.nan), "chunk 0, row 0 (logits row 8 of the chunk): scale nan"),
    ("scale-inf", _scale(1, 2, math.inf), "chunk 1, row 2 (logits row 10 of the chunk): scale inf"),
    ("scale-neg-inf", _scale(2, 6, -math.inf), "chunk 2, row 6"),
    ("scale-negative", _scale(2, 0, -1e-4), "chunk 2, row 0"),
    ("scale-huge", _scale(1, 1, 3e38), "chunk 1, row 1"),
    ("scale-x1000", _times_scale(0, 5, 1000.0), "chunk 0, row 5"),
    ("scale-x0.25", _times_scale(2, 3, 0.25), "below −ln(n_vocab)"),
    ("mlp-nan", _mlp(0, 3, math.nan), "chunk 0, row 3"),
    ("mlp-inf", _mlp(1, 0, math.inf), "min_log_prob inf"),
    ("mlp-neg-inf", _mlp(1, 6, -math.inf), "min_log_prob -inf"),
    ("mlp-positive", _mlp(2, 2, 1.0), "min_log_prob 1 is not a finite number ≤ 0"),
    ("mlp-zero", _mlp(0, 1, 0.0), "> 0 at token"),       # every code above 0 decodes above 0
    ("mlp-very-low", _mlp(1, 4, -1e6), "below −ln(n_vocab)"),
    ("codes-zeroed", _codes(2, 5, 0), "chunk 2, row 5"),  # the whole row at the −24 floor
    ("record-0xff", _fill_record(0, 6, 0xFF), "chunk 0, row 6"),
    ("record-0x7f", _fill_record(1, 3, 0x7F), "chunk 1, row 3"),
    ("kld-1e27", lambda d: _mlp(2, 4, -1e-3)(_scale(2, 4, 1e-3)(d)), "> 0 at token"),
]


@contextmanager
def _deadline(seconds: float):
    """Fail instead of hanging (a FIFO open that blocked would never return)."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _read_all(path):
    with LogitsFile(path) as f:
        return [ch.logprobs for ch in f]


def _refused(path, fragment: str) -> str:
    """Open and read every chunk: LogitsFileError naming the file, < 1 s, < 200 MB."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with _deadline(5.0), pytest.raises(LogitsFileError) as info:
            _read_all(path)
        elapsed = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert isinstance(info.value, EvalkitError) and isinstance(info.value, ValueError)
    assert str(path) in msg and "\n" not in msg
    assert fragment in msg, (fragment, msg)
    assert elapsed < 1.0, elapsed
    assert peak < 200 << 20, peak
    return msg


@pytest.mark.parametrize("case, edit, fragment", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_file_is_refused(tmp_path, valid, case, edit, fragment):
    data, _ = valid
    p = tmp_path / f"{case}.kld"
    p.write_bytes(bytes(edit(bytearray(data))))
    _refused(p, fragment)


def test_case_count():
    assert len(CORRUPTIONS) >= 20


def test_non_regular_files_are_refused(tmp_path):
    d = tmp_path / "dir.kld"
    d.mkdir()
    _refused(d, "is a directory")
    fifo = tmp_path / "fifo.kld"
    os.mkfifo(fifo)
    _refused(fifo, "is a FIFO")
    link = tmp_path / "link.kld"
    link.symlink_to(fifo)
    _refused(link, "is a FIFO")
    if os.path.exists("/dev/zero"):
        _refused("/dev/zero", "is a device")


def test_valid_file_reads_close_to_its_logits(valid, tmp_path):
    """The checks refuse nothing a writer produces: the valid file decodes within a step."""
    data, rows = valid
    p = tmp_path / "ok.kld"
    p.write_bytes(data)
    with _deadline(5.0):
        decoded = _read_all(p)
    for b, z in zip(decoded, rows):
        z = z.astype(np.float64)
        lsm = z - z.max(1, keepdims=True)
        lsm -= np.log(np.exp(lsm).sum(1, keepdims=True))
        above = lsm > b.min(1, keepdims=True)  # the floor holds everything below the clamp
        assert np.abs(b - lsm)[above].max() < 24 / 65535
