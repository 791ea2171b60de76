"""The base side of a comparison: per chunk, the targets' NLL and the base log-probabilities.

The base comes either from a forward callable (logits → exact float32 log-softmax) or
from a llama-perplexity ``--kl-divergence-base`` file (decoded log-probabilities); every
variant's per-token KLD statistics are then taken against it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evalkit.errors import RunError

__all__ = ["BaseChunk", "ScoringError", "base_from_logits", "base_from_file", "log_softmax_f32",
           "score_variant"]


class ScoringError(RunError):
    """A chunk cannot be scored (non-finite logits, out-of-range targets): the message names it."""


@dataclass
class BaseChunk:
    """One chunk's base: target NLLs (float64) and log-probabilities of the scored rows (R, V)."""

    nll: np.ndarray
    logprobs: np.ndarray


def log_softmax_f32(z: np.ndarray, block_rows: int = 32) -> np.ndarray:
    """Exact base log-probabilities from float32 logits (R, V): z - M - ln Σexp(z - M) (sum in double).

    Computed ``block_rows`` rows at a time into the result: every row's arithmetic is its own,
    so the values do not depend on the blocking, and the temporaries stay a few MiB.
    """
    out = np.empty(z.shape, dtype=np.float32)
    for a in range(0, z.shape[0], block_rows):
        zb, ob = z[a:a + block_rows], out[a:a + block_rows]
        m = zb.max(axis=1, keepdims=True)
        np.subtract(zb, m, out=ob)
        s = np.exp(ob).sum(axis=1, dtype=np.float64, keepdims=True)
        ob -= np.log(s).astype(np.float32)
    return out


def base_from_logits(rows: np.ndarray, targets: np.ndarray, chunk: int, first_row: int) -> BaseChunk:
    """The base of one chunk from its scored logits rows (R, V)."""
    from evalkit.metrics import token_nll
    try:
        nll = token_nll(rows, targets, chunk=chunk, first_row=first_row)
    except ValueError as e:
        raise ScoringError(f"base model: {e}") from None
    return BaseChunk(nll, log_softmax_f32(rows))


def base_from_file(logits_file, targets: np.ndarray, chunk: int) -> BaseChunk:
    """The base of one chunk from a llama-perplexity base-logits file."""
    lp = logits_file.read_chunk(chunk).logprobs
    return BaseChunk(-lp[np.arange(len(targets)), targets].astype(np.float64), lp)


def score_variant(name: str, base: BaseChunk, rows: np.ndarray, targets: np.ndarray, chunk: int,
                  first_row: int):
    """Per-token KLD statistics (:class:`evalkit.metrics.KLDTokens`) of one variant's chunk."""
    from evalkit.metrics import kld_token_stats
    try:
        return kld_token_stats(base.logprobs, rows, targets, chunk=chunk, first_row=first_row)
    except ValueError as e:
        raise ScoringError(f"variant {name!r}: {e}") from None
