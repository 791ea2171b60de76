"""Whole-model file types ("ftypes"): names, llama.cpp ids, default tensor types.

An ftype (``llama_ftype`` in ik_llama.cpp's ``include/llama.h``) names a *mix*: the
default type every quantizable tensor starts from, refined per tensor by
:mod:`evalkit.recipes.rules`. Ids are the values written to ``general.file_type``.
"""
from __future__ import annotations

from dataclasses import dataclass

from evalkit.registry import lookup

__all__ = ["FType", "FTYPES", "FTYPES_BY_ID", "get_ftype", "known_ftypes", "MIX_RULES_IMPLEMENTED"]


@dataclass(frozen=True)
class FType:
    """One ftype: name as the reference CLI spells it, llama_ftype id, default ggml type."""

    name: str
    id: int
    default_type: str

    @property
    def is_float(self) -> bool:
        """True for F32/F16/BF16: the reference skips the mix rules for these."""
        return self.default_type in ("F32", "F16", "BF16")

    @property
    def has_mix_rules(self) -> bool:
        """True when evalkit implements this ftype's per-tensor rules (without --pure)."""
        return self.name in MIX_RULES_IMPLEMENTED


_F = FType
FTYPES: dict[str, FType] = {f.name: f for f in [
    _F("F32", 0, "F32"),
    _F("F16", 1, "F16"),
    _F("BF16", 32, "BF16"),
    _F("Q4_0", 2, "Q4_0"),
    _F("Q4_1", 3, "Q4_1"),
    _F("Q8_0", 7, "Q8_0"),
    _F("Q5_0", 8, "Q5_0"),
    _F("Q5_1", 9, "Q5_1"),
    _F("Q2_K", 10, "Q2_K"),
    _F("Q3_K_S", 11, "Q3_K"),
    _F("Q3_K_M", 12, "Q3_K"),
    _F("Q3_K_L", 13, "Q3_K"),
    _F("Q4_K_S", 14, "Q4_K"),
    _F("Q4_K_M", 15, "Q4_K"),
    _F("Q5_K_S", 16, "Q5_K"),
    _F("Q5_K_M", 17, "Q5_K"),
    _F("Q6_K", 18, "Q6_K"),
    _F("IQ4_NL", 25, "IQ4_NL"),
    _F("Q6_0", 135, "Q6_0"),
    _F("IQ2_K", 138, "IQ2_K"),
    _F("IQ3_K", 139, "IQ3_K"),
    _F("IQ4_K", 140, "IQ4_K"),
    _F("IQ5_K", 141, "IQ5_K"),
    _F("IQ6_K", 142, "IQ6_K"),
    _F("IQ4_KS", 145, "IQ4_KS"),
    _F("IQ3_KL", 146, "IQ3_K"),   # a mix whose base type is IQ3_K
    _F("IQ2_KS", 147, "IQ2_KS"),
    _F("IQ4_KSS", 148, "IQ4_KSS"),
    _F("IQ5_KS", 150, "IQ5_KS"),
    _F("IQ2_KT", 151, "IQ2_KT"),
    _F("IQ3_KT", 152, "IQ3_KT"),
    _F("IQ4_KT", 153, "IQ4_KT"),
    _F("IQ3_KS", 154, "IQ3_KS"),
    _F("IQ2_KL", 155, "IQ2_KL"),
    _F("IQ1_KT", 156, "IQ1_KT"),
]}
del _F

# The reference CLI's aliases (examples/quantize/quantize.cpp QUANT_OPTIONS).
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

FTYPES_BY_ID: dict[int, FType] = {f.id: f for f in FTYPES.values()}

# Ftypes whose llama_tensor_get_type branches are transcribed in rules.py. The others
# (Q2_K, Q3_K_*) take special branches of their own that are not implemented yet; they
# still work with --pure.
MIX_RULES_IMPLEMENTED = frozenset({
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0", "IQ4_NL",
    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K",
    "IQ2_KS", "IQ3_KS", "IQ4_KS", "IQ4_KSS", "IQ5_KS", "IQ2_KL", "IQ3_KL",
    "IQ1_KT", "IQ2_KT", "IQ3_KT", "IQ4_KT",
})


def known_ftypes() -> list[str]:
    """Every ftype name evalkit knows, in id order."""
    return [f.name for f in sorted(FTYPES.values(), key=lambda f: f.id)]


def get_ftype(name_or_id: str | int | FType) -> FType:
    """Look an ftype up by name (case-insensitive, reference aliases accepted) or llama_ftype id."""
    if isinstance(name_or_id, FType):
        return name_or_id
    return lookup(name_or_id, FTYPES, FTYPES_BY_ID, "ftype", "ftype id", _ALIASES)
