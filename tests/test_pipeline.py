"""`evalkit run` end to end on the tiny golden model: outputs, schema, resume, base-logits files, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import GOLDEN, REPO, SHARED
from evalkit.run_config import config_from_dict
from evalkit.pipeline import RunError, run

TINY = GOLDEN / "gguf" / "tiny-base.gguf"
VARIANT_KEYS = {"bpw", "size_bytes", "ppl", "ppl_base", "mean_ln_ppl_ratio", "ppl_ratio", "ppl_diff", "kld_mean",
                "dp_mean", "dp_rms", "same_top_p", "cor_ln_ppl", "kld_max", "kld_p99_9", "kld_p99", "kld_p95",
                "kld_p90", "kld_median", "kld_p10", "kld_p5", "kld_p1", "kld_p0_1", "kld_min", "dp_percentiles",
                "tokens_per_s"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:12000])
    return p


def _cfg(tmp_path, corpus, **kw):
    # batch 128 = 2 chunks of 64 per forward call: the 3 chunks go as [0, 1], [2]
    d = {"name": "tiny", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 3, "threads": 2,
         "batch": 128, "output_dir": str(tmp_path / "results"),
         "variants": [{"name": "IQ4_K", "ftype": "IQ4_K"}, {"name": "Q8_0", "ftype": "Q8_0"}]}
    d.update(kw)
    return config_from_dict(d, "test", str(tmp_path))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("run")
    out = run(_cfg(tmp, corpus), progress=False)
    return tmp, out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_outputs_and_schema(tiny_run):
    _, out, res = tiny_run
    for f in ("results.json", "tokens.parquet", "summary.md", "chunks.npy", "kld_vs_bpw.png", "kld_vs_bpw.svg",
              "kld_cdf.png", "kld_cdf.svg", "dp_hist.png", "dp_hist.svg"):
        assert (out / f).is_file(), f
    for k in ("evalkit_version", "config", "corpus_sha256", "n_ctx", "n_chunks", "base", "variants"):
        assert k in res
    assert res["n_ctx"] == 64 and res["n_chunks"] == 3
    assert {"ppl", "n_tokens", "tokens_per_s"} <= set(res["base"])
    assert set(res["variants"]) == {"IQ4_K", "Q8_0"}
    for stats in res["variants"].values():
        assert VARIANT_KEYS <= set(stats)
        for k in ("ppl", "kld_mean", "same_top_p", "ppl_ratio", "dp_rms"):
            assert len(stats[k]) == 2
        assert 0.0 <= stats["same_top_p"][0] <= 1.0
    # more bits, less damage
    assert res["variants"]["Q8_0"]["kld_mean"][0] < res["variants"]["IQ4_K"]["kld_mean"][0]
    assert res["variants"]["Q8_0"]["bpw"] > res["variants"]["IQ4_K"]["bpw"]
    md = (out / "summary.md").read_text()
    assert "| IQ4_K |" in md and "same top p" in md


def test_tokens_parquet_matches_results(tiny_run):
    _, out, res = tiny_run
    df = pd.read_parquet(out / "tokens.parquet")
    assert {"variant", "chunk", "position", "token", "nll", "kld", "dp", "same_top"} <= set(df.columns)
    per = 64 - 1 - 32
    assert len(df) == 2 * 3 * per
    for name, g in df.groupby("variant", observed=True):
        st = res["variants"][name]
        assert np.isclose(g["kld"].astype(np.float64).mean(), st["kld_mean"][0], rtol=1e-5)
        assert np.isclose(g["same_top"].mean(), st["same_top_p"][0])
        assert np.isclose(np.exp(g["nll"].astype(np.float64).mean()), st["ppl"][0], rtol=1e-5)
    # the base's PPL from the same tokens
    base = df[df.variant == "IQ4_K"]
    assert np.isclose(np.exp(base["nll_base"].astype(np.float64).mean()), res["base"]["ppl"][0], rtol=1e-5)
    # targets are the stream tokens at the scored positions
    chunks = np.load(out / "chunks.npy")
    assert (chunks[base["chunk"], base["position"]] == base["token"]).all()


def test_base_ppl_equals_perplexity_command(tiny_run, corpus):
    from evalkit.evaluation.perplexity import perplexity
    import io
    _, _, res = tiny_run
    pp = perplexity(str(TINY), str(corpus), ctx=64, chunks=3, threads=2, out=io.StringIO())
    assert np.isclose(pp["ppl"][0], res["base"]["ppl"][0], rtol=1e-9)
    assert np.isclose(pp["ppl"][1], res["base"]["ppl"][1], rtol=1e-9)


def _stable(res):
    res = json.loads(json.dumps(res))
    res.pop("wall_time_s")
    res["base"].pop("tokens_per_s")
    for v in res["variants"].values():
        v.pop("tokens_per_s")
    return res


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(tmp_path, corpus, tiny_run, monkeypatch):
    import evalkit.evaluation.forward as pl
    cfg = _cfg(tmp_path, corpus)
    real = pl.model_logits
    calls = {"n": 0}

    def dying(model, chunk, start=0, buffer=None):
        calls["n"] += 1
        if calls["n"] == 4:  # the second group's base pass: chunks 0 and 1 are finished
            raise KeyboardInterrupt("killed")
        return real(model, chunk, start, buffer)

    monkeypatch.setattr(pl, "model_logits", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False)
    out = tmp_path / "results" / "tiny"
    assert not (out / "results.json").exists()
    assert sorted(p.name for p in (out / "partial").glob("chunk_*.npz")) == ["chunk_00000.npz", "chunk_00001.npz"]
    monkeypatch.setattr(pl, "model_logits", real)
    counted = {"n": 0}

    def counting(model, chunk, start=0, buffer=None):
        counted["n"] += 1
        return real(model, chunk, start, buffer)

    monkeypatch.setattr(pl, "model_logits", counting)
    run(cfg, progress=False)
    assert counted["n"] == 3  # only the last chunk was evaluated again (base + 2 variants)
    resumed = json.loads((out / "results.json").read_text())
    reference = tiny_run[2]
    a, b = _stable(resumed), _stable(reference)
    for d in (a, b):
        d["config"].pop("output_dir")
        for v in d["variants"].values():
            v.pop("model")
    assert a == b


@pytest.mark.slow
def test_base_logits_file_round_trip(tmp_path, corpus):
    blf = tmp_path / "base.kld"
    cfg = _cfg(tmp_path, corpus, name="writer", chunks=2, write_base_logits=str(blf), variants=[])
    run(cfg, progress=False)
    assert blf.is_file()
    from evalkit.metrics.logits_file import LogitsFile
    with LogitsFile(blf) as f:
        assert (f.n_ctx, f.n_chunks, f.n_vocab) == (64, 2, 49152)
    cfg2 = _cfg(tmp_path, corpus, name="reader", chunks=2, base_logits=str(blf),
                variants=[{"name": "self", "gguf": str(TINY)}])
    res = json.loads((run(cfg2, progress=False) / "results.json").read_text())
    st = res["variants"]["self"]
    # the same model against its own quantized base logits: only the file's rounding remains
    assert st["kld_mean"][0] < 1e-6 and st["same_top_p"][0] == 1.0
    assert abs(res["base"]["ppl"][0] / st["ppl"][0] - 1) < 1e-4


@pytest.mark.slow
def test_reference_base_logits_file_smollm2(tmp_path):
    """The reference's own file: SmolLM2 base, 2 chunks of 64; our forward of the same weights matches it."""
    from evalkit.sources import smollm2_path
    cfg = config_from_dict({
        "name": "golden-kld", "base": "smollm2", "corpus": str(SHARED / "data" / "wikitext-2-raw-test.txt"),
        "ctx": 64, "threads": 2, "output_dir": str(tmp_path / "results"),
        "base_logits": str(GOLDEN / "kld" / "smollm2-base-c64x2.kld"),
        "variants": [{"name": "base-again", "gguf": str(smollm2_path())}]}, "test", str(tmp_path))
    res = json.loads((run(cfg, progress=False) / "results.json").read_text())
    assert res["n_chunks"] == 2 and res["base"]["n_tokens"] == 62
    # decoded base PPL: the reference printed 29.1867 +/- 12.07752 from its unrounded NLLs;
    # the file's 16-bit records carry each NLL to within 24/65535/2 nats (see test_logits_file)
    assert abs(res["base"]["ppl"][0] / 29.1867 - 1) < 5e-5
    assert abs(res["base"]["ppl"][1] / 12.07752 - 1) < 5e-5
    st = res["variants"]["base-again"]
    assert st["kld_mean"][0] < 1e-4
    assert st["same_top_p"][0] == 1.0


