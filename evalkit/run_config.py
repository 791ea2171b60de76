"""`evalkit run` configuration: YAML loaded into small dataclasses, strictly.

Unknown keys are errors that name the key and list the valid ones; types are checked
when the file is loaded, so a typo never surfaces half-way through a long run.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from evalkit.devices import DeviceError, check_device_name
from evalkit.errors import EvalkitError
from evalkit.recipes.ftypes import get_ftype
from evalkit.recipes.options import CLASS_OPTIONS, TypeOptions, normalize_type

__all__ = ["plain_name", "ConfigError", "CorpusSpec", "ImatrixSpec", "VariantSpec", "RunConfig", "load_config",
           "config_from_dict", "VARIANT_KEYS", "BACKEND_KEYS", "IMATRIX_KEYS"]

# A variant's YAML keys: a recipe's --pure, overrides and per-class types (the keys are
# TypeOptions' attribute names) sit at the variant's top level.
VARIANT_KEYS = ("name", "gguf", "ftype", "imatrix", "overrides", "pure") + tuple(o.attr for o in CLASS_OPTIONS)
# How a variant is evaluated besides its exact forward (the backend lens, evalkit.backend).
BACKEND_KEYS = ("backend", "backend_threads", "ubatch", "logits")
# A variant's `imatrix: {corpus: ..., chunks: ...}`: computed from the base (evalkit imatrix), not a file.
IMATRIX_KEYS = ("corpus", "chunks", "ctx")


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
class ImatrixSpec:
    """An importance matrix computed from the base over ``corpus`` (a text file or a bundled
    name), ``chunks`` chunks of ``ctx`` tokens (None: every chunk), as llama-imatrix would."""

    corpus: str
    chunks: int | None = None
    ctx: int = 512

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with the YAML keys."""
        return {"corpus": self.corpus, "chunks": self.chunks, "ctx": self.ctx}


@dataclass
class VariantSpec:
    """One quantized model to score: an existing GGUF, or a recipe quantized on the fly.

    ``ftype`` is stored canonical (``iq4_k`` → ``IQ4_K``); ``options`` holds the recipe's
    --pure, overrides and per-class types, validated and canonical.
    """

    name: str
    gguf: str | None = None
    ftype: str | None = None
    imatrix: str | ImatrixSpec | None = None     # a file, or one computed from the base
    options: TypeOptions = field(default_factory=TypeOptions)
    backend: str = "exact"              # evalkit.backend.BACKENDS: exact, ik-cpu, ik-cpu-avx2
    backend_threads: int | None = None  # the emulated backend's thread count (None: physical cores)
    ubatch: int = 512                   # the emulated backend's ubatch (llama-perplexity's -ub)
    logits: str | None = None           # llama-perplexity --kl-divergence-base file of this variant's model

    def __post_init__(self) -> None:
        """Canonical ftype name (ValueError if unknown), so equal recipes look equal."""
        if self.ftype:
            self.ftype = get_ftype(self.ftype).name

    def type_options(self) -> TypeOptions:
        """The recipe's options, as ``quantize_model(..., options=...)`` takes them."""
        return self.options

    def recipe_key(self) -> dict[str, Any]:
        """The recipe as plain JSON data (for a fingerprint): ftype, pure, overrides as
        [regex, TYPE] pairs and the per-class types that are set, all canonical."""
        o = self.options
        return {"ftype": self.ftype, "pure": o.pure, "overrides": [[r, t] for r, t in o.overrides],
                **o.class_types()}

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with the YAML keys (every per-class key, None when unset; the backend
        keys only for a variant that uses the backend lens, so exact-only configs read as before)."""
        o = self.options
        imatrix = self.imatrix.to_dict() if isinstance(self.imatrix, ImatrixSpec) else self.imatrix
        lens = {"backend": self.backend, "backend_threads": self.backend_threads, "ubatch": self.ubatch,
                "logits": self.logits} if self.backend != "exact" or self.logits else {}
        return {"name": self.name, "gguf": self.gguf, "ftype": self.ftype, "imatrix": imatrix,
                "overrides": [f"{r}={t}" for r, t in o.overrides], "pure": o.pure,
                **{c.attr: getattr(o, c.attr) for c in CLASS_OPTIONS}, **lens}


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
    device: str = "cpu"              # where the forward pass runs (evalkit.devices): cpu, cpu-torch, cuda[:N]
    output_dir: str = "results"
    base_logits: str | None = None   # score against a llama-perplexity base-logits file
    write_base_logits: str | None = None  # write our base pass as such a file
    base_cache: str | None = None    # the base's final hidden states: written by the first run, read by later ones
    resident: str = "all"            # "all" models loaded together, or "one" at a time (needs base_cache/base_logits)
    order: str = "model"             # "model" (whole models per group of chunks) or "layer" (evaluation.layer_major_run)
    spill_dir: str | None = None     # order: layer: where hidden states spill (default <run>/hidden-states)
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

    def resolve_own(self, p: str | None) -> str | None:
        """A path the run may create (base_cache, spill_dir): always relative to the config's
        folder, never the current directory's file of the same name (which may be another run's)."""
        if p is None:
            return None
        pp = Path(p).expanduser()
        return str(pp if pp.is_absolute() else Path(self.config_dir) / pp)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for results.json)."""
        d = {k: getattr(self, k) for k in _fields(RunConfig)}
        d["corpus"] = dataclasses.asdict(self.corpus)
        d["variants"] = [v.to_dict() for v in self.variants]
        return d


