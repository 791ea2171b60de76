"""GGUF reading/writing and imatrix loading, on the golden files and on broken ones."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from conftest import GOLDEN
from evalkit.gguf import GGUFError, GGUFFile, TensorSpec, write_gguf
from evalkit.imatrix import ImatrixError, load_imatrix

GG = GOLDEN / "gguf"
GOLDEN_FILES = ["tiny-base.gguf", "tiny-iqk-mix.gguf", "tiny-kt-mix-imatrix.gguf"]


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_files_load_and_sizes_fill_the_file(name):
    f = GGUFFile(GG / name)
    assert f.architecture == "llama" and len(f.tensors) == 21
    # tensors are laid end to end (with alignment padding) up to the end of the file
    last = max(f.tensors.values(), key=lambda t: t.offset)
    size = (GG / name).stat().st_size
    assert last.offset + last.nbytes <= size < last.offset + last.nbytes + f.alignment
    for t in f.tensors.values():
        assert f.tensor_bytes(t.name).shape == (t.nrows, t.nbytes // t.nrows)


def test_round_trip_rewrites_golden_file_byte_for_byte(tmp_path):
    src = GG / "tiny-iqk-mix.gguf"
    f = GGUFFile(src)
    out = tmp_path / "copy.gguf"
    specs = [TensorSpec(t.name, t.shape, t.type_id) for t in f.tensors.values()]
    write_gguf(out, f.metadata, specs, lambda s: f.tensor_bytes(s.name), f.metadata_types)
    assert out.read_bytes() == src.read_bytes()


def test_tensor_metadata_of_the_iqk_mix():
    f = GGUFFile(GG / "tiny-iqk-mix.gguf")
    assert f.get("general.file_type") == 140
    assert f.tensor("blk.0.ffn_gate.weight").type_name == "IQ2_KS"
    t = f.tensor("token_embd.weight")
    assert t.type_name == "IQ3_KS" and t.shape == (256, 49152)
    assert t.nbytes == 49152 * (2 + 102)  # fp16 row header + one block


def _minimal_gguf(tensors=(("w", (32, 2), 0),), kv=None, alignment=32, offsets=None, data_len=None):
    """Build a small GGUF in memory for malformed-file tests."""
    kv = kv if kv is not None else {"general.architecture": "llama"}
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, v in kv.items():
        kb, vb = k.encode(), v.encode()
        head += struct.pack("<Q", len(kb)) + kb + struct.pack("<IQ", 8, len(vb)) + vb
    off = 0
    sizes = []
    for i, (name, shape, tid) in enumerate(tensors):
        nb = name.encode()
        o = offsets[i] if offsets else off
        head += struct.pack("<Q", len(nb)) + nb + struct.pack("<I", len(shape))
        head += struct.pack(f"<{len(shape)}Q", *shape) + struct.pack("<IQ", tid, o)
        n = 4 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        sizes.append(n)
        off += -(-n // alignment) * alignment
    head += b"\0" * (-len(head) % alignment)
    body = b"\0" * (data_len if data_len is not None else off)
    return head + body


def test_minimal_file_is_readable(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(_minimal_gguf())
    assert GGUFFile(p).tensor("w").shape == (32, 2)


@pytest.mark.parametrize("blob, message", [
    (b"", "empty file"),
    (b"PK\x03\x04 not a gguf at all", "not a GGUF file"),
    (b"GGUF" + struct.pack("<I", 1), "version 1"),
    (_minimal_gguf()[:40], "truncated"),
    (_minimal_gguf(data_len=100), "beyond the end"),
    (_minimal_gguf(offsets=[3]), "not aligned"),
    (_minimal_gguf(tensors=(("w", (32, 2), 99),)), "unknown ggml type id 99"),
    (_minimal_gguf(tensors=(("w", (32, 2), 0), ("w", (32, 2), 0))), "duplicate tensor name"),
])
def test_malformed_files_raise_clear_errors(tmp_path, blob, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(GGUFError, match=message) as ei:
        GGUFFile(p)
    assert str(p) in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")


def test_failed_write_leaves_no_file(tmp_path):
    out = tmp_path / "out.gguf"

    def bad_data(spec):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_gguf(out, {"general.architecture": "llama"}, [TensorSpec("w", (32, 1), 0)], bad_data)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_wrong_byte_count(tmp_path):
    out = tmp_path / "out.gguf"
    with pytest.raises(ValueError, match="expected 128"):
        write_gguf(out, {}, [TensorSpec("w", (32, 1), 0)], lambda s: b"\0" * 10)
    assert not out.exists()


def test_legacy_imatrix_loads_names_and_lengths():
    im = load_imatrix(GG / "tiny-base.imatrix")
    model = GGUFFile(GG / "tiny-base.gguf")
    assert len(im) == 14 and im.chunks == 8
    for name, vec in im.data.items():
        assert name in model.tensors, name
        assert vec.shape == (model.tensor(name).shape[0],) and vec.dtype == np.float32
        assert np.isfinite(vec).all() and (vec >= 0).all()
    # every 2-D weight but the embeddings/output has an entry
    expected = {n for n in model.tensors if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n}
    assert set(im.data) == expected


def test_legacy_imatrix_divides_by_ncall(tmp_path):
    raw = struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 4, 2) + \
        np.array([2.0, 6.0], "<f4").tobytes()
    p = tmp_path / "m.dat"
    p.write_bytes(raw)
    np.testing.assert_array_equal(load_imatrix(p).data["abc"], [0.5, 1.5])


def test_gguf_imatrix_format(tmp_path):
    p = tmp_path / "m.gguf"
    sums = np.array([[2.0, 4.0, 6.0, 8.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    counts = np.array([[2.0, 0.0]], np.float32)
    specs = [TensorSpec("blk.0.ffn_up.weight.in_sum2", (4, 2), 0),
             TensorSpec("blk.0.ffn_up.weight.counts", (1, 2), 0)]
    data = {specs[0].name: sums, specs[1].name: counts}
    write_gguf(p, {"general.type": "imatrix", "imatrix.datasets": ["wiki.txt"], "imatrix.chunk_count": 5},
               specs, lambda s: data[s.name])
    im = load_imatrix(p)
    np.testing.assert_array_equal(im.data["blk.0.ffn_up.weight"], [1, 2, 3, 4, 1, 1, 1, 1])
    assert im.chunks == 5 and im.dataset == "wiki.txt"


@pytest.mark.parametrize("blob, message", [
    (b"", "too short"),
    (struct.pack("<i", 0), "not an imatrix"),
    (struct.pack("<i", 2) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, 4) + b"\0" * 8, "truncated"),
])
def test_bad_imatrix_files(tmp_path, blob, message):
    p = tmp_path / "bad.imatrix"
    p.write_bytes(blob)
    with pytest.raises(ImatrixError, match=message):
        load_imatrix(p)


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_every_tensor_of_the_golden_files_dequantizes(name):
    """Every tensor (all 21, of every type in the three files) decodes to finite float32 of its shape."""
    f = GGUFFile(GG / name)
    for t in f.tensors.values():
        assert t.format.can_dequantize, f"{name}: {t.name} is {t.type_name}, which has no dequantizer"
        w = f.dequantize(t.name)
        assert w.shape == tuple(reversed(t.shape)) and w.dtype == np.float32
        assert np.isfinite(w).all(), f"{name}: {t.name} decodes to non-finite values"
        if t.type_name == "F32":
            np.testing.assert_array_equal(w.reshape(-1), np.frombuffer(f.tensor_bytes(t.name), "<f4"))
    # the quantized mixes approximate the base they were made from
    if name != "tiny-base.gguf":
        base = GGUFFile(GG / "tiny-base.gguf")
        for t in f.tensors.values():
            ref = base.dequantize(t.name)
            rel = np.sqrt(np.mean((f.dequantize(t.name) - ref) ** 2) / np.mean(ref ** 2))
            assert rel < 0.6, f"{name}: {t.name} ({t.type_name}) relative error {rel:.3f}"


# --- hostile files: bounds before allocation, layout checks, non-regular files

def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def _raw_gguf(kvs: bytes, n_kv: int, n_tensors: int = 0, tensors: bytes = b"", version: int = 3,
              pad: int = 64) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + tensors
    return head + b"\0" * (-len(head) % 32) + b"\0" * pad


_ARCH = _kv("general.architecture", 8, struct.pack("<Q", 5) + b"llama")


@pytest.mark.parametrize("blob, message", [
    (_raw_gguf(_ARCH, 1, version=3 << 24), "other byte order"),
    (_raw_gguf(_ARCH, 1, n_tensors=2**62), "tensor count 4611686018427387904 is more than the file can hold"),
    (_raw_gguf(_ARCH, 2**40), "metadata count 1099511627776 is more than the file can hold"),
    (_raw_gguf(_kv("general.name", 8, struct.pack("<Q", 2**63)), 1), "claims 9223372036854775808 bytes"),
    (_raw_gguf(_kv("a", 9, struct.pack("<IQ", 4, 2**61)), 1), "claims 2305843009213693952 elements"),
    (_raw_gguf(_kv("a", 9, struct.pack("<IQ", 8, 2**40)), 1), "claims 1099511627776 elements"),
    (_raw_gguf(_kv("a", 9, struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQ", 4, 0)), 1), "array of arrays"),
    (_raw_gguf(_kv("a", 9, struct.pack("<IQ", 99, 1)), 1), "unknown element type 99"),
    (_raw_gguf(_kv("gen\xe9ral", 4, struct.pack("<I", 1)).replace(b"gen\xc3\xa9ral", b"gen\xe9ral!"), 1),
     "not valid UTF-8"),
])
def test_hostile_headers_raise_before_allocating(tmp_path, blob, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(GGUFError, match=message) as ei:
        GGUFFile(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("vtype, payload, message", [
    (9, struct.pack("<IQI", 4, 1, 32), "must be an unsigned integer, got a ARRAY"),
    (6, struct.pack("<f", 32.0), "must be an unsigned integer, got a FLOAT32"),
    (8, struct.pack("<Q", 2) + b"32", "must be an unsigned integer, got a STRING"),
    (4, struct.pack("<I", 0), "general.alignment 0 is not a power of two"),
    (4, struct.pack("<I", 48), "general.alignment 48 is not a power of two"),
    (5, struct.pack("<i", -32), "general.alignment -32 is not a power of two"),
])
def test_bad_alignment(tmp_path, vtype, payload, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(_raw_gguf(_ARCH + _kv("general.alignment", vtype, payload), 2))
    with pytest.raises(GGUFError, match=message):
        GGUFFile(p)


def _tensor_info(name: bytes, dims, type_id: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    nd = len(dims) if n_dims is None else n_dims
    return (struct.pack("<Q", len(name)) + name + struct.pack("<I", nd) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", type_id, offset))


@pytest.mark.parametrize("infos, message", [
    ([_tensor_info(b"w", [32], n_dims=5)], "5 dimensions"),
    ([_tensor_info(b"w", [32, 2**62])], "overflow int64"),
    ([_tensor_info(b"w", [32, 2**32, 2**32])], "overflow int64"),
    ([_tensor_info(b"w", [32, 2**40])], "beyond the end of the file"),
    ([_tensor_info(b"w" * 64, [32])], "too long"),
    ([_tensor_info(b"w\xff", [32])], "not valid UTF-8"),
    ([_tensor_info(b"a", [32]), _tensor_info(b"b", [32])], "tensors 'a' and 'b' both start at data offset 0"),
    ([_tensor_info(b"a", [32, 2]), _tensor_info(b"b", [32], offset=128)],
     r"tensor 'a' \(F32, shape \(32, 2\), 256 bytes at file offset \d+\) overlaps tensor 'b'"),
])
def test_tensor_infos_and_overlaps(tmp_path, infos, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(_raw_gguf(_ARCH, 1, len(infos), b"".join(infos), pad=512))
    with pytest.raises(GGUFError, match=message):
        GGUFFile(p)


def test_tensors_out_of_order_with_gaps_are_fine(tmp_path):
    # ik_llama.cpp's gguf_init_from_file only asks for aligned, in-file, non-overlapping data
    infos = [_tensor_info(b"a", [32], offset=256), _tensor_info(b"b", [32, 2], offset=0)]
    p = tmp_path / "ok.gguf"
    p.write_bytes(_raw_gguf(_ARCH, 1, 2, b"".join(infos), pad=512))
    f = GGUFFile(p)
    assert f.tensor("a").offset - f.tensor("b").offset == 256


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_directory_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="not a regular file \\(a FIFO\\)"):
        GGUFFile(fifo)                     # would block forever in open() without the check
    with pytest.raises(GGUFError, match="is a directory"):
        GGUFFile(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_quantize_refuses_fifo_source_and_output(tmp_path):
    from evalkit.errors import EvalkitError
    from evalkit.recipes import quantize_model

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(EvalkitError, match="a FIFO"):
        quantize_model(fifo, tmp_path / "out.gguf", "Q8_0", progress=False)
    with pytest.raises(EvalkitError, match="exists and is not a regular file"):
        quantize_model(GG / "tiny-base.gguf", fifo, "Q8_0", progress=False)
    with pytest.raises(EvalkitError, match="exists and is a directory"):
        quantize_model(GG / "tiny-base.gguf", tmp_path, "Q8_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_header_cache_hands_out_independent_copies(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes((GG / "tiny-base.gguf").read_bytes())
    a = GGUFFile(p)
    a.metadata["general.name"] = "changed"
    a.metadata["tokenizer.ggml.tokens"].append("extra")
    del a.tensors["output.weight"]
    b = GGUFFile(p)
    assert b.metadata["general.name"] == "tiny-random-llama" and len(b.metadata["tokenizer.ggml.tokens"]) == 49152
    assert "output.weight" in b.tensors
    # a rewritten file is parsed again
    f = GGUFFile(GG / "tiny-base.gguf")
    specs = [TensorSpec(t.name, t.shape, t.type_id) for t in f.tensors.values()]
    write_gguf(p, {**f.metadata, "general.name": "rewritten"}, specs, lambda s: f.tensor_bytes(s.name),
               f.metadata_types)
    assert GGUFFile(p).metadata["general.name"] == "rewritten"


def test_quantize_names_tensor_row_and_column_of_nan(tmp_path):
    from evalkit.recipes import quantize_model
    from evalkit.recipes.model_quantizer import NonFiniteWeightError

    f = GGUFFile(GG / "tiny-base.gguf")
    specs = [TensorSpec(t.name, t.shape, t.type_id) for t in f.tensors.values()]
    for name, dtype, (r, c), value in [("blk.1.ffn_norm.weight", np.float32, (0, 9), np.inf),
                                       ("blk.0.attn_v.weight", np.float16, (100, 3), np.nan)]:
        def data(s, name=name, dtype=dtype, r=r, c=c, value=value):
            raw = np.array(f.tensor_bytes(s.name))
            if s.name == name:
                raw.view(dtype)[r, c] = value
            return raw
        src = tmp_path / f"{name}.gguf"
        write_gguf(src, f.metadata, specs, data, f.metadata_types)
        for ftype in ("Q8_0", "F32"):
            with pytest.raises(NonFiniteWeightError, match=rf"'{name}' \(\w+\) holds a non-finite weight "
                                                           rf"\S+ at row {r}, column {c}"):
                quantize_model(src, tmp_path / "out.gguf", ftype, threads=2, progress=False)
            assert not (tmp_path / "out.gguf").exists()


def test_model_size_counts_repacked_tensors_as_stored():
    """Q8_KV_R8 rows keep a 4-byte header where plain Q8_KV rows have 8: the size (and bpw) of
    a file is what it stores, counted here from the shapes alone."""
    from evalkit.files import model_size
    path = GOLDEN / "repacked" / "r4-Q8_KV_R8.gguf"
    with GGUFFile(path) as f:
        assert any(t.stored_type_id is not None for t in f.tensors.values())
        # F32 norms; plain Q8_KV (token_embd: 8-byte row header); Q8_KV_R8 (4-byte header)
        header = {True: 8, False: 4}
        want = sum(4 * t.n_elements if t.type_id == 0 else t.nrows * (t.n_per_row + header[t.stored_type_id is None])
                   for t in f.tensors.values())
        n = sum(t.n_elements for t in f.tensors.values())
    assert model_size(path) == (want, 8.0 * want / n)
