"""Repacked ("_R4"/"_R8") tensors of published files (../shared/golden/repacked/).

Each golden file was written by the reference's llama-quantize --pure to a repacked type;
its manifest holds the sha256 of every tensor as the reference dequantizes it to float32.
evalkit reads a repacked tensor by de-interleaving it to the plain type, so these checks
cover the layouts (every bit of every block) and the plain dequantizers together; the
forward of a repacked file must equal that of a plain GGUF written from the de-interleaved
bytes, and bad input must end in a named error.
"""
from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from conftest import GOLDEN
from evalkit.formats import get_format
from evalkit.formats.repack import (REPACKED, LossyRepackError, RepackError, _runs, repacked_to_float,
                                    unpack_rows)
from evalkit.formats.repack_layouts import Labels, LAYOUTS
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.model.model import Model

REPACK_DIR = GOLDEN / "repacked"
MANIFEST = json.loads((REPACK_DIR / "manifest.json").read_text())


def test_every_golden_type_has_a_codec():
    # these three have no golden file: tests/test_repacked_more.py checks them against an
    # independent decoder of the reference's repacked kernels instead
    no_golden = {"Q2_K_R4", "Q3_K_R4", "BF16_R16"}
    assert not no_golden & set(MANIFEST)
    assert set(MANIFEST) | no_golden == set(REPACKED) == set(LAYOUTS)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_tensor_dequantizes_to_the_reference_sha(name):
    entry = MANIFEST[name]
    with GGUFFile(REPACK_DIR / entry["file"]) as f:
        assert set(f.tensors) == set(entry["tensors"])
        for tname, want in entry["tensors"].items():
            t = f.tensor(tname)
            assert (t.stored_type_id or t.type_id) == want["type_id"], tname
            if t.stored_type_id is not None:
                assert t.stored_type_name == name and t.type_name == REPACKED[name].plain_name
            x = f.dequantize(tname, threads=1)
            # the manifest's "shape" is ggml's order (ne0 first), though its README says numpy's
            assert list(t.shape) == want["shape"] and x.shape == tuple(reversed(t.shape)), tname
            assert hashlib.sha256(x.astype("<f4").tobytes()).hexdigest() == want["sha256_f32"], f"{name} {tname}"


def _write_plain_copy(src: GGUFFile, path) -> None:
    """The same model with every repacked tensor stored de-interleaved, in its plain type."""
    specs = [TensorSpec(t.name, t.shape, t.type_id) for t in src.tensors.values()]
    write_gguf(path, src.metadata, specs, lambda s: src.tensor_bytes(s.name), metadata_types=src.metadata_types)


def _tiny_model(path) -> Model:
    """The golden tiny model; its llama.vocab_size key (49152) disagrees with its 256-token
    embedding, so the key is set to the embedding's size before the config is read."""
    f = GGUFFile(path)
    f.metadata["llama.vocab_size"] = f.tensor("token_embd.weight").shape[1]
    return Model.from_gguf(f)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_forward_equals_the_deinterleaved_plain_file(name, tmp_path):
    path = REPACK_DIR / MANIFEST[name]["file"]
    plain = tmp_path / "plain.gguf"
    with GGUFFile(path) as f:
        _write_plain_copy(f, plain)
    with GGUFFile(plain) as g:
        assert all(t.stored_type_id is None for t in g.tensors.values())
    tokens = torch.tensor([[0, 17, 42, 99, 200, 3, 255, 128]])
    with torch.inference_mode():
        a = _tiny_model(path).forward(tokens)
        b = _tiny_model(plain).forward(tokens)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(REPACKED))
