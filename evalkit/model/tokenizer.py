"""Tokenizer that reproduces llama.cpp / ik_llama.cpp token ids from GGUF metadata.

What `llama-perplexity` does (docs/perplexity-kld.md sections 1.1-1.2): the corpus is
tokenized once with "add special" on and "parse special" off. That means BOS is
prepended when the vocabulary asks for it, EOS is never appended, and text that looks
like a control token (``<|endoftext|>``) is tokenized as ordinary text. Only
user-defined tokens (token type 4) are still cut out of the text first, as llama.cpp
does.

Two vocabulary kinds are supported:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The pre-tokenizer regexes are
  the ones llama.cpp uses for ``tokenizer.ggml.pre``. They run in the `tokenizers`
  library (Oniguruma), and the BPE merges run in its BPE model. For the supported
  pre-tokenizers, the behaviour of llama.cpp's hand-written splitters (gpt2, llama3)
  and its std::regex fallback is the same as the real regex. The only exception is
  where the Unicode tables differ.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style (SPM). This is a direct port
  of llama.cpp's score-driven bigram merge, with ``<0xXX>`` byte fallback and
  ``add_space_prefix``.
"""
from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from evalkit.errors import EvalkitError

__all__ = ["Tokenizer", "read_corpus", "SUPPORTED_PRE_TOKENIZERS"]

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_TYPE_UNDEFINED = 0
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# ---------------------------------------------------------------------------
# Pre-tokenizer regexes (llama.cpp src/llama-vocab.cpp, llm_tokenizer_bpe)
# ---------------------------------------------------------------------------

# llama.cpp sends this exact string to a hand-written splitter. That splitter
# also takes whitespace that the last alternative cannot match, one run at a
# time (a trailing "\s+"). So for Oniguruma we append "|\s+", which is the
# regex the splitter really implements.
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# llama.cpp rewrote the case-insensitive contractions (?i:...) as explicit classes.
_RE_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_REGEXES_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")
_REGEXES_FALCON = (r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]")
_REGEXES_GPT2 = (_RE_GPT2,)
_REGEXES_SMOLLM = (r"\p{N}", _RE_GPT2)
_REGEXES_LLAMA3 = (_RE_LLAMA3,)
_REGEXES_QWEN2 = (_RE_QWEN2,)

# name -> (regex list, ignore_merges). These are the names llama.cpp's vocab loader
# maps onto the pre-tokenizer types above. Types whose llama.cpp regexes are not
# exactly reproducible here (tekken, gpt-4o, deepseek*, chameleon, ...) are left
# out on purpose, so they raise instead of tokenizing slightly differently.
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": (_REGEXES_DEFAULT, False),
    "falcon": (_REGEXES_FALCON, False),
    # LLAMA_VOCAB_PRE_TYPE_LLAMA3: also ignore_merges (whole word in vocab wins)
    **{n: (_REGEXES_LLAMA3, True) for n in (
        "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")},
    # same regex, but neither ignore_merges nor a BOS default
    **{n: (_REGEXES_LLAMA3, False) for n in ("dbrx", "smaug-bpe", "glm4", "chatglm-bpe")},
    **{n: (_REGEXES_GPT2, False) for n in (
        "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
        "mellum", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais", "exaone4",
        "trillion", "granite-docling")},
    **{n: (_REGEXES_SMOLLM, False) for n in (
        "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{n: (_REGEXES_QWEN2, False) for n in (
        "qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "grok-2")},
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))

# BPE pre-tokenizers whose loader turns add_bos on when the GGUF key is absent.
_BPE_ADD_BOS_DEFAULT = frozenset({
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "tekken", "chameleon"})
# chatglm vocabularies have no BOS at all in llama.cpp
_BPE_NO_BOS = frozenset({"glm4", "chatglm-bpe"})

