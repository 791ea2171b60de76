"""``evalkit run`` with ``order: layer``: the KLD pass over a layer-major pass of every model.

:class:`~evalkit.evaluation.layer_major.LayerMajor` pushes the pending chunks through the base
and every variant one layer at a time (one layer of each model resident, the hidden states in
memory or spilled under the run folder), then :func:`~evalkit.evaluation.kld_pass.run_kld_pass`
scores them exactly as in the ordinary order: the same chunk files, so the same
``results.json`` numbers, ``tokens.parquet`` and ``summary.md``. Each chunk file additionally
gets its share of the layer pass's seconds (so tokens/s stays honest) and its router counts
(:mod:`evalkit.report.router_stats`); :func:`add_router_stats` totals them over the chunks
that have them into ``results.json``'s ``router_stats``.

Resume: a chunk is saved only once it is scored, so a run killed during the layer pass
restarts it over the same pending chunks, and a finished run has nothing pending.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from evalkit.errors import RunError
from evalkit.evaluation.store import ChunkStore

__all__ = ["BASE", "ROUTER_KEY", "add_router_stats", "evaluate_layer_major"]

BASE = "(base)"                 # the base's name in the pass: not a plain name, so no variant has it
ROUTER_KEY = "layer_major_router"   # a chunk file's router counts (JSON bytes)
SPILL_FOLDER = "hidden-states"  # under the run folder, unless the config names a spill_dir


class _LayerStore(ChunkStore):
    """The run's chunk store, adding to each chunk its share of the layer pass: the models'
    seconds (to ``base_seconds`` / ``v<i>_seconds``) and the router counts of its tokens."""

    def __init__(self, store: ChunkStore, lm, todo: list[int], seconds_keys: dict[str, str]):
        super().__init__(store.folder, store.fingerprint)
        self.lm, self.keys = lm, seconds_keys
        self.slot = {k: j for j, k in enumerate(todo)}

    def save(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        """Chunk ``k``'s arrays plus its layer-pass share, atomically (one file, as before)."""
        j, n = self.slot[k], len(self.slot)
        for name, key in self.keys.items():
            if key in arrays:       # a variant limited to fewer chunks has no arrays here
                arrays[key] = np.float64(float(arrays[key]) + self.lm.seconds.get(name, 0.0) / n)
        if self.lm.router_chunks is not None:
            text = json.dumps(self.lm.router_chunks[j].counts_dict())
            arrays[ROUTER_KEY] = np.frombuffer(text.encode(), dtype=np.uint8)
        super().save(k, arrays)


def _check(runs, make_forward) -> None:
    """RunError for what the layer-major pass cannot compute: another forward factory, or an
    emulated backend (the config check refuses it too; this guards the Python API)."""
    from evalkit.evaluation.forward import exact_forward
    if make_forward is not exact_forward:
        raise RunError("order 'layer' runs evalkit's exact CPU forward over the model files; it cannot use "
                       f"another forward factory ({make_forward!r})")
    for vr in runs:
        bad = [c.kind for c in vr.components if c.kind not in ("exact", "measured")]
        if bad:
            raise RunError(f"variant {vr.spec.name!r}: order 'layer' does not run the emulated backend {bad[0]!r}")


def _spill_folder(cfg, store: ChunkStore) -> Path:
    """Where the hidden states spill: ``<run>/hidden-states`` (a killed run's leftover removed
    first), or a folder of this process under the config's ``spill_dir``."""
    if cfg.spill_dir:
        from evalkit.evaluation.layer_major import check_spill_dir
        root = check_spill_dir(cfg.resolve_own(cfg.spill_dir))
        _remove_dead_spills(root, cfg.name)
        return root / f"{cfg.name}-hidden-{os.getpid()}"
    folder = store.folder.parent / SPILL_FOLDER
    shutil.rmtree(folder, ignore_errors=True)   # the run folder is locked: nobody else uses it
    return folder


