"""``evalkit run``: one base pass per chunk, every variant scored against it.

The stages, each in its own module of :mod:`evalkit.evaluation`: plan (base model, corpus,
chunks, variants), a chunk store (partial results, resume, fingerprint), the KLD pass over
forward callables, aggregation into typed totals, and the outputs. Per chunk the base
logits are computed once (or decoded from a llama-perplexity base-logits file) and every
variant is scored against them, so no multi-gigabyte logits file is needed; each finished
chunk is saved, so a killed run resumes from its last finished chunk with identical results.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from evalkit.errors import RunError
from evalkit.evaluation.corpus_chunks import ChunkedCorpus, chunk_corpus, encode_corpus
from evalkit.evaluation.forward import ForwardFactory
from evalkit.evaluation.models import ModelEntry, base_entry, prepare_variant, vocab_of
from evalkit.memory import bound_heap
from evalkit.evaluation.store import PARTIAL_FORMAT, ChunkStore, fingerprint
from evalkit.run_config import RunConfig

__all__ = ["Component", "RunError", "RunPlan", "VariantRun", "plan_run", "run"]


@dataclass
class RunPlan:
    """What a run evaluates: the base model, the chunks, and the base-logits file if scored against one."""

    base_path: Path
    corpus: ChunkedCorpus
    base_file: object | None = None      # evalkit.metrics.logits_file.LogitsFile


def plan_run(cfg: RunConfig) -> RunPlan:
    """Resolve the base model and the corpus, tokenize, and cut the chunks (named errors)."""
    from evalkit.corpus import load_corpus_text
    from evalkit.metrics.logits_file import LogitsFile
    from evalkit.sources import ModelNotFoundError, resolve_model

    try:
        base_path = resolve_model(cfg.base if cfg.base.lower() == "smollm2" else cfg.resolve(cfg.base))
    except ModelNotFoundError as e:
        raise RunError(str(e)) from None
    text, corpus_sha, corpus_desc = load_corpus_text(cfg.corpus, cfg.resolve)
    enc = encode_corpus(base_path, text)
    stream = enc.stream
    del text
    base_file, n_chunks = None, cfg.chunks
    if cfg.base_logits:
        try:
            base_file = LogitsFile(Path(cfg.resolve(cfg.base_logits)))
            base_file.check(n_ctx=cfg.ctx, tokens=stream, n_vocab=None)
        except ValueError as e:
            raise RunError(f"base_logits: {e}") from None
        except OSError as e:
            raise RunError(f"base_logits {cfg.resolve(cfg.base_logits)}: {e.strerror or e}") from None
        n_chunks = base_file.n_chunks
        if base_path.is_file() and base_file.n_vocab != vocab_of(base_path)[0]:
            raise RunError(f"{base_file.path}: records are {base_file.n_vocab} wide but the model's "
                           f"vocabulary has {vocab_of(base_path)[0]} tokens")
    cc = chunk_corpus(enc, stream, corpus_sha, corpus_desc, cfg.ctx, n_chunks)
    return RunPlan(base_path, cc, base_file)


@dataclass
class Component:
    """One way a variant is evaluated: ``kind`` "exact" (the weights alone), an emulated backend
    ("ik-cpu", ...) or "measured" (its logits file). ``entry`` is the name its chunks are
    stored and totalled under: the variant's own name for its primary figure, else
    ``<variant>@<kind>``."""

    kind: str
    entry: str


@dataclass
class VariantRun:
    """A variant of the run with every component it is evaluated through.

    ``limit``: the chunks it is scored on when its logits file holds fewer than the run
    (every component of the variant then uses the same tokens, so they decompose)."""

    spec: object                 # evalkit.run_config.VariantSpec
    model: ModelEntry
    components: list[Component]
    backend_threads: int | None = None
    limit: int | None = None
    measured: object | None = None       # evalkit.backend.measured.MeasuredLogits

    @property
    def primary(self) -> Component:
        """The component of the variant's headline figure: measured, else emulated, else exact."""
        return self.components[-1]


def _measured(v, cc: ChunkedCorpus, base: ModelEntry):
    """The variant's logits file, checked against the run's corpus, ctx and vocabulary
    (before any model is quantized); None without ``logits``."""
    from evalkit.backend.measured import MeasuredLogits
    if not v.logits:
        return None
    n_vocab = vocab_of(base.path)[0] if base.path.is_file() else None
    return MeasuredLogits(Path(v.logits), cc.chunks, cc.stream, n_vocab, v.name)


def _components(v, model: ModelEntry, cc: ChunkedCorpus, measured) -> VariantRun:
    """A variant's components (exact, its emulated backend, measured) in that order."""
    from evalkit.backend.forward import physical_cores
    kinds = ["exact"] + ([v.backend] if v.backend != "exact" else []) + (["measured"] if v.logits else [])
    comps = [Component(k, v.name if i == len(kinds) - 1 else f"{v.name}@{k}") for i, k in enumerate(kinds)]
    vr = VariantRun(v, model, comps, (v.backend_threads or physical_cores()) if v.backend != "exact" else None)
    if measured is not None:
        vr.measured = measured
        vr.limit = vr.measured.n_chunks if vr.measured.n_chunks < cc.n_chunks else None
    return vr