# Token texts that llama.cpp's loader forces to CONTROL whatever the file says.
# This matters here because a CONTROL token, unlike a USER_DEFINED one, is not cut
# out of the text when parse_special is false.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"})
# (GGUF key, candidate texts): when the key is absent, the first candidate found
# becomes that special token and is forced to CONTROL.
_AUTODETECT = (
    ("tokenizer.ggml.eot_token_id", ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                     "<|endoftext|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>",
                                     "<end_of_utterance>")),
    ("tokenizer.ggml.eom_token_id", ("<|eom_id|>",)),
    ("tokenizer.ggml.fim_pre_token_id", ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
                                         "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>")),
    ("tokenizer.ggml.fim_suf_token_id", ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
                                         "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>")),
    ("tokenizer.ggml.fim_mid_token_id", ("<|fim_middle|>", "<fim-middle>", "<fim_middle>",
                                         "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>")),
    ("tokenizer.ggml.fim_pad_token_id", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>")),
    ("tokenizer.ggml.fim_rep_token_id", ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
                                         "<reponame>")),
    ("tokenizer.ggml.fim_sep_token_id", ("<|file_sep|>",)),
)
# gpt-oss hack in llama.cpp: these are always USER_DEFINED.
_FORCED_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's escaped space
_C_ISSPACE = " \t\n\v\f\r"  # C isspace() in the "C" locale, used by rstrip handling


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> printable character table (same as llama.cpp's unicode_byte_to_utf8)."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _as_str(x: Any) -> str:
    # GGUF strings are UTF-8 bytes; a reader may hand us either form.
    if isinstance(x, (bytes, bytearray, memoryview)):
        return bytes(x).decode("utf-8", errors="surrogateescape")
    return str(x)



class TokenizerError(EvalkitError, ValueError):
    """The vocabulary cannot be used (unsupported model, missing or inconsistent metadata)."""


def read_corpus(path: str | Path) -> str:
    """Read a corpus the way llama-perplexity does. It reads the raw bytes, drops
    exactly one trailing LF (a CR before it stays), and decodes the rest as UTF-8."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"corpus file not found: {p}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"corpus path is a directory, not a file: {p}") from None
    if data.endswith(b"\n"):
        data = data[:-1]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"corpus file {p} is not valid UTF-8: byte offset {e.start}: {e.reason}") from None



def _gguf_vocabulary(meta: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """Token texts (empty ones renamed as llama.cpp does) and token types, validated."""
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError("GGUF metadata has no 'tokenizer.ggml.tokens' key")
    tokens = [_as_str(t) for t in meta["tokenizer.ggml.tokens"]]
    n = len(tokens)
    # llama.cpp renames empty tokens so that every text is unique.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != n:
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise TokenizerError(f"GGUF vocabulary has duplicate token text {dup!r}")
    types_raw = meta.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types_raw] if types_raw is not None else [TOKEN_TYPE_NORMAL] * n
    if len(types) != n:
        raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries, expected {n}")
    types = [t if 0 <= t <= 6 else TOKEN_TYPE_UNDEFINED for t in types]
    return tokens, types


class Tokenizer:
    """Text <-> token ids that match llama.cpp's tokenization with parse_special=false.

    Build one with :meth:`from_gguf_metadata` or :meth:`from_hf_dir`.
    """

    def __init__(self, *, kind: str, tokens: list[str], token_types: list[int],
                 bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool = False,
                 add_space_prefix: bool = False, hf: Any = None,
                 scores: list[float] | None = None, rstrip_ids: frozenset[int] = frozenset(),
                 name: str = ""):
        # Private constructor: kind is "bpe" (GGUF gpt2), "spm" (GGUF llama) or "hf".
        self._kind = kind
        self._tokens = tokens
        self._types = token_types
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._add_bos = bool(add_bos)
        self._add_eos = bool(add_eos)
        self._add_space_prefix = bool(add_space_prefix)
        self._hf = hf
        self._scores = scores
        self._rstrip_ids = rstrip_ids
        self.name = name
        self._token_to_id = {t: i for i, t in enumerate(tokens)} if kind != "hf" else None
        # User-defined tokens are cut out of the text before tokenizing, even with
        # parse_special=false. This is llama.cpp's cache_special_tokens order:
        # longest text first (ties: lower id first).
        if kind != "hf":
            ud = [i for i, t in enumerate(token_types) if t == TOKEN_TYPE_USER_DEFINED]
            self._user_defined = sorted(ud, key=lambda i: -len(tokens[i].encode("utf-8", "surrogateescape")))
        else:
            self._user_defined = []
        self._piece_cache: list[bytes] | None = None
        self._spm_pairs: frozenset[str] | None = None
        self._spm_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary (width of the logits row)."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        """BOS token id, or None when the vocabulary has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """EOS token id, or None when the vocabulary has none."""
        return self._eos_id

    @property
    def add_bos(self) -> bool:
        """Whether :meth:`encode` puts BOS in front."""
        return self._add_bos

    @property
    def add_eos(self) -> bool:
        """Whether the vocabulary asks for EOS (llama-perplexity refuses such models)."""
        return self._add_eos

    @property
    def vocab(self) -> list[str]:
        """Token strings by id, as stored in the vocabulary (byte-level form for BPE).

        This is the internal list, not a copy (so indexing it in a loop costs nothing):
        do not modify it."""
        return self._tokens

    @property
    def kind(self) -> str:
        """'bpe', 'spm' (from GGUF) or 'hf' (from a tokenizer.json directory)."""
        return self._kind

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self._kind!r}, name={self.name!r}, n_vocab={self.n_vocab}, "
                f"bos_id={self._bos_id}, add_bos={self._add_bos})")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> "Tokenizer":
        """Build from GGUF key/values (``tokenizer.ggml.*``, plus ``general.name``).

        Raises TokenizerError (a ValueError) when the tokenizer model or pre-tokenizer is unsupported."""
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError("GGUF metadata has no 'tokenizer.ggml.model' key")
        model = _as_str(model)
        if model not in ("gpt2", "llama"):
            raise TokenizerError(
                f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); "
                "supported: 'gpt2' (byte-level BPE) and 'llama' (SPM)")
        tokens, types = _gguf_vocabulary(meta)
        n = len(tokens)

        pre = meta.get("tokenizer.ggml.pre")
        pre = _as_str(pre) if pre is not None else ""
        if model == "gpt2":
            pre_name = pre or "default"  # llama.cpp warns and uses 'default'
            if pre_name not in _PRE_TOKENIZERS:
                raise TokenizerError(
                    f"unsupported pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) for BPE vocabulary; "
                    f"supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}")
            bos_default: int | None = None if pre_name in _BPE_NO_BOS else 11
            eos_default: int | None = 11
            add_bos_default = pre_name in _BPE_ADD_BOS_DEFAULT
            add_space_prefix = False  # BPE never prepends a space
        else:
            pre_name = ""
            bos_default, eos_default = 1, 2
            add_bos_default = True
            add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))

        def special(key: str, default: int | None) -> int | None:
            v = meta.get(key)
            if v is None:
                return default
            v = int(v)
            # llama.cpp ignores ids outside the vocabulary and keeps its default
            return v if 0 <= v < n else default

        bos_id = special("tokenizer.ggml.bos_token_id", bos_default)
        eos_id = special("tokenizer.ggml.eos_token_id", eos_default)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))

        types = _apply_llama_cpp_type_overrides(tokens, types, meta)
        rstrip_ids = _rstrip_ids(tokens, types, meta)
        name = _as_str(meta.get("general.name", ""))

        if model == "gpt2":
            merges_raw = meta.get("tokenizer.ggml.merges")
            if merges_raw is None:
                raise TokenizerError("BPE vocabulary without 'tokenizer.ggml.merges'")
            regexes, ignore_merges = _PRE_TOKENIZERS[pre_name]
            hf = _build_hf_bpe(tokens, [_as_str(m) for m in merges_raw], regexes, ignore_merges)
            return cls(kind="bpe", tokens=tokens, token_types=types, bos_id=bos_id, eos_id=eos_id,
                       add_bos=add_bos, add_eos=add_eos, hf=hf, rstrip_ids=rstrip_ids, name=name)

        scores_raw = meta.get("tokenizer.ggml.scores")
        scores = [float(s) for s in scores_raw] if scores_raw is not None else [0.0] * n
        if len(scores) != n:
            raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries, expected {n}")
        # Scores are float32 in GGUF. Round them so that ties compare the way they do in C.
        scores = np.asarray(scores, dtype=np.float32).astype(np.float64).tolist()
        return cls(kind="spm", tokens=tokens, token_types=types, bos_id=bos_id, eos_id=eos_id,
                   add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix,
                   scores=scores, rstrip_ids=rstrip_ids, name=name)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "Tokenizer":
        """Build from a HuggingFace directory (tokenizer.json + tokenizer_config.json).

        This uses the tokenizer.json pipeline as it stands, with special tokens in the
        text tokenized as plain text. BOS comes from tokenizer_config.json
        ``add_bos_token``, or else from a TemplateProcessing post-processor that
        starts with BOS."""
        from tokenizers import Tokenizer as HFTokenizer

        d = Path(path)
        tj = d / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"no tokenizer.json in {d}")
        hf = HFTokenizer.from_file(str(tj))
        # parse_special=false: added *special* tokens in the text become plain text.
        hf.encode_special_tokens = True
        cfg_path = d / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))

        def tok_id(entry: Any) -> int | None:
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not entry:
                return None
            return hf.token_to_id(entry)

        bos_id = tok_id(cfg.get("bos_token"))
        eos_id = tok_id(cfg.get("eos_token"))
        if "add_bos_token" in cfg and cfg["add_bos_token"] is not None:
            add_bos = bool(cfg["add_bos_token"])
        else:
            add_bos = False
            post = json.loads(tj.read_text(encoding="utf-8")).get("post_processor") or {}
            procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
            for p in procs:
                if p.get("type") == "TemplateProcessing" and p.get("single"):
                    first = p["single"][0]
                    if "SpecialToken" in first:
                        sid = first["SpecialToken"]["id"]
                        ids = (p.get("special_tokens", {}).get(sid, {}) or {}).get("ids") or []
                        if len(ids) == 1 and (bos_id is None or ids[0] == bos_id):
                            add_bos, bos_id = True, ids[0]
        add_eos = bool(cfg.get("add_eos_token", False))
        vocab_map = hf.get_vocab(with_added_tokens=True)
        size = max(vocab_map.values()) + 1 if vocab_map else 0
        tokens = [""] * size
        for t, i in vocab_map.items():
            tokens[i] = t
        types = [TOKEN_TYPE_NORMAL] * size
        for i, at in hf.get_added_tokens_decoder().items():
            if i < size:
                types[i] = TOKEN_TYPE_CONTROL if at.special else TOKEN_TYPE_USER_DEFINED
        return cls(kind="hf", tokens=tokens, token_types=types, bos_id=bos_id, eos_id=eos_id,
                   add_bos=add_bos, add_eos=add_eos, hf=hf, name=d.name)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (int32). BOS goes in front when ``add_bos`` is set;
        EOS is never appended, and special-token text is not parsed."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, not {type(text).__name__}")
        out: list[int] = []
        if self._add_bos:
            if self._bos_id is None:
                raise TokenizerError("vocabulary asks for BOS but has no BOS token")
            out.append(self._bos_id)
        if self._kind == "hf":
            if text:
                out.extend(self._hf.encode(text, add_special_tokens=False).ids)
            return np.asarray(out, dtype=np.int32)

        is_prev_special = True  # SPM: the first fragment gets the space prefix
        for frag in self._partition(text):
            if isinstance(frag, int):
                out.append(frag)
                is_prev_special = True
                continue
            if self._kind == "bpe":
                out.extend(self._hf.encode(frag, add_special_tokens=False).ids)
            else:
                if self._add_space_prefix and is_prev_special:
                    frag = " " + frag
                self._spm_encode_fragment(frag.replace(" ", _SPM_SPACE), out)
                is_prev_special = False
        return np.asarray(out, dtype=np.int32)

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of token ids. Control/unknown tokens render as nothing unless
        ``special`` is set. Invalid UTF-8 from partial byte tokens becomes U+FFFD.
        No clean-up of spaces is done, so ``decode(encode(s)) == s``."""
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).ravel().tolist()
        if self._kind == "hf":
            return self._hf.decode(ids, skip_special_tokens=not special)
        pieces = self._pieces()
        buf = bytearray()
        first_text = True
        for i in ids:
            if not 0 <= i < len(pieces):
                raise TokenizerError(f"token id {i} out of range [0, {len(pieces)})")
            t = self._types[i]
            if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN):
                if special:
                    buf += self._tokens[i].encode("utf-8", "surrogateescape")
                continue
            p = pieces[i]
            # SPM: undo the space that encode() put in front of the text
            if first_text and self._kind == "spm" and self._add_space_prefix and p.startswith(b" "):
                p = p[1:]
            if p:
                first_text = False
            buf += p
        return buf.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ internals
    def _partition(self, text: str) -> list[int | str]:
        """Cut user-defined tokens out of the text, in llama.cpp's order (tokenizer_st_partition)."""
        frags: list[int | str] = [text] if text else []
        for tid in self._user_defined:
            tt = self._tokens[tid]
            rstrip = tid in self._rstrip_ids
            new: list[int | str] = []
            for f in frags:
                if isinstance(f, int) or tt not in f:
                    new.append(f)
                    continue
                parts = f.split(tt)
                for k, part in enumerate(parts):
                    if k > 0:
                        new.append(tid)
                        if rstrip:
                            part = part.lstrip(_C_ISSPACE)
                    if part:
                        new.append(part)
            frags = new
        return frags

    def _spm_encode_fragment(self, text: str, out: list[int]) -> None:
        """SPM-encode one fragment, one independent chunk at a time (the result is the same)."""
        # A merge can only span the boundary between characters a and b when some
        # vocabulary token contains "ab". Where none does, the text to the left and to
        # the right is merged independently, and in the same relative order (the queue
        # orders by score, then position). So we cut there and cache the chunks, because
        # words repeat. This gives exactly the ids of one pass over the whole fragment.
        if self._spm_pairs is None:
            self._spm_pairs = frozenset(t[k:k + 2] for t in self._tokens for k in range(len(t) - 1))
        pairs = self._spm_pairs
        cache = self._spm_cache
        if len(cache) > 200_000:  # bound the memory use on huge, varied corpora
            cache.clear()
        start = 0
        n = len(text)
        for i in range(1, n + 1):
            if i < n and text[i - 1:i + 1] in pairs:
                continue
            chunk = text[start:i]
            ids = cache.get(chunk)
            if ids is None:
                ids = []
                self._spm_tokenize(chunk, ids)
                cache[chunk] = ids
            out.extend(ids)
            start = i

    def _spm_tokenize(self, text: str, out: list[int]) -> None:
        """llama.cpp's SPM session: greedy bigram merging by token score, then byte fallback."""
        n = len(text)
        if n == 0:
            return
        t2i = self._token_to_id
        scores = self._scores
        # symbol i covers text[start[i] : start[i] + length[i]]
        start = list(range(n))
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list[tuple[float, int, int, int]] = []

        def try_add(left: int, right: int) -> None:
            if left == -1 or right == -1:
                return
            s = start[left]
            size = length[left] + length[right]
            tid = t2i.get(text[s:s + size])
            if tid is None:
                return
            # max score first, then leftmost (the C++ comparator)
            heapq.heappush(heap, (-scores[tid], left, right, size))

        for i in range(1, n):
            try_add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ll, rl = length[left], length[right]
            if ll == 0 or rl == 0 or ll + rl != size:
                continue  # one of the symbols changed since this bigram was queued
            length[left] = ll + rl
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            try_add(prev[left], left)
            try_add(left, nxt[left])

        i = 0
        while i != -1:
            piece = text[start[i]:start[i] + length[i]]
            tid = t2i.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                # Only single characters can miss here: a merged symbol is always a token.
                for b in piece.encode("utf-8", "surrogateescape"):
                    out.append(self._spm_byte_token(b))
            i = nxt[i]

    def _spm_byte_token(self, b: int) -> int:
        tid = self._token_to_id.get(f"<0x{b:02X}>")
        if tid is None:
            tid = self._token_to_id.get(chr(b)) if b < 0x80 else None
        if tid is None:
            raise TokenizerError(f"SPM vocabulary has no byte token for 0x{b:02X} (no byte fallback)")
        return tid

    def _pieces(self) -> list[bytes]:
        # Bytes each token decodes to, as llama.cpp's token_to_piece(special=false) renders them
        if self._piece_cache is None:
            pieces: list[bytes] = []
            for text, t in zip(self._tokens, self._types):
                if t == TOKEN_TYPE_USER_DEFINED:
                    pieces.append(text.encode("utf-8", "surrogateescape"))
                elif t == TOKEN_TYPE_NORMAL:
                    if self._kind == "bpe":
                        pieces.append(_bpe_piece(text))
                    else:
                        pieces.append(text.replace(_SPM_SPACE, " ").encode("utf-8", "surrogateescape"))
                elif t == TOKEN_TYPE_BYTE and self._kind == "spm" and len(text) == 6 and text.startswith("<0x"):
                    pieces.append(bytes([int(text[3:5], 16)]))
                else:
                    pieces.append(b"")
            self._piece_cache = pieces
        return self._piece_cache


