"""Q2_K_R4, Q3_K_R4 and BF16_R16: the repacks with no golden file, checked independently.

Three computations written here from the reference (ik_llama.cpp 8337e4cd3), not from
evalkit's bit layouts:

* a decoder of repacked blocks that reads them the way the reference's CPU kernels do
  (iqk_gemm_kquants.cpp mul_mat_q2_k_r4_q8_k / mul_mat_q3_k_r4_q8_k, the NEON versions whose
  lanes are easiest to follow, and iqk_gemm_floats.cpp mul_mat_bf16_r16_bf16): which bytes give
  row k's scale and quant of element e. Its values must equal, bit for bit, evalkit's path
  (unpack_rows, then the plain dequantizer);
* the forward repack (iqk_quantize.cpp repack_q2_k / repack_q3_k / repack_bf16) on plain rows,
  which unpack_rows must invert byte for byte;
* a tiny GGUF holding repacked tensors, whose forward must equal its plain twin's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from conftest import GOLDEN
from evalkit.codec import dequantize, quantize
from evalkit.formats import FORMATS_BY_ID, get_format
from evalkit.formats.repack import REPACKED, RepackError, unpack_rows
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.model.model import Model

TYPES = ("Q2_K_R4", "Q3_K_R4", "BF16_R16")


# --------------------------------------------------------------------------- the kernels' view

def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields (..., 2n bytes) → float32 (..., n)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _lanes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For row k and element e of a 256-block, as the NEON kernels walk it (is: 128-halves, ib:
    32-groups, h: 16-halves, t: the 2-bit shift, i: lane within row k's 4 bytes): the qs byte,
    the shift t, and the scale index 4*(e/16) + k (lane k of the 16-element scale vector)."""
    k = np.arange(4)[:, None]
    e = np.arange(256)[None, :]
    qbyte = 32 * (e // 32) + 16 * ((e % 32) // 16) + 4 * k + e % 4
    t = (e % 16) // 4
    return qbyte, np.broadcast_to(t, qbyte.shape), 4 * (e // 16) + k


def decode_q2_k_r4(blocks: np.ndarray) -> np.ndarray:
    """(G, nb, 336) Q2_K_R4 blocks → (G, 4, nb*256) floats: d[k], dmin[k+4]; scales[4s+k] holds
    row k's 16-element sub-block s (low nibble scale, high nibble min); qs byte 32*ib+16h+4k+i
    holds elements 32ib+16h+4t+i at shift 2t. Value as dequantize_row_q2_k_r4: d*sc*q - m*mn."""
    G, nb = blocks.shape[:2]
    d, m = _f16(blocks[..., 0:8]), _f16(blocks[..., 8:16])                   # (G, nb, 4)
    qbyte, t, sidx = _lanes()
    sc = blocks[..., 16:80][..., sidx]                                        # (G, nb, 4, 256)
    q = (blocks[..., 80:336][..., qbyte] >> (2 * t)) & 3
    dl = d[..., None] * (sc & 15).astype(np.float32)
    ml = m[..., None] * (sc >> 4).astype(np.float32)
    y = dl * q.astype(np.float32) - ml
    return y.transpose(0, 2, 1, 3).reshape(G, 4, nb * 256)


def decode_q3_k_r4(blocks: np.ndarray) -> np.ndarray:
    """(G, nb, 440) Q3_K_R4 blocks → (G, 4, nb*256): scale index I = 4s+k is the low nibble I/32 of
    scales_l[I%32] with bits 2(I/16) of scales_h[I%16] on top, minus 32; quant of element
    32ib+16h+4t+i of row k: bits 2t of qs[32ib+16h+4k+i] and bit 4h+t of qh[16ib+4k+i], minus 4."""
    G, nb = blocks.shape[:2]
    d = _f16(blocks[..., 0:8])
    sh, sl = blocks[..., 8:24].astype(np.int32), blocks[..., 24:56].astype(np.int32)
    qh, qs = blocks[..., 56:184], blocks[..., 184:440]
    qbyte, t, sidx = _lanes()
    sc = ((sl[..., sidx % 32] >> (4 * (sidx // 32))) & 15) | (((sh[..., sidx % 16] >> (2 * (sidx // 16))) & 3) << 4)
    e = np.arange(256)
    hbyte = 16 * (e // 32)[None, :] + 4 * np.arange(4)[:, None] + (e % 4)[None, :]
    hbit = 4 * ((e % 32) // 16) + t
    q = ((qs[..., qbyte] >> (2 * t)) & 3) | (((qh[..., hbyte] >> hbit) & 1) << 2)
    dl = d[..., None] * (sc - 32).astype(np.float32)
    y = dl * (q.astype(np.int32) - 4).astype(np.float32)
    return y.transpose(0, 2, 1, 3).reshape(G, 4, nb * 256)


def decode_bf16_r16(group: np.ndarray, n: int) -> np.ndarray:
    """(G, 16*n*2) bytes → (G, 16, n): _mm512_dpbf16_ps lane k of load c takes bf16 32c+2k, 32c+2k+1,
    which the broadcast y pairs with elements 2c, 2c+1 of row k."""
    v = np.ascontiguousarray(group).view("<u2").reshape(group.shape[0], n // 2, 16, 2)
    bits = v.transpose(0, 2, 1, 3).reshape(group.shape[0], 16, n).astype(np.uint32) << 16
    return bits.view(np.float32)


def decode(name: str, stored: np.ndarray, n: int, nrows: int) -> np.ndarray:
    """A repacked tensor's stored bytes → (nrows, n) float32 by the kernels' view."""
    if name == "BF16_R16":
        return decode_bf16_r16(stored.reshape(nrows // 16, -1), n).reshape(nrows, n)
    bb = 336 if name == "Q2_K_R4" else 440
    blocks = stored.reshape(nrows // 4, n // 256, bb)
    fn = decode_q2_k_r4 if name == "Q2_K_R4" else decode_q3_k_r4
    return fn(blocks).reshape(nrows, n)


# --------------------------------------------------------------------------- forward repacks

def _unpack_q3k_scales(sc12: np.ndarray) -> np.ndarray:
    """convert_q3_k's Ld: the 12 scale bytes as 3 little-endian words, kmask shuffles → 16 6-bit scales."""
    aux = np.ascontiguousarray(sc12).view("<u4").astype(np.uint32)          # (..., 3)
    k1, k2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
    a0, a1, tmp = aux[..., 0], aux[..., 1], aux[..., 2]
    out = np.stack([(a0 & k2) | (((tmp >> 0) & k1) << 4), (a1 & k2) | (((tmp >> 2) & k1) << 4),
                    ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4), ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4)],
                   axis=-1).astype("<u4")
    return out.view(np.uint8).reshape(*sc12.shape[:-1], 16)


def _two_bit_values(qs64: np.ndarray) -> np.ndarray:
    """convert_q2_k's L (the low 2 bits of Q3_K's too): element 128n + 32t + j is bits 2t of qs[32n + j]."""
    q = qs64.reshape(*qs64.shape[:-1], 2, 1, 32)
    return ((q >> (2 * np.arange(4)[:, None])) & 3).reshape(*qs64.shape[:-1], 256)


def _pack_qs(L: np.ndarray) -> np.ndarray:
    """(..., 4 rows, 256) values → qs[256]: byte 32ib + 16h + 4k + i = sum_t (L[32ib+16h+4t+i] & 3) << 2t."""
    v = (L & 3).reshape(*L.shape[:-2], 4, 8, 2, 4, 4).astype(np.uint8)          # k, ib, h, t, i
    packed = (v << (2 * np.arange(4))[:, None]).sum(axis=-2, dtype=np.uint8)    # k, ib, h, i
    return np.moveaxis(packed, -4, -2).reshape(*L.shape[:-2], 256)              # ib, h, k, i


def repack_q2_k(rows: np.ndarray) -> np.ndarray:
    """repack_q2_k: Q2_K rows (nrows, nb*84) → Q2_K_R4 bytes, a group of 4 rows at a time."""
    nrows, nb = rows.shape[0], rows.shape[1] // 84
    x = rows.reshape(nrows // 4, 4, nb, 84).transpose(0, 2, 1, 3)              # G, nb, k, 84
    y = np.zeros((nrows // 4, nb, 336), np.uint8)
    y[..., 0:8] = x[..., 80:82].reshape(*x.shape[:2], 8)
    y[..., 8:16] = x[..., 82:84].reshape(*x.shape[:2], 8)
    y[..., 16:80] = x[..., 0:16].transpose(0, 1, 3, 2).reshape(*x.shape[:2], 64)   # scales[4ib + k]
    y[..., 80:336] = _pack_qs(_two_bit_values(x[..., 16:80]))
    return y.reshape(-1)


def repack_q3_k(rows: np.ndarray) -> np.ndarray:
    """repack_q3_k: Q3_K rows (nrows, nb*110) → Q3_K_R4 bytes."""
    nrows, nb = rows.shape[0], rows.shape[1] // 110
    x = rows.reshape(nrows // 4, 4, nb, 110).transpose(0, 2, 1, 3)
    G = x.shape[0]
    y = np.zeros((G, nb, 440), np.uint8)
    y[..., 0:8] = x[..., 108:110].reshape(G, nb, 8)
    Ld = _unpack_q3k_scales(x[..., 96:108]).astype(np.uint8)                     # G, nb, k, 16
    hm = x[..., 0:32]
    L = _two_bit_values(x[..., 32:96]) + 4 * ((hm[..., None, :] >> np.arange(8)[:, None]) & 1).reshape(G, nb, 4, 256)
    for k in range(4):
        for ib in range(8):
            for h in range(2):
                s = 8 * ib + k + 4 * h
                y[..., 24 + s % 32] |= ((Ld[..., k, 2 * ib + h] & 0xF) << (4 * (s // 32))).astype(np.uint8)
                y[..., 8 + s % 16] |= ((Ld[..., k, 2 * ib + h] >> 4) << (2 * (s // 16))).astype(np.uint8)
    y[..., 184:440] = _pack_qs(L)
    hi = (L >> 2).reshape(G, nb, 4, 8, 8, 4).astype(np.uint8)                   # k, ib, t, i
    qh = (hi << np.arange(8)[:, None]).sum(axis=-2, dtype=np.uint8)              # k, ib, i
    y[..., 56:184] = qh.transpose(0, 1, 3, 2, 4).reshape(G, nb, 128)            # ib, k, i
    return y.reshape(-1)


def repack_bf16(rows: np.ndarray) -> np.ndarray:
    """repack_bf16: y[32ib + 2k + u] = row k's bf16 2ib + u, 16 rows a group."""
    nrows, n = rows.shape[0], rows.shape[1] // 2
    v = np.ascontiguousarray(rows).view("<u2").reshape(nrows // 16, 16, n // 2, 2)
    return np.ascontiguousarray(v.transpose(0, 2, 1, 3)).view(np.uint8).reshape(-1)


FORWARD = {"Q2_K_R4": repack_q2_k, "Q3_K_R4": repack_q3_k, "BF16_R16": repack_bf16}


# --------------------------------------------------------------------------- checks

def _random_repacked(name: str, n: int, nrows: int, rng) -> np.ndarray:
    """Random stored bytes of a repacked tensor; fp16 scale fields drawn finite (random bits
    could hold NaN/Inf, whose arithmetic would compare payloads, not layouts)."""
    stored = rng.integers(0, 256, nrows * REPACKED[name].stored_row_bytes(n), dtype=np.uint8)
    if name != "BF16_R16":
        blocks = stored.reshape(-1, 336 if name == "Q2_K_R4" else 440)
        nd = 16 if name == "Q2_K_R4" else 8
        d = (rng.standard_normal((blocks.shape[0], nd // 2)) * 2.0 ** rng.integers(-14, 8, (blocks.shape[0], 1)))
        blocks[:, :nd] = d.astype("<f2").view(np.uint8)
    return stored


@pytest.mark.parametrize("name", TYPES)
def test_kernel_view_equals_deinterleave_then_plain_dequantize(name):
    rng = np.random.default_rng(REPACKED[name].type_id)
    n, nrows = 512, 32
    stored = _random_repacked(name, n, nrows, rng)
    codec = REPACKED[name]
    ours = dequantize(unpack_rows(stored, codec, n, nrows), codec.plain_name, n, threads=1)
    ref = decode(name, stored, n, nrows)
    assert np.isfinite(ref).mean() > 0.99
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def _plain_rows(name: str, n: int, nrows: int, rng) -> np.ndarray:
    """Valid plain rows: half quantized from random data (rows of very different scales),
    half random bytes (every bit of every field exercised); bf16 rows are any 16-bit patterns."""
    plain = REPACKED[name].plain_name
    if plain == "BF16":
        return rng.integers(0, 256, (nrows, 2 * n), dtype=np.uint8)
    x = (rng.standard_normal((nrows // 2, n)) * np.exp(rng.uniform(-6, 3, (nrows // 2, 1)))).astype(np.float32)
    q = quantize(x, plain, threads=1)
    return np.concatenate([q, rng.integers(0, 256, q.shape, dtype=np.uint8)])


@pytest.mark.parametrize("name", TYPES)
def test_unpack_rows_inverts_the_references_forward_repack(name):
    rng = np.random.default_rng(1000 + REPACKED[name].type_id)
    n, nrows = 768, 32
    rows = _plain_rows(name, n, nrows, rng)
    stored = FORWARD[name](rows)
    assert stored.size == nrows * REPACKED[name].stored_row_bytes(n)
    np.testing.assert_array_equal(unpack_rows(stored, REPACKED[name], n, nrows), rows)
    # the forward repack and the kernels' view agree with each other too (the quantized half)
    half = nrows // 2           # a multiple of every interleave; the random half may hold NaN scales
    ref = decode(name, stored[:half * REPACKED[name].stored_row_bytes(n)], n, half)
    want = dequantize(rows[:half], REPACKED[name].plain_name, n, threads=1)
    np.testing.assert_array_equal(ref.view(np.uint32), want.view(np.uint32))


# --------------------------------------------------------------------------- a model file

@dataclass(frozen=True)
class _StoredSpec(TensorSpec):
    """A tensor written with a repacked type id; its bytes are its plain type's (no row header)."""

    plain_id: int = 0

    @property
    def nbytes(self) -> int:
        return FORMATS_BY_ID[self.plain_id].tensor_bytes(self.shape)


def _write_pair(name: str, tmp_path):
    """tiny-base with a 256-token vocabulary and every 2-D layer weight in ``name``'s plain type:
    once plain, once repacked by this file's forward repack. Returns (plain path, repacked path)."""
    codec = REPACKED[name]
    src = GGUFFile(GOLDEN / "gguf" / "tiny-base.gguf")
    meta = dict(src.metadata)
    meta["llama.vocab_size"] = 256
    plain_specs, packed_specs, data = [], [], {}
    for t in src.tensors.values():
        if t.name in ("token_embd.weight", "output.weight"):      # the first 256 token rows, as stored
            shape = (t.shape[0], 256)
            data[t.name] = np.ascontiguousarray(src.tensor_bytes(t.name)[:256])
            spec = TensorSpec(t.name, shape, t.type_id)
            plain_specs.append(spec), packed_specs.append(spec)
            continue
        if len(t.shape) == 1:
            data[t.name] = np.ascontiguousarray(src.tensor_bytes(t.name))
            spec = TensorSpec(t.name, t.shape, t.type_id)
            plain_specs.append(spec), packed_specs.append(spec)
            continue
        q = quantize(src.rows_f32(t.name, threads=1), codec.plain_name, threads=1)
        data[t.name] = q
        data[t.name + "#r"] = FORWARD[name](q)
        plain_specs.append(TensorSpec(t.name, t.shape, codec.plain.type_id))
        packed_specs.append(_StoredSpec(t.name, t.shape, codec.type_id, plain_id=codec.plain.type_id))
    src.close()
    plain, packed = tmp_path / "plain.gguf", tmp_path / f"{name}.gguf"
    write_gguf(plain, meta, plain_specs, lambda s: data[s.name], metadata_types=src.metadata_types)
    write_gguf(packed, meta, packed_specs, lambda s: data[s.name + ("#r" if isinstance(s, _StoredSpec) else "")],
               metadata_types=src.metadata_types)
    return plain, packed


@pytest.mark.parametrize("name", TYPES)
def test_forward_of_a_repacked_file_equals_the_plain_file(name, tmp_path):
    plain, packed = _write_pair(name, tmp_path)
    with GGUFFile(packed) as f:
        kinds = {t.stored_type_name for t in f.tensors.values() if t.stored_type_id is not None}
        assert kinds == {name}
        t = f.tensor("blk.1.ffn_down.weight")
        assert t.type_name == REPACKED[name].plain_name
        x = f.rows_f32(t.name, threads=1)
        ref = decode(name, np.asarray(f.stored_bytes(t.name)), t.n_per_row, t.nrows)
        np.testing.assert_array_equal(x.view(np.uint32), ref.view(np.uint32))
    tokens = torch.tensor([[0, 17, 42, 99, 200, 3, 255, 128]])
    with torch.inference_mode():
        a = Model.from_gguf(packed).forward(tokens)
        b = Model.from_gguf(plain).forward(tokens)
    assert a.shape[-1] == 256 and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_bf16_r16_rows_not_a_multiple_of_16_is_a_named_error(tmp_path):
    path = tmp_path / "eight_rows.gguf"
    fmt = get_format("BF16")
    write_gguf(path, {"general.architecture": "llama"},
               [_StoredSpec("w", (32, 8), REPACKED["BF16_R16"].type_id, plain_id=fmt.type_id)],
               lambda s: np.zeros(s.nbytes, np.uint8))
    with pytest.raises(RepackError, match=r"'w'.*BF16_R16 interleaves 16 rows.*8 rows"):
        GGUFFile(path)
