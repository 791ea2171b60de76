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

__all__ = ["RouterStats", "expert_load", "router_markdown", "routing_agreement", "routing_counts",
           "stats_from_counts"]


def expert_load(chosen: np.ndarray, n_expert: int) -> np.ndarray:
    """The expert-load distribution (n_expert,) float64 of routings ``chosen`` (N, k): each
    expert's share of the N·k slots."""
    counts = _load_counts(chosen, n_expert)
    return counts / max(1, int(counts.sum()))


def _load_counts(chosen: np.ndarray, n_expert: int) -> np.ndarray:
    """How many of the N·k slots of ``chosen`` went to each expert (n_expert,) int64."""
    counts = np.bincount(np.asarray(chosen, dtype=np.int64).reshape(-1), minlength=n_expert)
    if counts.size != n_expert:
        raise InputError(f"router stats: an expert id ≥ n_expert={n_expert} was chosen")
    return counts


def routing_counts(base: np.ndarray, variant: np.ndarray, n_expert: int) -> dict:
    """The additive counts behind the statistics (they sum over chunks): ``n_tokens``, ``shared``
    (Σ |base's k ∩ variant's k|), ``top1`` (tokens with the same first expert) and both expert loads."""
    base, variant = np.asarray(base), np.asarray(variant)
    if base.shape != variant.shape or base.ndim != 2 or base.shape[0] == 0:
        raise InputError(f"router stats: routings of shapes {base.shape} and {variant.shape} do not pair "
                         "(need the same (N > 0, k) tokens and slots)")
    # |A ∩ B| per token: the k ids of a token are distinct, so count equal pairs
    shared = (base[:, :, None] == variant[:, None, :]).any(axis=2).sum()
    return {"n_tokens": int(base.shape[0]), "shared": int(shared), "top1": int((base[:, 0] == variant[:, 0]).sum()),
            "load_base": _load_counts(base, n_expert).tolist(), "load_variant": _load_counts(variant, n_expert).tolist()}


def _add_counts(a: dict | None, b: dict) -> dict:
    """``a`` + ``b`` (counts of disjoint tokens of one layer)."""
    if a is None:
        return {key: list(v) if isinstance(v, list) else v for key, v in b.items()}
    if len(a["load_base"]) != len(b["load_base"]):
        raise InputError(f"router stats: {len(a['load_base'])} and {len(b['load_base'])} experts do not add up")
    out = {key: a[key] + b[key] for key in ("n_tokens", "shared", "top1")}
    for key in ("load_base", "load_variant"):
        out[key] = [x + y for x, y in zip(a[key], b[key])]
    return out


def stats_from_counts(c: dict, k: int) -> dict[str, float]:
    """topk_agreement, top1_agreement and load_tvd from :func:`routing_counts` (possibly summed)."""
    lb, lv = np.asarray(c["load_base"], np.float64), np.asarray(c["load_variant"], np.float64)
    tvd = 0.5 * np.abs(lb / max(1.0, lb.sum()) - lv / max(1.0, lv.sum())).sum()
    n = max(1, c["n_tokens"])
    return {"topk_agreement": c["shared"] / (n * k), "top1_agreement": c["top1"] / n, "load_tvd": float(tvd)}


def routing_agreement(base: np.ndarray, variant: np.ndarray, n_expert: int) -> dict[str, float]:
    """topk_agreement, top1_agreement and load_tvd of ``variant``'s routings against ``base``'s,
    both (N, k) expert ids of the same N tokens, best expert first."""
    return stats_from_counts(routing_counts(base, variant, n_expert), np.asarray(base).shape[1])