def _bpe_piece(text: str) -> bytes:
    """Bytes of a byte-level BPE token: each character maps back to one byte."""
    # A character outside the GPT-2 byte alphabet keeps its own UTF-8 bytes. llama.cpp
    # writes an "[UNK_BYTE_0x..]" marker there; keeping the text is more useful.
    out = bytearray()
    for c in text:
        b = _CHAR_TO_BYTE.get(c)
        if b is None:
            out += c.encode("utf-8", "surrogateescape")
        else:
            out.append(b)
    return bytes(out)


def _apply_llama_cpp_type_overrides(tokens: Sequence[str], types: list[int],
                                    meta: Mapping[str, Any]) -> list[int]:
    """Token-type fixes llama.cpp's loader makes from token text (llama_vocab::impl::load)."""
    types = list(types)
    idx = {t: i for i, t in enumerate(tokens)}
    for key, candidates in _AUTODETECT:
        if meta.get(key) is not None:
            continue
        # llama.cpp walks an unordered_map, so with several candidates it may pick any
        # one of them. We take the lowest id.
        found = sorted(idx[c] for c in candidates if c in idx)
        if found:
            types[found[0]] = TOKEN_TYPE_CONTROL
    for text in _EOG_TEXTS:
        i = idx.get(text)
        if i is not None:
            types[i] = TOKEN_TYPE_CONTROL
    for text in _FORCED_USER_DEFINED:
        i = idx.get(text)
        if i is not None:
            types[i] = TOKEN_TYPE_USER_DEFINED
    return types


