"""KL-divergence statistics exactly as ``llama-perplexity --kl-divergence`` computes them.

docs/perplexity-kld.md section 4. The per-token step takes the quantized model's
float32 logits rows and the *decoded* base log-probabilities (what the base-logits
file holds, see :mod:`evalkit.metrics.logits_file`) and reproduces the reference's
float32 arithmetic; the accumulators are float64 sums fed with the float32
products the reference forms (§4.2), and percentiles interpolate in float32
(§4.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np

from evalkit.metrics.perplexity import BLOCK_ROWS, as_rows, check_finite_logits, row_max_lse

__all__ = [
    "DP_PERCENTILES",
    "KLD_PERCENTILES",
    "KLDAccumulator",
    "KLDTokens",
    "kld_statistics",
    "kld_token_stats",
    "percentile_f32",
    "median_f32",
]

_F32 = np.float32
# The −16 threshold is on the absolute decoded base log-probability (§4.1).
_BASE_LOGP_FLOOR = _F32(-16.0)

# key -> fraction (a float constant in the reference, hence float32 here).
KLD_PERCENTILES = {
    "kld_p99_9": 0.999, "kld_p99": 0.990, "kld_p95": 0.950, "kld_p90": 0.900,
    "kld_p10": 0.100, "kld_p5": 0.050, "kld_p1": 0.010, "kld_p0_1": 0.001,
}
DP_PERCENTILES = {
    "99.9": 0.999, "99": 0.990, "95": 0.950, "90": 0.900, "75": 0.750,
    "25": 0.250, "10": 0.100, "5": 0.050, "1": 0.010, "0.1": 0.001,
}


@dataclass
class KLDTokens:
    """Per-token quantities of §4.1 for a run of scored rows (all 1-D, same length).

    ``nll_q``, ``nll_base``, ``p_q``, ``p_base``, ``dp`` are float32 like the
    reference; ``kld`` is the float64 per-token sum (cast to float32 only for the
    percentiles); ``same_top`` is bool (argmax of Q logits == argmax of decoded base).
    """

    nll_q: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    p_q: np.ndarray
    p_base: np.ndarray
    dp: np.ndarray
    same_top: np.ndarray

    def __len__(self) -> int:
        return int(self.kld.shape[0])

    @classmethod
    def concat(cls, parts: Iterable["KLDTokens"]) -> "KLDTokens":
        """Concatenate per-chunk results in order."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to concatenate")
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                      for f in fields(cls)})


def kld_token_stats(base_logprobs, logits, targets, *, chunk: int = 0,
                    first_row: int = 0) -> KLDTokens:
    """Per-token KLD, NLLs, target probabilities, Δp and top-token agreement for one chunk.

    ``base_logprobs``: decoded base log-probabilities b (rows, V) float32;
    ``logits``: the quantized model's logits z (rows, V) float32, row r paired with
    base record r; ``targets``: the token each row predicts. ``first_row`` is the
    chunk position of row 0 (⌊C/2⌋ for a full chunk), used with ``chunk`` to name the
    position of any NaN/Inf in the ValueError raised for it.
    """
    z, y = as_rows(logits, targets)
    b = np.asarray(base_logprobs)
    if b.shape != z.shape:
        raise ValueError(f"base log-probabilities have shape {b.shape}, logits have {z.shape}")
    if b.dtype != np.float32:
        raise ValueError(f"base log-probabilities must be float32, got {b.dtype}")
    n = z.shape[0]
    nll_q = np.empty(n, _F32)
    nll_b = np.empty(n, _F32)
    kld = np.empty(n, np.float64)
    same = np.empty(n, bool)
    for a in range(0, n, BLOCK_ROWS):
        zb = z[a:a + BLOCK_ROWS]
        bb = b[a:a + BLOCK_ROWS]
        yb = y[a:a + BLOCK_ROWS]
        check_finite_logits(zb, chunk=chunk, first_row=first_row + a, what="quantized-model logits")
        check_finite_logits(bb, chunk=chunk, first_row=first_row + a, what="base log-probabilities")
        rows = np.arange(zb.shape[0])
        m, imax, s = row_max_lse(zb)
        lam = np.log(s).astype(_F32)  # λ rounded to float
        m_lam = m + lam  # M + λ formed in float
        nll_q[a:a + BLOCK_ROWS] = m_lam - zb[rows, yb]
        nll_b[a:a + BLOCK_ROWS] = -bb[rows, yb]
        # j* on the decoded values; argmax takes the lowest index among ties (§5.5)
        same[a:a + BLOCK_ROWS] = imax == bb.argmax(axis=1)
        # term_i = expf(b_i) * ((b_i - z_i) + (M + λ)), every step in float, only for b_i > -16
        t = bb - zb
        t += m_lam[:, None]
        e = np.exp(bb)
        np.copyto(e, _F32(0), where=bb <= _BASE_LOGP_FLOOR)
        t *= e
        kld[a:a + BLOCK_ROWS] = t.sum(axis=1, dtype=np.float64)  # the per-token sum is double
    p_q = np.exp(-nll_q)
    p_b = np.exp(-nll_b)
    return KLDTokens(nll_q=nll_q, nll_base=nll_b, kld=kld, p_q=p_q, p_base=p_b,
                     dp=p_q - p_b, same_top=same)


