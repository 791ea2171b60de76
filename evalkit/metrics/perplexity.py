"""Perplexity exactly as ``llama-perplexity`` computes it (docs/perplexity-kld.md, sections 1-2).

Everything here works on float32 logits rows and reproduces the reference's
float/double mix step by step: per-row max and ``expf`` terms in float32, the
sum of exponentials in float64, and the NLL either in double (plain run) or in
float (a run that writes a base-logits file).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

__all__ = [
    "PerplexityAccumulator",
    "chunk_tokens",
    "check_finite_logits",
    "n_scored",
    "row_max_lse",
    "scored_positions",
    "token_nll",
]

# Rows per block in the vectorised kernels: 32 rows of a 256k vocabulary are
# 32 MiB of float32, which keeps temporaries bounded for any vocabulary size.
BLOCK_ROWS = 32


# --------------------------------------------------------------------------
# chunking (§1.3-1.5)
# --------------------------------------------------------------------------

def _check_n_ctx(n_ctx: int) -> int:
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)):
        raise ValueError(f"n_ctx must be an integer, got {n_ctx!r}")
    n_ctx = int(n_ctx)
    # C - 1 - floor(C/2) must be positive, otherwise no token is ever scored.
    if n_ctx < 3:
        raise ValueError(f"n_ctx must be at least 3 (n_ctx={n_ctx} scores no token per chunk)")
    return n_ctx


def n_scored(n_ctx: int) -> int:
    """Scored tokens per chunk: C - 1 - floor(C/2) (255 for C = 512)."""
    n_ctx = _check_n_ctx(n_ctx)
    return n_ctx - 1 - n_ctx // 2


def scored_positions(n_ctx: int) -> np.ndarray:
    """Chunk positions of the scored *targets*: floor(C/2)+1 ... C-1 (int64 array).

    The logits row predicting target position p is row p-1, so the rows used are
    floor(C/2) ... C-2.
    """
    n_ctx = _check_n_ctx(n_ctx)
    return np.arange(n_ctx // 2 + 1, n_ctx, dtype=np.int64)


def chunk_tokens(tokens, n_ctx: int, n_chunks: int | None = None,
                 bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into the chunks ``llama-perplexity`` evaluates.

    Returns ``(chunks, targets_pos)``: ``chunks`` is an int32 array (K, C) of the
    tokens fed to the forward pass, with position 0 of every chunk overwritten by
    ``bos_id`` when it is not None (§1.4: replaced, not prepended); ``targets_pos``
    is :func:`scored_positions` (§1.5). Targets are never at position 0, so
    ``chunks[k, targets_pos]`` are the original stream tokens.

    ``n_chunks`` None or negative means all ⌊T/C⌋ chunks, otherwise min(n_chunks, ⌊T/C⌋).
    Raises ValueError when the stream has fewer than 2·C tokens (the tool refuses
    then, whatever ``n_chunks`` is).
    """
    n_ctx = _check_n_ctx(n_ctx)
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {toks.shape}")
    if toks.size and not np.issubdtype(toks.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {toks.dtype}")
    n_tok = int(toks.size)
    if n_tok < 2 * n_ctx:
        raise ValueError(
            f"need at least 2*n_ctx = {2 * n_ctx} tokens for n_ctx={n_ctx}, "
            f"but the stream has only {n_tok} tokens")
    k_max = n_tok // n_ctx
    if n_chunks is None or n_chunks < 0:
        k = k_max
    elif n_chunks == 0:
        raise ValueError("n_chunks must be positive (or negative / None for all chunks), got 0")
    else:
        k = min(int(n_chunks), k_max)
    chunks = toks[: k * n_ctx].astype(np.int32).reshape(k, n_ctx)  # a copy: the stream is untouched
    if bos_id is not None:
        chunks[:, 0] = bos_id
    return chunks, scored_positions(n_ctx)


# --------------------------------------------------------------------------
# per-token NLL (§2.1)
# --------------------------------------------------------------------------

def check_finite_logits(logits: np.ndarray, *, chunk: int = 0, first_row: int = 0,
                        what: str = "logits") -> None:
    """Raise ValueError naming chunk and chunk position if any value is NaN or ±Inf.

    ``first_row`` is the chunk position of row 0 (⌊C/2⌋ for the scored rows).
    """
    ok = np.isfinite(logits)
    if not ok.all():
        row, col = (int(v) for v in np.argwhere(~ok)[0])
        raise ValueError(
            f"non-finite {what} ({logits[row, col]!r}) in chunk {chunk} at position "
            f"{first_row + row} (row {row} of this block, vocabulary index {col})")


def as_rows(logits, targets) -> tuple[np.ndarray, np.ndarray]:
    """Validate float32 logits rows (R, V) and their R target ids; returns (logits, int64 targets)."""
    z = np.asarray(logits)
    if z.ndim != 2:
        raise ValueError(f"logits must be 2-D (rows, n_vocab), got shape {z.shape}")
    if z.dtype != np.float32:
        raise ValueError(f"logits must be float32 (the reference works on float logits), got {z.dtype}")
    y = np.asarray(targets)
    if y.shape != (z.shape[0],):
        raise ValueError(f"targets must have shape ({z.shape[0]},), got {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"target token ids must lie in [0, {z.shape[1]}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    return z, y.astype(np.int64)


def row_max_lse(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For float32 rows z: (M float32, argmax int64 [lowest index], S = Σ expf(z-M) float64)."""
    m = z.max(axis=1)
    imax = z.argmax(axis=1)  # numpy returns the first maximal index, like the strict '>' scan
    t = z - m[:, None]  # float32, as the reference subtracts in float
    np.exp(t, out=t)
    s = t.sum(axis=1, dtype=np.float64)  # the reference accumulates expf terms in double
    return m, imax, s


def token_nll(logits, targets, *, writer: bool = False, chunk: int = 0,
              first_row: int = 0) -> np.ndarray:
    """Per-row NLL of ``targets`` under float32 ``logits`` rows, as float64.

    ``writer=False``: a plain PPL run, nll = -((z_y - M) - ln S) with z_y - M in
    float and ln S in double. ``writer=True``: a run writing a base-logits file,
    nll = (M + λ) - z_y entirely in float, λ = ln S rounded to float (§2.1).
    NaN/Inf logits raise ValueError naming ``chunk`` and position (``first_row`` is
    the chunk position of row 0).
    """
    z, y = as_rows(logits, targets)
    n = z.shape[0]
    out = np.empty(n, dtype=np.float64)
    for a in range(0, n, BLOCK_ROWS):
        zb = z[a:a + BLOCK_ROWS]
        check_finite_logits(zb, chunk=chunk, first_row=first_row + a)
        m, _, s = row_max_lse(zb)
        zy = zb[np.arange(zb.shape[0]), y[a:a + BLOCK_ROWS]]
        if writer:
            lam = np.log(s).astype(np.float32)
            out[a:a + BLOCK_ROWS] = ((m + lam) - zy).astype(np.float64)
        else:
            out[a:a + BLOCK_ROWS] = -((zy - m).astype(np.float64) - np.log(s))
    return out


# --------------------------------------------------------------------------
# running and final PPL (§2.2-2.3)
# --------------------------------------------------------------------------

class PerplexityAccumulator:
    """Token-weighted PPL over chunks: running value after each chunk, final (ppl, err).

    Sums of nll and nll² are kept in double, as in the reference.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sum_nll = 0.0
        self.sum_nll2 = 0.0
        self.running: list[float] = []

    def add(self, nll: Iterable[float] | np.ndarray) -> float:
        """Add one chunk's per-token NLLs; return the cumulative PPL exp(Σnll/n) (printed `[k]x.xxxx`)."""
        v = np.asarray(nll, dtype=np.float64).ravel()
        if v.size == 0:
            raise ValueError("a chunk must contribute at least one scored token")
        if not np.isfinite(v).all():
            i = int(np.argmax(~np.isfinite(v)))
            raise ValueError(f"non-finite NLL {v[i]!r} at token {i} of chunk {len(self.running)}")
        self.count += int(v.size)
        self.sum_nll += float(v.sum())
        self.sum_nll2 += float(np.dot(v, v))
        value = math.exp(self.sum_nll / self.count)
        self.running.append(value)
        return value

    def mean_and_se(self) -> tuple[float, float]:
        """Mean NLL and its standard error √((Σnll²/N - μ²)/(N-1)); SE is nan when undefined."""
        if self.count == 0:
            raise ValueError("no tokens accumulated")
        mu = self.sum_nll / self.count
        var = self.sum_nll2 / self.count - mu * mu
        se = math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else math.nan
        return mu, se

    def final(self) -> tuple[float, float]:
        """Final (PPL, ±PPL) = (exp μ, exp μ · √(s²/(N-1))).

        Raises ValueError where the reference prints an error instead of a value
        (population variance ≤ 0, or a single token).
        """
        mu, se = self.mean_and_se()
        if not math.isfinite(se):
            raise ValueError(f"cannot estimate the PPL uncertainty: variance of the NLL is not "
                             f"positive over {self.count} tokens")
        ppl = math.exp(mu)
        return ppl, ppl * se
