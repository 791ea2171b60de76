"""``evalkit sensitivity``'s configuration: a YAML file or command-line flags, checked strictly.

Unknown keys are errors that name the key and list the valid ones; type names are made
canonical (``iq4_k`` → ``IQ4_K``) and unknown ones refused before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.errors import EvalkitError

__all__ = ["DEFAULT_TYPES", "GROUPINGS", "SensitivityConfig", "SensitivityError", "load_sensitivity_config",
           "sensitivity_config"]

# The IQ*_K ladder plus Q8_0: rows that are not a multiple of 256 fall back to IQ4_NL / Q5_0 /
# Q6_0 / Q8_0 as llama-quantize does, so every tensor still gets a ladder of four or more types.
DEFAULT_TYPES = ("IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K", "Q8_0")
GROUPINGS = ("bands", "tensor")


class SensitivityError(EvalkitError, ValueError):
    """A sensitivity pass cannot run as configured (the message names the key or value)."""


@dataclass
class SensitivityConfig:
    """Everything a sensitivity pass needs.

    ``grouping``: ``bands`` (each tensor kind × ``bands`` contiguous bands of layers; token
    embeddings and the output projection are groups of their own) or ``tensor`` (one group per
    tensor). ``kinds`` restricts the pass to these tensor kinds (``attn_q``, ``ffn_down``,
    ``token_embd``, ...); the others keep their base bytes. ``chunks`` calibration chunks of
    ``ctx`` tokens are taken from the start of ``corpus``.
    """

    name: str = "sensitivity"
    base: str = "smollm2"
    corpus: str = "wikitext-2-raw-test"
    ctx: int = 512
    chunks: int = 8
    threads: int | None = None
    batch: int = 2048
    types: tuple[str, ...] = DEFAULT_TYPES
    imatrix: str | None = None
    grouping: str = "bands"
    bands: int = 3
    kinds: tuple[str, ...] | None = None
    output_dir: str = "results"
    config_dir: str = "."           # where relative paths are resolved (not a YAML key)

    def __post_init__(self) -> None:
        """Validate every field (SensitivityError) and make the type names canonical."""
        from evalkit.run_config import ConfigError, plain_name
        try:
            plain_name(self.name, "sensitivity 'name'")
        except ConfigError as e:
            raise SensitivityError(str(e)) from None
        for key in ("ctx", "chunks", "batch", "bands") + (("threads",) if self.threads is not None else ()):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SensitivityError(f"sensitivity: {key!r} must be a positive integer, got {v!r}")
        if self.ctx < 8:
            raise SensitivityError(f"sensitivity: 'ctx' must be at least 8, got {self.ctx}")
        if self.grouping not in GROUPINGS:
            raise SensitivityError(f"sensitivity: unknown grouping {self.grouping!r}; choose one of "
                                   f"{', '.join(GROUPINGS)}")
        self.types = canonical_types(self.types)
        if self.kinds is not None:
            if isinstance(self.kinds, str) or not all(isinstance(k, str) and k for k in self.kinds):
                raise SensitivityError(f"sensitivity: 'kinds' must be a list of tensor kinds, got {self.kinds!r}")
            self.kinds = tuple(self.kinds)

    def resolve(self, p: str | None) -> str | None:
        """A path of the configuration, relative to its file's folder when not absolute
        (bundled corpus names and 'smollm2' pass through)."""
        if p is None or p in ("smollm2", "wikitext-2-raw-test"):
            return p
        pp = Path(p).expanduser()
        if pp.is_absolute():
            return str(pp)
        cand = Path(self.config_dir) / pp
        return str(cand if cand.exists() or not pp.exists() else pp)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for sensitivity.json and the fingerprint)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config_dir"}
        d["types"] = list(self.types)
        d["kinds"] = list(self.kinds) if self.kinds is not None else None
        return d

    @property
    def out_dir(self) -> Path:
        """``<output_dir>/<name>``."""
        return Path(self.resolve(self.output_dir)) / self.name


def canonical_types(types) -> tuple[str, ...]:
    """Canonical, de-duplicated candidate type names (order kept); SensitivityError names an
    unknown one."""
    from evalkit.recipes.options import RuleError, normalize_type
    if isinstance(types, str) or not types:
        raise SensitivityError(f"sensitivity: 'types' must be a non-empty list of type names, got {types!r}")
    out: list[str] = []
    for t in types:
        try:
            name = normalize_type(str(t), "sensitivity 'types'")
        except RuleError as e:
            raise SensitivityError(str(e)) from None
        if name in ("F32", "F16", "BF16"):
            raise SensitivityError(f"sensitivity 'types': {name} is not a quantized type")
        if name not in out:
            out.append(name)
    return tuple(out)


_KEYS = tuple(f.name for f in dataclasses.fields(SensitivityConfig) if f.name != "config_dir")


def sensitivity_config(data: Any, source: str = "<config>", config_dir: str = ".") -> SensitivityConfig:
    """Validate a parsed YAML document (a mapping of the keys above) into a SensitivityConfig."""
    if not isinstance(data, dict):
        raise SensitivityError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            raise SensitivityError(f"{source}: unknown key {key!r}; valid keys: {', '.join(_KEYS)}")
    for key in ("name", "base", "corpus", "imatrix", "grouping", "output_dir"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise SensitivityError(f"{source}: {key!r} must be a string, got {data[key]!r}")
    d = {k: v for k, v in data.items() if v is not None or k in ("threads", "imatrix", "kinds")}
    for key in ("types", "kinds"):
        if d.get(key) is not None and not isinstance(d[key], list):
            raise SensitivityError(f"{source}: {key!r} must be a list, got {d[key]!r}")
    try:
        return SensitivityConfig(config_dir=config_dir, **d)
    except SensitivityError as e:
        raise SensitivityError(f"{source}: {e}") from None


def load_sensitivity_config(path: str | Path) -> SensitivityConfig:
    """Load and validate a sensitivity configuration file (YAML)."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SensitivityError(f"{path}: cannot read config: {e.strerror or e}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise SensitivityError(f"{path}: malformed config: {' '.join(str(e).split())}") from None
    return sensitivity_config(data, str(path), str(path.parent))

