"""Quantization / dequantization throughput per type (M elements/s), 1 and 2 threads.

Matrix: 512 x 4096 Gaussian (seed 0). A numpy baseline (np.round of the same matrix)
is timed in the same run so numbers from different sittings can be compared as ratios.
Usage: python bench/quantize.py [--types IQ4_K,Q8_0] [--repeat 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

import evalkit
from evalkit.formats import FORMATS

# llama-quantize / ggml reference, one thread, same matrix, this machine class (issue 2, 6, 7).
REFERENCE_QUANT = {"IQ2_K": 3.5, "IQ3_K": 6.5, "IQ4_K": 4.4, "IQ5_K": 3.7, "IQ6_K": 2.4,
                   "IQ2_KS": 16.6, "IQ3_KS": 4.7, "IQ4_KS": 4.2, "IQ4_KSS": 1.6, "IQ5_KS": 3.7,
                   "IQ2_KL": 4.2, "IQ2_KT": 0.7, "IQ3_KT": 0.4, "IQ4_KT": 0.3}


def best_time(fn, repeat: int) -> float:
    """Minimum wall time of ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="", help="comma-separated type names (default: all implemented)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    x = np.random.default_rng(0).standard_normal((args.rows, args.cols), dtype=np.float32)
    n = x.size / 1e6
    base = n / best_time(lambda: np.round(x), args.repeat)
    names = [t.strip().upper() for t in args.types.split(",") if t.strip()] or [
        f.name for f in FORMATS.values() if f.family != "float" and f.can_quantize]
    print(f"matrix {args.rows}x{args.cols}; baseline np.round: {base:.0f} M elements/s (same run)\n")
    print("| type | q 1t | q 2t | ref q 1t | q1t/ref | dq 1t | dq 2t | q1t/np.round |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in names:
        fmt = FORMATS[name]
        if args.cols % fmt.block_size:
            continue
        q = evalkit.quantize(x, name, threads=1)
        r = {"type": name, "np_round_melem_s": base}
        for t in (1, 2):
            r[f"quant_{t}t"] = n / best_time(lambda: evalkit.quantize(x, name, threads=t), args.repeat)
            r[f"dequant_{t}t"] = n / best_time(lambda: evalkit.dequantize(q, name, args.cols, threads=t),
                                               args.repeat)
        ref = REFERENCE_QUANT.get(name)
        r["reference_quant_1t"] = ref
        rows.append(r)
        ratio = f"{r['quant_1t'] / ref:.2f}" if ref else "-"
        print(f"| {name} | {r['quant_1t']:.2f} | {r['quant_2t']:.2f} | {ref or '-'} | {ratio} | "
              f"{r['dequant_1t']:.0f} | {r['dequant_2t']:.0f} | {r['quant_1t'] / base:.4f} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
