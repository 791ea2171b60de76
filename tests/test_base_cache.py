"""The base cache: final hidden states instead of logits, exact logits again, named errors."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN
from evalkit.evaluation import ModelForward, ScoredWindow, evaluate, load_model
from evalkit.evaluation.base_cache import (BaseCache, BaseCacheError, BaseCacheHeader, CachedBaseForward,
                                           HiddenCapture, output_projection, tokens_sha256, write_base_cache)
from evalkit.metrics.logits_file import file_size
from evalkit.model import Workspace

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    model = load_model(TINY)
    window = ScoredWindow(64)
    chunks = np.random.default_rng(3).integers(0, model.config.n_vocab, (5, 64)).astype(np.int32)
    fwd = ModelForward(model, window, Workspace())
    hidden, logits = [], []
    with HiddenCapture(model) as cap:
        for group, outputs in evaluate([("base", fwd)], chunks, range(5), 2):
            for _, rows, _ in outputs:
                logits.append(rows.copy())
                hidden.extend(cap.last)
    header = BaseCacheHeader("corpus-sha", 64, 5, "base-sha", model.config.n_embd, window.first_row,
                             tokens_sha256(chunks))
    path = tmp_path_factory.mktemp("cache") / "base.ekc"
    write_base_cache(path, header, hidden)
    return path, chunks, window, np.concatenate(logits), model.config.n_vocab


def test_cached_logits_are_bit_identical_and_the_base_model_is_not_loaded(made, monkeypatch):
    import evalkit.model.model as mm
    path, chunks, window, want, _ = made

    def no_model(*a, **k):
        raise AssertionError("the base model was loaded")
    monkeypatch.setattr(mm.Model, "from_gguf", classmethod(no_model))
    monkeypatch.setattr(mm.Model, "from_source", classmethod(no_model))
    cache = BaseCache(path)
    cache.check("corpus-sha", 64, chunks, "base-sha")
    fwd = CachedBaseForward(cache, output_projection(TINY), window, chunks, Workspace())
    got = []
    for group, outputs in evaluate([("cache", fwd)], chunks, range(5), 2):
        for _, rows, _ in outputs:
            got.append(rows.copy())
    assert np.array_equal(np.concatenate(got), want)


def test_the_cache_is_far_smaller_than_the_logits_file(made):
    path, chunks, _, _, n_vocab = made
    # per chunk: (C - C/2) · n_embd floats against (C - 1 - C/2) · 2 · (n_vocab + 4) bytes
    assert path.stat().st_size * 20 <= file_size(64, n_vocab, 5)


def test_mismatches_are_named_errors(made, tmp_path):
    path, chunks, window, _, _ = made
    cache = BaseCache(path)
    with pytest.raises(BaseCacheError, match="another corpus"):
        cache.check("other", 64, chunks, "base-sha")
    with pytest.raises(BaseCacheError, match="another n_ctx"):
        cache.check("corpus-sha", 128, chunks, "base-sha")
    with pytest.raises(BaseCacheError, match="another chunk tokens"):
        cache.check("corpus-sha", 64, chunks[::-1], "base-sha")
    with pytest.raises(BaseCacheError, match="another base model"):
        cache.check("corpus-sha", 64, chunks, "other-base")
    data = path.read_bytes()
    for name, blob, msg in (("cut", data[:-100], "truncated"), ("foreign", b"GGUF" + data[4:], "bad magic"),
                            ("empty", b"", "bad magic"), ("hdr", data[:12] + b"{" * 40 + data[52:], "header")):
        p = tmp_path / name
        p.write_bytes(blob)
        with pytest.raises(BaseCacheError, match=msg):
            BaseCache(p)
    with pytest.raises(BaseCacheError, match="not found"):
        BaseCache(tmp_path / "nothing")
    fwd = CachedBaseForward(cache, output_projection(TINY), window, chunks[:2])
    with pytest.raises(BaseCacheError, match="not in the cache"):
        fwd(chunks[2:3] + 1)
