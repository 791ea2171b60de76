"""``evalkit recipe``: a type per group under a whole-file size budget, verified by measurement.

1. **Predict.** The additive model of :mod:`evalkit.sensitivity.optimise` (measured ΔKLD per
   group and type, times a correction factor per group, 1 at first) is minimised exactly
   under the budget ``target_bpw × elements / 8`` bytes (every tensor of the file counted,
   as ``results.json``'s ``bpw``).
2. **Verify.** The chosen recipe is swapped into the loaded model (the very bytes the GGUF
   will hold) and its KLD measured on the calibration chunks.
3. **Correct.** Where prediction and measurement disagree, the groups with the largest
   predicted shares are measured *in context*: the recipe with that one group put back to
   its base bytes (from the recipe's own hidden state at the group's first layer, paired on
   the same tokens, so the difference has little noise). The ratio of that in-context
   ΔKLD to the isolated one becomes the group's correction factor, for all its types.
4. **Iterate** a few times (until the recipe repeats) and keep the recipe with the lowest
   *measured* KLD.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from evalkit.errors import EvalkitError
from evalkit.sensitivity.groups import Group

__all__ = ["GroupOptions", "RecipeError", "RecipeResult", "Trial", "auto_ftype", "group_options",
           "search_recipe", "target_budget", "write_recipe_gguf"]

# Correction factors are kept within these bounds: one in-context measurement is a single
# paired difference, and a group whose isolated ΔKLD is near zero has an unstable ratio.
_FACTOR_RANGE = (0.2, 5.0)


class RecipeError(EvalkitError, ValueError):
    """A recipe cannot be made as asked (unreachable size, a sensitivity pass of another model...)."""


@dataclass
class GroupOptions:
    """A group's distinct candidates: (type label, per-tensor types, bytes, isolated ΔKLD, its error)."""

    group: Group
    options: list[tuple[str, tuple[str, ...], int, float, float]]

    def label_types(self, label: str) -> tuple[str, ...]:
        """The per-tensor types of an option."""
        return next(o[1] for o in self.options if o[0] == label)


def group_options(result) -> list[GroupOptions]:
    """Each group's available candidates from a sensitivity result, distinct by their effective
    types, smallest first (RecipeError for a group with none)."""
    out = []
    for g in result.groups:
        seen, opts = set(), []
        for r in result.rows:
            if r["group"] != g.name or not r["available"] or tuple(r["types"]) in seen:
                continue
            seen.add(tuple(r["types"]))
            kld = 0.0 if r["identical"] else float(r["kld_mean"])
            if not math.isfinite(kld):
                raise RecipeError(f"sensitivity result: group {g.name!r} type {r['type']} has no measurement")
            opts.append((r["type"], tuple(r["types"]), int(r["bytes"]), kld, float(r["kld_err"] or 0.0)))
        if not opts:
            raise RecipeError(f"group {g.name!r}: none of the candidate types can be used for it")
        out.append(GroupOptions(g, sorted(opts, key=lambda o: (o[2], o[3]))))
    return out


@dataclass
class Trial:
    """One verified recipe: its choice {group: type label}, bytes, predicted and measured KLD,
    and the in-context ΔKLD of the groups measured after it."""

    iteration: int
    labels: dict[str, str]
    bytes: int
    predicted: float
    measured: float
    measured_err: float
    in_context: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class RecipeResult:
    """A finished search: every trial, the best one (lowest measured KLD), its rules and sizes."""

    target_bpw: float
    budget_bytes: int
    total_elements: int
    fixed_bytes: int
    trials: list[Trial]
    best: int
    factors: dict[str, float]
    rules: list[str]
    types: dict[str, str]                 # tensor -> effective type of the best recipe
    options: list[GroupOptions]
    lagrangian_bound: float
    sensitivity_meta: dict
    wall_time_s: float = 0.0
    iterations: int = 0                   # trials allowed (fewer ran when the search converged)

    @property
    def chosen(self) -> Trial:
        """The best trial."""
        return self.trials[self.best]

    @property
    def bytes(self) -> int:
        """Tensor bytes of the whole recipe file."""
        return self.chosen.bytes + self.fixed_bytes

    @property
    def bpw(self) -> float:
        """Bits per weight of the whole recipe file (as results.json's ``bpw``)."""
        return 8.0 * self.bytes / self.total_elements


