#!/usr/bin/env python
"""smol-moe under the exact forward next to ik_llama.cpp's figures: results/smol-moe-summary.md.

* base perplexity of both smol-moe files (arch mistral3 and llama: same tensors) over --chunks
  512-token chunks of the bundled WikiText-2 test split, against moe-reference.json's mistral3
  figure (the reference mis-evaluates the llama-arch file, see its notes);
* KLD of the IQ4_K mix (quantized by evalkit with llama-quantize's rules) against the F32
  base, from ``evalkit run``'s pipeline, through the exact forward and (unless --no-emulate)
  the ik-cpu backend emulation, against the reference's KLD report of its own IQ4_K file
  (moe-reference.json, smol-moe-mistral3 quant_mixes IQ4_K kld_<N>chunks);
* the speed measured by bench/moe_speed.py when its JSON is given (--speed-json).

Writes the markdown (--out) and every figure as JSON next to it. The evalkit run in --work
resumes where it stopped and the llama-arch PPL is kept there, so a rerun only re-reports.

The models come from tests/moe_models.py (generated once per machine, sha256 checked).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from evalkit.files import atomic_write_text  # noqa: E402


def kld_run(base: Path, chunks: int, threads: int, work: Path, emulate: bool) -> tuple[dict, Path]:
    """``evalkit run`` of the IQ4_K mix against ``base`` (with ``emulate``: through the exact
    forward and the ik-cpu backend emulation, ``backend_threads`` = ``threads`` as the reference's
    ``-t``); its results.json as a dict and the results folder (resumes an interrupted run)."""
    from evalkit import pipeline
    from evalkit.run_config import config_from_dict
    variant = {"name": "IQ4_K", "ftype": "IQ4_K"}
    if emulate:
        variant.update(backend="ik-cpu", backend_threads=threads)
    cfg = config_from_dict({"name": f"smol-moe-IQ4_K-{chunks}", "base": str(base), "chunks": chunks,
                            "threads": threads, "output_dir": str(work), "variants": [variant]})
    folder = pipeline.run(cfg, progress=True)
    return json.loads((folder / "results.json").read_text()), folder


def component_klds(folder: Path, results: dict) -> dict[str, dict]:
    """Per component of the IQ4_K variant ("exact", and "ik-cpu" when emulated): mean KLD,
    PPL(Q), same top token from the decomposition, KLD percentiles from tokens.parquet (as
    llama-perplexity computes them, float32)."""
    import numpy as np
    import pandas as pd
    from evalkit.metrics.kld import median_f32, percentile_f32
    v = results["variants"]["IQ4_K"]
    tokens = pd.read_parquet(folder / "tokens.parquet", columns=["variant", "kld"])
    out = {}
    for kind, fig in (v.get("decomposition") or {"exact": v}).items():
        entry = "IQ4_K" if kind == (v.get("backend") or "exact") else f"IQ4_K@{kind}"
        kld = np.sort(tokens.loc[tokens["variant"] == entry, "kld"].to_numpy(np.float32))
        if kld.size == 0:
            raise RuntimeError(f"{folder}/tokens.parquet holds no tokens of {entry!r}")
        out[kind] = {"kld_mean": fig["kld_mean"], "ppl": fig["ppl"], "same_top_p": fig["same_top_p"],
                     "kld_p99": percentile_f32(kld, 0.99), "kld_median": median_f32(kld),
                     "kld_max": float(kld[-1]), "n_tokens": int(kld.size)}
    return out


def base_ppl(path: Path, chunks: int, threads: int) -> dict:
    """evalkit perplexity of ``path``."""
    from evalkit.evaluation.perplexity import perplexity
    return perplexity(str(path), "wikitext-2-raw-test", chunks=chunks, threads=threads, out=io.StringIO())


def figures(chunks: int, ours: dict, comps: dict, llama: dict, ref: dict, speed: dict | None) -> dict:
    """Every number of the report, JSON-able (written next to the markdown)."""
    base_ref = ref["base_ppl"][f"chunks{chunks}"]["default"]
    r = ref["quant_mixes"]["IQ4_K"].get(f"kld_{chunks}chunks")
    reference = None
    if r is not None:
        kl, tp = r["kl_divergence"], r["token_probability"]
        reference = {"kld_mean": [kl["Mean KLD"]["value"], kl["Mean KLD"]["err"]],
                     "ppl": [r["perplexity"]["Mean PPL(Q)"]["value"], r["perplexity"]["Mean PPL(Q)"]["err"]],
                     "same_top_p": [tp["Same top p"]["value"] / 100, tp["Same top p"]["err"] / 100],
                     "kld_p99": kl["99.0% KLD"]["value"], "kld_median": kl["Median KLD"]["value"],
                     "kld_max": kl["Maximum KLD"]["value"]}
    v = ours["variants"]["IQ4_K"]
    from evalkit.gguf import GGUFFile
    types = {t.name: t.type_name for t in GGUFFile(v["model"]).tensors.values()}
    ref_types = ref["quant_mixes"]["IQ4_K"]["tensor_types"]
    differ = sorted(n for n in set(types) | set(ref_types) if types.get(n) != ref_types.get(n))
    return {"chunks": chunks, "n_ctx": 512, "corpus": Path(ours["corpus"]).name, "corpus_sha256": ours["corpus_sha256"],
            "base_ppl": {"mistral3": ours["base"]["ppl"], "llama": llama["ppl"],
                         "reference_mistral3": [base_ref["ppl"], base_ref["ppl_err"]],
                         "reference_llama_8chunks": ref_llama_ppl()},
            "iq4k": {"file_bytes": Path(v["model"]).stat().st_size, "tensor_bytes": v["size_bytes"],
                     "bpw": v["bpw"],
                     "n_tensors": len(types),
                     "types_differing_from_reference": differ,
                     "reference_size_bytes": ref["quant_mixes"]["IQ4_K"]["size_bytes"],
                     "components": comps, "reference": reference},
            "speed": speed}


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.3f} %"


def _base_section(f: dict) -> list[str]:
    """The base-perplexity table and its note."""
    b, ref = f["base_ppl"], f["base_ppl"]["reference_mistral3"]
    rows = [("smol-moe-mistral3.gguf", b["mistral3"]), ("smol-moe.gguf (llama)", b["llama"])]
    lines = ["## Base (F32) perplexity", "", "| file | evalkit | ik_llama.cpp (mistral3) | PPL difference | "
             "± difference |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {p[0]:.4f} ± {p[1]:.5f} | {ref[0]:.4f} ± {ref[1]:.5f} | {_pct(p[0], ref[0])} | "
              f"{_pct(p[1], ref[1])} |" for n, p in rows]
    return lines + ["", "The llama-arch file holds the same tensors; ik_llama.cpp 8337e4cd evaluates it wrongly "
                    "(build_llama hands the ffn_norm output to the MoE FFN as its residual, so each MoE layer drops "
                    f"the residual stream: PPL {b['reference_llama_8chunks']:.4g} over 8 chunks there); evalkit "
                    "gives both files the mistral3 figure.", ""]


def _kld_section(f: dict) -> list[str]:
    """The IQ4_K KLD table (exact, emulated ik-cpu, the reference) and the sentence on the difference."""
    q, comps, r = f["iq4k"], f["iq4k"]["components"], f["iq4k"]["reference"]
    cols = [k for k in ("exact", "ik-cpu") if k in comps]
    head = " | ".join({"exact": "evalkit exact", "ik-cpu": "evalkit, ik-cpu emulated"}[k] for k in cols)
    lines = ["## IQ4_K mix: KLD against the F32 base", "",
             f"evalkit's IQ4_K file ({q['file_bytes']:,} bytes, the reference's {q['reference_size_bytes']:,}; "
             f"{q['bpw']:.3f} bpw over its tensors; {_types_note(q)}) scored by the exact forward"
             + (" and through evalkit's emulation of ik_llama.cpp's CPU backend (`backend: ik-cpu`, 2 threads)"
                if "ik-cpu" in comps else "") + ", next to ik_llama.cpp's KLD report of its own IQ4_K file "
             "(`llama-perplexity --kl-divergence -t 2`):", "",
             f"| statistic | {head} | ik_llama.cpp |", "|---" * (len(cols) + 2) + "|"]
    def pair(x, s):
        return f"{s * x[0]:.6g} ± {s * x[1]:.2g}"
    for name, key, s in (("mean KLD", "kld_mean", 1), ("PPL(Q)", "ppl", 1), ("same top token %", "same_top_p", 100)):
        lines.append(f"| {name} | " + " | ".join(pair(comps[k][key], s) for k in cols) + f" | {pair(r[key], s)} |")
    for name, key in (("KLD 99 %", "kld_p99"), ("KLD median", "kld_median"), ("KLD max", "kld_max")):
        lines.append(f"| {name} | " + " | ".join(f"{comps[k][key]:.6g}" for k in cols) + f" | {r[key]:.6g} |")
    return lines + [""] + _kld_sentence(comps, r)


def _types_note(q: dict) -> str:
    """Whether evalkit's IQ4_K file has the reference's type for every tensor."""
    differ = q["types_differing_from_reference"]
    if not differ:
        return f"the reference's type for each of its {q['n_tensors']} tensors"
    return f"{len(differ)} of {q['n_tensors']} tensors typed unlike the reference's: {', '.join(differ[:5])}"


def _kld_sentence(comps: dict, r: dict) -> list[str]:
    """What the difference between evalkit's and the reference's mean KLD is made of, in numbers."""
    def diff(c):
        d = c["kld_mean"][0] - r["kld_mean"][0]
        return d, d / (c["kld_mean"][1] ** 2 + r["kld_mean"][1] ** 2) ** 0.5
    d, z = diff(comps["exact"])
    text = (f"The exact forward's mean KLD differs from ik_llama.cpp's by {d:+.5f} ({z:+.1f} combined standard "
            "errors). It measures the quantized weights alone (float32 activations, exact dequantization); "
            "ik_llama.cpp's figure adds its CPU backend's arithmetic on top (activations rounded to 8 bits for "
            "the quantized matmuls, an fp16 K/V cache, `../shared/spec/backend-ik-cpu.md`), and the top-2 "
            "router turns small logit changes into occasional routing flips.")
    if "ik-cpu" in comps:
        de, ze = diff(comps["ik-cpu"])
        text += (f" Emulating that arithmetic gives {comps['ik-cpu']['kld_mean'][0]:.5f}: the backend adds "
                 f"{comps['ik-cpu']['kld_mean'][0] - comps['exact']['kld_mean'][0]:+.5f} to the weights' own KLD, "
                 f"and what is left is {de:+.5f} from ik_llama.cpp's ({ze:+.1f} combined standard errors")
        text += ("), within the statistical error. " if abs(ze) < 2 else "). ")
        text += ("Two differences remain outside the emulation: ik_llama.cpp's F32 base runs through its "
                 "fp16 K/V cache too (evalkit's base is exact), and each side quantized its own IQ4_K file (the "
                 "reference with a stock FMA build, whose bytes may differ in a few blocks).")
    return [text, ""]


def _speed_section(speed: dict) -> list[str]:
    """The speed table of bench/moe_speed.py's JSON."""
    tps = speed["tokens_per_s"]
    lines = [f"## Speed (bench/moe_speed.py: same process, F32, {speed['threads']} threads, "
             f"{speed['chunks']} chunks, best of the alternating rounds)", "",
             "| model | tokens/s | GFLOP per 512-token chunk |", "|---|---|---|"]
    lines += [f"| {k} | {tps[k]:.1f} | {speed['gflops_per_chunk'][k]:.1f} |" for k in tps]
    return lines + ["", f"Active FLOPs predict {speed['smol_moe_predicted_tokens_per_s']:.1f} tokens/s for smol-moe; "
                    f"measured {tps['smol-moe-F32']:.1f} = {speed['ratio_to_prediction']:.2f}x the prediction "
                    f"(target ≥ {speed['target']}).", ""]


