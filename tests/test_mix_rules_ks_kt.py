"""llama-quantize's mix rules for the KS/KL/KT ftypes and IQ3_KL, and the KT imatrix requirement.

The expected types are worked out here by hand from ik_llama.cpp's ``llama_tensor_get_type``
(the version whose 256-fallbacks match spec section 15 and whose imatrix check refuses
IQ1_KT/IQ2_KT, spec 14.3), independently of evalkit/recipes/rules.py. Running counters
follow the file order: SmolLM2's tensors are sorted by name, so its third ffn_down is blk.10's.
"""
from __future__ import annotations

import pytest

from conftest import GOLDEN
from evalkit.formats import get_format
from evalkit.gguf import GGUFFile
from evalkit.recipes import TypeOptions, quantize_model
from evalkit.recipes.rules import ModelFacts, RuleError, fallback_type, tensor_type

GGUF_DIR = GOLDEN / "gguf"
TINY = GGUF_DIR / "tiny-base.gguf"
TINY_IM = GGUF_DIR / "tiny-base.imatrix"
SMOL_IM = GGUF_DIR / "smollm2-calib.imatrix"
NEW = ["IQ2_KS", "IQ3_KS", "IQ4_KS", "IQ4_KSS", "IQ5_KS", "IQ2_KL", "IQ3_KL",
       "IQ1_KT", "IQ2_KT", "IQ3_KT", "IQ4_KT"]


def _facts(**kw) -> ModelFacts:
    """A synthetic Llama: 32 layers, n_gqa 4, no experts, own output.weight, 32k vocab."""
    base = dict(arch="llama", n_layer=32, n_head=32, n_head_kv=8, n_expert=0, n_vocab=32000, n_embd=4096,
                has_output=True, n_attention_wv=32, size_label=None)
    base.update(kw)
    return ModelFacts(**base)


def _smollm2():
    try:
        from evalkit.sources import smollm2_path
        return smollm2_path()
    except Exception as e:     # package missing: nothing to check
        pytest.skip(f"SmolLM2 not available: {e}")


# (elements per block, bytes per block, row-header bytes), from spec section 1 and ggml
GEOM = {"F32": (1, 4, 0), "Q8_0": (32, 34, 0), "Q6_0": (32, 26, 0), "Q5_0": (32, 22, 0),
        "IQ4_NL": (32, 18, 0), "Q2_K": (256, 84, 0), "Q5_K": (256, 176, 0), "Q6_K": (256, 210, 0),
        "IQ3_K": (256, 110, 0), "IQ4_K": (256, 144, 0), "IQ5_K": (256, 176, 0),
        "IQ2_KS": (256, 70, 2), "IQ3_KS": (256, 102, 2), "IQ2_KL": (256, 86, 2),
        "IQ4_KS": (256, 136, 4), "IQ4_KSS": (256, 128, 4), "IQ5_KS": (256, 168, 4),
        "IQ1_KT": (256, 56, 4), "IQ2_KT": (256, 68, 4), "IQ3_KT": (256, 100, 4), "IQ4_KT": (256, 128, 4)}

# change_type_if_necessary for rows not divisible by 256 (spec 15 rule 9 and its KS/KT entries)
FALLBACK = {**dict.fromkeys(["Q2_K", "IQ3_K", "IQ2_KS", "IQ3_KS", "IQ2_KL", "IQ4_KS", "IQ4_KSS",
                             "IQ1_KT", "IQ2_KT", "IQ3_KT", "IQ4_KT"], "IQ4_NL"),
            "IQ4_K": "Q5_0", "IQ5_KS": "Q5_0", "IQ5_K": "Q6_0"}


def _more(k: int, n: int) -> bool:
    # llama-quantize's use_more_bits
    return k < n // 8 or k >= 7 * n // 8 or (k - n // 8) % 3 == 2


