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
               threads: int | None = None, progress: bool = True, out=sys.stdout, batch: int = 2048,
               device: str = "cpu", backend: str = "exact", backend_threads: int | None = None,
               ubatch: int = 512) -> dict:
    """Evaluate a model's perplexity the way llama-perplexity does; returns the JSON-able result.

    ``batch`` tokens go through the model per call (``batch // ctx`` chunks, at least one),
    as llama-perplexity's ``-b``. Running values are printed as ``[k]ppl,`` like the reference.
    ``device``: where the forward pass runs (:mod:`evalkit.devices`; checked first).
    ``backend`` (:mod:`evalkit.backend`): ``exact``, or an emulated backend (``ik-cpu``,
    ``ik-cpu-avx2``; on the CPU) with ``backend_threads`` (default: the physical cores) and
    llama-perplexity's ``-ub`` ``ubatch``.
    """
    from evalkit.corpus import load_corpus_text
    from evalkit.files import sha256_file
    from evalkit.metrics import PerplexityAccumulator, token_nll
    from evalkit.run_config import CorpusSpec
    from evalkit.sources import resolve_model

    from evalkit.devices import resolve_device
    resolve_device(device)              # an unavailable device fails before any work
    from evalkit.backend.forward import BackendError, check_backend, physical_cores
    check_backend(backend, backend_threads, ubatch)
    if backend != "exact" and device != "cpu":
        raise BackendError(f"backend {backend!r} is emulated on the CPU; it cannot run on device {device!r}")
    n_threads = configure_threads(threads)
    path = resolve_model(model_spec)
    text, corpus_sha, corpus_desc = load_corpus_text(CorpusSpec(path=corpus))
    tok = tokenizer_for(path)
    cc = chunk_corpus(tok, tok.encode(text), corpus_sha, corpus_desc, ctx, chunks)
    model = load_model(path, device)
    if model.config.n_vocab != tok.n_vocab:
        raise RunError(f"{path}: the tokenizer has {tok.n_vocab} tokens but the model's vocabulary "
                       f"has {model.config.n_vocab}")
    print(f"perplexity: {cc.n_chunks} chunks of {ctx} tokens from {corpus_desc} ({len(cc.stream)} tokens)",
          file=out, flush=True)
    acc, running = PerplexityAccumulator(), []
    forwards = [("model", _backend_forward(model, cc.window, backend, backend_threads, ubatch, batch))]
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
            "threads": n_threads, "batch": batch, "device": device, "backend": backend,
            "backend_threads": (backend_threads or physical_cores()) if backend != "exact" else None,
            "ubatch": ubatch if backend != "exact" else None}


def _backend_forward(model, window, backend: str, threads: int | None, ubatch: int, batch: int):
    """The model as a forward callable, through the emulated ``backend`` unless it is exact
    (plain-perplexity mode: the chunks of one call share their ubatches, as llama-perplexity's)."""
    from evalkit.model import Workspace
    if backend == "exact":
        return ModelForward(model, window, Workspace())
    from evalkit.backend.forward import EmulatedForward, emulate, physical_cores
    from evalkit.backend.linear import UbatchPlan
    plan = UbatchPlan(ubatch, batch, "ppl")
    return EmulatedForward(emulate(model, backend, threads or physical_cores(), plan), plan, window, Workspace())
