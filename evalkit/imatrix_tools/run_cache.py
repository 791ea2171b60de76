"""An `evalkit run` variant's computed importance matrix, cached under the run folder.

A variant with ``imatrix: {corpus: ..., chunks: ..., ctx: ...}`` gets its matrix computed
from the base once and kept as ``<out>/imatrix/<variant>.dat`` (legacy format) beside a
stamp ``<variant>.json`` holding the fingerprint of everything that shaped it (base and
corpus contents, settings, this module's format); a later run with the same fingerprint
reuses the file, any change recomputes it.
"""
from __future__ import annotations

import json
from pathlib import Path

from evalkit.errors import EvalkitError, RunError

__all__ = ["cached_imatrix", "imatrix_fingerprint", "CACHE_FORMAT"]

CACHE_FORMAT = 2      # 2: MoE experts collected per expert (format-1 files of MoE models lack them)


def imatrix_fingerprint(base_sha256: str, corpus_sha256: str, spec) -> str:
    """The cache key: base and corpus contents plus every setting the statistics depend on."""
    from evalkit.evaluation.store import fingerprint
    from evalkit.imatrix_tools.collector import DEFAULT_UBATCH
    return fingerprint({"format": CACHE_FORMAT, "base": base_sha256, "corpus": corpus_sha256,
                        "ctx": spec.ctx, "chunks": spec.chunks, "ubatch": DEFAULT_UBATCH, "numerics": "reference",
                        "process_output": False})


def _corpus_file(spec, resolve) -> Path:
    from evalkit.corpus import CorpusError, corpus_path
    from evalkit.run_config import CorpusSpec
    path = corpus_path(CorpusSpec(path=spec.corpus), resolve)
    if path is None or not Path(path).is_file():
        raise CorpusError(f"imatrix corpus {path or spec.corpus} not found")
    return Path(path)


def cached_imatrix(spec, name: str, base, folder: Path, resolve, threads: int | None = None,
                   progress: bool = True) -> Path:
    """The imatrix file of variant ``name`` (an ``ImatrixSpec`` over ``base``, a ModelEntry),
    computed and written to ``folder`` unless an up-to-date one is there."""
    from evalkit.files import atomic_write_text, sha256_file
    from evalkit.imatrix import write_imatrix_legacy
    from evalkit.imatrix_tools.compute import compute_imatrix

    try:
        corpus = _corpus_file(spec, resolve)
        fp = imatrix_fingerprint(base.sha256, sha256_file(corpus), spec)
        target, stamp = folder / f"{name}.dat", folder / f"{name}.json"
        if target.is_file() and stamp.is_file() and _stamp_fingerprint(stamp) == fp:
            return target
        folder.mkdir(parents=True, exist_ok=True)
        res = compute_imatrix(str(base.path), str(corpus), spec.ctx, spec.chunks, threads,
                              progress=progress, out=None, dataset=spec.corpus)
        write_imatrix_legacy(target, res.stats)
    except EvalkitError as e:
        raise RunError(f"variant {name!r}: computing its imatrix: {e}") from None
    atomic_write_text(stamp, json.dumps({"fingerprint": fp, **res.summary()}, indent=1))
    return target


def _stamp_fingerprint(stamp: Path) -> str | None:
    try:
        return json.loads(stamp.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
