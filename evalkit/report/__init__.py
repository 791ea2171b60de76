"""Human-readable output of a run: the markdown summary table and the plots."""
from evalkit.report.plots import plot_dp_hist, plot_kld_cdf, plot_kld_sources, plot_kld_vs_bpw, save_all_plots
from evalkit.report.tables import kld_sources, results_frame, summary_markdown

__all__ = ["summary_markdown", "results_frame", "kld_sources", "plot_kld_vs_bpw", "plot_kld_cdf", "plot_dp_hist",
           "plot_kld_sources", "save_all_plots"]
