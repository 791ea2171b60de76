"""Importance matrices of MoE models: per-expert sums and counts as llama-imatrix keeps them
(checked against an independent float64 computation from plain torch hooks), both file
formats with per-expert data, per-expert slices when quantizing, and the quantizer's named
errors for expert rows that fit no block and for read-only target types."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SHARED
from evalkit.cli import main as run_cli
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.imatrix import (ImatrixEntry, ImatrixStats, load_imatrix, read_imatrix_stats, write_imatrix_gguf,
                             write_imatrix_legacy)
from evalkit.imatrix_tools import ImatrixCollector, compute_imatrix

CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"
EXPERT_PARTS = ("gate", "up", "down")


# --------------------------------------------------------------------------- an independent computation

def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


class PlainRecorder:
    """Plain torch forward hooks on every MoE router: its input rows and logits, nothing else.
    The experts' statistics are then recomputed here in float64 (routing from the logits,
    SwiGLU from the file's own expert weights), independently of evalkit's collector."""

    def __init__(self, model):
        from evalkit.model.moe import MoEFFN
        self.calls: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.moes = {i: m for i, b in enumerate(model.blk) for m in b.modules() if isinstance(m, MoEFFN)}
        self.handles = [m.ffn_gate_inp.register_forward_hook(self._hook(i)) for i, m in self.moes.items()]

    def _hook(self, layer: int):
        def hook(module, args, out):
            self.calls.setdefault(layer, []).append((args[0].numpy().copy(), out.numpy().copy()))
        return hook

    def route(self, layer: int, logits: np.ndarray) -> np.ndarray:
        """(N, k) chosen experts: softmax or sigmoid, plus the selection bias, top k."""
        m = self.moes[layer]
        z = torch.from_numpy(logits)
        p = torch.softmax(z, dim=-1) if m.gating == "softmax" else torch.sigmoid(z)
        if m.exp_probs_b is not None:
            p = p + m.exp_probs_b
        return torch.topk(p, m.k, dim=-1).indices.numpy()


def _expected_layer(g: GGUFFile, layer: int, rec: PlainRecorder, seqs: int, keep: int) -> dict:
    """{entry name: (sums (n_mat, n) float64, counts)} of one MoE layer over the recorded
    calls; ``keep`` positions of each of ``seqs`` sequences count for the dense weights."""
    W = {p: g.dequantize(f"blk.{layer}.ffn_{p}_exps.weight").astype(np.float64) for p in ("gate", "up")}
    X = W["gate"].shape[0]
    n, f = W["gate"].shape[2], W["gate"].shape[1]
    exp = {"gate": np.zeros((X, n)), "down": np.zeros((X, f))}
    counts = np.zeros(X, dtype=np.int64)
    dense = np.zeros(n)
    shared = f"blk.{layer}.ffn_gate_shexp.weight" in g.tensors
    sh = {p: g.dequantize(f"blk.{layer}.ffn_{p}_shexp.weight").astype(np.float64) for p in ("gate", "up")} \
        if shared else None
    sh_down = 0.0
    for h, logits in rec.calls[layer]:
        chosen = rec.route(layer, logits)
        h64 = h.astype(np.float64)
        for t, row in enumerate(h64):
            for e in chosen[t]:
                exp["gate"][e] += row ** 2
                exp["down"][e] += (_silu(W["gate"][e] @ row) * (W["up"][e] @ row)) ** 2
                counts[e] += 1
        counted = h64.reshape(seqs, -1, n)[:, :keep].reshape(-1, n)       # the dense 16-row rule
        dense += (counted ** 2).sum(axis=0)
        if shared:
            sh_down = sh_down + ((_silu(counted @ sh["gate"].T) * (counted @ sh["up"].T)) ** 2).sum(axis=0)
    out = {f"blk.{layer}.ffn_{p}_exps.weight": (exp["down" if p == "down" else "gate"], counts)
           for p in EXPERT_PARTS}
    dense_names = ["ffn_gate_inp"] + (["ffn_gate_shexp", "ffn_up_shexp"] if shared else [])
    out.update({f"blk.{layer}.{d}.weight": (dense[None], None) for d in dense_names})
    if shared:
        out[f"blk.{layer}.ffn_down_shexp.weight"] = (np.asarray(sh_down)[None], None)
    return out


@pytest.mark.parametrize("key", ["tiny-qwen3moe", "tiny-deepseek2"])
def test_collector_matches_an_independent_float64_computation(moe_model, key):
    """Two sequences of 40 tokens in micro-batches of 32: the experts count every row (and 2
    calls per sequence), the router and shared experts only the first 32 positions (the
    8-token tail is under the 16-row minimum). Sums within float32 accumulation, counts exact."""
    from evalkit.evaluation.forward import load_model
    path = moe_model(key)
    model, g = load_model(path), GGUFFile(path)
    tokens = torch.from_numpy(np.random.default_rng(7).integers(0, model.config.n_vocab, (2, 40)))
    col, rec = ImatrixCollector(ubatch=32), PlainRecorder(model)
    with col.hooked(model):
        model.forward(tokens)
    for h in rec.handles:
        h.remove()
    stats = col.stats(1, 40, ["random"])
    k = model.config.n_expert_used
    assert rec.moes and set(rec.calls) == set(rec.moes)
    for layer in rec.moes:
        for name, (sums, counts) in _expected_layer(g, layer, rec, seqs=2, keep=32).items():
            e = stats.entries[name]
            assert e.sums.shape == sums.shape, name
            np.testing.assert_allclose(e.sums, sums, rtol=2e-5, atol=2e-5 * sums.max(), err_msg=name)
            if counts is None:                                         # dense: 2 × 32 rows, 2 calls
                assert e.counts.tolist() == [64] and e.ncall == 2, name
            else:                                                      # experts: every row, 2 × 2 calls
                assert e.counts.tolist() == counts.tolist() and e.counts.sum() == 80 * k and e.ncall == 4, name
    # every entry is a tensor of the file, with one vector per matrix (expert)
    for name, e in stats.entries.items():
        shape = g.tensors[name].shape
        assert (shape[0], shape[2] if len(shape) > 2 else 1) == (e.n_per_row, e.n_mat), name


# --------------------------------------------------------------------------- a computed MoE imatrix, both formats

@pytest.fixture(scope="module")
def moe_imatrix(moe_model, tmp_path_factory):
    """tiny-qwen3moe's imatrix over 2 chunks of 64 tokens (two chunks per forward call), as
    legacy and GGUF files."""
    path = moe_model("tiny-qwen3moe")
    res = compute_imatrix(str(path), str(CORPUS), ctx=64, chunks=2, threads=2, batch=128, progress=False,
                          out=None)
    d = tmp_path_factory.mktemp("moe-imatrix")
    write_imatrix_legacy(d / "m.dat", res.stats)
    write_imatrix_gguf(d / "m.gguf", res.stats)
    return path, res.stats, d


def test_compute_imatrix_counts_experts_per_chunk(moe_imatrix):
    path, stats, _ = moe_imatrix
    g = GGUFFile(path)
    experts = [n for n in stats.entries if "_exps." in n]
    assert len(experts) == 3 * 4 and {f"blk.0.ffn_{p}_exps.weight" for p in EXPERT_PARTS} <= set(experts)
    assert "blk.0.ffn_gate_inp.weight" in stats.entries
    for name, e in stats.entries.items():
        if name in experts:
            assert e.n_mat == 8 and e.ncall == 2 and e.counts.sum() == 2 * 64 * 2, name   # k = 2 per token
        else:
            assert e.n_mat == 1 and e.ncall == 2 and e.counts.tolist() == [128], name
        assert name in g.tensors


def test_gguf_holds_per_expert_sums_and_counts(moe_imatrix):
    """Mainline's layout, read with the gguf package: in_sum2 (n_per_row × n_expert), counts (1 × n_expert)."""
    from gguf import GGUFReader
    _, stats, d = moe_imatrix
    tensors = {t.name: t for t in GGUFReader(d / "m.gguf").tensors}
    name = "blk.2.ffn_down_exps.weight"
    e = stats.entries[name]
    assert list(tensors[name + ".in_sum2"].shape) == [256, 8] and list(tensors[name + ".counts"].shape) == [1, 8]
    np.testing.assert_array_equal(np.asarray(tensors[name + ".counts"].data).reshape(-1), e.counts.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(tensors[name + ".in_sum2"].data).reshape(8, 256), e.sums_f32())
    back = read_imatrix_stats(d / "m.gguf").entries[name]
    assert back.counts.tolist() == e.counts.tolist() and np.array_equal(back.sums_f32(), e.sums_f32())


