"""What keeps a run's memory bounded: blocked log-softmax, ops called without the dispatcher,
libraries imported only when needed, the header cache dropped with the models, the heap trimmed.

Each test compares against an independent computation or checks the property in a fresh
interpreter (what is imported is a per-process fact).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from evalkit.evaluation.reference import log_softmax_f32
from evalkit.model import ops

REPO = Path(__file__).resolve().parents[1]


def _log_softmax_whole(z: np.ndarray) -> np.ndarray:
    """The formula on the whole array at once (what log_softmax_f32 computed before blocking)."""
    m = z.max(axis=1, keepdims=True)
    s = np.exp(z - m).sum(axis=1, dtype=np.float64, keepdims=True)
    return (z - m - np.log(s).astype(np.float32)).astype(np.float32)


@pytest.mark.parametrize("rows,block", [(1, 32), (31, 32), (256, 32), (100, 7), (64, 1000)])
def test_blocked_log_softmax_is_bit_identical(rows, block):
    rng = np.random.default_rng(rows * 1000 + block)
    z = (rng.standard_normal((rows, 4099)) * 6).astype(np.float32)
    z[0, 5] = 80.0                      # a dominant logit: exp underflows elsewhere in that row
    got = log_softmax_f32(z, block_rows=block)
    assert got.dtype == np.float32 and got.shape == z.shape
    assert np.array_equal(got.view(np.uint32), _log_softmax_whole(z).view(np.uint32))


def test_log_softmax_matches_float64_reference():
    rng = np.random.default_rng(7)
    z = (rng.standard_normal((40, 1000)) * 4).astype(np.float32)
    ref = z.astype(np.float64) - np.log(np.exp(z.astype(np.float64)).sum(axis=1, keepdims=True))
    assert np.max(np.abs(log_softmax_f32(z) - ref)) < 2e-5


def _qlinear_args():
    from evalkit import quantize
    from evalkit.formats import get_format
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    q = torch.from_numpy(np.asarray(quantize(w, "Q8_0")))
    x = torch.randn(5, 256)
    return x, q, get_format("Q8_0").type_id


def test_direct_call_equals_dispatcher():
    x, q, tid = _qlinear_args()
    via_op = torch.ops.evalkit.qlinear(x, q, tid, 256, 1)
    direct = ops.call("qlinear", x, q, tid, 256, 1)
    assert torch.equal(via_op, direct)
    out = torch.empty(5, 48)
    ops.call("qlinear_out", x, q, tid, 256, 1, out)
    assert torch.equal(out, via_op)


def test_direct_path_only_in_plain_eager():
    x, q, tid = _qlinear_args()
    assert ops._plain_eager((x, q, tid))
    with torch.device("cpu"):           # a function mode: the dispatcher decides
        assert not ops._plain_eager((x, q, tid))
    xg = x.clone().requires_grad_(True)
    assert not ops._plain_eager((xg, q, tid))
    with torch.no_grad():
        assert ops._plain_eager((xg, q, tid))
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        fq = mode.from_tensor(q)
        assert not ops._plain_eager((fx, fq, tid))
        y = ops.call("qlinear", fx, fq, tid, 256, 1)     # through the fake kernel
        assert tuple(y.shape) == (5, 48)


def _fresh(code: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_eager_forward_imports_neither_dynamo_nor_pandas(tmp_path):
    """A model's forward and the run's planning leave torch._dynamo (sympy) and pandas unimported:
    ~135 MB of RSS that would sit beside every model a run loads."""
    got = _fresh(
        "import json, sys, numpy as np\n"
        "import evalkit.pipeline\n"
        "from evalkit.evaluation.forward import load_model, model_logits\n"
        "from evalkit.sources import resolve_model\n"
        "m = load_model(resolve_model('smollm2'))\n"
        "z = model_logits(m, np.arange(100, 164).reshape(1, 64), 32)\n"
        "print(json.dumps({'finite': bool(np.isfinite(z).all()), 'shape': list(z.shape),\n"
        "  'dynamo': 'torch._dynamo' in sys.modules, 'pandas': 'pandas' in sys.modules}))\n")
    assert got == {"finite": True, "shape": [1, 32, 49152], "dynamo": False, "pandas": False}


def test_forget_headers_then_reopen(shared_dir):
    from evalkit.gguf import GGUFFile
    from evalkit.gguf.reader import _HEADER_CACHE, forget_headers
    path = shared_dir / "golden" / "gguf" / "tiny-iqk-mix.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    with GGUFFile(path) as f:
        before = (dict(f.metadata), list(f.tensors))
    assert _HEADER_CACHE
    forget_headers()
    assert not _HEADER_CACHE
    with GGUFFile(path) as f:
        assert (dict(f.metadata), list(f.tensors)) == before


def test_heap_controls():
    from evalkit import memory
    import platform
    took = memory.bound_heap()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert took is True
    memory.return_freed_memory()        # must be callable anywhere


def test_encode_corpus_on_its_worker_thread_gives_the_golden_tokens(shared_dir):
    """encode_corpus tokenizes on a worker thread (for the heap): the whole corpus must still give
    the reference's tokenization (golden/tokens), the file read as it is."""
    from evalkit.evaluation.corpus_chunks import encode_corpus
    from evalkit.sources import resolve_model
    golden = np.load(shared_dir / "golden" / "tokens" / "smollm2-wikitext-2-raw-test.npy")
    raw = (shared_dir / "data" / "wikitext-2-raw-test.txt").read_bytes().decode("utf-8")
    enc = encode_corpus(resolve_model("smollm2"), raw)
    assert enc.stream.dtype == np.int32 and enc.stream.flags.owndata
    assert np.array_equal(enc.stream, golden)
    assert (enc.n_vocab, enc.add_bos) == (49152, False)


def test_encode_corpus_errors_reach_the_caller(tmp_path):
    from evalkit.evaluation.corpus_chunks import encode_corpus
    from evalkit.gguf import GGUFError
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")          # truncated header
    with pytest.raises(GGUFError, match="not-a-model.gguf"):
        encode_corpus(bad, "some text")
