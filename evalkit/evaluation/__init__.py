"""The evaluation loop as a library: chunks of a corpus through forward callables, scored.

Stages, one module each (read them in this order):

* :mod:`.window`    — which logits rows of a chunk are scored (llama-perplexity's second half);
* :mod:`.corpus_chunks` — corpus → tokens → the chunks llama-perplexity evaluates;
* :mod:`.forward`   — forward callables ``(B, C) tokens → (B, rows, V) logits`` (a model, …);
* :mod:`.loop`      — :func:`evaluate`: groups of chunks through every forward callable;
* :mod:`.reference` — the base side of a comparison (a forward callable or a logits file);
* :mod:`.store`     — finished chunks on disk, resume, fingerprint;
* :mod:`.base_cache`, :mod:`.base_cache_run` — the base kept as its final hidden states (a
  run's ``base_cache``), read back as exact logits without loading the base model;
* :mod:`.one_at_a_time` — ``resident: one``: each model loaded, run over every chunk, released;
* :mod:`.aggregate` — finished chunks → a typed :class:`RunTotals`;
* :mod:`.perplexity` — ``evalkit perplexity`` on top of the same pieces.

``evalkit run`` (:mod:`evalkit.pipeline`) strings them together. A new way to get logits
(an emulated backend, a logits file, a model with swapped weights) is one more forward
callable: nothing else changes.
"""
from evalkit.evaluation.forward import ForwardFn, ModelForward, load_model, model_logits
from evalkit.evaluation.loop import batched, chunks_per_call, evaluate
from evalkit.evaluation.window import ScoredWindow

__all__ = ["ForwardFn", "ModelForward", "ScoredWindow", "batched", "chunks_per_call", "evaluate",
           "load_model", "model_logits"]
