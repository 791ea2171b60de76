"""A run's outputs: ``results.json`` (schema in the README), ``tokens.parquet``, ``chunks.npy``,
``summary.md``, the plots, and optionally a llama-perplexity base-logits file.

Each file is written atomically; ``results.json`` comes last, so its presence means the
run finished.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.evaluation.aggregate import RunTotals
from evalkit.evaluation.corpus_chunks import ChunkedCorpus
from evalkit.evaluation.models import ModelEntry
from evalkit.evaluation.store import ChunkStore
from evalkit.files import atomic_write_text, json_default

__all__ = ["results_dict", "write_base_logits_file", "write_outputs", "write_results_json"]


def _component_figures(vt) -> dict[str, Any]:
    """One component's share of the decomposition: its headline statistics (no timings, so
    that a resumed run's results are identical; the primary's ``tokens_per_s`` has them)."""
    st = vt.statistics
    return {"kld_mean": st["kld_mean"], "same_top_p": st["same_top_p"], "ppl": st["ppl"],
            "n_tokens": st.get("n_tokens"), "n_chunks": vt.n_chunks}


def _backend_section(vr, by_entry: dict, tokens) -> dict[str, Any]:
    """``backend``, ``decomposition`` and (with a logits file) ``backend_verdict`` of a variant."""
    from evalkit.backend.verdict import paired_verdict
    spec = vr.spec
    sec: dict[str, Any] = {"backend": spec.backend, "backend_threads": vr.backend_threads,
                           "ubatch": spec.ubatch if spec.backend != "exact" else None,
                           "logits": str(spec.logits) if spec.logits else None,
                           "decomposition": {c.kind: _component_figures(by_entry[c.entry]) for c in vr.components}}
    kinds = {c.kind: c.entry for c in vr.components}
    if "measured" in kinds:
        emulated = kinds.get(spec.backend) if spec.backend != "exact" else None
        if emulated is None:
            sec["backend_verdict"] = None
            sec["backend_verdict_detail"] = {"reason": "no emulated backend to compare the measured logits "
                                                       "with (set the variant's backend, e.g. ik-cpu)"}
        else:
            frame = tokens[tokens["variant"].isin([kinds["measured"], emulated])]
            sec["backend_verdict"], sec["backend_verdict_detail"] = paired_verdict(
                frame[frame["variant"] == kinds["measured"]], frame[frame["variant"] == emulated])
            sec["backend_verdict_detail"]["against"] = spec.backend
    return sec


def results_dict(config: dict, cc: ChunkedCorpus, base: ModelEntry, runs: list,
                 totals: RunTotals, logits_file: Path | None, wall_time_s: float) -> dict[str, Any]:
    """The JSON-able results of a run (the stable ``results.json`` schema).

    ``runs`` are the pipeline's :class:`~evalkit.pipeline.VariantRun` (a variant, its model
    and the components it was evaluated through); ``variants.<name>`` holds the primary
    component's statistics plus the backend section (decomposition, verdict).
    """
    import torch

    import evalkit
    b = totals.base
    evaluated = cc.n_chunks * cc.n_ctx
    results: dict[str, Any] = {
        "evalkit_version": evalkit.__version__, "torch_version": torch.__version__,
        "python": platform.python_version(), "config": config, "corpus": cc.description,
        "corpus_sha256": cc.sha256, "n_ctx": cc.n_ctx, "n_chunks": cc.n_chunks,
        "base": {"model": str(base.path), "sha256": base.sha256, "size_bytes": base.size_bytes,
                 "bpw": base.bpw, "ppl": list(b.ppl), "running_ppl": b.running_ppl, "n_tokens": b.n_tokens,
                 "tokens_per_s": (evaluated / b.seconds) if b.seconds > 0 else None,
                 "logits_file": str(logits_file) if logits_file is not None else None},
        "variants": {},
    }
    by_entry = {vt.name: vt for vt in totals.variants}
    for vr in runs:
        entry, vt = vr.model, by_entry[vr.primary.entry]
        stats = dict(vt.statistics)
        stats.update({"model": str(entry.path), "sha256": entry.sha256, "size_bytes": entry.size_bytes,
                      "bpw": entry.bpw, "tokens_per_s": vt.tokens_per_s if vr.primary.kind != "measured" else None})
        stats.update(_backend_section(vr, by_entry, totals.tokens))
        results["variants"][vr.spec.name] = stats
    results["wall_time_s"] = wall_time_s
    return results


def write_base_logits_file(target: Path, store: ChunkStore, cc: ChunkedCorpus, n_vocab: int) -> None:
    """Assemble the kept per-chunk records into a llama-perplexity base-logits file."""
    from evalkit.metrics.logits_file import LogitsFileWriter
    w = LogitsFileWriter(target, cc.n_ctx, n_vocab, cc.stream, cc.n_chunks)
    try:
        for k in range(cc.n_chunks):
            w.write_encoded(store.load_records(k))
        w.close()
    except BaseException:
        w.abort()
        raise


def write_outputs(out: Path, results: dict, totals: RunTotals, cc: ChunkedCorpus) -> None:
    """tokens.parquet, chunks.npy, summary.md and the plots (``results.json`` is written last,
    by :func:`write_results_json`, after any base-logits file)."""
    from evalkit.report import save_all_plots, summary_markdown
    if not totals.tokens.empty:
        tmp = out / ".tokens.parquet.tmp"
        totals.tokens.to_parquet(tmp, index=False)
        os.replace(tmp, out / "tokens.parquet")
    tmp = out / ".chunks.tmp.npy"
    np.save(tmp, cc.stream_chunks.astype(np.int32))  # the evaluated tokens, for drilling into context
    os.replace(tmp, out / "chunks.npy")
    from evalkit.report.router_stats import router_markdown
    atomic_write_text(out / "summary.md", summary_markdown(results) + router_markdown(results.get("router_stats") or {}))
    if totals.variants:
        save_all_plots(results, totals.tokens, out)


def write_results_json(out: Path, results: dict) -> None:
    """``results.json``, atomically: the last output of a finished run."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=json_default))