# ------------------------------------------------------------------------------- bad input

def test_corpus_shorter_than_two_chunks(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    with pytest.raises(RunError, match=r"need at least 2\*n_ctx = 128 tokens"):
        run(_cfg(tmp_path, short), progress=False)
    assert not list((tmp_path / "results").rglob("results.json"))


def test_missing_variant_file(tmp_path, corpus):
    with pytest.raises(RunError, match="not found"):
        run(_cfg(tmp_path, corpus, variants=[{"name": "x", "gguf": str(tmp_path / "none.gguf")}]), progress=False)


def test_missing_corpus(tmp_path):
    with pytest.raises(RunError, match="corpus file .* not found"):
        run(_cfg(tmp_path, tmp_path / "nothing.txt"), progress=False)


def test_variant_with_different_vocabulary(tmp_path, corpus):
    from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
    src = GGUFFile(TINY)
    meta = dict(src.metadata)
    toks = list(meta["tokenizer.ggml.tokens"])
    toks[1000] = "a-different-token"
    meta["tokenizer.ggml.tokens"] = toks
    other = tmp_path / "other-vocab.gguf"
    write_gguf(other, meta, [TensorSpec(t.name, t.shape, t.type_id) for t in src.tensors.values()],
               lambda s: src.tensor_bytes(s.name), src.metadata_types)
    with pytest.raises(RunError, match="vocabulary differs from the base's at token id 1000"):
        run(_cfg(tmp_path, corpus, variants=[{"name": "other", "gguf": str(other)}]), progress=False)


@pytest.mark.slow
def test_nan_logits_name_chunk_and_position(tmp_path, corpus, monkeypatch):
    import evalkit.evaluation.forward as pl
    real = pl.model_logits
    calls = {"n": 0}

    def poisoned(model, chunk, start=0, buffer=None):
        z = real(model, chunk, start, buffer)   # (chunks, positions start..C-1, V)
        calls["n"] += 1
        if calls["n"] == 2:  # the first variant on the first group [0, 1]: chunk 1
            z[1, 40 - start, 7] = np.nan
        return z

    monkeypatch.setattr(pl, "model_logits", poisoned)
    with pytest.raises(RunError, match=r"variant 'IQ4_K'.*chunk 1.*position 40"):
        run(_cfg(tmp_path, corpus), progress=False)
    assert not (tmp_path / "results" / "tiny" / "results.json").exists()


def test_base_logits_header_mismatch(tmp_path, corpus):
    blf = tmp_path / "base.kld"
    run(_cfg(tmp_path, corpus, name="w", chunks=2, write_base_logits=str(blf), variants=[]), progress=False)
    with pytest.raises(RunError, match="n_ctx"):
        run(_cfg(tmp_path, corpus, name="r", ctx=32, base_logits=str(blf),
                 variants=[{"name": "self", "gguf": str(TINY)}]), progress=False)
    other = tmp_path / "other.txt"
    other.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[50000:62000])
    with pytest.raises(RunError, match="token"):
        run(_cfg(tmp_path, other, name="r2", base_logits=str(blf),
                 variants=[{"name": "self", "gguf": str(TINY)}]), progress=False)


