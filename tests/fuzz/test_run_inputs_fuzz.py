"""Hostile run configurations and corpora: each is refused by `evalkit run` with exit 2 and one
named message, quickly, without a traceback and without writing outside its own folder."""
from __future__ import annotations

import os
import resource
import time

import pytest
import yaml

from conftest import GOLDEN, SHARED
from evalkit.cli import main as cli_main

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


@pytest.fixture(scope="module", autouse=True)
def _warm(tmp_path_factory):
    """One valid evaluation first: torch, the kernels and the tokenizer are then loaded, so the
    peak-RSS growth each case is allowed measures the case, not the imports."""
    import io

    from evalkit.evaluation.perplexity import perplexity
    d = _good(tmp_path_factory.mktemp("warm"))
    perplexity(str(TINY), d["corpus"], ctx=64, chunks=2, out=io.StringIO())


def _good(tmp):
    corpus = tmp / "c.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:6000])
    return {"name": "f", "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": 2,
            "output_dir": str(tmp / "out"), "variants": [{"name": "v", "gguf": str(TINY)}]}


def _set(key, value):
    def edit(d, tmp):
        d[key] = value
    return edit


def _variant(**kw):
    def edit(d, tmp):
        d["variants"] = [dict({"name": "v", "gguf": str(TINY)}, **kw)]
    return edit


def _corpus_bytes(data: bytes):
    def edit(d, tmp):
        (tmp / "bad.txt").write_bytes(data)
        d["corpus"] = str(tmp / "bad.txt")
    return edit


def _fifo_corpus(d, tmp):
    os.mkfifo(tmp / "fifo")
    d["corpus"] = str(tmp / "fifo")


def _dir_corpus(d, tmp):
    d["corpus"] = str(tmp)


def _output_dir_file(d, tmp):
    (tmp / "afile").write_text("x")
    d["output_dir"] = str(tmp / "afile")


def _output_dir_below_file(d, tmp):
    (tmp / "afile").write_text("x")
    d["output_dir"] = str(tmp / "afile" / "sub")


# kind -> (edit of a good config, substring the message must contain)
CONFIG_CASES = {
    "unknown-key": (_set("chunkz", 3), "unknown key 'chunkz'"),
    "name-missing": (_set("name", None), "'name'"),
    "name-traversal": (_set("name", "../../x"), "not a plain name"),
    "name-absolute": (_set("name", "/etc"), "not a plain name"),
    "name-dot": (_set("name", ".x"), "not a plain name"),
    "name-list": (_set("name", ["a"]), "'name'"),
    "variant-name-slash": (_variant(name="a/b"), "not a plain name"),
    "variant-name-dotdot": (_variant(name=".."), "not a plain name"),
    "variant-not-mapping": (_set("variants", ["IQ4_K"]), "must be a mapping"),
    "variants-not-list": (_set("variants", {"a": 1}), "'variants' must be a list"),
    "variant-unknown-key": (_variant(bpw=4), "unknown key 'bpw'"),
    "variant-both": (_variant(ftype="IQ4_K"), "exactly one of 'gguf'"),
    "variant-missing-file": (_variant(gguf="/nonexistent/x.gguf"), "not found"),
    "variant-unknown-ftype": (lambda d, t: d.update(variants=[{"name": "q", "ftype": "IQ9_K"}]), "unknown ftype"),
    "variant-unknown-type": (lambda d, t: d.update(variants=[{"name": "q", "ftype": "IQ4_K",
                                                               "attn_v_type": "Q9_9"}]), "Q9_9"),
    "variant-bad-regex": (lambda d, t: d.update(variants=[{"name": "q", "ftype": "IQ4_K",
                                                            "overrides": ["(=Q8_0"]}]), "regular expression"),
    "variant-pure-string": (lambda d, t: d.update(variants=[{"name": "q", "ftype": "IQ4_K", "pure": "yes"}]),
                            "'pure' must be bool"),
    "duplicate-variants": (lambda d, t: d.update(variants=[{"name": "v", "gguf": str(TINY)}] * 2), "duplicate"),
    "ctx-small": (_set("ctx", 2), "'ctx' must be at least 8"),
    "ctx-string": (_set("ctx", "512"), "'ctx' must be int"),
    "ctx-float": (_set("ctx", 64.5), "'ctx' must be int"),
    "ctx-bool": (_set("ctx", True), "'ctx' must be int"),
    "ctx-huge": (_set("ctx", 2 ** 40), "need at least"),
    "chunks-zero": (_set("chunks", 0), "'chunks' must be positive"),
    "chunks-negative": (_set("chunks", -1), "'chunks' must be positive"),
    "threads-zero": (_set("threads", 0), "'threads' must be positive"),
    "threads-negative": (_set("threads", -4), "'threads' must be positive"),
    "batch-zero": (_set("batch", 0), "'batch' must be positive"),
    "base-missing": (_set("base", "/nonexistent/model.gguf"), "not found"),
    "base-not-checkpoint-dir": (lambda d, t: d.update(base=str(t)), "not a HuggingFace checkpoint"),
    "base-logits-missing": (_set("base_logits", "/nonexistent/base.kld"), "base.kld"),
    "base-logits-garbage": (lambda d, t: ((t / "g.kld").write_bytes(b"\0" * 100), d.update(base_logits=str(t / "g.kld"))),
                            "g.kld"),
    "corpus-missing": (_set("corpus", "/nonexistent/c.txt"), "not found"),
    "corpus-mapping-both": (_set("corpus", {"path": "a", "dataset": "b"}), "exactly one of 'path' or 'dataset'"),
    "corpus-mapping-unknown": (_set("corpus", {"file": "a"}), "unknown key 'file'"),
    "corpus-number": (_set("corpus", 7), "'corpus' must be a file path or a mapping"),
    "corpus-not-utf8": (_corpus_bytes(b"caf\xe9 " * 2000), "not valid UTF-8"),
    "corpus-empty": (_corpus_bytes(b""), "need at least"),
    "corpus-one-chunk": (_corpus_bytes(b"word " * 60), "need at least"),
    "corpus-fifo": (_fifo_corpus, "not a regular file"),
    "corpus-directory": (_dir_corpus, "not a regular file"),
    "output-dir-is-file": (_output_dir_file, "is a file"),
    "output-dir-below-file": (_output_dir_below_file, "is a file"),
    "output-dir-list": (_set("output_dir", ["a"]), "'output_dir' must be str"),
}

