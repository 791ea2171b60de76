"""`evalkit sensitivity` on the tiny golden model: swaps equal whole-model runs, partial forwards
equal full ones, resume, fallbacks, GGUF-Tool-Suite's kld_results.csv layout, bad input."""
from __future__ import annotations

import functools
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from conftest import GOLDEN, REPO, SHARED
from evalkit.sensitivity.config import SensitivityConfig, SensitivityError, sensitivity_config
from evalkit.sensitivity.groups import TensorFacts, candidates_for, make_groups

TINY = GOLDEN / "gguf" / "tiny-base.gguf"
KINDS = ("attn_v", "ffn_down")          # small tensors: quantizing them is quick
TYPES = ("IQ2_K", "IQ4_K", "Q8_0")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "small.txt"
    p.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:12000])
    return p


def _cfg(tmp, corpus, **kw) -> SensitivityConfig:
    d = dict(name="tiny", base=str(TINY), corpus=str(corpus), ctx=64, chunks=3, threads=2, batch=128, types=TYPES,
             kinds=KINDS, grouping="tensor", output_dir=str(tmp))
    d.update(kw)
    return SensitivityConfig(**d)


@pytest.fixture(scope="module")
def tiny_pass(tmp_path_factory, corpus):
    from evalkit.sensitivity.sweep import sensitivity
    tmp = tmp_path_factory.mktemp("sens")
    return tmp, sensitivity(_cfg(tmp, corpus), progress=False)