def test_unpack_rows_inverts_the_layout_bit_by_bit(name):
    """Plain rows → repacked by moving single bits as the layout says → unpack_rows → the same rows
    (a naive bit-level forward against the compiled byte gathers, headers and row grouping)."""
    codec = REPACKED[name]
    lab = Labels(codec.rows, codec.chunk_bytes)
    LAYOUTS[name](lab)
    n, nrows = 2 * codec.chunk, 2 * codec.rows
    plain_rb = codec.plain.row_bytes(n)
    rng = np.random.default_rng(codec.type_id)
    rows = rng.integers(0, 256, (nrows, plain_rb), dtype=np.uint8)
    if name == "Q8_KV_R8":      # the header's sum is derived, not stored: make it the true sum
        rows[:, 4:8] = rows[:, 8:].view(np.int8).sum(1, dtype=np.int64).astype("<i4").view(np.uint8).reshape(-1, 4)
    ph, sh, cb = codec.plain.header_bytes, codec.header_bytes, codec.chunk_bytes
    stored = []
    for g in range(0, nrows, codec.rows):
        grp = rows[g:g + codec.rows]
        stored.append(grp[:, :sh].reshape(-1))
        for c in range(n // codec.chunk):
            bits = np.unpackbits(grp[:, ph + c * cb:ph + (c + 1) * cb], axis=1, bitorder="little").reshape(-1)
            stored.append(np.packbits(bits[lab.out], bitorder="little"))
    flat = np.concatenate(stored)
    assert flat.size == nrows * codec.stored_row_bytes(n)
    np.testing.assert_array_equal(unpack_rows(flat, codec, n, nrows), rows)


def test_runs_are_whole_bytes_where_the_layout_moves_bytes():
    """Q8_0_R8 moves whole bytes (one 8-bit run per plain byte); Q5_K_R4 scatters fifth bits."""
    q8 = _runs("Q8_0_R8")
    assert len(q8) == 8 * 34 and (q8[:, 2] == 0xFF).all() and (q8[:, 1] == 0).all()
    q5 = _runs("Q5_K_R4")
    assert 4 * 176 < len(q5) <= 8 * 4 * 176 and (q5[:, 2] == 1).any()


def test_q5_0_r4_to_float_is_the_references_expression():
    """dequantize_row_q5_0_r4 computes d*q + (-16*d): +0 where Q5_0's (q-16)*d gives -0 (d < 0)."""
    q = np.zeros((1, 22), np.uint8)
    q[0, 0:2] = np.array([-0.5], "<f2").view(np.uint8)
    q[0, 2:6] = 0xFF                    # every fifth bit set: codes 16 + nibble
    x = repacked_to_float(q, REPACKED["Q5_0_R4"], 32)
    assert x[0, 0] == 0 and not np.signbit(x[0, 0])
    from evalkit.codec import dequantize
    y = dequantize(q, "Q5_0", 32)
    assert y[0, 0] == 0 and np.signbit(y[0, 0])
    np.testing.assert_array_equal(x[0, 1:], y[0, 1:])


# --------------------------------------------------------------------------- bad input

def _patch_first_type(src, dst, old_id: int, new_id: int, name: str = "blk.0.attn_q.weight") -> None:
    """Copy ``src`` with tensor ``name``'s ggml type id changed in its directory entry."""
    data = bytearray(src.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, pos)[0]
    tpos = pos + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, tpos)[0] == old_id
    struct.pack_into("<I", data, tpos, new_id)
    dst.write_bytes(bytes(data))


def test_lossy_repack_is_a_named_error(tmp_path):
    bad = tmp_path / "iq1_s_r4.gguf"
    _patch_first_type(REPACK_DIR / "r4-IQ4_NL_R4.gguf", bad, 220, 219)
    with pytest.raises(LossyRepackError, match=r"blk.0.attn_q.weight.*IQ1_S_R4.*lossy"):
        GGUFFile(bad)


def test_repack_of_a_type_evalkit_lacks_is_a_named_error(tmp_path):
    bad = tmp_path / "iq2_xxs_r4.gguf"
    _patch_first_type(REPACK_DIR / "r4-IQ4_NL_R4.gguf", bad, 220, 216)
    with pytest.raises(RepackError, match="IQ2_XXS_R4.*IQ2_XXS"):
        GGUFFile(bad)


def test_row_count_not_a_multiple_of_the_interleave(tmp_path):
    src = tmp_path / "six_rows.gguf"
    fmt = get_format("IQ4_NL")
    write_gguf(src, {"general.architecture": "llama"}, [TensorSpec("w", (32, 6), fmt.type_id)],
               lambda s: np.zeros(s.nbytes, np.uint8))
    bad = tmp_path / "six_rows_r4.gguf"
    _patch_first_type(src, bad, 20, 220, name="w")
    with pytest.raises(RepackError, match="interleaves 4 rows.*6 rows"):
        GGUFFile(bad)


def test_source_rows_are_the_references_to_float(tmp_path):
    """GGUFSource (what the quantizer reads when requantizing) gives the reference's values of a
    repacked tensor, and raw() its plain rows."""
    from evalkit.sources import open_source
    entry = MANIFEST["Q5_0_R4"]
    src = open_source(REPACK_DIR / entry["file"])
    try:
        name = "blk.1.ffn_down.weight"
        x = src.rows_f32(name, threads=1)
        assert hashlib.sha256(x.astype("<f4").tobytes()).hexdigest() == entry["tensors"][name]["sha256_f32"]
        info = next(t for t in src.tensors if t.name == name)
        assert info.type_name == "Q5_0" and src.raw(name).shape == (info.nrows, get_format("Q5_0").row_bytes(768))
    finally:
        src.close()
