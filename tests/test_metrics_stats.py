"""evalkit.metrics statistics against a naive, loop-based float64 reading of the spec.

spec/perplexity-kld.md sections 1.3-1.5 (chunking), 2 (PPL), 4 (KLD statistics).
The naive implementation below is written from the spec text alone, with Python
loops and float64 everywhere; evalkit mirrors the reference's float32 steps, so the
two agree to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from evalkit.metrics import (
    KLDAccumulator,
    KLDTokens,
    PerplexityAccumulator,
    chunk_tokens,
    decode_records,
    encode_records,
    kld_statistics,
    kld_token_stats,
    median_f32,
    n_scored,
    percentile_f32,
    scored_positions,
    token_nll,
)

# --------------------------------------------------------------------------
# naive reference, written from the spec (float64, plain loops)
# --------------------------------------------------------------------------


def naive_token(b_row, z_row, y):
    """Spec 4.1 for one row, float64: (nll_q, nll_b, kld, p_q, p_b, dp, same)."""
    V = len(z_row)
    M = z_row[0]
    imax = 0
    for i in range(1, V):
        if z_row[i] > M:
            M, imax = z_row[i], i
    S = 0.0
    for i in range(V):
        S += math.exp(z_row[i] - M)
    lse = M + math.log(S)
    nll_q = lse - z_row[y]
    nll_b = -b_row[y]
    kld = 0.0
    bmax, jmax = b_row[0], 0
    for i in range(V):
        if b_row[i] > bmax:
            bmax, jmax = b_row[i], i
        if b_row[i] > -16.0:
            kld += math.exp(b_row[i]) * (b_row[i] - (z_row[i] - lse))
    p_q, p_b = math.exp(-nll_q), math.exp(-nll_b)
    return nll_q, nll_b, kld, p_q, p_b, p_q - p_b, imax == jmax


def naive_mean_se(vals):
    N = len(vals)
    mean = sum(vals) / N
    v = sum(x * x for x in vals) / N - mean * mean
    return mean, (math.sqrt(v / (N - 1)) if v > 0 and N > 10 else 0.0)


def naive_percentile(sorted_vals, phi):
    N = len(sorted_vals)
    r = phi * (N - 1)
    k = int(math.floor(r))
    w = r - k
    return (1 - w) * sorted_vals[k] + w * sorted_vals[min(k + 1, N - 1)]


def naive_median(sorted_vals):
    N = len(sorted_vals)
    if N % 2:
        return sorted_vals[N // 2]
    return 0.5 * (sorted_vals[N // 2 - 1] + sorted_vals[N // 2])


def naive_stats(rows):
    """Spec 4.3-4.5 from a list of naive_token tuples."""
    N = len(rows)
    lq = [r[0] for r in rows]
    lb = [r[1] for r in rows]
    kl = [r[2] for r in rows]
    dp = [r[5] for r in rows]
    mu_q, s_q = naive_mean_se(lq)
    mu_b, s_b = naive_mean_se(lb)
    cov = (sum(a * b for a, b in zip(lq, lb)) / N - mu_q * mu_b) / (N - 1)
    P_Q, P_B = math.exp(mu_q), math.exp(mu_b)
    u_Q, u_B = P_Q * s_q, P_B * s_b
    lr_err = math.sqrt(s_q ** 2 + s_b ** 2 - 2 * cov)
    ks = sorted(kl)
    ds = sorted(dp)
    mse, mse_se = naive_mean_se([d * d for d in dp])
    rms = math.sqrt(mse)
    rho = sum(1 for r in rows if r[6]) / N
    out = {
        "ppl": [P_Q, u_Q],
        "ppl_base": [P_B, u_B],
        "cor_ln_ppl": cov / (s_q * s_b),
        "mean_ln_ppl_ratio": [mu_q - mu_b, lr_err],
        "ppl_ratio": [math.exp(mu_q - mu_b), math.exp(mu_q - mu_b) * lr_err],
        "ppl_diff": [P_Q - P_B, math.sqrt(u_Q ** 2 + u_B ** 2 - 2 * P_Q * P_B * cov)],
        "kld_mean": list(naive_mean_se(kl)),
        "kld_max": ks[-1],
        "kld_p99_9": naive_percentile(ks, 0.999),
        "kld_p99": naive_percentile(ks, 0.99),
        "kld_p95": naive_percentile(ks, 0.95),
        "kld_p90": naive_percentile(ks, 0.90),
        "kld_median": naive_median(ks),
        "kld_p10": naive_percentile(ks, 0.10),
        "kld_p5": naive_percentile(ks, 0.05),
        "kld_p1": naive_percentile(ks, 0.01),
        "kld_p0_1": naive_percentile(ks, 0.001),
        "kld_min": ks[0],
        "dp_mean": list(naive_mean_se(dp)),
        "dp_rms": [rms, mse_se / (2 * rms)],
        "dp_percentiles": {
            "max": ds[-1], "min": ds[0], "50": naive_median(ds),
            **{k: naive_percentile(ds, float(k) / 100) for k in
               ("99.9", "99", "95", "90", "75", "25", "10", "5", "1", "0.1")},
        },
        "same_top_p": [rho, math.sqrt(rho * (1 - rho) / (N - 1))],
        "n_tokens": N,
    }
    return out


# --------------------------------------------------------------------------
# fixtures: a few chunks of random logits, small vocabulary
# --------------------------------------------------------------------------

C, V, K = 80, 64, 3  # 39 scored rows per chunk, N = 117 >= 100


def _make_chunks(seed=1):
    rng = np.random.default_rng(seed)
    R = n_scored(C)
    chunks = []
    for _ in range(K):
        zb = (rng.standard_normal((R, V)) * 4.0).astype(np.float32)
        zb[:, :3] -= 40.0  # far below the max: exercises the writer clamp and the −16 cut
        zq = (zb + rng.standard_normal((R, V)).astype(np.float32) * 0.7).astype(np.float32)
        # make the quantized model put more mass on the targets sometimes and less other times
        y = rng.integers(3, V, R)
        zq[np.arange(R), y] += rng.standard_normal(R).astype(np.float32)
        b = decode_records(encode_records(zb), V)  # base values as the file holds them
        chunks.append((b, zq, y))
    return chunks


@pytest.fixture(scope="module")
def chunks():
    return _make_chunks()


def _close(a, b, rtol, atol, what):
    assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol), f"{what}: evalkit {a!r} vs naive {b!r}"


def test_per_token_against_naive(chunks):
    for k, (b, zq, y) in enumerate(chunks):
        tok = kld_token_stats(b, zq, y, chunk=k, first_row=C // 2)
        assert tok.nll_q.dtype == np.float32 and tok.dp.dtype == np.float32
        for r in range(len(y)):
            nq, nb, kl, pq, pb, dp, same = naive_token(
                [float(x) for x in b[r]], [float(x) for x in zq[r]], int(y[r]))
            _close(float(tok.nll_q[r]), nq, 1e-6, 1e-5, "nll_q")
            _close(float(tok.nll_base[r]), nb, 0, 0, "nll_base")  # −b_y is exact
            _close(float(tok.kld[r]), kl, 1e-5, 2e-6, "kld")
            _close(float(tok.p_q[r]), pq, 1e-5, 1e-9, "p_q")
            _close(float(tok.p_base[r]), pb, 1e-5, 1e-9, "p_base")
            _close(float(tok.dp[r]), dp, 1e-5, 1e-8, "dp")
            assert bool(tok.same_top[r]) == same


def test_statistics_against_naive(chunks):
    toks = [kld_token_stats(b, zq, y, chunk=k) for k, (b, zq, y) in enumerate(chunks)]
    got = kld_statistics(toks)
    rows = []
    for b, zq, y in chunks:
        for r in range(len(y)):
            rows.append(naive_token([float(x) for x in b[r]], [float(x) for x in zq[r]], int(y[r])))
    want = naive_stats(rows)

    expected_keys = {
        "ppl", "ppl_base", "cor_ln_ppl", "mean_ln_ppl_ratio", "ppl_ratio", "ppl_diff",
        "kld_mean", "kld_max", "kld_p99_9", "kld_p99", "kld_p95", "kld_p90", "kld_median",
        "kld_p10", "kld_p5", "kld_p1", "kld_p0_1", "kld_min", "dp_mean", "dp_rms",
        "dp_percentiles", "same_top_p", "n_tokens"}
    assert set(got) == expected_keys
    assert got["n_tokens"] == K * n_scored(C) == len(rows)
    # sanity of the fixture: the statistics are not degenerate
    assert 0.0 < got["same_top_p"][0] < 1.0 and got["kld_mean"][0] > 0.01
    assert got["dp_percentiles"]["min"] < 0 < got["dp_percentiles"]["max"]

    for key, w in want.items():
        g = got[key]
        if key == "dp_percentiles":
            assert set(g) == set(w)
            for p in w:
                assert isinstance(g[p], float)
                _close(g[p], w[p], 1e-5, 1e-7, f"dp {p}%")
        elif isinstance(w, list):
            assert isinstance(g, list) and len(g) == 2 and all(isinstance(x, float) for x in g), key
            _close(g[0], w[0], 1e-6, 1e-9, key)
            _close(g[1], w[1], 1e-5, 1e-9, key + " err")
        elif key == "n_tokens":
            assert g == w
        else:
            assert isinstance(g, float), key
            # float32 per-token KLD terms: about 1e-7 relative per term
            _close(g, w, 2e-5, 1e-6, key)


def test_accumulator_chunkwise_equals_concatenated(chunks):
    toks = [kld_token_stats(b, zq, y) for b, zq, y in chunks]
    acc = KLDAccumulator()
    for t in toks:
        acc.add(t)
        row = acc.progress()
        assert set(row) == {"ppl", "mean_ln_ppl_ratio", "kld_mean", "dp_rms", "same_top_p"}
    a = acc.statistics()
    b = kld_statistics(KLDTokens.concat(toks))
    assert a["kld_p99"] == b["kld_p99"] and a["dp_percentiles"] == b["dp_percentiles"]
    for key in ("ppl", "kld_mean", "dp_rms", "same_top_p"):
        assert a[key] == pytest.approx(b[key], rel=1e-12)
    assert acc.progress()["ppl"] == pytest.approx(a["ppl"], rel=1e-12)


def test_small_n_rules():
    # N <= 10: every SE is 0, the covariance is 0, so Cor is 0/0 = nan (spec 5.8)
    rng = np.random.default_rng(3)
    zb = rng.standard_normal((5, 16)).astype(np.float32)
    b = decode_records(encode_records(zb), 16)
    zq = (zb + 0.1 * rng.standard_normal((5, 16))).astype(np.float32)
    st = kld_statistics(kld_token_stats(b, zq, np.arange(5)))
    assert st["ppl"][1] == 0.0 and st["ppl_base"][1] == 0.0 and st["kld_mean"][1] == 0.0
    assert st["dp_mean"][1] == 0.0 and st["mean_ln_ppl_ratio"][1] == 0.0
    assert math.isnan(st["cor_ln_ppl"])
    assert st["n_tokens"] == 5


def test_self_comparison_near_zero():
    # a model against its own encoded logits: not exactly zero (spec 5.4), but tiny
    rng = np.random.default_rng(4)
    z = (rng.standard_normal((40, 1000)) * 3).astype(np.float32)
    b = decode_records(encode_records(z), 1000)
    tok = kld_token_stats(b, z, rng.integers(0, 1000, 40))
    assert np.abs(tok.kld).max() < 1e-4
    assert np.abs(tok.dp).max() < 1e-3
    assert tok.same_top.all()


def test_top_token_ties_take_lowest_index():
    z = np.zeros((1, 8), np.float32)
    z[0, [2, 5]] = 3.0  # Q tie: i* = 2
    b = np.full((1, 8), -5.0, np.float32)
    b[0, [2, 6]] = -0.5  # base tie: j* = 2
    assert kld_token_stats(b, z, [0]).same_top[0]
    b[0, 1] = -0.5  # base tie now starts at 1
    assert not kld_token_stats(b, z, [0]).same_top[0]


def test_percentile_uses_float32_index():
    # N = 101: r = 0.999f·100 = 99.900001287… rounds in float to 99.90000152587890625,
    # so w = 0.9000015 and P = 99 + 1000·w ≈ 999.0015 with v[99] = 99, v[100] = 1099;
    # a float64 index gives w = 0.9 and 999.0.
    v = np.arange(101, dtype=np.float32)
    v[100] = 1099.0
    assert percentile_f32(v, 0.999) == 999.0015258789062
    assert naive_percentile([float(x) for x in v], 0.999) == pytest.approx(999.0, abs=1e-9)
    assert percentile_f32(v, 0.0) == 0.0 and percentile_f32(v, 1.0) == 1099.0
    # w = 0.5 in float: 0.25f·3 = 0.75
    assert percentile_f32(np.array([0, 1, 2, 4], np.float32), 0.25) == 0.75
    assert median_f32(np.array([1, 2, 4, 8], np.float32)) == 3.0
    assert median_f32(np.array([1, 2, 4], np.float32)) == 2.0


def test_nonfinite_logits_name_chunk_and_position(chunks):
    b, zq, y = chunks[0]
    bad = zq.copy()
    bad[5, 7] = np.nan
    with pytest.raises(ValueError, match=r"chunk 2 at position 45"):
        kld_token_stats(b, bad, y, chunk=2, first_row=40)
    bad[5, 7] = np.inf
    with pytest.raises(ValueError, match=r"chunk 2 at position 45"):
        kld_token_stats(b, bad, y, chunk=2, first_row=40)
    bb = b.copy()
    bb[38, 0] = -np.inf
    with pytest.raises(ValueError, match=r"base log-probabilities.*chunk 1 at position 78"):
        kld_token_stats(bb, zq, y, chunk=1, first_row=40)
    bad = zq.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"chunk 3 at position 256"):
        token_nll(bad, y, chunk=3, first_row=256)


# --------------------------------------------------------------------------
# per-token NLL and PPL
# --------------------------------------------------------------------------


def test_token_nll_matches_float64_log_softmax(chunks):
    _, z, y = chunks[1]
    z64 = z.astype(np.float64)
    ref = np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1)) + z64.max(1) - z64[np.arange(len(y)), y]
    for writer in (False, True):
        got = token_nll(z, y, writer=writer)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    # writer mode is float arithmetic: its values are float32 numbers
    w = token_nll(z, y, writer=True)
    assert np.array_equal(w, w.astype(np.float32).astype(np.float64))


def test_token_nll_hand_example():
    # logits [0, ln 3]: p = [1/4, 3/4]
    z = np.array([[0.0, math.log(3.0)]], np.float32)
    assert token_nll(z, [0])[0] == pytest.approx(math.log(4.0), rel=1e-7)
    assert token_nll(z, [1])[0] == pytest.approx(math.log(4.0 / 3.0), rel=1e-6)


def test_ppl_formula_hand_computed():
    acc = PerplexityAccumulator()
    # chunks [1, 2] and [3, 4]: running exp(1.5), exp(2.5)
    assert acc.add([1.0, 2.0]) == pytest.approx(4.4816890703380645, rel=1e-15)
    assert acc.add(np.array([3.0, 4.0])) == pytest.approx(12.182493960703473, rel=1e-15)
    # μ = 2.5, s² = 30/4 − 6.25 = 1.25, σ = √(1.25/3) = √(5/12) = 0.6454972243679028
    ppl, err = acc.final()
    assert ppl == pytest.approx(12.182493960703473, rel=1e-15)
    assert err == pytest.approx(12.182493960703473 * 0.6454972243679028, rel=1e-14)
    assert err == pytest.approx(7.863766037512831, rel=1e-14)
    assert acc.running == pytest.approx([4.4816890703380645, 12.182493960703473], rel=1e-15)
    assert acc.count == 4


def test_ppl_zero_variance_is_an_error():
    acc = PerplexityAccumulator()
    acc.add([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="variance"):
        acc.final()


# --------------------------------------------------------------------------
# chunking
# --------------------------------------------------------------------------


def test_fewer_than_two_chunks_is_an_error():
    with pytest.raises(ValueError, match=r"2\*n_ctx = 128.*n_ctx=64.*127 tokens"):
        chunk_tokens(np.arange(127), 64)
    with pytest.raises(ValueError, match=r"1023"):
        chunk_tokens(np.arange(1023), 512, n_chunks=1)  # --chunks 1 does not help
    chunk_tokens(np.arange(128), 64)  # exactly 2C is enough


def test_chunk_count_and_tail():
    toks = np.arange(85, dtype=np.int32)
    ch, _ = chunk_tokens(toks, 8)
    assert ch.shape == (10, 8) and ch.dtype == np.int32
    np.testing.assert_array_equal(ch.ravel(), toks[:80])  # tail of 5 tokens unused
    assert chunk_tokens(toks, 8, n_chunks=3)[0].shape == (3, 8)
    assert chunk_tokens(toks, 8, n_chunks=100)[0].shape == (10, 8)
    assert chunk_tokens(toks, 8, n_chunks=-1)[0].shape == (10, 8)


def test_bos_replacement():
    toks = np.arange(100, 140, dtype=np.int32)
    orig = toks.copy()
    ch, pos = chunk_tokens(toks, 10, bos_id=1)
    assert (ch[:, 0] == 1).all()  # replaced, not prepended: chunks stay C long
    np.testing.assert_array_equal(ch[:, 1:], orig.reshape(4, 10)[:, 1:])
    np.testing.assert_array_equal(toks, orig)  # stream untouched
    np.testing.assert_array_equal(ch[:, pos], orig.reshape(4, 10)[:, pos])  # targets are original
    plain, _ = chunk_tokens(toks, 10)
    np.testing.assert_array_equal(plain, orig.reshape(4, 10))


@pytest.mark.parametrize("c,count,first", [(512, 255, 257), (513, 256, 257), (1024, 511, 513),
                                           (2048, 1023, 1025), (4096, 2047, 2049), (64, 31, 33)])
def test_scored_positions(c, count, first):
    pos = scored_positions(c)
    assert n_scored(c) == count == len(pos)
    assert pos[0] == first and pos[-1] == c - 1
    np.testing.assert_array_equal(np.diff(pos), 1)
