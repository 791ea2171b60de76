"""The user's quantization choices: ``--pure``, ``--override`` rules and the per-class types.

:class:`TypeOptions` is the one declaration of the nine per-tensor-class options
(``--token-embedding-type`` ... ``--ffn-down-type`` of llama-quantize): each field says
which tensors it applies to, and :data:`CLASS_OPTIONS` derives from those fields the
table that the CLI flags, the run-config keys and the plan's warnings are built from.
A TypeOptions is always validated: type names canonical, override regexes compiled.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterable

from evalkit.errors import EvalkitError
from evalkit.formats import get_format

__all__ = ["RuleError", "ClassOption", "CLASS_OPTIONS", "TypeOptions", "normalize_type", "parse_override"]


class RuleError(EvalkitError, ValueError):
    """A type choice is impossible or an option is malformed (message says which tensor / option)."""


def normalize_type(name: str, what: str = "type") -> str:
    """Canonical ggml type name for a user-given one (case-insensitive); RuleError if unknown."""
    try:
        return get_format(name).name
    except (ValueError, TypeError) as e:
        raise RuleError(f"{what}: {e}") from None


def parse_override(spec: str | tuple[str, str]) -> tuple[str, str]:
    """Parse ``'REGEX=TYPE'`` (split at the last '=') into (regex, canonical type); validates both."""
    if isinstance(spec, tuple):
        regex, tname = spec
    else:
        if "=" not in spec:
            raise RuleError(f"override {spec!r}: expected REGEX=TYPE")
        regex, tname = spec.rsplit("=", 1)
    if not regex:
        raise RuleError(f"override {spec!r}: empty regular expression")
    try:
        re.compile(regex)
    except re.error as e:
        raise RuleError(f"override {spec!r}: invalid regular expression {regex!r}: {e}") from None
    return regex, normalize_type(tname.strip(), f"override {spec!r}")


def _class_type(applies_to: str, exact_name: str, layer: bool = True) -> Any:
    """A per-class option field (None: unset). ``exact_name``: the tensor name that
    llama_model_quantize_internal re-applies the option to after the mix rules; ``layer``:
    it acts on blk.N.* tensors, i.e. only inside the mix rules."""
    return field(default=None, metadata={"applies_to": applies_to, "exact_name": exact_name, "layer": layer})


@dataclass(frozen=True)
class TypeOptions:
    """The user's choices: --pure, --override rules, per-class types, whether an imatrix is used.

    ``overrides`` may be given as ``'REGEX=TYPE'`` strings or (regex, type) pairs; they are
    stored as (regex, canonical type) pairs, first match wins. Per-class types may be
    given in any case and are stored canonical. RuleError on a bad type or regex.
    """

    pure: bool = False
    overrides: tuple[tuple[str, str], ...] = ()
    token_embedding_type: str | None = _class_type("token_embd.weight", "token_embd.weight", layer=False)
    output_tensor_type: str | None = _class_type("output.weight (or the tied token_embd.weight)",
                                                 "output.weight", layer=False)
    attn_q_type: str | None = _class_type("*attn_q* tensors", "attn_q.weight")
    attn_k_type: str | None = _class_type("*attn_k* tensors", "attn_k.weight")
    attn_v_type: str | None = _class_type("*attn_v.weight", "attn_v.weight")
    attn_output_type: str | None = _class_type("*attn_output.weight", "attn_output.weight")
    ffn_gate_type: str | None = _class_type("*ffn_gate* tensors", "ffn_gate")
    ffn_up_type: str | None = _class_type("*ffn_up* tensors", "ffn_up")
    ffn_down_type: str | None = _class_type("*ffn_down* tensors", "ffn_down")
    has_imatrix: bool = False
    _compiled: tuple = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        """Validate and normalise in place (the dataclass is frozen, hence object.__setattr__)."""
        setattr_ = object.__setattr__
        setattr_(self, "pure", bool(self.pure))
        setattr_(self, "has_imatrix", bool(self.has_imatrix))
        for opt in CLASS_OPTIONS:
            v = getattr(self, opt.attr)
            setattr_(self, opt.attr, None if v is None else normalize_type(v, opt.flag))
        if isinstance(self.overrides, (str, bytes)):
            raise RuleError(f"overrides must be a list of 'REGEX=TYPE' rules, got {self.overrides!r}")
        rules = tuple(parse_override(o) for o in self.overrides)
        setattr_(self, "overrides", rules)
        setattr_(self, "_compiled", tuple((re.compile(r), t) for r, t in rules))

    @classmethod
    def create(cls, pure: bool = False, overrides: Iterable[str | tuple[str, str]] = (),
               has_imatrix: bool = False, **class_types: str | None) -> "TypeOptions":
        """Keyword form of the constructor; TypeError names unknown per-class options."""
        unknown = set(class_types) - {o.attr for o in CLASS_OPTIONS}
        if unknown:
            raise TypeError(f"unknown per-class option(s): {', '.join(sorted(unknown))}")
        return cls(pure=pure, overrides=tuple(overrides), has_imatrix=has_imatrix, **class_types)

    def with_imatrix(self, has_imatrix: bool) -> "TypeOptions":
        """A copy with ``has_imatrix`` set."""
        return replace(self, has_imatrix=has_imatrix)

    def class_types(self) -> dict[str, str]:
        """The per-class types that are set: {attribute: canonical type}, in table order."""
        return {o.attr: getattr(self, o.attr) for o in CLASS_OPTIONS if getattr(self, o.attr)}

    def custom_type(self, name: str) -> tuple[str, str] | None:
        """The first --override rule whose regex is found in ``name``: (type, regex)."""
        for rx, t in self._compiled:
            if rx.search(name):
                return t, rx.pattern
        return None


@dataclass(frozen=True)
class ClassOption:
    """One per-class option: TypeOptions attribute (= run-config key), CLI flag, what it covers."""

    attr: str
    flag: str
    applies_to: str      # help text: the tensors it applies to
    exact_name: str      # the name it is re-applied to after the mix rules
    layer: bool          # acts on layer tensors (ignored by --pure and the float ftypes)


CLASS_OPTIONS: tuple[ClassOption, ...] = tuple(
    ClassOption(f.name, "--" + f.name.replace("_", "-"), **f.metadata)
    for f in fields(TypeOptions) if "applies_to" in f.metadata)
