"""Repacked ("_R4" / "_R8" / "_R16") tensors of published ik_llama.cpp files → their plain type's bytes.

One codec per repacked type, in one table (:data:`REPACKED`): the plain type, how many rows
one repacked block interleaves, how many elements of each row it holds, and the bytes of
the row header. The bit layout of each is in :mod:`evalkit.formats.repack_layouts`; it is
checked to be a permutation (lossless) and inverted once per type into "runs" (a bit
field of one repacked byte that lands in one plain byte), which kernels/repack.c applies to
every block. :func:`unpack_rows` turns a tensor's stored bytes into plain rows in a new
buffer, so every downstream path (QLinear, statistics, requantizing) sees the plain
type. Row headers: the KS types' R row scales lead each group of R rows; Q8_KV_R8 keeps only
the float scale of Q8_KV's [scale, sum of quants] header, so the sum is recomputed.

Repacks that are not a pure reshuffle of the plain blocks (IQ1_S_R4, IQ1_M_R4 change the
block size and scales) and those of plain types evalkit does not have raise
:class:`RepackError` naming the tensor and the type.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from evalkit.formats import FORMATS, QuantFormat
from evalkit.formats.repack_layouts import LAYOUTS, Labels
from evalkit.gguf.reader import GGUFError

__all__ = ["RepackCodec", "REPACKED", "REPACKED_BY_ID", "UNSUPPORTED_REPACKS", "RepackError",
           "LossyRepackError", "codec_for", "unpack_rows", "repacked_to_float"]


class RepackError(GGUFError):
    """A repacked tensor evalkit cannot turn into its plain type (or whose shape does not fit);
    a GGUFError, since repacked tensors only ever come from GGUF files."""


class LossyRepackError(RepackError):
    """A repacked type that is not a reshuffle of a plain type's blocks (IQ1_S_R4, IQ1_M_R4)."""


@dataclass(frozen=True)
class RepackCodec:
    """One repacked type: ``rows`` rows interleaved per block of ``chunk`` elements of each row."""

    name: str
    type_id: int
    plain_name: str
    rows: int
    chunk: int                 # elements of each row in one repacked block
    header_bytes: int          # stored bytes of row header per row (leading each group of rows)
    zero_point: int = 0        # Q5_0_R4 / Q6_0_R4: the reference's to_float is d*q + (-zero_point*d)

    @property
    def plain(self) -> QuantFormat:
        """The plain type's registry entry."""
        return FORMATS[self.plain_name]

    @property
    def chunk_bytes(self) -> int:
        """Plain bytes of one row's chunk (a whole number of plain blocks, or Q8_KV's 16 bytes)."""
        return self.chunk // self.plain.block_size * self.plain.type_size if self.chunk >= self.plain.block_size \
            else self.chunk * self.plain.type_size // self.plain.block_size

    def stored_row_bytes(self, n_per_row: int) -> int:
        """Bytes one row takes in the file (the plain row's, but for Q8_KV_R8's shorter header)."""
        return self.plain.row_bytes(n_per_row) - self.plain.header_bytes + self.header_bytes

    def check_shape(self, n_per_row: int, nrows: int, where: str) -> None:
        """RepackError unless the rows fit the interleave and the row length fits the chunk."""
        if nrows % self.rows:
            raise RepackError(f"{where}: {self.name} interleaves {self.rows} rows, but the tensor has {nrows} rows "
                              f"(not a multiple of {self.rows}): corrupt")
        if n_per_row % self.chunk:
            raise RepackError(f"{where}: {self.name} row length {n_per_row} is not a multiple of {self.chunk}")


