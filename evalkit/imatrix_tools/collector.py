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

Experts (MoE) plug in through :meth:`ImatrixCollector.add_expert_rows`, keyed by
(weight name, expert): a MoE layer's hook passes the rows routed to its experts and
their expert ids; sums and counts are then kept per expert, as the reference keeps them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from evalkit.imatrix import ImatrixEntry, ImatrixError, ImatrixStats

__all__ = ["ImatrixCollector", "DEFAULT_UBATCH", "MIN_UBATCH_TOKENS", "counted_positions"]

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

    def _entry(self, name: str, n_mat: int, n_per_row: int) -> _Accumulator:
        acc = self._acc.get(name)
        if acc is None:
            acc = self._acc[name] = _Accumulator.new(n_mat, n_per_row)
        elif acc.sums.shape != (n_mat, n_per_row):
            raise ImatrixError(f"imatrix: inconsistent size for {name!r}: {acc.sums.shape} vs "
                               f"{(n_mat, n_per_row)}")
        return acc

    def _square_sums(self, x, keep: int):
        """Σx² over the first ``keep`` positions of x (B, T, n), float32 (n,). The same input
        fed to several weights in a row (q, k, v; gate, up) is reduced once: the same tensor
        object (kept alive here, so its identity cannot be reused) whose version counter has
        not moved. Inference tensors have no counter, so a layer must not modify one weight's
        input in place before passing it to the next (evalkit's blocks never do)."""
        version = _version(x)
        last = self._last
        if last is not None and last[0] is x and last[1] == version and last[2] == keep:
            return last[3]
        xs = x[:, :keep] if keep < x.shape[1] else x
        sq = (xs * xs).sum(dim=(0, 1))
        self._last = (x, version, keep, sq)
        return sq

    def add_dense(self, name: str, x) -> None:
        """One weight's input x (B, T, n) (T positions from 0 of each of B sequences):
        its counted rows go into ``name``'s sums, one call per counted micro-batch."""
        import torch
        if x.dim() == 2:
            x = x.unsqueeze(0)
        keep, calls = counted_positions(int(x.shape[1]), self.ubatch)
        if calls == 0:
            return
        with torch.no_grad():
            sq = self._square_sums(x, keep)
        acc = self._entry(name, 1, int(x.shape[-1]))
        acc.sums[0] += sq.double().numpy()
        acc.counts[0] += int(x.shape[0]) * keep
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

    @contextmanager
    def hooked(self, model, process_output: bool = False):
        """Collect from ``model``'s linear layers while inside the block (hooks removed after)."""
        handles = [module.register_forward_pre_hook(self._hook(name))
                   for name, module in collected_modules(model, process_output)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last = None

    def _hook(self, name: str):
        def hook(module, args):
            self.add_dense(name, args[0])
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


def collected_modules(model, process_output: bool = False) -> list[tuple[str, object]]:
    """(imatrix entry name, module) of every linear layer llama-imatrix collects from."""
    from evalkit.model.qlinear import QLinear

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, QLinear):
            continue
        if name.startswith("blk."):
            out.append((name + ".weight", module))
        elif name == "output" and process_output and not model.config.tied_embeddings:
            out.append(("output.weight", module))
    return out
