"""A HuggingFace checkpoint (config.json + *.safetensors) as a tensor source.

Presents the checkpoint the way ``convert_hf_to_gguf.py`` would have written it as GGUF:
GGUF tensor names, ggml-order shapes, llama's Q/K rows permuted (``LlamaModel.permute``:
HF's rotate-half RoPE layout → ggml's interleaved one; qwen2/qwen3 use NEOX RoPE and are
not permuted), 1-D tensors as F32, 2-D tensors in the checkpoint's own dtype
(F32/F16/BF16: no F16 rounding step in between), hyper-parameters as ``{arch}.*``
metadata and, when ``tokenizer.json`` holds a BPE tokenizer, the ``tokenizer.ggml.*`` keys.
Tensor order follows the converter: shard files in name order, tensors sorted by HF name.

``HFSource(dir, permute_qk=False)`` leaves the Q/K rows as HF stores them: the forward
pass reads checkpoints that way and rotates with NEOX pairing instead.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFValueType

from evalkit.gguf.reader import TensorInfo
from evalkit.errors import EvalkitError

__all__ = ["HFSource", "HFSourceError", "HF_ARCHITECTURES", "HF_MODEL_TYPES", "hf_architecture",
           "qk_permutation"]

# The one map from HF names to evalkit architectures: config.json's "architectures"
# (what convert_hf_to_gguf dispatches on) and, as a fallback, its "model_type".
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
}
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_DTYPES = {"F32": (np.dtype("<f4"), 0, "F32"), "F16": (np.dtype("<f2"), 1, "F16"),
           "BF16": (np.dtype("<u2"), 30, "BF16")}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_V = GGUFValueType


class HFSourceError(EvalkitError, ValueError):
    """The checkpoint is unreadable or uses something this converter does not handle."""


def hf_architecture(config: dict[str, Any]) -> str | None:
    """The evalkit architecture of a parsed config.json ("architectures" first, then "model_type")."""
    arch = next((HF_ARCHITECTURES[a] for a in config.get("architectures") or [] if a in HF_ARCHITECTURES), None)
    return arch or HF_MODEL_TYPES.get(config.get("model_type", ""))


def qk_permutation(n_rows: int, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Row order of convert_hf_to_gguf's LlamaModel.permute: new row i is old row index[i]."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    if n_rows % (2 * n_head):
        raise HFSourceError(f"cannot permute {n_rows} rows for {n_head} heads")
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


class _Entry:
    __slots__ = ("hf_name", "buf", "dtype", "shape", "begin", "end", "perm_heads")

    def __init__(self, hf_name, buf, dtype, shape, begin, end):
        self.hf_name, self.buf, self.dtype, self.shape = hf_name, buf, dtype, shape
        self.begin, self.end = begin, end
        self.perm_heads = None   # (n_head, n_head_kv) for llama's Q/K


def _read_safetensors(path: Path) -> tuple[mmap.mmap, dict[str, Any]]:
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 8:
            raise HFSourceError(f"{path}: too short to be a safetensors file")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    (n,) = struct.unpack("<Q", mm[:8])
    if n > size - 8:
        mm.close()
        raise HFSourceError(f"{path}: truncated safetensors header ({n} bytes announced)")
    try:
        header = json.loads(mm[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        mm.close()
        raise HFSourceError(f"{path}: unreadable safetensors header: {e}") from None
    header.pop("__metadata__", None)
    data_start = 8 + n
    out = {}
    for name, h in header.items():
        dt = h.get("dtype")
        if dt not in _DTYPES:
            mm.close()
            raise HFSourceError(f"{path}: tensor {name!r} has dtype {dt}; only F32, F16 and BF16 are supported")
        shape = tuple(int(d) for d in h["shape"])
        b, e = (int(v) for v in h["data_offsets"])
        count = int(np.prod(shape)) if shape else 1
        if e - b != count * _DTYPES[dt][0].itemsize or data_start + e > size:
            mm.close()
            raise HFSourceError(f"{path}: tensor {name!r} data is truncated or inconsistent with its shape")
        out[name] = (dt, shape, data_start + b, data_start + e)
    return mm, out


class HFSource:
    """A llama / qwen2 / qwen3 HuggingFace checkpoint directory, read lazily (memory-mapped).

    ``permute_qk`` (default True) permutes llama's Q/K rows as convert_hf_to_gguf does, so
    that tensors and metadata together are the GGUF the converter would write; False
    keeps HF's order (the forward pass, which then uses NEOX rope). The metadata is built
    on first use, so a reader that needs only tensors is not stopped by what the converter
    cannot describe (e.g. llama3 rope scaling).
    """

    def __init__(self, directory: str | Path, permute_qk: bool = True):
        self.dir = Path(directory)
        self.path = str(self.dir)
        self.permute_qk = bool(permute_qk)
        cfg_path = self.dir / "config.json"
        try:
            self.config = json.loads(cfg_path.read_text())
        except OSError as e:
            raise HFSourceError(f"{cfg_path}: cannot read: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise HFSourceError(f"{cfg_path}: not valid JSON: {e}") from None
        c = self.config
        arch = hf_architecture(c)
        if arch is None:
            raise HFSourceError(f"{cfg_path}: unsupported architecture {c.get('architectures') or c.get('model_type')}"
                                "; evalkit converts llama, qwen2 and qwen3 checkpoints")
        self.arch = arch
        try:
            self.n_layer = int(c["num_hidden_layers"])
            self.n_embd = int(c["hidden_size"])
            self.n_head = int(c["num_attention_heads"])
        except KeyError as e:
            raise HFSourceError(f"{cfg_path}: missing hyper-parameter {e.args[0]!r}") from None
        self.n_head_kv = int(c.get("num_key_value_heads") or self.n_head)
        self._maps: list[mmap.mmap] = []
        self._entries: dict[str, _Entry] = {}
        self.tensors: list[TensorInfo] = []
        self._meta: tuple[dict[str, Any], dict[str, tuple[int, int | None]]] | None = None
        try:
            self._load_tensors()
        except Exception:
            self.close()
            raise

    @property
    def metadata(self) -> dict[str, Any]:
        """The GGUF metadata convert_hf_to_gguf would write (``{arch}.*``, ``tokenizer.ggml.*``)."""
        return self._metadata()[0]

    @property
    def metadata_types(self) -> dict[str, tuple[int, int | None]]:
        """Each metadata key's (GGUFValueType, array item type or None)."""
        return self._metadata()[1]

    def _metadata(self) -> tuple[dict[str, Any], dict[str, tuple[int, int | None]]]:
        if self._meta is None:
            cfg_path = self.dir / "config.json"
            if self.arch == "llama" and not self.permute_qk:
                # llama GGUFs rotate adjacent pairs: unpermuted rows would be read wrongly
                raise HFSourceError(f"{self.dir}: opened with permute_qk=False, so its llama Q/K rows are not "
                                    "what a GGUF holds; open it with permute_qk=True to convert it")
            rs = self.config.get("rope_scaling")
            if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "linear", "default"):
                raise HFSourceError(f"{cfg_path}: rope_scaling {rs.get('rope_type') or rs.get('type')!r} is not "
                                    "supported by evalkit's converter (convert it with convert_hf_to_gguf.py)")
            self._meta = self._build_metadata()
        return self._meta

    # -- tensors -----------------------------------------------------------------
    def _shard_files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (OSError, KeyError, json.JSONDecodeError) as e:
                raise HFSourceError(f"{index}: unreadable index: {e}") from None
            files = sorted({self.dir / f for f in wm.values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise HFSourceError(f"{self.dir}: no *.safetensors files")
        for f in files:
            if not f.exists():
                raise HFSourceError(f"{f}: listed in the index but missing")
        return files

    def _gguf_name(self, hf: str) -> str | None:
        if hf in _TOP:
            return _TOP[hf]
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
        if m and m.group(2) in _LAYER:
            return f"blk.{int(m.group(1))}.{_LAYER[m.group(2)]}"
        return None

    def _load_tensors(self) -> None:
        tied = bool(self.config.get("tie_word_embeddings", False))
        for f in self._shard_files():
            mm, header = _read_safetensors(f)
            self._maps.append(mm)
            for hf in sorted(header):
                if hf.endswith("rotary_emb.inv_freq") or (tied and hf == "lm_head.weight"):
                    continue
                name = self._gguf_name(hf)
                if name is None:
                    raise HFSourceError(f"{f}: cannot map tensor {hf!r} to a GGUF name for {self.arch}")
                if name in self._entries:
                    raise HFSourceError(f"{f}: tensor {hf!r} appears twice")
                dt, shape, b, e = header[hf]
                entry = _Entry(hf, mm, dt, shape, b, e)
                if self.arch == "llama" and self.permute_qk:
                    if hf.endswith(("q_proj.weight", "q_proj.bias")):
                        entry.perm_heads = (self.n_head, self.n_head)
                    elif hf.endswith(("k_proj.weight", "k_proj.bias")):
                        entry.perm_heads = (self.n_head, self.n_head_kv)
                self._entries[name] = entry
                gshape = tuple(reversed(shape)) or (1,)
                # 1-D tensors go to F32, as convert_hf_to_gguf does
                tname = "F32" if len(shape) <= 1 else dt
                tid = {"F32": 0, "F16": 1, "BF16": 30}[tname]
                itemsize = 4 if tname == "F32" else 2
                nbytes = int(np.prod(gshape)) * itemsize
                self.tensors.append(TensorInfo(name, gshape, tid, -1, nbytes))

    def _array(self, name: str) -> tuple[np.ndarray, str]:
        """The stored values as a 2-D array (rows, ne0) in the stored dtype, permuted; and the dtype."""
        e = self._entries[name]
        dt = _DTYPES[e.dtype][0]
        a = np.frombuffer(e.buf, dtype=dt, count=(e.end - e.begin) // dt.itemsize, offset=e.begin)
        ne0 = e.shape[-1] if e.shape else 1
        a = a.reshape(-1, ne0)
        if e.perm_heads is not None:
            if len(e.shape) == 1:
                a = a[:, qk_permutation(ne0, *e.perm_heads)]
            else:
                a = a[qk_permutation(a.shape[0], *e.perm_heads)]
        return a, e.dtype

    @staticmethod
    def _to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
        if dtype == "F32":
            return a
        if dtype == "F16":
            return a.astype(np.float32)   # exact
        return (a.astype(np.uint32) << 16).view(np.float32)   # BF16: exact

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as the converted GGUF would store them, uint8 (rows, row_bytes)."""
        a, dtype = self._array(name)
        if len(self._entries[name].shape) <= 1:   # stored as F32 (see _load_tensors)
            a = self._to_f32(a, dtype)
        a = np.ascontiguousarray(a)
        return a.view(np.uint8).reshape(a.shape[0], -1)

    def rows_f32(self, name: str, threads: int | None = None) -> np.ndarray:
        """The tensor as float32 rows (nrows, ne0), exactly."""
        a, dtype = self._array(name)
        return np.ascontiguousarray(self._to_f32(a, dtype))

    def close(self) -> None:
        """Unmap the shard files."""
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:
                pass   # views still alive; released with them
        self._maps = []

    # -- metadata ----------------------------------------------------------------
    def _build_metadata(self) -> tuple[dict[str, Any], dict[str, tuple[int, int | None]]]:
        c, a = self.config, self.arch
        meta: dict[str, Any] = {}
        types: dict[str, tuple[int, int | None]] = {}

        def put(k: str, v: Any, t: int, it: int | None = None) -> None:
            meta[k] = v
            types[k] = (int(t), None if it is None else int(it))

        put("general.architecture", a, _V.STRING)
        name = c.get("_name_or_path") or self.dir.name
        put("general.name", os.path.basename(str(name).rstrip("/")) or self.dir.name, _V.STRING)
        put(f"{a}.block_count", self.n_layer, _V.UINT32)
        if "max_position_embeddings" in c:
            put(f"{a}.context_length", int(c["max_position_embeddings"]), _V.UINT32)
        put(f"{a}.embedding_length", self.n_embd, _V.UINT32)
        if "intermediate_size" in c:
            put(f"{a}.feed_forward_length", int(c["intermediate_size"]), _V.UINT32)
        put(f"{a}.attention.head_count", self.n_head, _V.UINT32)
        put(f"{a}.attention.head_count_kv", self.n_head_kv, _V.UINT32)
        if c.get("rope_theta") is not None:
            put(f"{a}.rope.freq_base", float(c["rope_theta"]), _V.FLOAT32)
        if c.get("rms_norm_eps") is not None:
            put(f"{a}.attention.layer_norm_rms_epsilon", float(c["rms_norm_eps"]), _V.FLOAT32)
        if c.get("head_dim") is not None:
            put(f"{a}.attention.key_length", int(c["head_dim"]), _V.UINT32)
            put(f"{a}.attention.value_length", int(c["head_dim"]), _V.UINT32)
        counts: dict[str, int] = {}
        for t in self.tensors:
            if len(t.shape) >= 2:
                counts[t.type_name] = counts.get(t.type_name, 0) + t.n_elements
        main = max(counts, key=counts.get) if counts else "F32"
        put("general.file_type", {"F32": 0, "F16": 1, "BF16": 32}[main], _V.UINT32)
        rs = c.get("rope_scaling")
        if rs and (rs.get("rope_type") or rs.get("type")) == "linear":
            put(f"{a}.rope.scaling.type", "linear", _V.STRING)
            put(f"{a}.rope.scaling.factor", float(rs["factor"]), _V.FLOAT32)
        if a == "llama":
            if "vocab_size" in c:
                put(f"{a}.vocab_size", int(c["vocab_size"]), _V.UINT32)
            put(f"{a}.rope.dimension_count", int(c.get("head_dim") or self.n_embd // self.n_head), _V.UINT32)
        self._tokenizer_metadata(put)
        put("general.quantization_version", 2, _V.UINT32)
        return meta, types

    def _tokenizer_metadata(self, put) -> None:
        path = self.dir / "tokenizer.json"
        if not path.exists():
            return
        try:
            tok = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFSourceError(f"{path}: unreadable tokenizer: {e}") from None
        model = tok.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            return   # only byte-level BPE ("gpt2") tokenizers are described
        vocab: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
        added: dict[int, dict] = {}
        for at in tok.get("added_tokens") or []:
            vocab[int(at["id"])] = at["content"]
            added[int(at["id"])] = at
        n = int(self.config.get("vocab_size") or (max(vocab) + 1 if vocab else 0))
        n = max(n, max(vocab) + 1 if vocab else 0)
        tokens, toktypes = [], []
        for i in range(n):
            if i not in vocab:
                tokens.append(f"[PAD{i}]")
                toktypes.append(5)      # UNUSED
            elif i in added:
                special = bool(added[i].get("special"))
                tokens.append(vocab[i] if special else vocab[i].replace("\u2581", " "))
                toktypes.append(3 if special else 4)   # CONTROL / USER_DEFINED
            else:
                tokens.append(vocab[i])
                toktypes.append(1)      # NORMAL
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        put("tokenizer.ggml.model", "gpt2", _V.STRING)
        # the converter identifies the pre-tokenizer by hashing its output; "default" here
        put("tokenizer.ggml.pre", "default", _V.STRING)
        put("tokenizer.ggml.tokens", tokens, _V.ARRAY, _V.STRING)
        put("tokenizer.ggml.token_type", toktypes, _V.ARRAY, _V.INT32)
        if merges:
            put("tokenizer.ggml.merges", merges, _V.ARRAY, _V.STRING)
        for key, cfg_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
            v = self.config.get(cfg_key)
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int) and v >= 0:
                put(f"tokenizer.ggml.{key}", v, _V.UINT32)
        tc = self.dir / "tokenizer_config.json"
        if tc.exists():
            try:
                tcfg = json.loads(tc.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                tcfg = {}
            if isinstance(tcfg.get("add_bos_token"), bool):
                put("tokenizer.ggml.add_bos_token", tcfg["add_bos_token"], _V.BOOL)
            if isinstance(tcfg.get("chat_template"), str):
                put("tokenizer.chat_template", tcfg["chat_template"], _V.STRING)
