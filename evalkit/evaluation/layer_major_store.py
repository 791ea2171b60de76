"""Every evaluated chunk's hidden state of one model, in memory or spilled to a file.

Layer-major evaluation (:mod:`evalkit.evaluation.layer_major`) keeps, per model, the
residual stream (K slots, C positions, E floats) of all K chunks between layers. In memory
it is one float32 array that the blocks update in place. Spilled, it is a file of the same
layout read and written with ``pread``/``pwrite`` one group of chunks at a time, through
one reused buffer: unlike a memory map, the file's pages then never count in the process's
resident memory (they are the kernel's page cache, dropped under pressure).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from evalkit.errors import RunError

__all__ = ["HiddenStates", "available_memory"]


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class HiddenStates:
    """(n_slots, n_ctx, n_embd) float32 states; ``path`` given: spilled to that file.

    :meth:`read` gives a group of consecutive slots as a (B, C, E) tensor (a view of the
    array in memory, a reused buffer when spilled); :meth:`write` stores rows ``row0``…C-1
    of each (skipped when they already are the array's own memory).
    """

    def __init__(self, n_slots: int, n_ctx: int, n_embd: int, path: Path | None = None):
        self.shape = (int(n_slots), int(n_ctx), int(n_embd))
        self.path = Path(path) if path is not None else None
        self._buf: np.ndarray | None = None
        if self.path is None:
            self.array = np.empty(self.shape, dtype=np.float32)
            self._fd = None
            return
        self.array = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, self.nbytes)
        except OSError as e:
            raise RunError(f"layer-major hidden states: cannot create {self.path} ({self.nbytes} bytes): {e}") from None

    @property
    def nbytes(self) -> int:
        """Size of all the states."""
        n, c, e = self.shape
        return 4 * n * c * e

    @property
    def spilled(self) -> bool:
        """True when the states live in a file."""
        return self.path is not None

    def _row_bytes(self) -> int:
        return 4 * self.shape[2]

    def _offset(self, slot: int, row: int = 0) -> int:
        return (slot * self.shape[1] + row) * self._row_bytes()

    def read(self, slots: slice, row0: int = 0) -> torch.Tensor:
        """Slots ``slots`` (consecutive), rows ``row0``…C-1: (B, C - row0, E) float32.

        In memory with ``row0`` = 0: a view the caller may update in place. Otherwise a
        contiguous copy (the spill buffer is reused by the next read)."""
        s0, s1 = slots.start, slots.stop
        if self.array is not None:
            v = self.array[s0:s1, row0:]
            return torch.from_numpy(v if row0 == 0 else np.ascontiguousarray(v))
        B, C, E = s1 - s0, self.shape[1], self.shape[2]
        n = B * (C - row0) * E
        if self._buf is None or self._buf.size < n:
            self._buf = np.empty(n, dtype=np.float32)
        out = self._buf[:n].reshape(B, C - row0, E)
        if row0 == 0:
            self._pread(out, self._offset(s0))
        else:
            for b in range(B):
                self._pread(out[b], self._offset(s0 + b, row0))
        return torch.from_numpy(out)

    def write(self, slots: slice, x: torch.Tensor, row0: int = 0) -> None:
        """Store ``x`` (B, C - row0, E) as rows ``row0``…C-1 of slots ``slots``."""
        s0, s1 = slots.start, slots.stop
        want = (s1 - s0, self.shape[1] - row0, self.shape[2])
        if tuple(x.shape) != want:
            raise RunError(f"layer-major hidden states: got shape {tuple(x.shape)}, expected {want}")
        if self.array is not None:
            dest = torch.from_numpy(self.array[s0:s1, row0:])
            if dest.data_ptr() != x.data_ptr() or dest.stride() != x.stride():
                dest.copy_(x)               # a block that did not update its input in place
            return
        a = x.detach().numpy()
        if row0 == 0 and a.flags.c_contiguous:
            self._pwrite(a, self._offset(s0))
            return
        for b in range(want[0]):
            self._pwrite(np.ascontiguousarray(a[b]), self._offset(s0 + b, row0))

    def _pread(self, out: np.ndarray, offset: int) -> None:
        mv = memoryview(out).cast("B")
        done = 0
        while done < len(mv):
            try:
                n = os.preadv(self._fd, [mv[done:]], offset + done)
            except OSError as e:
                raise RunError(f"layer-major hidden states: reading {self.path}: {e}") from None
            if n <= 0:
                raise RunError(f"layer-major hidden states: {self.path} is shorter than expected (truncated?)")
            done += n

    def _pwrite(self, a: np.ndarray, offset: int) -> None:
        mv = memoryview(a).cast("B")
        done = 0
        while done < len(mv):
            try:
                done += os.pwrite(self._fd, mv[done:], offset + done)
            except OSError as e:
                raise RunError(f"layer-major hidden states: writing {self.path} (disk full?): {e}") from None

    def close(self) -> None:
        """Free the memory, or close and delete the spill file."""
        self.array, self._buf = None, None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.path.unlink(missing_ok=True)
