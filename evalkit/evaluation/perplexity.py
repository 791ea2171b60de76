"""``evalkit perplexity``: llama-perplexity's plain PPL mode over one forward callable."""
from __future__ import annotations

import sys
import time

from evalkit.errors import RunError
from evalkit.evaluation.corpus_chunks import chunk_corpus, encode_corpus
from evalkit.evaluation.forward import ModelForward, configure_threads, load_model
from evalkit.evaluation.loop import chunks_per_call, evaluate
from evalkit.evaluation.reference import ScoringError
from evalkit.memory import bound_heap

__all__ = ["perplexity"]


def perplexity(model_spec: str, corpus: str, ctx: int = 512, chunks: int | None = None,
               threads: int | None = None, progress: bool = True, out=sys.stdout, batch: int = 2048,
               device: str = "cpu", backend: str = "exact", backend_threads: int | None = None,
               ubatch: int = 512, order: str = "model", spill_dir: str | None = None) -> dict:
    """Evaluate a model's perplexity the way llama-perplexity does; returns the JSON-able result.

    ``batch`` tokens go through the model per call (``batch // ctx`` chunks, at least one),
    as llama-perplexity's ``-b``. Running values are printed as ``[k]ppl,`` like the reference.
    ``device``: where the forward pass runs (:mod:`evalkit.devices`; checked first).
    ``backend`` (:mod:`evalkit.backend`): ``exact``, or an emulated backend (``ik-cpu``,
    ``ik-cpu-avx2``; on the CPU) with ``backend_threads`` (default: the physical cores) and
    llama-perplexity's ``-ub`` ``ubatch``. ``order``: ``model`` (the whole model per group of
    chunks) or ``layer`` (:mod:`evalkit.evaluation.layer_major`: one layer at a time over every
    chunk, for a model larger than memory; identical numbers; exact backend on the CPU only),
    whose hidden states spill to ``spill_dir`` (default a temporary folder) past half the
    available memory.
    """
    from evalkit.corpus import load_corpus_text
    from evalkit.files import sha256_model
    from evalkit.metrics import PerplexityAccumulator
    from evalkit.run_config import CorpusSpec
    from evalkit.sources import resolve_model

    from evalkit.devices import resolve_device
    resolve_device(device)              # an unavailable device fails before any work
    from evalkit.backend.forward import BackendError, check_backend, physical_cores
    check_backend(backend, backend_threads, ubatch)
    if backend != "exact" and device != "cpu":
        raise BackendError(f"backend {backend!r} is emulated on the CPU; it cannot run on device {device!r}")
    _check_order(order, device, backend, spill_dir)
    if spill_dir:               # a bad folder fails now; the pass spills into a folder of its own
        spill_dir = _own_spill_folder(spill_dir)
    n_threads = configure_threads(threads)
    path = resolve_model(model_spec)
    text, corpus_sha, corpus_desc = load_corpus_text(CorpusSpec(path=corpus))
    bound_heap()                        # per-chunk temporaries go back to the OS when freed
    tok = encode_corpus(path, text)     # the tokenizer itself is released
    del text
    cc = chunk_corpus(tok, tok.stream, corpus_sha, corpus_desc, ctx, chunks)
    model = load_model(path, device) if order == "model" else None
    n_vocab = model.config.n_vocab if model is not None else _n_vocab(path)
    if n_vocab != tok.n_vocab:
        raise RunError(f"{path}: the tokenizer has {tok.n_vocab} tokens but the model's vocabulary "
                       f"has {n_vocab}")
    print(f"perplexity: {cc.n_chunks} chunks of {ctx} tokens from {corpus_desc} ({len(cc.stream)} tokens)",
          file=out, flush=True)
    acc, running = PerplexityAccumulator(), []
    t0 = time.perf_counter()
    if model is not None:
        forwards = [("model", _backend_forward(model, cc.window, backend, backend_threads, ubatch, batch))]
    else:
        try:
            layer_major = _layer_major(path, cc, batch, spill_dir, progress)
        except BaseException:
            _remove(spill_dir)
            raise
        forwards = [("model", layer_major.forwards["model"])]
    try:
        _score(forwards, cc, path, chunks_per_call(batch, ctx), acc, running, out)
    finally:
        if model is None:
            lm_info = layer_major.info()
            layer_major.close()           # the hidden states (spill files) and the mapping
            _remove(spill_dir)
    dt = time.perf_counter() - t0
    ppl, err = acc.final()
    print(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}", file=out, flush=True)
    return {"model": str(path), "model_sha256": sha256_model(path), "corpus": corpus_desc,
            "corpus_sha256": corpus_sha, "n_ctx": ctx, "n_chunks": cc.n_chunks, "ppl": [ppl, err],
            "running_ppl": running, "n_tokens": int(acc.count),
            "tokens_per_s": cc.n_chunks * ctx / dt if dt > 0 else None,
            "threads": n_threads, "batch": batch, "device": device, "backend": backend,
            "backend_threads": (backend_threads or physical_cores()) if backend != "exact" else None,
            "ubatch": ubatch if backend != "exact" else None, "order": order,
            "layer_major": lm_info if model is None else None}


