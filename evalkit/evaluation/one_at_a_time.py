"""``resident: one``: the run's models one after another, so peak memory is the largest model's.

The base goes first, alone (it writes the base cache if one is being made, and the base's
figures of each chunk); then each variant component is loaded, run over every pending chunk
against the stored base (cache or logits file) and released before the next one is loaded.
Each model's share of a chunk is saved as a piece (``<out>/partial/piece-*_NNNNN.npz``), so a
killed run resumes per model and per chunk; once every piece of a chunk is there they are merged
into the usual chunk file, identical to what the all-resident pass writes.
"""
from __future__ import annotations

import gc
from typing import Callable, Sequence

from evalkit.evaluation.corpus_chunks import ChunkedCorpus
from evalkit.evaluation.forward import ForwardFn
from evalkit.evaluation.kld_pass import run_kld_pass
from evalkit.evaluation.store import ChunkStore, PieceStore

__all__ = ["BASE_TAG", "Component", "base_todo", "merge_pieces", "release", "run_components"]

BASE_TAG = "piece-base"

# One variant component to evaluate: its entry name, a zero-argument loader of its forward
# callable, and the number of leading chunks it is limited to (None: all).
Component = tuple[str, Callable[[], ForwardFn], "int | None"]


def _tag(i: int) -> str:
    return f"piece-v{i}"


def release() -> None:
    """Free a released model's memory now (its weights' maps, a device's cached blocks)."""
    gc.collect()
    import torch

    from evalkit.gguf.reader import forget_headers
    from evalkit.memory import return_freed_memory
    forget_headers()            # the released model's vocabulary, among others
    return_freed_memory()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def base_todo(store: ChunkStore, pending: Sequence[int], with_records: bool, with_hidden: bool) -> list[int]:
    """The pending chunks whose base piece (or records / hidden states when wanted) is missing."""
    piece = PieceStore(store, BASE_TAG)
    return [k for k in pending if not piece.chunk_path(k).is_file()
            or (with_records and not store.records_path(k).is_file())
            or (with_hidden and not store.hidden_path(k).is_file())]


def run_components(cc: ChunkedCorpus, store: ChunkStore, pending: Sequence[int], per_call: int,
                   base: ForwardFn | None, base_file, components: Sequence[Component],
                   progress: bool, desc: str) -> None:
    """Each component in turn over the pending chunks it has no piece of: loaded, run, released.

    ``base`` is the stored base as a forward callable (a base cache), or None with ``base_file``.
    """
    for i, (entry, load, limit) in enumerate(components):
        piece = PieceStore(store, _tag(i))
        todo = [k for k in pending if not piece.chunk_path(k).is_file()]
        if not todo:
            continue
        fn = load()
        try:
            run_kld_pass(cc, piece, todo, per_call, base, [(entry, fn)], base_file, False, progress,
                         f"{desc}: {entry}", limits={entry: limit} if limit is not None else None, first_index=i)
        finally:
            del fn              # the only reference: the model goes before the next one is loaded
            release()


def merge_pieces(store: ChunkStore, pending: Sequence[int], n_components: int) -> None:
    """Merge each pending chunk's pieces into its chunk file (base arrays from the base piece,
    ``v<i>_*`` from component i's), then remove the pieces."""
    import numpy as np
    pieces = [PieceStore(store, BASE_TAG)] + [PieceStore(store, _tag(i)) for i in range(n_components)]
    for k in pending:
        with pieces[0].load(k) as d:
            arrays = {name: np.array(d[name]) for name in d.files}
        for i, p in enumerate(pieces[1:]):
            prefix = f"v{i}_"
            with p.load(k) as d:
                arrays.update({name: np.array(d[name]) for name in d.files if name.startswith(prefix)})
        store.save(k, arrays)
    # pieces of merged chunks (also those a run killed right after a merge left behind)
    for f in store.folder.glob("piece-*_*.npz"):
        if store.chunk_path(int(f.stem.rsplit("_", 1)[1])).is_file():
            f.unlink(missing_ok=True)
