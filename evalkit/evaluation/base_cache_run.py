"""A run's ``base_cache``: read it (the base model is never loaded) or write it from the base pass.

The first run with ``base_cache: PATH`` keeps the base's final hidden states of each chunk in
``<out>/partial/hidden_NNNNN.npy`` while it evaluates (so a killed run resumes without losing
them) and assembles the cache atomically once every chunk has them. A later run, of any name,
checks the cache against its corpus, context, chunk tokens and base, and recomputes the base
logits from it with the base's output tensor alone (:mod:`evalkit.evaluation.base_cache`).
"""
from __future__ import annotations

from pathlib import Path

from evalkit.errors import RunError
from evalkit.evaluation.base_cache import (BaseCache, BaseCacheHeader, CachedBaseForward, HiddenCapture,
                                           output_projection, tokens_sha256, write_base_cache)
from evalkit.evaluation.corpus_chunks import ChunkedCorpus
from evalkit.evaluation.models import ModelEntry
from evalkit.evaluation.store import ChunkStore

__all__ = ["HiddenSaver", "RunBaseCache"]


class HiddenSaver:
    """Keeps the base's hidden states of each chunk in the store, right after each base call.

    A context manager around the base model's forward hook; called with the chunk indices of
    the group the base has just evaluated (``run_kld_pass(..., after_base=saver)``)."""

    def __init__(self, model, store: ChunkStore):
        self.capture, self.store = HiddenCapture(model), store

    def __enter__(self) -> "HiddenSaver":
        self.capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.capture.__exit__(*exc)

    def __call__(self, group: list[int]) -> None:
        """Save the hidden states of the last base call, one file per chunk of ``group``."""
        hidden = self.capture.last
        if hidden is None or hidden.shape[0] != len(group):
            raise RunError(f"base cache: the base's hidden states were not captured for chunks {group}")
        for j, k in enumerate(group):
            self.store.save_hidden(k, hidden[j])


class RunBaseCache:
    """The cache at ``path`` for this run's corpus and base: opened and checked if it exists
    (:class:`~evalkit.evaluation.base_cache.BaseCacheError` on any mismatch), else to be written."""

    def __init__(self, path: str | Path, cc: ChunkedCorpus, base: ModelEntry):
        self.path, self.cc, self.base = Path(path), cc, base
        self.cache: BaseCache | None = None
        if self.path.exists():
            self._open()
        elif not self.path.parent.is_dir():
            raise RunError(f"base_cache {self.path}: its folder {self.path.parent} does not exist")

    def _open(self) -> None:
        cache = BaseCache(self.path)
        cache.check(self.cc.sha256, self.cc.n_ctx, self.cc.chunks, self.base.sha256)
        self.cache = cache

    @property
    def writing(self) -> bool:
        """True until the cache exists: the base model runs and its hidden states are kept."""
        return self.cache is None

    def forward(self, window, buffer=None) -> CachedBaseForward:
        """The base as a forward callable read from the cache (only its output tensor is loaded)."""
        if self.cache is None:
            raise RunError(f"base_cache {self.path}: not written yet")
        return CachedBaseForward(self.cache, output_projection(self.base.path), window, self.cc.chunks, buffer)

    def saver(self, base_fn, store: ChunkStore) -> HiddenSaver:
        """A :class:`HiddenSaver` on the base forward's model (evalkit's exact forward is needed)."""
        model = getattr(base_fn, "model", None)
        if model is None or not hasattr(model, "output"):
            raise RunError(f"base_cache {self.path}: writing it needs evalkit's exact forward of the base "
                           f"(got {type(base_fn).__name__})")
        return HiddenSaver(model, store)

    def finish(self, store: ChunkStore) -> None:
        """Write the cache from the chunks' kept hidden states (atomically), drop them, and open it."""
        n = self.cc.n_chunks
        missing = [k for k in range(n) if not store.hidden_path(k).is_file()]
        if missing:
            raise RunError(f"base_cache {self.path}: hidden states of chunks {missing[:5]} are missing; run again")
        first = store.load_hidden(0)
        header = BaseCacheHeader(self.cc.sha256, self.cc.n_ctx, n, self.base.sha256, int(first.shape[-1]),
                                 self.cc.window.first_row, tokens_sha256(self.cc.chunks))
        write_base_cache(self.path, header, (store.load_hidden(k) for k in range(n)))
        for k in range(n):
            store.hidden_path(k).unlink(missing_ok=True)
        self._open()
