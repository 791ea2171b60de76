"""GGUF fuzz suite: structured corruptions of the golden files through the real commands.

Each kind edits one field of tiny-base.gguf (or tiny-iqk-mix.gguf) with the surgery of
``gguf_corrupt`` and runs ``evalkit run`` (the corrupt file as a variant), ``evalkit
perplexity`` and ``evalkit quantize --dry-run`` in-process through ``evalkit.cli.main``.
Every command must end with exit status 2 and a one-line message naming the problem (or
exit 0 where the corruption cannot matter to it, with an unchanged result), no traceback,
within seconds, with bounded memory, writing nothing outside its run folder.

The long run (``EVALKIT_FUZZ_LONG=1``; ``EVALKIT_FUZZ_SEED``, ``EVALKIT_FUZZ_CASES``) adds
more kinds of the same families and seeded random byte flips and truncations.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import re
import signal
import struct
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml

from conftest import GOLDEN, SHARED
from gguf_corrupt import (ARRAY, BOOL, FLOAT32, INT32, STRING, UINT32, UINT64, KV, Layout, nested_array,
                          pack_array, pack_scalar, pack_str, parse)

GG = GOLDEN / "gguf"
BASE = GG / "tiny-base.gguf"
MIX = GG / "tiny-iqk-mix.gguf"
COMMANDS = ("run", "perplexity", "quantize")
FAIL_SECONDS = 5.0          # a rejected file is rejected at once: a hang or a huge loop shows here
OK_SECONDS = 30.0           # a whole (tiny) evaluation, imports included
HARD_STOP_SECONDS = 60.0    # interrupts a real hang so the suite reports it instead of stalling
PEAK_MIB = 200


# --------------------------------------------------------------------------- the cases

@dataclass(frozen=True)
class Case:
    """One kind of corruption: how to make the file, and what each command must say.

    ``expect`` maps a command to (exit status, substring): the substring must appear on
    stderr for status 2, on stdout for status 0 (None: the result must equal the pristine file's).
    """

    kind: str
    make: Callable[[Path], None]
    expect: dict = field(default_factory=dict)


CASES: list[Case] = []          # the quick suite (every `pytest tests` run)
LONG_CASES: list[Case] = []     # more kinds of the same families, run with EVALKIT_FUZZ_LONG=1
LONG = pytest.mark.skipif(os.environ.get("EVALKIT_FUZZ_LONG") != "1", reason="set EVALKIT_FUZZ_LONG=1 for the long run")


@functools.lru_cache(maxsize=None)
def _pristine(path: Path) -> Layout:
    return parse(path.read_bytes())


def kind(name: str, message: str, long: bool = False, src: Path = BASE, **per_command):
    """Register a corruption: ``fn(layout)`` edits a copy (or returns the file's bytes).

    ``message`` is the stderr substring every command must print; ``run=``, ``perplexity=``,
    ``quantize=`` and ``write=`` (a real quantization) override it with (status, substring).
    ``long``: only in the long run (the quick suite keeps to its time budget).
    """
    def deco(fn):
        def make(path: Path) -> None:
            layout = _pristine(src).copy()
            out = fn(layout)
            if isinstance(out, (bytes, bytearray)):
                path.write_bytes(out)
            else:
                layout.write(path)
        expect = {c: (2, message) for c in COMMANDS}
        expect.update(per_command)
        (LONG_CASES if long else CASES).append(Case(name, make, expect))
        return fn
    return deco


U32 = functools.partial(pack_scalar, UINT32)


def _set_u32(layout: Layout, key: str, value: int) -> None:
    layout.set_kv(key, UINT32, U32(value))


def _array_header(layout: Layout, key: str, itype: int | None = None, count: int | None = None) -> None:
    kv = layout.kv(key)
    old_itype, old_count = struct.unpack_from("<IQ", kv.payload)
    kv.payload = struct.pack("<IQ", old_itype if itype is None else itype,
                             old_count if count is None else count) + kv.payload[12:]


# -- header
kind("magic_ggml", "not a GGUF file")(lambda l: setattr(l, "magic", b"GGML"))
kind("magic_zero", "not a GGUF file", long=True)(lambda l: setattr(l, "magic", b"\0\0\0\0"))
kind("file_of_two_bytes", "not a GGUF file")(lambda l: b"GG")
kind("version_1", "version 1 is not supported")(lambda l: setattr(l, "version", 1))
kind("version_4", "version 4 is not supported", long=True)(lambda l: setattr(l, "version", 4))
kind("version_big_endian", "other byte order")(lambda l: setattr(l, "version", 3 << 24))
kind("tensor_count_2p63", "tensor count 9223372036854775808")(lambda l: setattr(l, "n_tensors", 2**63))
kind("tensor_count_2p31", "tensor count 2147483648")(lambda l: setattr(l, "n_tensors", 2**31))
kind("kv_count_max", "metadata count 18446744073709551615")(lambda l: setattr(l, "n_kv", 2**64 - 1))
kind("kv_count_2p24", "metadata count 16777216", long=True)(lambda l: setattr(l, "n_kv", 2**24))
kind("tensor_count_plus_one", "tensor '' has 3123044096 dimensions")(
    lambda l: setattr(l, "n_tensors", len(l.tensors) + 1))
kind("kv_count_minus_one", "tensor name at offset 1768797 claims 8796093022208 bytes")(
    lambda l: setattr(l, "n_kv", len(l.kvs) - 1))
kind("truncated_in_header", "truncated")(lambda l: l.build()[:100])
kind("truncated_after_version", "truncated", long=True)(lambda l: l.build()[:8])
kind("truncated_in_tensor_infos", "truncated", long=True)(lambda l: l.header()[:-200])

# -- metadata entries
kind("key_length_2p62", "claims 4611686018427387904 bytes")(lambda l: setattr(l.kvs[0], "key_len", 2**62))
kind("key_length_past_eof", "metadata key #0", long=True)(lambda l: setattr(l.kvs[0], "key_len", 40_000_000))
kind("key_not_utf8", "not valid UTF-8")(lambda l: setattr(l.kvs[0], "key", b"general.\xffrchitecture"))
kind("key_duplicate", "duplicate metadata key 'general.name'")(
    lambda l: l.kvs.insert(2, KV(b"general.name", STRING, pack_str("again"))))
kind("value_type_13", "unknown value type 13")(lambda l: setattr(l.kv("general.name"), "vtype", 13))
kind("value_type_max", "unknown value type 4294967295", long=True)(
    lambda l: setattr(l.kv("general.name"), "vtype", 2**32 - 1))
kind("string_length_2p63", "claims 9223372036854775808 bytes")(
    lambda l: setattr(l.kv("general.name"), "payload", struct.pack("<Q", 2**63) + b"tiny"))
kind("string_length_past_eof", "value of 'general.name'", long=True)(
    lambda l: setattr(l.kv("general.name"), "payload", struct.pack("<Q", 40_000_000) + b"tiny"))
kind("array_item_type_77", "unknown element type 77")(lambda l: _array_header(l, "tokenizer.ggml.token_type", 77))
kind("array_length_2p61", "claims 2305843009213693952 elements")(
    lambda l: _array_header(l, "tokenizer.ggml.token_type", count=2**61))
kind("string_array_length_2p60", "'tokenizer.ggml.tokens' claims 1152921504606846976 elements")(
    lambda l: _array_header(l, "tokenizer.ggml.tokens", count=2**60))
kind("nested_array_deep", "array of arrays")(
    lambda l: l.kvs.insert(1, KV(b"evil.nested", ARRAY, nested_array(200_000))))
kind("nested_array_one_level", "array of arrays", long=True)(lambda l: l.set_kv("evil.nested", ARRAY, nested_array(1)))


def _token_length(layout: Layout, index: int, length: int) -> None:
    kv = layout.kv("tokenizer.ggml.tokens")
    pos = 12
    for _ in range(index):
        pos += 8 + struct.unpack_from("<Q", kv.payload, pos)[0]
    kv.payload = kv.payload[:pos] + struct.pack("<Q", length) + kv.payload[pos + 8:]


kind("string_element_length_2p40", "element 4 of metadata array 'tokenizer.ggml.tokens'")(
    lambda l: _token_length(l, 4, 2**40))
kind("string_array_count_plus_one", "metadata key #18 at offset 763187 claims 21474836489 bytes")(
    lambda l: _array_header(l, "tokenizer.ggml.tokens", count=49153))

# -- hyper-parameters (the tokenizer does not read them: run and perplexity reach the model)
B = "llama.block_count"
kind("block_count_2p31", B)(lambda l: _set_u32(l, B, 2**31))
kind("block_count_u64_2p63", B, long=True)(lambda l: l.set_kv(B, UINT64, pack_scalar(UINT64, 2**63)))
kind("block_count_0", B)(lambda l: _set_u32(l, B, 0))
kind("block_count_minus_1", B)(lambda l: l.set_kv(B, INT32, pack_scalar(INT32, -1)))
kind("block_count_3", B)(lambda l: _set_u32(l, B, 3))
kind("block_count_1", B, long=True)(lambda l: _set_u32(l, B, 1))
kind("block_count_string", B)(lambda l: l.set_kv(B, STRING, pack_str("2")))
kind("block_count_float", B, long=True)(lambda l: l.set_kv(B, FLOAT32, pack_scalar(FLOAT32, 2.0)))
kind("block_count_array", B, long=True)(lambda l: l.set_kv(B, ARRAY, pack_array(UINT32, [2, 2])))
kind("block_count_missing", B)(lambda l: l.drop_kv(B))
# the quantizer's type rules tolerate zero heads (recurrent architectures have none): its plan is unchanged
H, HKV = "llama.attention.head_count", "llama.attention.head_count_kv"
kind("head_count_0", H, quantize=(0, None))(lambda l: _set_u32(l, H, 0))
kind("head_count_kv_0", HKV, quantize=(0, None))(lambda l: _set_u32(l, HKV, 0))
kind("head_count_3_divides_nothing", H, quantize=(0, None))(lambda l: _set_u32(l, H, 3))
kind("head_count_kv_3", HKV, long=True, quantize=(0, None))(lambda l: _set_u32(l, HKV, 3))
kind("head_count_u32_max", HKV, long=True, quantize=(0, None))(lambda l: _set_u32(l, H, 2**32 - 1))
kind("head_count_per_layer_unequal", "per-layer values", long=True, quantize=(0, None))(
    lambda l: l.set_kv(H, ARRAY, pack_array(UINT32, [4, 8])))
kind("head_count_bool", H, long=True)(lambda l: l.set_kv(H, BOOL, pack_scalar(BOOL, 1)))
kind("embedding_length_0", "llama.embedding_length", long=True, quantize=(0, None))(
    lambda l: _set_u32(l, "llama.embedding_length", 0))
kind("embedding_length_2p40", "'token_embd.weight' has shape (256, 49152)", long=True, quantize=(0, None))(
    lambda l: l.set_kv("llama.embedding_length", UINT64, pack_scalar(UINT64, 2**40)))
kind("feed_forward_length_0", "llama.feed_forward_length", long=True, quantize=(0, None))(
    lambda l: _set_u32(l, "llama.feed_forward_length", 0))
kind("vocab_size_2p31", "'token_embd.weight' has shape (256, 49152)", quantize=(0, None))(
    lambda l: _set_u32(l, "llama.vocab_size", 2**31))
kind("rope_dimension_count_odd", "llama.rope.dimension_count", long=True, quantize=(0, None))(
    lambda l: _set_u32(l, "llama.rope.dimension_count", 63))
kind("rms_epsilon_nan", "llama.attention.layer_norm_rms_epsilon", quantize=(0, None))(
    lambda l: l.set_kv("llama.attention.layer_norm_rms_epsilon", FLOAT32, pack_scalar(FLOAT32, float("nan"))))
kind("rope_freq_base_0", "llama.rope.freq_base", long=True, quantize=(0, None))(
    lambda l: l.set_kv("llama.rope.freq_base", FLOAT32, pack_scalar(FLOAT32, 0.0)))
kind("context_length_string", "llama.context_length", long=True, quantize=(0, None))(
    lambda l: l.set_kv("llama.context_length", STRING, pack_str("2048")))
kind("architecture_unknown", "unsupported architecture 'gpt99'", quantize=(2, "gpt99.block_count"))(
    lambda l: l.set_kv("general.architecture", STRING, pack_str("gpt99")))
kind("architecture_missing", "unsupported architecture None", quantize=(2, "general.architecture"))(
    lambda l: l.drop_kv("general.architecture"))
kind("architecture_integer", "unsupported architecture 7", long=True, quantize=(2, "general.architecture"))(
    lambda l: _set_u32(l, "general.architecture", 7))

# -- general.alignment
A = "general.alignment"
kind("alignment_array", A)(lambda l: l.set_kv(A, ARRAY, pack_array(UINT32, [32])))
kind("alignment_float", A)(lambda l: l.set_kv(A, FLOAT32, pack_scalar(FLOAT32, 32.0)))
kind("alignment_string", A, long=True)(lambda l: l.set_kv(A, STRING, pack_str("32")))
kind("alignment_bool", A, long=True)(lambda l: l.set_kv(A, BOOL, pack_scalar(BOOL, 1)))
kind("alignment_0", "general.alignment 0 is not a power of two")(lambda l: _set_u32(l, A, 0))
kind("alignment_48", "general.alignment 48 is not a power of two")(lambda l: _set_u32(l, A, 48))
kind("alignment_2p31", "past the end of the file")(lambda l: _set_u32(l, A, 2**31))
kind("alignment_4096_offsets_unaligned", "is not aligned to 4096", long=True)(lambda l: _set_u32(l, A, 4096))

# -- tensor infos
kind("tensor_name_length_2p62", "claims 4611686018427387904 bytes")(
    lambda l: setattr(l.tensors[0], "name_len", 2**62))
kind("tensor_name_not_utf8", "not valid UTF-8")(lambda l: setattr(l.tensors[1], "name", b"output_\xc3(norm.weight"))
kind("tensor_name_too_long", "is too long")(lambda l: setattr(l.tensors[1], "name", b"output_norm." + b"x" * 60))
kind("n_dims_0", "has 0 dimensions", long=True)(lambda l: setattr(l.tensors[1], "n_dims", 0))
kind("n_dims_5", "has 5 dimensions")(lambda l: setattr(l.tensors[1], "dims", [256, 1, 1, 1, 1]))
kind("n_dims_u32_max", "has 4294967295 dimensions")(lambda l: setattr(l.tensors[1], "n_dims", 2**32 - 1))
kind("dim_0", "empty dimension")(lambda l: setattr(l.tensor("blk.0.attn_q.weight"), "dims", [256, 0]))
kind("dim_2p62_overflows_int64", "overflow int64")(
    lambda l: setattr(l.tensor("token_embd.weight"), "dims", [256, 2**62]))
kind("dim_u64_max", "overflow int64", long=True)(
    lambda l: setattr(l.tensor("blk.0.attn_k.weight"), "dims", [256, 2**64 - 1]))
kind("dims_product_overflows", "overflow int64")(
    lambda l: setattr(l.tensor("blk.0.ffn_up.weight"), "dims", [256, 2**32, 2**32]))
kind("dim_2p40_beyond_data", "lies beyond the end of the file")(
    lambda l: setattr(l.tensor("output.weight"), "dims", [256, 2**40]))
kind("row_not_block_multiple", "not a multiple of Q8_0's block size 32")(
    lambda l: setattr(l.tensor("token_embd.weight"), "dims", [250, 49152]))
kind("type_id_99", "unknown ggml type id 99")(lambda l: setattr(l.tensor("blk.0.attn_k.weight"), "type_id", 99))
kind("type_id_u32_max", "unknown ggml type id 4294967295", long=True)(
    lambda l: setattr(l.tensor("blk.0.attn_k.weight"), "type_id", 2**32 - 1))
kind("type_f16_to_f32_overlaps_next", "overlaps tensor 'blk.0.attn_k.weight'")(
    lambda l: setattr(l.tensor("blk.0.attn_q.weight"), "type_id", 0))
kind("type_last_tensor_grows_past_eof", "lies beyond the end of the file", long=True)(
    lambda l: setattr(l.tensor("blk.1.ffn_down.weight"), "type_id", 0))
kind("offset_unaligned", "is not aligned to 32")(lambda l: setattr(l.tensor("blk.0.attn_v.weight"), "offset",
                                                                   l.tensor("blk.0.attn_v.weight").offset + 1))
kind("offset_past_eof", "lies beyond the end of the file")(
    lambda l: setattr(l.tensor("blk.1.ffn_norm.weight"), "offset", 40 << 20))
kind("offset_2p63", "lies beyond the end of the file", long=True)(lambda l: setattr(l.tensors[1], "offset", 2**63))


def _same_offset(layout: Layout, a: str, b: str, delta: int = 0) -> None:
    layout.tensor(b).offset = layout.tensor(a).offset + delta


kind("offset_shared", "tensors 'blk.0.attn_k.weight' and 'blk.0.attn_v.weight' both start")(
    lambda l: _same_offset(l, "blk.0.attn_k.weight", "blk.0.attn_v.weight"))
kind("offset_overlaps_partly", "'blk.0.attn_q.weight' (F16, shape (256, 256), 131072 bytes")(
    lambda l: _same_offset(l, "blk.0.attn_q.weight", "blk.0.attn_k.weight", 1024))
kind("tensor_name_duplicate", "duplicate tensor name 'blk.0.attn_q.weight'")(
    lambda l: setattr(l.tensor("blk.0.attn_k.weight"), "name", b"blk.0.attn_q.weight"))
kind("shape_swapped", "'blk.0.attn_k.weight' has shape (128, 256), expected (256, 128)",
     quantize=(0, "128×256"))(lambda l: setattr(l.tensor("blk.0.attn_k.weight"), "dims", [128, 256]))
kind("tensor_missing", "'blk.1.ffn_down.weight' is missing", quantize=(0, "20 tensors"))(
    lambda l: l.drop_tensors(lambda n: n == "blk.1.ffn_down.weight"))
kind("layer_missing", B)(lambda l: l.drop_tensors(lambda n: n.startswith("blk.1.")))
kind("layer_extra", B, long=True)(lambda l: setattr(l.tensor("output_norm.weight"), "name", b"blk.2.attn_norm.weight"))
kind("token_embd_missing", "'token_embd.weight' is missing", long=True, run=(2, "no token_embd.weight"),
     quantize=(0, "20 tensors"))(lambda l: l.drop_tensors(lambda n: n == "token_embd.weight"))
kind("no_tensors", B, long=True, run=(2, "no token_embd.weight"))(lambda l: l.drop_tensors(lambda n: True))

# -- tensor data
kind("truncated_by_100_bytes", "lies beyond the end of the file")(lambda l: l.build()[:-100])
kind("truncated_in_half", "lies beyond the end of the file", long=True)(lambda l: l.build()[: len(l.build()) // 2])
kind("truncated_at_data_start", "lies beyond the end of the file", long=True)(lambda l: l.header())


def _poke(layout: Layout, name: str, dtype, index: int, value) -> None:
    layout.values(name, dtype)[index] = value


NAN16, INF16 = np.float16("nan"), np.float16("inf")
kind("nan_output_norm", "'output_norm.weight' holds a non-finite value nan at element 0", quantize=(0, None),
     write=(2, "'output_norm.weight' (F32) holds a non-finite weight nan at row 0, column 0"))(
    lambda l: l.values("output_norm.weight", np.float32).fill(np.nan))
kind("inf_attn_norm", "'blk.0.attn_norm.weight' holds a non-finite value inf at element 7", long=True,
     quantize=(0, None),
     write=(2, "'blk.0.attn_norm.weight' (F32) holds a non-finite weight inf at row 0, column 7"))(
    lambda l: _poke(l, "blk.0.attn_norm.weight", np.float32, 7, np.inf))
kind("nan_f16_attn_q", "in chunk 0 at position 32", quantize=(0, None),
     write=(2, "'blk.0.attn_q.weight' (F16) holds a non-finite weight nan at row 3, column 5"))(
    lambda l: _poke(l, "blk.0.attn_q.weight", np.float16, 3 * 256 + 5, NAN16))
kind("inf_f16_ffn_down", "in chunk 0 at position 32", long=True, quantize=(0, None),
     write=(2, "'blk.1.ffn_down.weight' (F16) holds a non-finite weight -inf at row 10, column 20"))(
    lambda l: _poke(l, "blk.1.ffn_down.weight", np.float16, 10 * 768 + 20, -INF16))


def _nan_q8_scale(layout: Layout) -> None:
    # Q8_0 block: f16 scale then 32 int8; every output row's first block scale -> NaN
    raw = layout.values("output.weight", np.uint8)
    raw.reshape(49152, -1)[:, :2].view(np.float16)[:] = NAN16


kind("nan_q8_0_scales", "in chunk 0 at position 32", quantize=(0, None))(_nan_q8_scale)

# -- the IQK mix (row headers, IQK sizes)
kind("iqk_type_grows_overlaps", "overlaps tensor 'blk.0.ffn_up.weight'", src=MIX)(
    lambda l: setattr(l.tensor("blk.0.ffn_gate.weight"), "type_id", 8))
kind("iqk_truncated", "lies beyond the end of the file", long=True, src=MIX)(lambda l: l.build()[:-4096])


def _harmless(layout: Layout) -> None:
    # an explicit alignment of 64 that every offset already honours, and keys nobody reads
    _set_u32(layout, A, 64)
    layout.pad_to = 64
    layout.set_kv("evalkit.fuzz.note", STRING, pack_str("ünïcode ✓"))
    layout.set_kv("evalkit.fuzz.values", ARRAY, pack_array(FLOAT32, [1.5, -2.0]))


kind("harmless_alignment_64_and_extra_keys", "", run=(0, None), perplexity=(0, None), quantize=(0, None))(
    _harmless)


# --------------------------------------------------------------------------- running the commands

class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so no handler in evalkit swallows it."""


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")            # resets VmHWM (Linux): the peak then covers this call only
        return True
    except OSError:
        return False


def _rss_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field_name}:\s+(\d+)", fh.read()).group(1))


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    seconds: float
    peak_mib: float


def _call(argv: list[str], capsys) -> Outcome:
    """evalkit.cli.main(argv) with a hard stop, its time and its memory peak above the start."""
    from evalkit.cli import main

    capsys.readouterr()
    use_hwm = _peak_rss_reset()
    if use_hwm:
        base = _rss_kib("VmRSS")
    else:
        tracemalloc.start()

    def alarm(*_):
        raise _Hang(f"{argv[0]} still running after {HARD_STOP_SECONDS} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HARD_STOP_SECONDS)
    t0 = time.perf_counter()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:              # argparse
        rc = e.code
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    dt = time.perf_counter() - t0
    if use_hwm:
        peak = (_rss_kib("VmHWM") - base) / 1024
    else:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    cap = capsys.readouterr()
    return Outcome(rc, cap.out, cap.err, dt, peak)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("fuzz-corpus") / "small.txt"
    p.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:6000])
    return p


