"""Quantizing MoE models: llama-quantize's type for every tensor (moe-reference.json's IQ4_K mixes),
the attn_k → Q8_0 rule with ≥ 4 experts, the fallback for 3-D expert tensors whose rows do
not fit the type's block, and the quantized experts through the MoE forward.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_models import plain_moe_layer, reference
from evalkit.cli import main as cli_main
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.model import Model, Workspace
from evalkit.recipes import TypeOptions, quantize_model
from evalkit.recipes.options import RuleError

REF = reference()["models"]
TINY = ["tiny-qwen3moe", "tiny-deepseek2", "tiny-glm4moe"]


@pytest.mark.parametrize("key", TINY)
def test_quantize_cli_gives_reference_types(moe_model, key, tmp_path):
    """``evalkit quantize MODEL OUT IQ4_K``: the written file has llama-quantize's type per tensor."""
    out = tmp_path / f"{key}-IQ4_K.gguf"
    assert cli_main(["quantize", str(moe_model(key)), str(out), "--type", "IQ4_K", "--threads", "2",
                     "--no-progress"]) == 0
    got = {t.name: t.type_name for t in GGUFFile(out).tensors.values()}
    assert got == REF[key]["quant_mixes"]["IQ4_K"]["tensor_types"]


@pytest.mark.parametrize("key", ["smol-moe", "smol-moe-mistral3"])
def test_smol_moe_plan_gives_reference_types(moe_model, key):
    """The 1.4 GB smol-moe files: the plan evalkit quantize carries out (writing them takes
    minutes; bench/moe_report.py does). Rows of 576 do not fit IQ4_K/Q5_K's 256: Q5_0/Q6_0."""
    plan = quantize_model(moe_model(key), None, "IQ4_K", dry_run=True, progress=False)
    mix = REF[key]["quant_mixes"]["IQ4_K"]
    assert plan.types() == mix["tensor_types"]
    falls = sum(1 for t in plan.tensors if "fallback" in t.reason)
    assert falls == 120 == int(mix["quantize_log"]["notes"][
        "llama_model_quantize_internal: WARNING: 120 of 120 tensor(s) required fallback quantization"] * 120)


@pytest.mark.parametrize("key", list(REF))
@pytest.mark.parametrize("ftype", ["IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K"])
def test_attn_k_substring_goes_to_q8_0_with_four_or_more_experts(moe_model, key, ftype):
    """llama-quantize: with ≥ 4 experts every tensor whose name contains "attn_k" (attn_k,
    deepseek2's attn_kv_a_mqa, attn_kv_b, attn_k_b) is Q8_0, whatever the ftype."""
    assert REF[key]["hyperparameters"]["n_expert"] >= 4
    plan = quantize_model(moe_model(key), None, ftype, dry_run=True, progress=False)
    hits = {t.name: t.dst_type for t in plan.tensors if "attn_k" in t.name and len(t.shape) > 1}
    assert hits and set(hits.values()) == {"Q8_0"}, hits


# --------------------------------------------------------------------------- 3-D rows that do not fit

def _moe_file(path, ne0: int, n_expert: int = 4, n_ff: int = 64):
    """A one-layer llama file (F32) of width ``ne0`` with experts ``n_ff`` wide."""
    rng = np.random.default_rng(ne0)
    md = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": ne0,
          "llama.feed_forward_length": n_ff, "llama.attention.head_count": 1, "llama.expert_count": n_expert,
          "llama.expert_used_count": 2, "llama.context_length": 64, "llama.vocab_size": 32,
          "llama.attention.layer_norm_rms_epsilon": 1e-5}
    shapes = {"token_embd.weight": (ne0, 32), "output_norm.weight": (ne0,), "blk.0.attn_norm.weight": (ne0,),
              "blk.0.attn_q.weight": (ne0, ne0), "blk.0.attn_k.weight": (ne0, ne0), "blk.0.attn_v.weight": (ne0, ne0),
              "blk.0.attn_output.weight": (ne0, ne0), "blk.0.ffn_norm.weight": (ne0,),
              "blk.0.ffn_gate_inp.weight": (ne0, n_expert), "blk.0.ffn_gate_exps.weight": (ne0, n_ff, n_expert),
              "blk.0.ffn_up_exps.weight": (ne0, n_ff, n_expert), "blk.0.ffn_down_exps.weight": (n_ff, ne0, n_expert)}
    data = {n: (rng.standard_normal(int(np.prod(s))) * 0.1).astype(np.float32) for n, s in shapes.items()}
    write_gguf(path, md, [TensorSpec(n, s, 0) for n, s in shapes.items()], lambda s: data[s.name].tobytes())
    return path, data


