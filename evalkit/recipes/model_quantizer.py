"""Quantize a whole model, tensor by tensor, exactly as ik_llama.cpp's ``llama-quantize``.

The source (a GGUF file, or a HuggingFace checkpoint directory: :func:`evalkit.sources.open_source`)
is memory-mapped; each tensor is dequantized to float32 (exactly, with the reference's
``to_float``), quantized by the C kernels and streamed to the output, so peak memory is a
few tensors. Tensors whose type does not change are copied byte for byte. The output
appears atomically (temp file + rename); any failure leaves no output file.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.errors import EvalkitError, InputError
from evalkit.formats import get_format
from evalkit.recipes.ftypes import FType, get_ftype
from evalkit.recipes.options import TypeOptions
from evalkit.recipes.plan import QuantPlan, TensorPlan, build_plan, check_kernels
from evalkit.sources import TensorSource, open_source

__all__ = ["quantize_tensor", "quantize_model", "load_imatrix_arg", "check_finite_rows", "NonFiniteWeightError"]

# elements looked at per step when searching for NaN/Inf: bounds the temporary mask's memory
_CHECK_ELEMENTS = 1 << 22


class NonFiniteWeightError(EvalkitError, ValueError):
    """A float tensor holds NaN or ±Inf (the message names the tensor, row and column)."""


def _nonfinite_mask(rows: np.ndarray, type_name: str) -> np.ndarray:
    """True where a float element (F32, F16, BF16, as stored or as float32) is NaN or ±Inf."""
    if rows.dtype == np.uint8:
        if type_name == "BF16":
            bits = rows.view(np.uint16)
            return (bits & 0x7F80) == 0x7F80          # exponent all ones: Inf or NaN
        rows = rows.view(np.float16 if type_name == "F16" else np.float32)
    return ~np.isfinite(rows)


def check_finite_rows(rows: np.ndarray, type_name: str, tensor: str, source: str) -> None:
    """Raise NonFiniteWeightError at the first NaN/Inf of ``rows`` (float32 rows, or the raw
    bytes of an F32/F16/BF16 tensor); ggml_validate_row_data rejects such rows too."""
    step = max(1, _CHECK_ELEMENTS // max(1, rows.shape[1]))
    for r0 in range(0, rows.shape[0], step):
        bad = _nonfinite_mask(rows[r0:r0 + step], type_name)
        if bad.any():
            r, c = (int(v) for v in np.argwhere(bad)[0])
            x = rows[r0 + r:r0 + r + 1]
            value = (_as_float32(x, type_name)[0, c]) if x.dtype == np.uint8 else x[0, c]
            raise NonFiniteWeightError(f"{source}: tensor {tensor!r} ({type_name}) holds a non-finite weight "
                                       f"{value} at row {r0 + r}, column {c}: refusing to write it")


def _as_float32(raw: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(np.float16 if type_name == "F16" else np.float32).astype(np.float32)


def quantize_tensor(source: TensorSource, tp: TensorPlan, imatrix: np.ndarray | None = None,
                    threads: int | None = None) -> np.ndarray:
    """The output bytes of one planned tensor, uint8 (rows, row_bytes).

    Copies the source bytes when the plan says so; otherwise dequantizes to float32 and
    quantizes, with the imatrix vector split per expert for 3-D tensors.
    """
    from evalkit.codec import quantize

    if not tp.quantize:
        raw = source.raw(tp.name)
        if tp.src_type in ("F32", "F16", "BF16"):
            check_finite_rows(raw, tp.src_type, tp.name, source.path)
        return raw
    x = source.rows_f32(tp.name, threads)
    # every float row is checked here, before any kernel, so the error names the tensor
    check_finite_rows(x, tp.src_type, tp.name, source.path)
    if tp.dst_type == "F32":
        # ggml's F32 "quantization" is a copy: skip the kernel and a second buffer
        return np.ascontiguousarray(x).view(np.uint8)
    ne0 = tp.shape[0]
    ne1 = tp.shape[1] if len(tp.shape) > 1 else 1
    nslices = x.shape[0] // ne1
    if imatrix is None or nslices == 1:
        return quantize(x, tp.dst_type, imatrix=imatrix, threads=threads)
    # experts: each ne0×ne1 matrix has its own slice of the imatrix
    fmt = get_format(tp.dst_type)
    out = np.empty((x.shape[0], fmt.row_bytes(ne0)), dtype=np.uint8)
    for e in range(nslices):
        vec = imatrix[e * ne0:(e + 1) * ne0]
        if vec.shape[0] != ne0:
            from evalkit.imatrix import ImatrixError
            raise ImatrixError(f"tensor {tp.name!r}: the imatrix has {imatrix.shape[0]} values, no slice of "
                               f"{ne0} for matrix {e} of {nslices}")
        out[e * ne1:(e + 1) * ne1] = quantize(x[e * ne1:(e + 1) * ne1], tp.dst_type, imatrix=vec,
                                              threads=threads)
    return out


def load_imatrix_arg(imatrix: Any) -> tuple[Any, str | None]:
    """(Imatrix or None, label for quantize.imatrix.file) from a path, an Imatrix or None."""
    if imatrix is None:
        return None, None
    if isinstance(imatrix, (str, os.PathLike)):
        from evalkit.imatrix import load_imatrix

        return load_imatrix(imatrix), str(imatrix)
    if not hasattr(imatrix, "data"):
        raise TypeError(f"imatrix must be a path or an evalkit.imatrix.Imatrix, got {type(imatrix).__name__}")
    return imatrix, getattr(imatrix, "path", None) or ""


def _check_output_path(out: str | Path) -> None:
    """An existing output must be a regular file: the atomic rename would replace a FIFO or a
    device node, and fail on a directory only after all the work."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise InputError(f"{out}: cannot use as the output: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise InputError(f"{out}: the output path exists and is {kind}; give a file path")


