"""Imatrix files: the legacy and GGUF writers, conversions both ways, and what the quantizer makes of them."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from conftest import GOLDEN
from evalkit.imatrix import (ImatrixEntry, ImatrixError, ImatrixStats, load_imatrix, read_imatrix_stats,
                             write_imatrix, write_imatrix_gguf, write_imatrix_legacy)

GGUF_DIR = GOLDEN / "gguf"
GOLDEN_FILES = ["smollm2-calib.imatrix", "tiny-base.imatrix"]


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_legacy_to_gguf_to_legacy_is_byte_identical(tmp_path, name):
    src = GGUF_DIR / name
    write_imatrix(tmp_path / "m.gguf", read_imatrix_stats(src))
    write_imatrix(tmp_path / "back.dat", read_imatrix_stats(tmp_path / "m.gguf"))
    assert (tmp_path / "back.dat").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_gguf_loads_to_the_same_vectors_as_the_legacy_file(tmp_path, name):
    write_imatrix_gguf(tmp_path / "m.gguf", read_imatrix_stats(GGUF_DIR / name))
    a, b = load_imatrix(GGUF_DIR / name), load_imatrix(tmp_path / "m.gguf")
    assert list(a.data) == list(b.data)
    for k in a.data:
        assert a.data[k].tobytes() == b.data[k].tobytes(), k          # bit for bit
    assert (a.chunks, a.dataset) == (b.chunks, b.dataset)


def test_gguf_file_as_the_gguf_package_reads_it(tmp_path):
    """Mainline's layout, checked with an independent reader (the gguf package)."""
    from gguf import GGUFReader
    stats = read_imatrix_stats(GGUF_DIR / "tiny-base.imatrix")
    write_imatrix_gguf(tmp_path / "m.gguf", stats)
    r = GGUFReader(tmp_path / "m.gguf")
    f = {k: r.fields[k] for k in ("general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")}
    assert bytes(f["general.type"].parts[-1]).decode() == "imatrix"
    assert bytes(f["imatrix.datasets"].parts[-1]).decode() == stats.datasets[0]
    assert int(f["imatrix.chunk_count"].parts[-1][0]) == 8 and int(f["imatrix.chunk_size"].parts[-1][0]) == 512
    tensors = {t.name: t for t in r.tensors}
    raw = (GGUF_DIR / "tiny-base.imatrix").read_bytes()
    name = "blk.0.ffn_down.weight"
    want = _legacy_entry(raw, name)            # (ncall, values) parsed here with struct
    sums, counts = tensors[name + ".in_sum2"], tensors[name + ".counts"]
    assert list(sums.shape) == [768, 1] and list(counts.shape) == [1, 1]
    # mainline's conversion: in_sum2 = value · 512, counts = ncall · 512
    np.testing.assert_array_equal(np.asarray(sums.data).reshape(-1), want[1] * np.float32(512))
    assert float(np.asarray(counts.data).reshape(-1)[0]) == want[0] * 512


def _legacy_entry(raw: bytes, name: str) -> tuple[int, np.ndarray]:
    n, pos = struct.unpack_from("<i", raw)[0], 4
    for _ in range(n):
        ln = struct.unpack_from("<i", raw, pos)[0]
        nm = raw[pos + 4:pos + 4 + ln].decode()
        ncall, nval = struct.unpack_from("<ii", raw, pos + 4 + ln)
        vals = np.frombuffer(raw, "<f4", nval, pos + 12 + ln)
        if nm == name:
            return ncall, vals
        pos += 12 + ln + 4 * nval
    raise KeyError(name)


def _expert_stats(counts: list[int]) -> ImatrixStats:
    rng = np.random.default_rng(1)
    sums = rng.uniform(1, 5, (len(counts), 32)) * np.asarray(counts, dtype=float)[:, None]
    return ImatrixStats({"blk.0.ffn_down_exps.weight": ImatrixEntry(sums, counts, 3),
                         "blk.0.attn_q.weight": ImatrixEntry(rng.uniform(1, 2, (1, 16)), [96], 3)},
                        chunks=3, chunk_size=32, datasets=["calib.txt"])


