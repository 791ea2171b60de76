"""Whole-model quantizer: byte identity with llama-quantize's files, the mix rules, HF input, bad input.

Tensors whose types have no kernel in this build skip with that reason; they are checked
automatically once the kernels can quantize them.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, REPO
from evalkit.cli import main as cli_main
from evalkit.formats import get_format
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.imatrix import load_imatrix
from evalkit.sources import ModelNotFoundError, open_source, smollm2_path
from evalkit.recipes import TypeOptions, build_plan, quantize_model, quantize_tensor
from evalkit.recipes.plan import kernel_gaps

GGUF_DIR = GOLDEN / "gguf"
BASE = GGUF_DIR / "tiny-base.gguf"
IMATRIX = GGUF_DIR / "tiny-base.imatrix"

# the llama-quantize options the golden mixes were made with (golden/README.md), ftype IQ4_K
IQK_MIX = {"attn_q_type": "iq2_k", "attn_k_type": "iq3_k", "attn_v_type": "iq5_k",
           "attn_output_type": "iq6_k", "ffn_gate_type": "iq2_ks", "ffn_up_type": "iq4_ks",
           "ffn_down_type": "iq4_k", "token_embedding_type": "iq3_ks", "output_tensor_type": "iq5_ks"}
KT_MIX = {"attn_q_type": "iq2_kt", "attn_k_type": "iq3_kt", "attn_v_type": "iq4_kt",
          "attn_output_type": "iq1_kt", "ffn_gate_type": "iq2_kl", "ffn_up_type": "iq4_kss",
          "ffn_down_type": "q6_0", "token_embedding_type": "q8_0", "output_tensor_type": "iq4_nl"}
CASES = {
    "tiny-iqk-mix.gguf": (IQK_MIX, None),
    "tiny-kt-mix-imatrix.gguf": (KT_MIX, "tiny-base.imatrix"),
}


def _cli_args(kw: dict) -> list[str]:
    out = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}", v]
    return out


def run_cli(*args: str) -> int:
    """`evalkit ...` in-process; the exit status (argparse's SystemExit included)."""
    try:
        return cli_main([str(a) for a in args])
    except SystemExit as e:
        return int(e.code or 0)


def _gap(src_type: str, dst_type: str, quantize: bool) -> str | None:
    if not quantize:
        return None
    if src_type != "F32" and not get_format(src_type).can_dequantize:
        return f"no {src_type} dequantizer in this kernel build yet"
    if not get_format(dst_type).can_quantize:
        return f"no {dst_type} quantizer in this kernel build yet"
    return None


def _golden_names(case: str) -> list[str]:
    with GGUFFile(GGUF_DIR / case) as g:
        return list(g.tensors)


# -- golden identity ---------------------------------------------------------------------------

class MixRun:
    """One golden mix, reproduced once per test session: the whole file when every kernel
    exists (via the CLI, as the reference was run), else tensor by tensor."""

    def __init__(self, case: str, tmp: Path):
        self.case = case
        self.kw, self.imatrix_name = CASES[case]
        self.golden = GGUFFile(GGUF_DIR / case)
        self.source = open_source(BASE)
        self.imatrix = load_imatrix(GGUF_DIR / self.imatrix_name) if self.imatrix_name else None
        opts = TypeOptions.create(**self.kw)
        self.plan = build_plan(self.source, "IQ4_K", opts, self.imatrix, self.imatrix_name)
        self.out = None
        self._cache: dict[str, np.ndarray] = {}
        if not kernel_gaps(self.plan):
            self.out = tmp / case
            args = ["quantize", str(BASE), str(self.out), "--type", "IQ4_K", "--threads", "2",
                    "--no-progress", *_cli_args(self.kw)]
            if self.imatrix_name:
                args += ["--imatrix", self.imatrix_name]   # relative, as the reference was given it
            import os
            cwd = os.getcwd()
            os.chdir(GGUF_DIR)
            try:
                assert run_cli(*args) == 0
            finally:
                os.chdir(cwd)
            self.result = GGUFFile(self.out)

    def tensor_bytes(self, name: str) -> np.ndarray:
        if self.out is not None:
            return self.result.tensor_bytes(name)
        if name not in self._cache:
            tp = self.plan.tensor(name)
            vec = self.imatrix.data[tp.imatrix_name] if tp.imatrix_name else None
            self._cache[name] = np.array(quantize_tensor(self.source, tp, vec, threads=2))
        return self._cache[name]


@pytest.fixture(scope="module")
def mix_runs(tmp_path_factory):
    runs: dict[str, MixRun] = {}

    def get(case: str) -> MixRun:
        if case not in runs:
            runs[case] = MixRun(case, tmp_path_factory.mktemp("mix"))
        return runs[case]

    yield get
    for r in runs.values():
        r.source.close()


@pytest.mark.parametrize("case", list(CASES))
def test_mix_plan_types_match_golden(case, mix_runs):
    """The per-tensor types (and copy decisions) equal those of the reference's file."""
    run = mix_runs(case)
    want = {n: t.type_name for n, t in run.golden.tensors.items()}
    assert list(run.plan.types()) == list(want), "tensor order differs"
    assert run.plan.types() == want
    for tp in run.plan.tensors:
        assert tp.dst_bytes == run.golden.tensors[tp.name].nbytes, tp.name


def _tensor_cases():
    for case in CASES:
        for name in _golden_names(case):
            yield pytest.param(case, name, id=f"{case.split('.')[0]}:{name}")


@pytest.mark.parametrize("case,name", list(_tensor_cases()))
def test_mix_tensor_bytes_match_golden(case, name, mix_runs):
    """Every tensor byte for byte like llama-quantize (skips while its kernel is missing)."""
    run = mix_runs(case)
    tp = run.plan.tensor(name)
    gap = _gap(tp.src_type, tp.dst_type, tp.quantize)
    if gap:
        pytest.skip(gap)
    got = run.tensor_bytes(name)
    want = run.golden.tensor_bytes(name)
    assert got.shape == want.shape
    if not np.array_equal(got, want):
        rows = np.flatnonzero((got != want).any(axis=1))
        pytest.fail(f"{name} ({tp.dst_type}): {rows.size} of {want.shape[0]} rows differ, first row {rows[0]}")


@pytest.mark.parametrize("case", list(CASES))
def test_mix_whole_file_identical(case, mix_runs):
    """With every kernel present, the CLI writes the reference's file byte for byte (metadata too)."""
    run = mix_runs(case)
    if run.out is None:
        pytest.skip("kernels missing: " + "; ".join(kernel_gaps(run.plan)))
    assert run.result.metadata == run.golden.metadata
    assert run.out.read_bytes() == (GGUF_DIR / case).read_bytes()


def test_metadata_like_reference():
    """file_type, quantization_version and the quantize.imatrix.* keys as llama-quantize writes them."""
    with GGUFFile(GGUF_DIR / "tiny-kt-mix-imatrix.gguf") as g:
        plan = quantize_model(BASE, None, "IQ4_K", imatrix=IMATRIX, dry_run=True, options=TypeOptions(**KT_MIX))
        want = dict(g.metadata)
        want["quantize.imatrix.file"] = str(IMATRIX)    # the path as given
        assert plan.metadata == want
        assert list(plan.metadata) == list(g.metadata)
        assert plan.metadata_types == g.metadata_types
    plan = quantize_model(BASE, None, "IQ4_K", dry_run=True)
    assert plan.metadata["general.file_type"] == 140
    assert not any(k.startswith("quantize.") for k in plan.metadata)


def test_imatrix_changes_iqk_bytes():
    """Quantizing tiny-base with its imatrix changes the IQ*_K tensors."""
    src = open_source(BASE)
    im = load_imatrix(IMATRIX)
    try:
        for ft in ("IQ4_K", "IQ2_K", "IQ3_K", "IQ5_K", "IQ6_K"):
            with_im = build_plan(src, ft, TypeOptions.create(), im)
            tps = [t for t in with_im.tensors if t.quantize and t.dst_type.startswith("IQ") and t.dst_type.endswith("_K")
                   and t.imatrix_name and get_format(t.dst_type).can_quantize and t.name.startswith("blk.")]
            if tps:
                break
        else:
            pytest.skip("no IQ*_K quantizer in this kernel build yet")
        without = build_plan(src, ft, TypeOptions.create())
        for tp in tps:
            a = quantize_tensor(src, tp, im.data[tp.imatrix_name], threads=2)
            b = quantize_tensor(src, without.tensor(tp.name), None, threads=2)
            assert a.shape == b.shape
            assert not np.array_equal(a, b), f"{tp.name} ({tp.dst_type}): same bytes with and without imatrix"
    finally:
        src.close()


# -- the mix rules on SmolLM2 (spec section 15) ------------------------------------------------

def _smollm2_path() -> Path:
    try:
        return smollm2_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))