def _argv(command: str, model: Path, corpus: Path, work: Path) -> list:
    if command == "perplexity":
        return ["perplexity", model, "--corpus", corpus, "--ctx", "64", "--chunks", "2", "--threads", "2",
                "--json", work / "out" / "ppl.json"]
    if command == "quantize":
        return ["quantize", model, "--type", "Q8_0", "--dry-run"]
    if command == "write":
        return ["quantize", model, work / "out" / "q8.gguf", "--type", "Q8_0", "--threads", "2", "--no-progress"]
    cfg = {"name": "fuzz", "base": str(BASE), "corpus": str(corpus), "ctx": 64, "chunks": 2, "threads": 2,
           "output_dir": str(work / "out"), "variants": [{"name": "v", "gguf": str(model)}]}
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["run", path, "--no-progress"]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _tensor_rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if re.match(r"\s*\d+\s", line)]


def _check_outcome(case: Case, command: str, o: Outcome, reference: dict) -> None:
    rc, needle = case.expect[command]
    where = f"{case.kind} / {command}: rc {o.rc}\nstderr: {o.err[-2000:]}"
    assert "Traceback" not in o.err and "Traceback" not in o.out, where
    assert o.rc == rc, where
    if rc == 2:
        lines = [ln for ln in o.err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"evalkit {'quantize' if command == 'write' else command}: "
                                                       "error: "), where
        assert needle in lines[0], f"{where}\nexpected: {needle!r}"
        assert len(lines[0]) < 600, where
    elif needle is not None:
        assert needle in o.out, f"{where}\nstdout: {o.out[-2000:]}\nexpected: {needle!r}"
    else:
        _check_unchanged(command, o, reference, where)
    limit = FAIL_SECONDS if rc == 2 else OK_SECONDS
    assert o.seconds < limit, f"{where}\ntook {o.seconds:.1f} s"
    assert o.peak_mib < PEAK_MIB, f"{where}\npeak memory +{o.peak_mib:.0f} MiB"


