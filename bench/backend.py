#!/usr/bin/env python
"""Speed of the emulated ik_llama.cpp CPU backend (evalkit.backend) against evalkit's exact forward.

Evaluates 512-token chunks of SmolLM2-135M-Instruct in the IQ4_K mix (made here by evalkit
quantize, or --model FILE) the way ``evalkit run`` does (the scored half's logits, --batch
tokens per call), alternately through the exact forward and through ``ik-cpu`` (8-bit
activations, weights converted tile by tile, fp16 K/V), in the same process, and reports
tokens/s of each and their ratio (issue 15's target: ik-cpu >= 0.6 x exact). Also times
the two compiled kernels on their own: activation rounding of a 2048x1536 tile and the
Q8_K_R16 conversion of an IQ4_K 576x1536 weight, against the plain dequantization.

Timings are the best of --repeats rounds (the machine may be shared); the rounds alternate
the two forwards so that load changes hit both.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evalkit import dequantize, quantize  # noqa: E402
from evalkit.backend.forward import backend_forward  # noqa: E402
from evalkit.backend.kernels import convert_weights, quantize_activations  # noqa: E402
from evalkit.evaluation.forward import exact_forward  # noqa: E402
from evalkit.evaluation.window import ScoredWindow  # noqa: E402
from evalkit.model import Workspace  # noqa: E402


def iq4k_mix(cache: Path) -> Path:
    """SmolLM2's IQ4_K mix, quantized once into ``cache``."""
    from evalkit.recipes.model_quantizer import quantize_model
    from evalkit.sources import resolve_model
    target = cache / "smollm2-IQ4_K.gguf"
    if not target.is_file():
        quantize_model(resolve_model("smollm2"), target, "IQ4_K", progress=False)
    return target


def corpus_chunks(path: Path, n_chunks: int, n_ctx: int = 512) -> np.ndarray:
    """The first chunks of the bundled WikiText-2 test split, as evalkit run feeds them."""
    from evalkit.corpus import load_corpus_text
    from evalkit.evaluation.corpus_chunks import chunk_corpus, tokenizer_for
    from evalkit.run_config import CorpusSpec
    text, sha, desc = load_corpus_text(CorpusSpec(path="wikitext-2-raw-test"))
    tok = tokenizer_for(path)
    return chunk_corpus(tok, tok.encode(text), sha, desc, n_ctx, n_chunks).chunks


def best_of(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls of fn()."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def forward_ratio(model: Path, chunks: np.ndarray, per_call: int, repeats: int, threads: int) -> dict:
    """tokens/s of exact and ik-cpu on the same chunks, rounds alternating."""
    window = ScoredWindow(chunks.shape[1])
    fns = {"exact": exact_forward(model, window, Workspace()),
           "ik-cpu": backend_forward("ik-cpu", threads=threads)(model, window, Workspace())}
    groups = [chunks[i:i + per_call] for i in range(0, len(chunks), per_call)]
    for fn in fns.values():                 # warm-up: first-touch of the weights, thread team
        fn(groups[0])
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for g in groups:
                fn(g)
            best[name] = min(best[name], time.perf_counter() - t0)
    n_tokens = chunks.size
    res = {f"{name}_tokens_per_s": n_tokens / t for name, t in best.items()}
    res["ratio_ik_cpu_over_exact"] = res["ik-cpu_tokens_per_s"] / res["exact_tokens_per_s"]
    return res


def kernel_times(repeats: int) -> dict:
    """The compiled kernels alone: activation rounding and the Q8_K_R16 conversion."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2048, 1536), dtype=np.float32)
    w = quantize(rng.standard_normal((576, 1536), dtype=np.float32), "IQ4_K", threads=2)
    t_q82 = best_of(lambda: quantize_activations(x, "q8_2_x4", threads=2), repeats)
    t_q8k = best_of(lambda: quantize_activations(x, "q8_k", threads=2), repeats)
    t_conv = best_of(lambda: convert_weights(w, "IQ4_K", 1536, threads=2), repeats)
    t_deq = best_of(lambda: dequantize(w, "IQ4_K", 1536, threads=2, variant="inference"), repeats)
    return {"act_q8_2_x4_Melem_per_s": x.size / t_q82 / 1e6, "act_q8_k_Melem_per_s": x.size / t_q8k / 1e6,
            "convert_iq4_k_ms": 1e3 * t_conv, "dequantize_iq4_k_ms": 1e3 * t_deq,
            "convert_over_dequantize": t_conv / t_deq}


def main() -> int:
    """Run the benchmark; exit 1 when ik-cpu falls below 0.6x the exact forward."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF to run (default: SmolLM2's IQ4_K mix)")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2048, help="tokens per forward call (chunks of 512)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or iq4k_mix(Path(tmp))
        chunks = corpus_chunks(model, args.chunks)
        res = {"model": str(args.model or "SmolLM2 IQ4_K mix"), "chunks": args.chunks, "threads": args.threads,
               **forward_ratio(model, chunks, max(1, args.batch // 512), args.repeats, args.threads),
               **kernel_times(args.repeats)}
    for k, v in res.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    print("PASS" if res["ratio_ik_cpu_over_exact"] >= 0.6 else "FAIL", "(ik-cpu >= 0.6 x exact tokens/s)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0 if res["ratio_ik_cpu_over_exact"] >= 0.6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