def _rstrip_ids(tokens: Sequence[str], types: Sequence[int], meta: Mapping[str, Any]) -> frozenset[int]:
    """Tokens with llama.cpp's RSTRIP attribute. Only Phi-3 models (found by general.name)
    have them. For such a token, the whitespace after it in the text is dropped."""
    name = _as_str(meta.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return frozenset()
    ids = {i for i, t in enumerate(types)
           if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNKNOWN)}
    idx = {t: i for i, t in enumerate(tokens)}
    if "</s>" in idx:
        ids.add(idx["</s>"])
    for t in ("<unk>", "<s>", "<|endoftext|>"):
        ids.discard(idx.get(t, -1))
    return frozenset(ids)


def _build_hf_bpe(tokens: Sequence[str], merges: Sequence[str], regexes: Sequence[str],
                  ignore_merges: bool) -> Any:
    """A `tokenizers.Tokenizer` that does what llama.cpp's BPE session does. Each regex
    splits the pieces of the one before it, then the bytes are mapped to GPT-2
    characters, then the merges run by rank (leftmost first on ties)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for m in merges:
        # llama.cpp splits at the first space after position 0 (a merge may start with ' ')
        k = m.find(" ", 1)
        if k < 0:
            continue
        a, b = m[:k], m[k + 1:]
        # tokenizers rejects merges whose parts are not tokens; llama.cpp can never
        # apply those, except on characters missing from the vocabulary.
        if a not in vocab or b not in vocab or (a + b) not in vocab:
            continue
        if (a, b) in seen:  # llama.cpp keeps the first rank (map emplace)
            continue
        seen.add((a, b))
        pairs.append((a, b))
    model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False,
                       byte_fallback=False)
    tk = HFTokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk
