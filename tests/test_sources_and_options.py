"""The one tensor-source interface (GGUF, HF) and the one table of per-class type options."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN
from evalkit.recipes import CLASS_OPTIONS, RuleError, TypeOptions, quantize_model
from evalkit.run_config import ConfigError, VARIANT_KEYS, VariantSpec, config_from_dict
from evalkit.sources import GGUFSource, HFSource, HFSourceError, TensorSource, open_source

TINY = GOLDEN / "gguf" / "tiny-base.gguf"
E, NH, NKV, FF, NL, V = 64, 4, 2, 128, 1, 32


def _write_hf(d: Path, arch: str = "llama", **cfg) -> dict[str, np.ndarray]:
    """A one-layer F32 checkpoint; returns its weights by HF name."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    hd = E // NH
    w = {"model.embed_tokens.weight": rng.standard_normal((V, E), dtype=np.float32),
         "model.norm.weight": rng.standard_normal(E, dtype=np.float32),
         "lm_head.weight": rng.standard_normal((V, E), dtype=np.float32)}
    p = "model.layers.0."
    shapes = {"self_attn.q_proj.weight": (NH * hd, E), "self_attn.k_proj.weight": (NKV * hd, E),
              "self_attn.v_proj.weight": (NKV * hd, E), "self_attn.o_proj.weight": (E, NH * hd),
              "mlp.gate_proj.weight": (FF, E), "mlp.up_proj.weight": (FF, E), "mlp.down_proj.weight": (E, FF),
              "input_layernorm.weight": (E,), "post_attention_layernorm.weight": (E,)}
    w.update({p + k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()})
    d.mkdir(parents=True, exist_ok=True)
    save_file(w, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "architectures": [], "model_type": arch, "hidden_size": E, "intermediate_size": FF,
        "num_attention_heads": NH, "num_key_value_heads": NKV, "num_hidden_layers": NL, "vocab_size": V,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, **cfg}))
    return w


# -- sources -----------------------------------------------------------------------------------

def test_open_source_dispatch(tmp_path):
    _write_hf(tmp_path / "hf")
    g = open_source(TINY)
    h = open_source(tmp_path / "hf" / "config.json")
    try:
        assert isinstance(g, GGUFSource) and isinstance(h, HFSource)
        assert isinstance(g, TensorSource) and isinstance(h, TensorSource)
        assert [t.name for t in h.tensors][:2] == ["output.weight", "token_embd.weight"]   # sorted HF names
        assert h.metadata["general.architecture"] == "llama"
    finally:
        g.close()
        h.close()
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_source(tmp_path / "none.gguf")


def test_hf_source_permutation_is_optional(tmp_path):
    w = _write_hf(tmp_path)
    k = w["model.layers.0.self_attn.k_proj.weight"]
    conv, plain = HFSource(tmp_path), HFSource(tmp_path, permute_qk=False)
    try:
        hd2 = E // NH // 2
        want = k.reshape(NKV, 2, hd2, E).swapaxes(1, 2).reshape(k.shape)   # LlamaModel.permute
        assert np.array_equal(conv.rows_f32("blk.0.attn_k.weight"), want)
        assert np.array_equal(plain.rows_f32("blk.0.attn_k.weight"), k)
        raw = plain.raw("blk.0.attn_v.weight")
        assert raw.dtype == np.uint8 and not raw.flags.owndata               # memory-mapped, no copy
        with pytest.raises(HFSourceError, match="permute_qk=False"):
            plain.metadata
    finally:
        conv.close()
        plain.close()


