"""Tables from a results.json document: a pandas frame and the markdown summary."""
from __future__ import annotations

import pandas as pd

__all__ = ["results_frame", "summary_markdown"]


def _v(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def _e(x):
    return x[1] if isinstance(x, (list, tuple)) else float("nan")


def results_frame(results: dict) -> pd.DataFrame:
    """One row per variant with every scalar statistic (value and ``_err`` columns)."""
    rows = []
    for name, s in results["variants"].items():
        row = {"variant": name}
        for k, v in s.items():
            if isinstance(v, (list, tuple)) and len(v) == 2:
                row[k], row[k + "_err"] = v
            elif isinstance(v, (int, float)):
                row[k] = v
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def summary_markdown(results: dict) -> str:
    """The summary table: variant, size, bpw, PPL ratio ±, mean KLD ±, same top p (percent, as llama-perplexity)."""
    base = results.get("base", {})
    lines = [f"# {results.get('config', {}).get('name', 'evalkit run')}", ""]
    bp = base.get("ppl")
    if bp:
        lines.append(f"Base PPL = {bp[0]:.4f} ± {bp[1]:.5f} over {results.get('n_chunks')} chunks of "
                     f"{results.get('n_ctx')} tokens ({base.get('n_tokens')} scored tokens).")
        lines.append("")
    lines += ["| variant | size GiB | bpw | PPL(Q) | PPL(Q)/PPL(base) | mean KLD | same top p |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in results["variants"].items():
        size = s.get("size_bytes", 0) / 2**30
        lines.append(
            f"| {name} | {size:.4f} | {s.get('bpw', float('nan')):.4f} | "
            f"{_v(s['ppl']):.4f} ± {_e(s['ppl']):.4f} | "
            f"{_v(s['ppl_ratio']):.5f} ± {_e(s['ppl_ratio']):.5f} | "
            f"{_v(s['kld_mean']):.6f} ± {_e(s['kld_mean']):.6f} | "
            f"{100 * _v(s['same_top_p']):.3f} ± {100 * _e(s['same_top_p']):.3f} % |")
    return "\n".join(lines) + "\n"
