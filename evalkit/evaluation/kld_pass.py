"""One pass of ``evalkit run`` over the chunks still to do: the base, then every variant against it.

Per group of chunks the base's log-probabilities come from its forward callable (or from
a llama-perplexity base-logits file) and every variant's logits are scored against them;
each finished chunk is saved to the :class:`~evalkit.evaluation.store.ChunkStore`.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from evalkit.evaluation.corpus_chunks import ChunkedCorpus
from evalkit.evaluation.forward import ForwardFn
from evalkit.evaluation.loop import evaluate
from evalkit.evaluation.reference import BaseChunk, base_from_file, base_from_logits, score_variant
from evalkit.evaluation.store import ChunkStore

__all__ = ["BASE_KEY", "run_kld_pass"]

BASE_KEY = "base"


def _variant_key(i: int) -> str:
    return f"v{i}"          # the prefix of variant i's arrays in a chunk file


def _base_chunks(cc: ChunkedCorpus, group: list[int], arrays: dict, rows, seconds: float,
                 base_file, store: ChunkStore | None) -> list[BaseChunk]:
    """The base of each chunk of ``group``: from logits ``rows`` (B, R, V), or from the file."""
    from evalkit.metrics.logits_file import encode_records

    bases = []
    for j, k in enumerate(group):
        a = arrays[k]
        if base_file is not None:
            b = base_from_file(base_file, a["targets"], k)
            a["base_seconds"] = np.float64(0.0)
        else:
            if store is not None:           # a base-logits file is wanted: keep the records
                store.save_records(k, encode_records(rows[j]))
            a["base_seconds"] = np.float64(seconds)
            b = base_from_logits(rows[j], a["targets"], k, cc.window.first_row)
        a["base_nll"] = b.nll
        bases.append(b)
    return bases


class _Limited:
    """A forward callable evaluated only on the chunks below ``limit`` (a variant scored on the
    chunks its logits file holds): returns one entry per chunk of the group, None where skipped."""

    def __init__(self, fn: ForwardFn, limit: int, group: list):
        self.fn, self.limit, self.group = fn, limit, group
        self.seconds = 0.0              # per evaluated chunk, of the last call

    def __call__(self, tokens: np.ndarray) -> list:
        import time
        sel = [j for j, k in enumerate(self.group) if k < self.limit]
        out: list = [None] * len(self.group)
        if sel:
            t0 = time.perf_counter()
            rows = self.fn(tokens[np.asarray(sel)])
            self.seconds = (time.perf_counter() - t0) / len(sel)
            for i, j in enumerate(sel):
                out[j] = rows[i]
        return out


def run_kld_pass(cc: ChunkedCorpus, store: ChunkStore, todo: Sequence[int], per_call: int,
                 base: ForwardFn | None, variants: Sequence[tuple[str, ForwardFn]], base_file=None,
                 want_records: bool = False, progress: bool = False, desc: str = "chunks",
                 limits: Mapping[str, int] | None = None, first_index: int = 0,
                 after_base: Callable[[list[int]], None] | None = None) -> None:
    """Evaluate chunks ``todo``: ``base`` (None: read ``base_file``) and each ``(name, forward)``.

    ``limits`` maps a variant name to the number of leading chunks it is scored on (chunks
    beyond it get no arrays for that variant); the others are scored on every chunk.
    ``first_index``: the run-wide index of the first variant (its arrays are ``v<index>_*``),
    for a pass over some of the run's variants. ``after_base(group)`` is called right after
    each base forward call (to keep what the model holds then, e.g. its hidden states).
    """
    limits = limits or {}
    group_now: list = []            # the group being evaluated, seen by the limited callables
    wrapped = [(name, _Limited(fn, limits[name], group_now) if name in limits else fn) for name, fn in variants]
    names = {_variant_key(i): name for i, (name, _) in enumerate(wrapped, first_index)}
    fns = {_variant_key(i): fn for i, (_, fn) in enumerate(wrapped, first_index)}
    forwards = ([(BASE_KEY, base)] if base is not None else []) + list(fns.items())
    records = store if want_records else None
    for group, outputs in evaluate(forwards, cc.chunks, todo, per_call, progress, desc):
        group_now[:] = group
        arrays = {k: {"targets": cc.targets(k).astype(np.int32)} for k in group}
        bases = _base_chunks(cc, group, arrays, None, 0.0, base_file, None) if base is None else None
        for key, rows, seconds in outputs:
            if key == BASE_KEY:
                if after_base is not None:
                    after_base(group)
                bases = _base_chunks(cc, group, arrays, rows, seconds, None, records)
                continue
            if isinstance(fns[key], _Limited):
                seconds = fns[key].seconds
            for j, k in enumerate(group):
                if rows[j] is None:
                    continue
                st = score_variant(names[key], bases[j], rows[j], arrays[k]["targets"], k,
                                   cc.window.first_row)
                arrays[k][f"{key}_seconds"] = np.float64(seconds)
                for f_name, arr in st.__dict__.items():
                    arrays[k][f"{key}_{f_name}"] = arr
        for k in group:
            store.save(k, arrays[k])
