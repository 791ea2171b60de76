"""The base-logits file of `llama-perplexity --kl-divergence-base` (spec/perplexity-kld.md §3)."""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from conftest import GOLDEN
from evalkit.metrics import (
    LogitsFile,
    LogitsFileWriter,
    PerplexityAccumulator,
    check_logits_file,
    encode_records,
    file_size,
    record_units,
)

KLD_FILE = GOLDEN / "kld" / "smollm2-base-c64x2.kld"
TOKENS_NPY = GOLDEN / "tokens" / "smollm2-wikitext-2-raw-test.npy"

# --------------------------------------------------------------------------
# naive writer-side encoder (spec 3.3), scalar float32 steps
# --------------------------------------------------------------------------


def naive_encode_row(z, clamp=24.0):
    f = np.float32
    M = max(z)
    m = max(min(z), f(M - f(clamp)))
    S = 0.0
    for x in z:
        S += float(np.exp(f(x - M)))
    lam = f(math.log(S))
    min_log_prob = f(f(m - M) - lam)
    scale = f(f(M - m) / f(65535))
    codes = [0] * len(z)
    if scale != 0:
        inv = f(f(1) / scale)
        for i, x in enumerate(z):
            codes[i] = round(float(f(inv * f(x - m)))) if x > m else 0  # round(): ties to even
    return scale, min_log_prob, codes


def _random_logits(rng, rows, v):
    z = (rng.standard_normal((rows, v)) * 3.0).astype(np.float32)
    z[:, 1] -= 60.0  # below the clamp: code 0, decoded at the floor
    return z


# --------------------------------------------------------------------------
# encoding / decoding
# --------------------------------------------------------------------------


def test_encoder_matches_naive_spec():
    rng = np.random.default_rng(7)
    z = _random_logits(rng, 6, 51)
    z[0, 10] = z[0, 11] = z[0].max()  # ties at the max
    z[5] = 1.5  # constant row: scale 0, all codes 0
    for clamp in (24.0, 16.0):
        rec = encode_records(z, clamp)
        assert rec["q"].shape == (6, record_units(51) - 4) == (6, 52)
        assert (rec["q"][:, 51] == 0).all()  # padding for odd V
        for r in range(6):
            scale, mlp, codes = naive_encode_row(list(z[r]), clamp)
            assert rec["scale"][r] == scale and rec["min_log_prob"][r] == mlp
            assert rec["q"][r, :51].tolist() == codes
    assert encode_records(z)["scale"][5] == 0.0 and (encode_records(z)["q"][5] == 0).all()


def test_decode_hand_computed(tmp_path):
    # a tiny handmade file: C = 6 (f = 3, R = 2), V = 3 (odd: one padding unit), K = 1
    toks = [0, 2, 1, 0, 1, 2]
    recs = [(0.25, -10.0, [0, 8, 40]), (0.1, -1.0, [3, 10, 0])]
    raw = b"_logits_" + struct.pack("<iii", 6, 3, 1) + struct.pack("<6i", *toks)
    for scale, mlp, q in recs:
        raw += struct.pack("<ff", scale, mlp) + struct.pack("<4H", *q, 0)
    assert len(raw) == file_size(6, 3, 1) == 20 + 24 + 2 * 2 * 8
    p = tmp_path / "tiny.kld"
    p.write_bytes(raw)
    with LogitsFile(p) as f:
        assert (f.n_ctx, f.n_vocab, f.n_chunks, f.n_rows) == (6, 3, 1, 2)
        ch = f.read_chunk(0)
    assert ch.logprobs.dtype == np.float32
    # record 0: 0.25·[0, 8, 40] − 10 = [−10, −8, 0], all exact
    assert ch.logprobs[0].tolist() == [-10.0, -8.0, 0.0]
    # record 1, float steps: 0.1f·3 = 0.3000000119… then −1 → −0.699999988… = float32(−0.7);
    # 0.1f·10 rounds to 1.0f, then −1 → 0; 0·0.1f − 1 → −1
    assert ch.logprobs[1].tolist() == [float(np.float32(-0.7)), 0.0, -1.0]
    assert ch.targets.tolist() == [1, 2]  # chunk positions 4, 5
    # target NLLs: −b[0][1] = 8, −b[1][2] = 1
    assert (-ch.logprobs[np.arange(2), ch.targets]).tolist() == [8.0, 1.0]


# --------------------------------------------------------------------------
# writer → reader round trip
# --------------------------------------------------------------------------