# --------------------------------------------------------------------------
# estimators (§4.3) and percentiles (§4.5)
# --------------------------------------------------------------------------

def _mean_se(s: float, s2: float, n: int) -> tuple[float, float]:
    # SE only when the variance estimate is positive and N > 10, otherwise 0.
    if n < 1:
        return 0.0, 0.0
    f = s / n
    v = s2 / n - f * f
    return f, (math.sqrt(v / (n - 1)) if v > 0 and n > 10 else 0.0)


def _cov(sa: float, sb: float, sab: float, n: int) -> float:
    if n < 10:
        return 0.0
    return (sab / n - (sa / n) * (sb / n)) / (n - 1)


def _sqrt(x: float, compat: bool) -> float:
    # The reference takes sqrt of a possibly negative radicand and prints nan.
    if x < 0:
        return math.nan if compat else 0.0
    return math.sqrt(x)


def _div(a: float, b: float) -> float:
    # IEEE division as in C (x/0 = ±inf, 0/0 = nan) instead of ZeroDivisionError.
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def percentile_f32(sorted_values: np.ndarray, fraction: float) -> float:
    """P(φ) of §4.5 on an ascending float32 array, with the index computed in float32."""
    v = sorted_values
    n = v.shape[0]
    if n == 0:
        raise ValueError("percentile of an empty array")
    frac = _F32(fraction)
    if frac <= 0:
        return float(v[0])
    if frac >= 1:
        return float(v[-1])
    p = frac * _F32(n - 1)  # r = φ·(N-1) in float (N-1 converted to float first)
    ip = int(p)
    w = p - _F32(ip)
    return float((_F32(1) - w) * v[ip] + w * v[min(ip + 1, n - 1)])