def _remove_dead_spills(root: Path, name: str) -> None:
    """Remove ``<name>-hidden-<pid>`` folders of killed runs (their pid is gone) from a spill_dir:
    a SIGKILLed run cannot remove its own, and the next one spills under a new pid."""
    for folder in root.glob(f"{name}-hidden-*"):
        pid = folder.name.rsplit("-", 1)[1]
        if folder.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:             # another user's process: alive
        return True
    return True


def evaluate_layer_major(cfg, plan, base, runs: list, store: ChunkStore, todo: list[int], progress: bool,
                         make_forward) -> None:
    """The pipeline's pending chunks through a layer-major pass, then scored into ``store``
    (the arguments are :func:`evalkit.pipeline._evaluate_pending`'s)."""
    from evalkit.evaluation.kld_pass import run_kld_pass
    from evalkit.evaluation.layer_major import LayerMajor, LayerMajorForward
    from evalkit.evaluation.loop import chunks_per_call
    from evalkit.model import Workspace

    _check(runs, make_forward)
    cc, window = plan.corpus, plan.corpus.window
    per_call = chunks_per_call(cfg.batch, cc.n_ctx)
    models = ([(BASE, base.path)] if plan.base_file is None else []) + [(vr.spec.name, vr.model.path) for vr in runs]
    comps = [(vr, c) for vr in runs for c in vr.components]
    limits = {c.entry: vr.limit for vr, c in comps if vr.limit is not None}
    keys = {BASE: "base_seconds", **{vr.spec.name: f"v{i}_seconds" for i, (vr, c) in enumerate(comps)
                                     if c.kind == "exact"}}
    want_records = bool(cfg.write_base_logits)
    if not models:                  # a base-logits file and no variant: nothing to push through layers
        run_kld_pass(cc, store, todo, per_call, None, [], plan.base_file, want_records, progress,
                     f"{cfg.name}: chunks")
        return
    folder = _spill_folder(cfg, store)
    try:
        with LayerMajor(models, spill_dir=folder) as lm:
            lm.run(cc.chunks, todo, per_call, window, Workspace(), progress, desc=f"{cfg.name}: layers")
            # the base's logits get their own buffer: its log-probabilities are used beside each variant's
            base_fn = (LayerMajorForward(lm.states[BASE], lm.models[BASE], window, lm.slots, Workspace())
                       if plan.base_file is None else None)
            fns = [(c.entry, lm.forwards[vr.spec.name] if c.kind == "exact" else vr.measured) for vr, c in comps]
            run_kld_pass(cc, _LayerStore(store, lm, todo, keys), todo, per_call, base_fn, fns, plan.base_file,
                         want_records, progress, f"{cfg.name}: chunks", limits=limits)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def router_stats_of(store: ChunkStore, n_chunks: int) -> dict | None:
    """The router statistics over every chunk file of ``store`` that holds router counts (those
    scored in layer order), with ``n_chunks`` covered; None when none does."""
    from evalkit.report.router_stats import RouterStats
    merged, covered = None, 0
    for k in range(n_chunks):
        with store.load(k) as d:
            if ROUTER_KEY not in d.files:
                continue
            raw = bytes(d[ROUTER_KEY])
        try:
            counts = json.loads(raw.decode())
        except ValueError as e:
            raise RunError(f"{store.chunk_path(k)}: unreadable router counts ({e}); rerun with --restart") from None
        if merged is None:
            merged = RouterStats(counts["base"], counts["variants"])
        merged.merge(counts)
        covered += 1
    if merged is None or not merged.layers:
        return None
    out = merged.to_dict()
    out.update(base="base", n_chunks=covered)
    return out


def add_router_stats(results: dict, store: ChunkStore, n_chunks: int) -> None:
    """Put :func:`router_stats_of` into ``results["router_stats"]`` (nothing without MoE routers)."""
    stats = router_stats_of(store, n_chunks)
    if stats is not None:
        results["router_stats"] = stats