def _run_fingerprint(plan: RunPlan, base: ModelEntry, runs: list[VariantRun], device: str) -> str:
    """The identity of a run's chunk files: what would change any number in them."""
    import evalkit
    from evalkit.files import sha256_file
    data = {
        "format": PARTIAL_FORMAT, "evalkit": evalkit.__version__, "corpus": plan.corpus.sha256,
        "base": base.sha256, "n_ctx": plan.corpus.n_ctx, "n_chunks": plan.corpus.n_chunks,
        "base_logits": sha256_file(plan.base_file.path) if plan.base_file is not None else None,
        "variants": [(r.spec.name, r.model.sha256) for r in runs], "device": device}
    # base_cache and resident are not in it: reading the cache or running the base, one model
    # at a time or all together, give the same chunk files
    lens = [(r.spec.name, [c.entry for c in r.components], r.backend_threads, r.spec.ubatch,
             sha256_file(r.measured.path) if r.measured is not None else None) for r in runs
            if len(r.components) > 1]
    if lens:                    # only runs that use the backend lens: older fingerprints stay valid
        data["backend_lens"] = lens
    return fingerprint(data)


def _forward_for(c: Component, vr: VariantRun, cfg: RunConfig, window, shared, make_forward):
    """The forward callable of one component."""
    from evalkit.backend.forward import backend_forward
    if c.kind == "measured":
        return vr.measured
    if c.kind == "exact":
        return make_forward(vr.model.path, window, shared)
    factory = backend_forward(c.kind, vr.backend_threads, vr.spec.ubatch, batch=cfg.batch, mode="kld")
    return factory(vr.model.path, window, shared)


def _base_forward(plan: RunPlan, base: ModelEntry, cache, make_forward):
    """The base's forward callable: None with a base-logits file, read from the base cache if it
    exists (the base model is not loaded), else the base model itself."""
    from evalkit.model import Workspace
    if plan.base_file is not None:
        return None
    if cache is not None and not cache.writing:
        return cache.forward(plan.corpus.window, Workspace())
    return make_forward(base.path, plan.corpus.window, Workspace())


def _evaluate_pending(cfg: RunConfig, plan: RunPlan, base: ModelEntry, runs: list[VariantRun],
                      store: ChunkStore, todo: list[int], progress: bool, make_forward, cache=None) -> None:
    """Build the forward callables and run the KLD pass over the chunks not yet in ``store``
    (every model loaded together; ``resident: one`` goes to :func:`_evaluate_one_at_a_time`)."""
    import contextlib

    from evalkit.evaluation.kld_pass import run_kld_pass
    from evalkit.evaluation.loop import chunks_per_call
    from evalkit.model import Workspace

    if cfg.resident == "one":
        return _evaluate_one_at_a_time(cfg, plan, base, runs, store, todo, progress, make_forward, cache)
    if cfg.order == "layer":            # every model one layer at a time (evaluation.layer_major_run)
        from evalkit.evaluation.layer_major_run import evaluate_layer_major
        return evaluate_layer_major(cfg, plan, base, runs, store, todo, progress, make_forward)
    window = plan.corpus.window
    base_fn = _base_forward(plan, base, cache, make_forward)
    shared = Workspace()        # the variants take turns in one logits buffer
    fns = [(c.entry, _forward_for(c, vr, cfg, window, shared, make_forward)) for vr in runs for c in vr.components]
    limits = {c.entry: vr.limit for vr in runs if vr.limit is not None for c in vr.components}
    writing = cache is not None and cache.writing
    with cache.saver(base_fn, store) if writing else contextlib.nullcontext() as saver:
        run_kld_pass(plan.corpus, store, todo, chunks_per_call(cfg.batch, window.n_ctx), base_fn, fns,
                     plan.base_file, bool(cfg.write_base_logits), progress, f"{cfg.name}: chunks", limits=limits,
                     after_base=saver)


