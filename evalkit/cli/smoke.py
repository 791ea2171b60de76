"""`evalkit smoke`: quantize and dequantize a random matrix in every type; print error and speed."""
from __future__ import annotations

import argparse
import time

import numpy as np


def _cmd_smoke(args: argparse.Namespace) -> int:
    """Quantize and dequantize a Gaussian matrix in every implemented type; print RMSE and speed."""
    from evalkit import dequantize, formats, quantize

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    print(f"{'type':8s} {'bpw':>7s} {'rmse/rms':>9s} {'quant Melem/s':>14s}")
    for fmt in formats.FORMATS.values():
        if not (fmt.can_quantize and fmt.can_dequantize) or fmt.family == "float":
            continue
        if args.cols % fmt.block_size:
            continue
        t0 = time.perf_counter()
        q = quantize(x, fmt.name, threads=args.threads)
        dt = time.perf_counter() - t0
        y = dequantize(q, fmt.name, args.cols, threads=args.threads)
        err = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))
        print(f"{fmt.name:8s} {8 * q.shape[1] / args.cols:7.4f} {err:9.5f} {x.size / dt / 1e6:14.2f}")
    return 0


def register(sub) -> None:
    """Add the `smoke` subcommand."""
    s = sub.add_parser("smoke", help="quantize/dequantize a random matrix in every type")
    s.add_argument("--rows", type=int, default=256)
    s.add_argument("--cols", type=int, default=4096)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_smoke)
