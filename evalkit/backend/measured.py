"""A real backend's output as a forward callable: the ``llama-perplexity --kl-divergence-base``
file written for a variant's model (docs/perplexity-kld.md §3).

The file holds, per chunk, the decoded log-probabilities of the scored rows. Log-
probabilities work as logits for every softmax-based statistic (the KLD, Δp, the top
token), so the file's records stand in for the variant's logits and are scored against
evalkit's own exact base. It must have been written on the run's corpus (same tokens),
context and vocabulary; it may hold fewer chunks than the run (then only those are scored).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from evalkit.errors import RunError

__all__ = ["LogitsInputError", "MeasuredLogits"]


class LogitsInputError(RunError):
    """A variant's ``logits`` file cannot be used: missing, truncated, or written for another
    corpus, context size or vocabulary (the message names the file and the mismatch)."""


class MeasuredLogits:
    """The records of a base-logits file as a forward callable ``(B, C) tokens → (B, R, V)``.

    ``chunks`` are the run's chunks as fed to the models and ``stream`` the corpus tokens;
    the file must agree with them on n_ctx and tokens, and with ``n_vocab``. A call looks
    its chunks up by their tokens (the callable sees tokens, not chunk numbers; equal
    tokens mean equal logits for any deterministic backend).
    """

    def __init__(self, path: Path, chunks: np.ndarray, stream: np.ndarray, n_vocab: int, variant: str):
        from evalkit.metrics.logits_file import LogitsFile
        self.path, self.variant = Path(path), variant
        where = f"variant {variant!r}: logits file {self.path}"
        if not self.path.is_file():
            raise LogitsInputError(f"{where} not found")
        try:
            self.file = LogitsFile(self.path)
        except ValueError as e:                      # truncated, not a logits file, bad header
            raise LogitsInputError(f"variant {variant!r}: {e}") from None
        except OSError as e:
            raise LogitsInputError(f"{where}: {e.strerror or e}") from None
        n_ctx = int(chunks.shape[1])
        try:
            self.file.check(n_ctx=n_ctx, n_vocab=n_vocab, tokens=stream)
        except ValueError as e:
            self.file.close()
            raise LogitsInputError(f"variant {variant!r}: {e} (it must be written on this run's corpus, "
                                   f"ctx and the model's vocabulary)") from None
        # a longer file is fine; a shorter one limits the chunks this variant is scored on
        self.n_chunks = min(self.file.n_chunks, int(chunks.shape[0]))
        fed = np.asarray(chunks, dtype=np.int32)
        self._index = {fed[k].tobytes(): k for k in range(self.n_chunks - 1, -1, -1)}

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """(B, C) chunk tokens → (B, R, V) decoded log-probabilities (float32)."""
        rows = []
        for t in np.asarray(tokens, dtype=np.int32):
            k = self._index.get(t.tobytes())
            if k is None:
                raise LogitsInputError(f"variant {self.variant!r}: logits file {self.path} holds no chunk "
                                       f"with these tokens (it covers the first {self.n_chunks} chunks)")
            rows.append(self.file.read_chunk(k).logprobs)
        return np.stack(rows)

    def close(self) -> None:
        """Close the file."""
        self.file.close()
