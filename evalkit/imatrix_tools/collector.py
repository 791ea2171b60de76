"""Collecting an importance matrix: Σx² of every weight's input activations, reduced on the fly.

The rules are llama-imatrix's (ik_llama.cpp ``IMatrixCollector::collect_imatrix``,
docs/imatrix.md §2):

* **Which weights.** Every matrix multiplication with a weight named ``blk.*`` (all layer
  matrices); the output projection only with ``process_output`` and only when it is a
  tensor of its own (a tied output multiplies by ``token_embd.weight``, which is never
  collected).
* **Which tokens.** The reference evaluates each chunk in micro-batches of ``ubatch``
  tokens (llama.cpp's ``-ub``, 512) and ignores any with fewer than 16 tokens; every
  token of the others counts, in every layer (it requests all logits, so the last layer
  is not cut short).
* **ncall.** One per weight and micro-batch; for experts, one per call whatever the
  routing, while each expert counts the token rows routed to it.

Nothing is kept per token: each call adds its Σx² (float32 over one call's rows, then
float64 across calls) and its row count to the weight's accumulator.

Experts (MoE, the reference's ``MUL_MAT_ID``; docs/imatrix.md §2.3): one entry per 3-D
weight ``blk.N.ffn_{gate,up,down}_exps.weight`` with sums and counts per expert. gate and
up see the token rows routed to the expert, down the expert's own SwiGLU output rows; every
row counts (the 16-row minimum is the dense ``MUL_MAT``'s only), and ncall grows by one per
micro-batch whatever the routing. :meth:`ImatrixCollector.hooked` observes each expert
through :meth:`evalkit.model.moe.ExpertLinears.observe`; the router (``ffn_gate_inp``) and
shared experts (``ffn_*_shexp``) are plain ``MUL_MAT`` operations, collected as dense weights.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from evalkit.imatrix import ImatrixEntry, ImatrixError, ImatrixStats

__all__ = ["ImatrixCollector", "DEFAULT_UBATCH", "MIN_UBATCH_TOKENS", "collected_modules", "counted_positions",
           "expert_modules"]

DEFAULT_UBATCH = 512        # llama.cpp's default micro-batch (-ub)
MIN_UBATCH_TOKENS = 16      # imatrix.cpp skips matrix multiplications of fewer rows


def counted_positions(n_pos: int, ubatch: int = DEFAULT_UBATCH) -> tuple[int, int]:
    """(positions counted, micro-batches counted) of a sequence of ``n_pos`` tokens.

    The chunk is cut into micro-batches of ``ubatch`` tokens from position 0; only the last
    can be short, and it is dropped when it has fewer than 16 tokens.
    """
    full, tail = divmod(n_pos, ubatch)
    if tail >= MIN_UBATCH_TOKENS:
        return n_pos, full + 1
    return full * ubatch, full


@dataclass
class _Accumulator:
    sums: np.ndarray                 # float64 (n_mat, n_per_row)
    counts: np.ndarray               # int64 (n_mat,)
    ncall: int = 0

    @classmethod
    def new(cls, n_mat: int, n_per_row: int) -> "_Accumulator":
        """Zero sums and counts for ``n_mat`` matrices of ``n_per_row`` columns."""
        return cls(np.zeros((n_mat, n_per_row)), np.zeros(n_mat, dtype=np.int64))


@dataclass
class ImatrixCollector:
    """Per-weight Σx², row counts and calls, in first-seen order (the forward's order)."""

    ubatch: int = DEFAULT_UBATCH
    _acc: dict[str, _Accumulator] = field(default_factory=dict)
    _last: tuple | None = None       # (input tensor, its version, rows) → Σx² of the last call
    _batch: int | None = None        # sequences in the current forward call (from the blocks' input)

    def _entry(self, name: str, n_mat: int, n_per_row: int) -> _Accumulator:
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = _Accumulator.new(n_mat, n_per_row)
        elif acc.sums.shape != (n_mat, n_per_row):
            raise ImatrixError(f"imatrix: inconsistent size for {name!r}: {acc.sums.shape} vs "
                               f"{(n_mat, n_per_row)}")
        return acc

    def _square_sums(self, x, keep: int, key=None):
        """Σx² over the first ``keep`` positions of x (B, T, n), float32 (n,). The same input
        fed to several weights in a row (q, k, v; gate, up) is reduced once: the same tensor
        object (kept alive here, so its identity cannot be reused) whose version counter has
        not moved. Inference tensors have no counter, so a layer must not modify one weight's
        input in place before passing it to the next (evalkit's blocks never do)."""
        key = x if key is None else key             # the caller's tensor when x is a view of it
        version = _version(key)
        last = self._last
        if last is not None and last[0] is key and last[1] == version and last[2] == keep:
            return last[3]
        xs = x[:, :keep] if keep < x.shape[1] else x
        sq = (xs * xs).sum(dim=(0, 1))
        self._last = (key, version, keep, sq)
        return sq

    def add_dense(self, name: str, x, index: int = 0, n_mat: int = 1) -> None:
        """One weight's input x (B, T, n) (T positions from 0 of each of B sequences):
        its counted rows go into ``name``'s sums, one call per counted micro-batch.

        A 2-D input (B·T, n) (the MoE layer's flattened tokens) is split back into the
        current call's B sequences. ``index`` / ``n_mat``: the input of matrix ``index`` of
        an ``n_mat``-matrix weight (per-head slices of a 3-D tensor, as the reference keeps
        them); the call is counted once, with matrix 0.
        """
        import torch
        src = x
        if x.dim() == 2:
            b = self._batch or 1
            if x.shape[0] % b:
                raise ImatrixError(f"imatrix: {name!r}: {x.shape[0]} rows do not split into {b} sequences")
            x = x.view(b, x.shape[0] // b, x.shape[1])
        keep, calls = counted_positions(int(x.shape[1]), self.ubatch)
        if calls == 0:
            return
        with torch.no_grad():
            sq = self._square_sums(x, keep, src)
        acc = self._entry(name, n_mat, int(x.shape[-1]))
        acc.sums[index] += sq.double().numpy()
        acc.counts[index] += int(x.shape[0]) * keep
        if index == 0:
            acc.ncall += int(x.shape[0]) * calls

    def add_expert_rows(self, name: str, rows, expert_ids, n_experts: int, calls: int = 1) -> None:
        """Rows (R, n) routed to experts ``expert_ids`` (R,) of an ``n_experts``-matrix weight
        (the reference's MUL_MAT_ID): each expert sums its own rows and counts them; the
        weight's ncall grows by ``calls`` (its micro-batches) whatever the routing."""
        import torch
        rows = torch.as_tensor(rows, dtype=torch.float32).reshape(-1, int(rows.shape[-1]))
        ids = torch.as_tensor(expert_ids, dtype=torch.int64).reshape(-1)
        if ids.numel() != rows.shape[0]:
            raise ImatrixError(f"imatrix: {name!r}: {rows.shape[0]} rows but {ids.numel()} expert ids")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_experts):
            raise ImatrixError(f"imatrix: {name!r}: expert id outside [0, {n_experts})")
        acc = self._entry(name, int(n_experts), int(rows.shape[1]))
        with torch.no_grad():
            sums = torch.zeros((n_experts, rows.shape[1]), dtype=torch.float32)
            sums.index_add_(0, ids, rows * rows)
        acc.sums += sums.double().numpy()
        acc.counts += np.bincount(ids.numpy(), minlength=n_experts)
        acc.ncall += int(calls)

    def add_expert(self, name: str, expert: int, rows, n_experts: int) -> None:
        """Rows (R, n) that expert ``expert`` of an ``n_experts``-matrix weight multiplies:
        all of them count, into that expert's sums and count (calls: :meth:`add_expert_calls`)."""
        import torch
        acc = self._entry(name, int(n_experts), int(rows.shape[-1]))
        with torch.no_grad():
            sq = (rows * rows).sum(dim=0)                # float32 over the call's rows
        acc.sums[expert] += sq.double().numpy()
        acc.counts[expert] += int(rows.shape[0])

    def add_expert_calls(self, name: str, n_experts: int, n_per_row: int, n_rows: int) -> None:
        """One MoE forward over ``n_rows`` token rows (the current call's sequences): ncall
        grows by the micro-batches, all of them, small ones too (the reference collects every
        ``MUL_MAT_ID``)."""
        b = self._batch or 1
        if n_rows % b:
            raise ImatrixError(f"imatrix: {name!r}: {n_rows} rows do not split into {b} sequences")
        acc = self._entry(name, int(n_experts), int(n_per_row))
        acc.ncall += b * -(-(n_rows // b) // self.ubatch)

    @contextmanager
    def hooked(self, model, process_output: bool = False):
        """Collect from ``model``'s linear layers while inside the block (hooks removed after)."""
        handles = [blk.register_forward_pre_hook(self._block_hook()) for blk in getattr(model, "blk", [])]
        for name, module, index, n_mat in collected_modules(model, process_output, with_index=True):
            handles.append(module.register_forward_pre_hook(self._hook(name, index, n_mat)))
        for name, moe, experts in expert_modules(model):
            handles += experts.observe(self._expert_hook(name, len(experts)))
            handles.append(moe.register_forward_hook(self._calls_hook(name, len(experts), experts.in_features)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last = None
            self._batch = None

    def _block_hook(self):
        def hook(module, args):
            self._batch = int(args[0].shape[0])          # x (B, T, E): the sequences of this call
        return hook

    def _hook(self, name: str, index: int = 0, n_mat: int = 1):
        def hook(module, args):
            self.add_dense(name, args[0], index, n_mat)
        return hook

    def _expert_hook(self, name: str, n_experts: int):
        def hook(expert, rows):
            self.add_expert(name, expert, rows, n_experts)
        return hook

    def _calls_hook(self, name: str, n_experts: int, n_per_row: int):
        def hook(module, args, output):          # after the layer: entries keep the forward's order
            self.add_expert_calls(name, n_experts, n_per_row, int(args[0].shape[0]))
        return hook

    def stats(self, chunks: int, chunk_size: int, datasets: list[str]) -> ImatrixStats:
        """The collected statistics (NaN/Inf sums are an error naming the weight)."""
        entries = {}
        for name, acc in self._acc.items():
            if not np.isfinite(acc.sums).all():
                raise ImatrixError(f"imatrix: non-finite activations reached {name!r}")
            entries[name] = ImatrixEntry(acc.sums.copy(), acc.counts.copy(), acc.ncall)
        return ImatrixStats(entries, int(chunks), int(chunk_size), list(datasets))


def _version(x) -> int | None:
    """The tensor's in-place modification counter (inference tensors have none: None)."""
    try:
        return int(x._version)
    except (RuntimeError, AttributeError):
        return None


def _entry_name(layer: int, path: str) -> tuple[str, int | None]:
    """(imatrix entry name, head index or None) of a linear module at ``path`` inside block
    ``layer``: the GGUF tensor name, whatever containers (``attention``, ``moe``) hold it;
    a trailing number is a per-head slice of a 3-D tensor (MLA's attn_k_b / attn_v_b)."""
    parts = path.split(".")
    if parts[-1].isdigit() and len(parts) > 1:
        return f"blk.{layer}.{parts[-2]}.weight", int(parts[-1])
    return f"blk.{layer}.{parts[-1]}.weight", None


def collected_modules(model, process_output: bool = False, with_index: bool = False) -> list[tuple]:
    """(imatrix entry name, module) of every dense linear layer llama-imatrix collects from
    (experts excluded: :func:`expert_modules`); with ``with_index`` also (matrix index,
    matrices) for per-head slices of one 3-D weight, (0, 1) otherwise."""
    from evalkit.model.moe import ExpertLinears
    from evalkit.model.qlinear import QLinear

    out = []
    for layer, blk in enumerate(getattr(model, "blk", [])):
        experts = {id(q) for m in blk.modules() if isinstance(m, ExpertLinears) for q in m.experts}
        modules = dict(blk.named_modules())
        for path, module in modules.items():
            if not isinstance(module, QLinear) or id(module) in experts:
                continue
            name, head = _entry_name(layer, path)
            n_mat = len(modules[path.rsplit(".", 1)[0]]) if head is not None else 1
            out.append((name, module, head or 0, n_mat) if with_index else (name, module))
    output = getattr(model, "output", None)
    if process_output and isinstance(output, QLinear) and not model.config.tied_embeddings:
        out.append(("output.weight", output, 0, 1) if with_index else ("output.weight", output))
    return out


def expert_modules(model) -> list[tuple[str, object, object]]:
    """(entry name, its MoE layer, its :class:`~evalkit.model.moe.ExpertLinears`) of every
    expert weight ``blk.N.ffn_{gate,up,down}_exps.weight``."""
    from evalkit.model.moe import MoEFFN

    out = []
    for layer, blk in enumerate(getattr(model, "blk", [])):
        for moe in (m for m in blk.modules() if isinstance(m, MoEFFN)):
            for part in ("gate", "up", "down"):
                out.append((f"blk.{layer}.ffn_{part}_exps.weight", moe, getattr(moe, f"ffn_{part}_exps")))
    return out
