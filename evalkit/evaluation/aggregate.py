"""Finished chunks → typed totals: the base's PPL, every variant's KLD statistics, the token table."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from evalkit.evaluation.store import ChunkStore

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["KLD_FIELDS", "BaseTotals", "VariantTotals", "RunTotals", "aggregate"]

# The per-token arrays a chunk file holds for each variant (prefixed "v<i>_").
KLD_FIELDS = ("nll_q", "nll_base", "kld", "p_q", "p_base", "dp", "same_top")


@dataclass
class BaseTotals:
    """The base model over every chunk."""

    ppl: tuple[float, float]
    running_ppl: list[float]
    n_tokens: int
    seconds: float


@dataclass
class VariantTotals:
    """One variant over every chunk: llama-perplexity's KLD statistics and its timing."""

    name: str
    statistics: dict
    seconds: float = 0.0
    tokens: int = 0
    n_chunks: int = 0           # chunks it was scored on (fewer than the run's when limited)

    @property
    def tokens_per_s(self) -> float | None:
        """Evaluated (not only scored) tokens per second of forward pass."""
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclass
class RunTotals:
    """Everything a run's outputs are made of."""

    base: BaseTotals
    variants: list[VariantTotals] = field(default_factory=list)
    tokens: pd.DataFrame | None = None       # built by aggregate()


def _token_frame(name: str, k: int, positions: np.ndarray, targets: np.ndarray, kt) -> pd.DataFrame:
    import pandas as pd
    return pd.DataFrame({
        "variant": name, "chunk": np.int32(k), "position": positions.astype(np.int32),
        "token": targets.astype(np.int32), "nll": kt.nll_q, "nll_base": kt.nll_base,
        "kld": kt.kld.astype(np.float32), "p": kt.p_q, "p_base": kt.p_base, "dp": kt.dp,
        "same_top": kt.same_top})


def aggregate(store: ChunkStore, n_chunks: int, variant_names: list[str], n_ctx: int,
              targets_pos: np.ndarray) -> RunTotals:
    """Read every chunk file of ``store`` in order and total them."""
    from evalkit.metrics import KLDTokens, PerplexityAccumulator, kld_statistics

    base_acc, running, base_seconds = PerplexityAccumulator(), [], 0.0
    parts: list[list] = [[] for _ in variant_names]
    seconds = [0.0 for _ in variant_names]
    frames = []
    for k in range(n_chunks):
        with store.load(k) as d:
            running.append(base_acc.add(d["base_nll"]))
            base_seconds += float(d["base_seconds"])
            for i, name in enumerate(variant_names):
                if f"v{i}_kld" not in d.files:      # a variant limited to fewer chunks
                    continue
                kt = KLDTokens(**{f: d[f"v{i}_{f}"] for f in KLD_FIELDS})
                parts[i].append(kt)
                seconds[i] += float(d[f"v{i}_seconds"])
                frames.append(_token_frame(name, k, targets_pos, d["targets"], kt))
    base = BaseTotals(base_acc.final(), running, base_acc.count, base_seconds)
    variants = [VariantTotals(name, kld_statistics(parts[i]), seconds[i], len(parts[i]) * n_ctx, len(parts[i]))
                for i, name in enumerate(variant_names)]
    import pandas as pd   # here, not at import: pandas (~65 MB) is not resident while models run
    tokens = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not tokens.empty:
        tokens["variant"] = tokens["variant"].astype("category")
    return RunTotals(base, variants, tokens)
