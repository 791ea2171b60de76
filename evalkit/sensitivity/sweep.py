"""``evalkit sensitivity``: every (group, type) measured in one loaded model, resumably.

The base model is loaded once and its calibration pass runs once (log-probabilities and the
hidden states where groups start). Then, for each group and each distinct type its
candidates come to, the group's packed weights are swapped for that type's bytes, the KLD
against the base is measured from the group's first layer on, and the group is restored.
Each finished (group, type) is saved under ``<out>/partial/`` (one file per measurement,
with the run's fingerprint), so a killed pass resumes where it stopped with identical
results; ``restart`` starts over. Candidates whose tensors all keep their base bytes (the
base is already of that type) have a KLD of exactly 0 and are not measured.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evalkit.sensitivity.config import SensitivityConfig, SensitivityError
from evalkit.sensitivity.groups import Candidate, Group

__all__ = ["RESULT_FORMAT", "Session", "SensitivityResult", "load_result", "open_session", "sensitivity"]

RESULT_FORMAT = 1
_TOKEN_FIELDS = ("nll_q", "nll_base", "kld", "p_q", "p_base", "dp", "same_top")


@dataclass
class Session:
    """A loaded base with its calibration chunks, groups and candidates: what a sweep and a
    recipe search work on (the model is loaded once for both)."""

    cfg: SensitivityConfig
    base_path: Path
    base_sha256: str
    source: object                   # evalkit.sources.TensorSource of the base (bytes to quantize from)
    model: object                    # evalkit.model.Model, swapped in place
    measurer: object                 # evalkit.sensitivity.measure.Measurer
    swapper: object                  # evalkit.sensitivity.swap.WeightSwapper
    groups: list[Group]
    candidates: dict[str, list[Candidate]]
    total_elements: int              # every tensor of the file (the denominator of bpw)
    total_bytes: int                 # every tensor of the base file
    fixed_bytes: int                 # tensors outside every group (they keep their base bytes)
    tensors: list = field(default_factory=list)     # every quantizable tensor (TensorFacts), file order
    imatrix_sha256: str | None = None

    def tasks(self) -> list[tuple[Group, Candidate]]:
        """The measurements: one per group and distinct set of effective types (available, not
        identical to the base), in group order."""
        out = []
        for g in self.groups:
            seen = set()
            for c in self.candidates[g.name]:
                if c.available and not c.identical and c.types not in seen:
                    seen.add(c.types)
                    out.append((g, c))
        return out

    def ensure_base(self) -> None:
        """Run the base pass (keeping every group's starting state) unless it has run."""
        if self.measurer.base is None:
            self.measurer.base_pass({g.start_layer for g in self.groups})


def open_session(cfg: SensitivityConfig) -> Session:
    """Resolve and load everything a pass needs; named errors for bad input (before any work)."""
    from evalkit.evaluation.forward import load_model
    from evalkit.files import sha256_file, sha256_model
    from evalkit.sensitivity.groups import candidates_for, make_groups, quantizable_tensors
    from evalkit.sensitivity.measure import Measurer, load_calibration
    from evalkit.sensitivity.swap import WeightSwapper
    from evalkit.sources import ModelNotFoundError, open_source, resolve_model
    try:
        base_path = Path(resolve_model(cfg.resolve(cfg.base)))
    except ModelNotFoundError as e:
        raise SensitivityError(str(e)) from None
    imatrix = cfg.resolve(cfg.imatrix)
    if imatrix is not None and not Path(imatrix).is_file():
        raise SensitivityError(f"imatrix file {imatrix} not found")
    calib = load_calibration(base_path, cfg.resolve(cfg.corpus), cfg.ctx, cfg.chunks, cfg.batch)
    model = load_model(base_path)
    source = open_source(base_path)
    tensors = quantizable_tensors(source)
    groups = make_groups(tensors, len(model.blk), cfg.grouping, cfg.bands, cfg.kinds)
    cands = {g.name: candidates_for(g, cfg.types, has_imatrix=imatrix is not None) for g in groups}
    in_groups = {n for g in groups for n in g.names}
    total_bytes = sum(int(t.nbytes) for t in source.tensors)
    fixed = sum(int(t.nbytes) for t in source.tensors if t.name not in in_groups)
    return Session(cfg, base_path, sha256_model(base_path), source, model, Measurer(model, calib),
                   WeightSwapper(model, source, imatrix, cfg.threads), groups, cands,
                   sum(int(t.n_elements) for t in source.tensors), total_bytes, fixed, tensors,
                   sha256_file(imatrix) if imatrix else None)


def _fingerprint(s: Session, tasks) -> str:
    import evalkit
    from evalkit.evaluation.store import fingerprint
    cc = s.measurer.calib.corpus
    return fingerprint({"format": RESULT_FORMAT, "evalkit": evalkit.__version__, "base": s.base_sha256,
                        "corpus": cc.sha256, "n_ctx": cc.n_ctx, "n_chunks": cc.n_chunks,
                        "per_call": s.measurer.calib.per_call, "imatrix": s.imatrix_sha256,
                        "tasks": [[g.name, list(g.names), list(c.types)] for g, c in tasks]})


def _measure_all(s: Session, store, tasks, todo: list[int], progress: bool) -> None:
    """Measure the pending tasks, saving each as it finishes."""
    from tqdm.auto import tqdm
    s.ensure_base()
    bar = tqdm(todo, desc=f"{s.cfg.name}: group × type", unit="pass", disable=not progress)
    for k in bar:
        g, c = tasks[k]
        bar.set_postfix_str(f"{g.name} {c.type}", refresh=False)
        t0 = time.perf_counter()
        with s.swapper.swapped(dict(zip(g.names, c.types))):
            tokens, _ = s.measurer.measure(g.start_layer, name=f"{g.name} {c.type}")
        arrays = {f: getattr(tokens, f) for f in _TOKEN_FIELDS}
        arrays["seconds"] = np.float64(time.perf_counter() - t0)
        store.save(k, arrays)


def _stats_by_task(store, tasks) -> dict[tuple[str, tuple[str, ...]], dict]:
    """{(group, types): table statistics and seconds} from the saved measurements."""
    from evalkit.metrics import KLDTokens
    from evalkit.sensitivity.measure import token_stats
    out = {}
    for k, (g, c) in enumerate(tasks):
        with store.load(k) as z:
            tokens = KLDTokens(**{f: z[f] for f in _TOKEN_FIELDS})
            out[(g.name, c.types)] = {**token_stats(tokens), "seconds": float(z["seconds"])}
    return out


def _rows(s: Session, stats: dict) -> list[dict]:
    """The tidy table: one row per group and requested type."""
    n_tokens = s.measurer.calib.corpus.n_chunks * s.measurer.calib.corpus.window.n_rows
    zero = {"kld_mean": 0.0, "kld_err": 0.0, "kld_median": 0.0, "kld_p99": 0.0, "kld_max": 0.0,
            "same_top_p": 1.0, "same_top_err": 0.0, "dp_rms": 0.0, "ln_ppl_ratio": 0.0, "ln_ppl_ratio_err": 0.0,
            "n_tokens": n_tokens, "seconds": 0.0}
    rows = []
    for g in s.groups:
        for c in s.candidates[g.name]:
            st = (stats[(g.name, c.types)] if c.available and not c.identical else
                  zero if c.identical else {k: (np.nan if k != "n_tokens" else 0) for k in zero})
            model_bytes = s.total_bytes - g.base_bytes + c.bytes
            rows.append({
                "group": g.name, "kind": g.kind,
                "layer_first": g.layers[0] if g.layers else None, "layer_last": g.layers[-1] if g.layers else None,
                "n_tensors": len(g.tensors), "n_elements": g.n_elements, "requested_type": c.requested,
                "type": c.type, "types": list(c.types), "fallback": c.fallback, "available": c.available,
                "identical": c.identical, "note": c.note, "bytes": c.bytes if c.available else None,
                "bpw": 8.0 * c.bytes / g.n_elements if c.available else None,
                "base_type": "/".join(dict.fromkeys(t.src_type for t in g.tensors)), "base_bytes": g.base_bytes,
                "model_bytes": model_bytes if c.available else None,
                "model_bpw": 8.0 * model_bytes / s.total_elements if c.available else None, **st})
    return rows


@dataclass
class SensitivityResult:
    """A finished pass: the table (one row per group × requested type), the groups and the
    facts a recipe search needs (sizes of the whole file, base, calibration)."""

    meta: dict
    rows: list[dict]
    groups: list[Group] = field(default_factory=list)
    path: Path | None = None

    def frame(self):
        """The table as a pandas DataFrame (``types`` as ``/``-joined text)."""
        import pandas as pd
        df = pd.DataFrame(self.rows)
        return df.assign(types=df["types"].map(lambda v: "/".join(v)))


def _result(s: Session, rows: list[dict], wall: float, folder: Path) -> SensitivityResult:
    import evalkit
    cc = s.measurer.calib.corpus
    in_groups = {n for g in s.groups for n in g.names}
    meta = {"format": RESULT_FORMAT, "evalkit_version": evalkit.__version__, "config": s.cfg.to_dict(),
            "base": {"model": str(s.base_path), "sha256": s.base_sha256, "size_bytes": s.total_bytes,
                     "n_elements": s.total_elements, "bpw": 8.0 * s.total_bytes / s.total_elements},
            "imatrix_sha256": s.imatrix_sha256, "corpus": cc.description, "corpus_sha256": cc.sha256,
            "n_ctx": cc.n_ctx, "n_chunks": cc.n_chunks, "n_tokens": cc.n_chunks * cc.window.n_rows,
            "per_call": s.measurer.calib.per_call, "n_layer": len(s.model.blk),
            "fixed_bytes": s.fixed_bytes, "n_measurements": len(s.tasks()), "wall_time_s": wall,
            # what a recipe needs besides the groups: the quantizable tensors it leaves at their
            # base type (kept explicitly in its rules), and the file's tensor order
            "other_tensors": [t.to_dict() for t in s.tensors if t.name not in in_groups],
            "tensor_order": [t.name for t in s.source.tensors]}
    return SensitivityResult(meta, rows, list(s.groups), folder)


def run_sweep(s: Session, folder, progress: bool = True, restart: bool = False) -> SensitivityResult:
    """Measure every pending (group, type) of the session into ``folder`` (a locked
    :class:`~evalkit.evaluation.run_folder.RunFolder`), then build the table and write the outputs."""
    from evalkit.evaluation.store import ChunkStore
    from evalkit.sensitivity.outputs import write_outputs
    t0 = time.time()
    tasks = s.tasks()
    store = ChunkStore(folder.path / "partial", _fingerprint(s, tasks)).open(s.cfg.to_dict(), restart)
    todo = store.todo(len(tasks))
    if todo:
        _measure_all(s, store, tasks, todo, progress)
    store.verify()
    result = _result(s, _rows(s, _stats_by_task(store, tasks)), time.time() - t0, folder.path)
    staged = folder.staging()
    write_outputs(staged, result)
    folder.publish(staged, last="sensitivity.json")
    return result


def sensitivity(cfg: SensitivityConfig, progress: bool = True, restart: bool = False,
                session: Session | None = None) -> SensitivityResult:
    """Run (or resume) a sensitivity pass into ``<output_dir>/<name>/``; returns its result.

    Outputs: ``sensitivity.csv`` / ``.parquet`` (the tidy table), ``kld_results.csv``
    (GGUF-Tool-Suite's layout), ``heatmap.png`` / ``.svg``, ``summary.md`` and
    ``sensitivity.json`` (everything, written last). ``session``: an open session to reuse.
    """
    from evalkit.evaluation.forward import configure_threads
    from evalkit.evaluation.run_folder import RunFolder
    configure_threads(cfg.threads)
    s = session or open_session(cfg)
    with RunFolder(cfg.out_dir) as folder:
        return run_sweep(s, folder, progress, restart)


def load_result(folder: str | Path) -> SensitivityResult:
    """A finished pass from its folder (its ``sensitivity.json``); SensitivityError if absent or malformed."""
    p = Path(folder)
    p = p / "sensitivity.json" if p.is_dir() else p
    try:
        d = json.loads(p.read_text())
        return SensitivityResult(d["meta"], d["rows"], [Group.from_dict(g) for g in d["groups"]], p.parent)
    except OSError as e:
        raise SensitivityError(f"{p}: cannot read a sensitivity result: {e.strerror or e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SensitivityError(f"{p}: not a sensitivity result ({e})") from None
