"""The quantizers' noise floor behind "same KLD to 4 digits" (issue #17): SmolLM2 with only its
ffn_down weights quantized (IQ2_K, IQ4_K) with (a) the reference's calibration imatrix,
(b) evalkit's imatrix of the same text, (c) the reference's imatrix perturbed by (1 + ε·N(0,1)),
ε per ffn_down entry the RMS of (b)/(a) - 1 of that entry, for a few seeds.

    .venv/bin/python bench/imatrix_noise.py [--work /tmp/evalkit-imatrix-noise] [--seeds 5]
        [--chunks 40] [--threads 2] [--stop-after-min 70] [--results results]

Evaluation: the first ``--chunks`` chunks of 512 of the bundled WikiText-2 test split (the chunks
of tests/test_imatrix_smollm2.py's ``ffn_down_kld``; they end before the calibration text,
lines 1500.., which is checked), mean KLD(base ‖ variant) over llama-perplexity's scored rows,
float64 log-softmax, as that helper computes it (same groups of 4 chunks per forward call).
The base's final hidden states are computed once; each variant's base logits are recomputed
from them with the model's own output projection (bit-identical: checked on the first group).
Every step is cached in --work (evalkit's imatrix, the base hidden states, each finished
variant), so a killed run resumes; --stop-after-min stops starting new variants after that
long and reports what is done. A quantization-only scan counts the blocks that change for a
uniform ε of 1e-7 … 1e-4 and for pure scalings of (a). Writes <results>/smollm2-imatrix-noise.json
and .md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from evalkit.errors import EvalkitError

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EVALKIT_SHARED", REPO.parent / "shared"))
CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"
REF_IMATRIX = SHARED / "golden" / "gguf" / "smollm2-calib.imatrix"
CALIB_FIRST_LINE = 1500            # `tail -n +1500`: the calibration text of the golden imatrix
TYPES = ("IQ2_K", "IQ4_K")
GROUP = 4                          # chunks per forward call, as the test helper


class NoiseBenchError(EvalkitError):
    """A precondition of the measurement does not hold (named file or value)."""


def atomic_write(path: Path, text: str) -> None:
    """Write text through a temporary file and a rename."""
    from evalkit.files import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------- imatrices

def evalkit_imatrix(work: Path, threads: int):
    """evalkit's imatrix of lines 1500.. of the corpus, 64 chunks of 512 (as the golden file and
    the test fixture), computed once and kept in ``work`` as a GGUF imatrix (exact Σx², counts)."""
    from evalkit.imatrix import load_imatrix, write_imatrix
    from evalkit.imatrix_tools import compute_imatrix
    path = work / "evalkit-calib.gguf"
    if not path.exists():
        lines = CORPUS.read_text(encoding="utf-8").split("\n")
        calib = work / "calib.txt"
        atomic_write(calib, "\n".join(lines[CALIB_FIRST_LINE - 1:]))
        res = compute_imatrix("smollm2", str(calib), ctx=512, chunks=64, threads=threads, progress=True,
                              out=None, dataset="calib.txt")
        write_imatrix(path, res.stats, "gguf")          # atomic
    return load_imatrix(path)


def ffn_down_names(n_layer: int) -> list[str]:
    """The ffn_down weight names, layer order."""
    return [f"blk.{i}.ffn_down.weight" for i in range(n_layer)]


def relative_difference(ref, ours, names: list[str]) -> dict:
    """Per entry of ``names``: RMS, mean and max |·| of ours/ref - 1; pooled RMS over all of them."""
    per, pooled = {}, []
    for n in names:
        a, b = ref.data[n].astype(np.float64), ours.data[n].astype(np.float64)
        if a.shape != b.shape or not (a > 0).all():
            raise NoiseBenchError(f"imatrix entry {n}: shapes {a.shape}/{b.shape} or non-positive reference values")
        r = b / a - 1
        pooled.append(r)
        per[n] = {"rms": float(np.sqrt(np.mean(r * r))), "mean": float(r.mean()), "max_abs": float(np.abs(r).max()),
                  "bit_identical": int((a == b).sum()), "n": int(r.size)}
    r = np.concatenate(pooled)
    return {"per_entry": per, "pooled_rms": float(np.sqrt(np.mean(r * r))), "pooled_mean": float(r.mean()),
            "pooled_max_abs": float(np.abs(r).max()), "pooled_bit_identical_fraction": float(np.mean(r == 0))}


def perturbed(ref, eps: dict[str, float], seed: int):
    """A copy of ``ref`` whose entries in ``eps`` are multiplied by (1 + eps[name]·N(0,1)), float32."""
    from evalkit.imatrix import Imatrix
    rng = np.random.default_rng(seed)
    data = dict(ref.data)
    for name, e in eps.items():        # dict order: layer order, so a seed always draws the same noise
        v = ref.data[name]
        data[name] = (v.astype(np.float64) * (1.0 + e * rng.standard_normal(v.shape))).astype(np.float32)
        if not (data[name] > 0).all():
            raise NoiseBenchError(f"seed {seed}: perturbed entry {name} has a non-positive value (ε {e})")
    return Imatrix(data, f"{ref.path}+noise(seed {seed})", ref.dataset, ref.chunks, list(ref.datasets))


# --------------------------------------------------------------------------- quantization

def quantize_ffn_down(weights: list[np.ndarray], names: list[str], type_name: str, imatrix, threads: int):
    """Packed bytes of every ffn_down weight in ``type_name`` with ``imatrix``'s vectors."""
    from evalkit.codec import quantize
    return [quantize(w, type_name, imatrix=imatrix.data[n], threads=threads) for w, n in zip(weights, names)]


