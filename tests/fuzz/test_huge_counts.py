"""Huge counts in a GGUF header end the real command at once, in little memory.

A ``block_count`` of 2^31 once made ``evalkit perplexity`` and ``evalkit run`` allocate
9–11 GB and hang. Each file here carries one huge count (layers, tensors, metadata
entries, array length, string length, dimension count, dimension size); the command runs
as a subprocess and must exit with status 2 and a named error within a few seconds of
what importing torch takes, its peak RSS within 200 MB of that import's. Two children
run at a time (the suite's 2-core budget).
"""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import GOLDEN, REPO, SHARED
from gguf_corrupt import UINT32, Layout, pack_scalar, parse

BASE = GOLDEN / "gguf" / "tiny-base.gguf"
EXTRA_SECONDS = 5.0          # beyond the baseline's wall time
EXTRA_MIB = 200              # beyond the baseline's peak RSS
HARD_STOP_SECONDS = 120.0
PARALLEL = 2


def _block_count(l: Layout) -> None:
    l.set_kv("llama.block_count", UINT32, pack_scalar(UINT32, 2**31))


def _array_length(l: Layout) -> None:
    kv = l.kv("tokenizer.ggml.tokens")
    kv.payload = kv.payload[:4] + struct.pack("<Q", 2**61) + kv.payload[12:]


def _string_length(l: Layout) -> None:
    l.kv("general.name").payload = struct.pack("<Q", 2**63) + b"tiny"


# kind -> (edit, expected stderr substring)
HUGE = {
    "block_count_2p31": (_block_count, "llama.block_count"),
    "tensor_count_2p40": (lambda l: setattr(l, "n_tensors", 2**40), "tensor count 1099511627776"),
    "kv_count_2p40": (lambda l: setattr(l, "n_kv", 2**40), "metadata count 1099511627776"),
    "array_length_2p61": (_array_length, "claims 2305843009213693952 elements"),
    "string_length_2p63": (_string_length, "claims 9223372036854775808 bytes"),
    "n_dims_2p32_minus_1": (lambda l: setattr(l.tensors[1], "n_dims", 2**32 - 1), "4294967295 dimensions"),
    "ne_2p62": (lambda l: setattr(l.tensor("token_embd.weight"), "dims", [256, 2**62]), "overflow int64"),
}
# (kind, command): perplexity for every count; run (the corrupt file as the variant) for the layer count
JOBS = [(k, "perplexity") for k in HUGE] + [("block_count_2p31", "run")]


@dataclass
class Child:
    """One finished subprocess: exit status, stderr, wall seconds, peak RSS (MiB)."""

    rc: int
    err: str
    seconds: float
    peak_mib: float


def _start(argv: list[str], work: Path, tag: str):
    out, err = open(work / f"{tag}.out", "wb"), open(work / f"{tag}.err", "wb")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen(argv, stdout=out, stderr=err, cwd=work / "cwd", env=env, start_new_session=True)
    out.close()
    err.close()
    return p, time.monotonic()


def _reap(p: subprocess.Popen, t0: float, work: Path, tag: str) -> Child | None:
    """The child's result once it has ended (os.wait4 gives this child's own peak RSS), else None."""
    pid, status, usage = os.wait4(p.pid, os.WNOHANG)
    if pid == 0:
        if time.monotonic() - t0 > HARD_STOP_SECONDS:
            os.killpg(p.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(p.pid, 0)
        else:
            return None
    p.returncode = os.waitstatus_to_exitcode(status)      # reaped here: Popen must not wait again
    return Child(p.returncode, (work / f"{tag}.err").read_text(errors="replace"), time.monotonic() - t0,
                 usage.ru_maxrss / 1024)


def _run_all(jobs: dict[str, list[str]], work: Path) -> dict[str, Child]:
    """Run the commands, ``PARALLEL`` at a time; {tag: Child}."""
    pending, running, done = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            tag, argv = pending.pop(0)
            running[tag] = _start(argv, work, tag)
        for tag, (p, t0) in list(running.items()):
            child = _reap(p, t0, work, tag)
            if child is not None:
                done[tag] = child
                del running[tag]
        time.sleep(0.02)
    return done


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, Child]:
    work = tmp_path_factory.mktemp("huge")
    (work / "cwd").mkdir()
    (work / "out").mkdir()
    corpus = work / "small.txt"
    corpus.write_bytes((SHARED / "data" / "wikitext-2-raw-test.txt").read_bytes()[:6000])
    pristine = parse(BASE.read_bytes())
    py = [sys.executable]
    jobs = {"baseline": py + ["-c", "import torch, evalkit.cli"]}
    for kind, command in JOBS:
        model = work / f"{kind}.gguf"
        if not model.exists():
            layout = pristine.copy()
            HUGE[kind][0](layout)
            layout.write(model)
        if command == "perplexity":
            argv = ["perplexity", str(model), "--corpus", str(corpus), "--ctx", "64", "--chunks", "2"]
        else:
            cfg = work / f"{kind}.yaml"
            cfg.write_text(yaml.safe_dump({
                "name": kind, "base": str(BASE), "corpus": str(corpus), "ctx": 64, "chunks": 2,
                "output_dir": str(work / "out"), "variants": [{"name": "v", "gguf": str(model)}]}))
            argv = ["run", str(cfg), "--no-progress"]
        jobs[f"{kind}-{command}"] = py + ["-m", "evalkit"] + argv
    done = _run_all(jobs, work)
    assert not list((work / "cwd").iterdir()), "a command wrote into its working directory"
    return done


def test_baseline_imports(results):
    base = results["baseline"]
    assert base.rc == 0, base.err


@pytest.mark.parametrize("kind, command", JOBS, ids=[f"{k}-{c}" for k, c in JOBS])
def test_huge_count_fails_fast_in_little_memory(results, kind, command):
    """Exit 2 with the named error; wall and peak RSS within a small margin of the imports'."""
    child, base = results[f"{kind}-{command}"], results["baseline"]
    where = (f"{kind} / {command}: rc {child.rc} in {child.seconds:.1f} s, peak {child.peak_mib:.0f} MiB "
             f"(baseline {base.seconds:.1f} s, {base.peak_mib:.0f} MiB)\n{child.err[-2000:]}")
    assert child.rc == 2, where
    assert "Traceback" not in child.err, where
    assert child.err.startswith(f"evalkit {command}: error: ") and HUGE[kind][1] in child.err, where
    assert child.seconds - base.seconds < EXTRA_SECONDS, where
    assert child.peak_mib - base.peak_mib < EXTRA_MIB, where
