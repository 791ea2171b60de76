"""Split GGUF models (llama.cpp's gguf-split) read as one file.

gguf-split writes ``<prefix>-00001-of-0000N.gguf`` ... ``<prefix>-0000N-of-0000N.gguf``:
the first shard holds every metadata key, each shard some tensors, and every shard the
keys ``split.no`` (u16, 0-based), ``split.count`` (u16) and ``split.tensors.count`` (i32,
the whole model's tensors). llama.cpp loads such a model from its first shard
(llama_model_loader: the other paths are rebuilt from the prefix). :func:`attach_shards`
does the same for an open first shard, and checks more than the reference does: every
shard must exist, name the same count and total, carry its own number, and add no tensor
another shard already has, so shards of different models never mix silently.
"""
from __future__ import annotations

import dataclasses
import os
import re

from evalkit.gguf.reader import INTEGER_TYPES, GGUFError, GGUFFile

__all__ = ["SplitError", "SPLIT_NO", "SPLIT_COUNT", "SPLIT_TENSORS_COUNT", "split_path", "attach_shards"]

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS_COUNT = "split.no", "split.count", "split.tensors.count"
_SUFFIX = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


class SplitError(GGUFError):
    """A split model's shards are missing, misnamed, or do not belong together."""


def split_path(prefix: str, no: int, count: int) -> str:
    """The path of shard ``no`` (0-based) of ``count``: llama_split_path's ``%s-%05d-of-%05d.gguf``."""
    return f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf"


def _int_key(f: GGUFFile, key: str, required: bool = True) -> int | None:
    """An integer metadata value; SplitError when required and absent or not an integer."""
    if key not in f.metadata:
        if required:
            raise SplitError(f"{f.path}: split model without the metadata key {key!r}: not a gguf-split shard")
        return None
    if f.metadata_types[key][0] not in INTEGER_TYPES:
        raise SplitError(f"{f.path}: metadata key {key!r} must be an integer, got {f.metadata[key]!r}")
    return int(f.metadata[key])


def _prefix(path: str, no: int, count: int) -> str:
    """The shared prefix of a shard's path (llama_split_prefix); SplitError when the name does not fit."""
    m = _SUFFIX.search(path)
    if m is None or (int(m.group(1)), int(m.group(2))) != (no + 1, count):
        raise SplitError(f"{path}: shard {no + 1} of a split model of {count} must be named "
                         f"'<prefix>-{no + 1:05d}-of-{count:05d}.gguf' to find the other shards")
    return path[:m.start()]


def attach_shards(first: GGUFFile) -> None:
    """Make an open first shard read the whole split model (nothing happens for a plain file)."""
    count = _int_key(first, SPLIT_COUNT, required=False)
    if count is None or count <= 1:
        return
    no = _int_key(first, SPLIT_NO)
    if no != 0:
        m = _SUFFIX.search(first.path)
        hint = f" ({split_path(first.path[:m.start()], 0, count)})" if m else ""
        raise SplitError(f"{first.path}: shard {no + 1} of {count} of a split model: give the first shard{hint}, "
                         "which holds the model's metadata")
    prefix = _prefix(first.path, 0, count)
    total = _int_key(first, SPLIT_TENSORS_COUNT)
    for i in range(1, count):
        path = split_path(prefix, i, count)
        if not os.path.isfile(path):
            raise SplitError(f"{first.path}: split model of {count} shards: shard {i + 1} is missing "
                             f"(expected the file {path})")
        shard = GGUFFile(path, shards=False)
        first._shards.append(shard)            # closed with the first, even if a check below fails
        _check_shard(first, shard, i, count, total)
        for name, t in shard.tensors.items():
            if name in first.tensors:
                other = first.tensors[name].shard
                raise SplitError(f"{path}: tensor {name!r} is also in shard {other + 1} "
                                 f"({split_path(prefix, other, count)}): shards of different splits")
            first.tensors[name] = dataclasses.replace(t, shard=i)
        first._bufs.append(shard._buf)
    if len(first.tensors) != total:
        raise SplitError(f"{first.path}: {SPLIT_TENSORS_COUNT} is {total} but the {count} shards hold "
                         f"{len(first.tensors)} tensors: a shard is from another split or truncated")


def _check_shard(first: GGUFFile, shard: GGUFFile, i: int, count: int, total: int) -> None:
    """The shard must carry its own number and the first shard's count, total and architecture."""
    got = (_int_key(shard, SPLIT_NO), _int_key(shard, SPLIT_COUNT), _int_key(shard, SPLIT_TENSORS_COUNT))
    if got != (i, count, total):
        raise SplitError(f"{shard.path}: says it is shard {got[0] + 1} of {got[1]} with {got[2]} tensors in all, "
                         f"but the first shard {first.path} expects shard {i + 1} of {count} with {total}: "
                         "shards of different models or splits")
    arch = shard.metadata.get("general.architecture")
    if arch is not None and arch != first.architecture:
        raise SplitError(f"{shard.path}: architecture {arch!r} differs from the first shard's "
                         f"{first.architecture!r}: shards of different models")
