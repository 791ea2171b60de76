"""`evalkit imatrix MODEL --corpus FILE -o OUT`: llama-imatrix's importance matrix from the exact forward."""
from __future__ import annotations

import argparse
import sys


def _cmd(args: argparse.Namespace) -> int:
    from evalkit.imatrix import check_output_path, imatrix_format, write_imatrix
    from evalkit.imatrix_tools import compute_imatrix

    # checked before the pass, so a typo in the output path does not cost the computation
    fmt = imatrix_format(args.output, args.format)
    check_output_path(args.output)
    res = compute_imatrix(args.model, args.corpus, args.ctx, args.chunks, args.threads, args.batch,
                          process_output=args.process_output, exact=args.exact, progress=True, out=sys.stdout)
    for warning in write_imatrix(args.output, res.stats, fmt):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"stored {len(res.stats)} entries after {res.n_chunks} chunks in {args.output} ({fmt})")
    return 0


def register(sub) -> None:
    """Add the `imatrix` subcommand."""
    from evalkit.cli import positive_int

    p = sub.add_parser("imatrix", help="importance matrix of a model over a corpus (llama-imatrix's definition)")
    p.add_argument("model", help="GGUF file, HuggingFace checkpoint folder, or 'smollm2' (embedded)")
    p.add_argument("--corpus", required=True, help="text file, or 'wikitext-2-raw-test' (bundled)")
    p.add_argument("--ctx", type=positive_int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=positive_int, default=None, help="first N chunks (default: all)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--batch", type=positive_int, default=2048,
                   help="tokens per forward call (batch // ctx chunks at once; speed only, default 2048)")
    p.add_argument("-o", "--output", required=True, help="output file (.gguf: GGUF format, else legacy .dat)")
    p.add_argument("--format", choices=("dat", "gguf"), default=None,
                   help="output format (default: by the extension of -o)")
    p.add_argument("--process-output", action="store_true",
                   help="also collect the output projection (when it is not tied to token_embd), as llama-imatrix's")
    p.add_argument("--exact", action="store_true",
                   help="evalkit's exact float32 attention and RoPE, not the reference's fp16 KV cache and "
                        "float32 RoPE angles (default: as the reference, to reproduce its file)")
    p.set_defaults(func=_cmd)
