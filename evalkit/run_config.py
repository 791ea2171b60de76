"""`evalkit run` configuration: YAML loaded into small dataclasses, strictly.

Unknown keys are errors that name the key and list the valid ones; types are checked
when the file is loaded, so a typo never surfaces half-way through a long run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from evalkit.errors import EvalkitError

__all__ = ["ConfigError", "CorpusSpec", "VariantSpec", "RunConfig", "load_config", "config_from_dict"]

# Per-tensor-class type options, the same as `evalkit quantize`'s flags.
CLASS_TYPE_KEYS = ("token_embedding_type", "output_tensor_type", "attn_q_type", "attn_k_type",
                   "attn_v_type", "attn_output_type", "ffn_gate_type", "ffn_up_type", "ffn_down_type")


class ConfigError(EvalkitError, ValueError):
    """The run configuration is malformed."""


@dataclass
class CorpusSpec:
    """A local text file, the bundled WikiText-2 test split, or a `datasets` spec."""

    path: str | None = None          # local text file
    dataset: str | None = None       # e.g. "wikitext" (needs the hub)
    dataset_config: str | None = None  # e.g. "wikitext-2-raw-v1"
    split: str = "test"
    text_field: str = "text"


@dataclass
class VariantSpec:
    """One quantized model to score: an existing GGUF, or a recipe quantized on the fly."""

    name: str
    gguf: str | None = None
    ftype: str | None = None
    imatrix: str | None = None
    overrides: list[str] = field(default_factory=list)   # 'REGEX=TYPE', first match wins
    pure: bool = False
    token_embedding_type: str | None = None
    output_tensor_type: str | None = None
    attn_q_type: str | None = None
    attn_k_type: str | None = None
    attn_v_type: str | None = None
    attn_output_type: str | None = None
    ffn_gate_type: str | None = None
    ffn_up_type: str | None = None
    ffn_down_type: str | None = None

    def class_types(self) -> dict[str, str]:
        """The per-tensor-class types that are set."""
        return {k: getattr(self, k) for k in CLASS_TYPE_KEYS if getattr(self, k)}


@dataclass
class RunConfig:
    """Everything `evalkit run` needs."""

    name: str
    base: str = "smollm2"
    corpus: CorpusSpec = field(default_factory=lambda: CorpusSpec(path="wikitext-2-raw-test"))
    ctx: int = 512
    chunks: int | None = None        # None: every chunk the corpus holds
    threads: int | None = None
    batch: int = 2048                # tokens per forward call, as llama-perplexity's -b: batch // ctx chunks
    output_dir: str = "results"
    base_logits: str | None = None   # score against a llama-perplexity base-logits file
    write_base_logits: str | None = None  # write our base pass as such a file
    variants: list[VariantSpec] = field(default_factory=list)
    config_dir: str = "."            # where relative paths in the file are resolved (not a YAML key)

    def resolve(self, p: str | None) -> str | None:
        """A path from the config, relative to the config file's folder when not absolute."""
        if p is None:
            return None
        pp = Path(p).expanduser()
        if pp.is_absolute():
            return str(pp)
        cand = Path(self.config_dir) / pp
        return str(cand if cand.exists() or not pp.exists() else pp)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for results.json)."""
        d = dataclasses.asdict(self)
        d.pop("config_dir", None)
        return d


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "config_dir"]


def _check_keys(data: dict, cls, where: str) -> None:
    valid = _fields(cls)
    for key in data:
        if key not in valid:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(valid)}")


def _expect(value, types, where: str, key: str):
    if value is not None and not isinstance(value, types) or isinstance(value, bool) and bool not in (
            types if isinstance(types, tuple) else (types,)):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"{where}: {key!r} must be {names}, got {value!r}")
    return value


def _corpus(value, where: str) -> CorpusSpec:
    if isinstance(value, str):
        return CorpusSpec(path=value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'corpus' must be a file path or a mapping, got {value!r}")
    _check_keys(value, CorpusSpec, f"{where} corpus")
    spec = CorpusSpec(**value)
    if bool(spec.path) == bool(spec.dataset):
        raise ConfigError(f"{where} corpus: give exactly one of 'path' or 'dataset'")
    return spec


def _overrides(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise ConfigError(f"{where}: 'overrides' must be a list of 'REGEX=TYPE' strings or a mapping "
                      f"REGEX: TYPE, got {value!r}")


def _variant(value, i: int, where: str) -> VariantSpec:
    w = f"{where} variants[{i}]"
    if not isinstance(value, dict):
        raise ConfigError(f"{w}: must be a mapping, got {value!r}")
    _check_keys(value, VariantSpec, w)
    v = dict(value)
    if "name" not in v:
        v["name"] = v.get("ftype") or (Path(v["gguf"]).stem if v.get("gguf") else None)
    if not v.get("name"):
        raise ConfigError(f"{w}: needs a 'name' (or an 'ftype' / 'gguf' to derive it from)")
    v["name"] = str(v["name"])
    v["overrides"] = _overrides(v.get("overrides"), w)
    for k in ("gguf", "ftype", "imatrix") + CLASS_TYPE_KEYS:
        _expect(v.get(k), str, w, k)
    _expect(v.get("pure", False), bool, w, "pure")
    spec = VariantSpec(**v)
    if bool(spec.gguf) == bool(spec.ftype):
        raise ConfigError(f"{w} ({spec.name}): give exactly one of 'gguf' (an existing file) or 'ftype' "
                          f"(a recipe quantized on the fly)")
    if spec.gguf and (spec.imatrix or spec.overrides or spec.pure or spec.class_types()):
        raise ConfigError(f"{w} ({spec.name}): 'imatrix', 'overrides', 'pure' and per-tensor types apply to "
                          f"an 'ftype' recipe, not to an existing 'gguf'")
    _validate_types(spec, w)
    return spec


def _validate_types(spec: VariantSpec, where: str) -> None:
    from evalkit.formats import get_format
    try:
        for k, t in spec.class_types().items():
            get_format(t)
        for rule in spec.overrides:
            get_format(rule.rsplit("=", 1)[1])
    except ValueError as e:
        raise ConfigError(f"{where} ({spec.name}): {e}") from None
    if spec.ftype:
        from evalkit.recipes.ftypes import get_ftype
        try:
            get_ftype(spec.ftype)
        except ValueError as e:
            raise ConfigError(f"{where} ({spec.name}): {e}") from None


def config_from_dict(data: Any, source: str = "<config>", config_dir: str = ".") -> RunConfig:
    """Validate a parsed YAML document into a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    _check_keys(data, RunConfig, source)
    d = dict(data)
    if "name" not in d or not isinstance(d["name"], str) or not d["name"].strip():
        raise ConfigError(f"{source}: 'name' (the run's name) is required")
    if "corpus" in d:
        d["corpus"] = _corpus(d["corpus"], source)
    for k in ("ctx", "chunks", "threads", "batch"):
        _expect(d.get(k), int, source, k)
    for k in ("base", "output_dir", "base_logits", "write_base_logits"):
        _expect(d.get(k), str, source, k)
    if d.get("ctx", 512) < 8:
        raise ConfigError(f"{source}: 'ctx' must be at least 8, got {d['ctx']}")
    if d.get("batch", 1) < 1:
        raise ConfigError(f"{source}: 'batch' must be positive, got {d['batch']}")
    if d.get("chunks") is not None and d["chunks"] < 1:
        raise ConfigError(f"{source}: 'chunks' must be positive, got {d['chunks']}")
    raw_variants = d.get("variants") or []
    if not isinstance(raw_variants, list):
        raise ConfigError(f"{source}: 'variants' must be a list")
    d["variants"] = [_variant(v, i, source) for i, v in enumerate(raw_variants)]
    names = [v.name for v in d["variants"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{source}: duplicate variant names {sorted(dup)}")
    return RunConfig(config_dir=config_dir, **d)


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a run configuration file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    return config_from_dict(data, str(path), str(path.parent))