def test_round_trip(tmp_path):
    rng = np.random.default_rng(11)
    C, V, K = 16, 51, 3
    f, R = C // 2, C - 1 - C // 2
    stream = rng.integers(0, V, K * C + 5).astype(np.int32)  # tail tokens are not stored
    path = tmp_path / "base.kld"
    all_logits = [_random_logits(rng, C, V) for _ in range(K)]
    nlls = []
    with LogitsFileWriter(path, C, V, stream, clamp=24.0) as w:
        assert w.n_chunks == K
        for k in range(K):
            # the writer takes the full chunk or only the scored rows
            nlls.append(w.write_chunk(all_logits[k] if k % 2 == 0 else all_logits[k][f:C - 1]))
            assert not path.exists()  # nothing visible before close
    assert path.stat().st_size == file_size(C, V, K)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.kld"]  # no temp file left
    assert len(w.accumulator.running) == K

    with LogitsFile(path) as rf:
        assert (rf.n_ctx, rf.n_vocab, rf.n_chunks, rf.n_rows) == (C, V, K, R)
        np.testing.assert_array_equal(rf.tokens, stream[:K * C])
        chunks = list(rf)
    acc = PerplexityAccumulator()
    for k, ch in enumerate(chunks):
        assert ch.index == k
        np.testing.assert_array_equal(ch.targets, stream[k * C + f + 1:(k + 1) * C])
        z = all_logits[k][f:C - 1].astype(np.float64)
        lsm = z - z.max(1, keepdims=True)
        lsm -= np.log(np.exp(lsm).sum(1, keepdims=True))
        floor = ch.min_log_prob[:, None].astype(np.float64)
        above = lsm > floor
        # above the clamp: within half a quantization step (+ float rounding)
        err = np.abs(ch.logprobs - lsm)
        tol = (ch.scale[:, None] / 2 + 1e-5) * np.ones_like(lsm)
        assert (err[above] <= tol[above]).all()
        # at or below the clamp: read back exactly at the floor
        np.testing.assert_array_equal(ch.logprobs[~above], np.broadcast_to(floor, lsm.shape)[~above])
        assert (ch.logprobs[:, 1] == ch.min_log_prob).all()  # the −60 column
        # the writer's float NLL is the target's exact value; the decoded one is within a step
        dec = -ch.logprobs[np.arange(R), ch.targets].astype(np.float64)
        assert np.all(np.abs(dec - nlls[k]) <= ch.scale / 2 + 1e-5)
        acc.add(dec)
    assert acc.running == pytest.approx(w.accumulator.running, rel=1e-3)

    # padding unit of the odd vocabulary is written as 0
    raw = np.frombuffer(path.read_bytes()[20 + 4 * K * C:], "<u2").reshape(K * R, record_units(V))
    assert (raw[:, -1] == 0).all()


def test_writer_failure_leaves_nothing(tmp_path):
    rng = np.random.default_rng(2)
    C, V = 8, 10
    stream = rng.integers(0, V, 3 * C)
    path = tmp_path / "x.kld"
    with pytest.raises(RuntimeError):
        with LogitsFileWriter(path, C, V, stream) as w:
            w.write_chunk(_random_logits(rng, C, V))
            raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []
    # incomplete: close refuses and removes the partial data
    w = LogitsFileWriter(path, C, V, stream)
    w.write_chunk(_random_logits(rng, C, V))
    with pytest.raises(ValueError, match="only 1 of 3 chunks"):
        w.close()
    assert list(tmp_path.iterdir()) == []
    # NaN logits: a clear error naming chunk and position, and nothing left behind
    bad = _random_logits(rng, C, V)
    bad[6, 3] = np.nan
    with pytest.raises(ValueError, match="chunk 1 at position 6"):
        with LogitsFileWriter(path, C, V, stream, n_chunks=2) as w:
            w.write_chunk(_random_logits(rng, C, V))
            w.write_chunk(bad)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# the reference's own file
# --------------------------------------------------------------------------


def test_reference_file_header(shared_dir):
    size = KLD_FILE.stat().st_size
    with LogitsFile(KLD_FILE) as f:
        assert (f.n_ctx, f.n_vocab, f.n_chunks, f.n_rows) == (64, 49152, 2, 31)
        assert size == file_size(64, 49152, 2) == 20 + 4 * 128 + 62 * 2 * (49152 + 4)
        corpus = np.load(TOKENS_NPY)
        np.testing.assert_array_equal(f.tokens, corpus[:128])  # SmolLM2 adds no BOS
        f.check(n_ctx=64, tokens=corpus, n_vocab=49152)
    check_logits_file(KLD_FILE, 64, corpus, 49152)


