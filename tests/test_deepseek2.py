"""deepseek2 (DeepSeek-V3 / Kimi-K2 style): MLA attention, YaRN rope, the block, against the reference.

The tiny model comes from ../shared/tools/make_moe_models.py (checked against the sha256 in
moe-reference.json); the attention is compared with an independent float64 computation
from the dequantized weights, the YaRN tables with ggml's own float32 recurrence, and the
whole model's perplexity with ik_llama.cpp's figures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import GOLDEN, SHARED
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.model.config import ModelConfig, UnsupportedModelError
from evalkit.model.mla import MLAttention
from evalkit.model.model import ModelTensorError, Workspace
from evalkit.model.qlinear import QLinear
from evalkit.model.yarn import corr_dims, deepseek2_kq_scale, yarn_angles_cos_sin
from evalkit.sources import GGUFSource

REF = json.loads((GOLDEN / "moe" / "moe-reference.json").read_text())["models"]["tiny-deepseek2"]


# --------------------------------------------------------------------------- the test model

@pytest.fixture(scope="module")
def tiny_deepseek2(moe_model) -> Path:
    """tiny-deepseek2.gguf, generated once per machine, sha256 checked (tests/moe_models.py)."""
    return moe_model("tiny-deepseek2")


def _rewrite(src: Path, out: Path, meta: dict | None = None, drop=lambda name: False) -> Path:
    """A copy of ``src`` with metadata keys changed (value None: removed) and some tensors dropped."""
    f = GGUFFile(src)
    md = {k: v for k, v in f.metadata.items() if k not in (meta or {})}
    md.update({k: v for k, v in (meta or {}).items() if v is not None})
    specs = [TensorSpec(t.name, t.shape, t.type_id) for t in f.tensors.values() if not drop(t.name)]
    write_gguf(out, md, specs, lambda s: f.tensor_bytes(s.name), f.metadata_types)
    return out


# --------------------------------------------------------------------------- config

def test_config_reads_mla_and_yarn(tiny_deepseek2):
    cfg = ModelConfig.from_gguf(tiny_deepseek2)
    hp = REF["hyperparameters"]
    assert (cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.v_head_dim, cfg.n_rot) == \
        (hp["n_head"], hp["n_head_kv"], hp["key_length"], hp["value_length"], hp["n_rot"])
    assert (cfg.q_lora_rank, cfg.kv_lora_rank) == (hp["q_lora_rank"], hp["kv_lora_rank"])
    assert cfg.head_dim - cfg.n_rot == hp["qk_nope_head_dim"] and cfg.rope_neox is False
    assert cfg.mla_forms == ("kv_b", "k_b")                     # the ik converter writes both
    rs = hp["rope_scaling"]
    y = cfg.rope_yarn
    assert (y.factor, y.n_ctx_orig, y.ext_factor, y.beta_fast, y.beta_slow) == \
        (rs["factor"], rs["original_context_length"], rs["ext_factor"], rs["beta_fast"], rs["beta_slow"])
    assert y.log_mul == pytest.approx(rs["yarn_log_multiplier"], rel=1e-7)
    assert cfg.rope_freq_scale == 1 / rs["factor"]


@pytest.mark.parametrize("meta, what", [
    ({"deepseek2.rope.scaling.type": "longrope"}, "'longrope' is not supported for deepseek2"),
    ({"deepseek2.attention.head_count_kv": 1}, "mainline MLA layout"),
])
def test_config_errors(tiny_deepseek2, tmp_path, meta, what):
    bad = _rewrite(tiny_deepseek2, tmp_path / "bad.gguf", meta)
    with pytest.raises(UnsupportedModelError, match=what):
        ModelConfig.from_gguf(bad)


def test_yarn_unsupported_for_a_dense_arch(tmp_path):
    """llama's block has no YaRN: a YaRN-scaled llama file is refused, naming the type."""
    bad = _rewrite(GOLDEN / "gguf" / "tiny-base.gguf", tmp_path / "yarn-llama.gguf",
                   {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="'yarn' is not supported for llama"):
        ModelConfig.from_gguf(bad)


def test_missing_mla_tensor_is_named(tiny_deepseek2, tmp_path):
    """Without attn_kv_b and without the attn_k_b/attn_v_b pair there is no way to get k_nope and V."""
    bad = _rewrite(tiny_deepseek2, tmp_path / "no-kvb.gguf",
                   drop=lambda n: n.endswith(("attn_kv_b.weight", "attn_k_b.weight")))
    with pytest.raises(UnsupportedModelError, match="'blk.0.attn_kv_b.weight' is missing"):
        ModelConfig.from_gguf(bad)


# --------------------------------------------------------------------------- YaRN

def _ggml_rope_cache(p: int, n_dims: int, base: float, freq_scale: float, ext_factor: float, attn_factor: float,
                     low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """ggml_rope_cache_init + rope_yarn for one position, step by step in float32 as ggml.c."""
    f = np.float32
    theta_scale = f(base) ** f(-2.0 / n_dims)
    theta, cos, sin = f(p), [], []
    for i0 in range(0, n_dims, 2):
        interp = f(freq_scale) * theta
        ramp = f(1) - min(f(1), max(f(0), f((i0 // 2 - f(low)) / max(f(0.001), f(high) - f(low)))))
        mix = f(ramp * f(ext_factor))
        th = f(interp * (f(1) - mix) + theta * mix)
        ms = f(attn_factor) * (f(1) + f(0.1) * np.log(f(1) / f(freq_scale), dtype=f)) if ext_factor else f(attn_factor)
        cos.append(f(np.cos(th, dtype=f) * ms))
        sin.append(f(np.sin(th, dtype=f) * ms))
        theta = f(theta * theta_scale)
    return np.array(cos), np.array(sin)


def test_yarn_corr_dims_match_the_formula():
    # n_dims * ln(n_ctx_orig / (2 pi beta)) / (2 ln base), floor / ceil, clamped
    for n_dims, ctx, base in [(64, 4096, 10000.0), (64, 4096, 50000.0), (128, 8192, 1e6)]:
        low = n_dims * math.log(ctx / (2 * math.pi * 32)) / (2 * math.log(base))
        high = n_dims * math.log(ctx / (2 * math.pi * 1)) / (2 * math.log(base))
        assert corr_dims(n_dims, ctx, base, 32.0, 1.0) == (max(0, math.floor(low)), min(n_dims - 1, math.ceil(high)))


@pytest.mark.parametrize("attn_factor, ext_factor", [(1 / (1 + 0.1 * math.log(40)), 1.0), (0.7, 1.0), (1.0, 0.0)])
def test_yarn_tables_match_ggml(attn_factor, ext_factor):
    """Our float64 angles agree with ggml's float32 recurrence to float32 rounding of theta."""
    n_dims, base, fs = 64, 10000.0, 1 / 40
    low, high = corr_dims(n_dims, 4096, base, 32.0, 1.0)
    from evalkit.model.yarn import rope_mscale
    cos, sin = yarn_angles_cos_sin(600, n_dims, base, fs, ext_factor, 4096, 32.0, 1.0,
                                   rope_mscale(attn_factor, fs, ext_factor))
    for p in (0, 1, 7, 255, 511, 599):
        c, s = _ggml_rope_cache(p, n_dims, base, fs, ext_factor, attn_factor, low, high)
        # theta accumulates ~p * 2^-24 relative error in ggml's float32 recurrence
        assert np.abs(cos[p] - c).max() < 1e-6 + p * 3e-7 and np.abs(sin[p] - s).max() < 1e-6 + p * 3e-7


def test_yarn_ramp_limits():
    """Pairs below the low correction dim extrapolate (unscaled), pairs above the high one interpolate."""
    n_dims, base, fs = 64, 10000.0, 1 / 40
    low, high = corr_dims(n_dims, 4096, base, 32.0, 1.0)
    cos, sin = yarn_angles_cos_sin(300, n_dims, base, fs, 1.0, 4096, 32.0, 1.0, 1.0)
    p = np.arange(300)[:, None]
    i = np.arange(n_dims // 2)[None, :]
    ang = np.angle(cos.astype(np.float64) + 1j * sin)
    want_fast = np.angle(np.exp(1j * p * base ** (-2.0 * i / n_dims)))
    want_slow = np.angle(np.exp(1j * p * fs * base ** (-2.0 * i / n_dims)))
    lo, hi = int(low), int(high)
    assert np.allclose(ang[:, :lo + 1], want_fast[:, :lo + 1], atol=2e-6)
    assert np.allclose(ang[:, hi:], want_slow[:, hi:], atol=2e-6)
    assert not np.allclose(ang[:, lo + 2:hi - 1], want_fast[:, lo + 2:hi - 1], atol=1e-3)


def test_kq_scale_is_mscale_squared(tiny_deepseek2):
    cfg = ModelConfig.from_gguf(tiny_deepseek2)
    mscale = 1 + 0.1 * math.log(40)                                 # yarn_log_multiplier 0.1, factor 40
    assert deepseek2_kq_scale(cfg.rope_yarn, cfg.head_dim) == pytest.approx(mscale ** 2 / math.sqrt(192), rel=1e-7)
    assert deepseek2_kq_scale(None, 192) == 1 / math.sqrt(192)


# --------------------------------------------------------------------------- MLA attention

def _layer(src: GGUFSource, il: int) -> dict:
    """Layer il's attention tensors as the model holds them (QLinear matrices, float32 norms)."""
    out = {}
    for t in src.tensors:
        p = f"blk.{il}."
        if not t.name.startswith(p) or "ffn" in t.name:
            continue
        name = t.name[len(p):]
        if name.endswith("norm.weight"):
            out[name] = torch.from_numpy(np.array(src.rows_f32(t.name), dtype=np.float32).reshape(-1))
        else:
            out[name[:-len(".weight")]] = QLinear(src.raw(t.name), t.type_name, t.n_per_row)
    return out


def _reference_mla(src: GGUFSource, cfg, il: int, h: np.ndarray) -> np.ndarray:
    """MLA in float64 from the dequantized weights (decompressed k/v), rope by ggml's recurrence."""
    W = lambda n: np.array(src.rows_f32(f"blk.{il}.{n}.weight"), dtype=np.float64)   # noqa: E731  (rows, ne0)
    rms = lambda v, w: v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_eps) * w.reshape(-1)  # noqa: E731
    T, H, R, L, Dv = h.shape[0], cfg.n_head, cfg.n_rot, cfg.kv_lora_rank, cfg.v_head_dim
    Dn = cfg.head_dim - R
    q = (rms(h @ W("attn_q_a").T, W("attn_q_a_norm")) @ W("attn_q_b").T).reshape(T, H, Dn + R)
    kv = h @ W("attn_kv_a_mqa").T
    lat, k_rope = rms(kv[:, :L], W("attn_kv_a_norm")), kv[:, L:]
    kvb = (lat @ W("attn_kv_b").T).reshape(T, H, Dn + Dv)
    low, high = corr_dims(R, 4096, cfg.rope_base, 32.0, 1.0)
    af = 1 / (1 + 0.1 * math.log(40))
    cs = [_ggml_rope_cache(p, R, cfg.rope_base, 1 / 40, 1.0, af, low, high) for p in range(T)]
    cos, sin = np.array([c for c, _ in cs], dtype=np.float64), np.array([s for _, s in cs], dtype=np.float64)

    def rope(x):                                                    # x (T, ..., R), adjacent pairs
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = cos.reshape(T, *([1] * (x.ndim - 2)), -1), sin.reshape(T, *([1] * (x.ndim - 2)), -1)
        return np.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape)

    q_rope, k_rope = rope(q[..., Dn:]), rope(k_rope)
    scale = (1 + 0.1 * math.log(40)) ** 2 / math.sqrt(Dn + R)
    s = (np.einsum("thd,shd->hts", q[..., :Dn], kvb[..., :Dn]) + np.einsum("thd,sd->hts", q_rope, k_rope)) * scale
    s[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", p, kvb[..., Dn:]).reshape(T, H * Dv)
    return o @ W("attn_output").T


@pytest.mark.parametrize("form", ["kv_b", "k_b"])
def test_mla_matches_float64_reference(tiny_deepseek2, form):
    src = GGUFSource(tiny_deepseek2)
    cfg = ModelConfig.from_gguf(src.file)
    h = np.random.default_rng(0).standard_normal((1, 40, cfg.n_embd)).astype(np.float32)
    for il in (0, 2):
        attn = MLAttention(cfg, _layer(src, il), form=form)
        got = attn(torch.from_numpy(h), Workspace()).numpy()[0]
        want = _reference_mla(src, cfg, il, h[0].astype(np.float64))
        assert np.abs(got - want).max() < 2e-5 * np.abs(want).max(), (form, il)


def test_mla_forms_agree_and_keep_from(tiny_deepseek2):
    """kv_b and k_b give the same output within float rounding; keep_from gives the later rows only."""
    src = GGUFSource(tiny_deepseek2)
    cfg = ModelConfig.from_gguf(src.file)
    t = _layer(src, 1)
    h = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 300, cfg.n_embd)).astype(np.float32))
    a = MLAttention(cfg, t, form="kv_b")
    y1 = a(h, Workspace()).clone()
    a.set_form("k_b")
    y2 = a(h, Workspace()).clone()
    assert (y1 - y2).abs().max() < 1e-5 * y1.abs().max()
    y_late = a(h, Workspace(), keep_from=150)                     # (other GEMM shapes: rounding only)
    assert y_late.shape == y2[:, 150:].shape and (y_late - y2[:, 150:]).abs().max() < 1e-6 * y2.abs().max()
    a.half_kv = True                                               # the reference's f16 cache: close, not equal
    y3 = a(h, Workspace())
    assert 0 < (y3 - y2).abs().max() < 1e-2 * y2.abs().max()


def test_mla_form_without_its_tensors(tiny_deepseek2):
    src = GGUFSource(tiny_deepseek2)
    cfg = ModelConfig.from_gguf(src.file)
    only_kvb = ModelConfig(**{**cfg.__dict__, "mla_forms": ("kv_b",)})
    with pytest.raises(ModelTensorError, match="MLA form 'k_b' needs tensors"):
        MLAttention(only_kvb, _layer(src, 0), form="k_b")


# --------------------------------------------------------------------------- the whole model

CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"


def _ppl_of(model, path: Path, n_chunks: int = 8) -> tuple[float, float, list[float]]:
    """llama-perplexity's PPL of an already built model (the loop of evalkit perplexity)."""
    from evalkit.corpus import load_corpus_text
    from evalkit.evaluation.corpus_chunks import chunk_corpus, tokenizer_for
    from evalkit.evaluation.forward import ModelForward
    from evalkit.metrics import PerplexityAccumulator, token_nll
    from evalkit.run_config import CorpusSpec
    tok = tokenizer_for(path)
    text, sha, desc = load_corpus_text(CorpusSpec(path=str(CORPUS)))
    cc = chunk_corpus(tok, tok.encode(text), sha, desc, 512, n_chunks)
    fwd, acc, running = ModelForward(model, cc.window), PerplexityAccumulator(), []
    for s in range(0, cc.n_chunks, 4):                        # 4 chunks per 2048-token batch, as the reference
        group = list(range(s, min(s + 4, cc.n_chunks)))
        rows = fwd(cc.chunks[group])
        for j, k in enumerate(group):
            running.append(acc.add(token_nll(rows[j], cc.targets(k), chunk=k, first_row=cc.window.first_row)))
    ppl, err = acc.final()
    return ppl, err, running


def test_tiny_deepseek2_perplexity_matches_reference(tiny_deepseek2):
    """`evalkit perplexity` over 8 chunks of 512: within 0.05% of ik_llama.cpp's PPL (default run:
    flash attention, -mla 3, which decompresses with attn_kv_b), its ± within 1%."""
    import io
    from evalkit.evaluation.perplexity import perplexity
    ref = REF["base_ppl"]["chunks8"]["default"]
    r = perplexity(str(tiny_deepseek2), str(CORPUS), ctx=512, chunks=8, threads=2, out=io.StringIO())
    ppl, err = r["ppl"]
    assert abs(ppl / ref["ppl"] - 1) < 5e-4, (ppl, ref["ppl"])
    assert abs(err / ref["ppl_err"] - 1) < 1e-2, (err, ref["ppl_err"])
    for got, want in zip(r["running_ppl"], ref["running"], strict=True):
        assert abs(got / want - 1) < 5e-4


@pytest.mark.parametrize("form, half_kv, ref_run", [("k_b", False, "ub8"), ("kv_b", True, "default"),
                                                    ("k_b", True, "fa_off")])
def test_tiny_deepseek2_mla_variants(tiny_deepseek2, form, half_kv, ref_run):
    """The absorbed form (what the reference computes for -ub 8 and without flash attention) and
    the fp16 cache switch agree with the reference's corresponding runs within 0.01% (4 chunks)."""
    from evalkit.model import Model
    from evalkit.model.deepseek2 import set_mla_options
    model = Model.from_gguf(tiny_deepseek2)
    set_mla_options(model, form=form, half_kv=half_kv)
    ppl, _, _ = _ppl_of(model, tiny_deepseek2, n_chunks=4)       # 4 chunks: the reference's running [4]
    want = REF["base_ppl"]["chunks8"][ref_run]["running"][3]
    assert abs(ppl / want - 1) < 1e-4, (ppl, want)


def test_tiny_deepseek2_forms_agree_on_logits(tiny_deepseek2):
    from evalkit.model import Model
    from evalkit.model.deepseek2 import set_mla_options
    model = Model.from_gguf(tiny_deepseek2)
    tokens = torch.arange(1, 97)
    a = model(tokens).clone()
    set_mla_options(model, form="k_b")
    b = model(tokens)
    assert (a - b).abs().max() < 1e-4 * a.abs().max()
    with pytest.raises(ValueError, match="no MLA attention"):
        set_mla_options(torch.nn.Linear(2, 2), half_kv=True)


@pytest.mark.parametrize("tensor", ["blk.2.attn_kv_a_mqa.weight", "blk.3.attn_kv_b.weight",
                                    "blk.1.attn_q_a_norm.weight"])
def test_missing_layer_tensor_is_named(tiny_deepseek2, tmp_path, tensor):
    from evalkit.model import Model
    bad = _rewrite(tiny_deepseek2, tmp_path / "missing.gguf", drop=lambda n: n == tensor)
    with pytest.raises(ModelTensorError, match=f"tensor '{tensor}' is missing"):
        Model.from_gguf(bad)