@pytest.mark.slow
def test_cli_run_then_check(tmp_path, corpus):
    """The project's own CI sweep: `evalkit run` then `evalkit check` (strict thresholds fail, sane ones pass)."""
    cfg = {"name": "ci-sweep", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 2, "threads": 2,
           "output_dir": str(tmp_path / "results"), "variants": [{"name": "IQ6_K", "ftype": "IQ6_K"}]}
    cp = tmp_path / "c.yaml"
    cp.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "evalkit", "run", str(cp), "--no-progress"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    res = tmp_path / "results" / "ci-sweep" / "results.json"
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"variants": {"IQ6_K": {"kld_mean": 0.01, "same_top_p_min": 0.5}}}))
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump({"variants": {"IQ6_K": {"kld_mean": 1e-9}}}))
    check = [sys.executable, "-m", "evalkit", "check", str(res), "--thresholds"]
    assert subprocess.run(check + [str(ok)], capture_output=True, cwd=REPO).returncode == 0
    assert subprocess.run(check + [str(strict)], capture_output=True, cwd=REPO).returncode == 1
    bad = subprocess.run([sys.executable, "-m", "evalkit", "run", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "cannot read config" in bad.stderr


@pytest.mark.slow
def test_reference_kt_mix_file_evaluates_against_tiny_base(tmp_path, corpus):
    """A GGUF written by ik_llama.cpp with every KT type, IQ2_KL, IQ4_KSS, Q6_0, IQ4_NL runs through `evalkit run`."""
    kt = GOLDEN / "gguf" / "tiny-kt-mix-imatrix.gguf"
    iqk = GOLDEN / "gguf" / "tiny-iqk-mix.gguf"
    res = json.loads((run(_cfg(tmp_path, corpus, chunks=2, variants=[
        {"name": "kt", "gguf": str(kt)}, {"name": "iqk", "gguf": str(iqk)}]), progress=False)
        / "results.json").read_text())
    for name in ("kt", "iqk"):
        st = res["variants"][name]
        assert np.isfinite(st["kld_mean"][0]) and 0 < st["kld_mean"][0] < 0.1
        assert st["bpw"] < res["base"]["bpw"]


@pytest.mark.slow
def test_chunks_per_call_do_not_change_the_statistics(tmp_path, corpus):
    # one chunk per forward call vs all three in one call: same numbers to float32 rounding
    res = {}
    for batch in (64, 192):
        out = run(_cfg(tmp_path, corpus, name=f"b{batch}", batch=batch, variants=[{"name": "Q8_0", "ftype": "Q8_0"}]),
                  progress=False)
        res[batch] = json.loads((out / "results.json").read_text())
    a, b = res[64], res[192]
    np.testing.assert_allclose(a["base"]["running_ppl"], b["base"]["running_ppl"], rtol=1e-6)
    for key in ("kld_mean", "ppl"):
        np.testing.assert_allclose(np.asarray(a["variants"]["Q8_0"][key], float),
                                   np.asarray(b["variants"]["Q8_0"][key], float), rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ device, fingerprint, leftovers

def test_run_from_python_honours_the_config_device_and_fingerprints_it(tmp_path, corpus, monkeypatch):
    import evalkit.evaluation.forward as fw
    real, devices = fw.load_model, []

    def recording(path, device="cpu"):
        devices.append(device)
        return real(path, device)
    monkeypatch.setattr(fw, "load_model", recording)
    state = tmp_path / "results" / "tiny" / "partial" / "state.json"
    run(_cfg(tmp_path, corpus, chunks=2, variants=[]), progress=False)
    on_cpu = json.loads(state.read_text())["fingerprint"]
    run(_cfg(tmp_path, corpus, chunks=2, variants=[], device="cpu-torch"), progress=False)
    # the device reached the forward pass, and the chunks of the CPU run were not reused
    assert devices == ["cpu", "cpu-torch"]
    assert json.loads(state.read_text())["fingerprint"] != on_cpu


def test_an_unavailable_device_fails_before_anything_runs(tmp_path, corpus):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    from evalkit.devices import DeviceError
    with pytest.raises(DeviceError):
        run(_cfg(tmp_path, corpus, device="cuda"), progress=False)
    assert not (tmp_path / "results" / "tiny" / "models").exists()


def test_leftover_temporaries_of_the_imatrix_folder_are_removed(tmp_path, corpus):
    # <out>/imatrix/ holds the imatrices a run computes for its variants, written through temporaries
    junk = tmp_path / "results" / "tiny" / "imatrix" / ".IQ4_K.dat.abc123.tmp"
    junk.parent.mkdir(parents=True)
    junk.write_text("junk")
    keep = junk.parent / "IQ4_K.dat"
    keep.write_text("a finished imatrix stays")
    run(_cfg(tmp_path, corpus, chunks=2, variants=[]), progress=False)
    assert not junk.exists() and keep.is_file()
