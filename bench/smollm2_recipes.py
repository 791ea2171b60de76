"""SmolLM2 recipes at the sizes of the IQ2_K … IQ6_K mixes, against those mixes on held-out text.

    .venv/bin/python bench/smollm2_recipes.py [--work /tmp/smollm2-recipes] [--results results]

1. sensitivity pass (configs/sensitivity-smollm2.yaml: chunks 0-7 of the bundled corpus), timed;
2. for each mix: its whole-file bpw, then `evalkit recipe` at that target (and its GGUF), one
   loaded model for all five;
3. checks: the IQ4_K recipe through `evalkit quantize --override` equals its `--gguf` byte for byte;
   three groups' ΔKLD equal `evalkit run` of a GGUF with only that group quantized (calibration chunks);
4. held-out: lines 2500.. of ../shared/data/wikitext-2-raw-test.txt, 40 chunks of 512: `evalkit run`
   of the five mixes and the five recipes against the base (paired differences by `evalkit compare`);
5. results/smollm2-recipes-*: summary.md, kld_vs_bpw.png/.svg, heldout.json, the sensitivity table,
   kld_results.csv, heatmap, and the five recipe files.

Every step is cached in --work (the sweep and `evalkit run` resume; GGUFs are reused).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIXES = ("IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K")
HELDOUT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
CHECK_GROUPS = (("ffn_down@0-9", "IQ2_K"), ("attn_q@10-19", "IQ4_K"), ("token_embd", "IQ4_K"))


def mix_sizes(base: Path) -> dict[str, tuple[float, int]]:
    """{mix: (whole-file bpw, tensor bytes)} of the ftype mixes made from ``base``."""
    from evalkit.recipes import TypeOptions, build_plan
    from evalkit.sources import open_source
    src = open_source(base)
    out = {}
    for m in MIXES:
        p = build_plan(src, m, TypeOptions())
        out[m] = (8.0 * p.dst_bytes / p.n_elements, p.dst_bytes)
    return out


def sweep(work: Path):
    """The sensitivity pass (resumed if interrupted); returns (config, session, result, seconds)."""
    from evalkit.sensitivity.config import load_sensitivity_config
    from evalkit.sensitivity.sweep import open_session, sensitivity
    from evalkit.sensitivity.workflow import matching_result
    cfg = load_sensitivity_config(REPO / "configs" / "sensitivity-smollm2.yaml")
    cfg.output_dir = str(work)
    t0 = time.time()
    s = open_session(cfg)
    res = matching_result(cfg.out_dir, s) or sensitivity(cfg, session=s)
    return cfg, s, res, time.time() - t0


def recipes(cfg, session, sizes: dict, work: Path) -> dict[str, dict]:
    """One recipe per mix size (cached: a recipe whose JSON and GGUF exist is reused)."""
    from evalkit.sensitivity.workflow import make_recipe
    out = {}
    for m in MIXES:
        txt, gguf = work / f"recipe-{m}.txt", work / f"recipe-{m}.gguf"
        if not (txt.with_suffix(".json").is_file() and gguf.is_file()):
            make_recipe(cfg, sizes[m][0], txt, gguf, iterations=3, loo=6, session=session)
        out[m] = json.loads(txt.with_suffix(".json").read_text())
    return out


def byte_identity(base: Path, work: Path, rec: dict) -> dict:
    """recipe-IQ4_K.txt through the `evalkit quantize` CLI vs the recipe's --gguf."""
    again = work / "recipe-IQ4_K.via-quantize.gguf"
    args = [sys.executable, "-m", "evalkit", "quantize", str(base), str(again), "--type", rec["ftype"],
            "--no-progress"]
    for line in (work / "recipe-IQ4_K.txt").read_text().splitlines():
        args += ["--override", line]
    subprocess.run(args, check=True, cwd=REPO)
    sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (work / "recipe-IQ4_K.gguf", again)]
    return {"recipe_gguf_sha256": sha[0], "quantize_override_sha256": sha[1], "identical": sha[0] == sha[1]}


def additivity(cfg, session, sens, work: Path) -> list[dict]:
    """Three groups: the sweep's ΔKLD vs `evalkit run` of a GGUF with only that group quantized."""
    from evalkit.pipeline import run
    from evalkit.recipes import TypeOptions, quantize_model
    from evalkit.run_config import config_from_dict
    from evalkit.sensitivity.rules_text import recipe_rules
    rows = {(r["group"], r["requested_type"]): r for r in sens.rows}
    groups = {g.name: g for g in sens.groups}
    variants = []
    for name, typ in CHECK_GROUPS:
        g, r = groups[name], rows[(name, typ)]
        out = work / f"only-{name.replace('@', '_')}-{typ}.gguf"
        if not out.is_file():
            rules = recipe_rules(dict(zip(g.names, r["types"])), session.tensors)
            quantize_model(session.base_path, out, "Q8_0", options=TypeOptions(overrides=rules), progress=False)
        variants.append({"name": f"only-{name.replace('@', '_')}-{typ}", "gguf": str(out)})
    rc = config_from_dict({"name": "additivity", "base": "smollm2", "corpus": "wikitext-2-raw-test", "ctx": 512,
                           "chunks": 8, "threads": 2, "output_dir": str(work), "variants": variants})
    res = json.loads((run(rc) / "results.json").read_text())["variants"]
    return [{"group": n, "type": t, "effective_type": rows[(n, t)]["type"], "sweep_kld": rows[(n, t)]["kld_mean"],
             "sweep_err": rows[(n, t)]["kld_err"], "whole_model_kld": res[v["name"]]["kld_mean"][0],
             "whole_model_err": res[v["name"]]["kld_mean"][1]} for (n, t), v in zip(CHECK_GROUPS, variants)]


def heldout(work: Path) -> Path:
    """`evalkit run` of the mixes and the recipes on lines 2500.. of the shared corpus, 40 chunks."""
    from evalkit.pipeline import run
    from evalkit.run_config import config_from_dict
    text = work / "heldout.txt"
    lines = HELDOUT.read_bytes().splitlines(keepends=True)
    text.write_bytes(b"".join(lines[2499:]))
    variants = [{"name": m, "ftype": m} for m in MIXES] + \
        [{"name": f"recipe-{m}", "gguf": str(work / f"recipe-{m}.gguf")} for m in MIXES]
    rc = config_from_dict({"name": "heldout", "base": "smollm2", "corpus": str(text), "ctx": 512, "chunks": 40,
                           "threads": 2, "output_dir": str(work), "variants": variants})
    return run(rc) / "results.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/smollm2-recipes")
    ap.add_argument("--results", default=str(REPO / "results"))
    a = ap.parse_args()
    work, results = Path(a.work), Path(a.results)
    work.mkdir(parents=True, exist_ok=True)
    from evalkit.evaluation.forward import configure_threads
    configure_threads(2)
    cfg, session, sens, _ = sweep(work)
    sizes = mix_sizes(session.base_path)
    recs = recipes(cfg, session, sizes, work)
    ident = byte_identity(session.base_path, work, recs["IQ4_K"])
    add = additivity(cfg, session, sens, work)
    res_path = heldout(work)
    from smollm2_recipes_report import write_report
    write_report(results, work, sens, sizes, recs, ident, add, res_path)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
