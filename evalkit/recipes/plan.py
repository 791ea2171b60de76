"""The per-tensor quantization plan: what each tensor becomes, why, and with which imatrix entry.

:func:`build_plan` does every check that can fail before a byte is written (types, row
widths, override rules, imatrix names and lengths), so a run either fails up front with
a clear message or writes the whole file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFValueType

from evalkit.errors import EvalkitError
from evalkit.formats import get_format
from evalkit.recipes.ftypes import FType, get_ftype
from evalkit.recipes.options import CLASS_OPTIONS, RuleError, TypeOptions
from evalkit.recipes.rules import IGNORED_CLASS_OPTIONS, ModelFacts, assign_types

__all__ = ["TensorPlan", "QuantPlan", "build_plan", "check_model_metadata", "find_imatrix_entry",
           "output_metadata", "kernel_gaps", "check_kernels", "KernelGapError", "GGML_QNT_VERSION"]

GGML_QNT_VERSION = 2
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_MiB = 1024.0 * 1024.0


class KernelGapError(EvalkitError, NotImplementedError):
    """The plan needs a kernel evalkit does not have: a read-only (dequantize-only) target type
    such as IQ4_XS or Q8_KV, or a quantizer/dequantizer missing from this build. The message
    names each type and the tensors that need it."""


@dataclass
class TensorPlan:
    """One tensor: source → target type, whether it is requantized, sizes, imatrix entry used."""

    index: int
    name: str
    shape: tuple[int, ...]           # ggml order, ne0 (row length) first
    src_type: str
    dst_type: str
    quantize: bool                   # False: source bytes copied unchanged
    reason: str
    src_bytes: int
    dst_bytes: int
    imatrix_name: str | None = None  # imatrix entry used (may differ from name: fallbacks)

    @property
    def n_elements(self) -> int:
        """Number of weights."""
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def action(self) -> str:
        """'quantize' or 'copy'."""
        return "quantize" if self.quantize else "copy"


@dataclass
class QuantPlan:
    """The whole model's plan plus the metadata that will be written."""

    source: str
    output: str | None
    ftype: FType
    model: ModelFacts
    options: TypeOptions
    tensors: list[TensorPlan]
    metadata: dict[str, Any]
    metadata_types: dict[str, tuple[int, int | None]]
    imatrix_path: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def src_bytes(self) -> int:
        """Total tensor bytes of the source."""
        return sum(t.src_bytes for t in self.tensors)

    @property
    def dst_bytes(self) -> int:
        """Total tensor bytes of the output."""
        return sum(t.dst_bytes for t in self.tensors)

    @property
    def n_elements(self) -> int:
        """Total number of weights."""
        return sum(t.n_elements for t in self.tensors)

    def types(self) -> dict[str, str]:
        """{tensor name: output type}."""
        return {t.name: t.dst_type for t in self.tensors}

    def tensor(self, name: str) -> TensorPlan:
        """The plan of one tensor (KeyError if absent)."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"no tensor named {name!r} in the plan")

    def table(self) -> str:
        """The plan as a fixed-width text table (what --dry-run prints)."""
        rows = []
        wn = max([len(t.name) for t in self.tensors] + [6])
        shapes = ["×".join(str(d) for d in t.shape) for t in self.tensors]
        ws = max([len(s) for s in shapes] + [5])
        head = (f"{'#':>4s}  {'tensor':<{wn}s}  {'shape':<{ws}s}  {'source':<7s}  {'target':<7s}  "
                f"{'action':<8s}  {'MiB in':>8s}  {'MiB out':>8s}  reason")
        rows.append(head)
        rows.append("-" * len(head))
        for t, s in zip(self.tensors, shapes):
            note = t.reason + (f" [imatrix: {t.imatrix_name}]" if t.imatrix_name and t.imatrix_name != t.name
                               else "")
            rows.append(f"{t.index:4d}  {t.name:<{wn}s}  {s:<{ws}s}  {t.src_type:<7s}  {t.dst_type:<7s}  "
                        f"{t.action:<8s}  {t.src_bytes / _MiB:8.3f}  {t.dst_bytes / _MiB:8.3f}  {note}")
        n_q = sum(t.quantize for t in self.tensors)
        n = max(1, self.n_elements)
        rows.append("-" * len(head))
        rows.append(f"ftype {self.ftype.name} (general.file_type {self.ftype.id}); {len(self.tensors)} tensors, "
                    f"{n_q} quantized, {len(self.tensors) - n_q} copied; "
                    f"{self.src_bytes / _MiB:.2f} MiB → {self.dst_bytes / _MiB:.2f} MiB "
                    f"({8 * self.src_bytes / n:.3f} → {8 * self.dst_bytes / n:.3f} bpw)")
        m = self.model
        rows.append(f"model: arch {m.arch}, {m.n_layer} layers, n_embd {m.n_embd}, n_gqa {m.n_gqa}, "
                    f"n_expert {m.n_expert}, n_vocab {m.n_vocab}, "
                    f"{'own output.weight' if m.has_output else 'tied embeddings'}"
                    + (f", size {m.size_label}" if m.size_label else ""))
        if self.imatrix_path:
            rows.append(f"imatrix: {self.imatrix_path}")
        for w in self.warnings:
            rows.append(f"warning: {w}")
        return "\n".join(rows)


def find_imatrix_entry(name: str, data: dict[str, Any]) -> str | None:
    """The imatrix entry the reference uses for tensor ``name`` (with its name fallbacks), or None."""
    if name in data:
        return name
    cands: list[str] = []
    p1, p2 = name.find("ffn_up_exps.weight"), name.find("ffn_gate_exps.weight")
    if p1 >= 0 or p2 >= 0:
        # merged gate+up experts, else the up experts (they see the same activations)
        p = p1 if p1 >= 0 else p2
        cands = [name[:p] + "ffn_gate_up_exps.weight", name[:p] + "ffn_up_exps.weight"]
    elif (p := name.find("ffn_gate_up_exps.weight")) >= 0:
        cands = [name[:p] + "ffn_up_exps.weight"]
    elif (p := name.find("ffn_gate.weight")) >= 0:
        cands = [name[:p] + "ffn_up.weight"]
    else:
        # MLA: attn_v_b and attn_kv_b see the same activations
        alts = (".attn_v_b.weight", ".attn_kv_b.weight")
        for j, a in enumerate(alts):
            if (p := name.find(a)) >= 0:
                cands = [name[:p] + alts[(j + 1) % 2]]
                break
    for c in cands:
        if c in data:
            return c
    return None


def _truncate127(s: str) -> str:
    # the reference strncpy's the value into a 128-byte buffer
    return s.encode("utf-8")[:127].decode("utf-8", errors="ignore")


def output_metadata(metadata: dict[str, Any], metadata_types: dict[str, tuple[int, int | None]],
                    ftype: FType, imatrix: Any = None, imatrix_label: str | None = None
                    ) -> tuple[dict[str, Any], dict[str, tuple[int, int | None]]]:
    """The output file's metadata, as the reference writes it.

    Source keys in order; ``general.quantization_version`` set; split keys removed; the
    ``quantize.imatrix.*`` keys when an imatrix is used; ``general.file_type`` set last
    (existing keys keep their position, new ones are appended).
    """
    meta = dict(metadata)
    types = dict(metadata_types)

    def put(key: str, value: Any, vtype: int) -> None:
        meta[key] = value
        types[key] = (int(vtype), None)

    put("general.quantization_version", GGML_QNT_VERSION, GGUFValueType.UINT32)
    for k in _SPLIT_KEYS:
        meta.pop(k, None)
        types.pop(k, None)
    if imatrix is not None and len(imatrix.data):
        put("quantize.imatrix.file", _truncate127(imatrix_label or imatrix.path or ""), GGUFValueType.STRING)
        if imatrix.dataset:
            put("quantize.imatrix.dataset", _truncate127(imatrix.dataset), GGUFValueType.STRING)
        put("quantize.imatrix.entries_count", len(imatrix.data), GGUFValueType.INT32)
        if imatrix.chunks > 0:
            put("quantize.imatrix.chunks_count", int(imatrix.chunks), GGUFValueType.INT32)
    put("general.file_type", ftype.id, GGUFValueType.UINT32)
    return meta, types


def _option_warnings(ft: FType, opts: TypeOptions) -> list[str]:
    """The options the reference silently ignores for this ftype / --pure, as warnings."""
    warnings: list[str] = []
    if opts.overrides and not opts.pure and ft.is_float:
        warnings.append(f"--override rules are ignored for the float ftype {ft.name} (as in the reference)")
    if opts.pure and opts.overrides:
        warnings.append("--override rules are ignored with --pure (as in the reference)")
    # the layer-tensor options act inside the mix rules only (their exact-name re-application
    # never matches blk.N.* names), so --pure and the float ftypes ignore them
    ignored = [o.flag for o in CLASS_OPTIONS if o.layer and getattr(opts, o.attr)]
    if ignored and (opts.pure or ft.is_float):
        warnings.append(f"{', '.join(ignored)} ignored with {'--pure' if opts.pure else 'ftype ' + ft.name} "
                        "(as in the reference)")
    elif not opts.pure:
        own_branch = IGNORED_CLASS_OPTIONS.get(ft.name, ())
        ignored = [o.flag for o in CLASS_OPTIONS if o.attr in own_branch and getattr(opts, o.attr)]
        if ignored:
            warnings.append(f"{', '.join(ignored)} ignored with ftype {ft.name} (as in the reference: its own "
                            "branch of the mix rules does not look at them; use --override instead)")
    return warnings


# the {arch}.* integer keys the type rules read (llm_load_hparams' view), and those that may be per-layer arrays
_RULE_INT_KEYS = ("block_count", "attention.head_count", "attention.head_count_kv", "expert_count",
                  "vocab_size", "embedding_length")
_PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv")


def check_model_metadata(metadata: dict[str, Any], names: list[str], path: str) -> None:
    """The hyper-parameters the type rules read must be well-typed and match the tensors.

    As llama_model_loader's ``get_key``: a value of the wrong type is an error; counts are
    non-negative integers; ``{arch}.block_count`` must be the number of ``blk.N`` layers
    present (llama-quantize's loader fails on missing layer tensors or extra ones).
    """
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise RuleError(f"{path}: metadata key general.architecture must be a string, got {arch!r}"
                        if arch is not None else f"{path}: required metadata key general.architecture is missing")
    for name in _RULE_INT_KEYS:
        key = f"{arch}.{name}"
        if key not in metadata:
            continue
        value = metadata[key]
        values = value if isinstance(value, list) and name in _PER_LAYER_KEYS else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise RuleError(f"{path}: metadata key {key} must be a non-negative integer"
                                f"{' or an array of them' if name in _PER_LAYER_KEYS else ''}, "
                                f"got {repr(value)[:60]}")
    key = f"{arch}.block_count"
    layers = {n.split(".")[1] for n in names if n.startswith("blk.")}
    if key not in metadata and layers:
        raise RuleError(f"{path}: required metadata key {key} is missing ({len(layers)} layers of tensors present)")
    if key in metadata and metadata[key] != len(layers):
        raise RuleError(f"{path}: metadata key {key} declares {metadata[key]} layers but the file has "
                        f"tensors for {len(layers)} (blk.N names)")


def build_plan(source: Any, ftype: FType | str, options: TypeOptions, imatrix: Any = None,
               imatrix_label: str | None = None, output: str | None = None) -> QuantPlan:
    """Decide every tensor of ``source`` and validate the imatrix against them.

    ``source`` is a :class:`~evalkit.sources.TensorSource` (only its ``path``, ``metadata``,
    ``metadata_types`` and ``tensors`` are read). Raises RuleError / NotImplementedError
    before anything is written.
    """
    ft = get_ftype(ftype)
    infos = list(source.tensors)
    names = [t.name for t in infos]
    check_model_metadata(source.metadata, names, str(source.path))
    model = ModelFacts.from_metadata(source.metadata, names)
    has_im = imatrix is not None and len(imatrix.data) > 0
    if has_im:
        for k, v in imatrix.data.items():
            if not np.isfinite(v).all():
                raise RuleError(f"imatrix entry {k!r} contains non-finite values")
    opts = options.with_imatrix(has_im)
    warnings = _option_warnings(ft, opts)
    decisions = assign_types(((t.name, t.shape, t.type_name) for t in infos), ft, model, opts)

    plans: list[TensorPlan] = []
    missing: list[str] = []
    matched = 0
    for i, (info, d) in enumerate(zip(infos, decisions)):
        dst_bytes = get_format(d.type_name).tensor_bytes(info.shape) if d.quantize else info.nbytes
        tp = TensorPlan(i + 1, info.name, tuple(int(x) for x in info.shape), info.type_name, d.type_name,
                        d.quantize, d.reason, info.nbytes, dst_bytes)
        if d.quantize and has_im:
            entry = find_imatrix_entry(info.name, imatrix.data)
            if entry is None:
                missing.append(info.name)
            else:
                ne2 = int(info.shape[2]) if len(info.shape) > 2 else 1
                want = int(info.shape[0]) * ne2
                got = len(imatrix.data[entry])
                if got != want:
                    if info.name != "token_embd.weight":
                        raise RuleError(
                            f"imatrix entry {entry!r} has {got} values but tensor {info.name!r} "
                            f"(shape {'×'.join(map(str, info.shape))}) needs {want}: the imatrix "
                            "does not belong to this model")
                    warnings.append(f"imatrix entry {entry!r} has {got} values, token_embd.weight needs "
                                    f"{want}: ignored")
                else:
                    tp.imatrix_name = entry
                    matched += 1
        fmt = get_format(d.type_name)
        if (d.quantize and fmt.needs_imatrix and tp.imatrix_name is None
                and info.name not in ("token_embd.weight", "output.weight")):
            raise RuleError(f"tensor {info.name!r}: {fmt.name} is a very low-bit type and needs an "
                            "importance matrix entry for it (--imatrix); only token_embd.weight and "
                            "output.weight may go without one")
        plans.append(tp)
    if has_im and missing:
        if matched == 0:
            raise RuleError(
                f"imatrix {getattr(imatrix, 'path', '') or ''} has no entry for any tensor of this model: "
                f"missing e.g. {', '.join(repr(m) for m in missing[:3])}; it holds e.g. "
                f"{', '.join(repr(k) for k in list(imatrix.data)[:3])}")
        warnings.append(f"no imatrix entry for {len(missing)} quantized tensor(s), quantized without: "
                        + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
    meta, types = output_metadata(source.metadata, source.metadata_types, ft,
                                  imatrix if has_im else None, imatrix_label)
    return QuantPlan(str(source.path), None if output is None else str(output), ft, model, opts, plans,
                     meta, types, (imatrix_label or getattr(imatrix, "path", None)) if has_im else None,
                     warnings)


def kernel_gaps(plan: QuantPlan) -> list[str]:
    """What the compiled kernels lack to carry out ``plan`` (empty when everything is there):
    one line per missing kernel, naming the type and the tensors that need it."""
    gaps: dict[str, list[str]] = {}
    for t in plan.tensors:
        if not t.quantize:
            continue
        if t.src_type != "F32" and not get_format(t.src_type).can_dequantize:
            gaps.setdefault(f"no dequantizer for {t.src_type} in this build", []).append(t.name)
        fmt = get_format(t.dst_type)
        if not fmt.quantizable:
            # by design, not a build problem: evalkit only reads these from published files
            gaps.setdefault(f"{t.dst_type} is read-only in evalkit (dequantize-only, no quantizer); "
                            "choose another type", []).append(t.name)
        elif not fmt.can_quantize:
            gaps.setdefault(f"no quantizer for {t.dst_type} in this build", []).append(t.name)
    return [f"{k}: needed by {', '.join(v[:3])}{f' and {len(v) - 3} more' if len(v) > 3 else ''}"
            for k, v in gaps.items()]


def check_kernels(plan: QuantPlan) -> None:
    """KernelGapError naming every type and tensor ``plan`` needs a missing kernel for."""
    gaps = kernel_gaps(plan)
    if gaps:
        raise KernelGapError(f"{plan.source}: cannot quantize: " + "; ".join(gaps))