# name, ggml type id, plain type, rows interleaved, elements of a row per repacked block, stored row header
REPACKED: dict[str, RepackCodec] = {c.name: c for c in (
    RepackCodec("Q4_0_R8", 202, "Q4_0", 8, 32, 0),
    RepackCodec("Q5_0_R4", 206, "Q5_0", 4, 32, 0, zero_point=16),
    RepackCodec("Q8_0_R8", 208, "Q8_0", 8, 32, 0),
    RepackCodec("Q2_K_R4", 210, "Q2_K", 4, 256, 0),
    RepackCodec("Q3_K_R4", 211, "Q3_K", 4, 256, 0),
    RepackCodec("Q4_K_R4", 212, "Q4_K", 4, 256, 0),
    RepackCodec("Q5_K_R4", 213, "Q5_K", 4, 256, 0),
    RepackCodec("Q6_K_R4", 214, "Q6_K", 4, 256, 0),
    RepackCodec("IQ4_NL_R4", 220, "IQ4_NL", 4, 32, 0),
    RepackCodec("IQ4_XS_R8", 223, "IQ4_XS", 8, 256, 0),
    # repack_bf16: pairs of bf16 of 16 rows side by side; ggml's type traits give BF16_R16 no
    # to_float, so the stored bf16 values themselves are the tensor's values
    RepackCodec("BF16_R16", 230, "BF16", 16, 2, 0),
    RepackCodec("Q6_0_R4", 233, "Q6_0", 4, 32, 0, zero_point=32),
    RepackCodec("IQ2_K_R4", 337, "IQ2_K", 4, 256, 0),
    RepackCodec("IQ3_K_R4", 338, "IQ3_K", 4, 256, 0),
    RepackCodec("IQ4_K_R4", 339, "IQ4_K", 4, 256, 0),
    RepackCodec("IQ5_K_R4", 340, "IQ5_K", 4, 256, 0),
    RepackCodec("IQ4_KS_R4", 344, "IQ4_KS", 4, 256, 4),
    RepackCodec("IQ5_KS_R4", 352, "IQ5_KS", 4, 256, 4),
    RepackCodec("Q8_KV_R8", 398, "Q8_KV", 8, 16, 4),
)}
REPACKED_BY_ID: dict[int, RepackCodec] = {c.type_id: c for c in REPACKED.values()}

# the other repacked ids of ik_llama.cpp (ggml.h): id -> (name, why evalkit cannot read it)
_NO_PLAIN = "its plain type {} is not one evalkit reads"
UNSUPPORTED_REPACKS: dict[int, tuple[str, str]] = {
    219: ("IQ1_S_R4", "lossy"), 229: ("IQ1_M_R4", "lossy"),
    216: ("IQ2_XXS_R4", _NO_PLAIN.format("IQ2_XXS")), 217: ("IQ2_XS_R4", _NO_PLAIN.format("IQ2_XS")),
    218: ("IQ3_XXS_R4", _NO_PLAIN.format("IQ3_XXS")), 221: ("IQ3_S_R4", _NO_PLAIN.format("IQ3_S")),
    222: ("IQ2_S_R4", _NO_PLAIN.format("IQ2_S")),
    335: ("IQ2_BN_R4", _NO_PLAIN.format("IQ2_BN")), 353: ("MXFP4_R8", _NO_PLAIN.format("MXFP4")),
    397: ("Q8_K_R16", _NO_PLAIN.format("Q8_K")), 399: ("Q8_K_R8", _NO_PLAIN.format("Q8_K")),
}


def codec_for(type_id: int, where: str) -> RepackCodec | None:
    """The codec of a repacked type id, None for any other id; RepackError for one evalkit cannot read."""
    codec = REPACKED_BY_ID.get(type_id)
    if codec is not None:
        return codec
    if type_id in UNSUPPORTED_REPACKS:
        name, why = UNSUPPORTED_REPACKS[type_id]
        if why == "lossy":
            raise LossyRepackError(f"{where}: {name} (ggml type {type_id}) is a lossy repack (its blocks are not a "
                                   "reshuffle of a plain type's), so evalkit cannot read it exactly; requantize the "
                                   "source model to a plain type")
        raise RepackError(f"{where}: repacked type {name} (ggml type {type_id}) is not supported: {why}")
    return None


