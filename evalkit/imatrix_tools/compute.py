"""`llama-imatrix` in-process: a corpus through evalkit's exact forward, Σx² collected on the fly.

The chunks are cut as llama-imatrix (and llama-perplexity) cut them (docs/imatrix.md §1):
the corpus is read with one trailing line feed removed, tokenized with BOS in front when
the vocabulary adds one, at least 2·ctx tokens are needed, ⌊tokens / ctx⌋ chunks (or the
first ``chunks``), and each chunk's first token replaced by BOS when the vocabulary adds one. Every chunk is
evaluated from position 0 with all positions through every layer (the reference asks for
all logits), and its perplexity over the second half is the one llama-imatrix prints.

By default the pass reproduces the two roundings of the reference that reach a float
model's activations, its fp16 KV cache and its float32 RoPE angles
(:mod:`~evalkit.imatrix_tools.reference_numerics`); ``exact=True`` keeps evalkit's exact
float32 attention instead.
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from evalkit.errors import RunError
from evalkit.imatrix import ImatrixStats
from evalkit.imatrix_tools.collector import DEFAULT_UBATCH, ImatrixCollector, counted_positions
from evalkit.imatrix_tools.reference_numerics import reference_numerics

__all__ = ["ImatrixResult", "compute_imatrix"]


@dataclass
class ImatrixResult:
    """The collected statistics and what the pass printed (PPL) and measured."""

    stats: ImatrixStats
    model: str
    corpus: str
    corpus_sha256: str
    n_ctx: int
    n_chunks: int
    ppl: tuple[float, float]
    running_ppl: list[float] = field(default_factory=list)
    n_tokens: int = 0                 # tokens evaluated (every position of every chunk)
    tokens_per_s: float | None = None
    threads: int = 0
    batch: int = 0

    def summary(self) -> dict:
        """JSON-able facts of the pass (no statistics)."""
        return {"model": self.model, "corpus": self.corpus, "corpus_sha256": self.corpus_sha256,
                "n_ctx": self.n_ctx, "n_chunks": self.n_chunks, "ppl": list(self.ppl),
                "running_ppl": self.running_ppl, "n_tokens": self.n_tokens,
                "tokens_per_s": self.tokens_per_s, "threads": self.threads, "batch": self.batch,
                "entries": len(self.stats)}


class FullForward:
    """Chunks through every layer at every position (llama-imatrix requests all logits);
    returns the scored rows' logits (B, rows, V) for the printed perplexity."""

    def __init__(self, model, window, buffer=None):
        self.model, self.window, self.buffer = model, window, buffer

    def __call__(self, chunks: np.ndarray) -> np.ndarray:
        """(B, C) tokens → (B, n_rows, V) logits of the scored rows (in the reused buffer)."""
        from evalkit.evaluation.forward import model_logits
        z = model_logits(self.model, chunks, 0, self.buffer)
        return self.window.scored_rows(z[:, self.window.first_row:])


def _prepare(model_spec: str, corpus: str, ctx: int, chunks: int | None):
    """(model path, chunked corpus, loaded model), checked against each other."""
    from evalkit.corpus import load_corpus_text
    from evalkit.evaluation.corpus_chunks import chunk_corpus, encode_corpus
    from evalkit.evaluation.forward import load_model
    from evalkit.run_config import CorpusSpec
    from evalkit.sources import resolve_model

    path = resolve_model(model_spec)
    text, corpus_sha, corpus_desc = load_corpus_text(CorpusSpec(path=corpus))
    tok = encode_corpus(path, text)
    cc = chunk_corpus(tok, tok.stream, corpus_sha, corpus_desc, ctx, chunks)
    model = load_model(path)
    if model.config.n_vocab != tok.n_vocab:
        raise RunError(f"{path}: the tokenizer has {tok.n_vocab} tokens but the model's vocabulary "
                       f"has {model.config.n_vocab}")
    return path, cc, model


def compute_imatrix(model_spec: str, corpus: str, ctx: int = 512, chunks: int | None = None,
                    threads: int | None = None, batch: int = 2048, process_output: bool = False,
                    ubatch: int = DEFAULT_UBATCH, exact: bool = False, progress: bool = True,
                    out=sys.stdout, dataset: str | None = None) -> ImatrixResult:
    """Compute llama-imatrix's importance matrix of a model (GGUF, HF folder or ``smollm2``).

    ``batch`` tokens go through the model per call (``batch // ctx`` chunks; it changes the
    speed, not the result); ``ubatch`` is the reference's micro-batch (``-ub``), which
    decides which tokens count and the call counts. The running and final perplexity are
    printed to ``out`` (None: silent) as llama-imatrix prints them. ``exact``: evalkit's
    float32 attention and RoPE instead of the reference's fp16 KV cache and float32 angles.
    ``dataset`` is the name recorded in the file (default: ``corpus`` as given).
    """
    from evalkit.evaluation.corpus_chunks import ChunkingError
    from evalkit.evaluation.forward import configure_threads
    from evalkit.evaluation.loop import chunks_per_call, evaluate
    from evalkit.metrics import PerplexityAccumulator
    from evalkit.model import Workspace

    if isinstance(ubatch, bool) or not isinstance(ubatch, int) or ubatch < 1:
        raise RunError(f"imatrix: ubatch must be a positive integer, got {ubatch!r}")
    if isinstance(ctx, int) and ctx > 0 and counted_positions(ctx, ubatch)[1] == 0:
        raise ChunkingError(f"imatrix: chunks of {ctx} tokens (micro-batches of {ubatch}) are below "
                            "llama-imatrix's 16-token minimum per matrix multiplication: nothing would be collected")
    n_threads = configure_threads(threads)
    path, cc, model = _prepare(model_spec, corpus, ctx, chunks)
    _say(out, f"imatrix: {cc.n_chunks} chunks of {ctx} tokens from {cc.description} ({len(cc.stream)} tokens)")
    collector, acc = ImatrixCollector(ubatch), PerplexityAccumulator()
    forward = FullForward(model, cc.window, Workspace())
    t0 = time.perf_counter()
    with collector.hooked(model, process_output), (nullcontext() if exact else reference_numerics(model)):
        for group, outputs in evaluate([("model", forward)], cc.chunks, range(cc.n_chunks),
                                       chunks_per_call(batch, ctx), progress, "imatrix"):
            for _, rows, _ in outputs:
                _score(acc, rows, cc, group, path, out)
    dt = time.perf_counter() - t0
    ppl, err = acc.final()
    _say(out, f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    stats = collector.stats(cc.n_chunks, ctx, [dataset if dataset is not None else str(corpus)])
    return ImatrixResult(stats, str(path), cc.description, cc.sha256, ctx, cc.n_chunks, (ppl, err),
                         list(acc.running), cc.n_chunks * ctx, cc.n_chunks * ctx / dt if dt > 0 else None,
                         n_threads, batch)


def _score(acc, rows: np.ndarray, cc, group: list[int], path, out) -> None:
    """Add each chunk's second-half NLL to the perplexity and print the running value."""
    from evalkit.evaluation.reference import ScoringError
    from evalkit.metrics import token_nll

    for j, k in enumerate(group):
        try:
            nll = token_nll(rows[j], cc.targets(k), chunk=k, first_row=cc.window.first_row)
        except ValueError as e:
            raise ScoringError(f"{path}: {e}") from None
        value = acc.add(nll)
        if out is not None:
            print(f"[{k + 1}]{value:.4f},", end="", file=out, flush=True)


def _say(out, line: str) -> None:
    if out is not None:
        print(line, file=out, flush=True)