# bytes per block and block size, written out here so the sizes are checked independently
_BLOCKS = {"F32": (1, 4), "Q8_0": (32, 34), "Q6_0": (32, 26), "Q5_0": (32, 22), "IQ4_NL": (32, 18),
           "Q4_1": (32, 20), "IQ2_K": (256, 76), "IQ3_K": (256, 110), "IQ4_K": (256, 144),
           "IQ5_K": (256, 176), "IQ6_K": (256, 212), "Q5_K": (256, 176), "Q6_K": (256, 210)}


def _expected_smollm2(ftype: str, shape: tuple, name: str, src: str) -> tuple[str, bool]:
    """Spec 15 by hand for SmolLM2 (576 wide, ffn 1536, n_gqa 3, tied embeddings, 30 layers)."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return src, False
    if name == "token_embd.weight":
        t = "Q8_0"                       # rule 1 (tied, used as output): 576 % 256 ≠ 0 → Q8_0
    else:
        t = ftype
        if "attn_v.weight" in name:      # rule 3, n_gqa = 3 ≥ 2
            t = {"IQ2_K": "IQ4_K", "IQ3_K": "IQ4_K", "IQ4_K": "IQ5_K"}.get(ftype, ftype)
        elif "attn_output.weight" in name and ftype == "IQ2_K":
            t = "IQ3_K"                  # rule 7
        if shape[0] % 256:               # rule 9 fallbacks for the 576-wide tensors
            t = {"IQ2_K": "IQ4_NL", "IQ3_K": "IQ4_NL", "IQ4_K": "Q5_0", "IQ5_K": "Q6_0",
                 "IQ6_K": "Q8_0"}[t]
    return t, t != src


@pytest.mark.parametrize("ftype", ["IQ2_K", "IQ4_K", "IQ6_K"])
def test_smollm2_dry_run_plan(ftype, capsys):
    """The whole --dry-run plan for SmolLM2 matches spec section 15, worked out independently."""
    path = _smollm2_path()
    assert run_cli("quantize", path, "--type", ftype.lower(), "--dry-run") == 0
    table = capsys.readouterr().out
    plan = quantize_model(path, None, ftype, dry_run=True)
    assert plan.model.n_gqa == 3 and not plan.model.has_output and plan.model.n_layer == 30
    with GGUFFile(path) as f:
        assert [t.name for t in plan.tensors] == list(f.tensors)
        for tp in plan.tensors:
            info = f.tensors[tp.name]
            want_t, want_q = _expected_smollm2(ftype, info.shape, tp.name, info.type_name)
            assert (tp.dst_type, tp.quantize) == (want_t, want_q), tp.name
            bs, bb = _BLOCKS[want_t]
            assert tp.dst_bytes == info.n_elements // bs * bb, tp.name
            assert tp.name in table
    counts = {}
    for tp in plan.tensors:
        counts[tp.dst_type] = counts.get(tp.dst_type, 0) + 1
    assert counts[ftype] == 30                     # the 1536-wide ffn_down of every layer
    assert f"ftype {ftype}" in table


def test_smollm2_pure_and_overrides():
    """--pure skips the mix rules (not the fallback); --override: first matching rule wins."""
    path = _smollm2_path()
    pure = quantize_model(path, None, "IQ4_K", options=TypeOptions(pure=True), dry_run=True).types()
    assert pure["token_embd.weight"] == "Q5_0"     # no tied-output rule, only the fallback
    assert pure["blk.3.attn_v.weight"] == "Q5_0"
    assert pure["blk.3.ffn_down.weight"] == "IQ4_K"
    rules = [r"blk\.1\.attn_q=q8_0", "attn_q=IQ4_K", "attn=Q4_0", "ffn_down=IQ6_K"]
    ov = quantize_model(path, None, "IQ4_K", dry_run=True, options=TypeOptions(overrides=rules)).types()
    assert ov["blk.1.attn_q.weight"] == "Q8_0"
    assert ov["blk.2.attn_q.weight"] == "Q5_0"     # IQ4_K then the 576 fallback
    assert ov["blk.2.attn_k.weight"] == "Q4_0"
    assert ov["blk.2.attn_v.weight"] == "Q4_0"     # overrides beat the attn_v rule
    assert ov["blk.2.ffn_down.weight"] == "IQ6_K"
    assert ov["blk.2.ffn_up.weight"] == "Q5_0"
    cls = quantize_model(path, None, "IQ4_K", dry_run=True,
                         options=TypeOptions(attn_v_type="q8_0", ffn_down_type="Q6_K")).types()
    assert cls["blk.0.attn_v.weight"] == "Q8_0" and cls["blk.0.ffn_down.weight"] == "Q6_K"


def test_ftype_names_and_ids():
    from evalkit.recipes.ftypes import get_ftype
    assert [get_ftype(n).id for n in ("IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K")] == [138, 139, 140, 141, 142]
    assert get_ftype("iq4_k").name == "IQ4_K" and get_ftype(140).name == "IQ4_K" and get_ftype("140").name == "IQ4_K"
    assert get_ftype("q4_k").name == "Q4_K_M" and get_ftype("Q4_K_M").id == 15
    assert (get_ftype("Q8_0").id, get_ftype("Q6_K").id, get_ftype("F16").id, get_ftype("BF16").id,
            get_ftype("F32").id) == (7, 18, 1, 32, 0)
    assert {n: get_ftype(n).id for n in ("IQ4_KS", "IQ2_KS", "IQ4_KSS", "IQ5_KS", "IQ2_KT", "IQ3_KT",
                                         "IQ4_KT", "IQ3_KS", "IQ2_KL", "IQ1_KT")} == {
        "IQ4_KS": 145, "IQ2_KS": 147, "IQ4_KSS": 148, "IQ5_KS": 150, "IQ2_KT": 151, "IQ3_KT": 152,
        "IQ4_KT": 153, "IQ3_KS": 154, "IQ2_KL": 155, "IQ1_KT": 156}
    with pytest.raises(NotImplementedError, match="Q3_K_M"):   # Q2_K/Q3_K_* mix rules: still missing
        quantize_model(BASE, None, "Q3_K_M", dry_run=True)
    pure = quantize_model(BASE, None, "IQ2_KS", options=TypeOptions(pure=True), dry_run=True)
    assert set(pure.types().values()) == {"IQ2_KS", "F32"}


def _facts(**kw):
    from evalkit.recipes.rules import ModelFacts
    base = dict(arch="llama", n_layer=32, n_head=32, n_head_kv=8, n_expert=0, n_vocab=32000, n_embd=4096,
                has_output=True, n_attention_wv=32, size_label=None)
    base.update(kw)
    return ModelFacts(**base)


W = (4096, 4096)
# (ftype, tensor, model facts, expected) — spec section 15 rules 1..9 on synthetic models
RULE_CASES = [
    ("IQ2_K", "output.weight", {}, "Q5_K"),
    ("IQ3_K", "token_embd.weight", {"has_output": False}, "IQ4_K"),
    ("IQ4_K", "output.weight", {}, "Q6_K"),
    ("IQ5_K", "output.weight", {}, "Q6_K"),
    ("IQ6_K", "output.weight", {}, "IQ6_K"),
    ("IQ4_K", "output.weight", {"arch": "falcon"}, "Q8_0"),
    ("IQ2_K", "token_embd.weight", {}, "IQ2_K"),
    ("IQ2_K", "blk.0.attn_v.weight", {"n_head_kv": 32}, "IQ3_K"),        # n_gqa 1
    ("IQ2_K", "blk.0.attn_v.weight", {}, "IQ4_K"),                       # n_gqa 4
    ("IQ3_K", "blk.0.attn_v.weight", {"n_head_kv": 32}, "IQ3_K"),
    ("IQ3_K", "blk.0.attn_v.weight", {}, "IQ4_K"),
    ("IQ3_K", "blk.0.attn_v.weight", {"size_label": "70B"}, "IQ5_K"),
    ("IQ4_K", "blk.0.attn_v.weight", {"size_label": "70B"}, "IQ4_K"),
    ("IQ4_K", "blk.0.attn_v.weight", {}, "IQ5_K"),
    ("IQ5_K", "blk.0.attn_v.weight", {}, "IQ5_K"),                       # no n_gqa bump for IQ5_K
    ("IQ5_K", "blk.0.attn_v.weight", {"size_label": "8B", "n_vocab": 128256}, "IQ6_K"),
    ("IQ6_K", "blk.0.attn_v.weight", {}, "IQ6_K"),
    ("IQ4_K", "blk.0.attn_v.weight", {"n_expert": 8}, "Q8_0"),
    ("IQ4_K", "blk.0.attn_k.weight", {"n_expert": 8}, "Q8_0"),
    ("IQ4_K", "blk.0.attn_kv_b.weight", {"n_expert": 8}, "Q8_0"),
    ("IQ5_K", "blk.0.attn_q.weight", {"size_label": "8B", "n_vocab": 128256}, "IQ4_K"),
    ("IQ5_K", "blk.0.attn_qkv.weight", {"size_label": "70B", "n_vocab": 128256}, "IQ4_K"),
    ("IQ5_K", "blk.0.attn_q.weight", {"size_label": "8B"}, "IQ5_K"),
    ("IQ2_K", "blk.0.attn_output.weight", {}, "IQ3_K"),
    ("IQ3_K", "blk.0.attn_output.weight", {}, "IQ3_K"),
    ("IQ4_K", "blk.0.attn_output.weight", {"n_expert": 8}, "Q5_K"),
    ("IQ5_K", "blk.0.attn_output.weight", {"n_expert": 8}, "IQ5_K"),
    ("IQ2_K", "blk.0.attn_output.weight", {"arch": "falcon"}, "IQ2_K"),
    ("IQ2_K", "blk.0.ffn_down.weight", {}, "IQ2_K"),
    ("IQ2_K", "blk.0.ffn_gate.weight", {}, "IQ2_K"),
]


@pytest.mark.parametrize("ftype,name,facts,want", RULE_CASES)
def test_rules_spec_section_15(ftype, name, facts, want):
    from evalkit.recipes.rules import TypeOptions as TO, tensor_type
    d = tensor_type(name, W, "F16", ftype, _facts(**facts), TO.create())
    assert d.type_name == want and d.quantize


def test_rules_q4_k_m_counters_and_per_class():
    """Q4_K_M's use_more_bits counts attn_v / ffn_down in file order (32 layers); per-class types win."""
    from evalkit.recipes.rules import TypeOptions as TO, assign_types
    names = [(f"blk.{i}.{t}.weight", W, "F16") for i in range(32) for t in ("attn_v", "ffn_down")]
    got = [d.type_name for d in assign_types(names, "Q4_K_M", _facts(), TO.create())]
    more = [i < 4 or i >= 28 or (i - 4) % 3 == 2 for i in range(32)]
    assert got[0::2] == ["Q6_K" if m else "Q5_K" for m in more]     # else the n_gqa ≥ 4 bump
    assert got[1::2] == ["Q6_K" if m else "Q4_K" for m in more]
    opts = TO.create(attn_v_type="q8_0", ffn_down_type="IQ4_K", overrides=["blk\\.3\\.=Q4_0"])
    got = [d.type_name for d in assign_types(names, "Q4_K_M", _facts(), opts)]
    assert got[:8] == ["Q8_0", "IQ4_K"] * 3 + ["Q4_0", "Q4_0"]
    assert [d.type_name for d in assign_types([("blk.0.attn_v.weight", (100, 64), "F16")], "IQ4_K",
                                              _facts(), TO.create())] == ["F16"]   # IQ5_K → Q6_0 → F16: copy


