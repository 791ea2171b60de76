"""Router statistics of MoE variants against their base: which experts each token is sent to.

For every MoE layer and variant, over the same tokens (every position of every evaluated
chunk, each model fed its own hidden states, as in a real run):

* ``topk_agreement``: mean over tokens of |base's k experts ∩ variant's k experts| / k;
* ``top1_agreement``: fraction of tokens whose first (highest-weighted) expert is the base's;
* ``load_tvd``: total variation distance ½·Σ_e |p_base(e) − p_var(e)| between the two
  expert-load distributions (p(e): the share of the N·k routing slots that went to expert e);
  0 = the same load, 1 = disjoint experts.

llama-perplexity reports none of them. :class:`RouterStats` accumulates them layer by layer
(a layer's routings are needed only while that layer runs) and gives a JSON-able dict and a
markdown table for ``results.json`` / ``summary.md``.
"""
from __future__ import annotations

import numpy as np

from evalkit.errors import InputError

__all__ = ["RouterStats", "expert_load", "router_markdown", "routing_agreement"]


def expert_load(chosen: np.ndarray, n_expert: int) -> np.ndarray:
    """The expert-load distribution (n_expert,) float64 of routings ``chosen`` (N, k): each
    expert's share of the N·k slots."""
    counts = np.bincount(np.asarray(chosen, dtype=np.int64).reshape(-1), minlength=n_expert)
    if counts.size != n_expert:
        raise InputError(f"router stats: an expert id ≥ n_expert={n_expert} was chosen")
    return counts / max(1, int(counts.sum()))


def routing_agreement(base: np.ndarray, variant: np.ndarray, n_expert: int) -> dict[str, float]:
    """topk_agreement, top1_agreement and load_tvd of ``variant``'s routings against ``base``'s,
    both (N, k) expert ids of the same N tokens, best expert first."""
    base, variant = np.asarray(base), np.asarray(variant)
    if base.shape != variant.shape or base.ndim != 2 or base.shape[0] == 0:
        raise InputError(f"router stats: routings of shapes {base.shape} and {variant.shape} do not pair "
                         "(need the same (N > 0, k) tokens and slots)")
    k = base.shape[1]
    # |A ∩ B| per token: the k ids of a token are distinct, so count equal pairs
    shared = (base[:, :, None] == variant[:, None, :]).any(axis=2).sum(axis=1)
    tvd = 0.5 * np.abs(expert_load(base, n_expert) - expert_load(variant, n_expert)).sum()
    return {"topk_agreement": float(shared.mean() / k), "top1_agreement": float((base[:, 0] == variant[:, 0]).mean()),
            "load_tvd": float(tvd)}


class RouterStats:
    """Per MoE layer and variant: the agreement of the variant's routing with the base's."""

    def __init__(self, base: str, variants: list[str]):
        self.base, self.variants = base, list(variants)
        self.layers: dict[int, dict] = {}       # layer -> {"n_expert", "k", "n_tokens", variant -> stats}

    def add_layer(self, il: int, n_expert: int, base: np.ndarray, variants: dict[str, np.ndarray]) -> None:
        """Record layer ``il`` from the base's routings (N, k) and each variant's over the same tokens."""
        row = {"n_expert": int(n_expert), "k": int(base.shape[1]), "n_tokens": int(base.shape[0])}
        for name, chosen in variants.items():
            try:
                row[name] = routing_agreement(base, chosen, n_expert)
            except InputError as e:
                raise InputError(f"layer {il}, variant {name!r}: {e}") from None
        self.layers[int(il)] = row

    def means(self) -> dict[str, dict[str, float]]:
        """Each variant's statistics averaged over the MoE layers (unweighted: a layer is a layer)."""
        out = {}
        for v in self.variants:
            rows = [r[v] for r in self.layers.values() if v in r]
            if rows:
                out[v] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        return out

    def to_dict(self) -> dict:
        """JSON-able: base, variants, per-layer rows (keys are layer numbers as strings) and means."""
        return {"base": self.base, "variants": self.variants,
                "definitions": {"topk_agreement": "mean |top-k(base) ∩ top-k(variant)| / k over tokens",
                                "top1_agreement": "fraction of tokens with the base's first expert",
                                "load_tvd": "total variation distance of the expert-load distributions"},
                "layers": {str(il): row for il, row in sorted(self.layers.items())},
                "mean": self.means()}


def router_markdown(stats: dict) -> str:
    """A markdown section from :meth:`RouterStats.to_dict`: one row per MoE layer, per variant
    ``top-k agr. / top-1 agr. / load TVD``, and the mean over layers; empty without MoE layers."""
    layers, variants = stats.get("layers") or {}, stats.get("variants") or []
    if not layers or not variants:
        return ""
    head = "| layer | " + " | ".join(f"{v}: top-k / top-1 / load TVD" for v in variants) + " |"
    lines = ["## Router statistics (vs the base)", "",
             "Top-k agreement: mean share of the base's k experts the variant also chooses; top-1: same first "
             "expert; load TVD: total variation distance between the expert-load distributions.", "",
             head, "|---|" + "---|" * len(variants)]

    def cell(s: dict | None) -> str:
        return "–" if s is None else f"{s['topk_agreement']:.4f} / {s['top1_agreement']:.4f} / {s['load_tvd']:.4f}"

    for il in sorted(layers, key=int):
        lines.append(f"| {il} | " + " | ".join(cell(layers[il].get(v)) for v in variants) + " |")
    means = stats.get("mean") or {}
    lines.append("| **mean** | " + " | ".join(cell(means.get(v)) for v in variants) + " |")
    return "\n".join(lines) + "\n"
