"""Plots of a run (PNG and SVG): KLD vs bits per weight with the Pareto front, KLD CDFs, Δp histograms."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: CI and notebooks render to files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from evalkit.files import temp_path  # noqa: E402

__all__ = ["plot_kld_vs_bpw", "plot_kld_cdf", "plot_dp_hist", "save_all_plots", "pareto_front"]


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


def save_all_plots(results: dict, tokens: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write every plot as PNG and SVG into out_dir; returns the paths."""
    out_dir = Path(out_dir)
    written = []
    for stem, fig in (("kld_vs_bpw", plot_kld_vs_bpw(results)), ("kld_cdf", plot_kld_cdf(tokens)),
                      ("dp_hist", plot_dp_hist(tokens))):
        for ext in ("png", "svg"):
            p = out_dir / f"{stem}.{ext}"
            tmp = temp_path(p)
            fig.savefig(tmp, dpi=120, format=ext)
            tmp.replace(p)
            written.append(p)
        plt.close(fig)
    return written