class RouterStats:
    """Per MoE layer and variant: the agreement of the variant's routing with the base's.

    Kept as additive counts (:func:`routing_counts`), so the statistics of several chunks, or of
    a run resumed in pieces, are those of all their tokens together (:meth:`merge`)."""

    def __init__(self, base: str, variants: list[str]):
        self.base, self.variants = base, list(variants)
        self.layers: dict[int, dict] = {}       # layer -> {"n_expert", "k", "counts": {variant: counts}}

    def add_layer(self, il: int, n_expert: int, base: np.ndarray, variants: dict[str, np.ndarray]) -> None:
        """Add layer ``il``'s tokens: the base's routings (N, k) and each variant's over the same tokens."""
        counts = {}
        for name, chosen in variants.items():
            try:
                counts[name] = routing_counts(base, chosen, n_expert)
            except InputError as e:
                raise InputError(f"layer {il}, variant {name!r}: {e}") from None
        self._add(int(il), {"n_expert": int(n_expert), "k": int(np.asarray(base).shape[1]), "counts": counts})

    def _add(self, il: int, row: dict) -> None:
        have = self.layers.get(il)
        if have is None:
            self.layers[il] = {"n_expert": row["n_expert"], "k": row["k"], "counts": {}}
            have = self.layers[il]
        elif (have["n_expert"], have["k"]) != (row["n_expert"], row["k"]):
            raise InputError(f"router stats: layer {il} has {have['n_expert']} experts / top-{have['k']}, "
                             f"the added counts {row['n_expert']} / top-{row['k']}")
        for name, c in row["counts"].items():
            have["counts"][name] = _add_counts(have["counts"].get(name), c)

    def counts_dict(self) -> dict:
        """The raw counts, JSON-able (what :meth:`merge` takes back)."""
        return {"base": self.base, "variants": self.variants,
                "layers": {str(il): row for il, row in sorted(self.layers.items())}}

    def merge(self, counts: dict) -> None:
        """Add a :meth:`counts_dict` of other tokens (another chunk) of the same models."""
        if counts.get("base") != self.base or list(counts.get("variants", [])) != self.variants:
            raise InputError(f"router stats: counts of base {counts.get('base')!r} / variants "
                             f"{counts.get('variants')} do not merge into {self.base!r} / {self.variants}")
        for il, row in counts.get("layers", {}).items():
            self._add(int(il), row)

    def _stats(self, il: int) -> dict:
        row = self.layers[il]
        out = {"n_expert": row["n_expert"], "k": row["k"], "n_tokens": 0}
        for name, c in row["counts"].items():
            out[name] = stats_from_counts(c, row["k"])
            out["n_tokens"] = c["n_tokens"]
        return out

    def means(self) -> dict[str, dict[str, float]]:
        """Each variant's statistics averaged over the MoE layers (unweighted: a layer is a layer)."""
        out = {}
        rows = [self._stats(il) for il in sorted(self.layers)]
        for v in self.variants:
            have = [r[v] for r in rows if v in r]
            if have:
                out[v] = {key: float(np.mean([r[key] for r in have])) for key in have[0]}
        return out

    def to_dict(self) -> dict:
        """JSON-able: base, variants, per-layer rows (keys are layer numbers as strings) and means."""
        return {"base": self.base, "variants": self.variants,
                "definitions": {"topk_agreement": "mean |top-k(base) ∩ top-k(variant)| / k over tokens",
                                "top1_agreement": "fraction of tokens with the base's first expert",
                                "load_tvd": "total variation distance of the expert-load distributions"},
                "layers": {str(il): self._stats(il) for il in sorted(self.layers)},
                "mean": self.means()}


def router_markdown(stats: dict) -> str:
    """A markdown section from :meth:`RouterStats.to_dict`: one row per MoE layer, per variant
    ``top-k agr. / top-1 agr. / load TVD``, and the mean over layers; empty without MoE layers."""
    layers, variants = stats.get("layers") or {}, stats.get("variants") or []
    if not layers or not variants:
        return ""
    head = "| layer | " + " | ".join(f"{v}: top-k / top-1 / load TVD" for v in variants) + " |"
    lines = ["", "## Router statistics (vs the base)", "",
             "Top-k agreement: mean share of the base's k experts the variant also chooses; top-1: same first "
             "expert; load TVD: total variation distance between the expert-load distributions."
             + (f" Over the {stats['n_chunks']} chunks evaluated in layer order." if stats.get("n_chunks") else ""), "",
             head, "|---|" + "---|" * len(variants)]

    def cell(s: dict | None) -> str:
        return "–" if s is None else f"{s['topk_agreement']:.4f} / {s['top1_agreement']:.4f} / {s['load_tvd']:.4f}"

    for il in sorted(layers, key=int):
        lines.append(f"| {il} | " + " | ".join(cell(layers[il].get(v)) for v in variants) + " |")
    means = stats.get("mean") or {}
    lines.append("| **mean** | " + " | ".join(cell(means.get(v)) for v in variants) + " |")
    return "\n".join(lines) + "\n"
