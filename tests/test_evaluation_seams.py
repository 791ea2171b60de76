"""The evaluation loop's seams: the scored window, `evaluate` over plain forward callables,
perplexity through a non-model forward callable, and named errors → exit 2 in the CLI."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import yaml

from conftest import GOLDEN, SHARED
from evalkit.cli import main as cli_main
from evalkit.evaluation import ScoredWindow, batched, chunks_per_call, evaluate

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


@pytest.mark.parametrize("n_ctx", [3, 4, 9, 64, 512])
def test_scored_window_is_llama_perplexity_second_half(n_ctx):
    w = ScoredWindow(n_ctx)
    first = n_ctx // 2
    assert w.first_row == first
    assert w.n_rows == n_ctx - 1 - first
    assert list(w.targets_pos) == list(range(first + 1, n_ctx))
    z = np.arange(2 * (n_ctx - first) * 3, dtype=np.float32).reshape(2, n_ctx - first, 3)
    rows = w.scored_rows(z)
    assert rows.shape == (2, w.n_rows, 3)
    # row r of the scored rows predicts target position first + 1 + r
    assert np.array_equal(rows[:, -1], z[:, -2])


def test_scored_window_rejects_a_context_that_scores_nothing():
    with pytest.raises(ValueError, match="at least 3"):
        ScoredWindow(2)


def test_evaluate_calls_each_forward_lazily_in_order_per_group():
    calls = []

    def make(name, scale):
        def fn(tokens):
            calls.append((name, tokens[:, 0].tolist()))
            return tokens[:, :, None].astype(np.float32) * scale
        return fn

    chunks = np.arange(5 * 4).reshape(5, 4)
    seen = []
    for group, outputs in evaluate([("a", make("a", 1)), ("b", make("b", 2))], chunks, [0, 2, 3, 4], 3):
        for name, z, secs in outputs:
            # the callable ran just before its output is handed over, never ahead of it
            assert calls[-1][0] == name
            assert secs >= 0
            seen.append((name, group, z[:, 0, 0].tolist()))
    assert seen == [("a", [0, 2, 3], [0, 8, 12]), ("b", [0, 2, 3], [0, 16, 24]),
                    ("a", [4], [16]), ("b", [4], [32])]


def test_batching_helpers():
    assert chunks_per_call(2048, 512) == 4
    assert chunks_per_call(100, 512) == 1
    assert batched(range(5), 2) == [[0, 1], [2, 3], [4]]


def test_perplexity_of_a_uniform_forward_callable_is_the_vocabulary_size():
    """Any callable is a forward pass: uniform logits must give PPL = n_vocab exactly."""
    from evalkit.evaluation.corpus_chunks import chunk_corpus
    from evalkit.metrics import PerplexityAccumulator, token_nll

    n_vocab, n_ctx = 50, 16
    stream = np.random.default_rng(0).integers(0, n_vocab, 5 * n_ctx)

    class Tok:
        add_bos, bos_id = True, 1

    cc = chunk_corpus(Tok(), stream, "sha", "synthetic", n_ctx, None)
    assert cc.n_chunks == 5 and (cc.chunks[:, 0] == 1).all()
    assert np.array_equal(cc.targets(2), stream[2 * n_ctx + 9: 3 * n_ctx])

    def uniform(tokens):
        return np.zeros((tokens.shape[0], cc.window.n_rows, n_vocab), dtype=np.float32)

    acc = PerplexityAccumulator()
    for group, outputs in evaluate([("u", uniform)], cc.chunks, range(cc.n_chunks), 2):
        for _, rows, _ in outputs:
            for j, k in enumerate(group):
                acc.add(token_nll(rows[j], cc.targets(k)))
    assert acc.count == 5 * 7
    assert math.isclose(math.exp(acc.mean_and_se()[0]), n_vocab, rel_tol=1e-12)


def test_model_forward_returns_the_scored_rows_of_the_full_logits():
    from evalkit.evaluation import ModelForward, load_model
    from evalkit.model import Workspace

    model = load_model(TINY)
    w = ScoredWindow(32)
    tokens = np.random.default_rng(1).integers(0, model.config.n_vocab, (2, 32)).astype(np.int32)
    rows = ModelForward(model, w, Workspace())(tokens)
    import torch
    with torch.no_grad():
        full = model.forward(torch.from_numpy(tokens.astype(np.int64))).numpy()
    assert rows.shape == (2, w.n_rows, model.config.n_vocab)
    np.testing.assert_allclose(rows, full[:, w.first_row:-1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- named errors → exit 2

def _run_cli(tmp_path, capsys, **cfg):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:6000])
    d = {"name": "t", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 2,
         "output_dir": str(tmp_path / "out")}
    d.update(cfg)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    rc = cli_main(["run", str(path), "--no-progress"])
    return rc, capsys.readouterr().err


def _gguf_with(tmp_path, name, edit_meta=None, truncate=None):
    from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
    src = GGUFFile(TINY)
    meta = dict(src.metadata)
    if edit_meta:
        edit_meta(meta)
    out = tmp_path / name
    write_gguf(out, meta, [TensorSpec(t.name, t.shape, t.type_id) for t in src.tensors.values()],
               lambda s: src.tensor_bytes(s.name), src.metadata_types)
    if truncate:
        data = out.read_bytes()
        out.write_bytes(data[: len(data) - truncate])
    return out


def test_run_with_an_unsupported_tokenizer_exits_2_with_a_message(tmp_path, capsys):
    base = _gguf_with(tmp_path, "odd-tokenizer.gguf",
                      lambda m: m.__setitem__("tokenizer.ggml.model", "rwkv-world"))
    rc, err = _run_cli(tmp_path, capsys, base=str(base))
    assert rc == 2
    assert err.startswith("evalkit run: error:") and "rwkv-world" in err
    assert "Traceback" not in err


def test_run_with_a_corrupt_variant_gguf_exits_2_with_a_message(tmp_path, capsys):
    bad = _gguf_with(tmp_path, "cut.gguf", truncate=5000)
    rc, err = _run_cli(tmp_path, capsys, variants=[{"name": "cut", "gguf": str(bad)}])
    assert rc == 2
    assert err.startswith("evalkit run: error:") and "cut.gguf" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "t" / "results.json").exists()


def test_perplexity_with_a_non_utf8_corpus_exits_2(tmp_path, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes(b"caf\xe9 " * 400)
    rc = cli_main(["perplexity", str(TINY), "--corpus", str(corpus), "--ctx", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and "not valid UTF-8" in err and "latin1.txt" in err


def test_run_takes_any_forward_factory(tmp_path):
    """A forward callable of one's own plugs into `evalkit run` through make_forward: here the
    variant is the base itself with every logit shifted by 3, which softmax cannot see."""
    from evalkit.evaluation.forward import exact_forward
    from evalkit.pipeline import run
    from evalkit.run_config import config_from_dict

    corpus = tmp_path / "c.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:6000])
    built = []

    def shifted(path, window, buffer):
        fn = exact_forward(path, window, buffer)
        built.append(path.name)
        if len(built) == 1:
            return fn                              # the base
        return lambda tokens: fn(tokens) + np.float32(3.0)

    cfg = config_from_dict({"name": "s", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 2,
                            "output_dir": str(tmp_path / "out"),
                            "variants": [{"name": "shifted", "gguf": str(TINY)}]}, "test", str(tmp_path))
    res = json.loads((run(cfg, progress=False, make_forward=shifted) / "results.json").read_text())
    v = res["variants"]["shifted"]
    assert built == ["tiny-base.gguf", "tiny-base.gguf"]
    assert 0 <= v["kld_mean"][0] < 1e-6 and v["same_top_p"][0] == 1.0
    assert math.isclose(v["ppl"][0], res["base"]["ppl"][0], rel_tol=1e-5)


def test_progress_advances_within_a_batched_group(monkeypatch):
    """With 4 chunks per call and 2 callables, the bar moves by 2 chunks after each callable."""
    import tqdm.auto
    seen = []

    class Bar:
        def __init__(self, *a, **k):
            self.n = 0.0

        def update(self, k):
            self.n += k
            seen.append(self.n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    fns = [("a", lambda t: t.astype(np.float32)), ("b", lambda t: t.astype(np.float32))]
    for _, outputs in evaluate(fns, np.zeros((6, 4)), range(6), 4, progress=True):
        for _ in outputs:
            pass
    assert seen == [2.0, 4.0, 5.0, 6.0]
