"""``evalkit perplexity``: llama-perplexity's plain PPL mode over one forward callable."""
from __future__ import annotations

import sys
import time

from evalkit.errors import RunError
from evalkit.evaluation.corpus_chunks import chunk_corpus, tokenizer_for
from evalkit.evaluation.forward import ModelForward, configure_threads, load_model
from evalkit.evaluation.loop import chunks_per_call, evaluate
from evalkit.evaluation.reference import ScoringError

__all__ = ["perplexity"]


def perplexity(model_spec: str, corpus: str, ctx: int = 512, chunks: int | None = None,
               threads: int | None = None, progress: bool = True, out=sys.stdout, batch: int = 2048) -> dict:
    """Evaluate a model's perplexity the way llama-perplexity does; returns the JSON-able result.

    ``batch`` tokens go through the model per call (``batch // ctx`` chunks, at least one),
    as llama-perplexity's ``-b``. Running values are printed as ``[k]ppl,`` like the reference.
    """
    from evalkit.corpus import load_corpus_text
    from evalkit.files import sha256_file
    from evalkit.metrics import PerplexityAccumulator, token_nll
    from evalkit.model import Workspace
    from evalkit.run_config import CorpusSpec
    from evalkit.sources import resolve_model

    n_threads = configure_threads(threads)
    path = resolve_model(model_spec)
    text, corpus_sha, corpus_desc = load_corpus_text(CorpusSpec(path=corpus))
    tok = tokenizer_for(path)
    cc = chunk_corpus(tok, tok.encode(text), corpus_sha, corpus_desc, ctx, chunks)
    model = load_model(path)
    if model.config.n_vocab != tok.n_vocab:
        raise RunError(f"{path}: the tokenizer has {tok.n_vocab} tokens but the model's vocabulary "
                       f"has {model.config.n_vocab}")
    print(f"perplexity: {cc.n_chunks} chunks of {ctx} tokens from {corpus_desc} ({len(cc.stream)} tokens)",
          file=out, flush=True)
    acc, running = PerplexityAccumulator(), []
    forwards = [("model", ModelForward(model, cc.window, Workspace()))]
    t0 = time.perf_counter()
    for group, outputs in evaluate(forwards, cc.chunks, range(cc.n_chunks), chunks_per_call(batch, ctx)):
        for _, rows, _ in outputs:
            for j, k in enumerate(group):
                try:
                    nll = token_nll(rows[j], cc.targets(k), chunk=k, first_row=cc.window.first_row)
                except ValueError as e:
                    raise ScoringError(f"{path}: {e}") from None
                running.append(acc.add(nll))
                print(f"[{k + 1}]{running[-1]:.4f},", end="", file=out, flush=True)
    dt = time.perf_counter() - t0
    ppl, err = acc.final()
    print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}", file=out, flush=True)
    return {"model": str(path), "model_sha256": sha256_file(path), "corpus": corpus_desc,
            "corpus_sha256": corpus_sha, "n_ctx": ctx, "n_chunks": cc.n_chunks, "ppl": [ppl, err],
            "running_ppl": running, "n_tokens": int(acc.count),
            "tokens_per_s": cc.n_chunks * ctx / dt if dt > 0 else None,
            "threads": n_threads, "batch": batch}