def _evaluate_one_at_a_time(cfg: RunConfig, plan: RunPlan, base: ModelEntry, runs: list[VariantRun],
                            store: ChunkStore, todo: list[int], progress: bool, make_forward, cache) -> None:
    """``resident: one``: the base alone (writing the cache if it is being made), then each
    component loaded, run over the pending chunks and released (:mod:`.evaluation.one_at_a_time`)."""
    import contextlib
    import functools

    from evalkit.evaluation import one_at_a_time as one
    from evalkit.evaluation.kld_pass import run_kld_pass
    from evalkit.evaluation.loop import chunks_per_call
    from evalkit.evaluation.store import PieceStore
    from evalkit.model import Workspace

    cc, per_call = plan.corpus, chunks_per_call(cfg.batch, plan.corpus.n_ctx)
    writing = cache is not None and cache.writing
    todo_b = one.base_todo(store, todo, bool(cfg.write_base_logits), writing)
    if todo_b:
        base_fn = _base_forward(plan, base, cache, make_forward)
        with cache.saver(base_fn, store) if writing else contextlib.nullcontext() as saver:
            run_kld_pass(cc, PieceStore(store, one.BASE_TAG), todo_b, per_call, base_fn, [], plan.base_file,
                         bool(cfg.write_base_logits), progress, f"{cfg.name}: base", after_base=saver)
        del base_fn, saver
        one.release()
    if writing:
        cache.finish(store)
    # one logits buffer for the stored base and every model: the base's rows become log-probabilities
    # before the model is called, so the two never need it at once (memory: one buffer of O(batch))
    shared = Workspace()
    base_fn = cache.forward(cc.window, shared) if cache is not None else None
    comps = [(c.entry, functools.partial(_forward_for, c, vr, cfg, cc.window, shared, make_forward), vr.limit)
             for vr in runs for c in vr.components]
    one.run_components(cc, store, todo, per_call, base_fn, plan.base_file, comps, progress, cfg.name)
    one.merge_pieces(store, todo, len(comps))


def run(cfg: RunConfig, progress: bool = True, restart: bool = False,
        make_forward: ForwardFactory | None = None) -> Path:
    """Evaluate every variant of ``cfg`` against its base; returns the results folder.

    ``make_forward(path, window, buffer)`` turns each model file into a forward callable
    (default: evalkit's exact float32 model, :func:`~evalkit.evaluation.forward.exact_forward`,
    on ``cfg.device``).
    The run folder is locked for the whole run (a second run into it fails at once).
    """
    import functools

    from evalkit.devices import resolve_device
    from evalkit.evaluation.forward import configure_threads, exact_forward
    from evalkit.evaluation.run_folder import RunFolder

    t0 = time.time()
    if cfg.order == "layer" and cfg.device != "cpu":    # `evalkit run --device` skips the config check
        raise RunError(f"order 'layer' runs the exact forward on the CPU; device {cfg.device!r} "
                       "does not combine with it")
    resolve_device(cfg.device)          # an unavailable device fails before anything is quantized
    if make_forward is None:            # the default factory runs on cfg.device
        make_forward = exact_forward if cfg.device == "cpu" else functools.partial(exact_forward, device=cfg.device)
    configure_threads(cfg.threads)
    bound_heap()                        # per-chunk temporaries go back to the OS when freed
    with RunFolder(Path(cfg.output_dir) / cfg.name) as folder:
        _run_locked(cfg, folder, progress, restart, make_forward, t0)
    return folder.path


def _run_locked(cfg: RunConfig, folder, progress: bool, restart: bool, make_forward, t0: float) -> None:
    """The run's stages inside its locked folder: plan, pass, aggregate, publish the outputs."""
    from evalkit.evaluation.aggregate import aggregate
    from evalkit.evaluation.base_cache_run import RunBaseCache
    from evalkit.evaluation.outputs import (results_dict, write_base_logits_file, write_outputs,
                                            write_results_json)

    out = folder.path
    plan = plan_run(cfg)
    cc = plan.corpus
    base = base_entry(plan.base_path)
    # checked before any variant is quantized: a mismatched cache fails at once
    cache = RunBaseCache(cfg.resolve_own(cfg.base_cache), cc, base) if cfg.base_cache else None
    specs = [_resolved(v, cfg) for v in cfg.variants]
    measured = [_measured(v, cc, base) for v in specs]
    models = [prepare_variant(v, base, out, cfg.resolve, cfg.threads, progress) for v in specs]
    runs = [_components(v, m, cc, f) for v, m, f in zip(specs, models, measured)]
    store = ChunkStore(out / "partial", _run_fingerprint(plan, base, runs, cfg.device)).open(cfg.to_dict(), restart)
    writing = cache is not None and cache.writing
    todo = store.todo(cc.n_chunks, with_records=bool(cfg.write_base_logits), with_hidden=writing)
    if todo:
        _evaluate_pending(cfg, plan, base, runs, store, todo, progress, make_forward, cache)
    if cache is not None and cache.writing:
        cache.finish(store)
    store.verify()
    totals = aggregate(store, cc.n_chunks, [c.entry for r in runs for c in r.components], cc.n_ctx,
                       cc.window.targets_pos)
    results = results_dict(cfg.to_dict(), cc, base, runs, totals,
                           plan.base_file.path if plan.base_file is not None else None, time.time() - t0)
    if cfg.order == "layer":            # the router statistics its chunk files carry
        from evalkit.evaluation.layer_major_run import add_router_stats
        add_router_stats(results, store, cc.n_chunks)
    staged = folder.staging()
    write_outputs(staged, results, totals, cc)
    if cfg.write_base_logits:
        write_base_logits_file(Path(cfg.write_base_logits), store, cc, vocab_of(base.path)[0])
    write_results_json(staged, results)
    folder.publish(staged)


def _resolved(v, cfg: RunConfig):
    """The variant spec with its logits path resolved against the config's folder."""
    import dataclasses
    return dataclasses.replace(v, logits=cfg.resolve(v.logits)) if v.logits else v
