"""Human-readable output of a run: the markdown summary table and the plots.

The names are loaded on first use (PEP 562): importing a submodule such as
``evalkit.report.router_stats`` during a run must not pull in matplotlib and pandas
(~140 MB of RSS) beside the models being evaluated.
"""
from __future__ import annotations

import importlib

__all__ = ["summary_markdown", "results_frame", "kld_sources", "plot_kld_vs_bpw", "plot_kld_cdf", "plot_dp_hist",
           "plot_kld_sources", "save_all_plots"]

_HOME = {"summary_markdown": "tables", "results_frame": "tables", "kld_sources": "tables",
         "plot_kld_vs_bpw": "plots", "plot_kld_cdf": "plots", "plot_dp_hist": "plots",
         "plot_kld_sources": "plots", "save_all_plots": "plots"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"evalkit.report.{_HOME[name]}"), name)
    raise AttributeError(f"module 'evalkit.report' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
