"""Which logits rows of a chunk are scored: the one place that knows "the second half".

llama-perplexity evaluates each chunk of C tokens from an empty cache and scores only the
predictions of its second half (the first half gives every scored token at least C/2
tokens of context): logits rows ⌊C/2⌋ … C-2 predict the targets at positions
⌊C/2⌋+1 … C-1. Row C-1 predicts a token past the chunk and is never scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evalkit.metrics import n_scored, scored_positions

__all__ = ["ScoredWindow"]


@dataclass(frozen=True)
class ScoredWindow:
    """The scored rows and target positions of a chunk of ``n_ctx`` tokens."""

    n_ctx: int

    def __post_init__(self) -> None:
        n_scored(self.n_ctx)   # ValueError for a context that scores nothing

    @property
    def first_row(self) -> int:
        """Chunk position of the first scored logits row (⌊C/2⌋): a forward pass may skip
        the output projection of every earlier position."""
        return self.n_ctx // 2

    @property
    def n_rows(self) -> int:
        """Scored rows (= scored tokens) per chunk: C - 1 - ⌊C/2⌋."""
        return n_scored(self.n_ctx)

    @property
    def targets_pos(self) -> np.ndarray:
        """Chunk positions of the scored targets, ⌊C/2⌋+1 … C-1 (int64)."""
        return scored_positions(self.n_ctx)

    def scored_rows(self, logits_from_first: np.ndarray) -> np.ndarray:
        """The scored rows (..., n_rows, V) of logits computed from ``first_row`` on
        (..., C - first_row, V): drops the last row, which predicts past the chunk (a view)."""
        return logits_from_first[..., :-1, :]

    def targets(self, stream_chunk: np.ndarray) -> np.ndarray:
        """The scored target tokens of one chunk of the (BOS-unreplaced) token stream."""
        return stream_chunk[self.targets_pos]
