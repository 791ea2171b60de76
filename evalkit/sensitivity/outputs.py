"""A sensitivity pass's outputs: the tidy table, GGUF-Tool-Suite's ``kld_results.csv``, the
heatmap and the summary.

``kld_results.csv`` has the layout that GGUF-Tool-Suite's ``collect_ppl_results.sh`` writes
and ``quant_assign.py`` reads: a header ``QTYPE,<tensor>,<tensor>,...`` with the tensor
names in GNU ``sort -V`` order, then one row per quantization type, named as that suite
spells them (lower case, except a trailing ``_K`` / ``_KV`` of the k-quants: ``iq4_k``,
``q6_K``), rows in ``sort -u`` order, each cell the mean KLD of the model with only that
tensor in that type, printed as ``llama-perplexity`` prints it (six decimals), ``404`` where
nothing was measured. A group's value goes to each of its tensors (the suite's
``--expand-groups``); a type that falls back (rows not a multiple of 256) holds the
fallback's measurement, as the reference tool would have measured it.
"""
from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import numpy as np

__all__ = ["filevercmp", "heatmap_figure", "kld_results_csv", "qtype_name", "summary_markdown", "write_outputs"]


# ------------------------------------------------------------------ GNU sort -V

def _order(s: str, pos: int) -> int:
    """gnulib's ``order``: the weight of one character (end of string < '~' excluded)."""
    if pos == len(s):
        return -1
    c = s[pos]
    if c.isdigit():
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    if c == "~":
        return -2
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    """gnulib's ``verrevcmp``: Debian version comparison of two strings."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ca, cb = _order(a, i), _order(b, j)
            if ca != cb:
                return ca - cb
            i, j = i + 1, j + 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and j < len(b) and a[i].isdigit() and b[j].isdigit():
            first_diff = first_diff or ord(a[i]) - ord(b[j])
            i, j = i + 1, j + 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


_SUFFIX = re.compile(r"(?:\.[A-Za-z~][A-Za-z0-9~]*)*\Z")


def filevercmp(a: str, b: str) -> int:
    """GNU ``sort -V``'s comparison (gnulib ``filevercmp``) of two names without a leading dot:
    the file suffixes (``.weight``) are cut for a first comparison and used to break ties."""
    if a == b:
        return 0
    pa, pb = a[:_SUFFIX.search(a, 1).start()] if a else a, b[:_SUFFIX.search(b, 1).start()] if b else b
    r = _verrevcmp(pa, pb)
    return r if r or (pa == a and pb == b) else _verrevcmp(a, b)


def qtype_name(type_name: str) -> str:
    """A type as GGUF-Tool-Suite spells it (its ``canonical_qtype``): ggml's own spelling,
    lower case with the k-quants' trailing ``_K`` / ``_KV`` upper case (``IQ4_K`` → ``iq4_k``,
    ``Q6_K`` → ``q6_K``)."""
    from evalkit.sensitivity.rules_text import ggml_type_name
    return ggml_type_name(type_name)


def kld_results_csv(result) -> str:
    """``kld_results.csv`` of a sensitivity result (see the module docstring)."""
    tensors = {}
    for g in result.groups:
        for n in g.names:
            tensors[n] = g.name
    cols = sorted(tensors, key=functools.cmp_to_key(filevercmp))
    value = {(r["group"], r["requested_type"]): r["kld_mean"] for r in result.rows}
    qtypes = sorted({qtype_name(r["requested_type"]): r["requested_type"] for r in result.rows}.items())
    lines = ["QTYPE," + ",".join(cols)]
    for q, req in qtypes:
        cells = []
        for t in cols:
            v = value.get((tensors[t], req))
            cells.append("404" if v is None or not math.isfinite(v) else f"{v:.6f}")
        lines.append(q + "," + ",".join(cells))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ heatmap

def _heat_axes(rows: list[dict]):
    """Row labels (bands or layers, then '(no layer)'), column labels (kinds) and each row's cell."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    bands = sorted({(r["layer_first"], r["layer_last"]) for r in rows if r["layer_first"] is not None})
    labels = [f"{a}-{b}" if a != b else f"{a}" for a, b in bands]
    has_global = any(r["layer_first"] is None for r in rows)
    if has_global:
        labels.append("(no layer)")

    def cell(r: dict) -> tuple[int, int]:
        i = len(bands) if r["layer_first"] is None else bands.index((r["layer_first"], r["layer_last"]))
        return i, kinds.index(r["kind"])
    return labels, kinds, cell


