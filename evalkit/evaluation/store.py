"""Finished chunks on disk: ``<out>/partial/``, one atomically written file per chunk.

A run's fingerprint (corpus, base, variants, context, chunk count, evalkit version) is
kept in ``state.json``; partial results from another configuration are discarded, so a
killed run resumes from its last finished chunk and gives identical results.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from evalkit.errors import RunError
from evalkit.files import atomic_write_text, temp_path

__all__ = ["ChunkStore", "PARTIAL_FORMAT", "PieceStore", "fingerprint"]

PARTIAL_FORMAT = 1


def fingerprint(data: dict) -> str:
    """sha256 of a JSON-able dict (keys sorted)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ChunkStore:
    """Per-chunk result files (``chunk_NNNNN.npz``) and base-logits records of one run."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder, self.fingerprint = Path(folder), fingerprint

    def open(self, config: dict, restart: bool = False) -> "ChunkStore":
        """Keep the folder's chunks if they belong to this fingerprint, else start it afresh."""
        state = self.folder / "state.json"
        if self.folder.exists() and (restart or not self._same_run(state)):
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(state, json.dumps({"fingerprint": self.fingerprint, "config": config}))
        return self

    def verify(self) -> None:
        """RunError unless the folder still holds this run's chunks (checked before aggregating)."""
        if not self._same_run(self.folder / "state.json"):
            raise RunError(f"{self.folder}: the partial results now belong to another configuration "
                           "(was the run folder changed by another process?); run again")

    def _same_run(self, state: Path) -> bool:
        try:
            return json.loads(state.read_text()).get("fingerprint") == self.fingerprint
        except (OSError, ValueError):
            return False

    def chunk_path(self, k: int) -> Path:
        """The result file of chunk ``k``."""
        return self.folder / f"chunk_{k:05d}.npz"

    def records_path(self, k: int) -> Path:
        """The encoded base-logits records of chunk ``k``."""
        return self.folder / f"records_{k:05d}.npy"

    def hidden_path(self, k: int) -> Path:
        """The base's final hidden states of chunk ``k`` (kept until the base cache is written)."""
        return self.folder / f"hidden_{k:05d}.npy"

    def todo(self, n_chunks: int, with_records: bool = False, with_hidden: bool = False) -> list[int]:
        """Chunks still to evaluate (those without a result file, or without records or hidden
        states when wanted)."""
        return [k for k in range(n_chunks) if not self.chunk_path(k).is_file()
                or (with_records and not self.records_path(k).is_file())
                or (with_hidden and not self.hidden_path(k).is_file())]

    def save(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk ``k``'s arrays atomically."""
        path = self.chunk_path(k)
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as fh:          # a file object: savez adds no ".npz" to it
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load(self, k: int):
        """Chunk ``k``'s arrays (an NpzFile: use as a context manager)."""
        return np.load(self.chunk_path(k))

    def save_records(self, k: int, records: np.ndarray) -> None:
        """Keep chunk ``k``'s encoded base-logits records (atomically, like the chunk files)."""
        _save_npy(self.records_path(k), records)

    def save_hidden(self, k: int, hidden: np.ndarray) -> None:
        """Keep chunk ``k``'s base hidden states (atomically)."""
        _save_npy(self.hidden_path(k), hidden)

    def load_hidden(self, k: int) -> np.ndarray:
        """Chunk ``k``'s base hidden states."""
        return np.load(self.hidden_path(k))

    def load_records(self, k: int) -> np.ndarray:
        """Chunk ``k``'s encoded base-logits records."""
        return np.load(self.records_path(k))


class PieceStore(ChunkStore):
    """One model's share of each chunk (``<tag>_NNNNN.npz`` beside the chunk files), for runs that
    evaluate one model at a time; records and hidden states are the run's own."""

    def __init__(self, store: ChunkStore, tag: str):
        super().__init__(store.folder, store.fingerprint)
        self.tag = tag

    def chunk_path(self, k: int) -> Path:
        """This piece of chunk ``k``."""
        return self.folder / f"{self.tag}_{k:05d}.npz"


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
