"""`evalkit quantize SRC OUT --type FTYPE ...`: whole-model quantization from the command line."""
from __future__ import annotations

import argparse
import sys

# (option, attribute) of the reference's per-class type options
_CLASS_FLAGS = [
    ("--token-embedding-type", "token_embedding_type", "token_embd.weight"),
    ("--output-tensor-type", "output_tensor_type", "output.weight (or the tied token_embd.weight)"),
    ("--attn-q-type", "attn_q_type", "*attn_q* tensors"),
    ("--attn-k-type", "attn_k_type", "*attn_k* tensors"),
    ("--attn-v-type", "attn_v_type", "*attn_v.weight"),
    ("--attn-output-type", "attn_output_type", "*attn_output.weight"),
    ("--ffn-gate-type", "ffn_gate_type", "*ffn_gate* tensors"),
    ("--ffn-up-type", "ffn_up_type", "*ffn_up* tensors"),
    ("--ffn-down-type", "ffn_down_type", "*ffn_down* tensors"),
]


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
    for flag, attr, what in _CLASS_FLAGS:
        p.add_argument(flag, dest=attr, metavar="T", default=None, help=f"type for {what}")
    p.add_argument("--dry-run", action="store_true", help="print the per-tensor plan, write nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Run `evalkit quantize`; clear message and exit status 2 on any input error."""
    import time

    from evalkit.gguf import GGUFError
    from evalkit.imatrix import ImatrixError
    from evalkit.recipes.model_quantizer import quantize_model

    if args.out is None and not args.dry_run:
        print("evalkit quantize: error: the output path OUT is required (unless --dry-run)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        plan = quantize_model(
            args.src, args.out, args.ftype, imatrix=args.imatrix, pure=args.pure, threads=args.threads,
            overrides=args.override, dry_run=args.dry_run, progress=args.progress and not args.dry_run,
            **{attr: getattr(args, attr) for _, attr, _ in _CLASS_FLAGS})
    except (GGUFError, ImatrixError, ValueError, KeyError, OSError, NotImplementedError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"evalkit quantize: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evalkit quantize: interrupted; no output written", file=sys.stderr)
        return 130
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