def heatmap_figure(result):
    """log10 mean KLD per (layers, tensor kind), one panel per requested type; grey: not
    measured or unavailable; a cell's text names the type it fell back to ("0": identical
    to the base, exactly 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result.rows
    labels, kinds, cell = _heat_axes(rows)
    types = list(dict.fromkeys(r["requested_type"] for r in rows))
    grids = {t: np.full((len(labels), len(kinds)), np.nan) for t in types}
    notes: dict[tuple[str, int, int], str] = {}
    for r in rows:
        i, j = cell(r)
        v = r["kld_mean"]
        if v is not None and math.isfinite(v) and not r["identical"]:
            grids[r["requested_type"]][i, j] = math.log10(max(v, 1e-9))
        if r["identical"]:
            notes[(r["requested_type"], i, j)] = "0"
        elif r["fallback"] and r["available"]:
            notes[(r["requested_type"], i, j)] = r["type"]
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()] + [np.zeros(0)])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-7.0, 0.0)
    ncol = min(3, len(types))
    nrow = -(-len(types) // ncol)
    fig, axes = plt.subplots(nrow, ncol, squeeze=False, layout="constrained",
                             figsize=(ncol * (0.42 * len(kinds) + 1.3) + 1.0, nrow * (0.3 * len(labels) + 1.5) + 0.5))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    im = None
    for ax, t in zip(axes.flat, types):
        im = ax.imshow(grids[t], cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_title(t, fontsize=9)
        ax.set_xticks(range(len(kinds)), kinds, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        if len(labels) <= 16:
            for (tt, i, j), text in notes.items():
                if tt == t:
                    ax.text(j, i, text, ha="center", va="center", fontsize=5, color="black")
    for ax in list(axes.flat)[len(types):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="log10 mean KLD vs base")
    fig.suptitle(f"sensitivity: {result.meta['config']['name']} ({result.meta['n_chunks']} chunks of "
                 f"{result.meta['n_ctx']}; rows: layers, grey: not possible / not measured)", fontsize=9)
    return fig


# ------------------------------------------------------------------ summary

def summary_markdown(result) -> str:
    """The pass in markdown: settings, then mean KLD per group and requested type (the
    effective type when it fell back)."""
    m = result.meta
    c = m["config"]
    types = list(dict.fromkeys(r["requested_type"] for r in result.rows))
    out = [f"# sensitivity: {c['name']}", "",
           f"Base `{Path(m['base']['model']).name}` ({m['base']['bpw']:.4f} bpw); calibration: first "
           f"{m['n_chunks']} chunks of {m['n_ctx']} tokens of {Path(m['corpus']).name} ({m['n_tokens']} scored "
           f"tokens); grouping `{c['grouping']}`" + (f" × {c['bands']} bands" if c["grouping"] == "bands" else "")
           + f"; {len(result.groups)} groups, {m['n_measurements']} measurements in {m['wall_time_s']:.0f} s.",
           "", "Mean KLD vs the base with only the group in that type (others as in the base); "
           "`→T`: fell back to T (rows not a multiple of 256); `=`: identical to the base; "
           "`—`: not possible.", "",
           "| group | tensors | " + " | ".join(types) + " |", "|---|---:|" + "---:|" * len(types)]
    by = {(r["group"], r["requested_type"]): r for r in result.rows}
    for g in result.groups:
        cells = []
        for t in types:
            r = by.get((g.name, t))
            if r is None or not r["available"]:
                cells.append("—")
            elif r["identical"]:
                cells.append("0 =")
            else:
                cells.append(f"{r['kld_mean']:.5f}" + (f" →{r['type']}" if r["fallback"] else ""))
        out.append(f"| {g.name} | {len(g.tensors)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_outputs(folder: Path, result) -> list[Path]:
    """Write every output of a pass into ``folder`` (a staging folder): CSV, parquet,
    kld_results.csv, heatmap PNG/SVG, summary.md and sensitivity.json."""
    import matplotlib.pyplot as plt
    from evalkit.files import json_default
    folder = Path(folder)
    df = result.frame()
    df.to_csv(folder / "sensitivity.csv", index=False)
    df.to_parquet(folder / "sensitivity.parquet", index=False)
    (folder / "kld_results.csv").write_text(kld_results_csv(result))
    fig = heatmap_figure(result)
    for ext in ("png", "svg"):
        fig.savefig(folder / f"heatmap.{ext}", dpi=130)
    plt.close(fig)
    (folder / "summary.md").write_text(summary_markdown(result))
    doc = {"meta": result.meta, "groups": [g.to_dict() for g in result.groups], "rows": result.rows}
    (folder / "sensitivity.json").write_text(json.dumps(doc, indent=1, default=json_default, allow_nan=True))
    return sorted(folder.iterdir())
