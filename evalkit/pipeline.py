"""The `evalkit run` pipeline: one base pass per chunk, every variant scored against it.

For each chunk the base logits are computed once (or decoded from a llama-perplexity
base-logits file) and every variant is scored against them, so no multi-gigabyte logits
file is needed. Each finished chunk is written atomically to ``<out>/partial/``; a killed
run resumes from its last finished chunk and gives identical results.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evalkit.run_config import RunConfig, VariantSpec
from evalkit.errors import EvalkitError

__all__ = ["RunError", "run", "model_size", "sha256_file"]

PARTIAL_FORMAT = 1


class RunError(EvalkitError, ValueError):
    """The run cannot proceed (bad input named in the message)."""


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------

def sha256_file(path: str | Path, _cache: dict = {}) -> str:
    """sha256 of a file (cached per path, size and mtime); of every file for a folder."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.iterdir()):
            if f.is_file():
                h.update(f.name.encode() + sha256_file(f).encode())
        return h.hexdigest()
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def model_size(path: str | Path) -> tuple[int, float]:
    """(bytes of all tensors, bits per weight over all tensors) of a GGUF file."""
    from evalkit.gguf import GGUFFile
    with GGUFFile(path) as f:
        nbytes = sum(t.nbytes for t in f.tensors.values())
        nel = sum(t.n_elements for t in f.tensors.values())
    return nbytes, 8.0 * nbytes / nel


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_savez(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _log_softmax_f32(z: np.ndarray) -> np.ndarray:
    """Exact base log-probabilities from float32 logits: z - M - ln Σexp(z - M) (sum in double)."""
    m = z.max(axis=1, keepdims=True)
    s = np.exp(z - m).sum(axis=1, dtype=np.float64, keepdims=True)
    return (z - m - np.log(s).astype(np.float32)).astype(np.float32)


# ---------------------------------------------------------------------------------------
# models and variants
# ---------------------------------------------------------------------------------------

@dataclass
class _Loaded:
    name: str
    path: Path
    sha256: str
    size_bytes: int
    bpw: float
    model: Any = None
    seconds: float = 0.0
    tokens: int = 0


def _tokenizer_for(path: Path):
    from evalkit.gguf import GGUFFile
    from evalkit.model.tokenizer import Tokenizer
    if path.is_dir():
        return Tokenizer.from_hf_dir(path)
    with GGUFFile(path) as f:
        return Tokenizer.from_gguf_metadata(f.metadata)


def _vocab_of(path: Path) -> tuple[int, list[str] | None]:
    """(n_vocab from the embedding tensor, token strings if the file carries them)."""
    from evalkit.gguf import GGUFFile
    with GGUFFile(path) as f:
        t = f.tensors.get("token_embd.weight")
        if t is None:
            raise RunError(f"{path}: no token_embd.weight tensor")
        return int(t.shape[1]), f.get("tokenizer.ggml.tokens")


def _check_same_vocab(base: Path, variant: Path, name: str) -> None:
    nb, tb = _vocab_of(base) if base.suffix == ".gguf" or base.is_file() else (None, None)
    nv, tv = _vocab_of(variant)
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


def _recipe_fingerprint(v: VariantSpec, base_sha: str, imatrix_sha: str | None) -> str:
    d = {k: getattr(v, k) for k in ("ftype", "overrides", "pure")}
    d.update(v.class_types())
    d["base"] = base_sha
    d["imatrix"] = imatrix_sha
    d["format"] = 1
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _prepare_variant(cfg: RunConfig, v: VariantSpec, base_path: Path, base_sha: str, out: Path,
                     progress: bool) -> Path:
    """An existing GGUF, or the recipe quantized (cached under <out>/models/)."""
    if v.gguf:
        p = Path(cfg.resolve(v.gguf))
        if not p.is_file():
            raise RunError(f"variant {v.name!r}: GGUF file {p} not found")
        return p
    from evalkit.recipes.model_quantizer import quantize_model
    im_path = cfg.resolve(v.imatrix) if v.imatrix else None
    if im_path and not Path(im_path).is_file():
        raise RunError(f"variant {v.name!r}: imatrix file {im_path} not found")
    fp = _recipe_fingerprint(v, base_sha, sha256_file(im_path) if im_path else None)
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / f"{v.name}.gguf"
    stamp = models / f"{v.name}.recipe.json"
    if target.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == fp:
        return target
    try:
        quantize_model(base_path, target, v.ftype, imatrix=im_path, pure=v.pure, threads=cfg.threads,
                       overrides=v.overrides, progress=progress, **v.class_types())
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        raise RunError(f"variant {v.name!r}: cannot quantize {base_path} as {v.ftype}: {e}") from None
    _atomic_write_text(stamp, json.dumps({"fingerprint": fp, "ftype": v.ftype}))
    return target


def _load_model(path: Path, threads: int | None):
    from evalkit.model import Model
    try:
        if path.is_dir():
            return Model.from_hf(path, threads=threads)
        return Model.from_gguf(path, threads=threads)
    except (ValueError, KeyError) as e:
        raise RunError(f"{path}: {e}") from None


def _logits(model, chunks: np.ndarray, start: int = 0, buffer=None) -> np.ndarray:
    """Float32 logits of positions start..C-1 of one chunk (C,) -> (C - start, V), or of
    several evaluated together (B, C) -> (B, C - start, V).

    With a ``buffer`` (an evalkit.model.Workspace) the result lives in its "logits"
    buffer, reused from call to call (fresh logits pages cost a quarter of the output
    projection's time): use it before the buffer's next call.
    """
    import torch
    shape = (*chunks.shape[:-1], chunks.shape[-1] - start, model.config.n_vocab)
    out = buffer("logits", *shape) if buffer is not None else None
    # no_grad rather than inference_mode: the model's reusable buffers must stay ordinary tensors
    with torch.no_grad():
        z = model.forward(torch.from_numpy(chunks.astype(np.int64)), logits_start=start, out=out)
    return z.numpy()


def chunks_per_batch(batch_tokens: int, n_ctx: int) -> int:
    """Chunks evaluated per forward call: llama-perplexity's n_seq = max(1, n_batch / n_ctx)."""
    return max(1, batch_tokens // n_ctx)


def batched(items: list, n: int) -> list[list]:
    """items in consecutive groups of n (the last may be shorter)."""
    return [items[i:i + n] for i in range(0, len(items), n)]


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------

def _run_fingerprint(cfg: RunConfig, corpus_sha: str, base: _Loaded, variants: list[_Loaded],
                     base_file_sha: str | None, n_ctx: int, n_chunks: int) -> str:
    import evalkit
    d = {"format": PARTIAL_FORMAT, "evalkit": evalkit.__version__, "corpus": corpus_sha,
         "base": base.sha256, "base_logits": base_file_sha, "n_ctx": n_ctx, "n_chunks": n_chunks,
         "variants": [(v.name, v.sha256) for v in variants]}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def run(cfg: RunConfig, progress: bool = True, restart: bool = False) -> Path:
    """Evaluate every variant of ``cfg`` against its base; returns the results folder."""
    import torch
    from tqdm.auto import tqdm

    import evalkit
    from evalkit.corpus import CorpusError, load_corpus_text
    from evalkit.metrics import KLDTokens, PerplexityAccumulator, chunk_tokens, kld_statistics, token_nll
    from evalkit.metrics.logits_file import LogitsFile, LogitsFileWriter, encode_records
    from evalkit.sources import ModelNotFoundError, resolve_model

    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)

    # -- base model, corpus, tokens -----------------------------------------------------
    try:
        base_path = resolve_model(cfg.base if cfg.base.lower() == "smollm2" else cfg.resolve(cfg.base))
    except ModelNotFoundError as e:
        raise RunError(str(e)) from None
    try:
        text, corpus_sha, corpus_desc = load_corpus_text(cfg.corpus, cfg.resolve)
    except CorpusError as e:
        raise RunError(str(e)) from None
    tok = _tokenizer_for(base_path)
    stream = tok.encode(text)
    bos = tok.bos_id if tok.add_bos else None
    base_file = None
    n_ctx = cfg.ctx
    try:
        if cfg.base_logits:
            bl_path = Path(cfg.resolve(cfg.base_logits))
            base_file = LogitsFile(bl_path)
            base_file.check(n_ctx=n_ctx, tokens=stream, n_vocab=None)
            n_chunks_file = base_file.n_chunks
            chunks, targets_pos = chunk_tokens(stream, n_ctx, n_chunks_file, bos)
        else:
            chunks, targets_pos = chunk_tokens(stream, n_ctx, cfg.chunks, bos)
    except ValueError as e:
        raise RunError(f"corpus {corpus_desc}: {e}") from None
    n_chunks = chunks.shape[0]
    stream_chunks = stream[: n_chunks * n_ctx].reshape(n_chunks, n_ctx)  # unreplaced, for targets

    base_nbytes, base_bpw = model_size(base_path) if base_path.is_file() else (0, 32.0)
    base = _Loaded("base", base_path, sha256_file(base_path), base_nbytes, base_bpw)
    variants: list[_Loaded] = []
    for v in cfg.variants:
        p = _prepare_variant(cfg, v, base_path, base.sha256, out, progress)
        _check_same_vocab(base_path, p, v.name)
        nbytes, bpw = model_size(p)
        variants.append(_Loaded(v.name, p, sha256_file(p), nbytes, bpw))
    base_file_sha = sha256_file(base_file.path) if base_file is not None else None
    if base_file is not None:
        n_vocab_model = _vocab_of(base_path)[0] if base_path.is_file() else None
        if n_vocab_model is not None and base_file.n_vocab != n_vocab_model:
            raise RunError(f"{base_file.path}: records are {base_file.n_vocab} wide but the model's "
                           f"vocabulary has {n_vocab_model} tokens")

    # -- resume state --------------------------------------------------------------------
    partial = out / "partial"
    fp = _run_fingerprint(cfg, corpus_sha, base, variants, base_file_sha, n_ctx, n_chunks)
    state_path = partial / "state.json"
    if restart and partial.exists():
        shutil.rmtree(partial)
    if partial.exists():
        try:
            same = json.loads(state_path.read_text()).get("fingerprint") == fp
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(state_path, json.dumps({"fingerprint": fp, "config": cfg.to_dict()}))

    def chunk_file(k: int) -> Path:
        return partial / f"chunk_{k:05d}.npz"

    todo = [k for k in range(n_chunks) if not chunk_file(k).is_file()]
    want_records = bool(cfg.write_base_logits)
    if want_records:
        todo = [k for k in range(n_chunks) if k in todo or not (partial / f"records_{k:05d}.npy").is_file()]

    # -- the pass ------------------------------------------------------------------------
    if todo:
        base_model = None if base_file is not None else _load_model(base_path, cfg.threads)
        for v in variants:
            v.model = _load_model(v.path, cfg.threads)
        first = n_ctx // 2
        bar = tqdm(total=len(todo), desc=f"{cfg.name}: chunks", unit="chunk", disable=not progress)
        # Several chunks per forward call (llama-perplexity's n_batch / n_ctx sequences):
        # larger GEMMs, and each weight is read once for all of them.
        from evalkit.model import Workspace
        base_buf, variant_buf = Workspace(), Workspace()    # the variants take turns in one
        for group in batched(todo, chunks_per_batch(cfg.batch, n_ctx)):
            idx = np.asarray(group)
            arrays: dict[int, dict[str, np.ndarray]] = {}
            base_lps = []
            if base_file is None:
                ts = time.perf_counter()
                z_base = _logits(base_model, chunks[idx], first, base_buf)   # (B, C - first, V)
                base_seconds = (time.perf_counter() - ts) / len(group)
            for j, k in enumerate(group):
                targets = stream_chunks[k, targets_pos]
                a = arrays[k] = {"targets": targets.astype(np.int32)}
                if base_file is not None:
                    base_lp = base_file.read_chunk(k).logprobs
                    a["base_seconds"] = np.float64(0.0)
                    a["base_nll"] = -base_lp[np.arange(len(targets)), targets].astype(np.float64)
                else:
                    rows = z_base[j, :-1]                           # the scored rows first..C-2
                    if want_records:
                        np.save(partial / f"records_{k:05d}.npy", encode_records(rows))
                    a["base_seconds"] = np.float64(base_seconds)
                    try:
                        a["base_nll"] = token_nll(rows, targets, chunk=k, first_row=first)
                    except ValueError as e:
                        raise RunError(f"base model: {e}") from None
                    base_lp = _log_softmax_f32(rows)
                base_lps.append(base_lp)
            for i, v in enumerate(variants):
                ts = time.perf_counter()
                z = _logits(v.model, chunks[idx], first, variant_buf)
                seconds = np.float64((time.perf_counter() - ts) / len(group))
                for j, k in enumerate(group):
                    try:
                        st = kld_token_stats_f(base_lps[j], z[j, :-1], arrays[k]["targets"], k, first)
                    except ValueError as e:
                        raise RunError(f"variant {v.name!r}: {e}") from None
                    arrays[k][f"v{i}_seconds"] = seconds
                    for f_name, arr in st.__dict__.items():
                        arrays[k][f"v{i}_{f_name}"] = arr
            for k in group:
                _atomic_savez(chunk_file(k), **arrays[k])
                bar.update(1)
        bar.close()

    # -- aggregate -----------------------------------------------------------------------
    base_acc = PerplexityAccumulator()
    running = []
    parts: list[list[KLDTokens]] = [[] for _ in variants]
    rows_tok = []
    base_seconds = 0.0
    for k in range(n_chunks):
        with np.load(chunk_file(k)) as d:
            running.append(base_acc.add(d["base_nll"]))
            base_seconds += float(d["base_seconds"])
            for i, v in enumerate(variants):
                kt = KLDTokens(**{f: d[f"v{i}_{f}"] for f in ("nll_q", "nll_base", "kld", "p_q", "p_base",
                                                            "dp", "same_top")})
                parts[i].append(kt)
                v.seconds += float(d[f"v{i}_seconds"])
                v.tokens += n_ctx
                rows_tok.append((v.name, k, d["targets"], kt))
    base_ppl = base_acc.final()
    n_scored = base_acc.count
    import pandas as pd
    frames = []
    for name, k, targets, kt in rows_tok:
        frames.append(pd.DataFrame({
            "variant": name, "chunk": np.int32(k), "position": (targets_pos).astype(np.int32),
            "token": targets.astype(np.int32), "nll": kt.nll_q, "nll_base": kt.nll_base,
            "kld": kt.kld.astype(np.float32), "p": kt.p_q, "p_base": kt.p_base, "dp": kt.dp,
            "same_top": kt.same_top}))
    tokens_df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not tokens_df.empty:
        tokens_df["variant"] = tokens_df["variant"].astype("category")

    results: dict[str, Any] = {
        "evalkit_version": evalkit.__version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "config": cfg.to_dict(),
        "corpus": corpus_desc,
        "corpus_sha256": corpus_sha,
        "n_ctx": n_ctx,
        "n_chunks": n_chunks,
        "base": {"model": str(base_path), "sha256": base.sha256, "size_bytes": base.size_bytes,
                 "bpw": base.bpw, "ppl": list(base_ppl), "running_ppl": running, "n_tokens": n_scored,
                 "tokens_per_s": (n_chunks * n_ctx / base_seconds) if base_seconds > 0 else None,
                 "logits_file": str(base_file.path) if base_file is not None else None},
        "variants": {},
    }
    for i, v in enumerate(variants):
        stats = kld_statistics(parts[i])
        stats.update({"model": str(v.path), "sha256": v.sha256, "size_bytes": v.size_bytes, "bpw": v.bpw,
                      "tokens_per_s": v.tokens / v.seconds if v.seconds > 0 else None})
        results["variants"][v.name] = stats
    results["wall_time_s"] = time.time() - t0

    # -- outputs (each written atomically; results.json last) ------------------------------
    from evalkit.report import save_all_plots, summary_markdown
    if not tokens_df.empty:
        tmp = out / ".tokens.parquet.tmp"
        tokens_df.to_parquet(tmp, index=False)
        os.replace(tmp, out / "tokens.parquet")
    tmp = out / ".chunks.tmp.npy"
    np.save(tmp, stream_chunks.astype(np.int32))  # the evaluated tokens, for drilling into context
    os.replace(tmp, out / "chunks.npy")
    _atomic_write_text(out / "summary.md", summary_markdown(results))
    if variants:
        save_all_plots(results, tokens_df, out)
    if want_records:
        target = Path(cfg.write_base_logits)
        base_lp_width = _vocab_of(base_path)[0]
        w = LogitsFileWriter(target, n_ctx, base_lp_width, stream, n_chunks)
        try:
            for k in range(n_chunks):
                w.write_encoded(np.load(partial / f"records_{k:05d}.npy"))
            w.close()
        except BaseException:
            w.abort()
            raise
    _atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=_json_default))
    return out


def kld_token_stats_f(base_lp, logits, targets, chunk, first):
    """Per-token KLD statistics of one chunk (thin wrapper kept for the pipeline's loop)."""
    from evalkit.metrics import kld_token_stats
    return kld_token_stats(base_lp, logits, targets, chunk=chunk, first_row=first)


def _json_default(o):
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
