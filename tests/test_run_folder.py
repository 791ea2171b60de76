"""The run folder: plain names only, one run at a time, leftovers cleaned, outputs published last."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import GOLDEN, REPO, SHARED
from evalkit.cli import main as cli_main
from evalkit.run_config import ConfigError, config_from_dict

TINY = GOLDEN / "gguf" / "tiny-base.gguf"


def _snapshot(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["../victim/project", "a/b", "/abs/path", ".hidden", "..", "x" * 200, ""])
def test_run_and_variant_names_must_be_plain(name):
    with pytest.raises(ConfigError, match="name"):
        config_from_dict({"name": name or " "})
    with pytest.raises(ConfigError, match=r"variants\[0\] 'name'"):
        config_from_dict({"name": "ok", "variants": [{"name": name or "/", "ftype": "IQ4_K"}]})


def test_a_traversing_name_changes_nothing_outside_output_dir(tmp_path, capsys):
    victim = tmp_path / "victim" / "project" / "partial"
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path)
    out = tmp_path / "work" / "results"
    for name, variant in (("../../victim/project", "v"), ("run", "../../../victim/x")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(yaml.safe_dump({"name": name, "base": str(TINY), "output_dir": str(out),
                                       "variants": [{"name": variant, "ftype": "Q8_0"}]}))
        before = _snapshot(tmp_path)
        assert cli_main(["run", str(cfg), "--no-progress"]) == 2
        assert "is not a plain name" in capsys.readouterr().err
        assert _snapshot(tmp_path) == before
    assert (victim / "keep.txt").read_text() == "mine"


def _config(tmp_path, name="t", chunks=2, **kw):
    corpus = tmp_path / "c.txt"
    if not corpus.exists():
        corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:20000])
    d = {"name": name, "base": str(TINY), "corpus": str(corpus), "ctx": 64, "chunks": chunks, "threads": 1,
         "batch": 64, "output_dir": str(tmp_path / "out"), "variants": [{"name": "v", "gguf": str(TINY)}]}
    d.update(kw)
    path = tmp_path / f"{name}-{chunks}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_leftovers_of_a_killed_run_are_removed_and_outputs_published(tmp_path):
    folder = tmp_path / "out" / "t"
    (folder / "partial").mkdir(parents=True)
    (folder / "models").mkdir()
    junk = [folder / ".results.json.123.abcd.tmp", folder / "partial" / ".chunk_00000.npz.9.ff.tmp",
            folder / "models" / ".v.gguf.x1y2.tmp", folder / ".staging-999" / "summary.md"]
    for j in junk:
        j.parent.mkdir(parents=True, exist_ok=True)
        j.write_text("junk")
    (folder / "results.json").write_text("{\"stale\": true}")
    assert cli_main(["run", str(_config(tmp_path)), "--no-progress"]) == 0
    assert not any(j.exists() for j in junk) and not (folder / ".staging-999").exists()
    res = json.loads((folder / "results.json").read_text())
    assert "stale" not in res and abs(res["variants"]["v"]["kld_mean"][0]) < 1e-6   # the base itself
    assert not [p for p in folder.iterdir() if p.name.startswith(".staging-")]
    for name in ("summary.md", "tokens.parquet", "chunks.npy", "kld_cdf.png"):
        assert (folder / name).is_file()


def test_output_dir_that_is_a_file_is_a_named_error(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    assert cli_main(["run", str(_config(tmp_path)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err or "not a folder" in err


@pytest.mark.slow
def test_concurrent_runs_into_one_folder(tmp_path, capsys):
    """A second run into a folder in use fails at once; the first run's results are its own."""
    first = _config(tmp_path, chunks=12)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "evalkit", "run", str(first), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out" / "t" / ".lock"
    deadline = time.time() + 60
    while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
        time.sleep(0.05)
    assert lock.read_text().strip() == str(proc.pid), "the first run never took the lock"
    t0 = time.perf_counter()
    rc = cli_main(["run", str(_config(tmp_path, chunks=3, ctx=32)), "--no-progress"])
    assert rc == 2 and time.perf_counter() - t0 < 5
    assert f"in use by another evalkit run (pid {proc.pid})" in capsys.readouterr().err
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    res = json.loads((tmp_path / "out" / "t" / "results.json").read_text())
    assert res["n_chunks"] == 12 and res["n_ctx"] == 64
    # the same configuration alone, in another folder, gives the same statistics
    alone = _config(tmp_path, chunks=12, output_dir=str(tmp_path / "alone"))
    assert cli_main(["run", str(alone), "--no-progress"]) == 0
    ref = json.loads((tmp_path / "alone" / "t" / "results.json").read_text())
    assert res["base"]["ppl"] == ref["base"]["ppl"] and res["variants"]["v"]["ppl"] == ref["variants"]["v"]["ppl"]