YAML_CASES = {
    "yaml-malformed": (b"name: [unclosed\n", "malformed YAML"),
    "yaml-list": (b"- a\n- b\n", "top level must be a mapping"),
    "yaml-scalar": (b"42\n", "top level must be a mapping"),
    "yaml-empty": (b"", "top level must be a mapping"),
    "yaml-binary": (b"\xff\xfe\x00\x01garbage", "not UTF-8"),
    "yaml-python-tag": (b"name: !!python/object/apply:os.system ['true']\n", "malformed YAML"),
}


def _check(tmp_path, capsys, cfg_path, expect):
    before = sorted(str(p) for p in tmp_path.parent.iterdir())
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB, a high-water mark
    t0 = time.perf_counter()
    rc = cli_main(["run", str(cfg_path), "--no-progress"])
    seconds = time.perf_counter() - t0
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expect in err, err
    assert err.startswith("evalkit run: error:") and "Traceback" not in err and err.count("\n") == 1
    assert seconds < 20 and growth < 200 * 2 ** 20
    assert sorted(str(p) for p in tmp_path.parent.iterdir()) == before   # nothing beside the test folder
    assert not (tmp_path / "out" / "f" / "results.json").exists()


@pytest.mark.parametrize("kind", sorted(CONFIG_CASES))
def test_bad_config_is_refused(kind, tmp_path, capsys):
    edit, expect = CONFIG_CASES[kind]
    d = _good(tmp_path)
    edit(d, tmp_path)
    d = {k: v for k, v in d.items() if v is not None}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    _check(tmp_path, capsys, path, expect)


@pytest.mark.parametrize("kind", sorted(YAML_CASES))
def test_bad_yaml_is_refused(kind, tmp_path, capsys):
    data, expect = YAML_CASES[kind]
    path = tmp_path / "run.yaml"
    path.write_bytes(data)
    _check(tmp_path, capsys, path, expect)


def test_missing_and_unreadable_config(tmp_path, capsys):
    _check(tmp_path, capsys, tmp_path / "nope.yaml", "cannot read config")
    _check(tmp_path, capsys, tmp_path, "cannot read config")
