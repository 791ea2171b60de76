"""The memory modes used the wrong way: what a hostile pass over base_cache, resident: one and
order: layer found, each a named error now (the rest of that pass is in the other test files:
mismatched, truncated and foreign caches, kill and resume, refused key combinations)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import GOLDEN, SHARED
from evalkit.errors import RunError
from evalkit.evaluation.corpus_chunks import chunk_corpus, encode_corpus
from evalkit.evaluation.layer_major import LayerMajor

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def test_spill_into_a_folder_that_cannot_be_made(tmp_path):
    """Hidden states that must spill, with spill_dir under a regular file: a RunError naming the
    folder (it was an uncaught FileExistsError/NotADirectoryError traceback)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    text = (SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:20000]
    enc = encode_corpus(TINY, text)
    cc = chunk_corpus(enc, enc.stream, "sha", "head", 64, 2)
    with LayerMajor([("base", TINY)], spill_dir=blocker / "hidden", spill=True) as lm:
        with pytest.raises(RunError, match=r"spill_dir .*a-file/hidden cannot be created"):
            lm.run(cc.chunks, range(2), 1, cc.window)


def test_perplexity_refuses_a_spill_dir_without_layer_order(tmp_path):
    from evalkit.evaluation.perplexity import perplexity
    corpus = tmp_path / "c.txt"
    corpus.write_text((SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:20000])
    with pytest.raises(RunError, match="--spill-dir applies to --order layer only"):
        perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, order="model",
                   spill_dir=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_layer_order_with_a_spill_dir_gives_the_model_orders_ppl(tmp_path):
    """The same command with --order layer and a spill folder works and equals --order model."""
    import io

    from evalkit.evaluation.perplexity import perplexity
    corpus = tmp_path / "c.txt"
    corpus.write_text((SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:20000])
    out = io.StringIO()
    a = perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, out=out, order="model")
    b = perplexity(str(TINY), str(corpus), ctx=64, chunks=2, progress=False, out=out, order="layer",
                   spill_dir=str(tmp_path / "s"))
    assert np.array_equal(a["ppl"], b["ppl"])


def test_base_cache_pointing_at_a_folder(tmp_path):
    from evalkit.evaluation.base_cache import BaseCache, BaseCacheError
    with pytest.raises(BaseCacheError, match="is a folder; base_cache names the cache file"):
        BaseCache(tmp_path)


def test_a_damaged_cache_byte_is_a_named_error_not_another_kld(tmp_path):
    """One flipped byte in a chunk's stored hidden states fails that chunk's CRC-32 when read."""
    from evalkit.evaluation.base_cache import BaseCache, BaseCacheError, BaseCacheHeader, write_base_cache
    rng = np.random.default_rng(0)
    states = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]
    path = tmp_path / "c.ekc"
    write_base_cache(path, BaseCacheHeader("c", 16, 3, "b", 16, 8, "t"), states)
    cache = BaseCache(path)
    assert all(np.array_equal(cache.chunk(k), states[k]) for k in range(3))
    raw = bytearray(path.read_bytes())
    raw[-4 * 3 - 4 * 8 * 16 + 5] ^= 0x10          # a byte of chunk 2's states
    path.write_bytes(bytes(raw))
    cache = BaseCache(path)
    assert np.array_equal(cache.chunk(1), states[1])
    with pytest.raises(BaseCacheError, match="chunk 2 fail their checksum"):
        cache.chunk(2)


def test_a_format_1_cache_is_refused_by_name(tmp_path):
    import json
    import struct

    from evalkit.evaluation.base_cache import MAGIC, BaseCache, BaseCacheError
    head = json.dumps({"corpus_sha256": "c", "n_ctx": 16, "n_chunks": 1, "base_sha256": "b", "n_embd": 4,
                       "first_row": 8, "tokens_sha256": "t", "format": 1}, sort_keys=True).encode()
    blob = MAGIC + struct.pack("<I", len(head)) + head
    blob += b"\0" * (-len(blob) % 64) + np.zeros((8, 4), np.float32).tobytes()
    (tmp_path / "old.ekc").write_bytes(blob)
    with pytest.raises(BaseCacheError, match="format 1, this evalkit reads format 2"):
        BaseCache(tmp_path / "old.ekc")