# Names become file and folder names (<output_dir>/<name>/, models/<variant>.gguf): plain
# ones only, so that no name can reach outside the run folder or hide as a dot-file.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")


def plain_name(name: str, where: str) -> str:
    """``name`` if it is plain (letters, digits, ``._-+``, no leading dot, ≤ 128 characters),
    else ConfigError naming ``where``."""
    if not _PLAIN_NAME.fullmatch(name):
        raise ConfigError(f"{where}: {name!r} is not a plain name: use letters, digits and '._-+' "
                          "(no '/', no '..', no leading dot, at most 128 characters)")
    return name


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "config_dir"]


def _check_keys(data: dict, valid: Sequence[str], where: str) -> None:
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
    _check_keys(value, _fields(CorpusSpec), f"{where} corpus")
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


def _backend_keys(v: dict, w: str) -> dict[str, Any]:
    """A variant's backend, backend_threads, ubatch and logits keys, checked."""
    from evalkit.backend.rules import BACKENDS, EMULATED
    backend = _expect(v.get("backend", "exact"), str, w, "backend")
    if backend not in BACKENDS:
        raise ConfigError(f"{w}: unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    for k in ("backend_threads", "ubatch"):
        if _expect(v.get(k), int, w, k) is not None:
            if v[k] < 1:
                raise ConfigError(f"{w}: {k!r} must be a positive integer, got {v[k]}")
            if backend not in EMULATED:
                raise ConfigError(f"{w}: {k!r} applies to an emulated backend ({', '.join(EMULATED)}), "
                                  f"not to backend {backend!r}")
    out = {"backend": backend, "logits": _expect(v.get("logits"), str, w, "logits")}
    out.update({k: v[k] for k in ("backend_threads", "ubatch") if v.get(k) is not None})
    return out


def _imatrix(value, where: str) -> str | ImatrixSpec | None:
    """A variant's ``imatrix``: a file path, or a mapping {corpus, chunks, ctx} to compute one."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'imatrix' must be a file path or a mapping with keys "
                          f"{', '.join(IMATRIX_KEYS)}, got {value!r}")
    _check_keys(value, IMATRIX_KEYS, f"{where} imatrix")
    corpus = value.get("corpus")
    if not isinstance(corpus, str) or not corpus.strip():
        raise ConfigError(f"{where} imatrix: 'corpus' (a text file or a bundled corpus name) is required")
    for k in ("chunks", "ctx"):
        _expect(value.get(k), int, f"{where} imatrix", k)
    if value.get("chunks") is not None and value["chunks"] < 1:
        raise ConfigError(f"{where} imatrix: 'chunks' must be positive, got {value['chunks']}")
    # llama-imatrix ignores matrix multiplications of fewer than 16 tokens: nothing would be collected
    if value.get("ctx") is not None and value["ctx"] < 16:
        raise ConfigError(f"{where} imatrix: 'ctx' must be at least 16, got {value['ctx']}")
    return ImatrixSpec(corpus, value.get("chunks"), value.get("ctx") or 512)


def _variant(value, i: int, where: str) -> VariantSpec:
    w = f"{where} variants[{i}]"
    if not isinstance(value, dict):
        raise ConfigError(f"{w}: must be a mapping, got {value!r}")
    _check_keys(value, VARIANT_KEYS + BACKEND_KEYS, w)
    v = dict(value)
    if "name" not in v:
        v["name"] = v.get("ftype") or (Path(v["gguf"]).stem if v.get("gguf") else None)
    if not v.get("name"):
        raise ConfigError(f"{w}: needs a 'name' (or an 'ftype' / 'gguf' to derive it from)")
    name = plain_name(str(v["name"]), f"{w} 'name'")
    overrides = _overrides(v.get("overrides"), w)
    class_keys = tuple(o.attr for o in CLASS_OPTIONS)
    for k in ("gguf", "ftype") + class_keys:
        _expect(v.get(k), str, w, k)
    imatrix = _imatrix(v.get("imatrix"), f"{w} ({name})")
    _expect(v.get("pure", False), bool, w, "pure")
    if bool(v.get("gguf")) == bool(v.get("ftype")):
        raise ConfigError(f"{w} ({name}): give exactly one of 'gguf' (an existing file) or 'ftype' "
                          f"(a recipe quantized on the fly)")
    if v.get("gguf") and (v.get("imatrix") or overrides or v.get("pure") or any(v.get(k) for k in class_keys)):
        raise ConfigError(f"{w} ({name}): 'imatrix', 'overrides', 'pure' and per-tensor types apply to "
                          f"an 'ftype' recipe, not to an existing 'gguf'")
    backend = _backend_keys(v, f"{w} ({name})")
    try:
        # resolved once here: names canonical, so that iq4_k and IQ4_K are the same recipe
        types = {k: normalize_type(v[k], repr(k)) for k in class_keys if v.get(k)}
        options = TypeOptions(pure=bool(v.get("pure")), overrides=overrides, **types)
        return VariantSpec(name, v.get("gguf"), v.get("ftype"), imatrix, options, **backend)
    except ValueError as e:
        raise ConfigError(f"{w} ({name}): {e}") from None


RESIDENT_MODES = ("all", "one")


def _check_base_side(d: dict, source: str) -> None:
    """``base_cache`` and ``base_logits`` are two sources of the base (one at most); ``resident: one``
    needs one of them, so that no model has to stay loaded beside the variants."""
    if d.get("base_cache") and d.get("base_logits"):
        raise ConfigError(f"{source}: give at most one of 'base_cache' and 'base_logits' (both are the base)")
    resident = d.get("resident", "all")
    if resident not in RESIDENT_MODES:
        raise ConfigError(f"{source}: 'resident' must be one of {', '.join(RESIDENT_MODES)}, got {resident!r}")
    if resident == "one" and not (d.get("base_cache") or d.get("base_logits")):
        raise ConfigError(f"{source}: 'resident: one' evaluates one model at a time against a stored base: "
                          "set 'base_cache' (written by the first run) or 'base_logits'")


ORDERS = ("model", "layer")


def _check_order(d: dict, source: str) -> None:
    """``order``: model or layer; layer-major runs the exact forward on the CPU over models it loads
    itself, so it takes no stored base (base_cache), no one-at-a-time mode and no emulated backend."""
    order = _expect(d.get("order", "model"), str, source, "order")
    _expect(d.get("spill_dir"), str, source, "spill_dir")
    if order not in ORDERS:
        raise ConfigError(f"{source}: 'order' must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "model" and d.get("spill_dir"):
        raise ConfigError(f"{source}: 'spill_dir' applies to 'order: layer' only")
    if order == "layer":
        lens = [v.get("name") or v.get("ftype") for v in d.get("variants") or []
                if isinstance(v, dict) and v.get("backend", "exact") != "exact"]
        clash = [k for k, bad in (("base_cache", d.get("base_cache")), ("resident: one", d.get("resident") == "one"),
                                  ("device: " + str(d.get("device")), d.get("device", "cpu") != "cpu"),
                                  (f"an emulated backend (variants {lens})", lens)) if bad]
        if clash:
            raise ConfigError(f"{source}: 'order: layer' (the exact forward on the CPU, every model one layer at a "
                              f"time) does not combine with {', '.join(clash)}")


def config_from_dict(data: Any, source: str = "<config>", config_dir: str = ".") -> RunConfig:
    """Validate a parsed YAML document into a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    _check_keys(data, _fields(RunConfig), source)
    d = dict(data)
    if "name" not in d or not isinstance(d["name"], str) or not d["name"].strip():
        raise ConfigError(f"{source}: 'name' (the run's name) is required")
    plain_name(d["name"], f"{source}: 'name'")
    if "corpus" in d:
        d["corpus"] = _corpus(d["corpus"], source)
    for k in ("ctx", "chunks", "threads", "batch"):
        _expect(d.get(k), int, source, k)
    for k in ("base", "output_dir", "base_logits", "write_base_logits", "base_cache", "resident"):
        _expect(d.get(k), str, source, k)
    _check_base_side(d, source)
    _check_order(d, source)
    if "device" in d:                # the name's form only: availability is checked when the run starts
        try:
            check_device_name(d["device"])
        except DeviceError as e:
            raise ConfigError(f"{source}: 'device': {e}") from None
    if d.get("ctx", 512) < 8:
        raise ConfigError(f"{source}: 'ctx' must be at least 8, got {d['ctx']}")
    if d.get("batch", 1) < 1:
        raise ConfigError(f"{source}: 'batch' must be positive, got {d['batch']}")
    for k in ("chunks", "threads"):
        if d.get(k) is not None and d[k] < 1:
            raise ConfigError(f"{source}: {k!r} must be positive, got {d[k]}")
    raw_variants = d.get("variants") or []
    if not isinstance(raw_variants, list):
        raise ConfigError(f"{source}: 'variants' must be a list")
    d["variants"] = [_variant(v, i, source) for i, v in enumerate(raw_variants)]
    names = [v.name for v in d["variants"]]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{source}: duplicate variant names {sorted(dup)}")
    return RunConfig(config_dir=config_dir, **d)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what PyYAML found wrong, and where."""
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else what


def load_config(path: str | Path) -> RunConfig:
    """Load and validate a run configuration file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 text (byte offset {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {_yaml_problem(e)}") from None
    return config_from_dict(data, str(path), str(path.parent))
