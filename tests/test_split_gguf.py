"""Split GGUF models (llama.cpp's gguf-split layout) read from their first shard as one model.

The shards are written here from the golden tiny model as gguf-split writes them: every
metadata key in the first shard only, each shard some tensors in order, and in every shard
split.no (u16), split.count (u16), split.tensors.count (i32). The split model must give
the unsplit file's tensors, logits, perplexity and quantized output; bad shards must end
in a named SplitError.
"""
from __future__ import annotations

import io

import pytest
import torch
from gguf import GGUFValueType

from conftest import GOLDEN, SHARED
from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
from evalkit.gguf.split import SplitError
from evalkit.model.model import Model
from evalkit.recipes import TypeOptions, quantize_model

BASE = GOLDEN / "gguf" / "tiny-base.gguf"
_SPLIT_TYPES = {"split.no": (GGUFValueType.UINT16, None), "split.count": (GGUFValueType.UINT16, None),
                "split.tensors.count": (GGUFValueType.INT32, None)}


def write_split(src, prefix, count: int = 3, *, no_of=lambda i: i, count_of=lambda i, c: c,
                total_of=lambda i, t: t, drop: int | None = None, dup: bool = False) -> list:
    """Write ``src`` as ``count`` gguf-split shards ``<prefix>-0000i-of-0000N.gguf``; the hooks
    corrupt one shard's keys for the error tests. Returns the shard paths."""
    paths = []
    with GGUFFile(src) as f:
        names = list(f.tensors)
        step = -(-len(names) // count)
        for i in range(count):
            part = names[i * step:(i + 1) * step]
            if drop is not None and i == count - 1:
                part = part[:-drop]
            if dup and i == count - 1:          # the last shard repeats shard 2's first tensor
                part = [names[step]] + part[1:]
            meta = dict(f.metadata) if i == 0 else {}
            types = dict(f.metadata_types) if i == 0 else {}
            meta.update({"split.no": no_of(i), "split.count": count_of(i, count),
                         "split.tensors.count": total_of(i, len(names))})
            types.update(_SPLIT_TYPES)
            path = prefix.parent / f"{prefix.name}-{i + 1:05d}-of-{count:05d}.gguf"
            specs = [TensorSpec(n, f.tensor(n).shape, f.tensor(n).type_id) for n in part]
            write_gguf(path, meta, specs, lambda s: f.tensor_bytes(s.name), metadata_types=types)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_split(BASE, tmp_path_factory.mktemp("split") / "tiny")


def test_first_shard_reads_as_the_whole_model(shards):
    with GGUFFile(BASE) as whole, GGUFFile(shards[0]) as split:
        assert list(split.tensors) == list(whole.tensors)
        assert sorted({t.shard for t in split.tensors.values()}) == [0, 1, 2]
        for name in whole.tensors:
            assert (split.tensor_bytes(name) == whole.tensor_bytes(name)).all(), name
        assert {k: v for k, v in split.metadata.items() if not k.startswith("split.")} == whole.metadata
    tokens = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975]])
    with torch.inference_mode():
        a = Model.from_gguf(str(shards[0])).forward(tokens)
        b = Model.from_gguf(str(BASE)).forward(tokens)
    assert torch.equal(a, b)


