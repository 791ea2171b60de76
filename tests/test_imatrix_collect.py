"""Collecting an imatrix: the reference's token and call rules, on-the-fly sums, and the golden files."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from conftest import GOLDEN, SHARED
from evalkit.imatrix import ImatrixError, load_imatrix, read_imatrix_stats
from evalkit.imatrix_tools import ImatrixCollector, compute_imatrix, counted_positions

CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"
TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def golden_agreement(stats, golden_path) -> tuple[float, set[int]]:
    """(largest |ours - reference| / max |reference| over the entries, the call counts),
    after checking that the entry names and call counts are the reference's."""
    ref, ref_loaded, ours = read_imatrix_stats(golden_path), load_imatrix(golden_path), stats.to_imatrix()
    assert set(stats.entries) == set(ref.entries)
    worst = 0.0
    for name, e in ref.entries.items():
        assert stats.entries[name].ncall == e.ncall, name
        a, b = ours.data[name].astype(np.float64), ref_loaded.data[name].astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    return worst, {e.ncall for e in ref.entries.values()}


@pytest.mark.parametrize("n_pos,ubatch,want", [(512, 512, (512, 1)), (1024, 512, (1024, 2)), (520, 512, (512, 1)),
                                                 (528, 512, (528, 2)), (15, 512, (0, 0)), (16, 512, (16, 1)),
                                                 (100, 32, (96, 3)), (112, 32, (112, 4))])
def test_counted_positions_follow_the_16_token_rule(n_pos, ubatch, want):
    # micro-batches of `ubatch` from position 0; one of fewer than 16 tokens is ignored
    assert counted_positions(n_pos, ubatch) == want


def test_dense_sums_counts_and_calls_match_float64():
    rng = np.random.default_rng(0)
    col = ImatrixCollector(ubatch=32)
    xs = [rng.standard_normal((3, 100, 24)).astype(np.float32) for _ in range(2)]
    for x in xs:
        t = torch.from_numpy(x)
        col.add_dense("blk.0.attn_q.weight", t)
        col.add_dense("blk.0.attn_k.weight", t)           # the same input: reduced once, added twice
    st = col.stats(chunks=6, chunk_size=100, datasets=["d"])
    want = sum((x[:, :96].astype(np.float64) ** 2).sum(axis=(0, 1)) for x in xs)   # 4 tail tokens dropped
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
        e = st.entries[name]
        np.testing.assert_allclose(e.sums[0], want, rtol=1e-6)
        assert e.counts.tolist() == [2 * 3 * 96] and e.ncall == 2 * 3 * 3   # 3 counted micro-batches each
    assert list(st.entries) == ["blk.0.attn_q.weight", "blk.0.attn_k.weight"]


def test_expert_rows_sum_per_expert():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((50, 8)).astype(np.float32)
    ids = rng.integers(0, 4, 50)
    ids[ids == 2] = 1                                      # expert 2 gets nothing
    col = ImatrixCollector()
    col.add_expert_rows("blk.0.ffn_down_exps.weight", torch.from_numpy(rows), torch.from_numpy(ids), 4, calls=1)
    col.add_expert_rows("blk.0.ffn_down_exps.weight", torch.from_numpy(rows), torch.from_numpy(ids), 4, calls=1)
    e = col.stats(1, 50, []).entries["blk.0.ffn_down_exps.weight"]
    for k in range(4):
        np.testing.assert_allclose(e.sums[k], 2 * (rows[ids == k].astype(np.float64) ** 2).sum(0), rtol=1e-6,
                                   atol=1e-12)
        assert e.counts[k] == 2 * (ids == k).sum()
    assert e.ncall == 2 and e.counts[2] == 0
    with pytest.raises(ImatrixError, match="expert id outside"):
        col.add_expert_rows("blk.0.ffn_down_exps.weight", torch.from_numpy(rows), torch.full((50,), 4), 4)
    with pytest.raises(ImatrixError, match="inconsistent size"):
        col.add_expert_rows("blk.0.ffn_down_exps.weight", torch.from_numpy(rows[:, :4]), torch.zeros(50), 4)


def test_nan_activations_are_a_named_error():
    col = ImatrixCollector()
    col.add_dense("blk.0.attn_q.weight", torch.full((1, 32, 4), float("nan")))
    with pytest.raises(ImatrixError, match="non-finite activations reached 'blk.0.attn_q.weight'"):
        col.stats(1, 32, [])


