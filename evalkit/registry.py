"""Lookups in evalkit's small registries (quantization types, ftypes): by name or by id."""
from __future__ import annotations

from typing import Mapping, TypeVar

__all__ = ["lookup"]

T = TypeVar("T")


def lookup(key: str | int, by_name: Mapping[str, T], by_id: Mapping[int, T], noun: str, id_noun: str,
           aliases: Mapping[str, str] | None = None) -> T:
    """The entry named ``key`` (case-insensitive, ``aliases`` first; a decimal string is an id)
    or numbered ``key``. TypeError for a bool or another type; ValueError listing the known
    entries for an unknown one (``noun``: "quantization type", ``id_noun``: "ggml type id")."""
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        shown = repr(key) if isinstance(key, bool) else type(key).__name__
        raise TypeError(f"{noun} must be a name or an id, got {shown}")
    if isinstance(key, int):
        entry = by_id.get(key)
        if entry is None:
            raise ValueError(f"unknown {id_noun} {key}; known: "
                             + ", ".join(f"{name}={i}" for i, name in _ids(by_id, by_name)))
        return entry
    name = key.strip().upper()
    name = (aliases or {}).get(name, name)
    entry = by_name.get(name)
    if entry is None and name.isdigit():
        entry = by_id.get(int(name))
    if entry is None:
        raise ValueError(f"unknown {noun} {key!r}; known: {', '.join(by_name)}")
    return entry


def _ids(by_id: Mapping[int, T], by_name: Mapping[str, T]) -> list[tuple[int, str]]:
    names = {id(v): k for k, v in by_name.items()}
    return [(i, names.get(id(v), "?")) for i, v in by_id.items()]