def _layer_type(ft: str, cls: str, k: int, n_layer: int, gqa: int, imatrix: bool) -> str:
    """The type of a layer tensor of class ``cls`` (k = its running count) before any fallback."""
    low = k < n_layer // 8
    more = _more(k, n_layer)
    if ft == "IQ2_KS":
        return {"attn_v": "IQ3_K" if gqa >= 2 else "Q2_K",
                "ffn_down": "Q2_K" if low else ft}.get(cls, ft)
    if ft == "IQ2_KT":
        return {"attn_v": "IQ3_K" if gqa >= 2 else "Q2_K", "attn_output": "IQ3_K",
                "ffn_down": "IQ3_K" if low else ft}.get(cls, ft)
    if ft in ("IQ3_KS", "IQ2_KL"):
        return "IQ4_KS" if cls == "attn_v" and gqa >= 2 else ft
    if ft in ("IQ4_KS", "IQ4_KSS"):
        if cls == "attn_v" and gqa >= 2:
            return "IQ5_K"
        return "Q5_K" if cls == "ffn_down" and low and not imatrix else ft
    if ft == "IQ3_KL":
        if cls == "attn_v":
            return "IQ5_K" if gqa >= 2 else "IQ4_K"
        if cls == "attn_output":
            return "IQ4_KS"
        if cls in ("ffn_down", "ffn_gate", "ffn_up"):
            return "IQ4_KS" if more else "IQ3_K"
        return "IQ3_K"
    if ft == "IQ3_KT":
        if cls == "attn_v":
            return "IQ4_K" if gqa >= 4 else "IQ3_K"
        if cls == "ffn_down" and not imatrix:
            return "IQ4_K" if low else "IQ3_K"
        return ft
    if ft == "IQ4_KT":
        return ("IQ5_K" if gqa >= 4 else "IQ4_K") if cls == "attn_v" else ft
    return ft   # IQ1_KT, IQ5_KS: the default everywhere (no n_gqa bump applies to them)


def _expected_plan(path, ft: str, tied: bool, gqa: int, imatrix: bool,
                   token_embd: str | None = None) -> dict[str, tuple[str, bool, int]]:
    """{tensor: (type, requantized, bytes)} for the whole file, by the rules above."""
    out = {}
    with GGUFFile(path) as f:
        n_layer = int(f.metadata["llama.block_count"])
        seen: dict[str, int] = {}
        for name, info in f.tensors.items():
            ne0 = info.shape[0]
            if len(info.shape) < 2:
                out[name] = (info.type_name, False, info.nbytes)
                continue
            if name == "output.weight" or (tied and name == "token_embd.weight"):
                if ne0 % 256:
                    t = "Q8_0"
                elif ft in ("IQ2_KS", "IQ3_KS", "IQ2_KL", "IQ1_KT", "IQ2_KT", "IQ3_KT"):
                    t = "IQ4_K" if tied else "Q5_K"
                elif ft in ("IQ3_KL", "IQ4_KS", "IQ4_KSS") and tied:
                    t = "IQ5_K"
                else:
                    t = "Q6_K"
            elif name == "token_embd.weight":
                t = token_embd or {"IQ3_KL": "IQ3_K", "IQ3_KT": "IQ3_S"}.get(ft, ft)
            else:
                cls = name.split(".")[2]
                k = seen.get(cls, 0)
                seen[cls] = k + 1
                t = _layer_type(ft, cls, k, n_layer, gqa, imatrix)
            if ne0 % 256:
                t = FALLBACK.get(t, t)
            n, b, h = GEOM[t]
            nbytes = info.nbytes if t == info.type_name else info.n_elements // ne0 * (h + ne0 // n * b)
            out[name] = (t, t != info.type_name, nbytes)
    return out


def _check(plan, want):
    assert [t.name for t in plan.tensors] == list(want)
    for tp in plan.tensors:
        assert (tp.dst_type, tp.quantize, tp.dst_bytes) == want[tp.name], (tp.name, tp.reason)