def test_legacy_values_are_per_expert_averages_times_ncall(moe_imatrix):
    _, stats, d = moe_imatrix
    loaded = load_imatrix(d / "m.dat")
    for name in ("blk.0.ffn_up_exps.weight", "blk.3.ffn_down_exps.weight"):
        e = stats.entries[name]
        want = (e.sums / e.counts[:, None]).reshape(-1)              # what llama-quantize divides out
        np.testing.assert_allclose(loaded.data[name], want, rtol=3e-7)


def test_legacy_to_gguf_to_legacy_is_byte_identical(moe_imatrix, tmp_path):
    _, _, d = moe_imatrix
    write_imatrix_gguf(tmp_path / "c.gguf", read_imatrix_stats(d / "m.dat", chunk_size=64))
    write_imatrix_legacy(tmp_path / "back.dat", read_imatrix_stats(tmp_path / "c.gguf"))
    assert (tmp_path / "back.dat").read_bytes() == (d / "m.dat").read_bytes()


def test_gguf_imatrix_quantizes_experts_like_the_legacy_file(moe_imatrix, tmp_path):
    """The quantizer with the GGUF conversion of the legacy file gives its very bytes; with the
    GGUF written from the statistics (per-expert counts) the vectors agree within an ulp."""
    from evalkit.recipes.model_quantizer import load_imatrix_arg, quantize_tensor
    from evalkit.recipes.options import TypeOptions
    from evalkit.recipes.plan import build_plan
    from evalkit.sources import open_source
    path, _, d = moe_imatrix
    write_imatrix_gguf(tmp_path / "c.gguf", read_imatrix_stats(d / "m.dat", chunk_size=64))
    source = open_source(path)
    try:
        got = {}
        for f in (d / "m.dat", tmp_path / "c.gguf"):
            im, label = load_imatrix_arg(str(f))
            plan = build_plan(source, "IQ4_K", TypeOptions(), im, label)
            tps = [tp for tp in plan.tensors if tp.name.startswith("blk.1.ffn_") and "_exps" in tp.name]
            assert len(tps) == 3 and all(tp.imatrix_name == tp.name for tp in tps)
            got[f.name] = [quantize_tensor(source, tp, im.data[tp.imatrix_name], threads=2).tobytes() for tp in tps]
        assert got["m.dat"] == got["c.gguf"]
    finally:
        source.close()
    a, b = load_imatrix(d / "m.dat").data, load_imatrix(d / "m.gguf").data
    assert list(a) == list(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1.2e-7, atol=0, err_msg=name)


