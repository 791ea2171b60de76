"""A choice of types as ``REGEX=TYPE`` rules: ``evalkit quantize --override`` and ik_llama.cpp's
``llama-quantize --custom-q`` syntax.

One rule per tensor kind and type, anchored at both ends (``^...$``) so that it selects
exactly its tensors whether a tool searches or matches the whole name, no two rules
select the same tensor (their order does not matter), and no rule holds a comma or an
``=`` (``--custom-q`` splits its list at commas and each rule at its first ``=``). The
regexes use only ``^ $ \\. ( | )``, which mean the same in Python's ``re`` and in the
ECMAScript ``std::regex`` that ``llama-quantize`` searches with (``std::regex_search``). Types
are spelled as ggml spells them (``iq4_k``, ``q6_K``: :func:`ggml_type_name`), because
``--custom-q`` compares the name with ``ggml_type_name()`` exactly (``parse_ggml_type`` in
ik_llama.cpp's ``examples/quantize/quantize.cpp``) and refuses ``IQ4_K``; ``evalkit quantize
--override`` takes any case. The types are the effective ones (after the 256-fallback), so the
file means the same thing to tools whose fallback tables differ; tensors the recipe does not
change keep their base type explicitly.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

from evalkit.sensitivity.groups import TensorFacts

__all__ = ["ggml_type_name", "recipe_rules", "rules_assignment"]


def ggml_type_name(type_name: str) -> str:
    """ggml's spelling of a type (what ``ggml_type_name()`` returns, the only spelling
    ``llama-quantize --custom-q`` accepts): lower case, except the trailing ``_K`` / ``_KV`` of
    the k-quants (``IQ4_K`` → ``iq4_k``, ``Q6_K`` → ``q6_K``, ``Q8_KV`` → ``q8_KV``)."""
    q = type_name.lower()
    if re.fullmatch(r"q[^_]+_kv", q):
        return q[:-3] + "_KV"
    if re.fullmatch(r"q[^_]+_k", q):
        return q[:-2] + "_K"
    return q


def _layers_regex(layers: list[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else "(" + "|".join(str(i) for i in layers) + ")"


def recipe_rules(types: Mapping[str, str], tensors: Iterable[TensorFacts]) -> list[str]:
    """``REGEX=TYPE`` lines for {tensor name: type}; every quantizable tensor of ``tensors`` not
    in ``types`` keeps its base type. Lines in tensor-kind order (layer kinds, then the others)."""
    by_rule: dict[tuple[str, str], list] = {}
    for t in tensors:
        typ = types.get(t.name, t.src_type)
        by_rule.setdefault((t.kind, typ), []).append(t)
    lines = []
    for (kind, canonical), members in by_rule.items():
        typ = ggml_type_name(canonical)
        layered = sorted(m.layer for m in members if m.layer is not None)
        if layered:
            lines.append(f"^blk\\.{_layers_regex(layered)}\\.{re.escape(kind)}\\.weight$={typ}")
        for m in members:
            if m.layer is None:
                lines.append(f"^{re.escape(m.name)}$={typ}")
    for line in lines:
        if "," in line or line.count("=") != 1:
            raise ValueError(f"rule {line!r} cannot be passed to --custom-q (a comma or a second '=')")
    return lines


def rules_assignment(rules: Iterable[str], names: Iterable[str]) -> dict[str, str]:
    """{tensor: type} that ``rules`` give the tensors ``names`` (first matching rule, as
    ``--override``); tensors no rule selects are left out."""
    from evalkit.recipes.options import parse_override
    parsed = [(re.compile(r), t) for r, t in (parse_override(x) for x in rules)]
    out = {}
    for n in names:
        for rx, t in parsed:
            if rx.search(n):
                out[n] = t
                break
    return out