def test_reference_file_reproduces_printed_base_ppl(shared_dir):
    ref = json.loads((GOLDEN / "stats" / "reference-stats.json").read_text())["smollm2_kld_base_file"]
    printed_running = ref["printed_while_writing"]["running_ppl"]   # [26.7961, 29.1867]
    printed_ppl, printed_err = ref["printed_while_writing"]["final_ppl"]  # 29.1867 ± 12.07752
    assert printed_running == [26.7961, 29.1867] and [printed_ppl, printed_err] == [29.1867, 12.07752]

    acc = PerplexityAccumulator()
    max_scale = 0.0
    with LogitsFile(KLD_FILE) as f:
        for ch in f:
            b = ch.logprobs
            assert b.shape == (31, 49152) and b.dtype == np.float32
            # not renormalized, but close to a distribution (spec 3.4)
            lse = np.log(np.exp(b.astype(np.float64)).sum(1))
            assert np.abs(lse).max() < 1e-3
            # ik writer: clamp D = 24, so scale = 24/65535 where the clamp is active
            assert np.allclose(ch.scale, 24.0 / 65535, rtol=1e-6)
            acc.add(-b[np.arange(31), ch.targets].astype(np.float64))
            max_scale = max(max_scale, float(ch.scale.max()))
    ppl, err = acc.final()
    assert acc.count == 62

    # The writing run printed the PPL of its exact float NLLs (M + λ − z_y); the file holds
    # them rounded to the quantization step. Per token the decoded NLL is within
    # h = scale/2 (+ float rounding) of the printed one, so the mean NLL is too, and by the
    # triangle inequality of the standard deviation σ moves by at most h/√(N−1).
    h = max_scale / 2 + 2e-5
    for got, want in zip(acc.running, printed_running):
        assert abs(math.log(got / want)) <= h + 0.5e-4 / want
    assert abs(math.log(ppl / printed_ppl)) <= h + 0.5e-4 / printed_ppl
    assert abs(err - printed_err) <= ppl * h / math.sqrt(61) + err * h + 0.5e-5
    # In practice the differences are at the level of quantization noise (~1e-5 relative):
    # the decoded values are 26.7957, 29.1865 ± 12.07739, i.e. the printed digits up to the
    # last one or two (a 62-token run cannot average the rounding away).
    assert acc.running == pytest.approx(printed_running, rel=5e-5)
    assert ppl == pytest.approx(printed_ppl, rel=5e-5)
    assert err == pytest.approx(printed_err, rel=5e-5)


# --------------------------------------------------------------------------
# broken and foreign files
# --------------------------------------------------------------------------


def test_truncated_file(tmp_path, shared_dir):
    data = KLD_FILE.read_bytes()
    p = tmp_path / "cut.kld"
    p.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"cut\.kld: truncated: .* require 6095876 bytes, the file has 6095776"):
        LogitsFile(p)
    p.write_bytes(data[:15])
    with pytest.raises(ValueError, match=r"cut\.kld: truncated header"):
        LogitsFile(p)
    p.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"cut\.kld: truncated"):
        LogitsFile(p)
    p.write_bytes(data + b"\0\0")
    with pytest.raises(ValueError, match=r"2 unexpected trailing bytes"):
        LogitsFile(p)


def test_foreign_file(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(100))
    with pytest.raises(ValueError, match=r"model\.gguf: not a llama-perplexity base-logits file"):
        LogitsFile(p)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a llama-perplexity base-logits file"):
        LogitsFile(p)
    # a fork's _logits_v2 file: same first 8 bytes, "v2" where C would be
    p.write_bytes(b"_logits_v2" + bytes(200))
    with pytest.raises(ValueError, match=r"_logits_v2"):
        LogitsFile(p)
    # right magic, nonsense header values
    p.write_bytes(b"_logits_" + struct.pack("<iii", 64, -5, 2))
    with pytest.raises(ValueError, match=r"invalid header values"):
        LogitsFile(p)


def test_header_corpus_mismatch(shared_dir):
    corpus = np.load(TOKENS_NPY)
    with pytest.raises(ValueError, match=r"smollm2-base-c64x2\.kld: was written with n_ctx=64, expected n_ctx=512"):
        check_logits_file(KLD_FILE, n_ctx=512, tokens=corpus)
    other = corpus.copy()
    other[70] += 1
    with pytest.raises(ValueError, match=r"stream index 70 \(chunk 1, position 6\)"):
        check_logits_file(KLD_FILE, n_ctx=64, tokens=other)
    with pytest.raises(ValueError, match=r"holds 2 chunks of 64 = 128 tokens.*only 100"):
        check_logits_file(KLD_FILE, n_ctx=64, tokens=corpus[:100])
    with pytest.raises(ValueError, match=r"n_vocab=49152.*vocabulary is 32000"):
        check_logits_file(KLD_FILE, n_vocab=32000)


# --------------------------------------------------------------------------
# records no writer can produce, non-regular files (LogitsFileError)
# --------------------------------------------------------------------------