def test_expert_tensor_quantized_slice_by_slice_with_its_own_imatrix_row(moe_imatrix):
    """quantize_tensor on a 3-D expert tensor == each expert's 2-D slice through evalkit.quantize
    with that expert's imatrix row, concatenated."""
    import evalkit
    from evalkit.recipes.model_quantizer import quantize_tensor
    from evalkit.recipes.plan import TensorPlan
    from evalkit.sources import open_source
    path, _, d = moe_imatrix
    vec = load_imatrix(d / "m.dat").data["blk.2.ffn_gate_exps.weight"]
    source = open_source(path)
    try:
        info = {t.name: t for t in source.tensors}["blk.2.ffn_gate_exps.weight"]
        tp = TensorPlan(1, info.name, tuple(info.shape), info.type_name, "IQ3_K", True, "test", info.nbytes, 0)
        got = quantize_tensor(source, tp, vec, threads=2)
        x = source.rows_f32(info.name, 2).reshape(8, 256, 256)
    finally:
        source.close()
    want = np.concatenate([evalkit.quantize(x[e], "IQ3_K", imatrix=vec[e * 256:(e + 1) * 256], threads=2)
                           for e in range(8)])
    assert np.array_equal(got, want)
    assert not np.array_equal(got, evalkit.quantize(x.reshape(-1, 256), "IQ3_K", imatrix=vec[:256], threads=2))