# -- whole-model dry-run plans -------------------------------------------------------------------

@pytest.mark.parametrize("ft", NEW)
def test_smollm2_plans(ft):
    """SmolLM2 (30 layers, 576 wide, n_gqa 3, tied): every tensor's type, action and size."""
    path = _smollm2()
    im = SMOL_IM if ft in ("IQ1_KT", "IQ2_KT") else None
    plan = quantize_model(path, None, ft, imatrix=im, dry_run=True)
    assert (plan.model.n_layer, plan.model.n_gqa, plan.model.has_output) == (30, 3, False)
    _check(plan, _expected_plan(path, ft, tied=True, gqa=3, imatrix=im is not None))
    assert plan.metadata["general.file_type"] == plan.ftype.id
    if im is not None:
        assert all(t.imatrix_name for t in plan.tensors if t.quantize)


@pytest.mark.parametrize("ft", ["IQ4_KS", "IQ3_KT"])
def test_smollm2_plans_with_imatrix(ft):
    """An imatrix switches off the no-imatrix ffn_down bumps (IQ4_KS: Q5_K; IQ3_KT: IQ4_K/IQ3_K)."""
    path = _smollm2()
    plan = quantize_model(path, None, ft, imatrix=SMOL_IM, dry_run=True)
    _check(plan, _expected_plan(path, ft, tied=True, gqa=3, imatrix=True))
    assert {t.dst_type for t in plan.tensors if "ffn_down" in t.name} == {ft}


def test_smollm2_counters_follow_file_order():
    """The 'first n_layer/8 layers' are the first three ffn_down in the file: blk.0, blk.1, blk.10."""
    path = _smollm2()
    types = quantize_model(path, None, "IQ2_KS", dry_run=True).types()
    assert sorted(n for n, t in types.items() if t == "Q2_K") == [
        "blk.0.ffn_down.weight", "blk.1.ffn_down.weight", "blk.10.ffn_down.weight"]
    types = quantize_model(path, None, "IQ3_KL", dry_run=True).types()
    # use_more_bits(k, 30): k < 3, k >= 26, (k - 3) % 3 == 2 -> file positions of blk.N
    order = [f"blk.{i}.ffn_down.weight" for i in sorted(range(30), key=str)]
    assert [types[n] for n in order] == ["IQ4_KS" if _more(k, 30) else "IQ3_K" for k in range(30)]


@pytest.mark.parametrize("ft", [f for f in NEW if f != "IQ3_KT"])
def test_tiny_plans(ft):
    """tiny-base (2 layers, 256 wide, n_gqa 2, own output.weight): no fallbacks anywhere."""
    im = TINY_IM if ft in ("IQ1_KT", "IQ2_KT") else None
    plan = quantize_model(TINY, None, ft, imatrix=im, dry_run=True)
    assert (plan.model.n_layer, plan.model.n_gqa, plan.model.has_output) == (2, 2, True)
    _check(plan, _expected_plan(TINY, ft, tied=False, gqa=2, imatrix=im is not None))


def test_tiny_iq3_kt_token_embd_is_iq3_s():
    """IQ3_KT puts a 256-divisible token_embd in IQ3_S, which evalkit lacks: a clear error,
    and the rest of the mix once the user picks the embedding's type."""
    with pytest.raises(NotImplementedError, match=r"token_embd\.weight.*IQ3_S.*--token-embedding-type"):
        quantize_model(TINY, None, "IQ3_KT", dry_run=True)
    for im in (None, TINY_IM):
        plan = quantize_model(TINY, None, "IQ3_KT", imatrix=im, options=TypeOptions(token_embedding_type="q8_0"),
                              dry_run=True)
        _check(plan, _expected_plan(TINY, "IQ3_KT", tied=False, gqa=2, imatrix=im is not None,
                                    token_embd="Q8_0"))
    ov = quantize_model(TINY, None, "IQ3_KT", options=TypeOptions(overrides=["token_embd=iq4_nl"]), dry_run=True)
    assert ov.tensor("token_embd.weight").dst_type == "IQ4_NL"