def test_legacy_writer_values_and_expert_rules(tmp_path):
    """Values Σx²/count·ncall per expert; the reference's rules for experts without data."""
    st = _expert_stats([40] * 40)
    write_imatrix_legacy(tmp_path / "a.dat", st)
    raw = (tmp_path / "a.dat").read_bytes()
    ncall, vals = _legacy_entry(raw, "blk.0.ffn_down_exps.weight")
    e = st.entries["blk.0.ffn_down_exps.weight"]
    assert ncall == 3
    np.testing.assert_allclose(vals, (e.sums / 40 * 3).reshape(-1), rtol=1e-7)
    assert raw.endswith(struct.pack("<ii", 3, 9) + b"calib.txt")
    # one of 40 experts without data: round(40 · 5 %) = 2 > 1 → stored, that expert as 1·ncall
    counts = [40] * 40
    counts[7] = 0
    warnings = write_imatrix_legacy(tmp_path / "b.dat", _expert_stats(counts))
    _, vals = _legacy_entry((tmp_path / "b.dat").read_bytes(), "blk.0.ffn_down_exps.weight")
    assert np.all(vals.reshape(40, 32)[7] == 3) and any("1 of 40 experts" in w for w in warnings)
    # one of 20: round(1.0) = 1, not > 1 → the entry is skipped, the others stay
    counts = [40] * 20
    counts[3] = 0
    warnings = write_imatrix_legacy(tmp_path / "c.dat", _expert_stats(counts))
    with pytest.raises(KeyError):
        _legacy_entry((tmp_path / "c.dat").read_bytes(), "blk.0.ffn_down_exps.weight")
    assert "blk.0.attn_q.weight" in load_imatrix(tmp_path / "c.dat") and any("skipping" in w for w in warnings)


def test_gguf_keeps_per_expert_counts(tmp_path):
    counts = [40] * 4
    counts[2] = 0
    st = _expert_stats(counts)
    write_imatrix_gguf(tmp_path / "e.gguf", st)
    back = read_imatrix_stats(tmp_path / "e.gguf")
    e = back.entries["blk.0.ffn_down_exps.weight"]
    assert e.counts.tolist() == counts and e.ncall == 2          # ⌈40 / 32⌉, mainline's rule
    loaded = load_imatrix(tmp_path / "e.gguf").data["blk.0.ffn_down_exps.weight"].reshape(4, 32)
    assert np.all(loaded[2] == 1)                                  # no data: 1, as mainline's reader
    np.testing.assert_allclose(loaded[0], st.entries["blk.0.ffn_down_exps.weight"].sums[0] / 40, rtol=1e-6)


def test_write_errors_are_named(tmp_path):
    st = read_imatrix_stats(GGUF_DIR / "tiny-base.imatrix")
    with pytest.raises(ImatrixError, match="does not exist"):
        write_imatrix(tmp_path / "missing" / "m.dat", st)
    with pytest.raises(ImatrixError, match="is a folder"):
        write_imatrix(tmp_path, st)
    with pytest.raises(ImatrixError, match="unknown imatrix format"):
        write_imatrix(tmp_path / "m.dat", st, "npz")
    with pytest.raises(ImatrixError, match="nothing to write"):
        write_imatrix_legacy(tmp_path / "m.dat", ImatrixStats({}))
    assert not list(tmp_path.iterdir())


def test_gguf_imatrix_quantizes_to_the_reference_bytes(tmp_path):
    """The KT mix of tiny-base quantized with evalkit's GGUF conversion of the reference's
    imatrix: the same bytes as with the legacy file, which are the reference's own."""
    from evalkit.gguf import GGUFFile
    from evalkit.recipes.model_quantizer import load_imatrix_arg, quantize_tensor
    from evalkit.recipes.options import TypeOptions
    from evalkit.recipes.plan import build_plan
    from evalkit.sources import open_source

    write_imatrix_gguf(tmp_path / "m.gguf", read_imatrix_stats(GGUF_DIR / "tiny-base.imatrix"))
    opts = TypeOptions.create(attn_q_type="iq2_kt", attn_k_type="iq3_kt", attn_v_type="iq4_kt",
                              attn_output_type="iq1_kt", ffn_gate_type="iq2_kl", ffn_up_type="iq4_kss",
                              ffn_down_type="q6_0", token_embedding_type="q8_0",
                              output_tensor_type="iq4_nl")
    source = open_source(GGUF_DIR / "tiny-base.gguf")
    golden = GGUFFile(GGUF_DIR / "tiny-kt-mix-imatrix.gguf")
    for path in (GGUF_DIR / "tiny-base.imatrix", tmp_path / "m.gguf"):
        im, label = load_imatrix_arg(str(path))
        plan = build_plan(source, "IQ4_K", opts, im, label)
        for tp in plan.tensors:
            if tp.name.startswith("blk.") and tp.imatrix_name:
                got = quantize_tensor(source, tp, im.data[tp.imatrix_name], threads=2)
                assert got.tobytes() == golden.tensor_bytes(tp.name).tobytes(), (path.name, tp.name)
