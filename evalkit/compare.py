"""Paired comparison of two evaluations on the same tokens: is B worse than A beyond noise?

Both sides come from runs' ``tokens.parquet`` (or two variants of one run). Per chunk the
mean KLD, same-top fraction and ln PPL(Q)/PPL(base) are taken for each side; the paired
per-chunk differences are resampled **by chunk** (tokens within a chunk are correlated, so a
block bootstrap over chunks, not tokens) for a 95% interval, and a two-sided p-value comes
from the same resampling of the centred differences (the null "no difference").
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from evalkit.errors import EvalkitError

__all__ = ["CompareError", "MetricDiff", "compare_runs", "compare_variants", "load_run_tokens",
           "METRICS"]

# metric -> how one chunk's value is formed from its tokens
METRICS = ("kld_mean", "same_top_p", "ln_ppl_ratio")
N_BOOT = 4000


class CompareError(EvalkitError, ValueError):
    """The two sides cannot be compared (files missing, other corpus, other chunks...)."""


@dataclass
class MetricDiff:
    """B − A for one metric: the token-weighted difference, its 95% block-bootstrap interval,
    the p-value of "no difference", and the per-chunk differences."""

    metric: str
    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_chunks: int
    per_chunk: list[float]


def load_run_tokens(results_path: str | Path) -> tuple[dict, pd.DataFrame]:
    """A run's results.json and the tokens.parquet beside it (named errors if missing)."""
    rp = Path(results_path)
    try:
        results = json.loads(rp.read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"{rp}: cannot read results: {e}") from None
    tp = rp.parent / "tokens.parquet"
    if not tp.is_file():
        raise CompareError(f"{rp}: no tokens.parquet beside it; a paired comparison needs the per-token table")
    try:
        tokens = pd.read_parquet(tp)
    except Exception as e:   # pyarrow raises several unrelated types for a damaged file
        raise CompareError(f"{tp}: unreadable: {e}") from None
    missing = {"variant", "chunk", "position", "token", "kld", "same_top", "nll", "nll_base"} - set(tokens.columns)
    if missing:
        raise CompareError(f"{tp}: not an evalkit token table (missing columns {sorted(missing)})")
    return results, tokens


def _per_chunk(t: pd.DataFrame) -> pd.DataFrame:
    g = t.assign(lnr=t["nll"].astype(np.float64) - t["nll_base"].astype(np.float64)).groupby("chunk")
    return pd.DataFrame({"kld_mean": g["kld"].mean(), "same_top_p": g["same_top"].mean(),
                         "ln_ppl_ratio": g["lnr"].mean(), "n": g.size()})