# -- HuggingFace checkpoint --------------------------------------------------------------------

H, NH, NKV, FF, NL, V = 256, 4, 2, 512, 2, 300


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute, written out independently of evalkit.sources.hf
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    def m(rows, cols, dt=np.float32):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(dt)

    w = {"model.embed_tokens.weight": m(V, H), "model.norm.weight": (1 + m(1, H)[0]),
         "lm_head.weight": m(V, H)}
    for i in range(NL):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": 1 + m(1, H)[0],
            p + "post_attention_layernorm.weight": 1 + m(1, H)[0],
            p + "self_attn.q_proj.weight": m(H, H, np.float16),
            p + "self_attn.k_proj.weight": m(H // NH * NKV, H, np.float16),
            p + "self_attn.v_proj.weight": m(H // NH * NKV, H),
            p + "self_attn.o_proj.weight": m(H, H),
            p + "mlp.gate_proj.weight": m(FF, H),
            p + "mlp.up_proj.weight": m(FF, H, np.float16),
            p + "mlp.down_proj.weight": m(H, FF),
        })
    return w


def _write_hf(d: Path, weights: dict[str, np.ndarray] | None) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": FF, "num_attention_heads": NH, "num_key_value_heads": NKV,
        "num_hidden_layers": NL, "vocab_size": V, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}))
    vocab = {chr(0x100 + i) if i >= 3 else f"<s{i}>": i for i in range(V - 2)}
    (d / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": [f"{chr(0x103)} {chr(0x104)}"]},
        "added_tokens": [{"id": V - 2, "content": "<|im_start|>", "special": True},
                         {"id": V - 1, "content": "<|im_end|>", "special": True}]}))
    if weights is not None:
        from safetensors.numpy import save_file

        save_file(weights, str(d / "model.safetensors"))