def test_reference_rope_angles_are_the_float32_recurrence():
    from evalkit.imatrix_tools.reference_numerics import reference_rope_angles
    from evalkit.model.config import ModelConfig
    cfg = ModelConfig.from_gguf(TINY)
    got = reference_rope_angles(cfg, 300)
    s = np.float32(np.float32(cfg.rope_base) ** np.float32(-2.0 / cfg.n_rot))     # powf, in float32
    for p in (0, 1, 7, 299):
        theta = np.float32(p)
        for i in range(cfg.n_rot // 2):                    # one scalar float32 product at a time
            assert got[p, i] == theta, (p, i)
            theta = np.float32(theta * s)
    exact = np.arange(300)[:, None] * cfg.rope_base ** (-np.arange(0, cfg.n_rot, 2) / cfg.n_rot)
    assert 0 < np.abs(got - exact).max() < 1e-3            # a few float32 roundings off the exact angle


def test_tiny_base_reproduces_the_reference_imatrix():
    out = io.StringIO()
    res = compute_imatrix(str(TINY), str(CORPUS), ctx=512, chunks=8, threads=2, progress=False, out=out)
    worst, ncalls = golden_agreement(res.stats, GOLDEN / "gguf" / "tiny-base.imatrix")
    assert worst < 1e-4 and ncalls == {8}, worst
    assert len(res.stats) == 14 and res.stats.chunks == 8
    # the printed perplexity is llama-perplexity's over the same chunks (reference: 55199.1747)
    assert abs(res.ppl[0] / 55199.1747 - 1) < 5e-4 and "[8]" in out.getvalue() and "Final estimate" in out.getvalue()


def test_exact_numerics_drift_from_the_reference(tmp_path):
    """Without the reference's fp16 KV cache and float32 RoPE angles the attention output's
    sums move measurably (what the default emulation is for)."""
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(CORPUS.read_bytes()[:20000])
    res = compute_imatrix(str(TINY), str(corpus), ctx=512, chunks=2, threads=2, progress=False, out=None,
                          exact=True)
    ref = compute_imatrix(str(TINY), str(corpus), ctx=512, chunks=2, threads=2, progress=False, out=None)
    a = res.stats.entries["blk.0.attn_output.weight"].sums[0]
    b = ref.stats.entries["blk.0.attn_output.weight"].sums[0]
    assert np.abs(a - b).max() / b.max() > 2e-5
    assert np.array_equal(res.stats.entries["blk.0.attn_q.weight"].sums, ref.stats.entries["blk.0.attn_q.weight"].sums)


def test_corpus_shorter_than_a_chunk_is_a_named_error(tmp_path):
    from evalkit.evaluation.corpus_chunks import ChunkingError
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of tokens here .\n")
    with pytest.raises(ChunkingError, match=r"need at least 2\*n_ctx = 1024 tokens"):
        compute_imatrix(str(TINY), str(short), ctx=512, threads=2, progress=False, out=None)


def test_output_projection_only_when_asked_and_untied():
    from evalkit.evaluation.forward import load_model
    from evalkit.imatrix_tools.collector import collected_modules
    from evalkit.sources import smollm2_path
    tiny = load_model(TINY)                              # its own output.weight
    names = [n for n, _ in collected_modules(tiny)]
    assert len(names) == 14 and all(n.startswith("blk.") and n.endswith(".weight") for n in names)
    assert [n for n, _ in collected_modules(tiny, process_output=True)][-1] == "output.weight"
    smol = load_model(smollm2_path())                    # tied: multiplies by token_embd.weight
    assert "output.weight" not in [n for n, _ in collected_modules(smol, process_output=True)]


def test_chunks_too_short_to_collect_anything_fail_before_loading():
    from evalkit.errors import RunError
    from evalkit.evaluation.corpus_chunks import ChunkingError
    with pytest.raises(ChunkingError, match="below llama-imatrix's 16-token minimum"):
        compute_imatrix(str(TINY), str(CORPUS), ctx=15, progress=False, out=None)
    with pytest.raises(RunError, match="ubatch must be a positive integer"):
        compute_imatrix(str(TINY), str(CORPUS), ubatch=0, progress=False, out=None)
