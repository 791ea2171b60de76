"""`evalkit perplexity`: llama-perplexity's numbers on float weights, and its error cases."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOLDEN, REPO, SHARED
from evalkit.evaluation.perplexity import perplexity

CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"
REF = json.loads((GOLDEN / "stats" / "reference-stats.json").read_text())


def test_tiny_base_8_chunks_matches_reference():
    out = io.StringIO()
    res = perplexity(str(GOLDEN / "gguf" / "tiny-base.gguf"), str(CORPUS), ctx=512, chunks=8, threads=2, out=out)
    ppl, err = res["ppl"]
    ref_ppl, ref_err = REF["tiny"]["base_ppl"]
    assert abs(ppl / ref_ppl - 1) < 5e-4, (ppl, ref_ppl)
    assert abs(err / ref_err - 1) < 1e-2, (err, ref_err)
    assert res["n_tokens"] == 8 * 255
    assert "Final estimate: PPL = " in out.getvalue() and "[8]" in out.getvalue()


@pytest.mark.slow
def test_smollm2_first_chunks_follow_the_reference_running_ppl():
    """CI uses 4 chunks; the 40-chunk figure (22.3046 +/- 0.66990) is measured in the closing note."""
    res = perplexity("smollm2", str(CORPUS), ctx=512, chunks=4, threads=2, out=io.StringIO())
    want = REF["smollm2"]["base_running_ppl"][:4]
    np.testing.assert_allclose(res["running_ppl"], want, rtol=5e-4)


def test_iqk_mix_runs_end_to_end():
    res = perplexity(str(GOLDEN / "gguf" / "tiny-iqk-mix.gguf"), str(CORPUS), ctx=128, chunks=2, threads=2,
                     out=io.StringIO())
    assert np.isfinite(res["ppl"]).all() and res["ppl"][0] > 1


def test_corpus_shorter_than_two_chunks(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of tokens here .\n")
    with pytest.raises(ValueError, match=r"need at least 2\*n_ctx = 1024 tokens"):
        perplexity(str(GOLDEN / "gguf" / "tiny-base.gguf"), str(short), ctx=512, out=io.StringIO())


def test_tokenizer_vocabulary_size_differs_from_model(tmp_path):
    from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
    src = GGUFFile(GOLDEN / "gguf" / "tiny-base.gguf")
    meta = dict(src.metadata)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        meta[key] = list(meta[key])[:-10]
    bad = tmp_path / "short-vocab.gguf"
    write_gguf(bad, meta, [TensorSpec(t.name, t.shape, t.type_id) for t in src.tensors.values()],
               lambda s: src.tensor_bytes(s.name), src.metadata_types)
    with pytest.raises(ValueError, match="49142 tokens but the model's vocabulary has 49152"):
        perplexity(str(bad), str(CORPUS), ctx=64, chunks=2, out=io.StringIO())


@pytest.mark.slow
def test_cli_json_and_errors(tmp_path):
    js = tmp_path / "ppl.json"
    r = subprocess.run([sys.executable, "-m", "evalkit", "perplexity", str(GOLDEN / "gguf" / "tiny-base.gguf"),
                        "--corpus", str(CORPUS), "--ctx", "64", "--chunks", "2", "--threads", "2",
                        "--json", str(js)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "Final estimate: PPL = " in r.stdout
    res = json.loads(js.read_text())
    assert {"ppl", "running_ppl", "n_tokens", "tokens_per_s"} <= set(res) and len(res["running_ppl"]) == 2
    r = subprocess.run([sys.executable, "-m", "evalkit", "perplexity", str(tmp_path / "nope.gguf"),
                        "--corpus", str(CORPUS)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.slow
def test_batching_chunks_does_not_change_the_result():
    # 5 chunks, one per call vs three per call (the last call ragged): same NLLs up to
    # float32 GEMM rounding, same output lines
    tiny = str(GOLDEN / "gguf" / "tiny-base.gguf")
    one, three = io.StringIO(), io.StringIO()
    a = perplexity(tiny, str(CORPUS), ctx=64, chunks=5, threads=2, out=one, batch=64)
    b = perplexity(tiny, str(CORPUS), ctx=64, chunks=5, threads=2, out=three, batch=3 * 64 + 10)
    assert a["batch"] == 64 and b["batch"] == 202 and len(b["running_ppl"]) == 5
    np.testing.assert_allclose(b["running_ppl"], a["running_ppl"], rtol=1e-6)
    assert [s.split("]")[0] for s in one.getvalue().split(",")[:5]] == \
        [s.split("]")[0] for s in three.getvalue().split(",")[:5]]
