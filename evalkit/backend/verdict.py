"""Is a backend faulty? A paired per-token test of its measured output against its emulation.

For every scored token both the measured logits (a ``llama-perplexity`` file of the real
backend) and the emulated ones (evalkit's model with the backend's intended arithmetic)
have a KLD against the same exact base, so their difference d_i = KLD_measured − KLD_emulated
is paired token by token: the weights' own error cancels, and what is left is the part of
the backend's behaviour the emulation does not explain.

The test (and why):

* Statistic: the mean of d_i. KLD is what the issue's figures are about, and the pairing
  removes the (large) per-token variation of the weights' error, so the test is far more
  sensitive than comparing the two mean KLDs with their separate errors.
* Noise: tokens of one chunk are correlated (they share their context and the chunk's
  activations), so the standard error is taken over independent units: chunks when there
  are at least 10 of them, otherwise consecutive blocks of 32 scored tokens (batch means);
  the critical value is Student's t with (units − 1) degrees of freedom.
* A tolerance: the emulation reproduces the intended arithmetic but not the backend's
  float32 summation order, its vector ``expf`` or its RoPE angle recurrence, and the file
  stores log-probabilities as 16-bit codes. Those flip a few activation roundings and move
  the mean KLD by a small fraction, a real difference that is not a fault. So the null
  hypothesis is |E[d]| ≤ δ with δ = max(5 % of the emulated KLD, 1e-4 nat), and the verdict
  is ``fault suspected`` when (|mean d| − δ) / SE exceeds t(0.999, dof), i.e. when the data
  show, at the 0.1 % level, a difference larger than the emulation's own accuracy (on
  SmolLM2's IQ4_K mix the reference's real output and the emulation agree to 0.02 % of the
  KLD; a kernel that drops 64 of 576 input features is off by a factor of several hundred).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["ALPHA", "REL_TOLERANCE", "ABS_TOLERANCE", "paired_verdict", "t_critical"]

ALPHA = 0.001
REL_TOLERANCE = 0.05
ABS_TOLERANCE = 1e-4
_BLOCK_TOKENS = 32
_MIN_CHUNK_UNITS = 10

# One-sided Student t quantiles at 1 - 0.001 by degrees of freedom (standard tables);
# between entries the next smaller tabulated dof is used (conservative).
_T999 = {1: 318.31, 2: 22.327, 3: 10.215, 4: 7.173, 5: 5.893, 6: 5.208, 7: 4.785, 8: 4.501, 9: 4.297,
         10: 4.144, 11: 4.025, 12: 3.930, 13: 3.852, 14: 3.787, 15: 3.733, 16: 3.686, 17: 3.646, 18: 3.610,
         19: 3.579, 20: 3.552, 21: 3.527, 22: 3.505, 23: 3.485, 24: 3.467, 25: 3.450, 26: 3.435, 27: 3.421,
         28: 3.408, 29: 3.396, 30: 3.385, 40: 3.307, 60: 3.232, 120: 3.160}
_Z999 = 3.090


def t_critical(dof: int) -> float:
    """One-sided t quantile at 1 − ALPHA for ``dof`` degrees of freedom (inf for dof < 1)."""
    if dof < 1:
        return float("inf")
    if dof > 120:
        return _Z999
    return _T999[max(k for k in _T999 if k <= dof)]


def _units(frame: pd.DataFrame) -> tuple[np.ndarray, str]:
    """Per-unit mean differences: chunks when there are enough, else blocks of 32 tokens."""
    chunks = frame.groupby("chunk", sort=True)["diff"]
    if chunks.ngroups >= _MIN_CHUNK_UNITS:
        return chunks.mean().to_numpy(), "chunk"
    means = []
    for _, d in chunks:
        v = d.to_numpy()
        for part in np.array_split(v, max(1, round(len(v) / _BLOCK_TOKENS))):
            if part.size:
                means.append(part.mean())
    return np.asarray(means), f"block of {_BLOCK_TOKENS} tokens"


def _divergent(frame: pd.DataFrame, k: int = 10) -> list[dict]:
    """The k tokens with the largest |d_i|."""
    top = frame.reindex(frame["diff"].abs().sort_values(ascending=False).index[:k])
    return [{"chunk": int(r.chunk), "position": int(r.position), "token": int(r.token),
             "kld_measured": float(r.kld_m), "kld_emulated": float(r.kld_e), "diff": float(r.diff)}
            for r in top.itertuples()]


def paired_verdict(measured: pd.DataFrame, emulated: pd.DataFrame) -> tuple[str, dict]:
    """``("consistent" | "fault suspected", detail)`` from the per-token frames of the measured
    and the emulated component (columns chunk, position, token, kld, same_top), paired on
    (chunk, position)."""
    keys = ["chunk", "position"]
    f = measured[keys + ["token", "kld", "same_top"]].merge(
        emulated[keys + ["kld", "same_top"]], on=keys, suffixes=("_m", "_e"))
    f["diff"] = f["kld_m"].astype(np.float64) - f["kld_e"].astype(np.float64)
    means, unit = _units(f)
    n = len(means)
    mean = float(f["diff"].mean()) if len(f) else float("nan")
    se = float(means.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    kld_e = float(f["kld_e"].mean()) if len(f) else float("nan")
    tol = max(REL_TOLERANCE * kld_e, ABS_TOLERANCE)
    t = (abs(mean) - tol) / se if se > 0 else (float("inf") if abs(mean) > tol else float("-inf"))
    crit = t_critical(n - 1)
    verdict = "fault suspected" if t > crit else "consistent"
    wrong_m, wrong_e = ~f["same_top_m"].astype(bool), ~f["same_top_e"].astype(bool)
    detail = {
        "test": ("paired per-token KLD difference d = KLD(measured) - KLD(emulated) against the same exact "
                 f"base; H0: |E[d]| <= tolerance; fault suspected when (|mean d| - tolerance) / SE > "
                 f"t(1 - {ALPHA}, units - 1), SE over independent units ({unit})"),
        "n_tokens": int(len(f)), "n_chunks": int(f["chunk"].nunique()), "unit": unit, "n_units": n,
        "kld_measured": float(f["kld_m"].mean()), "kld_emulated": kld_e,
        "diff_mean": mean, "diff_se": se, "tolerance": tol, "t": float(t), "t_critical": crit,
        "same_top_p_measured": float(f["same_top_m"].mean()), "same_top_p_emulated": float(f["same_top_e"].mean()),
        "top_token_flips": {"measured_only": int((wrong_m & ~wrong_e).sum()),
                            "emulated_only": int((wrong_e & ~wrong_m).sum())},
        "largest_divergences": _divergent(f),
    }
    return verdict, detail