def differing_blocks(qa: list[np.ndarray], qb: list[np.ndarray], type_name: str) -> tuple[list[int], int]:
    """(flat indices of the blocks whose bytes differ, all blocks) between two quantizations of
    the same tensors; blocks are numbered tensor after tensor, row-major within a tensor."""
    from evalkit.formats import get_format
    f = get_format(type_name)
    diff, total = [], 0
    for a, b in zip(qa, qb):
        rows = a.shape[0]
        blocks_a = a[:, f.header_bytes:].reshape(rows, -1, f.type_size)
        blocks_b = b[:, f.header_bytes:].reshape(rows, -1, f.type_size)
        ne = (blocks_a != blocks_b).any(axis=-1)
        if f.header_bytes:                      # a changed row header changes the whole row
            ne |= (a[:, :f.header_bytes] != b[:, :f.header_bytes]).any(axis=-1, keepdims=True)
        diff += (total + np.flatnonzero(ne)).tolist()
        total += ne.size
    return diff, total


# --------------------------------------------------------------------------- evaluation

class FfnDownKld:
    """SmolLM2 with swappable ffn_down layers, scored against a base computed once."""

    def __init__(self, n_chunks: int, threads: int, work: Path):
        from evalkit.evaluation.corpus_chunks import chunk_corpus, tokenizer_for
        from evalkit.evaluation.forward import configure_threads, load_model
        from evalkit.sources import open_source, smollm2_path
        configure_threads(threads)
        path = smollm2_path()
        tok = tokenizer_for(path)
        text = CORPUS.read_text(encoding="utf-8")
        self.cc = chunk_corpus(tok, tok.encode(text), "", "", 512, n_chunks)
        self.n_chunks, self.work = n_chunks, work
        self.eval_tokens = n_chunks * 512
        self.calib_first_token = len(tok.encode("\n".join(text.split("\n")[:CALIB_FIRST_LINE - 1])))
        if self.eval_tokens > self.calib_first_token:
            raise NoiseBenchError(f"{n_chunks} chunks of 512 ({self.eval_tokens} tokens) reach the calibration "
                                  f"text of {CORPUS} (line {CALIB_FIRST_LINE} starts near token {self.calib_first_token})")
        self.model, source = load_model(path), open_source(path)
        self.originals = [b.ffn_down for b in self.model.blk]
        self.names = ffn_down_names(len(self.originals))
        self.weights = [source.rows_f32(n) for n in self.names]
        self.hidden, self.base_check = self._base_hidden()

    def _set_ffn_down(self, layers) -> None:
        for blk, lin in zip(self.model.blk, layers):
            blk.ffn_down = lin

    def _logits(self, k: int) -> np.ndarray:
        from evalkit.evaluation.forward import model_logits
        return model_logits(self.model, self.cc.chunks[k:k + GROUP], self.cc.window.first_row)

    def _base_logits(self, k: int) -> np.ndarray:
        """The base's logits of group k recomputed from its stored final hidden states."""
        import torch
        with torch.no_grad():
            return self.model.output(torch.from_numpy(np.ascontiguousarray(self.hidden[k:k + GROUP]))).numpy()

    def _base_hidden(self) -> tuple[np.ndarray, bool]:
        """(K, C - first_row, n_embd) final hidden states of the base, cached in work; and whether
        the first group's logits recomputed from them equal the forward's bit for bit."""
        from tqdm import tqdm
        from evalkit.evaluation.base_cache import HiddenCapture
        path = self.work / f"base-hidden-{self.n_chunks}.npy"
        self._set_ffn_down(self.originals)
        if path.exists():
            hidden = np.load(path)
        else:
            parts = []
            with HiddenCapture(self.model) as cap:
                for k in tqdm(range(0, self.n_chunks, GROUP), desc="base", unit="group"):
                    self._logits(k)
                    parts.append(cap.last)
            hidden = np.concatenate(parts)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
            np.save(tmp, hidden)
            os.replace(tmp, path)
        self.hidden = hidden
        return hidden, bool(np.array_equal(self._base_logits(0), self._logits(0)))

    def kld(self, layers, desc: str) -> dict:
        """Mean KLD(base ‖ model with ``layers`` as ffn_down) and the per-chunk KLD sums."""
        from tqdm import tqdm
        per_chunk = []
        self._set_ffn_down(layers)
        try:
            for k in tqdm(range(0, self.n_chunks, GROUP), desc=desc, unit="group"):
                zq, zb = self._logits(k), self._base_logits(k)
                for j in range(zq.shape[0]):     # one chunk at a time: float64 temporaries stay ~100 MB
                    b = _log_softmax(self.cc.window.scored_rows(zb[j]))
                    q = _log_softmax(self.cc.window.scored_rows(zq[j]))
                    per_chunk.append(float((np.exp(b) * (b - q)).sum()))
        finally:
            self._set_ffn_down(self.originals)
        n_tokens = self.n_chunks * self.cc.window.n_rows
        return {"kld": math.fsum(per_chunk) / n_tokens, "chunk_sums": per_chunk, "n_tokens": n_tokens}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return z - np.logaddexp.reduce(z, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- the sweep

def variant_plan(seeds: int) -> list[tuple[str, str, str, int | None]]:
    """(key, type, imatrix kind, seed) in the order they are run: (a) and (b) first, then the
    perturbed seeds of IQ2_K (the case in question) before IQ4_K's."""
    plan = [(f"{kind}/{t}", t, kind, None) for t in TYPES for kind in ("reference", "evalkit")]
    return plan + [(f"noise{s}/{t}", t, "noise", s) for t in TYPES for s in range(seeds)]


def run_sweep(ev: FfnDownKld, ims: dict, eps: dict, seeds: int, threads: int, work: Path, deadline: float) -> dict:
    """Evaluate every planned variant not yet in work/variants.json (saved after each one)."""
    from evalkit.model.qlinear import QLinear
    import torch
    store = work / f"variants-{ev.n_chunks}.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    ref_q = {t: quantize_ffn_down(ev.weights, ev.names, t, ims["reference"], threads) for t in TYPES}
    for key, t, kind, seed in variant_plan(seeds):
        if key in done:
            continue
        if time.monotonic() > deadline:
            print(f"time limit: {key} and later variants not evaluated")
            break
        im = perturbed(ims["reference"], eps, seed) if kind == "noise" else ims[kind]
        q = ref_q[t] if kind == "reference" else quantize_ffn_down(ev.weights, ev.names, t, im, threads)
        flipped, nb = differing_blocks(ref_q[t], q, t)
        layers = [QLinear(torch.from_numpy(b), t, w.shape[1]) for b, w in zip(q, ev.weights)]
        t0 = time.monotonic()
        res = ev.kld(layers, key)
        nd = len(flipped)
        done[key] = {"type": t, "imatrix": kind, "seed": seed, "blocks_differing": nd, "blocks_total": nb,
                     "blocks_differing_index": flipped,
                     "eval_s": time.monotonic() - t0, **res}
        print(f"{key}: KLD {res['kld']:.6f}, {nd}/{nb} blocks differ from reference/{t}")
        atomic_write(store, json.dumps(done, indent=1))
    return done


def flip_scan(ev: "FfnDownKld", ref, threads: int, work: Path) -> dict:
    """Blocks that differ from (a)'s quantization (no KLD: quantization only) when every ffn_down
    value of (a) is multiplied by (1 + ε·N(0,1)) for ε of 1e-7 … 1e-4 (seeds 100, 101), or all
    by the same factor: 1 + 1e-5 (a pure scale, which the quantizers' choices ignore but for float
    rounding) and 2 (exact in float32: the control, which must flip nothing); cached in work."""
    from evalkit.imatrix import Imatrix
    store = work / "flip-scan.json"
    if store.exists():
        return json.loads(store.read_text())
    out = {}
    for t in TYPES:
        ref_q = quantize_ffn_down(ev.weights, ev.names, t, ref, threads)
        row = {}
        for eps in (1e-7, 1e-6, 1e-5, 1e-4):
            ims = [perturbed(ref, dict.fromkeys(ev.names, eps), seed) for seed in (100, 101)]
            row[f"noise {eps:g}"] = [len(differing_blocks(ref_q, quantize_ffn_down(ev.weights, ev.names, t, im,
                                                                                 threads), t)[0]) for im in ims]
        for label, f in (("scale 1+1e-5", np.float32(1 + 1e-5)), ("scale 2 (exact)", np.float32(2))):
            scaled = Imatrix({n: (v * f) if n in ev.names else v for n, v in ref.data.items()})
            row[label] = [len(differing_blocks(ref_q, quantize_ffn_down(ev.weights, ev.names, t, scaled,
                                                                        threads), t)[0])]
        out[t] = row
        print(f"flip scan {t}: {row}")
    atomic_write(store, json.dumps(out, indent=1))
    return out


# --------------------------------------------------------------------------- report

def summarize(done: dict, rel: dict) -> dict:
    """Per type: KLD of (a), (b), the seeds of (c), their spread, and where |(b) - (a)| falls."""
    out = {}
    for t in TYPES:
        a, b = done.get(f"reference/{t}"), done.get(f"evalkit/{t}")
        noise = [v for k, v in sorted(done.items()) if v["imatrix"] == "noise" and v["type"] == t]
        if a is None or b is None:
            continue
        ka, kb, kc = a["kld"], b["kld"], np.array([v["kld"] for v in noise])
        dc = np.abs(kc - ka)
        s = {"kld_reference": ka, "kld_evalkit": kb, "diff_evalkit": kb - ka, "rel_diff_evalkit": kb / ka - 1,
             "same_4_digits_evalkit": f"{ka:.4g}" == f"{kb:.4g}",
             "blocks_differing_evalkit": [b["blocks_differing"], b["blocks_total"]],
             "noise_seeds": [v["seed"] for v in noise], "noise_kld": kc.tolist(),
             "noise_blocks_differing": [v["blocks_differing"] for v in noise],
             "paired_se_diff_evalkit": paired_se(a["chunk_sums"], b["chunk_sums"], a["n_tokens"])}
        s |= flip_overlap(b, noise)
        if len(noise) >= 2:
            s |= {"noise_mean": float(kc.mean()), "noise_std": float(kc.std(ddof=1)), "noise_min": float(kc.min()),
                  "noise_max": float(kc.max()), "noise_abs_diff_max": float(dc.max()),
                  "noise_abs_diff_median": float(np.median(dc)),
                  "noise_rms_diff": float(np.sqrt(np.mean((kc - ka) ** 2))),
                  "noise_mean_diff": float(np.mean(kc - ka)),
                  "noise_seeds_at_least_evalkit_diff": int((dc >= abs(kb - ka)).sum()),
                  "noise_same_4_digits": int(sum(f"{ka:.4g}" == f"{k:.4g}" for k in kc)),
                  "evalkit_within_noise_range": bool(kc.min() <= kb <= kc.max()),
                  "evalkit_abs_diff_within_noise_abs_diff": bool(abs(kb - ka) <= dc.max()),
                  "evalkit_z_vs_noise_std": float(abs(kb - ka) / kc.std(ddof=1)) if kc.std(ddof=1) > 0 else None}
        out[t] = s
    return out


def flip_overlap(evalkit_variant: dict, noise: list[dict]) -> dict:
    """How much the sets of blocks that differ from (a) overlap: each seed's with (b)'s, and the
    blocks every seed flips (near-ties any perturbation breaks the same way)."""
    b = set(evalkit_variant["blocks_differing_index"])
    seeds = [set(v["blocks_differing_index"]) for v in noise]
    common = set.intersection(*seeds) if seeds else set()
    return {"noise_blocks_common_with_evalkit": [len(x & b) for x in seeds],
            "blocks_flipped_by_every_seed": len(common),
            "blocks_flipped_by_every_seed_and_evalkit": len(common & b)}


def paired_se(sa: list[float], sb: list[float], n_tokens: int) -> float:
    """Standard error of the mean KLD difference from per-chunk sums (chunks as samples): how much
    of the difference the 40 chunks' sampling alone would let through."""
    d = (np.array(sb) - np.array(sa)) / (n_tokens / len(sa))
    return float(d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan"))


def render_md(report: dict) -> str:
    """The results page."""
    rel, summ = report["imatrix_difference"], report["summary"]
    per = rel["per_entry"].values()
    lines = ["# SmolLM2: the quantizer's noise floor behind \"same KLD to 4 digits\" (issue #17)", "",
             f"Generated by `bench/imatrix_noise.py` ({report['chunks']} chunks of 512 of the bundled WikiText-2 "
             f"test split, the first, {report['n_tokens']} scored tokens; only `ffn_down` quantized, every other "
             "weight exact; float64 KLD(base ‖ variant) as tests/test_imatrix_smollm2.py's `ffn_down_kld`).", "",
             "Imatrices: (a) the reference's `smollm2-calib.imatrix`; (b) evalkit's of the same text (lines 1500.., "
             "64 chunks of 512); (c) (a) × (1 + ε·N(0,1)) per value, ε per ffn_down entry = that entry's RMS of "
             "(b)/(a) − 1.", "",
             f"(b)/(a) − 1 over the 30 ffn_down entries: pooled RMS {rel['pooled_rms']:.3g}, mean "
             f"{rel['pooled_mean']:.3g}, max |·| {rel['pooled_max_abs']:.3g}; per-entry RMS "
             f"{min(p['rms'] for p in per):.3g} … {max(p['rms'] for p in per):.3g}; "
             f"{100 * rel['pooled_bit_identical_fraction']:.1f} % of the values bit-identical.", ""]
    lines += ["| type | KLD (a) reference | KLD (b) evalkit | (b) − (a) | rel. | blocks ≠ (a) | "
              "(c) seeds | (c) mean ± std | (c) min … max | (c) − (a): mean, RMS, max abs | "
              "(c) same 4 digits as (a) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, s in summ.items():
        nb = s["blocks_differing_evalkit"]
        c = (f"{s['noise_mean']:.6f} ± {s['noise_std']:.2g} | {s['noise_min']:.6f} … {s['noise_max']:.6f} | "
             f"{s['noise_mean_diff']:+.2g}, {s['noise_rms_diff']:.2g}, {s['noise_abs_diff_max']:.2g} | "
             f"{s['noise_same_4_digits']}/{len(s['noise_kld'])}"
             if "noise_std" in s else "– | – | – | –")
        lines.append(f"| {t} | {s['kld_reference']:.6f} | {s['kld_evalkit']:.6f} | {s['diff_evalkit']:+.2g} | "
                     f"{s['rel_diff_evalkit']:+.2g} | {nb[0]}/{nb[1]} | {len(s['noise_kld'])} | {c} |")
    lines += ["", "Blocks of 256 weights whose bytes differ from (a)'s quantization, per seed of (c):", ""]
    for t, s in summ.items():
        pairs = ", ".join(f"seed {sd}: {n}" for sd, n in zip(s["noise_seeds"], s["noise_blocks_differing"]))
        common = ", ".join(str(n) for n in s["noise_blocks_common_with_evalkit"])
        lines.append(f"* {t} ({s['blocks_differing_evalkit'][1]} blocks): {pairs}; (b): "
                     f"{s['blocks_differing_evalkit'][0]}. Of each seed's, also flipped by (b): {common}; "
                     f"flipped by every seed: {s['blocks_flipped_by_every_seed']} "
                     f"({s['blocks_flipped_by_every_seed_and_evalkit']} of them also by (b))")
    lines += ["", "Blocks that differ from (a)'s quantization for a uniform ε on every ffn_down value "
              "(two seeds; quantization only, no KLD), and for (a) scaled by 1 + 1e-5 and by 2 (exact: the control):", "",
              "| type | " + " | ".join(report["flip_scan"][TYPES[0]]) + " |",
              "|---|" + "---:|" * len(report["flip_scan"][TYPES[0]])]
    for t, row in report["flip_scan"].items():
        lines.append(f"| {t} | " + " | ".join(", ".join(str(n) for n in v) for v in row.values()) + " |")
    lines += ["", "Per seed KLD of (c):", ""]
    for t, s in summ.items():
        lines.append(f"* {t}: " + ", ".join(f"{k:.6f}" for k in s["noise_kld"]))
    lines += ["", "Standard error of (b) − (a) from its spread over the chunks (chunks as samples; the part "
              "of the difference another sample of text could change): "
              + ", ".join(f"{t} {s['paired_se_diff_evalkit']:.2g}" for t, s in summ.items()) + ".", ""]
    lines += [f"The evaluated tokens end at token {report['eval_tokens_end']} of the corpus; the calibration "
              f"text (line {CALIB_FIRST_LINE}) starts near token {report['calibration_first_token']}. The base's "
              "logits recomputed from its stored hidden states equal the forward's bit for bit: "
              f"{report['base_logits_from_hidden_bit_identical']}."]
    lines += ["", "## Verdict", ""] + report["verdict"] + [""]
    return "\n".join(lines)


def verdict(summ: dict) -> list[str]:
    """One line per type: is |KLD(b) − KLD(a)| inside the spread the perturbation makes?"""
    out = []
    for t, s in summ.items():
        if "noise_std" not in s:
            out.append(f"* {t}: fewer than 2 perturbed seeds done; no spread.")
            continue
        d = abs(s["diff_evalkit"])
        out.append(f"* {t}: |(b) − (a)| = {d:.2g}; the perturbed imatrices move the KLD from (a) by "
                   f"{s['noise_mean_diff']:+.2g} on average, RMS {s['noise_rms_diff']:.2g}, up to "
                   f"{s['noise_abs_diff_max']:.2g} ({s['noise_seeds_at_least_evalkit_diff']}/{len(s['noise_kld'])} "
                   f"seeds at least as far as (b); seed-to-seed std {s['noise_std']:.2g}): (b) is "
                   f"{'inside' if s['evalkit_abs_diff_within_noise_abs_diff'] else 'outside'} the noise floor. "
                   f"{s['noise_same_4_digits']}/{len(s['noise_kld'])} perturbed seeds give (a)'s KLD to 4 "
                   f"significant digits ((b): {'yes' if s['same_4_digits_evalkit'] else 'no'}).")
    return out


def main() -> None:
    """Run the measurement (resuming from --work) and write the results page and JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/evalkit-imatrix-noise"))
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-after-min", type=float, default=70.0)
    a = ap.parse_args()
    if a.chunks < 1 or a.chunks % GROUP or a.seeds < 0:
        raise NoiseBenchError(f"--chunks must be a positive multiple of {GROUP} and --seeds ≥ 0 "
                              f"(got {a.chunks}, {a.seeds})")
    deadline = time.monotonic() + 60 * a.stop_after_min
    a.work.mkdir(parents=True, exist_ok=True)
    from evalkit.imatrix import load_imatrix
    ims = {"reference": load_imatrix(REF_IMATRIX), "evalkit": evalkit_imatrix(a.work, a.threads)}
    ev = FfnDownKld(a.chunks, a.threads, a.work)
    if not ev.base_check:
        raise NoiseBenchError("the base logits recomputed from its hidden states differ from the forward's")
    rel = relative_difference(ims["reference"], ims["evalkit"], ev.names)
    eps = {n: rel["per_entry"][n]["rms"] for n in ev.names}
    done = run_sweep(ev, ims, eps, a.seeds, a.threads, a.work, deadline)
    scan = flip_scan(ev, ims["reference"], a.threads, a.work)
    summ = summarize(done, rel)
    report = {"chunks": a.chunks, "n_tokens": a.chunks * ev.cc.window.n_rows, "seeds_planned": a.seeds,
              "eval_tokens_end": ev.eval_tokens, "calibration_first_token": ev.calib_first_token,
              "base_logits_from_hidden_bit_identical": ev.base_check, "epsilon_per_entry": eps,
              "imatrix_difference": rel, "flip_scan": scan, "summary": summ, "verdict": verdict(summ), "variants": done}
    atomic_write(a.results / "smollm2-imatrix-noise.json", json.dumps(report, indent=1))
    atomic_write(a.results / "smollm2-imatrix-noise.md", render_md(report))
    print(render_md(report))


if __name__ == "__main__":
    try:
        main()
    except EvalkitError as e:          # evalkit's own and this script's named errors: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
