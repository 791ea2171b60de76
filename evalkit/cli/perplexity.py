"""`evalkit perplexity MODEL --corpus FILE`: llama-perplexity's plain PPL mode, in exact float32."""
from __future__ import annotations

import argparse
import json



def _cmd(args: argparse.Namespace) -> int:
    from evalkit.evaluation.perplexity import perplexity
    from evalkit.gguf.writer import atomic_output

    res = perplexity(args.model, args.corpus, args.ctx, args.chunks, args.threads, batch=args.batch,
                     device=args.device, backend=args.backend, backend_threads=args.backend_threads,
                     ubatch=args.ubatch, order=args.order, spill_dir=args.spill_dir)
    if args.json:
        with atomic_output(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


def register(sub) -> None:
    """Add the `perplexity` subcommand."""
    from evalkit.cli import positive_int
    from evalkit.devices import DEVICE_HELP

    p = sub.add_parser("perplexity", help="perplexity of a model over a corpus (llama-perplexity's definition)")
    p.add_argument("model", help="GGUF file, HuggingFace checkpoint folder, or 'smollm2' (embedded)")
    p.add_argument("--corpus", required=True, help="text file, or 'wikitext-2-raw-test' (bundled)")
    p.add_argument("--ctx", type=positive_int, default=512)
    p.add_argument("--chunks", type=positive_int, default=None, help="first N chunks (default: all)")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--batch", type=positive_int, default=2048,
                   help="tokens per forward call, as llama-perplexity's -b (default 2048: 4 chunks of 512)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--device", default="cpu", help=f"where the forward pass runs: {DEVICE_HELP}")
    p.add_argument("--backend", default="exact",
                   help="exact (evalkit's float32 forward, default), or the emulated ik_llama.cpp CPU backend: "
                        "ik-cpu (AVX-512 build) or ik-cpu-avx2 (docs/backend-ik-cpu.md)")
    p.add_argument("--backend-threads", type=int, default=None,
                   help="the emulated backend's thread count (its conversion rule depends on it; "
                        "default: physical cores, as llama-perplexity)")
    p.add_argument("--ubatch", type=int, default=512, help="the emulated backend's -ub (default 512)")
    p.add_argument("--order", choices=("model", "layer"), default="model",
                   help="model: the whole model per group of chunks (default); layer: one layer at a time over "
                        "every chunk, for a model larger than memory (same numbers; exact backend, CPU)")
    p.add_argument("--spill-dir", default=None,
                   help="with --order layer: where the chunks' hidden states spill when they exceed half the "
                        "available memory (default: a temporary folder)")
    p.set_defaults(func=_cmd)
