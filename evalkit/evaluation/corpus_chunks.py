"""Corpus → token stream → the chunks llama-perplexity evaluates, with the model's tokenizer."""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evalkit.errors import RunError
from evalkit.evaluation.window import ScoredWindow

__all__ = ["ChunkedCorpus", "ChunkingError", "EncodedCorpus", "chunk_corpus", "encode_corpus", "tokenizer_for"]


class ChunkingError(RunError):
    """The corpus cannot be cut into chunks (too short, bad context size...)."""


def tokenizer_for(path: Path):
    """The tokenizer of a GGUF file (its metadata) or a HuggingFace folder (tokenizer.json)."""
    from evalkit.gguf import GGUFFile
    from evalkit.model.tokenizer import Tokenizer
    if Path(path).is_dir():
        return Tokenizer.from_hf_dir(path)
    with GGUFFile(path) as f:
        try:
            return Tokenizer.from_gguf_metadata(f.metadata)
        except (ValueError, TypeError) as e:   # e.g. token types or special ids of the wrong type
            from evalkit.model.tokenizer import TokenizerError
            if isinstance(e, TokenizerError):
                raise
            raise TokenizerError(f"{path}: unusable tokenizer metadata: {e}") from None


@dataclass(frozen=True)
class EncodedCorpus:
    """A corpus's tokens, and what chunking needs of the tokenizer that made them."""

    stream: np.ndarray          # every token of the corpus (int32)
    bos_id: int | None
    add_bos: bool
    n_vocab: int


def _encode(path: Path, text: str) -> EncodedCorpus:
    tok = tokenizer_for(path)
    return EncodedCorpus(tok.encode(text), tok.bos_id, tok.add_bos, tok.n_vocab)


def encode_corpus(path: Path, text: str) -> EncodedCorpus:
    """``text`` tokenized by the model at ``path``; the tokenizer is released afterwards.

    The tokenizer is built and run on a worker thread: glibc gives that thread a heap arena
    of its own, so what the encoder leaves fragmented (~30 MB for WikiText-2) is handed back
    to the OS with it, instead of staying in the main heap beside the run's models.
    """
    from concurrent.futures import ThreadPoolExecutor

    from evalkit.memory import return_freed_memory
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evalkit-tokenize") as pool:
        enc = pool.submit(_encode, path, text).result()
    # the tokens copied here, so nothing keeps the worker's arena in use
    enc = dataclasses.replace(enc, stream=np.array(enc.stream, dtype=np.int32))
    gc.collect()            # the tokenizer's objects sit in reference cycles
    return_freed_memory()
    return enc


@dataclass
class ChunkedCorpus:
    """The evaluated tokens: the whole stream, and its first ``n_chunks`` chunks as fed."""

    description: str
    sha256: str
    stream: np.ndarray          # every token of the corpus
    chunks: np.ndarray          # (K, C) int32 as fed to the models (BOS at position 0 if used)
    window: ScoredWindow

    @property
    def n_chunks(self) -> int:
        """K, the number of chunks evaluated."""
        return int(self.chunks.shape[0])

    @property
    def n_ctx(self) -> int:
        """C, tokens per chunk."""
        return self.window.n_ctx

    @property
    def stream_chunks(self) -> np.ndarray:
        """(K, C) the stream's tokens, position 0 not replaced by BOS (the targets come from here)."""
        return self.stream[: self.n_chunks * self.n_ctx].reshape(self.n_chunks, self.n_ctx)

    def targets(self, k: int) -> np.ndarray:
        """The scored target tokens of chunk ``k``."""
        return self.window.targets(self.stream_chunks[k])


def chunk_corpus(tokenizer, stream: np.ndarray, sha256: str, description: str, n_ctx: int,
                 n_chunks: int | None) -> ChunkedCorpus:
    """Cut the token ``stream`` as llama-perplexity does (BOS replaces each chunk's first token
    when ``tokenizer``'s vocabulary adds one: a Tokenizer or an :class:`EncodedCorpus`);
    ``n_chunks`` None means every whole chunk."""
    from evalkit.metrics import chunk_tokens

    bos = tokenizer.bos_id if tokenizer.add_bos else None
    try:
        window = ScoredWindow(n_ctx)
        chunks, _ = chunk_tokens(stream, n_ctx, n_chunks, bos)
    except ValueError as e:
        raise ChunkingError(f"corpus {description}: {e}") from None
    return ChunkedCorpus(description, sha256, stream, chunks, window)