def summary(f: dict) -> str:
    """The markdown report of :func:`figures`."""
    lines = ["# smol-moe (SmolLM2-135M upcycled, 4 experts / 2 used): exact forward vs ik_llama.cpp", "",
             f"{f['chunks']} chunks of 512 tokens of the bundled WikiText-2 test split; ik_llama.cpp 8337e4cd "
             "figures from `../shared/golden/moe/moe-reference.json` (model `smol-moe-mistral3`). Made by "
             f"`bench/moe_report.py --chunks {f['chunks']}" + (" --speed-json SPEED.json` (the JSON of "
                                                                 "`bench/moe_speed.py`)" if f["speed"] else "`")
             + "; every number is in `smol-moe-summary.json`.", ""]
    lines += _base_section(f)
    if f["iq4k"]["reference"] is not None:
        lines += _kld_section(f)
    if f["speed"]:
        lines += _speed_section(f["speed"])
    return "\n".join(lines)


def ref_llama_ppl() -> float:
    """The reference's (wrong) 8-chunk figure for the llama-arch file."""
    from moe_models import reference
    return reference()["models"]["smol-moe"]["base_ppl"]["chunks8"]["default"]["ppl"]


def main() -> int:
    """Run everything (resuming: the evalkit run resumes, the llama-arch PPL is kept in --work)
    and write the summary and its JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=40, choices=(8, 40))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-emulate", action="store_true", help="skip the ik-cpu emulation of the IQ4_K mix")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "evalkit" / "bench" / "moe-report")
    ap.add_argument("--speed-json", type=Path)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "smol-moe-summary.md")
    args = ap.parse_args()
    from moe_models import model_path, reference
    ref = reference()["models"]["smol-moe-mistral3"]
    ours, folder = kld_run(model_path("smol-moe-mistral3"), args.chunks, args.threads, args.work,
                           not args.no_emulate)
    comps = component_klds(folder, ours)
    kept = args.work / f"smol-moe-llama-ppl-{args.chunks}.json"
    llama_path = model_path("smol-moe")
    llama = json.loads(kept.read_text()) if kept.is_file() else None
    if llama is None or llama["model_sha256"] != reference()["models"]["smol-moe"]["sha256"]:
        llama = base_ppl(llama_path, args.chunks, args.threads)
        atomic_write_text(kept, json.dumps(llama, indent=1) + "\n")
    speed = json.loads(args.speed_json.read_text()) if args.speed_json else None
    f = figures(args.chunks, ours, comps, llama, ref, speed)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(f, indent=1) + "\n")
    text = summary(f)
    atomic_write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