def test_expert_rows_that_fit_no_block_fall_back_to_f16(tmp_path):
    """llama-quantize's change_type_if_necessary looks at ne0 of 3-D tensors as of 2-D ones:
    ffn_down_exps rows of 80 fit neither IQ4_K (256) nor its fallback Q5_0 (32) → F16, every
    expert converted; rows of 96 (gate/up) fall back to Q5_0."""
    src, data = _moe_file(tmp_path / "m.gguf", 96, n_ff=80)
    out = tmp_path / "q.gguf"
    plan = quantize_model(src, out, "IQ4_K", threads=1, progress=False)
    down = plan.tensor("blk.0.ffn_down_exps.weight")
    assert down.dst_type == "F16" and "fallback IQ4_K→F16" in down.reason
    g = GGUFFile(out)
    got = g.dequantize("blk.0.ffn_down_exps.weight")                    # (expert, rows 96, 80)
    want = data["blk.0.ffn_down_exps.weight"].astype(np.float16).astype(np.float32).reshape(4, 96, 80)
    assert np.array_equal(got, want)
    for name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"):
        assert plan.tensor(name).dst_type == "Q5_0" and "fallback IQ4_K→Q5_0" in plan.tensor(name).reason


def test_expert_override_that_does_not_fit_falls_back_like_the_mix(tmp_path):
    """--override picks the type before the fallback, as --custom-q does in the reference."""
    src, _ = _moe_file(tmp_path / "m.gguf", 96)
    plan = quantize_model(src, None, "IQ4_K", options=TypeOptions(overrides=("ffn_gate_exps=IQ6_K",)),
                          dry_run=True, progress=False)
    tp = plan.tensor("blk.0.ffn_gate_exps.weight")
    assert tp.dst_type == "Q8_0" and "--override" in tp.reason and "fallback IQ6_K→Q8_0" in tp.reason


def test_expert_class_option_that_does_not_fit_is_a_named_error(tmp_path):
    """A type given for token_embd is applied after the fallback (as the reference does), so one
    that does not fit the rows is refused before anything is written, naming the tensor."""
    src, _ = _moe_file(tmp_path / "m.gguf", 96)
    with pytest.raises(RuleError, match=r"token_embd\.weight.*IQ4_K needs rows that are a multiple of 256.*96"):
        quantize_model(src, tmp_path / "q.gguf", "IQ4_K",
                       options=TypeOptions(token_embedding_type="IQ4_K"), progress=False)
    assert not (tmp_path / "q.gguf").exists()


# --------------------------------------------------------------------------- quantized experts forward

def test_quantized_experts_through_the_moe_layer(moe_model, tmp_path):
    """IQ4_K experts (qlinear over each expert's byte slice) against float64 from their dequantized
    matrices: the per-expert views read the right bytes of the packed 3-D tensors."""
    out = tmp_path / "q.gguf"
    quantize_model(moe_model("tiny-glm4moe"), out, "IQ4_K", threads=2, progress=False)
    model, g = Model.from_gguf(out), GGUFFile(out)
    assert model.blk[2].moe.ffn_down_exps[5].type_name == "IQ4_K"
    h = torch.from_numpy(np.random.default_rng(3).standard_normal((40, model.config.n_embd), dtype=np.float32))
    got = model.blk[2].moe(h, Workspace()).numpy()
    want, margin = plain_moe_layer(g, model.config, 2, h.numpy())
    ok = margin > 1e-5
    assert ok.sum() >= 35
    np.testing.assert_allclose(got[ok], want[ok], rtol=2e-4, atol=2e-5 * np.abs(want).max())