# --------------------------------------------------------------------------- evalkit quantize: fallbacks, named errors

def _moe_file(path, ne0: int, n_ff: int, n_expert: int = 4):
    """A one-layer llama file (F32) of width ``ne0`` with ``n_expert`` experts ``n_ff`` wide."""
    rng = np.random.default_rng(ne0 + n_ff)
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
    return data


def _expert_imatrix(path, ne0: int, n_ff: int, n_expert: int = 4) -> None:
    rng = np.random.default_rng(3)
    entries = {f"blk.0.ffn_{p}_exps.weight": ImatrixEntry(rng.uniform(1, 9, (n_expert, n)) * 50, [50] * n_expert, 1)
               for p, n in (("gate", ne0), ("up", ne0), ("down", n_ff))}
    write_imatrix_legacy(path, ImatrixStats(entries, 1, 64, ["x"]))


def test_quantize_cli_falls_back_for_expert_rows_like_the_reference(tmp_path):
    """Rows of 96 do not fit IQ4_K's 256: llama-quantize's change_type_if_necessary takes Q5_0
    (gate/up experts), each expert with its own imatrix row. ffn_down_exps rows of 80 fit
    neither IQ4_K nor Q5_0: evalkit's plan stores them F16 (rules.fallback_type)."""
    import evalkit
    src, im, out = tmp_path / "m.gguf", tmp_path / "m.dat", tmp_path / "q.gguf"
    data = _moe_file(src, 96, 80)
    _expert_imatrix(im, 96, 80)
    assert run_cli(["quantize", str(src), str(out), "--type", "IQ4_K", "--imatrix", str(im), "--threads", "2",
                    "--no-progress"]) == 0
    g, vecs = GGUFFile(out), load_imatrix(im).data
    for name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"):
        assert g.tensors[name].type_name == "Q5_0"
        x = data[name].reshape(4, 80, 96)
        want = np.concatenate([evalkit.quantize(x[e], "Q5_0", imatrix=vecs[name][e * 96:(e + 1) * 96])
                               for e in range(4)])
        assert np.array_equal(g.tensor_bytes(name).reshape(want.shape), want), name
    assert g.tensors["blk.0.ffn_down_exps.weight"].type_name == "F16"


def test_quantize_into_a_read_only_type_is_a_named_error(tmp_path, capsys):
    """IQ4_XS and Q8_KV are dequantize-only in evalkit: KernelGapError (an EvalkitError) naming
    the type and the tensors, before any output exists; exit 2 from the CLI."""
    from evalkit.errors import EvalkitError
    from evalkit.recipes import TypeOptions, quantize_model
    from evalkit.recipes.plan import KernelGapError
    src, out = tmp_path / "m.gguf", tmp_path / "q.gguf"
    _moe_file(src, 256, 256)
    for t in ("IQ4_XS", "Q8_KV"):
        with pytest.raises(KernelGapError, match=rf"{t} is read-only in evalkit.*needed by blk\.0\.ffn_down_exps"):
            quantize_model(src, out, "IQ4_K", options=TypeOptions(overrides=(f"ffn_down_exps={t}",)),
                           progress=False)
    assert issubclass(KernelGapError, EvalkitError) and not out.exists()
    assert run_cli(["quantize", str(src), str(out), "--type", "Q4_0", "--override", "attn_.*=iq4_xs",
                    "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "IQ4_XS is read-only" in err and "blk.0.attn_q.weight" in err and not out.exists()