def _score(forwards, cc, path, per_call: int, acc, running: list, out) -> None:
    """Every chunk's NLL into ``acc``, the running PPL printed as ``[k]ppl,`` and kept."""
    from evalkit.metrics import token_nll
    for group, outputs in evaluate(forwards, cc.chunks, range(cc.n_chunks), per_call):
        for _, rows, _ in outputs:
            for j, k in enumerate(group):
                try:
                    nll = token_nll(rows[j], cc.targets(k), chunk=k, first_row=cc.window.first_row)
                except ValueError as e:
                    raise ScoringError(f"{path}: {e}") from None
                running.append(acc.add(nll))
                print(f"[{k + 1}]{running[-1]:.4f},", end="", file=out, flush=True)


def _check_order(order: str, device: str, backend: str, spill_dir: str | None = None) -> None:
    """RunError for an unknown order, layer-major off the exact CPU forward pass, or a spill
    folder for the model order (which keeps no hidden states: as `evalkit run` refuses it)."""
    if order not in ("model", "layer"):
        raise RunError(f"order must be 'model' or 'layer', got {order!r}")
    if order == "model" and spill_dir:
        raise RunError("--spill-dir applies to --order layer only")
    if order == "layer" and (device != "cpu" or backend != "exact"):
        raise RunError(f"order 'layer' runs the exact forward pass on the CPU only (got device {device!r}, "
                       f"backend {backend!r})")


def _own_spill_folder(spill_dir: str) -> str:
    """A new folder of this process under ``spill_dir`` (checked): two runs given the same
    --spill-dir would otherwise truncate each other's hidden-<i>.f32 (silently other numbers)."""
    import tempfile

    from evalkit.evaluation.layer_major import check_spill_dir
    root = check_spill_dir(spill_dir)
    try:
        return tempfile.mkdtemp(prefix="perplexity-hidden-", dir=root)
    except OSError as e:
        raise RunError(f"spill_dir {root}: cannot make a folder in it: {e.strerror or e}") from None


def _remove(folder: str | None) -> None:
    if folder:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


def _n_vocab(path) -> int:
    """The model's vocabulary size from its hyper-parameters (nothing else of it read)."""
    from evalkit.model.layerwise import LayerwiseModel
    m = LayerwiseModel(path)
    try:
        return m.config.n_vocab
    finally:
        m.close()


def _layer_major(path, cc, batch: int, spill_dir, progress: bool):
    """The layer-major pass over every chunk (llama-perplexity's grouping), ready to score."""
    from evalkit.evaluation.layer_major import layer_major_forwards
    return layer_major_forwards([("model", path)], cc.chunks, range(cc.n_chunks), chunks_per_call(batch, cc.n_ctx),
                                cc.window, spill_dir=spill_dir, progress=progress)


def _backend_forward(model, window, backend: str, threads: int | None, ubatch: int, batch: int):
    """The model as a forward callable, through the emulated ``backend`` unless it is exact
    (plain-perplexity mode: the chunks of one call share their ubatches, as llama-perplexity's)."""
    from evalkit.model import Workspace
    if backend == "exact":
        return ModelForward(model, window, Workspace())
    from evalkit.backend.forward import EmulatedForward, emulate, physical_cores
    from evalkit.backend.linear import UbatchPlan
    plan = UbatchPlan(ubatch, batch, "ppl")
    return EmulatedForward(emulate(model, backend, threads or physical_cores(), plan), plan, window, Workspace())