def _write_equivalent_gguf(path: Path, weights: dict[str, np.ndarray], hf_meta: dict, hf_types: dict) -> None:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    tensors = {}
    for hf, w in sorted(weights.items()):
        if hf in names:
            name = names[hf]
        else:
            _, _, i, rest = hf.split(".", 3)
            name = f"blk.{i}.{layer[rest[:-len('.weight')]]}.weight"
        if hf.endswith("q_proj.weight"):
            w = _permute(w, NH)
        elif hf.endswith("k_proj.weight"):
            w = _permute(w, NKV)
        tensors[name] = np.ascontiguousarray(w)
    # convert_hf_to_gguf's order: sorted HF names (the rules count attn_v/ffn_down in file order)
    specs = [TensorSpec(n, tuple(reversed(a.shape)), 1 if a.dtype == np.float16 else 0)
             for n, a in tensors.items()]
    write_gguf(path, hf_meta, specs, lambda s: tensors[s.name], hf_types)


@pytest.mark.parametrize("ftype", ["Q8_0", "F16", "IQ4_K", "Q4_K_M"])
def test_hf_checkpoint_equals_equivalent_gguf(ftype, tmp_path):
    """HF llama → GGUF names, permuted Q/K, metadata; quantized bytes equal the GGUF route's."""
    hf = tmp_path / "hf"
    weights = _hf_weights(np.random.default_rng(7))
    _write_hf(hf, weights)
    src = open_source(hf)
    try:
        meta, types = src.metadata, src.metadata_types
        assert meta["general.architecture"] == "llama" and meta["llama.attention.head_count_kv"] == NKV
        assert meta["llama.vocab_size"] == V and len(meta["tokenizer.ggml.tokens"]) == V
        assert meta["tokenizer.ggml.token_type"][-1] == 3 and meta["tokenizer.ggml.token_type"][5] == 1
        assert {t.name: t.type_name for t in src.tensors}["blk.0.attn_q.weight"] == "F16"
        gguf_path = tmp_path / "equivalent.gguf"
        _write_equivalent_gguf(gguf_path, weights, dict(meta), dict(types))
        plan = quantize_model(src, None, ftype, dry_run=True)
    finally:
        src.close()
    gaps = kernel_gaps(plan)
    if gaps:
        pytest.skip("; ".join(gaps))
    out_hf, out_gguf = tmp_path / "from_hf.gguf", tmp_path / "from_gguf.gguf"
    quantize_model(hf, out_hf, ftype, threads=2, progress=False)
    quantize_model(gguf_path, out_gguf, ftype, threads=2, progress=False)
    with GGUFFile(out_hf) as a, GGUFFile(out_gguf) as b:
        assert set(a.tensors) == set(b.tensors)
        for name in a.tensors:
            assert a.tensors[name].type_name == b.tensors[name].type_name, name
            assert np.array_equal(a.tensor_bytes(name), b.tensor_bytes(name)), name
        assert a.metadata == b.metadata


