"""Whole-model quantization with ik_llama.cpp ``llama-quantize``'s per-tensor type rules.

``quantize_model(src, out, "IQ4_K", imatrix=..., options=TypeOptions(...))`` writes a GGUF
whose tensors are byte-identical to the reference's; ``build_plan`` / ``--dry-run`` show
the decisions. Names are resolved lazily so that the CLI (which imports
``evalkit.cli.quantize``) starts without loading the quantizer. (The package is not called
``evalkit.quantize``: that name is the array-level kernel function
``evalkit.quantize(x, type_name)``.) Model sources (GGUF, HF) live in :mod:`evalkit.sources`.
"""
from __future__ import annotations

import importlib
from typing import Any


_EXPORTS = {
    "FTYPES": "ftypes", "FType": "ftypes", "get_ftype": "ftypes", "known_ftypes": "ftypes",
    "quantize_model": "model_quantizer", "quantize_tensor": "model_quantizer",
    "QuantPlan": "plan", "TensorPlan": "plan", "build_plan": "plan",
    "TypeOptions": "options", "ClassOption": "options", "CLASS_OPTIONS": "options", "RuleError": "options",
    "ModelFacts": "rules", "tensor_type": "rules",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'evalkit.recipes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"evalkit.recipes.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