def test_hf_source_metadata_is_lazy(tmp_path):
    """What only the converter cannot describe (llama3 rope scaling) fails when metadata is asked for."""
    _write_hf(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    src = HFSource(tmp_path)
    try:
        assert src.rows_f32("output_norm.weight").shape == (1, E)
        with pytest.raises(HFSourceError, match="llama3"):
            src.metadata
    finally:
        src.close()
    with pytest.raises(HFSourceError, match="llama3"):
        quantize_model(tmp_path, None, "Q8_0", dry_run=True)


def test_model_reads_through_sources(tmp_path):
    torch = pytest.importorskip("torch")
    from evalkit.model import Model, ModelConfig

    _write_hf(tmp_path, arch="qwen3", head_dim=E // NH)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q_norm\.weight' is missing"):
        Model.from_hf(tmp_path)            # qwen3 needs q/k norms this checkpoint lacks
    _write_hf(tmp_path / "l", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    m = Model.from_hf(tmp_path / "l")       # llama3 scaling: fine for the forward pass
    assert isinstance(m.source, HFSource) and not m.source.permute_qk and m.config.rope_neox
    assert m(torch.arange(5)).shape == (5, V)
    src = GGUFSource(TINY)
    a = Model.from_source(src, ModelConfig.from_gguf(src.file))
    assert a.output.type_name == Model.from_gguf(TINY).output.type_name


# -- options -----------------------------------------------------------------------------------

def test_type_options_are_validated_and_canonical():
    a = TypeOptions(attn_v_type="q8_0", overrides=["ffn_down=iq6_k"])
    b = TypeOptions.create(attn_v_type="Q8_0", overrides=[("ffn_down", "IQ6_K")])
    assert a == b and a.attn_v_type == "Q8_0" and a.overrides == (("ffn_down", "IQ6_K"),)
    assert a.class_types() == {"attn_v_type": "Q8_0"}
    assert a.custom_type("blk.0.ffn_down.weight") == ("IQ6_K", "ffn_down")
    with pytest.raises(RuleError, match="--ffn-up-type: unknown quantization type 'Q9_K'"):
        TypeOptions(ffn_up_type="Q9_K")
    with pytest.raises(TypeError, match="ffn_upp_type"):
        TypeOptions.create(ffn_upp_type="Q8_0")
    with pytest.raises(TypeError, match="TypeOptions"):
        quantize_model(TINY, None, "Q8_0", options={"pure": True}, dry_run=True)


def test_one_table_for_flags_and_config_keys():
    assert [o.attr for o in CLASS_OPTIONS] == [
        "token_embedding_type", "output_tensor_type", "attn_q_type", "attn_k_type", "attn_v_type",
        "attn_output_type", "ffn_gate_type", "ffn_up_type", "ffn_down_type"]
    assert all(o.flag == "--" + o.attr.replace("_", "-") for o in CLASS_OPTIONS)
    assert VARIANT_KEYS[6:] == tuple(o.attr for o in CLASS_OPTIONS)
    from evalkit.cli.quantize import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["quantize", "x", "--type", "Q8_0"] + [a for o in CLASS_OPTIONS for a in (o.flag, "q8_0")])
    assert all(getattr(args, o.attr) == "q8_0" for o in CLASS_OPTIONS)


def test_variant_spec_resolves_names_once():
    cfg = config_from_dict({"name": "x", "variants": [
        {"name": "a", "ftype": "iq4_k", "attn_v_type": "q8_0", "overrides": ["ffn_down=iq6_k"]},
        {"name": "b", "ftype": "IQ4_K", "attn_v_type": "Q8_0", "overrides": {"ffn_down": "IQ6_K"}},
        {"name": "c", "gguf": "x.gguf"}]})
    a, b, c = cfg.variants
    assert a.ftype == "IQ4_K" and a.recipe_key() == b.recipe_key() == {
        "ftype": "IQ4_K", "pure": False, "overrides": [["ffn_down", "IQ6_K"]], "attn_v_type": "Q8_0"}
    assert json.loads(json.dumps(a.recipe_key())) == a.recipe_key()
    assert a.type_options() == b.type_options() and c.type_options() == TypeOptions()
    d = cfg.to_dict()["variants"][0]
    assert list(d) == list(VARIANT_KEYS) and d["ffn_down_type"] is None and d["overrides"] == ["ffn_down=IQ6_K"]
    assert VariantSpec("v", ftype="q4_k").ftype == "Q4_K_M"
    with pytest.raises(ConfigError, match=r"'ffn_down_type': unknown quantization type 'Q9_K'"):
        config_from_dict({"name": "x", "variants": [{"ftype": "IQ4_K", "ffn_down_type": "Q9_K"}]})
    with pytest.raises(ConfigError, match=r"unknown key 'ffn_dwn_type'; valid keys: name, gguf, .*ffn_down_type"):
        config_from_dict({"name": "x", "variants": [{"ftype": "IQ4_K", "ffn_dwn_type": "Q8_0"}]})
