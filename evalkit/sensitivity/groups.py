"""Which tensors move together, and what each candidate type makes of them.

A *group* is a set of quantizable tensors that always gets one type: one tensor
(``grouping: tensor``), or one tensor kind over a band of consecutive layers
(``grouping: bands``; token embeddings and the output projection are groups of their own).
A *candidate* is a requested type applied to a group, after llama-quantize's own rule for
rows that are not a multiple of 256 (``change_type_if_necessary``:
:func:`evalkit.recipes.rules.fallback_type`), with its exact size from the formats'
geometry (per-row headers included).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from evalkit.sensitivity.config import SensitivityError

__all__ = ["Candidate", "Group", "TensorFacts", "candidates_for", "layer_bands", "make_groups",
           "quantizable_tensors", "tensor_kind"]

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)\.weight")


@dataclass(frozen=True)
class TensorFacts:
    """One quantizable tensor of the base: name, ggml shape, stored type and bytes, layer and kind."""

    name: str
    shape: tuple[int, ...]
    src_type: str
    src_bytes: int
    n_elements: int
    layer: int | None
    kind: str

    def to_dict(self) -> dict:
        """Plain data (sensitivity.json)."""
        return {"name": self.name, "shape": list(self.shape), "src_type": self.src_type,
                "src_bytes": self.src_bytes, "n_elements": self.n_elements, "layer": self.layer, "kind": self.kind}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorFacts":
        """Inverse of :meth:`to_dict`."""
        return cls(d["name"], tuple(d["shape"]), d["src_type"], d["src_bytes"], d["n_elements"], d["layer"],
                   d["kind"])


def tensor_kind(name: str) -> tuple[int | None, str]:
    """(layer, kind) of a tensor name: ``blk.3.ffn_down.weight`` → (3, "ffn_down");
    ``token_embd.weight`` → (None, "token_embd")."""
    m = _LAYER_TENSOR.fullmatch(name)
    if m:
        return int(m.group(1)), m.group(2)
    return None, name[:-len(".weight")] if name.endswith(".weight") else name


def quantizable_tensors(source) -> list[TensorFacts]:
    """The tensors of ``source`` that llama-quantize would quantize (norms, biases and 1-D
    tensors are never quantized), in file order."""
    from evalkit.recipes.rules import should_quantize
    out = []
    for t in source.tensors:
        if should_quantize(t.name, t.shape)[0]:
            layer, kind = tensor_kind(t.name)
            out.append(TensorFacts(t.name, tuple(int(d) for d in t.shape), t.type_name, int(t.nbytes),
                                   int(t.n_elements), layer, kind))
    return out


@dataclass(frozen=True)
class Group:
    """Tensors that always get the same type. ``start_layer``: the first block whose input
    changes when the group's weights change (0 for token embeddings, ``n_layer`` for the
    output projection alone), so a measurement may start from the base's hidden state there."""

    name: str
    kind: str
    layers: tuple[int, ...]
    tensors: tuple[TensorFacts, ...]
    start_layer: int

    @property
    def n_elements(self) -> int:
        """Weights in the group."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def base_bytes(self) -> int:
        """The group's bytes in the base model."""
        return sum(t.src_bytes for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        """The tensor names."""
        return tuple(t.name for t in self.tensors)

    def to_dict(self) -> dict:
        """Plain data (sensitivity.json)."""
        return {"name": self.name, "kind": self.kind, "layers": list(self.layers), "start_layer": self.start_layer,
                "tensors": [t.to_dict() for t in self.tensors]}

    @classmethod
    def from_dict(cls, d: dict) -> "Group":
        """Inverse of :meth:`to_dict`."""
        return cls(d["name"], d["kind"], tuple(d["layers"]), tuple(TensorFacts.from_dict(t) for t in d["tensors"]),
                   d["start_layer"])


def layer_bands(n_layer: int, bands: int) -> list[tuple[int, ...]]:
    """``bands`` contiguous bands of layers 0..n_layer-1, sizes differing by at most one
    (fewer when there are fewer layers)."""
    parts = np.array_split(np.arange(n_layer), min(bands, max(1, n_layer)))
    return [tuple(int(i) for i in p) for p in parts if len(p)]


def _band_label(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"


def make_groups(tensors: list[TensorFacts], n_layer: int, grouping: str = "bands", bands: int = 3,
                kinds: tuple[str, ...] | None = None) -> list[Group]:
    """The groups of a pass: per tensor, or per kind × band of layers; ``kinds`` restricts
    them (SensitivityError names an unknown kind and lists the model's)."""
    have = list(dict.fromkeys(t.kind for t in tensors))
    if kinds is not None:
        unknown = [k for k in kinds if k not in have]
        if unknown:
            raise SensitivityError(f"sensitivity 'kinds': no tensor of kind {', '.join(map(repr, unknown))} "
                                   f"in this model; its kinds are: {', '.join(have)}")
        tensors = [t for t in tensors if t.kind in kinds]
    if not tensors:
        raise SensitivityError("sensitivity: the model has no quantizable tensor to measure")
    start = {"token_embd": 0, "output": n_layer}
    groups: list[Group] = []
    for t in (t for t in tensors if t.layer is None):     # token_embd, output: groups of their own
        groups.append(Group(t.kind, t.kind, (), (t,), start.get(t.kind, 0)))
    layered = [t for t in tensors if t.layer is not None]
    if grouping == "tensor":
        for t in sorted(layered, key=lambda t: (t.layer, have.index(t.kind))):
            groups.append(Group(t.name[:-len(".weight")], t.kind, (t.layer,), (t,), t.layer))
        return groups
    for band in layer_bands(n_layer, bands):
        for kind in have:
            members = tuple(t for t in layered if t.kind == kind and t.layer in band)
            if members:
                layers = tuple(sorted({t.layer for t in members}))
                groups.append(Group(f"{kind}@{_band_label(layers)}", kind, layers, members, layers[0]))
    return groups


@dataclass(frozen=True)
class Candidate:
    """A requested type applied to a group: the types its tensors really get (after the
    256-fallback), the group's exact bytes, and why it differs from the request (``note``).

    ``identical``: every tensor keeps its base bytes (llama-quantize copies a tensor that is
    already of the target type), so its KLD is exactly 0 and needs no measurement.
    ``available`` False: the type cannot be used at all here (``note`` says why)."""

    group: str
    requested: str
    types: tuple[str, ...]
    bytes: int
    note: str = ""
    identical: bool = False
    available: bool = True

    @property
    def type(self) -> str:
        """The effective type (``A/B`` if the group's tensors differ)."""
        return "/".join(dict.fromkeys(self.types))

    @property
    def fallback(self) -> bool:
        """True when some tensor does not get the requested type."""
        return any(t != self.requested for t in self.types)


def candidates_for(group: Group, types: tuple[str, ...], has_imatrix: bool = False) -> list[Candidate]:
    """One candidate per requested type, in order: llama-quantize's fallback for rows that are
    not a multiple of 256, exact bytes, and types that cannot apply marked unavailable."""
    from evalkit.formats import get_format
    from evalkit.recipes.rules import fallback_type
    out = []
    for req in types:
        eff, notes, why = [], [], ""
        for t in group.tensors:
            typ, note = fallback_type(req, t.shape[0])
            fmt = get_format(typ)
            if t.shape[0] % fmt.block_size:
                why = f"{typ} needs rows that are a multiple of {fmt.block_size}; {t.name} has {t.shape[0]}"
            elif not fmt.can_quantize:
                why = f"this build of the kernels has no {typ} quantizer"
            elif fmt.needs_imatrix and not has_imatrix and t.kind not in ("token_embd", "output"):
                why = f"{typ} needs an importance matrix (imatrix) for {t.name}"
            eff.append(typ)
            if note and note not in notes:
                notes.append(note)
        if why:
            out.append(Candidate(group.name, req, tuple(eff), 0, why, available=False))
            continue
        nbytes = sum(t.src_bytes if e == t.src_type else get_format(e).tensor_bytes(t.shape)
                     for t, e in zip(group.tensors, eff))
        identical = all(e == t.src_type for t, e in zip(group.tensors, eff))
        if identical:
            notes.append(f"already {'/'.join(dict.fromkeys(eff))} in the base: copied")
        out.append(Candidate(group.name, req, tuple(eff), nbytes, "; ".join(notes), identical))
    return out
