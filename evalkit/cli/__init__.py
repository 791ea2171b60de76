"""`evalkit` command line: subcommands dispatch to the package's modules."""
from __future__ import annotations

import argparse
import sys
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


# Modules that add a subcommand: each has ``register(subparsers)`` which adds its parser
# and sets ``func``. Heavy imports (torch) stay inside the command functions so that
# `evalkit --help` and `evalkit quantize` start fast.
SUBCOMMAND_MODULES = [
    "evalkit.cli.quantize",
    "evalkit.cli.perplexity",
    "evalkit.cli.run",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    import importlib

    p = argparse.ArgumentParser(prog="evalkit", description="Exact quality evaluation of quantized LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for mod_name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue  # subcommand not built yet
        mod.register(sub)
    s = sub.add_parser("smoke", help="quantize/dequantize a random matrix in every type")
    s.add_argument("--rows", type=int, default=256)
    s.add_argument("--cols", type=int, default=4096)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_smoke)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `evalkit` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
