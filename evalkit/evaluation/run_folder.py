"""The run folder ``<output_dir>/<name>/``: one run at a time, outputs published last.

* **Lock.** A run holds an exclusive ``flock`` on ``<folder>/.lock`` from start to end; a
  second run into the same folder fails at once with :class:`RunFolderBusy`, instead of
  mixing its chunks with the first one's.
* **Leftovers.** Temporaries of a killed run (``.*.tmp``, a ``.staging-*`` folder) are
  removed when the next run takes the lock.
* **Staging.** Outputs are written into ``.staging-<pid>/`` and moved into place at the
  end, ``results.json`` last; the old ``results.json`` goes first, so a crash half-way
  never leaves a stale ``results.json`` beside a new ``summary.md``.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from evalkit.errors import RunError
from evalkit.files import is_leftover_temp

__all__ = ["RunFolder", "RunFolderBusy"]

# "imatrix": the imatrices a run computes for its variants (written through temporaries too)
_LEFTOVER_DIRS = (".", "partial", "models", "imatrix")


class RunFolderBusy(RunError):
    """Another evalkit run holds the run folder."""


class RunFolder:
    """Context manager: the locked run folder; ``staging()`` and ``publish()`` for the outputs."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None

    def __enter__(self) -> "RunFolder":
        if self.path.exists() and not self.path.is_dir():
            raise RunError(f"run folder {self.path} exists and is not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise RunError(f"cannot create the run folder {self.path}: a part of its path is a file") from None
        self._lock = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "?"
            self._lock.close()
            raise RunFolderBusy(f"run folder {self.path} is in use by another evalkit run (pid {holder}); "
                                "wait for it or choose another 'name' / --output-dir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        self._remove_leftovers()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _remove_leftovers(self) -> None:
        for sub in _LEFTOVER_DIRS:
            d = self.path / sub
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.name.startswith(".staging-") and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif is_leftover_temp(p) and p.is_file():
                    p.unlink(missing_ok=True)

    def staging(self) -> Path:
        """A fresh, empty folder for this run's outputs."""
        d = self.path / f".staging-{os.getpid()}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        return d

    def publish(self, staged: Path, last: str = "results.json") -> None:
        """Move every file of ``staged`` into the run folder, ``last`` at the very end."""
        (self.path / last).unlink(missing_ok=True)
        names = sorted(p.name for p in staged.iterdir() if p.name != last)
        for name in names + ([last] if (staged / last).exists() else []):
            os.replace(staged / name, self.path / name)
        staged.rmdir()
