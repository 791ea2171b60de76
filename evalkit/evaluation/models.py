"""The models of a run: the base and each variant, as files with their identity and size.

A variant is an existing GGUF, or a recipe (ftype + options) quantized from the base once
and cached under ``<out>/models/`` with the fingerprint of everything that shaped its bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from evalkit.errors import RunError
from evalkit.files import atomic_write_text, model_size, sha256_file, sha256_model
from evalkit.evaluation.store import fingerprint

__all__ = ["ModelEntry", "base_entry", "check_same_vocab", "prepare_variant", "vocab_of"]

RECIPE_FORMAT = 2


@dataclass
class ModelEntry:
    """A model file of the run: name, path, content hash, tensor bytes and bits per weight."""

    name: str
    path: Path
    sha256: str
    size_bytes: int
    bpw: float

    @classmethod
    def of(cls, name: str, path: Path) -> "ModelEntry":
        """Measure the file (a folder counts as float32: no GGUF tensor table to size)."""
        nbytes, bpw = model_size(path) if Path(path).is_file() else (0, 32.0)
        return cls(name, Path(path), sha256_model(path), nbytes, bpw)


def base_entry(path: Path) -> ModelEntry:
    """The base model's entry."""
    return ModelEntry.of("base", path)


def vocab_of(path: Path) -> tuple[int, list[str] | None]:
    """(n_vocab from the embedding tensor, token strings if the file carries them)."""
    from evalkit.gguf import GGUFFile
    with GGUFFile(path) as f:
        t = f.tensors.get("token_embd.weight")
        if t is None or len(t.shape) != 2:
            raise RunError(f"{path}: no 2-D token_embd.weight tensor"
                           + (f" (shape {tuple(t.shape)})" if t is not None else ""))
        return int(t.shape[1]), f.get("tokenizer.ggml.tokens")


def check_same_vocab(base: Path, variant: Path, name: str) -> None:
    """The variant must score the same token ids as the base (sizes and strings compared)."""
    nb, tb = vocab_of(base) if base.suffix == ".gguf" or base.is_file() else (None, None)
    nv, tv = vocab_of(variant)
    if nb is not None and nb != nv:
        raise RunError(f"variant {name!r} ({variant}) has a vocabulary of {nv} tokens, the base "
                       f"({base}) has {nb}: they cannot be compared token by token")
    if tb is not None and tv is not None:
        if len(tb) != len(tv):
            raise RunError(f"variant {name!r}: tokenizer has {len(tv)} tokens, the base's has {len(tb)}")
        for i, (a, b) in enumerate(zip(tb, tv)):
            if a != b:
                raise RunError(f"variant {name!r}: vocabulary differs from the base's at token id {i} "
                               f"({b!r} vs {a!r})")


def _variant_imatrix(v, base: ModelEntry, folder: Path, resolve, threads, progress) -> str | None:
    """The variant's imatrix file: the one configured, or one computed from the base over the
    configured corpus and cached in ``folder`` (``<out>/imatrix/``)."""
    if v.imatrix is None or isinstance(v.imatrix, str):
        im_path = resolve(v.imatrix) if v.imatrix else None
        if im_path and not Path(im_path).is_file():
            raise RunError(f"variant {v.name!r}: imatrix file {im_path} not found")
        return im_path
    from evalkit.imatrix_tools.run_cache import cached_imatrix
    return str(cached_imatrix(v.imatrix, v.name, base, folder, resolve, threads, progress))


def _quantized_variant(v, base: ModelEntry, models: Path, resolve, threads, progress) -> Path:
    from evalkit.recipes.model_quantizer import quantize_model
    im_path = _variant_imatrix(v, base, models.parent / "imatrix", resolve, threads, progress)
    fp = fingerprint({**v.recipe_key(), "base": base.sha256, "format": RECIPE_FORMAT,
                      "imatrix": sha256_file(im_path) if im_path else None})
    models.mkdir(parents=True, exist_ok=True)
    target, stamp = models / f"{v.name}.gguf", models / f"{v.name}.recipe.json"
    if target.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp:
        return target
    try:
        quantize_model(base.path, target, v.ftype, imatrix=im_path, options=v.type_options(),
                       threads=threads, progress=progress)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        raise RunError(f"variant {v.name!r}: cannot quantize {base.path} as {v.ftype}: {e}") from None
    atomic_write_text(stamp, json.dumps({"fingerprint": fp, "ftype": v.ftype}))
    return target


def prepare_variant(v, base: ModelEntry, out: Path, resolve, threads: int | None,
                    progress: bool) -> ModelEntry:
    """A variant spec → its model file (existing, or quantized and cached), vocabulary checked."""
    if v.gguf:
        p = Path(resolve(v.gguf))
        if not p.is_file():
            raise RunError(f"variant {v.name!r}: GGUF file {p} not found")
    else:
        p = _quantized_variant(v, base, out / "models", resolve, threads, progress)
    check_same_vocab(base.path, p, v.name)
    return ModelEntry.of(v.name, p)
