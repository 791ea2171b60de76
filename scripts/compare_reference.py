"""Put an evalkit results.json next to the reference's llama-perplexity statistics.

Usage: python scripts/compare_reference.py results/smollm2-reference/results.json \
           ../shared/golden/stats/reference-stats.json [--model smollm2] [--out results/FILE.md]
Prints (and optionally writes) a markdown table per variant: evalkit | reference | ratio.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# (label, evalkit key, reference key, scale applied to the reference value to get a fraction)
ROWS = [
    ("PPL(Q)", "ppl", "ppl_q", 1), ("PPL(base)", "ppl_base", "ppl_base", 1),
    ("Cor(ln PPL(Q), ln PPL(base))", "cor_ln_ppl", "cor_ln_ppl_pct", 0.01),
    ("Mean ln(PPL(Q)/PPL(base))", "mean_ln_ppl_ratio", "mean_ln_ratio", 1),
    ("PPL(Q)/PPL(base)", "ppl_ratio", "ppl_ratio", 1), ("PPL(Q)-PPL(base)", "ppl_diff", "ppl_diff", 1),
    ("Mean KLD", "kld_mean", "kld_mean", 1), ("Maximum KLD", "kld_max", "kld_max", 1),
    ("99.9% KLD", "kld_p99_9", "kld_p99.9", 1), ("99.0% KLD", "kld_p99", "kld_p99", 1),
    ("95.0% KLD", "kld_p95", "kld_p95", 1), ("90.0% KLD", "kld_p90", "kld_p90", 1),
    ("Median KLD", "kld_median", "kld_median", 1), ("10.0% KLD", "kld_p10", "kld_p10", 1),
    ("5.0% KLD", "kld_p5", "kld_p5", 1), ("1.0% KLD", "kld_p1", "kld_p1", 1),
    ("0.1% KLD", "kld_p0_1", "kld_p0.1", 1), ("Minimum KLD", "kld_min", "kld_min", 1),
    ("Mean Δp", "dp_mean", "dp_mean_pct", 0.01), ("RMS Δp", "dp_rms", "rms_dp_pct", 0.01),
    ("Same top p", "same_top_p", "same_top_p_pct", 0.01),
]


def _fmt(v) -> str:
    if isinstance(v, (list, tuple)):
        return f"{v[0]:.6g} ± {v[1]:.3g}"
    return f"{v:.6g}"


def compare(results: dict, reference: dict, model: str) -> str:
    """Markdown tables comparing every variant present in both documents."""
    ref = reference[model]
    out = [f"# evalkit vs reference ({model}, {results['n_chunks']} chunks of {results['n_ctx']})", ""]
    rb, eb = ref.get("base_ppl"), results["base"]["ppl"]
    if rb:
        out.append(f"Base PPL: evalkit {eb[0]:.4f} ± {eb[1]:.5f}; reference {rb[0]} ± {rb[1]} "
                   f"(ratio {eb[0] / rb[0]:.6f}, ± ratio {eb[1] / rb[1]:.4f})")
        out.append("")
    for name, st in results["variants"].items():
        r = ref.get("mixes", {}).get(name)
        if r is None:
            continue
        out += [f"## {name} (evalkit bpw {st['bpw']:.4f})", "", "| statistic | evalkit | reference | evalkit/reference |",
                "|---|---:|---:|---:|"]
        for label, ek, rk, scale in ROWS:
            if ek not in st or rk not in r:
                continue
            ev, rv = st[ek], r[rk]
            rv_s = [x * scale for x in rv] if isinstance(rv, list) else rv * scale
            e0 = ev[0] if isinstance(ev, list) else ev
            r0 = rv_s[0] if isinstance(rv_s, list) else rv_s
            ratio = f"{e0 / r0:.4f}" if r0 else "-"
            out.append(f"| {label} | {_fmt(ev)} | {_fmt(rv_s)} | {ratio} |")
        out.append("")
    out.append("Probabilities, Δp and correlation are fractions (the reference prints percent; converted).")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("reference")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    md = compare(json.loads(Path(a.results).read_text()), json.loads(Path(a.reference).read_text()), a.model)
    print(md)
    if a.out:
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