def median_f32(sorted_values: np.ndarray) -> float:
    """Median as the reference computes it: float average of the two middle values for even N."""
    v = sorted_values
    n = v.shape[0]
    if n == 0:
        raise ValueError("median of an empty array")
    if n % 2 == 0:
        return float(_F32(0.5) * (v[n // 2] + v[n // 2 - 1]))
    return float(v[n // 2])


# --------------------------------------------------------------------------
# accumulator (§4.2, 4.4, 4.6)
# --------------------------------------------------------------------------

class KLDAccumulator:
    """Double sums of §4.2 plus the KLD and Δp arrays, fed chunk by chunk."""

    _SUMS = ("sum_nll", "sum_nll2", "sum_nll_base", "sum_nll_base2", "sum_nll_nll_base",
             "sum_kld", "sum_kld2", "sum_dp", "sum_dp2", "sum_dp4")

    def __init__(self) -> None:
        for name in self._SUMS:
            setattr(self, name, 0.0)
        self.count = 0
        self.n_same_top = 0
        self._kld: list[np.ndarray] = []
        self._dp: list[np.ndarray] = []

    def add(self, tok: KLDTokens) -> None:
        """Add the per-token results of one chunk (or any run of tokens)."""
        f64 = np.float64
        q, b = tok.nll_q.astype(_F32), tok.nll_base.astype(_F32)
        dp = tok.dp.astype(_F32)
        kld = np.asarray(tok.kld, dtype=f64)
        self.sum_nll += float(q.sum(dtype=f64))
        self.sum_nll2 += float((q * q).sum(dtype=f64))  # products formed in float
        self.sum_nll_base += float(b.sum(dtype=f64))
        self.sum_nll_base2 += float((b * b).sum(dtype=f64))
        self.sum_nll_nll_base += float((q * b).sum(dtype=f64))
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())  # KLD² in double
        dp2 = (dp * dp).astype(f64)  # Δp² in float, then Δp⁴ = (Δp²)² in double
        self.sum_dp += float(dp.sum(dtype=f64))
        self.sum_dp2 += float(dp2.sum())
        self.sum_dp4 += float((dp2 * dp2).sum())
        self.count += len(tok)
        self.n_same_top += int(np.count_nonzero(tok.same_top))
        self._kld.append(kld.astype(_F32))  # the reference keeps (float)KLD for percentiles
        self._dp.append(dp)

    # -- pieces shared by the progress row and the final block ---------------
    def _ppl_parts(self, compat: bool) -> dict:
        n = self.count
        mu_q, se_q = _mean_se(self.sum_nll, self.sum_nll2, n)
        mu_b, se_b = _mean_se(self.sum_nll_base, self.sum_nll_base2, n)
        cov = _cov(self.sum_nll, self.sum_nll_base, self.sum_nll_nll_base, n)
        p_q, p_b = math.exp(mu_q), math.exp(mu_b)
        u_q, u_b = p_q * se_q, p_b * se_b
        lr = mu_q - mu_b
        lr_unc = _sqrt(se_q * se_q + se_b * se_b - 2.0 * cov, compat)
        ratio = math.exp(lr)
        return {
            "ppl": [p_q, u_q],
            "ppl_base": [p_b, u_b],
            "cor_ln_ppl": _div(cov, se_q * se_b),
            "mean_ln_ppl_ratio": [lr, lr_unc],
            "ppl_ratio": [ratio, ratio * lr_unc],
            "ppl_diff": [p_q - p_b, _sqrt(u_q * u_q + u_b * u_b - 2.0 * (p_q * p_b * cov), compat)],
        }

    def _rms_dp(self, compat: bool) -> list[float]:
        mse, mse_se = _mean_se(self.sum_dp2, self.sum_dp4, self.count)
        rms = math.sqrt(mse)
        if rms == 0.0:
            # reference: 0.5/0 * se = inf*0 = nan
            return [rms, math.nan if compat else 0.0]
        return [rms, 0.5 / rms * mse_se]

    def _same_top(self) -> list[float]:
        n = self.count
        rho = self.n_same_top / n
        return [rho, math.sqrt(rho * (1.0 - rho) / (n - 1)) if n > 1 else math.nan]

    def progress(self, compat: bool = True) -> dict:
        """Cumulative values of the per-chunk progress row (§4.6), fractions not percent:
        ``ppl``, ``mean_ln_ppl_ratio``, ``kld_mean``, ``dp_rms``, ``same_top_p`` as [value, err]."""
        if self.count == 0:
            raise ValueError("no tokens accumulated")
        pp = self._ppl_parts(compat)
        return {
            "ppl": pp["ppl"],
            "mean_ln_ppl_ratio": pp["mean_ln_ppl_ratio"],
            "kld_mean": list(_mean_se(self.sum_kld, self.sum_kld2, self.count)),
            "dp_rms": self._rms_dp(compat),
            "same_top_p": self._same_top(),
        }

    def statistics(self, compat: bool = True) -> dict:
        """All statistics of the final block (§4.4-4.5) as a dict.

        Values with an uncertainty are [value, err] lists, others floats;
        probabilities and Δp are fractions (not percent); ``cor_ln_ppl`` is a
        fraction too. The reference prints this block only when N ≥ 100; it is
        computed here for any N ≥ 1 (with the reference's zero-SE rules for small N).
        ``compat=True`` mirrors the reference's nan for negative radicands and 0/0;
        ``compat=False`` clips radicands at 0 instead.
        """
        n = self.count
        if n == 0:
            raise ValueError("no tokens accumulated")
        kv = np.sort(np.concatenate(self._kld))
        dv = np.sort(np.concatenate(self._dp))
        out = self._ppl_parts(compat)
        out["kld_mean"] = list(_mean_se(self.sum_kld, self.sum_kld2, n))
        out["kld_max"] = float(kv[-1])
        for key in ("kld_p99_9", "kld_p99", "kld_p95", "kld_p90"):
            out[key] = percentile_f32(kv, KLD_PERCENTILES[key])
        out["kld_median"] = median_f32(kv)
        for key in ("kld_p10", "kld_p5", "kld_p1", "kld_p0_1"):
            out[key] = percentile_f32(kv, KLD_PERCENTILES[key])
        out["kld_min"] = float(kv[0])
        out["dp_mean"] = list(_mean_se(self.sum_dp, self.sum_dp2, n))
        out["dp_rms"] = self._rms_dp(compat)
        pct = {"max": float(dv[-1])}
        for key in ("99.9", "99", "95", "90", "75"):
            pct[key] = percentile_f32(dv, DP_PERCENTILES[key])
        pct["50"] = median_f32(dv)
        for key in ("25", "10", "5", "1", "0.1"):
            pct[key] = percentile_f32(dv, DP_PERCENTILES[key])
        pct["min"] = float(dv[0])
        out["dp_percentiles"] = pct
        out["same_top_p"] = self._same_top()
        out["n_tokens"] = n
        return out


def kld_statistics(tokens: KLDTokens | Iterable[KLDTokens], compat: bool = True) -> dict:
    """Final-block statistics (see :meth:`KLDAccumulator.statistics`) of per-token results,
    given as one concatenated :class:`KLDTokens` or an iterable of per-chunk ones."""
    acc = KLDAccumulator()
    for part in ([tokens] if isinstance(tokens, KLDTokens) else tokens):
        acc.add(part)
    return acc.statistics(compat=compat)