def test_outputs_and_table(tiny_pass):
    tmp, res = tiny_pass
    out = tmp / "tiny"
    for f in ("sensitivity.csv", "sensitivity.parquet", "kld_results.csv", "heatmap.png", "heatmap.svg",
              "summary.md", "sensitivity.json"):
        assert (out / f).is_file(), f
    df = pd.read_csv(out / "sensitivity.csv")
    assert len(df) == 4 * len(TYPES)                        # 2 kinds × 2 layers, one row per type
    assert set(df["group"]) == {"blk.0.attn_v", "blk.1.attn_v", "blk.0.ffn_down", "blk.1.ffn_down"}
    # bytes from the formats' geometry, computed here independently: IQ2_K 76, IQ4_K 144, Q8_0 34 per block
    per_block = {"IQ2_K": (76, 256), "IQ4_K": (144, 256), "Q8_0": (34, 32)}
    for r in df.itertuples():
        ne0, ne1 = (256, 128) if "attn_v" in r.group else (768, 256)
        nb, bs = per_block[r.type]
        assert r.bytes == ne1 * (ne0 // bs) * nb
        assert r.bpw == pytest.approx(8 * r.bytes / (ne0 * ne1))
        assert r.kld_mean > 0 and r.kld_err >= 0 and r.n_tokens == 3 * 31
    # more bits, less damage, for every group
    for _, g in df.groupby("group"):
        k = g.set_index("type")["kld_mean"]
        assert k["Q8_0"] < k["IQ4_K"] < k["IQ2_K"]
    pq = pd.read_parquet(out / "sensitivity.parquet")
    assert np.allclose(pq["kld_mean"], df["kld_mean"])


@pytest.mark.slow
def test_swap_equals_whole_model_run(tiny_pass, corpus, tmp_path):
    """A group's measured KLD equals that of a GGUF with only that group quantized, written by
    `evalkit quantize` and evaluated by `evalkit run` (another path end to end)."""
    from evalkit.files import model_size
    from evalkit.pipeline import run
    from evalkit.recipes import TypeOptions, quantize_model
    from evalkit.run_config import config_from_dict
    _, res = tiny_pass
    rows = {(r["group"], r["requested_type"]): r for r in res.rows}
    picks = [("blk.0.ffn_down", "IQ2_K"), ("blk.1.attn_v", "IQ4_K"), ("blk.1.ffn_down", "Q8_0")]
    variants = []
    for group, typ in picks:
        out = tmp_path / f"{group}-{typ}.gguf"
        rule = f"^{group.replace('.', chr(92) + '.')}\\.weight$={typ}"
        # everything else copied: F16 tensors to F16, the Q8_0 embeddings to Q8_0
        quantize_model(TINY, out, "Q8_0", options=TypeOptions(overrides=[rule, r"^blk\..*=F16", ".*=Q8_0"]),
                       progress=False)
        assert model_size(out)[0] == rows[(group, typ)]["model_bytes"]
        variants.append({"name": f"{group}-{typ}", "gguf": str(out)})
    cfg = config_from_dict({"name": "whole", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 3,
                            "threads": 2, "batch": 128, "output_dir": str(tmp_path), "variants": variants})
    whole = json.loads((run(cfg, progress=False) / "results.json").read_text())["variants"]
    for group, typ in picks:
        want = whole[f"{group}-{typ}"]["kld_mean"]
        got = rows[(group, typ)]
        assert got["kld_mean"] == pytest.approx(want[0], rel=1e-6, abs=1e-12)
        assert got["kld_err"] == pytest.approx(want[1], rel=1e-4, abs=1e-12)


def test_partial_forward_is_bitwise_full(corpus):
    """Restarting from a cached hidden state gives the full pass's logits bit for bit."""
    from evalkit.evaluation.forward import configure_threads, load_model, model_logits
    from evalkit.sensitivity.measure import _forward_from, load_calibration
    configure_threads(2)
    cal = load_calibration(TINY, str(corpus), 64, 2, 128)
    m = load_model(TINY)
    toks, w = cal.corpus.chunks, cal.corpus.window
    full = model_logits(m, toks, w.first_row).copy()
    cap = dict.fromkeys(range(1, len(m.blk) + 1))
    _forward_from(m, toks, 0, None, w.first_row, None, cap)
    for layer in range(1, len(m.blk) + 1):
        part = _forward_from(m, toks, layer, cap[layer], w.first_row, None, {}).numpy()
        assert np.array_equal(part, full), layer


def test_swap_restores_the_model(corpus):
    from evalkit.evaluation.forward import load_model, model_logits
    from evalkit.sensitivity.swap import SwapError, WeightSwapper
    from evalkit.sources import open_source
    m = load_model(TINY)
    toks = np.arange(40, dtype=np.int64).reshape(1, 40) + 300
    before = model_logits(m, toks).copy()
    sw = WeightSwapper(m, open_source(TINY))
    with sw.swapped({"blk.0.ffn_up.weight": "IQ2_K", "output.weight": "IQ4_NL"}) as packed:
        assert m.blk[0].ffn_up.type_name == "IQ2_K" and m.output.type_name == "IQ4_NL"
        assert packed["blk.0.ffn_up.weight"][0].shape == (768, 256 // 256 * 76)
        assert not np.array_equal(model_logits(m, toks), before)
    assert m.blk[0].ffn_up.type_name == "F16" and m.output.type_name == "Q8_0"
    assert np.array_equal(model_logits(m, toks), before)
    with pytest.raises(SwapError, match="not a packed weight"):
        sw.modules("blk.0.attn_norm.weight")


def test_swapped_bytes_are_quantize_models(tmp_path):
    """With an imatrix too: the bytes swapped in are those `evalkit quantize --override` writes."""
    from evalkit.gguf import GGUFFile
    from evalkit.recipes import TypeOptions, quantize_model
    from evalkit.sensitivity.swap import WeightSwapper
    from evalkit.sources import open_source
    im = GOLDEN / "gguf" / "tiny-base.imatrix"
    want = {"blk.0.ffn_down.weight": "IQ2_K", "blk.1.attn_q.weight": "IQ4_KS"}
    out = tmp_path / "o.gguf"
    quantize_model(TINY, out, "Q8_0", imatrix=str(im), progress=False,
                   options=TypeOptions(overrides=[f"^{n.replace('.', chr(92) + '.')}$={t}" for n, t in want.items()]))
    plain = WeightSwapper(None, open_source(TINY)).packed(want)
    packed = WeightSwapper(None, open_source(TINY), imatrix=str(im)).packed(want)
    with GGUFFile(out) as f:
        for n, t in want.items():
            assert packed[n][1] == t and f.tensors[n].type_name == t
            assert np.array_equal(packed[n][0], f.tensor_bytes(n))
            assert not np.array_equal(plain[n][0], f.tensor_bytes(n))      # the imatrix mattered


@pytest.mark.slow
def test_killed_pass_resumes_identically(tiny_pass, corpus, tmp_path, monkeypatch):
    from evalkit.sensitivity import measure, sweep
    tmp, res = tiny_pass
    shutil.copytree(tmp / "tiny", tmp_path / "tiny")
    parts = sorted((tmp_path / "tiny" / "partial").glob("chunk_*.npz"))
    assert len(parts) == 4 * len(TYPES)
    for p in parts[:2]:
        p.unlink()
    calls = {"n": 0}
    real = measure.Measurer.measure

    def counting(self, *a, **kw):
        calls["n"] += 1
        return real(self, *a, **kw)
    monkeypatch.setattr(measure.Measurer, "measure", counting)
    again = sweep.sensitivity(_cfg(tmp_path, corpus), progress=False)
    assert calls["n"] == 2                      # only the two lost measurements ran again
    cols = ["group", "requested_type", "bytes", "kld_mean", "kld_err", "kld_p99", "same_top_p"]
    assert again.frame()[cols].equals(res.frame()[cols])


def _facts(name, shape, src="F16"):
    from evalkit.sensitivity.groups import tensor_kind
    layer, kind = tensor_kind(name)
    n = int(np.prod(shape))
    return TensorFacts(name, shape, src, 2 * n, n, layer, kind)


def test_candidates_fall_back_like_llama_quantize():
    """Rows of 576 cannot hold 256-blocks: IQ4_K → Q5_0, IQ2_K → IQ4_NL, IQ6_K → Q8_0, and the table says so."""
    g = make_groups([_facts(f"blk.{i}.attn_q.weight", (576, 576)) for i in range(4)] +
                    [_facts(f"blk.{i}.ffn_down.weight", (1536, 576)) for i in range(4)], 4, "bands", 2)
    assert [x.name for x in g] == ["attn_q@0-1", "ffn_down@0-1", "attn_q@2-3", "ffn_down@2-3"]
    c = {x.requested: x for x in candidates_for(g[0], ("IQ2_K", "IQ4_K", "IQ6_K", "Q4_0", "F16"))}
    assert (c["IQ2_K"].type, c["IQ4_K"].type, c["IQ6_K"].type) == ("IQ4_NL", "Q5_0", "Q8_0")
    assert all(c[t].fallback and "576 % 256" in c[t].note for t in ("IQ2_K", "IQ4_K", "IQ6_K"))
    assert c["IQ4_K"].bytes == 2 * 576 * (576 // 32) * 22          # Q5_0: 22 bytes per 32
    assert not c["Q4_0"].fallback and c["Q4_0"].bytes == 2 * 576 * 18 * 18
    assert c["F16"].identical and "copied" in c["F16"].note
    d = {x.requested: x for x in candidates_for(g[1], ("IQ4_K", "IQ1_KT"))}
    assert d["IQ4_K"].type == "IQ4_K" and not d["IQ4_K"].fallback and d["IQ4_K"].bytes == 2 * 576 * 6 * 144
    assert not d["IQ1_KT"].available and "imatrix" in d["IQ1_KT"].note
    assert candidates_for(g[1], ("IQ1_KT",), has_imatrix=True)[0].available
    odd = make_groups([_facts("blk.0.attn_k.weight", (48, 64))], 1, "tensor")
    q = candidates_for(odd[0], ("Q4_0", "IQ4_K"))
    assert not q[0].available and "multiple of 32" in q[0].note
    assert q[1].type == "F16" and q[1].fallback      # Q5_0 does not fit 48 either: F16, as the reference


def test_config_errors(tmp_path):
    with pytest.raises(SensitivityError, match="unknown key 'typo'"):
        sensitivity_config({"typo": 1})
    with pytest.raises(SensitivityError, match="IQ9_K"):
        SensitivityConfig(types=("IQ4_K", "IQ9_K"))
    with pytest.raises(SensitivityError, match="grouping"):
        SensitivityConfig(grouping="layers")
    with pytest.raises(SensitivityError, match="not a quantized type"):
        SensitivityConfig(types=("F16",))
    with pytest.raises(SensitivityError, match="no tensor of kind 'attn_qkv'"):
        make_groups([_facts("blk.0.attn_q.weight", (256, 256))], 1, kinds=("attn_qkv",))
    assert SensitivityConfig(types=("iq4_k", "IQ4_K", "q8_0")).types == ("IQ4_K", "Q8_0")


def test_cli_bad_input_exit_2(tmp_path, corpus, capsys):
    from evalkit.cli import main
    args = ["sensitivity", "--base", str(TINY), "--corpus", str(corpus), "--ctx", "64", "--chunks", "1",
            "--output-dir", str(tmp_path)]
    assert main(args + ["--types", "IQ4_K", "IQ9_Z"]) == 2
    assert "IQ9_Z" in capsys.readouterr().err
    assert main(args + ["--kinds", "attn_qkv"]) == 2
    assert "attn_qkv" in capsys.readouterr().err
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: x\nbands: 0\n")
    assert main(["sensitivity", str(cfg)]) == 2
    assert "'bands' must be a positive integer" in capsys.readouterr().err


def test_kld_results_csv_layout(tiny_pass):
    """GGUF-Tool-Suite's layout: QTYPE column, tensors in `sort -V` order, its qtype spelling, 6 decimals."""
    tmp, res = tiny_pass
    text = (tmp / "tiny" / "kld_results.csv").read_text()
    lines = text.splitlines()
    header = lines[0].split(",")
    assert header[0] == "QTYPE"
    names = [n for g in res.groups for n in g.names]
    gnu = subprocess.run(["sort", "-V"], input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True, env={"LC_ALL": "C"}).stdout.split()
    assert header[1:] == gnu
    assert [ln.split(",")[0] for ln in lines[1:]] == ["iq2_k", "iq4_k", "q8_0"]
    df = pd.read_csv(tmp / "tiny" / "kld_results.csv", dtype=str)
    rows = {(r["group"], r["requested_type"]): r["kld_mean"] for r in res.rows}
    for q, t in (("iq2_k", "IQ2_K"), ("q8_0", "Q8_0")):
        for n in names:
            cell = df.loc[df.QTYPE == q, n].item()
            assert cell == f"{rows[(n[:-len('.weight')], t)]:.6f}"


def test_filevercmp_matches_gnu_sort():
    from evalkit.sensitivity.outputs import filevercmp, qtype_name
    names = ["token_embd.weight", "output.weight", "blk.10.attn_q.weight", "blk.2.attn_q.weight",
             "blk.2.attn_qkv.weight", "blk.2.attn_k_b.weight", "blk.2.attn_k.weight", "blk.1.ffn_up_exps.weight",
             "blk.1.ffn_up.weight", "blk.1.ffn_up_shexp.weight", "blk.100.ffn_down.weight", "blk.9.ffn_down.weight",
             "blk.9.ffn_gate_inp.weight", "rope_freqs.weight", "blk.03.attn_v.weight", "a1b.c", "a1b.c2"]
    gnu = subprocess.run(["sort", "-V"], input="\n".join(names) + "\n", capture_output=True, text=True,
                         check=True, env={"LC_ALL": "C"}).stdout.split()
    assert sorted(names, key=functools.cmp_to_key(filevercmp)) == gnu
    assert [qtype_name(t) for t in ("IQ4_K", "Q6_K", "Q8_0", "IQ4_KSS", "Q8_KV")] == \
        ["iq4_k", "q6_K", "q8_0", "iq4_kss", "q8_KV"]


@pytest.mark.slow
def test_smollm2_table_shows_fallbacks(tmp_path, corpus):
    """SmolLM2's rows of 576 fall back; its ffn_down rows of 1536 do not."""
    from evalkit.sensitivity.sweep import sensitivity
    cfg = SensitivityConfig(name="smol", base="smollm2", corpus=str(corpus), ctx=64, chunks=1, threads=2,
                            types=("IQ4_K",), kinds=("attn_v", "ffn_down"), bands=1, output_dir=str(tmp_path))
    res = sensitivity(cfg, progress=False)
    rows = {r["group"]: r for r in res.rows}
    assert set(rows) == {"attn_v@0-29", "ffn_down@0-29"}
    v, d = rows["attn_v@0-29"], rows["ffn_down@0-29"]
    assert (v["type"], v["fallback"]) == ("Q5_0", True) and "576 % 256" in v["note"]
    assert (d["type"], d["fallback"]) == ("IQ4_K", False)
    assert v["bytes"] == 30 * 192 * 18 * 22 and d["bytes"] == 30 * 576 * 6 * 144
    assert v["kld_mean"] > 0 and d["kld_mean"] > 0
    assert "→Q5_0" in (tmp_path / "smol" / "summary.md").read_text()


def test_candidate_bytes_count_row_headers():
    """Types with a per-row header: bytes = rows × (header + blocks), the header sizes and block
    bytes taken from the format spec (iqk-formats.md: IQ4_KS float32 + 136/256, IQ2_KS and IQ2_KL
    fp16 + 70 / 86 per 256, IQ3_KT float32 + 100 per 256)."""
    g = make_groups([_facts(f"blk.{i}.ffn_down.weight", (1536, 576)) for i in range(2)], 2, "bands", 1)[0]
    spec = {"IQ4_KS": (4, 136), "IQ2_KS": (2, 70), "IQ2_KL": (2, 86), "IQ3_KT": (4, 100)}
    for c in candidates_for(g, tuple(spec), has_imatrix=True):
        header, block = spec[c.requested]
        assert c.available and not c.fallback and c.type == c.requested
        assert c.bytes == 2 * 576 * (header + 1536 // 256 * block), c.requested


# ---- kld_results.csv read the way GGUF-Tool-Suite's quant_assign.py reads it ------------------
# Thireus/GGUF-Tool-Suite quant_assign.py (main(), select_qtype(), _convert_value(), the "404"
# sentinel of the unmeasured-kld inheritance, fetch_map_for_qtype()'s casing checks), re-implemented:
#   df = pd.read_csv(csv_file); 'QTYPE' must be a column; the row is --qtype's (exact, case-sensitive)
#   or the one with the smallest first integer in its QTYPE, preferring names not ending in '_bn';
#   each tensor column's cell is '404' (unmeasured), a float, or a percentage string; NaN is an error.

def _extract_quant_num(q: str) -> float:
    m = re.search(r"(\d+)", q)
    return int(m.group(1)) if m else math.inf


def _is_404(v) -> bool:
    if isinstance(v, str):
        return v.strip() in ("404", "404.0", "404%", "404.0%")
    try:
        return float(v) == 404.0
    except (TypeError, ValueError):
        return False


def _convert_value(v) -> float:
    if isinstance(v, str) and v.endswith("%"):
        return float(v.rstrip("%")) / 100.0
    return float(v)


def _quant_assign_read(path, qtype: str | None = None):
    """(selected QTYPE, {tensor: kld}, [unmeasured tensors]) as quant_assign.py gets them."""
    df = pd.read_csv(path)
    assert "QTYPE" in df.columns, "Error: CSV must have 'QTYPE' as first column."
    if qtype is not None:
        assert qtype in df["QTYPE"].values, f"Error: qtype '{qtype}' not found in CSV."
        row = df[df["QTYPE"] == qtype].iloc[0]
    else:
        df["__quant_num__"] = df["QTYPE"].map(_extract_quant_num)
        non_bn = df[~df["QTYPE"].str.endswith("_bn")]
        row = (non_bn if not non_bn.empty else df).nsmallest(1, "__quant_num__").iloc[0]
        df = df.drop(columns="__quant_num__")
    values, unmeasured = {}, []
    for name in (c for c in df.columns if c != "QTYPE"):          # --tensors-from-csv
        raw = row[name]
        if _is_404(raw):
            unmeasured.append(name)
            continue
        assert not pd.isna(raw), f"missing metric for {name}"
        v = _convert_value(raw)
        assert not np.isnan(v), f"Error: could not parse numeric value for tensor {name!r}: {raw!r}"
        values[name] = v
    return row["QTYPE"], values, unmeasured


def _canonical_casing(q: str) -> bool:
    """fetch_map_for_qtype's checks: q…k must end in K, q…kv in KV, and no name all upper case."""
    if re.match(r"^q.*kv$", q, re.I):
        return bool(re.match(r"^q.*KV$", q)) and not q.isupper()
    if re.match(r"^q.*k$", q, re.I):
        return bool(re.match(r"^q.*K$", q)) and not q.isupper()
    return not q.isupper()


def test_kld_results_csv_loads_like_quant_assign(tiny_pass, tmp_path):
    """Our kld_results.csv read as quant_assign.py reads it: every row selectable, every value the
    table's mean KLD; an unmeasured (group, type) is the '404' sentinel it treats as unmeasured."""
    import dataclasses
    from evalkit.sensitivity.outputs import kld_results_csv
    tmp, res = tiny_pass
    path = tmp / "tiny" / "kld_results.csv"
    by = {(r["group"], r["requested_type"]): r["kld_mean"] for r in res.rows}
    names = [n for g in res.groups for n in g.names]
    q, values, unmeasured = _quant_assign_read(path)
    assert q == "iq2_k" and not unmeasured and set(values) == set(names)   # lowest quant by default
    for typ in TYPES:
        q, values, _ = _quant_assign_read(path, typ.lower())
        assert _canonical_casing(q)
        for n in names:
            assert values[n] == pytest.approx(by[(n[:-len(".weight")], typ)], abs=5e-7)
    # a (group, type) that could not be measured: NaN in the table, '404' in the file
    rows = [dict(r) for r in res.rows]
    lost = next(r for r in rows if r["group"] == "blk.1.attn_v" and r["requested_type"] == "IQ2_K")
    lost.update(available=False, kld_mean=float("nan"))
    other = tmp_path / "kld_results.csv"
    other.write_text(kld_results_csv(dataclasses.replace(res, rows=rows)))
    _, values, unmeasured = _quant_assign_read(other, "iq2_k")
    assert unmeasured == ["blk.1.attn_v.weight"] and len(values) == len(names) - 1


def test_committed_kld_results_load_like_quant_assign():
    """The committed SmolLM2 kld_results.csv (fallback types included) loads there too."""
    path = REPO / "results" / "smollm2-recipes-kld_results.csv"
    qtypes = list(pd.read_csv(path)["QTYPE"])
    assert qtypes == ["iq2_k", "iq3_k", "iq4_k", "iq5_k", "iq6_k", "q8_0"]
    for q in qtypes:
        got, values, unmeasured = _quant_assign_read(path, q)
        assert got == q and _canonical_casing(q) and not unmeasured
        assert len(values) == 30 * 7 + 1 and all(v >= 0 for v in values.values())
