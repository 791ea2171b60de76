"""Swap a group's packed weights in the loaded model, and restore them.

Every linear layer of evalkit's model (:class:`evalkit.model.qlinear.QLinear`, and the token
table :class:`~evalkit.model.qlinear.QEmbedding`) multiplies straight out of its packed
bytes: a uint8 buffer ``weight`` (rows, row_bytes) and its ggml ``type_id`` / ``type_name``.
A swap replaces those three attributes with another type's bytes of the same tensor; the
originals (views of the base file's memory map) are kept and put back afterwards. Nothing
is written to disk and the model is never reloaded.

The bytes of tensor *t* in type *T* are made exactly as ``evalkit quantize`` (and so
``llama-quantize``) makes them: the tensor's plan comes from
:func:`evalkit.recipes.plan.build_plan` with the rule ``^t$=T`` (the 256-fallback, the copy
of a tensor already in that type, the imatrix entry and its name fallbacks), and its bytes
from :func:`evalkit.recipes.model_quantizer.quantize_tensor`. A model with a recipe swapped
in is therefore the model of the GGUF that recipe writes, byte for byte.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Mapping

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.sensitivity.groups import tensor_kind

__all__ = ["SwapError", "WeightSwapper", "CARRIER_FTYPE"]

# The ftype of the plans built for swaps: every swapped tensor has a rule of its own, so the
# ftype's mix rules never decide a swapped tensor (only general.file_type would differ).
CARRIER_FTYPE = "Q8_0"


class SwapError(EvalkitError, ValueError):
    """A tensor cannot be swapped in the loaded model (not a packed linear layer, wrong shape)."""


def exact_rule(name: str, type_name: str) -> tuple[str, str]:
    """The override rule that selects exactly one tensor: (``^name$`` escaped, type)."""
    return f"^{re.escape(name)}$", type_name


class WeightSwapper:
    """Swaps tensors of a loaded :class:`evalkit.model.Model` for other types' bytes.

    ``source`` is the base as a tensor source (:func:`evalkit.sources.open_source`), from
    which the quantized bytes are made; ``imatrix`` a path or an Imatrix (or None).
    Quantized tensors are cached (least recently used first out) up to ``cache_bytes``.
    """

    def __init__(self, model, source, imatrix=None, threads: int | None = None, cache_bytes: int = 1 << 29):
        from evalkit.recipes.model_quantizer import load_imatrix_arg
        self.model, self.source, self.threads = model, source, threads
        self.imatrix, self.imatrix_label = load_imatrix_arg(imatrix)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._saved: dict[int, tuple] = {}        # id(module) -> (module, weight, type_id, type_name)

    # ------------------------------------------------------------------ the model's modules
    def modules(self, name: str) -> list:
        """The packed-weight modules that hold tensor ``name`` (two for a tied token table:
        the embedding lookup and the output projection)."""
        m = self.model
        layer, kind = tensor_kind(name)
        if layer is not None:
            mods = [getattr(m.blk[layer], kind, None)] if 0 <= layer < len(m.blk) else [None]
        elif name == "token_embd.weight":
            mods = [m.token_embd] + ([m.output] if getattr(m.config, "tied_embeddings", False) else [])
        elif name == "output.weight":
            mods = [m.output]
        else:
            mods = [None]
        import torch
        for mod in mods:
            w = getattr(mod, "weight", None)
            if not (torch.is_tensor(w) and w.dtype == torch.uint8 and w.dim() == 2 and hasattr(mod, "type_id")):
                raise SwapError(f"tensor {name!r} is not a packed weight of the loaded model; it cannot be "
                                "swapped (only linear layers and the token table can)")
        return mods

    # ------------------------------------------------------------------ bytes
    def packed(self, assignment: Mapping[str, str]) -> dict[str, tuple[np.ndarray, str]]:
        """{tensor: (bytes (rows, row_bytes) uint8, ggml type)} of an assignment {tensor: type},
        made as ``evalkit quantize --override '^tensor$=type'`` makes them."""
        from evalkit.recipes.options import TypeOptions
        from evalkit.recipes.plan import build_plan
        plan = build_plan(self.source, CARRIER_FTYPE, TypeOptions(overrides=[exact_rule(n, t) for n, t in
                                                                            assignment.items()]),
                          self.imatrix, self.imatrix_label)
        out = {}
        for name in assignment:
            tp = plan.tensor(name)
            out[name] = (self._bytes(tp), tp.dst_type)
        return out

    def _bytes(self, tp) -> np.ndarray:
        from evalkit.recipes.model_quantizer import quantize_tensor
        key = (tp.name, tp.dst_type)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        vec = self.imatrix.data[tp.imatrix_name] if tp.imatrix_name else None
        data = np.ascontiguousarray(quantize_tensor(self.source, tp, vec, self.threads))
        if tp.quantize:               # copies are views of the memory map: nothing to keep
            self._cache[key] = data
            while sum(a.nbytes for a in self._cache.values()) > self.cache_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return data

    # ------------------------------------------------------------------ swapping
    def put(self, packed: Mapping[str, tuple[np.ndarray, str]]) -> None:
        """Put the bytes in (the originals are kept for :meth:`restore`)."""
        from evalkit.formats import get_format
        from evalkit.model.qlinear import packed_tensor
        for name, (data, type_name) in packed.items():
            fmt = get_format(type_name)
            for mod in self.modules(name):
                rows, n = mod.weight.shape[0], self._row_length(mod)
                if data.shape != (rows, fmt.row_bytes(n)):
                    raise SwapError(f"tensor {name!r}: {type_name} bytes of shape {data.shape} do not fit the "
                                    f"loaded layer ({rows} rows of {n})")
                self._saved.setdefault(id(mod), (mod, mod.weight, mod.type_id, mod.type_name))
                mod.weight = packed_tensor(data)
                mod.type_id, mod.type_name = fmt.type_id, fmt.name

    @staticmethod
    def _row_length(mod) -> int:
        return int(getattr(mod, "in_features", None) or getattr(mod, "embedding_dim"))

    def restore(self) -> None:
        """Put every swapped module's original bytes and type back."""
        for mod, weight, type_id, type_name in self._saved.values():
            mod.weight, mod.type_id, mod.type_name = weight, type_id, type_name
        self._saved.clear()

    @contextmanager
    def swapped(self, assignment: Mapping[str, str]) -> Iterator[dict[str, tuple[np.ndarray, str]]]:
        """Context: the model with ``assignment`` {tensor: type} swapped in; restored on exit
        (also on errors). Yields the packed bytes."""
        packed = self.packed(assignment)
        try:
            self.put(packed)
            yield packed
        finally:
            self.restore()
