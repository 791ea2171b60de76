"""A recipe search's outputs: ``recipe.txt`` (one ``REGEX=TYPE`` per line), the summary
markdown (chosen types, predicted vs measured KLD per trial, how to build the model) and a
JSON record of everything."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["recipe_json", "recipe_markdown", "write_recipe_outputs"]


def _commands(res, base: str, recipe: Path, ftype: str, imatrix: str | None) -> list[str]:
    im = f" --imatrix {imatrix}" if imatrix else ""
    return [
        "```bash",
        "# evalkit: one --override per line of the recipe (xargs keeps the regexes away from the shell)",
        f"sed 's/^/--override=/' {recipe.name} | xargs -d '\\n' evalkit quantize {base} OUT.gguf --type {ftype}{im}",
        "# ik_llama.cpp: the same rules as one --custom-q list (--allow-requantize for a quantized base)",
        f"llama-quantize --allow-requantize{im} --custom-q \"$(paste -sd, {recipe.name})\" {base} OUT.gguf {ftype}",
        "```"]


def recipe_markdown(res, recipe: Path, ftype: str, base: str, imatrix: str | None = None) -> str:
    """The summary: sizes, the optimiser, every trial (predicted vs measured), the chosen type
    of every group, the rules and the commands that build the model."""
    m = res.sensitivity_meta
    best = res.chosen
    out = [f"# recipe: {recipe.name}", "",
           f"Base `{Path(m['base']['model']).name}` ({m['base']['bpw']:.4f} bpw). Target ≤ {res.target_bpw:g} bpw "
           f"(whole file, {res.total_elements} weights): {res.bytes} tensor bytes = **{res.bpw:.4f} bpw**. "
           f"Calibration: {m['n_chunks']} chunks of {m['n_ctx']} tokens of {Path(m['corpus']).name} "
           f"({m['n_tokens']} scored tokens); sensitivity pass with {len(res.options)} groups "
           f"(`{m['config']['grouping']}`), types {', '.join(m['config']['types'])}.", "",
           "Optimiser: additive model (Σ over groups of the isolated ΔKLD × a per-group correction), "
           "minimised exactly as a multiple-choice knapsack (dynamic programming on a byte grid, bytes "
           "rounded up so every answer fits, the slack spent by marginal gains); Lagrangian lower bound of "
           f"the uncorrected model at this budget: {res.lagrangian_bound:.6f}. Each trial is measured "
           "with the recipe swapped into the loaded model; groups with the largest shares are then "
           "measured in context (the recipe with that group at its base bytes) and their ratio "
           "corrects the model for the next trial. The lowest measured trial is kept.", "",
           "| trial | bpw | predicted KLD | measured KLD | groups measured in context | seconds |",
           "|---:|---:|---:|---:|---:|---:|"]
    if len(res.trials) < res.iterations:
        out[-3:-2] = ["", f"The search converged after {len(res.trials)} trial(s): the corrected model chose "
                          "a recipe already measured.", ""]
    for t in res.trials:
        mark = " **(kept)**" if t is best else ""
        out.append(f"| {t.iteration + 1}{mark} | {8.0 * (t.bytes + res.fixed_bytes) / res.total_elements:.4f} | "
                   f"{t.predicted:.6f} | {t.measured:.6f} ± {t.measured_err:.6f} | {len(t.in_context)} | "
                   f"{t.seconds:.0f} |")
    out += ["", "| group | tensors | base | type | bytes | bpw | isolated ΔKLD | factor | in-context ΔKLD |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for go in res.options:
        name = go.group.name
        label = best.labels[name]
        o = next(o for o in go.options if o[0] == label)
        ctx = next((t.in_context[name] for t in res.trials if name in t.in_context and t.labels[name] == label), None)
        base_t = "/".join(dict.fromkeys(t.src_type for t in go.group.tensors))
        out.append(f"| {name} | {len(go.group.tensors)} | {base_t} | {label} | {o[2]} | "
                   f"{8.0 * o[2] / go.group.n_elements:.3f} | {o[3]:.6f} | {res.factors[name]:.2f} | "
                   + (f"{ctx:.6f}" if ctx is not None else "") + " |")
    out += ["", f"`{recipe.name}` ({len(res.rules)} rules):", "", "```"] + res.rules + ["```", "",
            "Build the model (both give the same file as `evalkit recipe --gguf`):", ""]
    out += _commands(res, base, recipe, ftype, imatrix)
    return "\n".join(out) + "\n"


def recipe_json(res, ftype: str) -> dict:
    """Everything about the search as plain data."""
    return {"target_bpw": res.target_bpw, "bpw": res.bpw, "bytes": res.bytes, "budget_bytes": res.budget_bytes,
            "total_elements": res.total_elements, "fixed_bytes": res.fixed_bytes, "ftype": ftype,
            "rules": res.rules, "types": res.types, "best_trial": res.best, "factors": res.factors,
            "lagrangian_bound": res.lagrangian_bound, "wall_time_s": res.wall_time_s,
            "trials": [{"iteration": t.iteration, "labels": t.labels, "bytes": t.bytes,
                        "bpw": 8.0 * (t.bytes + res.fixed_bytes) / res.total_elements, "predicted": t.predicted,
                        "measured": t.measured, "measured_err": t.measured_err, "in_context": t.in_context,
                        "seconds": t.seconds} for t in res.trials],
            "sensitivity": {k: res.sensitivity_meta[k] for k in ("base", "corpus", "corpus_sha256", "n_ctx",
                                                                 "n_chunks", "n_tokens", "config")}}


def write_recipe_outputs(res, recipe: Path, ftype: str, base: str, imatrix: str | None = None) -> list[Path]:
    """Write ``recipe.txt``, ``<stem>.md`` and ``<stem>.json`` beside it (atomically)."""
    from evalkit.files import atomic_write_text, json_default
    recipe = Path(recipe)
    md, js = recipe.with_suffix(".md"), recipe.with_suffix(".json")
    if md == recipe or js == recipe:
        raise ValueError(f"{recipe}: give the recipe a suffix other than .md / .json (e.g. recipe.txt)")
    atomic_write_text(recipe, "\n".join(res.rules) + "\n")
    atomic_write_text(md, recipe_markdown(res, recipe, ftype, base, imatrix))
    atomic_write_text(js, json.dumps(recipe_json(res, ftype), indent=1, default=json_default))
    return [recipe, md, js]