def quantize_model(src: str | Path | TensorSource, out: str | Path | None, ftype: str | int | FType,
                   imatrix: Any = None, options: TypeOptions | None = None, threads: int | None = None,
                   dry_run: bool = False, progress: bool = True) -> QuantPlan:
    """Quantize model ``src`` (GGUF path, HF checkpoint directory, or an opened source) to ``out``.

    ``ftype`` is an ftype name/id (IQ4_K, Q4_K_M, 140, ...); ``imatrix`` a path or an
    Imatrix; ``options`` the reference's --pure / --custom-q / per-class type options
    (None: none of them). With ``dry_run`` nothing is written. Returns the plan (types,
    sizes, reasons). Errors (bad input, imatrix mismatch, missing kernels) are raised
    before the output file is created.
    """
    ft = get_ftype(ftype)
    if out is not None and not dry_run:
        _check_output_path(out)
    opts = TypeOptions() if options is None else options
    if not isinstance(opts, TypeOptions):
        raise TypeError(f"options must be an evalkit.recipes.TypeOptions, got {type(opts).__name__}")
    im, label = load_imatrix_arg(imatrix)
    own = not hasattr(src, "tensors")
    source = open_source(src) if own else src
    bar = None
    try:
        plan = build_plan(source, ft, opts, im, label, None if out is None else str(out))
        if dry_run:
            return plan
        if out is None:
            raise ValueError("no output path given (only --dry-run works without one)")
        check_kernels(plan)          # KernelGapError: read-only target types, kernels missing from the build
        from evalkit.codec import default_threads
        from evalkit.gguf import TensorSpec, write_gguf

        nthreads = default_threads() if threads is None else threads
        if isinstance(nthreads, bool) or not isinstance(nthreads, int) or nthreads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        by_name = {t.name: t for t in plan.tensors}
        specs = [TensorSpec(t.name, t.shape, get_format(t.dst_type).type_id) for t in plan.tensors]
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=plan.dst_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=f"quantize {ft.name}", leave=True)
        done = [0]

        def data(spec: Any) -> np.ndarray:
            tp = by_name[spec.name]
            vec = im.data[tp.imatrix_name] if tp.imatrix_name else None
            return quantize_tensor(source, tp, vec, nthreads)

        def written(spec: Any) -> None:
            if hasattr(source, "release"):
                source.release(spec.name)
            done[0] += 1
            if bar is not None:
                bar.set_postfix_str(f"tensor {done[0]}/{len(specs)}", refresh=False)
                bar.update(spec.nbytes)

        write_gguf(out, plan.metadata, specs, data, plan.metadata_types, on_tensor_written=written)
        return plan
    finally:
        if bar is not None:
            bar.close()
        if own:
            source.close()
