"""`evalkit quantize SRC OUT --type FTYPE ...`: whole-model quantization from the command line."""
from __future__ import annotations

import argparse
import sys

from evalkit.recipes.options import CLASS_OPTIONS, TypeOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``quantize`` subcommand to the evalkit CLI."""
    p = subparsers.add_parser(
        "quantize", help="quantize a whole model (GGUF or HF checkpoint) like llama-quantize",
        description="Quantize a GGUF model (or a HuggingFace llama/qwen2/qwen3 checkpoint directory) "
                    "with ik_llama.cpp llama-quantize's per-tensor type rules; the tensors come out "
                    "byte-identical to the reference's. Type names are case-insensitive.")
    p.add_argument("src", help="source model: a .gguf file or a HF checkpoint directory (config.json + "
                               "*.safetensors)")
    p.add_argument("out", nargs="?", help="output .gguf (written atomically; optional with --dry-run)")
    p.add_argument("--type", "-t", dest="ftype", required=True, metavar="FTYPE",
                   help="target mix, e.g. IQ4_K, IQ2_K, Q4_K_M, Q8_0, F16 (or its numeric id)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (legacy .imatrix/.dat or GGUF)")
    p.add_argument("--pure", action="store_true",
                   help="no mix rules: every quantized tensor gets the ftype's type (256-fallbacks apply)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="threads (default: all cores)")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=TYPE",
                   help="tensors whose name matches REGEX get TYPE (the reference's --custom-q; the first "
                        "matching rule wins; may be repeated)")
    for opt in CLASS_OPTIONS:
        p.add_argument(opt.flag, dest=opt.attr, metavar="T", default=None, help=f"type for {opt.applies_to}")
    p.add_argument("--dry-run", action="store_true", help="print the per-tensor plan, write nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Run `evalkit quantize`; clear message and exit status 2 on any input error."""
    import time

    from evalkit.recipes.ftypes import get_ftype
    from evalkit.recipes.model_quantizer import quantize_model

    if args.out is None and not args.dry_run:
        print("evalkit quantize: error: the output path OUT is required (unless --dry-run)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        ftype = get_ftype(args.ftype)   # checked first: a bad --type is the first thing reported
        options = TypeOptions(pure=args.pure, overrides=args.override,
                              **{opt.attr: getattr(args, opt.attr) for opt in CLASS_OPTIONS})
        plan = quantize_model(args.src, args.out, ftype, imatrix=args.imatrix, options=options,
                              threads=args.threads, dry_run=args.dry_run,
                              progress=args.progress and not args.dry_run)
    except (ValueError, KeyError, NotImplementedError) as e:
        # Named errors (EvalkitError) and OS errors are reported by evalkit.cli.main; the array
        # API below the quantizer raises plain ValueError for bad tensors, which is bad input too.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"evalkit quantize: error: {msg}", file=sys.stderr)
        return 2
    if args.dry_run:
        try:
            print(plan.table())
        except BrokenPipeError:   # e.g. piped into `head`: stop quietly
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    for w in plan.warnings:
        print(f"evalkit quantize: warning: {w}", file=sys.stderr)
    dt = time.perf_counter() - t0
    n = max(1, plan.n_elements)
    print(f"wrote {args.out}: {plan.ftype.name}, {len(plan.tensors)} tensors, "
          f"{plan.src_bytes / 2**20:.2f} MiB → {plan.dst_bytes / 2**20:.2f} MiB "
          f"({8 * plan.dst_bytes / n:.3f} bpw) in {dt:.2f} s")
    return 0