@lru_cache(maxsize=None)
def _runs(name: str) -> np.ndarray:
    """Build, check and invert ``name``'s layout once, as int32 runs (src byte, src shift, mask,
    dst byte, dst shift): bit fields that move together from one repacked byte into one plain byte."""
    c = REPACKED[name]
    lab = Labels(c.rows, c.chunk_bytes)
    LAYOUTS[name](lab)
    n = lab.out.size
    if not np.array_equal(np.sort(lab.out), np.arange(n)):
        raise AssertionError(f"{name}: the repack layout is not a permutation of the plain bits")
    inv = np.empty(n, dtype=np.int64)
    inv[lab.out] = np.arange(n)                     # plain bit p sits at repacked bit inv[p]
    runs = []
    for byte, bits in enumerate(inv.reshape(-1, 8)):
        t = 0
        while t < 8:                                # longest run of consecutive bits of one source byte
            w = 1
            while t + w < 8 and bits[t + w] == bits[t] + w and (bits[t] + w) % 8:
                w += 1
            runs.append((int(bits[t]) // 8, int(bits[t]) % 8, (1 << w) - 1, byte, t))
            t += w
    return np.ascontiguousarray(runs, dtype=np.int32)


def unpack_rows(stored: np.ndarray, codec: RepackCodec, n_per_row: int, nrows: int) -> np.ndarray:
    """A repacked tensor's stored bytes (flat uint8) → plain rows (nrows, plain row bytes), a new array."""
    from evalkit import _kernels
    codec.check_shape(n_per_row, nrows, codec.name)
    R, nch = codec.rows, n_per_row // codec.chunk
    sh, ph = codec.header_bytes, codec.plain.header_bytes
    src_rb = codec.stored_row_bytes(n_per_row)
    if stored.dtype != np.uint8 or stored.size != nrows * src_rb:
        raise RepackError(f"{codec.name}: {stored.size} stored bytes for {nrows} rows of {n_per_row}, "
                          f"expected {nrows * src_rb}")
    stored = np.ascontiguousarray(stored)
    rows = np.empty((nrows, ph + nch * codec.chunk_bytes), dtype=np.uint8)
    if sh:          # the group's R row headers lead it; each plain row starts with its own
        rows[:, :sh] = stored.reshape(nrows // R, R * src_rb)[:, :R * sh].reshape(nrows, sh)
    runs = _runs(codec.name)
    rc = _kernels.get_lib().ek_unrepack(stored.ctypes.data, nrows // R, nch, R * src_rb, R * sh, rows.ctypes.data,
                                        R, rows.shape[1], ph, codec.chunk_bytes, runs.ctypes.data, len(runs))
    _kernels.check_status(rc, f"de-interleave {codec.name}")
    if ph > sh:
        _rebuild_q8_kv_sums(rows, n_per_row)
    return rows


def _rebuild_q8_kv_sums(rows: np.ndarray, n_per_row: int) -> None:
    """Q8_KV's header word 2: the int32 sum of the row's quants (iqk_quantize_row_q8_KV), which
    Q8_KV_R8 drops; recomputed so the plain rows are what quantizing to Q8_KV writes."""
    sums = rows[:, 8:8 + n_per_row].view(np.int8).sum(axis=1, dtype=np.int64).astype("<i4")
    rows[:, 4:8] = sums.view(np.uint8).reshape(-1, 4)


def _legacy_codes(rows: np.ndarray, plain: str) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 scales as float32 (R, nb, 1), unsigned codes (R, nb, 32)) of Q5_0 / Q6_0 rows."""
    bb = 22 if plain == "Q5_0" else 26
    b = rows.reshape(rows.shape[0], -1, bb)
    d = b[..., 0:2].copy().view("<f2").astype(np.float32)
    qs = b[..., bb - 16:].astype(np.int32)
    if plain == "Q5_0":
        qh = b[..., 2:6].copy().view("<u4").astype(np.int64)                        # (R, nb, 1)
        high = ((qh >> np.arange(32)) & 1) << 4
    else:
        j = np.arange(16)
        h = b[..., 2 + j % 8].astype(np.int32) >> (4 * (j // 8))
        high = np.concatenate(((h & 3) << 4, ((h >> 2) & 3) << 4), axis=-1)
    return d, np.concatenate((qs & 0xF, qs >> 4), axis=-1) | high


def repacked_to_float(rows: np.ndarray, codec: RepackCodec, n_per_row: int) -> np.ndarray | None:
    """The reference's to_float of a repacked tensor, from its plain rows, where it differs from
    the plain type's: Q5_0_R4 / Q6_0_R4 compute d*q + (-zero_point*d) (dequantize_row_q5_0_r4),
    which gives +0 where the plain (q - zero_point)*d gives -0 (negative d). None for the others,
    whose to_float is the plain type's."""
    if not codec.zero_point:
        return None
    d, q = _legacy_codes(rows, codec.plain_name)
    m = np.float32(-codec.zero_point) * d
    with np.errstate(invalid="ignore", over="ignore"):
        x = d * q.astype(np.float32) + m
    return x.reshape(rows.shape[0], n_per_row)
