"""The committed report of bench/smollm2_recipes.py: results/smollm2-recipes-* (markdown, plot, JSON, tables)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

MIXES = ("IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K")
PREFIX = "smollm2-recipes"


def _pairs(res_path: Path) -> dict[str, dict]:
    """Per mix size: the mix's and the recipe's held-out figures and the paired KLD difference."""
    from evalkit.compare import compare_variants
    res = json.loads(res_path.read_text())
    v = res["variants"]
    out = {}
    for m in MIXES:
        d = compare_variants(res_path, m, f"recipe-{m}")[f"recipe-{m} vs {m}"]["kld_mean"]
        a, b = v[m], v[f"recipe-{m}"]
        out[m] = {"mix_bpw": a["bpw"], "mix_kld": a["kld_mean"], "mix_same_top": a["same_top_p"],
                  "mix_ppl_ratio": a["ppl_ratio"], "recipe_bpw": b["bpw"], "recipe_kld": b["kld_mean"],
                  "recipe_same_top": b["same_top_p"], "recipe_ppl_ratio": b["ppl_ratio"],
                  "ratio": b["kld_mean"][0] / a["kld_mean"][0], "diff": d.diff, "diff_ci": [d.ci_low, d.ci_high],
                  "p_value": d.p_value}
    return {"pairs": out, "base_ppl": res["base"]["ppl"], "n_chunks": res["n_chunks"], "n_ctx": res["n_ctx"],
            "n_tokens": res["base"]["n_tokens"], "corpus": res["corpus"], "wall_time_s": res["wall_time_s"]}


def _plot(pairs: dict, out: Path) -> None:
    """Held-out mean KLD vs whole-file bpw: the mixes and the recipes, each with its Pareto front."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from evalkit.report.plots import pareto_front
    fig, ax = plt.subplots(figsize=(6.6, 4.6))
    for key, label, marker in (("mix", "ftype mix (llama-quantize rules)", "o"), ("recipe", "evalkit recipe", "s")):
        x = np.array([pairs[m][f"{key}_bpw"] for m in MIXES])
        y = np.array([pairs[m][f"{key}_kld"][0] for m in MIXES])
        e = np.array([pairs[m][f"{key}_kld"][1] for m in MIXES])
        f = pareto_front(x, y)
        line = ax.plot(x[f], y[f], "-", alpha=0.6)[0]
        ax.errorbar(x, y, yerr=e, fmt=marker, capsize=3, color=line.get_color(), label=label)
        for xi, yi, m in zip(x, y, MIXES):
            ax.annotate(m if key == "mix" else f"@{m}", (xi, yi), textcoords="offset points",
                        xytext=(5, 4 if key == "mix" else -10), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KLD vs base (held-out, 40 × 512)")
    ax.set_title("SmolLM2-135M: recipes at the mixes' sizes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for ext in ("png", "svg"):
        fig.savefig(out / f"{PREFIX}-kld_vs_bpw.{ext}", dpi=130)
    plt.close(fig)


def _choices_table(recs: dict, sens) -> list[str]:
    """Chosen type per group (rows) and mix size (columns)."""
    lines = ["| group | base | " + " | ".join(f"@{m}" for m in MIXES) + " |", "|---|---|" + "---|" * len(MIXES)]
    for g in sens.groups:
        base = "/".join(dict.fromkeys(t.src_type for t in g.tensors))
        cells = [recs[m]["trials"][recs[m]["best_trial"]]["labels"][g.name] for m in MIXES]
        lines.append(f"| {g.name} | {base} | " + " | ".join(cells) + " |")
    return lines


def _markdown(sens, pairs: dict, recs: dict, ident: dict, add: list, sizes: dict) -> str:
    m, p = sens.meta, pairs["pairs"]
    trials = ", ".join(f"{k} {len(recs[k]['trials'])}" for k in MIXES)
    pareto = all(any(p[r]["recipe_bpw"] <= p[k]["mix_bpw"] * 1.005 and p[r]["recipe_kld"][0] < p[k]["mix_kld"][0]
                     for r in MIXES) for k in MIXES)
    out = ["# SmolLM2-135M: recipes from `evalkit recipe` vs the IQ2_K … IQ6_K mixes", "",
           f"Sensitivity: `configs/sensitivity-smollm2.yaml`, chunks 0–7 of the bundled WikiText-2 test split "
           f"({m['n_tokens']} scored tokens), {len(sens.groups)} groups (7 tensor kinds × 3 bands of 10 layers, "
           f"and token_embd), types {', '.join(m['config']['types'])} (rows of 576 fall back to IQ4_NL / Q5_0 / "
           f"Q6_0 / Q8_0): {m['n_measurements']} measurements in **{m['wall_time_s'] / 60:.1f} min** wall time "
           "(2 threads, on the 2-core machine shared with other jobs: load average 2–4 during the first band, "
           "whose passes took up to 27 s, against 4.4 s per pass for the last band once it was quieter).",
           f"Recipes: `evalkit recipe` at each mix's whole-file bpw (up to 3 trials, 6 groups measured in context "
           f"after each; trials run: {trials}: a "
           "search stops when the corrected model chooses a recipe already measured). Held-out evaluation: "
           f"lines 2500… of `wikitext-2-raw-test.txt`, {pairs['n_chunks']} chunks of "
           f"{pairs['n_ctx']} ({pairs['n_tokens']} scored tokens), base PPL {pairs['base_ppl'][0]:.4f}.", "",
           "| size of | mix bpw | mix mean KLD | recipe bpw | recipe mean KLD | ratio | recipe − mix (95% CI) | "
           "same top: mix / recipe | recipe calibration KLD: predicted / measured |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k in MIXES:
        q, t = p[k], recs[k]["trials"][recs[k]["best_trial"]]
        out.append(f"| {k} | {q['mix_bpw']:.4f} | {q['mix_kld'][0]:.5f} ± {q['mix_kld'][1]:.5f} | "
                   f"{q['recipe_bpw']:.4f} | {q['recipe_kld'][0]:.5f} ± {q['recipe_kld'][1]:.5f} | "
                   f"**{q['ratio']:.3f}** | {q['diff']:+.5f} [{q['diff_ci'][0]:+.5f}, {q['diff_ci'][1]:+.5f}] | "
                   f"{100 * q['mix_same_top'][0]:.2f} % / {100 * q['recipe_same_top'][0]:.2f} % | "
                   f"{t['predicted']:.5f} / {t['measured']:.5f} |")
    out += ["", f"* At the IQ4_K mix's size the recipe's mean KLD is **{p['IQ4_K']['ratio']:.3f}×** the mix's "
            f"(requirement ≤ 0.85× at ≤ 1.005 × {p['IQ4_K']['mix_bpw']:.4f} bpw); at the IQ3_K size "
            f"**{p['IQ3_K']['ratio']:.3f}×**, at the IQ5_K size **{p['IQ5_K']['ratio']:.3f}×**.",
            f"* Pareto front below the mixes at every size tried: **{'yes' if pareto else 'no'}** (for each mix a "
            "recipe of no more bits has a lower held-out KLD).",
            f"* `recipe-IQ4_K.txt` through `evalkit quantize --override` = `evalkit recipe --gguf`, byte for byte: "
            f"**{'yes' if ident['identical'] else 'NO'}** (sha256 `{ident['recipe_gguf_sha256'][:16]}…`).", "",
            "The measured ΔKLD of a group equals a whole-model run with only that group quantized "
            "(`evalkit quantize` with the group's rule, then `evalkit run` on the calibration chunks):", "",
            "| group | type (effective) | sensitivity pass | whole-model run |", "|---|---|---:|---:|"]
    for a in add:
        out.append(f"| {a['group']} | {a['type']} ({a['effective_type']}) | {a['sweep_kld']:.7f} ± {a['sweep_err']:.7f} "
                   f"| {a['whole_model_kld']:.7f} ± {a['whole_model_err']:.7f} |")
    out += ["", "Types chosen per group (the mixes keep token_embd at Q8_0, the base's own type):", ""]
    out += _choices_table(recs, sens)
    out += ["", f"Recipe files: `{PREFIX}-<MIX>.txt` (one `REGEX=TYPE` per line); plot: "
            f"`{PREFIX}-kld_vs_bpw.png`; the sensitivity table, `kld_results.csv` and heatmap: "
            f"`{PREFIX}-sensitivity.*`, `{PREFIX}-kld_results.csv`, `{PREFIX}-heatmap.png`; "
            f"all figures: `{PREFIX}-heldout.json`.", ""]
    return "\n".join(out)


def write_report(results: Path, work: Path, sens, sizes: dict, recs: dict, ident: dict, add: list,
                 res_path: Path) -> None:
    """Write results/smollm2-recipes-* from the bench's products."""
    results.mkdir(parents=True, exist_ok=True)
    pairs = _pairs(res_path)
    _plot(pairs["pairs"], results)
    (results / f"{PREFIX}-summary.md").write_text(_markdown(sens, pairs, recs, ident, add, sizes))
    doc = {**pairs, "mix_sizes": sizes, "byte_identity": ident, "additivity": add,
           "sensitivity": {k: sens.meta[k] for k in ("n_chunks", "n_ctx", "n_tokens", "n_measurements",
                                                      "wall_time_s", "config")},
           "recipes": {m: {k: recs[m][k] for k in ("target_bpw", "bpw", "bytes", "ftype", "rules", "best_trial",
                                                     "trials")} for m in MIXES}}
    (results / f"{PREFIX}-heldout.json").write_text(json.dumps(doc, indent=1))
    for m in MIXES:
        shutil.copyfile(work / f"recipe-{m}.txt", results / f"{PREFIX}-{m}.txt")
    s = Path(sens.path)
    for src, dst in (("sensitivity.csv", "sensitivity.csv"), ("summary.md", "sensitivity.md"),
                     ("kld_results.csv", "kld_results.csv"), ("heatmap.png", "heatmap.png")):
        shutil.copyfile(s / src, results / f"{PREFIX}-{dst}")