def test_hf_bf16_and_permutation(tmp_path):
    """BF16 weights are read exactly and llama's Q/K rows come out permuted like convert_hf_to_gguf."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    weights = _hf_weights(np.random.default_rng(3))
    tw = {k: torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16) for k, v in weights.items()}
    _write_hf(tmp_path, None)
    save_file(tw, str(tmp_path / "model.safetensors"))
    src = open_source(tmp_path)
    try:
        types = {t.name: t.type_name for t in src.tensors}
        assert types["blk.1.attn_k.weight"] == "BF16" and types["output_norm.weight"] == "F32"
        want = _permute(tw["model.layers.1.self_attn.k_proj.weight"].float().numpy(), NKV)
        assert np.array_equal(src.rows_f32("blk.1.attn_k.weight"), want)
        raw = src.raw("blk.1.attn_k.weight").view(np.uint16)
        assert np.array_equal(raw, _permute(tw["model.layers.1.self_attn.k_proj.weight"].view(torch.int16)
                                            .numpy().view(np.uint16), NKV))
        assert np.array_equal(src.rows_f32("output_norm.weight")[0],
                              tw["model.norm.weight"].float().numpy())
    finally:
        src.close()


# -- bad input ---------------------------------------------------------------------------------

def _assert_failed_cleanly(rc: int, out_dir: Path, capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    leftovers = [p.name for p in out_dir.iterdir() if p.suffix in (".gguf", ".tmp") or p.name.startswith(".")]
    assert leftovers == [], leftovers
    return err


def _write_legacy_imatrix(path: Path, entries: dict[str, np.ndarray]) -> None:
    raw = struct.pack("<i", len(entries))
    for name, v in entries.items():
        b = name.encode()
        raw += struct.pack("<i", len(b)) + b + struct.pack("<ii", 1, v.size) + v.astype("<f4").tobytes()
    path.write_bytes(raw + struct.pack("<ii", 1, 0))


def test_bad_inputs_fail_cleanly(tmp_path, capsys):
    """Each bad input: a clear message, exit status 2, no output (or temp) file left."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.gguf"
    q = ["quantize"]

    text = tmp_path / "notes.txt"
    text.write_text("this is not a model\n")
    _assert_failed_cleanly(run_cli(*q, text, out, "--type", "IQ4_K"), out_dir, capsys, "not a GGUF")

    trunc = tmp_path / "truncated.gguf"
    with open(BASE, "rb") as fh:
        trunc.write_bytes(fh.read(2_000_000))
    _assert_failed_cleanly(run_cli(*q, trunc, out, "--type", "IQ4_K"), out_dir, capsys, "truncated")

    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "IQ9_K"), out_dir, capsys, "unknown ftype 'IQ9_K'")
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "Q8_0", "--override", "attn_q=IQ9_Z"),
                           out_dir, capsys, "unknown quantization type 'IQ9_Z'")
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "Q8_0", "--override", "(attn_q=Q8_0"),
                           out_dir, capsys, "invalid regular expression")
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "Q8_0", "--override", "attn_q"),
                           out_dir, capsys, "REGEX=TYPE")
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "Q8_0", "--attn-v-type", "q9_0"),
                           out_dir, capsys, "--attn-v-type")
    _assert_failed_cleanly(run_cli(*q, tmp_path / "missing.gguf", out, "--type", "Q8_0"),
                           out_dir, capsys, "no such file")

    wrong_len = tmp_path / "wrong_len.imatrix"
    _write_legacy_imatrix(wrong_len, {"blk.0.attn_q.weight": np.ones(128), "blk.0.attn_k.weight": np.ones(256)})
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "Q8_0", "--imatrix", wrong_len), out_dir, capsys,
                           "'blk.0.attn_q.weight' has 128 values", "needs 256")
    foreign = tmp_path / "foreign.imatrix"
    _write_legacy_imatrix(foreign, {"model.layers.0.mlp.w1": np.ones(256)})
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "Q8_0", "--imatrix", foreign), out_dir, capsys,
                           "no entry for any tensor", "missing e.g. 'blk.0.attn_q.weight'")
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "Q8_0", "--imatrix", text), out_dir, capsys,
                           "imatrix")
    # a type that cannot hold these rows, forced by name after the fallback (as in the reference)
    _assert_failed_cleanly(run_cli(*q, _smollm2_path(), out, "--type", "IQ4_K", "--token-embedding-type",
                                   "IQ4_K"), out_dir, capsys, "multiple of 256", "576")
    _assert_failed_cleanly(run_cli(*q, BASE, out, "--type", "IQ4_K", "--attn-q-type", "iq2_kt"), out_dir,
                           capsys, "needs an importance matrix")
    assert run_cli(*q, BASE, "--type", "Q8_0") == 2      # OUT is only optional with --dry-run
    assert "OUT is required" in capsys.readouterr().err