@pytest.mark.slow
def test_tiny_quantize_end_to_end(tmp_path):
    """The written files carry the planned types (IQ2_KT with imatrix, IQ3_KL without)."""
    for ft, kw in (("IQ2_KT", {"imatrix": TINY_IM, "options": TypeOptions(token_embedding_type="q8_0")}),
                   ("IQ3_KL", {})):
        plan = quantize_model(TINY, None, ft, dry_run=True, **kw)
        if any(not get_format(t.dst_type).can_quantize for t in plan.tensors if t.quantize):
            pytest.skip("kernels for these types are not built")
        out = tmp_path / f"{ft}.gguf"
        quantize_model(TINY, out, ft, threads=2, progress=False, **kw)
        with GGUFFile(out) as g:
            assert {n: t.type_name for n, t in g.tensors.items()} == plan.types()
            assert g.metadata["general.file_type"] == plan.ftype.id


# -- imatrix requirement --------------------------------------------------------------------------

@pytest.mark.parametrize("ft", ["IQ1_KT", "IQ2_KT"])
def test_kt_needs_imatrix(ft, tmp_path):
    """Without an imatrix the first IQ1_KT/IQ2_KT layer tensor stops the run before any output."""
    out = tmp_path / "x.gguf"
    # tiny: token_embd (IQ1_KT/IQ2_KT, exempt) and output (Q5_K) come first
    with pytest.raises(RuleError, match=rf"'blk\.0\.attn_q\.weight'.*{ft}.*importance matrix"):
        quantize_model(TINY, out, ft, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
    # SmolLM2: everything 576 wide falls back to IQ4_NL; the 1536-wide ffn_down stay KT,
    # except IQ2_KT's first three (IQ3_K)
    first = {"IQ1_KT": "blk.0.ffn_down.weight", "IQ2_KT": "blk.11.ffn_down.weight"}[ft]
    with pytest.raises(RuleError, match=rf"'{first}'.*{ft}"):
        quantize_model(_smollm2(), None, ft, dry_run=True)


def test_kt_imatrix_exemptions():
    """token_embd and output may be IQ1_KT/IQ2_KT without an imatrix; any other tensor may not."""
    plan = quantize_model(TINY, None, "IQ4_K", dry_run=True,
                          options=TypeOptions(token_embedding_type="iq1_kt", output_tensor_type="iq2_kt"))
    assert plan.tensor("token_embd.weight").dst_type == "IQ1_KT"
    assert plan.tensor("output.weight").dst_type == "IQ2_KT"
    with pytest.raises(RuleError, match=r"'blk\.0\.attn_q\.weight'.*IQ2_KT"):
        quantize_model(TINY, None, "IQ4_K", options=TypeOptions(attn_q_type="iq2_kt"), dry_run=True)
    with pytest.raises(RuleError, match=r"'blk\.1\.ffn_up\.weight'.*IQ1_KT"):
        quantize_model(TINY, None, "IQ4_K", options=TypeOptions(overrides=[r"blk\.1\.ffn_up=iq1_kt"]), dry_run=True)
    # IQ3_KT/IQ4_KT need none
    quantize_model(TINY, None, "IQ4_KT", dry_run=True)


def test_iq2_kt_with_calibration_imatrix():
    """With smollm2-calib.imatrix the IQ2_KT plan works and every quantized tensor uses it."""
    plan = quantize_model(_smollm2(), None, "IQ2_KT", imatrix=SMOL_IM, dry_run=True)
    kt = [t for t in plan.tensors if t.dst_type == "IQ2_KT"]
    assert len(kt) == 27 and all(t.imatrix_name == t.name for t in kt)
    assert plan.metadata["quantize.imatrix.entries_count"] > 0 and not plan.warnings


# -- single rules on synthetic models -------------------------------------------------------------

W = (4096, 4096)
# (ftype, tensor, model facts, expected); default facts: 32 layers, n_gqa 4, own output, 32k vocab
CASES = [
    # output.weight / tied token_embd
    ("IQ2_KS", "output.weight", {}, "Q5_K"),
    ("IQ2_KS", "token_embd.weight", {"has_output": False}, "IQ4_K"),
    ("IQ1_KT", "output.weight", {}, "Q5_K"),
    ("IQ3_KT", "token_embd.weight", {"has_output": False}, "IQ4_K"),
    ("IQ4_KS", "output.weight", {}, "Q6_K"),
    ("IQ4_KSS", "token_embd.weight", {"has_output": False}, "IQ5_K"),
    ("IQ3_KL", "token_embd.weight", {"has_output": False}, "IQ5_K"),
    ("IQ3_KL", "output.weight", {}, "Q6_K"),
    ("IQ5_KS", "token_embd.weight", {"has_output": False}, "Q6_K"),
    ("IQ4_KT", "token_embd.weight", {"has_output": False}, "Q6_K"),
    ("IQ2_KT", "output.weight", {"arch": "falcon"}, "Q8_0"),
    # token_embd with an own output.weight
    ("IQ2_KS", "token_embd.weight", {}, "IQ2_KS"),
    ("IQ3_KL", "token_embd.weight", {}, "IQ3_K"),
    ("IQ4_KT", "token_embd.weight", {}, "IQ4_KT"),
    # attn_v
    ("IQ2_KS", "blk.0.attn_v.weight", {}, "IQ4_K"),
    ("IQ2_KS", "blk.0.attn_v.weight", {"n_head_kv": 32}, "Q2_K"),
    ("IQ2_KS", "blk.0.attn_v.weight", {"n_head_kv": 32, "n_expert": 2}, "IQ3_K"),
    ("IQ2_KT", "blk.0.attn_v.weight", {}, "IQ4_K"),
    ("IQ2_KT", "blk.0.attn_v.weight", {"n_head_kv": 32}, "Q2_K"),
    ("IQ2_KT", "blk.0.attn_v.weight", {"n_head_kv": 32, "n_expert": 4}, "IQ4_K"),
    ("IQ3_KS", "blk.0.attn_v.weight", {"n_head_kv": 32}, "IQ3_KS"),
    ("IQ2_KL", "blk.0.attn_v.weight", {}, "IQ4_KS"),
    ("IQ4_KS", "blk.0.attn_v.weight", {"n_head_kv": 32}, "IQ4_KS"),
    ("IQ4_KSS", "blk.0.attn_v.weight", {"n_expert": 8}, "Q8_0"),
    ("IQ5_KS", "blk.0.attn_v.weight", {}, "IQ5_KS"),                      # no n_gqa bump
    ("IQ5_KS", "blk.0.attn_v.weight", {"size_label": "8B", "n_vocab": 128256}, "IQ6_K"),
    ("IQ5_KS", "blk.0.attn_v.weight", {"size_label": "70B", "n_vocab": 128256}, "IQ5_KS"),  # 70B first
    ("IQ3_KL", "blk.0.attn_v.weight", {"n_head_kv": 32}, "IQ4_K"),
    ("IQ3_KL", "blk.0.attn_v.weight", {"size_label": "70B", "n_head_kv": 32}, "IQ5_K"),
    ("IQ3_KT", "blk.0.attn_v.weight", {}, "IQ4_K"),
    ("IQ3_KT", "blk.0.attn_v.weight", {"n_head_kv": 32}, "IQ3_K"),
    ("IQ4_KT", "blk.0.attn_v.weight", {}, "IQ5_K"),
    ("IQ4_KT", "blk.0.attn_v.weight", {"size_label": "70B"}, "IQ4_KT"),
    ("IQ1_KT", "blk.0.attn_v.weight", {"n_head_kv": 4}, "IQ1_KT"),        # n_gqa 8: not in the bump list
    # attn_k / attn_q / attn_qkv
    ("IQ2_KS", "blk.0.attn_k.weight", {"n_expert": 8}, "Q4_K"),
    ("IQ2_KS", "blk.0.attn_k.weight", {"n_expert": 4}, "IQ2_KS"),
    ("IQ2_KS", "blk.0.attn_q.weight", {"n_expert": 8}, "Q4_K"),
    ("IQ2_KS", "blk.0.attn_qkv.weight", {}, "IQ2_K"),
    ("IQ2_KT", "blk.0.attn_qkv.weight", {}, "IQ3_K"),
    ("IQ2_KT", "blk.0.attn_kv_b.weight", {"n_expert": 8}, "Q4_K"),
    ("IQ4_KS", "blk.0.attn_k.weight", {"n_expert": 4}, "Q8_0"),
    ("IQ5_KS", "blk.0.attn_q.weight", {"size_label": "8B", "n_vocab": 128256}, "IQ4_KS"),
    ("IQ4_KS", "blk.0.attn_qkv.weight", {}, "IQ4_KS"),
    # attn_output
    ("IQ2_KS", "blk.0.attn_output.weight", {}, "IQ2_KS"),
    ("IQ2_KS", "blk.0.attn_output.weight", {"n_expert": 4}, "Q5_K"),
    ("IQ2_KT", "blk.0.attn_output.weight", {"n_head_kv": 32}, "IQ3_K"),
    ("IQ2_KT", "blk.0.attn_output.weight", {"n_expert": 4}, "Q5_K"),
    ("IQ2_KL", "blk.0.attn_output.weight", {"n_expert": 8}, "IQ4_KS"),
    ("IQ2_KL", "blk.0.attn_output.weight", {}, "IQ2_KL"),
    ("IQ3_KS", "blk.0.attn_output.weight", {"n_expert": 8}, "Q5_K"),
    ("IQ5_KS", "blk.0.attn_output.weight", {"n_expert": 8}, "Q5_K"),
    ("IQ1_KT", "blk.0.attn_output.weight", {"n_expert": 8}, "IQ1_KT"),
    ("IQ4_KT", "blk.0.attn_output.weight", {"n_expert": 8}, "IQ4_KT"),
    ("IQ3_KT", "blk.0.attn_output.weight", {}, "IQ3_K"),                  # n_gqa 4
    ("IQ3_KT", "blk.0.attn_output.weight", {"n_head_kv": 16}, "IQ3_KT"),  # n_gqa 2
    ("IQ3_KT", "blk.0.attn_output.weight", {"n_expert": 8}, "Q5_K"),
    ("IQ3_KL", "blk.0.attn_output.weight", {}, "IQ4_KS"),
    ("IQ3_KL", "blk.0.attn_output.weight", {"arch": "falcon"}, "IQ3_K"),
    # MoE branches of IQ2_KT
    ("IQ2_KT", "blk.0.ffn_up_exps.weight", {"n_expert": 8}, "IQ3_K"),
    ("IQ2_KT", "blk.1.ffn_up_exps.weight", {"n_expert": 8}, "IQ2_KT"),
    ("IQ2_KT", "blk.5.ffn_down_shexp.weight", {"n_expert": 8}, "IQ4_K"),
    ("IQ2_KT", "blk.3.ffn_down_exps.weight", {"n_expert": 8}, "IQ3_K"),   # layer from the name
    ("IQ2_KT", "blk.4.ffn_down_exps.weight", {"n_expert": 8}, "IQ2_KT"),
]


@pytest.mark.parametrize("ft,name,facts,want", CASES)
def test_single_rules(ft, name, facts, want):
    d = tensor_type(name, W, "F16", ft, _facts(**facts), TypeOptions.create())
    assert d.type_name == want and d.quantize, d.reason


def test_iq3_kt_token_embd_falls_back_from_iq3_s():
    """IQ3_S obeys the 256-rule too: a 576-wide token_embd ends up IQ4_NL (no error)."""
    d = tensor_type("token_embd.weight", (576, 1000), "F16", "IQ3_KT", _facts(), TypeOptions.create())
    assert d.type_name == "IQ4_NL" and "IQ3_S" in d.reason


@pytest.mark.parametrize("t,new", [("IQ2_KS", "IQ4_NL"), ("IQ3_KS", "IQ4_NL"), ("IQ4_KS", "IQ4_NL"),
                                   ("IQ4_KSS", "IQ4_NL"), ("IQ2_KL", "IQ4_NL"), ("IQ5_KS", "Q5_0"),
                                   ("IQ1_KT", "IQ4_NL"), ("IQ2_KT", "IQ4_NL"), ("IQ3_KT", "IQ4_NL"),
                                   ("IQ4_KT", "IQ4_NL")])
def test_fallbacks(t, new):
    assert fallback_type(t, 512) == (t, None)
    assert fallback_type(t, 576)[0] == new
    assert fallback_type(t, 100)[0] == "F16"      # not even the fallback's 32-blocks fit


def test_counters_and_class_options():
    """IQ2_KS / IQ2_KT: their own branch ignores most per-class options (a plan warning says so);
    IQ3_KL's ffn_* follow use_more_bits on each class's own running count."""
    from evalkit.recipes.rules import assign_types
    facts = _facts(n_layer=16, n_attention_wv=16)
    names = [(f"blk.{i}.{c}.weight", W, "F16") for i in range(16)
             for c in ("attn_v", "ffn_gate", "ffn_up", "ffn_down", "attn_output")]
    got = [d.type_name for d in assign_types(names, "IQ3_KL", facts, TypeOptions.create())]
    more = ["IQ4_KS" if _more(i, 16) else "IQ3_K" for i in range(16)]
    assert got[1::5] == more and got[2::5] == more and got[3::5] == more
    assert set(got[0::5]) == {"IQ5_K"} and set(got[4::5]) == {"IQ4_KS"}

    opts = TypeOptions.create(attn_v_type="q8_0", ffn_down_type="q6_k", attn_output_type="q4_0",
                              ffn_gate_type="q5_0")
    ks = [d.type_name for d in assign_types(names, "IQ2_KS", facts, opts)]
    assert ks[:5] == ["IQ4_K", "IQ2_KS", "IQ2_KS", "Q2_K", "Q4_0"]       # only attn_output honoured
    assert ks[5 * 2 + 3] == "IQ2_KS"                                     # ffn_down #2 ≥ 16/8
    kt = [d.type_name for d in assign_types(names, "IQ2_KT", facts, opts)]
    assert kt[:5] == ["IQ4_K", "IQ2_KT", "IQ2_KT", "Q6_K", "IQ3_K"]      # only ffn_down honoured
    assert [d.type_name for d in assign_types(names, "IQ4_KS", facts, opts)][:5] == [
        "Q8_0", "Q5_0", "IQ4_KS", "Q6_K", "Q4_0"]
    # overrides still apply after these branches
    ov = TypeOptions.create(overrides=[r"attn_v=iq6_k"])
    assert assign_types(names[:1], "IQ2_KT", facts, ov)[0].type_name == "IQ6_K"

    plan = quantize_model(TINY, None, "IQ2_KS", dry_run=True,
                          options=TypeOptions(attn_v_type="q8_0", attn_output_type="q8_0"))
    assert plan.tensor("blk.0.attn_v.weight").dst_type == "IQ3_K"
    assert plan.tensor("blk.0.attn_output.weight").dst_type == "Q8_0"
    assert any("--attn-v-type" in w and "IQ2_KS" in w and "--attn-output-type" not in w for w in plan.warnings)
