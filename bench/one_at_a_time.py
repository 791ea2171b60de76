#!/usr/bin/env python
"""Peak memory of ``evalkit run`` with every model resident vs one at a time (``resident: one``).

Steps, each ``evalkit run`` in a subprocess of its own so that ``ru_maxrss`` is that run's peak:

1. **prep**: the variants of the config (default ``configs/quickstart.yaml``) quantized from
   SmolLM2 and the base evaluated fresh, writing the base cache (``base_cache``);
2. **all**: the variants' GGUFs, all loaded together, against the cache (the base is not loaded);
3. **one**: the same, ``resident: one``;
4. **none**: the same with no variant, ``resident: one``: the process without any variant model
   (python, torch, the base's output tensor, the O(batch) buffers).

Each child also records the program's floor: its RSS once python, torch and evalkit are imported,
before the run (~220 MB here, torch's libraries most of it; no evalkit setting changes it).
Reports the largest single model file, each peak and floor, ``one - floor - largest`` against the
goal (≤ 300 MB) and the absolute ``one - largest``,
whether ``all`` and ``one`` give identical results (results.json figures and tokens.parquet), the
KLDs of the fresh base pass against the cached one, and the cache's size against
llama-perplexity's base-logits file for the same chunks. Weights stay in their GGUF's memory
map: resident pages of a map count in RSS, and leave it when the model is released.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1e6


def child(spec: str) -> None:
    """Run one configuration (JSON) and print its peak RSS and wall time as a JSON line."""
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401  (the floor below includes it, as every run does)

    from evalkit.pipeline import run
    from evalkit.run_config import config_from_dict
    floor = _rss_now()          # python + torch + evalkit imported: the program, before any run
    d = json.loads(spec)
    t0 = time.time()
    # restart: each measured run evaluates every chunk, whatever an earlier bench left in its folder
    out = run(config_from_dict(d, "bench", d.pop("_dir")), progress=False, restart=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024        # KiB on Linux
    print(json.dumps({"out": str(out), "peak_rss": peak, "floor_rss": floor, "seconds": time.time() - t0}))


def _rss_now() -> int:
    """The process's resident set now, in bytes (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _spawn(cfg: dict, work: Path) -> dict:
    spec = json.dumps({**cfg, "_dir": str(work)})
    p = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        sys.exit(f"{cfg['name']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _figures(out: Path) -> tuple[dict, object]:
    """results.json's figures without timings and paths, and tokens.parquet."""
    import pandas as pd
    res = json.loads((out / "results.json").read_text())
    drop = {"tokens_per_s", "model"}
    variants = {n: {k: v for k, v in st.items() if k not in drop} for n, st in res["variants"].items()}
    return {"base_ppl": res["base"]["ppl"], "variants": variants}, pd.read_parquet(out / "tokens.parquet")


def _configs(args, work: Path) -> tuple[dict, list[dict]]:
    import yaml
    q = yaml.safe_load(Path(args.config).read_text())
    names = args.variants.split(",") if args.variants else [v["name"] for v in q["variants"]]
    base = {"base": q.get("base", "smollm2"), "corpus": q.get("corpus", "wikitext-2-raw-test"),
            "ctx": q.get("ctx", 512), "chunks": args.chunks, "threads": args.threads, "batch": args.batch,
            "output_dir": str(work / "results"), "base_cache": str(work / "base.ekc")}
    prep = {**base, "name": "prep", "variants": [{"name": n, "ftype": n} for n in names]}
    ggufs = [{"name": n, "gguf": str(work / "results" / "prep" / "models" / f"{n}.gguf")} for n in names]
    return prep, [{**base, "name": "all", "variants": ggufs},
                  {**base, "name": "one", "resident": "one", "variants": ggufs},
                  {**base, "name": "none", "resident": "one", "variants": []}]


def main() -> None:
    """Run the four steps and print the report (markdown)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    ap.add_argument("--variants", default=None, help="comma-separated ftypes instead of the config's variants")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512, help="tokens per forward call (512: one chunk)")
    ap.add_argument("--work", default="/tmp/evalkit-bench-one-at-a-time")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    work = Path(args.work)
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "base.ekc").unlink(missing_ok=True)
    prep, runs = _configs(args, work)
    got = {"prep": _spawn(prep, work)}
    for cfg in runs:
        got[cfg["name"]] = _spawn(cfg, work)
    report(args, work, got, [v["gguf"] for v in runs[0]["variants"]])


def report(args, work: Path, got: dict, ggufs: list[str]) -> None:
    """Print the figures of the four runs."""
    import pandas as pd

    from evalkit.metrics.logits_file import file_size
    from evalkit.evaluation.models import vocab_of
    sizes = {Path(g).stem: Path(g).stat().st_size for g in ggufs}
    largest = max(sizes.values())
    (fa, ta), (fo, to), (fp, _) = (_figures(Path(got[n]["out"])) for n in ("all", "one", "prep"))
    try:
        pd.testing.assert_frame_equal(ta, to)
        same_tokens = True
    except AssertionError:
        same_tokens = False
    res = json.loads((Path(got["prep"]["out"]) / "results.json").read_text())
    n_vocab = vocab_of(Path(res["base"]["model"]))[0]
    logits = file_size(res["n_ctx"], n_vocab, res["n_chunks"])
    cache = (work / "base.ekc").stat().st_size
    print(f"## one model resident at a time: {', '.join(sizes)}; {args.chunks} chunks of {res['n_ctx']}, "
          f"batch {args.batch}, {args.threads} threads\n")
    print("| run | peak RSS (MB) | program floor (MB) | peak - floor (MB) | wall (s) |\n|---|---:|---:|---:|---:|")
    for n in ("prep", "all", "one", "none"):
        g = got[n]
        print(f"| {n} | {g['peak_rss'] / MB:.0f} | {g['floor_rss'] / MB:.0f} | {(g['peak_rss'] - g['floor_rss']) / MB:.0f} "
              f"| {g['seconds']:.0f} |")
    print(f"\nlargest single model: {largest / MB:.1f} MB ({max(sizes, key=sizes.get)}); all models: "
          f"{sum(sizes.values()) / MB:.1f} MB")
    one = got["one"]
    print(f"one-at-a-time peak - program floor - largest model: "
          f"{(one['peak_rss'] - one['floor_rss'] - largest) / MB:.0f} MB (goal ≤ 300); "
          f"absolute peak - largest model: {(one['peak_rss'] - largest) / MB:.0f} MB")
    print(f"all-resident peak / one-at-a-time peak: "
          f"{got['all']['peak_rss'] / got['one']['peak_rss']:.2f}")
    none = got["none"]["peak_rss"]
    print(f"over the run without any variant (none): one +{(got['one']['peak_rss'] - none) / MB:.0f} MB, "
          f"all +{(got['all']['peak_rss'] - none) / MB:.0f} MB")
    print(f"identical results one vs all: results.json figures {fa == fo}, tokens.parquet {same_tokens}")
    print(f"base cache {cache / MB:.2f} MB vs llama-perplexity base-logits file {logits / MB:.1f} MB "
          f"(1/{logits / cache:.0f})")
    print("\n| variant | KLD fresh base | KLD from cache | rel. diff |\n|---|---:|---:|---:|")
    for n in sizes:
        a, b = fp["variants"][n]["kld_mean"][0], fo["variants"][n]["kld_mean"][0]
        print(f"| {n} | {a:.6f} | {b:.6f} | {abs(b - a) / a:.2e} |")


if __name__ == "__main__":
    main()
