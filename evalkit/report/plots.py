"""Plots of a run (PNG and SVG): KLD vs bits per weight with the Pareto front, KLD CDFs, Δp histograms."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and notebooks render to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evalkit.files import temp_path  # noqa: E402

__all__ = ["plot_kld_vs_bpw", "plot_kld_cdf", "plot_dp_hist", "plot_kld_sources", "save_all_plots", "pareto_front"]


def pareto_front(bpw: np.ndarray, kld: np.ndarray) -> np.ndarray:
    """Indices of the variants no other variant beats on both size and KLD, by increasing bpw."""
    order = np.lexsort((kld, bpw))
    front, best = [], np.inf
    for i in order:
        if kld[i] < best:
            front.append(i)
            best = kld[i]
    return np.array(front, dtype=int)


def plot_kld_vs_bpw(results: dict):
    """Mean KLD (± its error) against bits per weight, log y, with the Pareto front."""
    names = list(results["variants"])
    bpw = np.array([results["variants"][n]["bpw"] for n in names])
    kld = np.array([results["variants"][n]["kld_mean"][0] for n in names])
    err = np.array([results["variants"][n]["kld_mean"][1] for n in names])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.errorbar(bpw, kld, yerr=err, fmt="o", capsize=3, label="variant")
    for x, y, n in zip(bpw, kld, names):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if len(names) > 1:
        f = pareto_front(bpw, kld)
        ax.plot(bpw[f], kld[f], "--", color="gray", label="Pareto front")
    if (kld > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole model)")
    ax.set_ylabel("mean KLD vs base")
    ax.set_title(results.get("config", {}).get("name", ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_kld_cdf(tokens: pd.DataFrame):
    """Cumulative distribution of per-token KLD per variant, log x axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, g in tokens.groupby("variant", sort=False):
        v = np.sort(g["kld"].to_numpy())
        v = np.maximum(v, 1e-10)
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=str(name))
    ax.set_xscale("log")
    ax.set_xlabel("per-token KLD")
    ax.set_ylabel("fraction of tokens ≤ x")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_dp_hist(tokens: pd.DataFrame):
    """Histogram of Δp = p_Q(target) − p_base(target) per variant (percent)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    bins = np.linspace(-100, 100, 81)
    for name, g in tokens.groupby("variant", sort=False):
        ax.hist(100 * g["dp"].to_numpy(), bins=bins, histtype="step", label=str(name))
    ax.set_yscale("log")
    ax.set_xlabel("Δp of the target token (percentage points)")
    ax.set_ylabel("tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_kld_sources(results: dict):
    """Stacked bars per variant, as shares of its mean KLD: the weights' own (exact forward),
    what the backend's arithmetic adds (emulated), and what the measured logits add beyond the
    emulation; the mean KLD is written above each bar (a black tick marks measured logits that
    fall below the emulation)."""
    from evalkit.report.tables import kld_sources
    rows = kld_sources(results)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(rows) + 2), 4.6))
    x = np.arange(len(rows))
    parts = np.array([[r["weights"], max(0.0, r["backend_share"] or 0.0), max(0.0, r["unexplained"] or 0.0)]
                      for r in rows]).reshape(len(rows), 3)
    total = np.maximum(parts.sum(1), 1e-30)
    share = parts / total[:, None]
    bottom = np.zeros(len(rows))
    for k, (label, color, hatch) in enumerate([("weights (exact forward)", "#4c72b0", None),
                                               ("backend arithmetic (emulated)", "#dd8452", None),
                                               ("unexplained (measured − emulated)", "#c44e52", "//")]):
        ax.bar(x, 100 * share[:, k], bottom=100 * bottom, color=color, hatch=hatch, label=label)
        bottom += share[:, k]
    for i, r in enumerate(rows):
        if r["unexplained"] is not None and r["unexplained"] < 0:
            ax.plot([i - 0.4, i + 0.4], [100 * r["total"] / total[i]] * 2, color="black", lw=1.5)
        note = f"{r['total']:.4g}" + ("\nfault suspected" if r["verdict"] == "fault suspected" else "")
        ax.annotate(note, (i, 100), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(x, [r["variant"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 118)
    ax.set_ylabel("share of the mean KLD vs the exact base (%)")
    ax.set_title("where the KLD comes from (mean KLD above each bar)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def _primary_tokens(results: dict, tokens: pd.DataFrame) -> pd.DataFrame:
    """The token rows of each variant's primary figure (not its decomposition components)."""
    if tokens.empty or "variant" not in tokens:
        return tokens
    keep = tokens["variant"].isin(list(results["variants"]))
    return tokens if keep.all() else tokens[keep].assign(
        variant=lambda f: f["variant"].astype(str).astype("category"))


def save_all_plots(results: dict, tokens: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write every plot as PNG and SVG into out_dir; returns the paths."""
    from evalkit.report.tables import kld_sources
    out_dir = Path(out_dir)
    written = []
    tokens = _primary_tokens(results, tokens)
    plots = [("kld_vs_bpw", plot_kld_vs_bpw), ("kld_cdf", lambda r: plot_kld_cdf(tokens)),
             ("dp_hist", lambda r: plot_dp_hist(tokens))]
    if kld_sources(results):
        plots.append(("kld_sources", plot_kld_sources))
    for stem, make in plots:
        fig = make(results)
        for ext in ("png", "svg"):
            p = out_dir / f"{stem}.{ext}"
            tmp = temp_path(p)
            fig.savefig(tmp, dpi=120, format=ext)
            tmp.replace(p)
            written.append(p)
        plt.close(fig)
    return written
