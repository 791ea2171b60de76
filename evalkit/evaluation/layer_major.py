"""Layer-major evaluation: models larger than memory, one layer of every model at a time.

The ordinary order pushes one group of chunks through a whole model, then the next group:
every layer of every model is resident at once. Here, for each layer index, each model's
layer is built (:class:`~evalkit.model.layerwise.LayerwiseModel`), every group of chunks
goes through it, and its pages are dropped before the next one is built; the residual
streams of all chunks wait between layers, in memory or spilled to files
(:class:`~evalkit.evaluation.layer_major_store.HiddenStates`). Peak memory: the largest
layer + every model's hidden states (or one group's, spilled) + the logits buffer.

The chunks are grouped per call exactly as the ordinary loop groups them and go through
the same modules in the same shapes, so the final-norm hidden states, and the logits the
forward callables compute from them (the output projection, one group per call, its pages
dropped after each call), are bit-identical to the ordinary order's. The callables plug
into :func:`~evalkit.evaluation.loop.evaluate` / ``run_kld_pass`` like any other.

Router statistics come for free: while layer ``i`` of the base and of each variant runs,
each one's expert choices are recorded, compared (:mod:`evalkit.report.router_stats`) and
dropped.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from evalkit.errors import RunError
from evalkit.evaluation.layer_major_store import HiddenStates, available_memory
from evalkit.evaluation.loop import batched
from evalkit.evaluation.window import ScoredWindow

__all__ = ["LayerMajor", "LayerMajorForward", "layer_major_forwards"]


class LayerMajorForward:
    """One model's forward callable over the hidden states a :class:`LayerMajor` pass left:
    chunks are recognised by their tokens, and only the output projection runs."""

    def __init__(self, states: HiddenStates, model, window: ScoredWindow, slots: dict[bytes, int], buffer=None,
                 release: bool = True):
        self.states, self.model, self.window, self.slots = states, model, window, slots
        self.buffer, self.release = buffer, release
        self.norm, self.output = model.head()

    @property
    def n_vocab(self) -> int:
        """Width of the logits rows."""
        return self.model.config.n_vocab

    def _hidden(self, ks: list[int]) -> torch.Tensor:
        """(B, C - first_row, E) contiguous final-norm states of slots ``ks``."""
        first = self.window.first_row
        if ks == list(range(ks[0], ks[0] + len(ks))):
            x = self.states.read(slice(ks[0], ks[0] + len(ks)), first)
            return x if x.is_contiguous() else x.contiguous()
        return torch.cat([self.states.read(slice(k, k + 1), first).clone() for k in ks])

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """(B, C) tokens of chunks of the pass → (B, n_rows, V) logits of the scored rows."""
        try:
            ks = [self.slots[np.ascontiguousarray(t, dtype=np.int32).tobytes()] for t in tokens]
        except KeyError:
            raise RunError(f"{self.model.path}: a chunk to evaluate was not in the layer-major pass") from None
        x = self._hidden(ks)
        shape = (*x.shape[:-1], self.output.out_features)
        out = self.buffer("logits", *shape) if self.buffer is not None else None
        with torch.no_grad():
            z = self.output(x, out=out)
        if self.release:
            # the base's and every variant's output matrices take turns: keep one resident
            self.model.release(self.model.output_name)
        return self.window.scored_rows(z.numpy())


class LayerMajor:
    """A layer-major pass over several models: open, :meth:`run`, use ``forwards``, :meth:`close`.

    ``models``: ``(name, path)`` pairs; the first is the base of the router statistics.
    ``hidden_budget``: bytes the hidden states of all models may take in memory (default
    half the available memory); above it they are spilled to ``spill_dir`` (default a
    temporary folder), removed at :meth:`close`. ``spill``: True/False forces either way.
    """

    def __init__(self, models: Sequence[tuple[str, str | Path]], spill_dir: str | Path | None = None,
                 hidden_budget: int | None = None, spill: bool | None = None):
        from evalkit.model.layerwise import LayerwiseModel
        names = [n for n, _ in models]
        if not names or len(set(names)) != len(names):
            raise RunError(f"layer-major: need distinct model names, got {names}")
        self.spill_dir, self.hidden_budget, self.spill = spill_dir, hidden_budget, spill
        self.states: dict[str, HiddenStates] = {}
        self.forwards: dict[str, LayerMajorForward] = {}
        self.router_stats = None        # RouterStats over every chunk of the pass
        self.router_chunks = None       # and one per chunk (slot), in the order of ``todo``
        self._n_slots = 0
        self.slots: dict[bytes, int] = {}   # a chunk's tokens -> its slot in the hidden states
        self.seconds: dict[str, float] = {}
        self._tmp: Path | None = None
        self.models: dict[str, LayerwiseModel] = {}
        try:
            for name, path in models:
                self.models[name] = LayerwiseModel(path)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- storage
    def _spilling(self, nbytes: int) -> bool:
        if self.spill is not None:
            return bool(self.spill)
        budget = self.hidden_budget
        if budget is None:
            avail = available_memory()
            budget = avail // 2 if avail is not None else nbytes
        return nbytes > budget

    def _open_states(self, n_slots: int, n_ctx: int) -> None:
        total = sum(4 * n_slots * n_ctx * m.config.n_embd for m in self.models.values())
        folder = None
        if self._spilling(total):
            if self.spill_dir is None:
                folder = self._tmp = Path(tempfile.mkdtemp(prefix="evalkit-hidden-"))
            else:
                folder = check_spill_dir(self.spill_dir)
        for i, (name, m) in enumerate(self.models.items()):
            path = folder / f"hidden-{i}.f32" if folder is not None else None
            self.states[name] = HiddenStates(n_slots, n_ctx, m.config.n_embd, path)

    # ----------------------------------------------------------------- the pass
    def run(self, chunks: np.ndarray, todo: Sequence[int], per_call: int, window: ScoredWindow, buffer=None,
            progress: bool = False, router: bool = True, desc: str = "layer-major") -> dict[str, LayerMajorForward]:
        """Push chunks ``todo`` of ``chunks`` (K, C) through every model, layer by layer, in
        groups of ``per_call`` (the ordinary loop's grouping); returns ``{name: forward}``.

        ``buffer``: the Workspace the callables put their logits in (one, shared: use each
        callable's result before the next call). ``router``: collect router statistics
        (``self.router_stats``, and per chunk ``self.router_chunks``; None without MoE layers).
        """
        from tqdm.auto import tqdm
        from evalkit.model import Workspace

        todo = list(todo)
        if not todo:
            raise RunError("layer-major: no chunks to evaluate")
        chunks = np.asarray(chunks)
        C = int(chunks.shape[1])
        if C != window.n_ctx:
            raise RunError(f"layer-major: chunks of {C} tokens, the window is for {window.n_ctx}")
        self._open_states(len(todo), C)
        self._n_slots = len(todo)
        groups = [slice(g[0], g[-1] + 1) for g in batched(range(len(todo)), per_call)]
        tokens = [torch.from_numpy(chunks[np.asarray(todo[g])].astype(np.int64)) for g in groups]
        n_layer = max(m.n_layer for m in self.models.values())
        ws = Workspace()
        steps = len(self.models) * (n_layer + 1)
        with tqdm(total=steps, desc=desc, unit="layer", disable=not progress) as bar, torch.no_grad():
            for name, m in self.models.items():
                self._embed(name, m, groups, tokens)
                bar.update(1)
            for il in range(n_layer):
                routings = {}
                for name, m in self.models.items():
                    if il < m.n_layer:
                        routings[name] = self._layer(name, m, il, groups, window.first_row, ws, router)
                    bar.update(1)
                self._router_layer(il, routings)
        self.slots = {np.ascontiguousarray(chunks[k], dtype=np.int32).tobytes(): j for j, k in enumerate(todo)}
        buffer = buffer if buffer is not None else Workspace()
        self.forwards = {name: LayerMajorForward(self.states[name], m, window, self.slots, buffer)
                         for name, m in self.models.items()}
        return self.forwards

    def _embed(self, name: str, m, groups: list[slice], tokens: list[torch.Tensor]) -> None:
        """Every chunk's token embeddings into the model's states; the table's pages dropped."""
        t0 = time.perf_counter()
        emb = m.embedding()
        for g, tok in zip(groups, tokens):
            self.states[name].write(g, emb(tok))
        del emb
        m.release("token_embd.weight")
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _layer(self, name: str, m, il: int, groups: list[slice], first_row: int, ws, router: bool):
        """Layer ``il`` of model ``m`` over every group (the last also applies the final norm);
        returns the layer's expert choices (N, k), or None."""
        from evalkit.model.layerwise import RoutingCapture
        t0 = time.perf_counter()
        blk = m.block(il)
        cap = RoutingCapture(blk) if router else None
        last = il == m.n_layer - 1
        norm = m.head()[0] if last else None
        st = self.states[name]
        try:
            for g in groups:
                y = blk(st.read(g), m.rope, ws, keep_from=first_row if last else 0)
                if last:
                    y = norm(y)                 # the output projection's input, kept
                st.write(g, y, first_row if last else 0)
        finally:
            if cap is not None:
                cap.close()
        chosen = cap.chosen() if cap is not None else None
        del blk
        m.release_layer(il)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return None if chosen is None else (chosen, cap.n_expert)

    def _router_layer(self, il: int, routings: dict) -> None:
        """Compare layer ``il``'s variants' expert choices with the base's (the first model)."""
        from evalkit.report.router_stats import RouterStats
        base = next(iter(self.models))
        if routings.get(base) is None or len(self.models) < 2:
            return
        chosen, n_expert = routings[base]
        variants = {n: r[0] for n, r in routings.items() if n != base and r is not None and r[1] == n_expert}
        names = [n for n in self.models if n != base]
        if self.router_stats is None:
            self.router_stats = RouterStats(base, names)
            self.router_chunks = [RouterStats(base, names) for _ in range(self._n_slots)]
        self.router_stats.add_layer(il, n_expert, chosen, variants)
        # the rows are slot-major (groups in order, chunks in order within a group): split per chunk
        if chosen.shape[0] % self._n_slots:
            raise RunError(f"layer-major router statistics: layer {il} routed {chosen.shape[0]} tokens, "
                           f"not a multiple of the {self._n_slots} chunks")
        per = chosen.shape[0] // self._n_slots
        for j, rs in enumerate(self.router_chunks):
            rs.add_layer(il, n_expert, chosen[j * per:(j + 1) * per],
                         {n: c[j * per:(j + 1) * per] for n, c in variants.items()})

    # ----------------------------------------------------------------- facts
    def info(self) -> dict:
        """JSON-able facts of the pass: hidden-state bytes, whether spilled, each model's largest
        layer and transformer seconds."""
        return {"hidden_bytes": sum(s.nbytes for s in self.states.values()),
                "spilled": any(s.spilled for s in self.states.values()),
                "largest_layer_bytes": {n: m.layer_bytes() for n, m in self.models.items()},
                "layer_seconds": dict(self.seconds)}

    def close(self) -> None:
        """Free the hidden states (spill files deleted) and unmap the models."""
        for s in self.states.values():
            s.close()
        self.states = {}
        for m in self.models.values():
            m.close()
        self.models, self.forwards = {}, {}
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "LayerMajor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_spill_dir(spill_dir: str | Path) -> Path:
    """``spill_dir`` made now if missing (RunError if it is a file or cannot be made or written),
    so a bad folder fails before the pass, not when it first spills (maybe hours later)."""
    root = Path(spill_dir)
    if root.exists() and not root.is_dir():
        raise RunError(f"spill_dir {root} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"spill_dir {root} cannot be created: {e.strerror or e}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunError(f"spill_dir {root}: not writable")
    return root


def layer_major_forwards(models: Sequence[tuple[str, str | Path]], chunks: np.ndarray, todo: Sequence[int],
                         per_call: int, window: ScoredWindow, buffer=None, spill_dir: str | Path | None = None,
                         hidden_budget: int | None = None, progress: bool = False) -> LayerMajor:
    """Open ``models`` and run the layer-major pass; the result's ``forwards`` maps each name to its
    forward callable, ``router_stats`` holds the router statistics (None without MoE layers).
    Close it (or use it as a context manager) when done."""
    lm = LayerMajor(models, spill_dir, hidden_budget)
    try:
        lm.run(chunks, todo, per_call, window, buffer, progress)
    except BaseException:
        lm.close()
        raise
    return lm