def test_cli_exit_status_subprocess(tmp_path):
    """The real command: exit status 2 and one clear line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "evalkit", "quantize", str(BASE), str(tmp_path / "o.gguf"),
                        "--type", "nonsense"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert "unknown ftype 'nonsense'" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_failure_mid_write_leaves_no_file(tmp_path, monkeypatch):
    """An error after some tensors were written removes the partial output."""
    import evalkit.recipes.model_quantizer as mq

    real = mq.quantize_tensor
    calls = []

    def flaky(source, tp, imatrix=None, threads=None):
        calls.append(tp.name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(source, tp, imatrix, threads)

    monkeypatch.setattr(mq, "quantize_tensor", flaky)
    out = tmp_path / "x.gguf"
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_model(BASE, out, "F16", progress=False)
    assert len(calls) == 5 and list(tmp_path.iterdir()) == []


def test_copy_and_float_targets(tmp_path):
    """Tensors already in the target type are copied; F16/F32 targets convert exactly."""
    out = tmp_path / "f32.gguf"
    plan = quantize_model(BASE, out, "F32", threads=2, progress=False)
    assert plan.types()["token_embd.weight"] == "F32"
    with GGUFFile(out) as f, GGUFFile(BASE) as b:
        assert f.metadata["general.file_type"] == 0
        for name, t in b.tensors.items():
            assert f.tensors[name].type_name == "F32"
            assert np.array_equal(f.dequantize(name), b.dequantize(name)), name
    out16 = tmp_path / "f16.gguf"
    plan = quantize_model(out, out16, "F16", threads=2, progress=False)
    with GGUFFile(out16) as f, GGUFFile(BASE) as b:
        for name, t in b.tensors.items():
            if t.type_name == "F16":   # F16 → F32 → F16 round trip is exact
                assert np.array_equal(f.tensor_bytes(name), b.tensor_bytes(name)), name
    plan = quantize_model(BASE, None, "Q8_0", dry_run=True)
    assert not plan.tensor("token_embd.weight").quantize and not plan.tensor("output.weight").quantize
