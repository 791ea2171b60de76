"""Put a backend-lens run (configs/smollm2-backend.yaml) next to the reference's measured backend statistics.

Usage: python scripts/compare_backend.py results/smollm2-backend/results.json \
           ../shared/golden/stats/ik-backend-stats.json [--out results/FILE.md]
Per variant: mean KLD and same-top-p of evalkit's exact forward (the weights alone), of the
emulated ik-cpu backend, and of the reference's llama-perplexity in default mode (and with
-ub 8, where measured), with the emulation/reference ratio; then the measured-logits verdicts.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pm(v, scale=1.0, digits=4) -> str:
    return f"{scale * v[0]:.{digits}f} ± {scale * v[1]:.{digits}f}"


def compare(results: dict, reference: dict) -> str:
    """The markdown comparison tables."""
    runs = reference["runs"]
    out = [f"# Backend lens: evalkit exact / ik-cpu vs ik_llama.cpp measured "
           f"({results['n_chunks']} chunks of {results['n_ctx']})", "",
           "| variant | exact KLD | ik-cpu KLD | reference KLD (default) | ik-cpu / reference | "
           "reference KLD (-ub 8) | exact same top % | ik-cpu same top % | reference same top % | Δ points |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, st in results["variants"].items():
        dec = st.get("decomposition", {})
        ref = runs.get(f"mix-{name}.default")
        if "ik-cpu" not in dec or ref is None:
            continue
        ub8 = runs.get(f"mix-{name}.ub8")
        emu, ex = dec["ik-cpu"], dec["exact"]
        ratio = emu["kld_mean"][0] / ref["kld_mean"][0]
        dtop = 100 * emu["same_top_p"][0] - ref["same_top_p"][0]
        out.append(f"| {name} | {_pm(ex['kld_mean'])} | {_pm(emu['kld_mean'])} | {_pm(ref['kld_mean'])} | "
                   f"{ratio:.4f} | {_pm(ub8['kld_mean']) if ub8 else '—'} | {_pm(ex['same_top_p'], 100, 2)} | "
                   f"{_pm(emu['same_top_p'], 100, 2)} | {ref['same_top_p'][0]:.2f} ± {ref['same_top_p'][1]:.2f} | "
                   f"{dtop:+.2f} |")
    out += ["", "Without a reference row (no measured figures in ik-backend-stats.json):", "",
            "| variant | exact KLD | ik-cpu KLD | exact same top % | ik-cpu same top % |", "|---|---:|---:|---:|---:|"]
    for name, st in results["variants"].items():
        dec = st.get("decomposition", {})
        if "ik-cpu" in dec and f"mix-{name}.default" not in runs and "measured" not in dec:
            out.append(f"| {name} | {_pm(dec['exact']['kld_mean'])} | {_pm(dec['ik-cpu']['kld_mean'])} | "
                       f"{_pm(dec['exact']['same_top_p'], 100, 2)} | {_pm(dec['ik-cpu']['same_top_p'], 100, 2)} |")
    verdicts = [(n, st) for n, st in results["variants"].items() if st.get("backend_verdict")]
    if verdicts:
        out += ["", "Measured logits (llama-perplexity --kl-divergence-base files) scored against "
                "evalkit's exact base:",
                "", "| variant | chunks | measured KLD | measured same top % | ik-cpu KLD (same tokens) | "
                "mean paired diff ± SE | tolerance | verdict |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, st in verdicts:
            d = st["backend_verdict_detail"]
            m = st["decomposition"]["measured"]
            out.append(f"| {name} | {d['n_chunks']} | {_pm(m['kld_mean'])} | {_pm(m['same_top_p'], 100, 2)} | "
                       f"{d['kld_emulated']:.4f} | {d['diff_mean']:+.5f} ± {d['diff_se']:.5f} | "
                       f"{d['tolerance']:.5f} | "
                       f"{st['backend_verdict']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    """Print (and optionally write) the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("reference")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    md = compare(json.loads(Path(a.results).read_text()), json.loads(Path(a.reference).read_text()))
    print(md)
    if a.out:
        Path(a.out).write_text(md)


if __name__ == "__main__":
    main()
