"""Evaluation corpora: local text files, the bundled WikiText-2 test split, or a `datasets` spec."""
from __future__ import annotations

import hashlib
from pathlib import Path

from evalkit.run_config import CorpusSpec
from evalkit.errors import RunError

__all__ = ["BUNDLED_CORPORA", "CorpusError", "load_corpus_text", "corpus_path"]

_DATA = Path(__file__).resolve().parent / "data"
# Bundled corpora: WikiText-2 raw test split (Merity et al. 2016, CC BY-SA 3.0).
BUNDLED_CORPORA = {"wikitext-2-raw-test": _DATA / "wikitext-2-raw-test.txt"}


class CorpusError(RunError):
    """The corpus cannot be read."""


def corpus_path(spec: CorpusSpec, resolve=lambda p: p) -> Path | None:
    """The local file behind a corpus spec (bundled names first), or None for a hub dataset."""
    if spec.path is None:
        return None
    if spec.path in BUNDLED_CORPORA:
        return BUNDLED_CORPORA[spec.path]
    return Path(resolve(spec.path))


def load_corpus_text(spec: CorpusSpec, resolve=lambda p: p) -> tuple[str, str, str]:
    """Return ``(text, sha256 of the bytes, description)``.

    Local files are read as llama-perplexity reads them: all bytes, exactly one trailing
    LF removed (the sha256 is of the file as stored).
    """
    from evalkit.model.tokenizer import read_corpus

    path = corpus_path(spec, resolve)
    if path is not None:
        if not path.exists():
            raise CorpusError(f"corpus file {path} not found")
        if not path.is_file():      # a folder, a FIFO (reading it would block), a device
            raise CorpusError(f"corpus {path} is not a regular file")
        try:
            raw = path.read_bytes()
            return read_corpus(path), hashlib.sha256(raw).hexdigest(), str(path)
        except (OSError, ValueError) as e:   # unreadable, or not UTF-8
            raise CorpusError(str(e) if isinstance(e, ValueError)
                              else f"corpus file {path}: {e.strerror or e}") from None
    try:
        import datasets  # optional: pip install evalkit[hub]
    except ImportError:
        raise CorpusError("a 'dataset' corpus needs the datasets package (pip install 'evalkit[hub]'); "
                          "or give a local text file as corpus") from None
    try:
        ds = datasets.load_dataset(spec.dataset, spec.dataset_config, split=spec.split)
    except Exception as e:  # hub unreachable, unknown dataset, ...
        raise CorpusError(f"cannot load dataset {spec.dataset}/{spec.dataset_config} split {spec.split}: {e}") from None
    if spec.text_field not in ds.column_names:
        raise CorpusError(f"dataset {spec.dataset} has no column {spec.text_field!r} ({ds.column_names})")
    text = "".join(ds[spec.text_field])
    if text.endswith("\n"):
        text = text[:-1]
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest(), f"{spec.dataset}/{spec.dataset_config}:{spec.split}"