def _bootstrap(d: np.ndarray, w: np.ndarray, seed: int) -> tuple[float, float, float]:
    """95% interval of the weighted mean of per-chunk differences, and the two-sided p-value."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(N_BOOT, len(d)))
    means = (d[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)
    obs = float((d * w).sum() / w.sum())
    lo, hi = np.quantile(means, [0.025, 0.975])
    if obs == 0.0:
        return float(lo), float(hi), 1.0
    # the resampled spread around the observed value stands in for the spread around zero
    p = float((np.abs(means - obs) >= abs(obs)).mean())
    return float(lo), float(hi), max(p, 1.0 / N_BOOT)


def _check_same_tokens(ta: pd.DataFrame, tb: pd.DataFrame, what: str) -> None:
    keys = ["chunk", "position", "token"]
    if len(ta) != len(tb) or not (ta[keys].to_numpy() == tb[keys].to_numpy()).all():
        raise CompareError(f"{what}: the two sides were evaluated on different tokens (other corpus, "
                           "context or chunks); a paired comparison needs the same ones")


def diff_tables(ta: pd.DataFrame, tb: pd.DataFrame, what: str, seed: int = 0) -> dict[str, MetricDiff]:
    """Paired B − A of every metric over the chunks of two token tables of one variant each."""
    ta = ta.sort_values(["chunk", "position"], kind="stable").reset_index(drop=True)
    tb = tb.sort_values(["chunk", "position"], kind="stable").reset_index(drop=True)
    _check_same_tokens(ta, tb, what)
    ca, cb = _per_chunk(ta), _per_chunk(tb)
    w = ca["n"].to_numpy(np.float64)
    out = {}
    for m in METRICS:
        d = cb[m].to_numpy(np.float64) - ca[m].to_numpy(np.float64)
        a = float((ca[m] * w).sum() / w.sum())
        b = float((cb[m] * w).sum() / w.sum())
        lo, hi, p = _bootstrap(d, w, seed)
        out[m] = MetricDiff(m, a, b, b - a, lo, hi, p, len(d), d.tolist())
    return out


def diff_unpaired(ta: pd.DataFrame, tb: pd.DataFrame, seed: int = 0) -> dict[str, MetricDiff]:
    """B − A of every metric when the two sides saw different tokens: each side's chunks are
    resampled on their own (a block bootstrap of each mean) and the interval is that of the
    difference of the two resampled means. ``per_chunk`` is empty (nothing to pair)."""
    ca, cb = _per_chunk(ta), _per_chunk(tb)
    rng = np.random.default_rng(seed)
    out = {}
    for m in METRICS:
        sides = []
        for c in (ca, cb):
            v, w = c[m].to_numpy(np.float64), c["n"].to_numpy(np.float64)
            idx = rng.integers(0, len(v), size=(N_BOOT, len(v)))
            sides.append(((v * w).sum() / w.sum(), (v[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)))
        (a, ma), (b, mb) = sides
        diffs = mb - ma
        obs = float(b - a)
        lo, hi = np.quantile(diffs, [0.025, 0.975])
        p = max(float((np.abs(diffs - obs) >= abs(obs)).mean()), 1.0 / N_BOOT) if obs else 1.0
        out[m] = MetricDiff(m, float(a), float(b), obs, float(lo), float(hi), p, min(len(ca), len(cb)), [])
    return out


def compare_runs(results_a: str | Path, results_b: str | Path, seed: int = 0) -> dict[str, dict[str, MetricDiff]]:
    """{variant: {metric: B − A}} for every variant present in both runs."""
    ra, ta = load_run_tokens(results_a)
    rb, tb = load_run_tokens(results_b)
    for key in ("corpus_sha256", "n_ctx", "n_chunks"):
        if ra.get(key) != rb.get(key):
            raise CompareError(f"{results_a} and {results_b} differ in {key} ({ra.get(key)} vs {rb.get(key)}): "
                               "they were not evaluated on the same chunks")
    common = [v for v in ra.get("variants", {}) if v in rb.get("variants", {})]
    if not common:
        raise CompareError(f"{results_a} and {results_b} have no variant in common")
    return {v: diff_tables(ta[ta["variant"] == v], tb[tb["variant"] == v], f"variant {v!r}", seed)
            for v in common}


def compare_variants(results: str | Path, a: str, b: str, seed: int = 0) -> dict[str, dict[str, MetricDiff]]:
    """{"b vs a": {metric: B − A}} for two variants of one run."""
    r, t = load_run_tokens(results)
    for v in (a, b):
        if v not in r.get("variants", {}):
            raise CompareError(f"{results}: no variant {v!r} (it has {sorted(r.get('variants', {}))})")
    return {f"{b} vs {a}": diff_tables(t[t["variant"] == a], t[t["variant"] == b], f"{b} vs {a}", seed)}


def to_json(diffs: dict[str, dict[str, MetricDiff]]) -> dict:
    """Plain-data form."""
    return {v: {m: asdict(d) for m, d in ms.items()} for v, ms in diffs.items()}


def to_markdown(diffs: dict[str, dict[str, MetricDiff]], label_a: str, label_b: str) -> str:
    """One row per variant and metric: A, B, B − A with its 95% interval, p."""
    rows = [f"Paired comparison, B = {label_b} vs A = {label_a} (block bootstrap over chunks, "
            f"{N_BOOT} resamples)", "",
            "| variant | metric | A | B | B − A | 95% CI | p | chunks |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for v, ms in diffs.items():
        for m, d in ms.items():
            rows.append(f"| {v} | {m} | {d.a:.6f} | {d.b:.6f} | {d.diff:+.6f} | [{d.ci_low:+.6f}, {d.ci_high:+.6f}] "
                        f"| {d.p_value:.4f} | {d.n_chunks} |")
    return "\n".join(rows) + "\n"