def _tiny_file(tmp_path, recs, name="tiny.kld"):
    """C = 6 (R = 2), V = 3, K = 1, as in test_decode_hand_computed."""
    raw = b"_logits_" + struct.pack("<iii", 6, 3, 1) + struct.pack("<6i", 0, 2, 1, 0, 1, 2)
    for scale, mlp, q in recs:
        raw += struct.pack("<ff", scale, mlp) + struct.pack("<4H", *q, 0)
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def test_error_class_is_named_and_a_value_error():
    from evalkit.errors import EvalkitError
    from evalkit.metrics import LogitsFileError
    assert issubclass(LogitsFileError, EvalkitError) and issubclass(LogitsFileError, ValueError)


@pytest.mark.parametrize("record, message", [
    ((float("nan"), -1.0, [0, 1, 2]), r"chunk 0, row 1 \(logits row 4 of the chunk\): scale nan is not"),
    ((-0.25, -1.0, [0, 1, 2]), r"chunk 0, row 1 .*: scale -0\.25 is not a finite number ≥ 0"),
    ((0.25, 0.5, [0, 1, 2]), r"chunk 0, row 1 .*: min_log_prob 0\.5 is not a finite number ≤ 0"),
    ((0.25, float("-inf"), [0, 1, 2]), r"chunk 0, row 1 .*: min_log_prob -inf is not"),
    # log-probabilities above 0: the file behind a KLD of 1e27 that exited 0
    ((0.01, -0.001, [0, 6000, 65535]), r"chunk 0, row 1 .*: decodes to log-probability 655\.349 > 0 at token 2"),
    ((0.25, -10.0, [0, 0, 1]),
     r"chunk 0, row 1 .*: its largest log-probability -9\.75 is below −ln\(n_vocab\) = -1\.09861"),
])
def test_impossible_records_are_refused(tmp_path, record, message):
    from evalkit.metrics import LogitsFileError
    p = _tiny_file(tmp_path, [(0.25, -10.0, [0, 8, 40]), record])
    with LogitsFile(p) as f:
        with pytest.raises(LogitsFileError, match=r"tiny\.kld: " + message):
            f.read_chunk(0)


def test_constant_row_record_is_valid(tmp_path):
    # scale 0 (all logits equal): every code 0, min_log_prob = −ln V, the uniform distribution
    lnv = float(np.float32(math.log(3)))
    p = _tiny_file(tmp_path, [(0.0, -lnv, [0, 0, 0]), (0.25, -10.0, [0, 8, 40])])
    with LogitsFile(p) as f:
        assert f.read_chunk(0).logprobs[0].tolist() == [-lnv] * 3


def test_encoder_output_always_passes_the_record_checks():
    # random, constant, near-uniform, peaked and tied rows, both clamps: decoded max in [−ln V, 0]
    from evalkit.metrics import decode_records
    rng = np.random.default_rng(3)
    for v in (1, 2, 7, 1000):
        for z in ((rng.standard_normal((4, v)) * 30).astype(np.float32), np.full((4, v), 7.5, np.float32),
                  (rng.uniform(-1, 1, (4, v)) * 1e-4).astype(np.float32),
                  rng.integers(-2, 2, (4, v)).astype(np.float32)):
            for clamp in (16.0, 24.0):
                rec = encode_records(z, clamp)
                top = decode_records(rec, v).max(1)
                assert (rec["scale"] >= 0).all() and (rec["min_log_prob"] <= 0).all()
                assert (top <= 1e-5).all() and (top >= -math.log(v) - 1e-5).all()


def test_non_regular_files_are_refused(tmp_path):
    import os

    from evalkit.metrics import LogitsFileError
    (tmp_path / "d.kld").mkdir()
    with pytest.raises(LogitsFileError, match=r"d\.kld: is a directory"):
        LogitsFile(tmp_path / "d.kld")
    os.mkfifo(tmp_path / "f.kld")  # no writer: opening must not block
    with pytest.raises(LogitsFileError, match=r"f\.kld: is a FIFO"):
        LogitsFile(tmp_path / "f.kld")
    with pytest.raises(FileNotFoundError):  # a missing file stays an OSError
        LogitsFile(tmp_path / "none.kld")


def test_absurd_header_is_refused_before_allocating(tmp_path):
    from evalkit.metrics import LogitsFileError
    p = tmp_path / "h.kld"
    p.write_bytes(b"_logits_" + struct.pack("<Iii", 2**31 - 1, 2**31 - 1, 2**31 - 1) + bytes(64))
    with pytest.raises(LogitsFileError, match=r"h\.kld: truncated: n_ctx=2147483647, n_vocab=2147483647, "
                                              r"n_chunks=2147483647 require \d+ bytes, the file has 84"):
        LogitsFile(p)
