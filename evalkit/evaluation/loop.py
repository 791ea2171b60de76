"""The evaluation loop: groups of chunks through every forward callable, in order.

:func:`evaluate` is a generator of generators, so the caller consumes each forward
callable's logits before the next one runs (their buffers are reused) and knows when a
group of chunks is complete (to save it):

    for group, outputs in evaluate(forwards, chunks, todo, per_call):
        for name, logits, seconds in outputs:      # logits: (len(group), rows, V)
            ...
        save(group)
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from evalkit.evaluation.forward import ForwardFn

__all__ = ["batched", "chunks_per_call", "evaluate"]


def chunks_per_call(batch_tokens: int, n_ctx: int) -> int:
    """Chunks evaluated per forward call: llama-perplexity's n_seq = max(1, n_batch / n_ctx)."""
    return max(1, batch_tokens // n_ctx)


def batched(items: Sequence, n: int) -> list[list]:
    """items in consecutive groups of n (the last may be shorter)."""
    items = list(items)
    return [items[i:i + n] for i in range(0, len(items), n)]


def _outputs(forwards: Sequence[tuple[str, ForwardFn]], tokens: np.ndarray, bar
             ) -> Iterator[tuple[str, np.ndarray, float]]:
    # Each callable's share of the group advances the bar, so it moves per chunk's worth of
    # work even when several chunks go through the models in one call.
    step = tokens.shape[0] / max(1, len(forwards))
    for name, fn in forwards:
        t0 = time.perf_counter()
        z = fn(tokens)
        seconds = (time.perf_counter() - t0) / tokens.shape[0]
        yield name, z, seconds
        # float shares (1/3 + 1/3 + 1/3) can pass the total by a rounding: tqdm then warns
        total, done = getattr(bar, "total", None), getattr(bar, "n", None)
        bar.update(step if total is None or done is None else max(0.0, min(step, total - done)))


def evaluate(forwards: Sequence[tuple[str, ForwardFn]], chunks: np.ndarray, todo: Sequence[int],
             per_call: int, progress: bool = False, desc: str = "chunks"
             ) -> Iterator[tuple[list[int], Iterator[tuple[str, np.ndarray, float]]]]:
    """Yield ``(group, outputs)`` for each group of ``per_call`` chunk indices of ``todo``.

    ``outputs`` yields ``(name, logits, seconds per chunk)`` for each forward callable in
    turn, each computed only when asked for. Several chunks per call (llama-perplexity's
    n_batch / n_ctx sequences) make larger GEMMs that read each weight once for all of them.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=desc, unit="chunk", disable=not progress,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")
    try:
        for group in batched(todo, per_call):
            yield group, _outputs(forwards, chunks[np.asarray(group)], bar)
    finally:
        bar.close()