def test_quantize_from_the_first_shard_writes_the_same_file(shards, tmp_path):
    opts = TypeOptions(pure=True)
    quantize_model(str(shards[0]), tmp_path / "split.gguf", "Q4_0", options=opts, threads=2, progress=False)
    quantize_model(str(BASE), tmp_path / "whole.gguf", "Q4_0", options=opts, threads=2, progress=False)
    assert (tmp_path / "split.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    with GGUFFile(tmp_path / "split.gguf") as out:
        assert not any(k.startswith("split.") for k in out.metadata)


def test_perplexity_on_the_first_shard_equals_the_unsplit_file(shards, tmp_path):
    from evalkit.evaluation.perplexity import perplexity
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((SHARED / "data" / "wikitext-2-raw-test.txt").read_text()[:6000])
    a = perplexity(str(shards[0]), str(corpus), ctx=128, chunks=2, threads=2, out=io.StringIO())
    b = perplexity(str(BASE), str(corpus), ctx=128, chunks=2, threads=2, out=io.StringIO())
    assert a["n_tokens"] == b["n_tokens"] > 0 and a["ppl"] == b["ppl"]


# --------------------------------------------------------------------------- bad shards

def test_missing_shard_names_the_expected_file(tmp_path):
    paths = write_split(BASE, tmp_path / "m")
    paths[2].unlink()
    with pytest.raises(SplitError, match=r"shard 3 is missing \(expected the file .*m-00003-of-00003\.gguf\)"):
        GGUFFile(paths[0])


def test_shard_with_another_split_count(tmp_path):
    paths = write_split(BASE, tmp_path / "c", count_of=lambda i, c: 4 if i == 1 else c)
    with pytest.raises(SplitError, match="shard 2 of 4 .* expects shard 2 of 3"):
        GGUFFile(paths[0])


def test_shard_with_another_tensor_total(tmp_path):
    paths = write_split(BASE, tmp_path / "t", total_of=lambda i, t: t + 1 if i == 2 else t)
    with pytest.raises(SplitError, match="different models or splits"):
        GGUFFile(paths[0])


def test_shard_of_another_split_with_the_same_keys(tmp_path):
    """A last shard missing a tensor (all keys right): the total no longer adds up."""
    paths = write_split(BASE, tmp_path / "d", drop=1)
    with pytest.raises(SplitError, match="split.tensors.count is 21 but the 3 shards hold 20 tensors"):
        GGUFFile(paths[0])


def test_duplicate_tensor_across_shards(tmp_path):
    paths = write_split(BASE, tmp_path / "u", dup=True)
    with pytest.raises(SplitError, match=r"u-00003-of-00003.gguf: tensor .* is also in shard 2"):
        GGUFFile(paths[0])


def test_shard_swapped_for_another_shard_of_the_split(tmp_path):
    paths = write_split(BASE, tmp_path / "s")
    paths[2].write_bytes(paths[1].read_bytes())
    with pytest.raises(SplitError, match="says it is shard 2 of 3"):
        GGUFFile(paths[0])
    with GGUFFile(paths[1], shards=False) as alone:     # one shard alone is readable on request
        assert alone.metadata["split.no"] == 1 and len(alone.tensors) == 7


def test_non_first_shard_given(shards):
    with pytest.raises(SplitError, match=r"shard 2 of 3 .* give the first shard \(.*tiny-00001-of-00003\.gguf\)"):
        GGUFFile(shards[1])


def test_first_shard_not_named_by_the_split_pattern(shards, tmp_path):
    odd = tmp_path / "renamed.gguf"
    odd.write_bytes(shards[0].read_bytes())
    with pytest.raises(SplitError, match="must be named '<prefix>-00001-of-00003.gguf'"):
        GGUFFile(odd)


def test_model_identity_covers_every_shard(tmp_path):
    """A run's fingerprint and a base cache name a model by sha256_model: changing a later
    shard (its bytes, not the first shard's) must change it; an unsplit file keeps its file hash."""
    import hashlib
    import shutil

    from evalkit.files import sha256_file, sha256_model
    paths = write_split(BASE, tmp_path / "m")
    before = sha256_model(paths[0])
    assert before != sha256_file(paths[0])
    h = hashlib.sha256(sha256_file(paths[0]).encode())
    for p in paths[1:]:
        h.update(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}".encode())
    assert before == h.hexdigest()                  # independent recomputation
    other = write_split(GOLDEN / "gguf" / "tiny-iqk-mix.gguf", tmp_path / "o")
    shutil.copyfile(other[2], paths[2])            # the third shard swapped for another model's
    assert sha256_model(paths[0]) != before
    assert sha256_model(BASE) == sha256_file(BASE)
