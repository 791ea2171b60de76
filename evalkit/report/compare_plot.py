"""The plot of a paired comparison: per-chunk differences B − A of each metric."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from evalkit.files import temp_path  # noqa: E402

__all__ = ["plot_chunk_diffs"]


def plot_chunk_diffs(diffs: dict, stem: Path) -> list[Path]:
    """One panel per metric, one line per variant: B − A by chunk, with the overall difference
    and its 95% interval shaded. Written as ``stem.png`` and ``stem.svg``; returns the paths."""
    metrics = list(next(iter(diffs.values())).keys())
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.4 * len(metrics)), sharex=True, squeeze=False)
    for ax, m in zip(axes[:, 0], metrics):
        for i, (variant, ms) in enumerate(diffs.items()):
            d = ms[m]
            line, = ax.plot(range(d.n_chunks), d.per_chunk, marker=".", lw=0.8, label=variant)
            ax.axhspan(d.ci_low, d.ci_high, color=line.get_color(), alpha=0.12)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_ylabel(f"Δ {m}")
    axes[-1, 0].set_xlabel("chunk")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize="small", ncol=3)
    fig.tight_layout()
    written = []
    for ext in ("png", "svg"):
        p = Path(f"{stem}.{ext}")
        tmp = temp_path(p)
        fig.savefig(tmp, dpi=110, format=ext)
        tmp.replace(p)
        written.append(p)
    plt.close(fig)
    return written
