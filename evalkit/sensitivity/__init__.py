"""Per-tensor-group sensitivity in one loaded model, and recipe search under a size budget.

The stages, one module each:

* :mod:`.config` — ``evalkit sensitivity``'s configuration (YAML or flags), checked strictly;
* :mod:`.groups` — which tensors move together (per tensor, or tensor kind × band of layers),
  and what each candidate type makes of them (llama-quantize's fallbacks, exact bytes);
* :mod:`.swap` — a group's packed weights swapped in the loaded model and restored;
* :mod:`.measure` — the calibration chunks, the base pass (once) and partial forward passes
  from cached hidden states, scored as per-token KLD;
* :mod:`.sweep` — the resumable (group, type) sweep and its table;
* :mod:`.outputs` — the tidy table, the heatmap, GGUF-Tool-Suite's ``kld_results.csv``, the summary;
* :mod:`.optimise` — the additive model minimised as a multiple-choice knapsack;
* :mod:`.recipe` — the search with verification: optimise, measure, correct, iterate, keep the best;
* :mod:`.rules_text` — a choice of types as ``REGEX=TYPE`` lines (``--override`` / ``--custom-q``).

Names are imported lazily so that ``evalkit --help`` does not load torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SensitivityConfig": "config", "SensitivityError": "config", "load_sensitivity_config": "config",
    "sensitivity_config": "config",
    "Group": "groups", "Candidate": "groups", "make_groups": "groups", "candidates_for": "groups",
    "sensitivity": "sweep", "SensitivityResult": "sweep", "load_result": "sweep",
    "choose_types": "optimise", "InfeasibleBudget": "optimise",
    "search_recipe": "recipe", "RecipeError": "recipe",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'evalkit.sensitivity' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"evalkit.sensitivity.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
