"""`evalkit perplexity MODEL --corpus FILE`: llama-perplexity's plain PPL mode, in exact float32."""
from __future__ import annotations

import argparse
import json
import sys
import time


def perplexity(model_spec: str, corpus: str, ctx: int = 512, chunks: int | None = None,
               threads: int | None = None, progress: bool = True, out=sys.stdout, batch: int = 2048) -> dict:
    """Evaluate a model's perplexity the way llama-perplexity does; returns the JSON-able result.

    ``batch`` tokens go through the model per call (``batch // ctx`` chunks, at least one),
    as llama-perplexity's ``-b``.
    """
    import torch

    from evalkit.run_config import CorpusSpec
    from evalkit.corpus import load_corpus_text
    from evalkit.metrics import PerplexityAccumulator, chunk_tokens, token_nll
    from evalkit.sources import resolve_model
    from evalkit.model import Workspace
    from evalkit.pipeline import _load_model, _logits, _tokenizer_for, batched, chunks_per_batch, sha256_file

    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model_spec)
    text, corpus_sha, corpus_desc = load_corpus_text(CorpusSpec(path=corpus))
    tok = _tokenizer_for(path)
    stream = tok.encode(text)
    bos = tok.bos_id if tok.add_bos else None
    chunk_arr, targets_pos = chunk_tokens(stream, ctx, chunks, bos)
    n_chunks = chunk_arr.shape[0]
    stream_chunks = stream[: n_chunks * ctx].reshape(n_chunks, ctx)
    model = _load_model(path, threads)
    if model.config.n_vocab != tok.n_vocab:
        raise ValueError(f"{path}: the tokenizer has {tok.n_vocab} tokens but the model's vocabulary "
                         f"has {model.config.n_vocab}")
    print(f"perplexity: {n_chunks} chunks of {ctx} tokens from {corpus_desc} ({len(stream)} tokens)",
          file=out, flush=True)
    acc = PerplexityAccumulator()
    running = []
    first = ctx // 2
    t0 = time.perf_counter()
    buf = Workspace()
    for group in batched(list(range(n_chunks)), chunks_per_batch(batch, ctx)):
        z = _logits(model, chunk_arr[group], first, buf)  # (B, C - first, V): only the second half is scored
        for j, k in enumerate(group):
            nll = token_nll(z[j, :-1], stream_chunks[k, targets_pos], chunk=k, first_row=first)
            running.append(acc.add(nll))
            print(f"[{k + 1}]{running[-1]:.4f},", end="", file=out, flush=True)
    dt = time.perf_counter() - t0
    ppl, err = acc.final()
    print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}", file=out, flush=True)
    return {"model": str(path), "model_sha256": sha256_file(path), "corpus": corpus_desc,
            "corpus_sha256": corpus_sha, "n_ctx": ctx, "n_chunks": n_chunks, "ppl": [ppl, err],
            "running_ppl": running, "n_tokens": int(acc.count),
            "tokens_per_s": n_chunks * ctx / dt if dt > 0 else None,
            "threads": threads or torch.get_num_threads(), "batch": batch}


def _cmd(args: argparse.Namespace) -> int:
    from evalkit.gguf.writer import atomic_output
    try:
        if args.batch < 1:
            raise ValueError(f"--batch must be positive, got {args.batch}")
        res = perplexity(args.model, args.corpus, args.ctx, args.chunks, args.threads, batch=args.batch)
    except (ValueError, FileNotFoundError) as e:
        print(f"evalkit perplexity: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with atomic_output(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


def register(sub) -> None:
    """Add the `perplexity` subcommand."""
    p = sub.add_parser("perplexity", help="perplexity of a model over a corpus (llama-perplexity's definition)")
    p.add_argument("model", help="GGUF file, HuggingFace checkpoint folder, or 'smollm2' (embedded)")
    p.add_argument("--corpus", required=True, help="text file, or 'wikitext-2-raw-test' (bundled)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=2048,
                   help="tokens per forward call, as llama-perplexity's -b (default 2048: 4 chunks of 512)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.set_defaults(func=_cmd)