def _check_unchanged(command: str, o: Outcome, reference: dict, where: str) -> None:
    """Exit 0 on a corrupt file is only acceptable with the pristine file's result."""
    if command == "quantize":
        assert _tensor_rows(o.out) == _tensor_rows(reference["quantize"]), where
    elif command == "perplexity":
        got = json.loads(Path(reference["ppl_json"]).read_text())
        assert got["ppl"] == reference["perplexity"]["ppl"], f"{where}\n{got}"
        assert got["running_ppl"] == reference["perplexity"]["running_ppl"], f"{where}\n{got}"
    else:
        # the variant holds the base's weights: no divergence (up to the log-sum-exp's rounding)
        v = json.loads(Path(reference["run_results"]).read_text())["variants"]["v"]
        assert v["same_top_p"][0] == 1.0 and abs(v["kld_mean"][0]) < 1e-6, f"{where}\n{v}"
        assert v["ppl"][0] == pytest.approx(v["ppl_base"][0], rel=1e-6), f"{where}\n{v}"


@pytest.fixture(scope="module", autouse=True)
def base_tokenizer_once():
    """Build the pristine base's tokenizer once for every `run` case.

    Each case's `run` tokenizes the same corpus with the untouched golden base before it
    reaches the corrupt variant; building that vocabulary is most of a case's time, and
    the suite keeps to its budget by doing it once. The corrupt files are never cached.
    """
    import evalkit.evaluation.corpus_chunks as corpus_chunks

    real = getattr(corpus_chunks, "tokenizer_for", None)
    if real is None:            # the pipeline changed: run unpatched, only slower
        yield
        return
    built = {}

    def tokenizer_for(path):
        if Path(path).resolve() != BASE.resolve():
            return real(path)
        if "base" not in built:
            built["base"] = real(path)
        return built["base"]

    patch = pytest.MonkeyPatch()
    patch.setattr(corpus_chunks, "tokenizer_for", tokenizer_for)    # what encode_corpus calls
    yield
    patch.undo()


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    """The pristine golden file's dry-run plan and perplexity result (computed once).

    Also imports what a finished `run` needs (tables, plots): a case's memory peak is
    measured above the process's footprint, and first imports would count as its own.
    """
    import importlib

    from evalkit.cli import main

    for mod in ("torch", "pandas", "pyarrow", "matplotlib.pyplot", "evalkit.pipeline", "evalkit.report.plots",
                "evalkit.report.tables", "torch._dynamo"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    work = tmp_path_factory.mktemp("reference")
    (work / "out").mkdir()
    plan = io.StringIO()
    with contextlib.redirect_stdout(plan):
        assert main(["quantize", str(BASE), "--type", "Q8_0", "--dry-run"]) == 0
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([str(a) for a in _argv("perplexity", BASE, corpus, work)]) == 0
    return {"quantize": plan.getvalue(), "perplexity": json.loads((work / "out" / "ppl.json").read_text())}


def _run_case(case: Case, corpus: Path, reference: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    work, cwd = tmp_path / "work", tmp_path / "cwd"
    (work / "out").mkdir(parents=True)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    model = work / f"{case.kind}.gguf"
    case.make(model)
    reference = {**reference, "run_results": work / "out" / "fuzz" / "results.json",
                 "ppl_json": work / "out" / "ppl.json"}
    try:
        for command in [c for c in (*COMMANDS, "write") if c in case.expect]:
            argv = _argv(command, model, corpus, work)
            before = _files(work)
            o = _call(argv, capsys)
            _check_outcome(case, command, o, reference)
            new = _files(work) - before
            outside = {p for p in new if work / "out" not in p.parents}
            assert not outside, f"{case.kind} / {command} wrote outside its run folder: {sorted(outside)}"
            if command == "quantize" or (command == "write" and o.rc == 2):
                assert not new, f"{case.kind} / {command} left files: {sorted(new)}"
            assert not list(cwd.iterdir()), f"{case.kind} / {command} wrote into the working directory"
    finally:
        model.unlink()


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_corrupt_gguf(case: Case, corpus, reference, tmp_path, capsys, monkeypatch):
    """Each command rejects the corruption with a named error (or is provably unaffected)."""
    _run_case(case, corpus, reference, tmp_path, capsys, monkeypatch)


@LONG
@pytest.mark.parametrize("case", LONG_CASES, ids=[c.kind for c in LONG_CASES])
def test_corrupt_gguf_long(case: Case, corpus, reference, tmp_path, capsys, monkeypatch):
    """The long run's further kinds, held to the same rules."""
    _run_case(case, corpus, reference, tmp_path, capsys, monkeypatch)


def test_enough_kinds():
    """At least 60 kinds, each with its own expectation for every command."""
    every = CASES + LONG_CASES
    assert len(CASES) >= 60 and len({c.kind for c in every}) == len(every)
    assert all(set(COMMANDS) <= set(c.expect) for c in every)


# --------------------------------------------------------------------------- the long random run

@LONG
def test_random_flips_and_truncations(corpus, reference, tmp_path, capsys, monkeypatch):
    """Seeded random byte flips and truncations: every outcome is exit 0 or a named error (2)."""
    seed = int(os.environ.get("EVALKIT_FUZZ_SEED", "20240601"))
    n = int(os.environ.get("EVALKIT_FUZZ_CASES", "300"))
    rng = random.Random(seed)
    raw = BASE.read_bytes()
    layout = _pristine(BASE)
    infos_at = len(layout.header()) - sum(len(t.to_bytes()) for t in layout.tensors) - 32
    # where a flip lands: the fixed header and first keys, the tensor infos, the whole header, the data
    regions = [(0, 1024), (infos_at, infos_at + 1600), (0, infos_at), (0, len(raw))]
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    model = work / "random.gguf"
    for i in range(n):
        blob = bytearray(raw)
        if rng.random() < 0.15:
            blob = blob[:rng.randrange(0, len(blob))]
            label = f"truncate at {len(blob)}"
        else:
            lo, hi = rng.choices(regions, weights=(4, 4, 1, 1))[0]
            flips = [(rng.randrange(lo, hi), rng.randrange(256)) for _ in range(rng.choice((1, 1, 2, 4, 8)))]
            for pos, val in flips:
                blob[pos] = val
            label = f"bytes {flips}"
        model.write_bytes(bytes(blob))
        commands = ("perplexity", "quantize") if i % 4 else COMMANDS
        for command in commands:
            o = _call(_argv(command, model, corpus, work), capsys)
            where = f"seed {seed} case {i} ({label}) / {command}: rc {o.rc}\n{o.err[-2000:]}"
            assert "Traceback" not in o.err and o.rc in (0, 2), where
            if o.rc == 2:
                assert o.err.strip().startswith(f"evalkit {command}: error: "), where
            assert o.seconds < OK_SECONDS and o.peak_mib < PEAK_MIB, f"{where}\n{o.seconds:.1f} s, {o.peak_mib:.0f} MiB"
