"""Tokenizer: exact token ids against the reference (llama.cpp / ik_llama.cpp)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, SHARED
from evalkit.model.tokenizer import Tokenizer, read_corpus

CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"
GOLDEN_IDS = GOLDEN / "tokens" / "smollm2-wikitext-2-raw-test.npy"
TINY_BASE = GOLDEN / "gguf" / "tiny-base.gguf"


def _gguf_metadata(path) -> dict:
    """GGUF key/values as plain Python values (str, int, float, bool, lists of them)."""
    from evalkit.gguf import GGUFFile

    with GGUFFile(path) as f:
        return dict(f.metadata)


def _smollm2_path() -> Path:
    # Located without importing the package; a missing install fails the suite.
    from evalkit.sources import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(_gguf_metadata(_smollm2_path()))


# --------------------------------------------------------------------------- golden


def test_golden_ids_whole_corpus(smollm2, shared_dir):
    golden = np.load(GOLDEN_IDS)
    assert golden.dtype == np.int32 and golden.shape == (301948,)
    raw = CORPUS.read_bytes().decode("utf-8")
    # The golden array is the reference's tokenization of the file as it is, final
    # LF included (golden/README.md: "only the last token can differ from what
    # [llama-perplexity] sees").
    ids = smollm2.encode(raw)
    assert ids.dtype == np.int32
    assert ids.shape == golden.shape
    assert np.array_equal(ids, golden)

    # What llama-perplexity tokenizes: one trailing LF stripped. The final " \n"
    # becomes " ", so only the last id changes and the count stays the same.
    stripped = smollm2.encode(read_corpus(CORPUS))
    assert stripped.shape == golden.shape
    assert np.array_equal(stripped[:-1], golden[:-1])
    assert smollm2.vocab[golden[-1]] == "\u0120\u010a"  # "Ġ" + "Ċ" = " \n"
    assert smollm2.vocab[stripped[-1]] == "\u0120"


def test_smollm2_properties(smollm2):
    assert smollm2.n_vocab == 49152 == len(smollm2.vocab)
    assert smollm2.add_bos is False
    assert smollm2.add_eos is False
    assert smollm2.bos_id == 1 and smollm2.eos_id == 2
    assert smollm2.vocab[0] == "<|endoftext|>"


def test_tiny_base_has_same_tokenizer(smollm2, shared_dir):
    tiny = Tokenizer.from_gguf_metadata(_gguf_metadata(TINY_BASE))
    assert tiny.vocab == smollm2.vocab
    assert tiny.add_bos == smollm2.add_bos
    text = read_corpus(CORPUS)[:20000]
    assert np.array_equal(tiny.encode(text), smollm2.encode(text))


# --------------------------------------------------------------------------- special tokens


def test_special_token_text_is_not_parsed(smollm2):
    text = "Hello<|endoftext|>world <|im_start|>user"
    ids = smollm2.encode(text)
    # parse_special=false: no control token may appear
    assert 0 not in ids and 1 not in ids
    pieces = [smollm2.vocab[i] for i in ids]
    assert pieces[:8] == ["Hello", "<", "|", "end", "of", "text", "|", ">"]
    # "<|endoftext|>" alone is plain text too, not [0]
    alone = smollm2.encode("<|endoftext|>")
    assert alone.tolist() != [0] and 0 not in alone
    assert smollm2.decode(ids) == text


def test_encode_empty_and_types(smollm2):
    e = smollm2.encode("")
    assert e.dtype == np.int32 and e.size == 0
    with pytest.raises(TypeError):
        smollm2.encode(b"bytes")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("text", [
    "The quick brown fox's 12345 jumps.\n\n = = Heading = = \n",
    "  leading  and   trailing   \t\r\n",
    "Ünïcödé: naïve café — 東京 😀 ½ ٣ x\u00a0y\u3000z",
    "don't I'LL we've 'quoted' ''",
    "\n",
    " ",
])
def test_decode_encode_roundtrip(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_decode_corpus_roundtrip(smollm2, shared_dir):
    text = read_corpus(CORPUS)
    assert smollm2.decode(smollm2.encode(text)) == text


def test_digits_are_split_singly(smollm2):
    # smollm pre-tokenizer: every \p{N} is its own piece
    ids = smollm2.encode("2024")
    assert [smollm2.vocab[i] for i in ids] == ["2", "0", "2", "4"]


# --------------------------------------------------------------------------- from_hf_dir


def test_from_hf_dir_matches_gguf(smollm2, tmp_path, shared_dir):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(smollm2._hf.to_str())
    hf.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.n_vocab == smollm2.n_vocab
    assert tok.bos_id == 1 and tok.eos_id == 2 and tok.add_bos is False
    for text in ("a<|endoftext|>b <|im_start|>", read_corpus(CORPUS)[:50000]):
        assert np.array_equal(tok.encode(text), smollm2.encode(text))
    s = "Hello, world <|endoftext|>!"
    assert tok.decode(tok.encode(s)) == s


# --------------------------------------------------------------------------- add_bos rules


def _byte_bpe_meta(pre: str | None, **extra) -> dict:
    from evalkit.model.tokenizer import _BYTE_TO_CHAR

    tokens = ["<s>", "</s>"] + [_BYTE_TO_CHAR[b] for b in range(256)] + ["he", "hel"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * 258,
        "tokenizer.ggml.merges": ["h e", "he l"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    meta.update(extra)
    return meta


@pytest.mark.parametrize("pre,expected", [
    ("llama-bpe", True), ("llama3", True), ("smollm", False), ("gpt-2", False),
    ("qwen2", False), ("default", False), (None, False),
])
def test_add_bos_default_when_key_absent(pre, expected):
    tok = Tokenizer.from_gguf_metadata(_byte_bpe_meta(pre))
    assert tok.add_bos is expected
    ids = tok.encode("hello")
    assert bool(ids[0] == 0) == expected
    assert [tok.vocab[i] for i in ids[int(expected):]] == ["hel", "l", "o"]


def test_add_bos_key_overrides_default():
    assert Tokenizer.from_gguf_metadata(
        _byte_bpe_meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": False})).add_bos is False
    tok = Tokenizer.from_gguf_metadata(
        _byte_bpe_meta("smollm", **{"tokenizer.ggml.add_bos_token": True}))
    assert tok.add_bos is True and tok.encode("h")[0] == 0
    assert 1 not in tok.encode("h")  # EOS is never appended


def test_user_defined_tokens_are_split_out_but_control_tokens_are_not():
    meta = _byte_bpe_meta("gpt-2")
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["<tool>"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [4]
    tok = Tokenizer.from_gguf_metadata(meta)
    ud = tok.n_vocab - 1
    ids = tok.encode("he<tool>he<s>").tolist()
    # user-defined: cut out even with parse_special=false; "<s>" (control): plain text
    assert ids == [258, ud, 258] + [tok.vocab.index(c) for c in "<s>"]
    assert tok.decode(ids) == "he<tool>he<s>"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("pre", ["tekken", "made-up-pre"])
def test_unsupported_pre_tokenizer_raises(pre):
    with pytest.raises(ValueError, match=pre):
        Tokenizer.from_gguf_metadata(_byte_bpe_meta(pre))


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv"])
def test_unsupported_tokenizer_model_raises(model):
    meta = _byte_bpe_meta("default")
    meta["tokenizer.ggml.model"] = model
    with pytest.raises(ValueError, match=model):
        Tokenizer.from_gguf_metadata(meta)


def test_read_corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"a\r\n\n\n")
    assert read_corpus(p) == "a\r\n\n"  # exactly one LF removed
    p.write_bytes(b"a\r\n")
    assert read_corpus(p) == "a\r"  # the CR stays
    p.write_bytes(b"no newline")
    assert read_corpus(p) == "no newline"
    p.write_bytes(b"ok\xff\n")
    with pytest.raises(ValueError, match="c.txt"):
        read_corpus(p)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_corpus(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- SPM


def _spm_meta(**extra) -> dict:
    # id: text, score, type (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte)
    vocab = [
        ("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3),
        ("<0x0A>", 0.0, 6), ("<0xC3>", 0.0, 6), ("<0xA9>", 0.0, 6),
        ("\u2581", -10.0, 1), ("h", -10.0, 1), ("e", -10.0, 1), ("l", -10.0, 1), ("o", -10.0, 1),
        ("\u2581h", -5.0, 1), ("he", -3.0, 1), ("ll", -2.0, 1), ("lo", -1.0, 1), ("llo", -4.0, 1),
        ("\u2581he", -6.0, 1), ("hello", -8.0, 1),
        ("a", -1.0, 1), ("aa", -1.0, 1),
        ("<", -10.0, 1), ("s", -10.0, 1), (">", -10.0, 1),
        ("<ud>", 0.0, 4),
    ]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [v[0] for v in vocab],
        "tokenizer.ggml.scores": [v[1] for v in vocab],
        "tokenizer.ggml.token_type": [v[2] for v in vocab],
    }
    meta.update(extra)
    return meta


def _spm_pieces(tok, text):
    return [tok.vocab[i] for i in tok.encode(text)]


def test_spm_score_order_and_defaults():
    tok = Tokenizer.from_gguf_metadata(_spm_meta())
    # SPM defaults: BOS on, BOS id 1, EOS id 2, space prefix on
    assert tok.add_bos is True and tok.bos_id == 1 and tok.eos_id == 2
    # "▁hello": lo(-1) first; then "ll" is stale; he(-3); llo(-4); "▁h" is stale;
    # ▁he(-6); "hello" is stale. Result: ▁he + llo, not the vocabulary's "hello".
    assert _spm_pieces(tok, "hello") == ["<s>", "\u2581he", "llo"]
    assert tok.decode(tok.encode("hello")) == "hello"


def test_spm_ties_go_leftmost():
    tok = Tokenizer.from_gguf_metadata(_spm_meta(**{
        "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.add_bos_token": False}))
    # both "aa" bigrams score -1: the left one merges first -> aa + a
    assert _spm_pieces(tok, "aaa") == ["aa", "a"]
    assert _spm_pieces(tok, "aaaa") == ["aa", "aa"]


def test_spm_byte_fallback_and_special_text():
    tok = Tokenizer.from_gguf_metadata(_spm_meta(**{"tokenizer.ggml.add_bos_token": False}))
    # 'é' is missing from the vocabulary -> its UTF-8 bytes; '\n' -> <0x0A>
    assert _spm_pieces(tok, "hé\n") == ["\u2581h", "<0xC3>", "<0xA9>", "<0x0A>"]
    assert tok.decode(tok.encode("hé\n")) == "hé\n"
    # control-token text is plain text (parse_special=false), not BOS
    assert _spm_pieces(tok, "<s>") == ["\u2581", "<", "s", ">"]
    # user-defined token is cut out; the text after it gets the space prefix again
    assert _spm_pieces(tok, "h<ud>h") == ["\u2581h", "<ud>", "\u2581h"]


# --------------------------------------------------------------------------- splitters
# Python ports of llama.cpp's hand-written gpt2 and llama3 splitters
# (unicode_regex_split_custom_*). They check that the Oniguruma regexes the Tokenizer
# uses split text the same way. The alphabet only has characters whose Unicode
# category has not changed between versions.

_WS = {0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
       0x2028, 0x2029, 0x202F, 0x205F, 0x3000}


def _cls(c: str) -> str:
    import unicodedata

    if ord(c) in _WS:
        return "W"
    cat = unicodedata.category(c)
    return {"L": "L", "N": "N"}.get(cat[0], "O")


def _split_custom(s: str, llama3: bool) -> list[str]:
    n = len(s)
    out: list[str] = []
    prev = 0

    def f(p):  # flags of position p; None outside the piece
        return _cls(s[p]) if 0 <= p < n else None

    def add(end):
        nonlocal prev
        if end > prev:
            out.append(s[prev:end])
        prev = end

    pos = 0
    while pos < n:
        c = s[pos]
        fl = f(pos)
        if c == "'" and pos + 1 < n:
            c1 = s[pos + 1].lower() if llama3 and s[pos + 1].isascii() else s[pos + 1]
            if c1 in "stmd":
                pos += 2
                add(pos)
                continue
            if pos + 2 < n:
                c2 = s[pos + 2].lower() if llama3 and s[pos + 2].isascii() else s[pos + 2]
                if c1 + c2 in ("re", "ve", "ll"):
                    pos += 3
                    add(pos)
                    continue
        if llama3:
            if not (c in "\r\n" or fl == "N") and (fl == "L" or f(pos + 1) == "L"):
                pos += 1
                while f(pos) == "L":
                    pos += 1
                add(pos)
                continue
            if fl == "N":
                ini = pos
                while f(pos) == "N":
                    pos += 1
                    if pos - ini >= 3:
                        add(pos)
                        ini = pos
                add(pos)
                continue
            fl2 = f(pos + 1) if c == " " else fl
            if fl2 not in ("W", "L", "N"):
                pos += c == " "
                while f(pos) == "O":
                    pos += 1
                while pos < n and s[pos] in "\r\n":
                    pos += 1
                add(pos)
                continue
        else:
            fl2 = f(pos + 1) if c == " " else fl
            if fl2 in ("L", "N", "O"):
                pos += c == " "
                while f(pos) == fl2:
                    pos += 1
                add(pos)
                continue
        nws, last_rn = 0, 0
        while f(pos + nws) == "W":
            if s[pos + nws] in "\r\n":
                last_rn = pos + nws + 1
            nws += 1
        if llama3 and last_rn > 0:
            pos = last_rn
            add(pos)
            continue
        if nws > 1 and pos + nws < n:
            pos += nws - 1
            add(pos)
            continue
        if nws > 0:
            pos += nws
            add(pos)
            continue
        pos += 1
        add(pos)
    return out


@pytest.mark.parametrize("which", ["gpt2", "llama3"])
def test_regex_matches_llama_cpp_custom_splitter(which):
    from tokenizers import Regex
    from tokenizers.pre_tokenizers import Split

    from evalkit.model.tokenizer import _RE_GPT2, _RE_LLAMA3

    split = Split(Regex(_RE_GPT2 if which == "gpt2" else _RE_LLAMA3), behavior="isolated")
    alphabet = list("aZsStTrReEvVlLmMdD'1234 \t\n\r\x0b\x0c.,!?-$€é中ǅ٣Ⅻ½\u0303\u200b") + [
        "\u00a0", "\u3000", "\u2028", "\x85", "  ", "\n\n", " \n", "'s", "'ll", "'RE"]
    rng = random.Random(1234)
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        got = [p for p, _ in split.pre_tokenize_str(s)]
        assert got == _split_custom(s, which == "llama3"), repr(s)


# --------------------------------------------------------------------------- pre-tokenizer plumbing


@pytest.mark.parametrize("pre,expected", [
    # one piece "12345": the merge "3 4" (rank 0) fires first
    ("gpt-2", ["12", "34", "5"]),
    # \p{N}{1,3} (llama3) and [0-9]{3} (default) cut "123" | "45"
    ("llama-bpe", ["123", "4", "5"]),
    ("default", ["123", "4", "5"]),
    # every digit on its own
    ("smollm", ["1", "2", "3", "4", "5"]),
    ("qwen2", ["1", "2", "3", "4", "5"]),
])
def test_pre_tokenizer_digit_splitting(pre, expected):
    meta = _byte_bpe_meta(pre, **{"tokenizer.ggml.add_bos_token": False})
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["34", "12", "123"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1, 1, 1]
    meta["tokenizer.ggml.merges"] = ["3 4", "1 2", "12 3"] + meta["tokenizer.ggml.merges"]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert [tok.vocab[i] for i in tok.encode("12345")] == expected


@pytest.mark.parametrize("pre,expected", [("llama-bpe", ["hello"]), ("gpt-2", ["hel", "l", "o"])])
def test_llama3_ignore_merges(pre, expected):
    # LLAMA3-type vocabularies take a whole pre-token that is in the vocabulary as is,
    # even when no merge path leads to it
    meta = _byte_bpe_meta(pre, **{"tokenizer.ggml.add_bos_token": False})
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"] + ["hello"]
    meta["tokenizer.ggml.token_type"] = meta["tokenizer.ggml.token_type"] + [1]
    tok = Tokenizer.from_gguf_metadata(meta)
    assert [tok.vocab[i] for i in tok.encode("hello")] == expected


def test_spm_chunked_encode_equals_single_pass():
    # encode() cuts SPM text where no token can span the cut; that must not change ids
    tok = Tokenizer.from_gguf_metadata(_spm_meta(**{"tokenizer.ggml.add_bos_token": False}))
    rng = random.Random(7)
    alphabet = list("helloa <s>\n") + ["é", "  "]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))).replace("<ud>", "")
        one_pass: list[int] = []
        tok._spm_tokenize((" " + text).replace(" ", "\u2581"), one_pass)
        assert tok.encode(text).tolist() == one_pass, repr(text)
