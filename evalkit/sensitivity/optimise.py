"""The recipe optimiser: an additive model of KLD, minimised under a byte budget.

**Model.** Swapping group *g* to type *t* alone costs a measured ΔKLD d(g, t) (the
sensitivity pass); a recipe is predicted to cost Σ_g f_g · d(g, t_g), where the
correction factor f_g (1 at first) is what the verification learnt about group *g* in the
context of the other groups (:mod:`evalkit.sensitivity.recipe`). Bytes are exact:
Σ_g b(g, t_g) plus the tensors outside every group.

**Search.** Choosing one option per group to minimise the summed cost under a byte budget is
a multiple-choice knapsack. It is solved by dynamic programming over a grid of the budget
left after every group's smallest option (``grid`` cells, default 20000): each option's bytes
above its group's smallest are rounded *up* to whole cells, so every answer of the grid problem
fits the real budget and the smallest choice always does; then the rounding slack is spent by
marginal gains (repeatedly the single upgrade with the largest cost decrease that still
fits). The answer is optimal for the grid problem, whose rounding costs at most ``groups ×
cell`` bytes of the spare budget (0.1 % of it with 20 groups). :func:`lagrangian_bound` gives the
Lagrangian (convex-hull) lower bound on the real optimum, reported beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from evalkit.errors import EvalkitError

__all__ = ["InfeasibleBudget", "Option", "choose_types", "lagrangian_bound", "min_bytes"]


class InfeasibleBudget(EvalkitError, ValueError):
    """No choice of the candidates fits the byte budget."""


@dataclass(frozen=True)
class Option:
    """One candidate of a group: a label (the type), its exact bytes and its predicted cost."""

    label: str
    bytes: int
    cost: float


def min_bytes(options: Sequence[Sequence[Option]]) -> int:
    """Bytes of the smallest choice (every group at its smallest option)."""
    return sum(min(o.bytes for o in opts) for opts in options)


def _check(options: Sequence[Sequence[Option]], budget: int) -> None:
    for i, opts in enumerate(options):
        if not opts:
            raise ValueError(f"group {i} has no option")
        for o in opts:
            if o.bytes < 0 or not math.isfinite(o.cost):
                raise ValueError(f"group {i}: option {o.label!r} has bytes {o.bytes} and cost {o.cost}")
    if min_bytes(options) > budget:
        raise InfeasibleBudget(f"{budget} bytes cannot hold the groups: their smallest choice takes "
                               f"{min_bytes(options)}")


def _grid_dp(options: Sequence[Sequence[Option]], budget: int, grid: int) -> list[int]:
    """Exact minimum of the grid problem. Only the bytes above each group's smallest option are
    put on the grid (cells of (budget − smallest choice) / grid bytes, rounded up), so the
    smallest choice always fits and the grid spends its resolution on the choices that matter."""
    base = [min(o.bytes for o in opts) for opts in options]
    spare = budget - sum(base)
    cell = max(1, -(-spare // grid))
    cap = spare // cell
    best = np.zeros(cap + 1)                      # best cost with at most c cells, groups so far
    picks = []
    for opts, b0 in zip(options, base):
        nxt = np.full(cap + 1, np.inf)
        arg = np.full(cap + 1, -1, dtype=np.int32)
        for k, o in enumerate(opts):
            w = -(-(o.bytes - b0) // cell)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + max(o.cost, 0.0)
            better = cand < nxt
            nxt[better], arg[better] = cand[better], k
        best = nxt
        picks.append(arg)
    c = int(np.argmin(best))
    choice = [0] * len(options)
    for g in range(len(options) - 1, -1, -1):
        k = int(picks[g][c])
        choice[g] = k
        c -= -(-(options[g][k].bytes - base[g]) // cell)
    return choice


def _fill(options: Sequence[Sequence[Option]], choice: list[int], budget: int) -> list[int]:
    """Spend the grid's rounding slack: the best single upgrade that still fits, repeatedly."""
    choice = list(choice)
    used = sum(options[g][k].bytes for g, k in enumerate(choice))
    while True:
        best = None
        for g, opts in enumerate(options):
            cur = opts[choice[g]]
            for k, o in enumerate(opts):
                gain = max(cur.cost, 0.0) - max(o.cost, 0.0)
                if gain > 0 and used - cur.bytes + o.bytes <= budget and (best is None or gain > best[0]):
                    best = (gain, g, k)
        if best is None:
            return choice
        _, g, k = best
        used += options[g][k].bytes - options[g][choice[g]].bytes
        choice[g] = k


def choose_types(options: Sequence[Sequence[Option]], budget: int, grid: int = 20000) -> list[int]:
    """The option index per group minimising the summed cost with total bytes ≤ ``budget``
    (InfeasibleBudget when even the smallest choice does not fit)."""
    _check(options, budget)
    return _fill(options, _grid_dp(options, budget, grid), budget)


def lagrangian_bound(options: Sequence[Sequence[Option]], budget: int, iters: int = 100) -> float:
    """The Lagrangian dual bound: max over λ ≥ 0 of Σ_g min_t (d + λ b) − λ·budget, a lower
    bound on the best summed cost within ``budget`` (tight at the convex hull's corners)."""
    _check(options, budget)

    def dual(lam: float) -> tuple[float, int]:
        total, used = -lam * budget, 0
        for opts in options:
            o = min(opts, key=lambda o: (max(o.cost, 0.0) + lam * o.bytes, o.bytes))
            total += max(o.cost, 0.0) + lam * o.bytes
            used += o.bytes
        return total, used
    lo, hi = 0.0, 1.0
    while dual(hi)[1] > budget and hi < 1e30:
        hi *= 2
    best = dual(0.0)[0]
    for _ in range(iters):          # the dual is concave in λ: bisect on the subgradient used - budget
        mid = 0.5 * (lo + hi)
        val, used = dual(mid)
        best = max(best, val)
        lo, hi = (mid, hi) if used > budget else (lo, mid)
    return best