def target_budget(target_bpw: float, n_elements: int, fixed_bytes: int, smallest: list[tuple[str, int]]) -> int:
    """Bytes the groups may take for ``target_bpw`` over the whole file; RecipeError when even
    ``smallest`` ((type, bytes) of each group's smallest candidate) does not fit."""
    if isinstance(target_bpw, bool) or not isinstance(target_bpw, (int, float)) or not math.isfinite(target_bpw) \
            or target_bpw <= 0:
        raise RecipeError(f"target bpw must be a positive number, got {target_bpw!r}")
    budget = math.floor(target_bpw * n_elements / 8) - fixed_bytes
    low = sum(b for _, b in smallest)
    if budget < low:
        raise RecipeError(f"target {target_bpw} bpw is unreachable: the smallest candidate types give "
                          f"{8.0 * (low + fixed_bytes) / n_elements:.4f} bpw for the whole file (every group at its "
                          f"smallest type: {', '.join(sorted({t for t, _ in smallest}))}); "
                          "raise the target or add smaller --types")
    return budget


def _budget(result, target_bpw: float, opts: list[GroupOptions]) -> int:
    m = result.meta
    return target_budget(target_bpw, int(m["base"]["n_elements"]), int(m["fixed_bytes"]),
                         [(o.options[0][0], o.options[0][2]) for o in opts])


def _predict(opts: list[GroupOptions], factors: dict[str, float], budget: int, grid: int) -> dict[str, str]:
    """The choice {group: label} minimising the corrected additive model within ``budget``."""
    from evalkit.sensitivity.optimise import Option, choose_types
    table = [[Option(o[0], o[2], factors[go.group.name] * o[3]) for o in go.options] for go in opts]
    idx = choose_types(table, budget, grid)
    return {go.group.name: go.options[k][0] for go, k in zip(opts, idx)}


def _option(go: GroupOptions, label: str):
    return next(o for o in go.options if o[0] == label)


def _assignment(opts: list[GroupOptions], labels: dict[str, str], skip: str | None = None) -> tuple[dict, int]:
    """{tensor: type} of the groups that differ from the base (``skip``: put back to the base),
    and the first layer they change."""
    assign, start = {}, None
    for go in opts:
        o = _option(go, labels[go.group.name])
        if go.group.name == skip or all(t == s.src_type for t, s in zip(o[1], go.group.tensors)):
            continue
        assign.update(zip(go.group.names, o[1]))
        start = go.group.start_layer if start is None else min(start, go.group.start_layer)
    return assign, start


def _verify(session, opts, labels, loo_groups: list[Group]) -> tuple[float, float, dict[str, float]]:
    """Measured KLD (± error) of a recipe, and the in-context ΔKLD of each of ``loo_groups``."""
    from evalkit.sensitivity.measure import token_stats
    assign, start = _assignment(opts, labels)
    if start is None:
        return 0.0, 0.0, {}
    with session.swapper.swapped(assign):
        tokens, states = session.measurer.measure(start, capture=[g.start_layer for g in loo_groups],
                                                  name="recipe")
    st = token_stats(tokens)
    in_context = {}
    for g in loo_groups:
        rest, _ = _assignment(opts, labels, skip=g.name)
        with session.swapper.swapped(rest):
            # layers before g's first one are those of the recipe: restart from its own states
            # (for g starting at the first changed layer they are the base's: start there)
            src = states if g.start_layer > start else None
            without, _ = session.measurer.measure(g.start_layer, states=src, name=f"recipe without {g.name}")
        in_context[g.name] = st["kld_mean"] - token_stats(without)["kld_mean"]
    return st["kld_mean"], st["kld_err"], in_context


def _loo_groups(opts, labels, factors, loo: int) -> list[Group]:
    """The ``loo`` groups with the largest predicted shares (those that differ from the base)."""
    share = []
    for go in opts:
        o = _option(go, labels[go.group.name])
        if o[3] > 0:
            share.append((factors[go.group.name] * o[3], go.group))
    return [g for _, g in sorted(share, key=lambda x: -x[0])[:loo]]


