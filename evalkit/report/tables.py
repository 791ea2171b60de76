"""Tables from a results.json document: a pandas frame and the markdown summary."""
from __future__ import annotations

import pandas as pd

__all__ = ["kld_sources", "kld_sources_markdown", "results_frame", "summary_markdown"]


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


def kld_sources(results: dict) -> list[dict]:
    """Per variant evaluated through more than one component: where its mean KLD comes from.

    ``weights`` is the exact forward's KLD, ``backend`` what the emulated backend's arithmetic
    adds to it, ``unexplained`` what the measured logits add beyond the emulation (or beyond
    the weights, without an emulated backend), ``total`` the variant's primary KLD.
    """
    rows = []
    for name, s in results["variants"].items():
        dec = s.get("decomposition") or {}
        if len(dec) < 2:
            continue
        exact = _v(dec["exact"]["kld_mean"])
        emu = next((_v(c["kld_mean"]) for k, c in dec.items() if k not in ("exact", "measured")), None)
        meas = _v(dec["measured"]["kld_mean"]) if "measured" in dec else None
        rows.append({"variant": name, "backend": s.get("backend"), "weights": exact,
                     "backend_share": None if emu is None else emu - exact,
                     "unexplained": None if meas is None else meas - (exact if emu is None else emu),
                     "total": _v(s["kld_mean"]), "verdict": s.get("backend_verdict")})
    return rows


def _signed(x) -> str:
    return "—" if x is None else f"{x:+.6f}"


def kld_sources_markdown(results: dict) -> list[str]:
    """The "where the KLD comes from" section of the summary (empty without a decomposition)."""
    rows = kld_sources(results)
    if not rows:
        return []
    lines = ["", "## Where the KLD comes from", "",
             "Mean KLD against the exact base: the weights alone (evalkit's exact forward), what the "
             "emulated backend's arithmetic adds (8-bit activations, re-encoded weights, fp16 K/V cache), "
             "and what the measured logits add beyond that emulation.", "",
             "| variant | backend | weights | + backend arithmetic | + unexplained (measured) | total | "
             "weights share | verdict |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        share = f"{100 * r['weights'] / r['total']:.1f} %" if r["total"] > 0 else "—"
        lines.append(f"| {r['variant']} | {r['backend']} | {r['weights']:.6f} | {_signed(r['backend_share'])} | "
                     f"{_signed(r['unexplained'])} | {r['total']:.6f} | {share} | {r['verdict'] or '—'} |")
    return lines


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
    lines += kld_sources_markdown(results)
    return "\n".join(lines) + "\n"