def search_recipe(session, result, target_bpw: float, iterations: int = 3, loo: int = 8, grid: int = 20000,
                  progress: bool = True) -> RecipeResult:
    """Predict, verify, correct and iterate (see the module docstring); returns the best
    measured recipe. ``session``: the loaded base (:func:`evalkit.sensitivity.sweep.open_session`)
    of the sensitivity ``result``; ``loo``: groups measured in context per iteration."""
    from tqdm.auto import tqdm
    from evalkit.sensitivity.optimise import Option, lagrangian_bound
    t0 = time.time()
    opts = group_options(result)
    budget = _budget(result, target_bpw, opts)
    factors = {go.group.name: 1.0 for go in opts}
    session.ensure_base()
    trials: list[Trial] = []
    bar = tqdm(range(iterations), desc=f"recipe {target_bpw:g} bpw", unit="trial", disable=not progress)
    for it in bar:
        labels = _predict(opts, factors, budget, grid)
        if any(t.labels == labels for t in trials):
            break                    # the corrected model chose a recipe already measured: converged
        t1 = time.time()
        last = it == iterations - 1
        probe = [] if last else _loo_groups(opts, labels, factors, loo)
        measured, err, in_context = _verify(session, opts, labels, probe)
        predicted = sum(factors[go.group.name] * _option(go, labels[go.group.name])[3] for go in opts)
        nbytes = sum(_option(go, labels[go.group.name])[2] for go in opts)
        trials.append(Trial(it, labels, nbytes, predicted, measured, err, in_context, time.time() - t1))
        bar.set_postfix_str(f"predicted {predicted:.5f}, measured {measured:.5f}", refresh=False)
        for name, c in in_context.items():
            iso = _option(next(go for go in opts if go.group.name == name), labels[name])[3]
            factors[name] = min(max(c / iso, _FACTOR_RANGE[0]), _FACTOR_RANGE[1])
    best = min(range(len(trials)), key=lambda i: (trials[i].measured, trials[i].bytes))
    bound = lagrangian_bound([[Option(o[0], o[2], o[3]) for o in go.options] for go in opts], budget)
    out = _finish(result, target_bpw, opts, trials, best, factors, budget, t0, bound)
    out.iterations = iterations
    return out


def _finish(result, target_bpw, opts, trials, best, factors, budget, t0, bound) -> RecipeResult:
    """The result object: the best trial's per-tensor types and rules."""
    from evalkit.sensitivity.groups import TensorFacts
    from evalkit.sensitivity.rules_text import recipe_rules
    types = {}
    for go in opts:
        types.update(zip(go.group.names, go.label_types(trials[best].labels[go.group.name])))
    tensors = [t for go in opts for t in go.group.tensors]
    tensors += [TensorFacts.from_dict(t) for t in result.meta.get("other_tensors", [])]
    m = result.meta
    return RecipeResult(float(target_bpw), budget, int(m["base"]["n_elements"]), int(m["fixed_bytes"]), trials, best, factors,
                        recipe_rules(types, _file_order(tensors, result)), types, opts, bound, m,
                        time.time() - t0)


def _file_order(tensors, result) -> list:
    """Tensors in the base file's order (the order of the rules' kinds)."""
    order = result.meta.get("tensor_order")
    if not order:
        return tensors
    pos = {n: i for i, n in enumerate(order)}
    return sorted(tensors, key=lambda t: pos.get(t.name, len(pos)))


def auto_ftype(types: dict[str, str], sizes: dict[str, int]) -> str:
    """The ftype for ``general.file_type``: the one named like the type holding most bytes of
    the recipe when such an ftype exists (IQ4_K, Q6_0, ...), else Q8_0. Every tensor has a rule
    of its own, so the ftype's mix rules decide nothing."""
    from evalkit.recipes.ftypes import FTYPES
    by_type: dict[str, int] = {}
    for name, t in types.items():
        by_type[t] = by_type.get(t, 0) + sizes.get(name, 0)
    top = max(by_type, key=by_type.get) if by_type else "Q8_0"
    ft = FTYPES.get(top)
    return top if ft is not None and ft.has_mix_rules and not ft.is_float else "Q8_0"


def write_recipe_gguf(base_path, out, rules: list[str], ftype: str, imatrix=None, threads=None,
                      expect_bytes: int | None = None, progress: bool = True):
    """Write the recipe's GGUF exactly as ``evalkit quantize BASE OUT --type FTYPE --override
    RULE ...`` does; RecipeError if its tensor bytes are not the predicted ones."""
    from evalkit.files import model_size
    from evalkit.recipes.model_quantizer import quantize_model
    from evalkit.recipes.options import TypeOptions
    plan = quantize_model(base_path, out, ftype, imatrix=imatrix, options=TypeOptions(overrides=rules),
                          threads=threads, progress=progress)
    nbytes, _ = model_size(out)
    if expect_bytes is not None and nbytes != expect_bytes:
        raise RecipeError(f"{out}: the file's tensors take {nbytes} bytes, the recipe predicted {expect_bytes}")
    return plan
