"""Peak RSS of layer-major evaluation on a ~1B-parameter MoE, next to the ordinary order.

Generates once (in ``$EVALKIT_CACHE/bench``, default ``~/.cache/evalkit/bench``) a random-weight
qwen3moe of ~1.0B parameters with SmolLM2's tokenizer (copied from the embedded SmolLM2 GGUF):
12 layers, n_embd 1024, 16/4 heads of 64, 32 experts of 768 (4 used), tied output. The base
is F16 (norms and routers F32), the variant the same weights in Q8_0 (evalkit's quantizer).
Then, each in its own subprocess (``os.wait4`` gives that child's ``ru_maxrss``):

* an interpreter that imports evalkit and torch and loads nothing (the floor of every run);
* ``evalkit run`` base + variant with ``order: layer`` and with the ordinary order;
* ``evalkit perplexity --order layer`` / ``--order model`` on the base.

Reports the largest layer of all models together (each model's largest "layer": a block,
the embedding, or output_norm + output, summed over the models), the hidden states, and the
ratio of each peak to them (the issue's goal: layer-major ≤ 1.5 × (layers + hidden states)).
Writes ``results/layer-major-rss.md``.

    .venv/bin/python bench/layer_major_rss.py [--chunks 2] [--ctx 512] [--threads 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, HEAD_DIM = 12, 1024, 16, 4, 64
N_EXPERT, N_USED, N_FF_EXP = 32, 4, 768
ARCH, GEN_VERSION = "qwen3moe", 1


def cache_dir() -> Path:
    """Where the generated models live (outside the repository)."""
    return Path(os.environ.get("EVALKIT_CACHE", Path.home() / ".cache" / "evalkit")) / "bench"


def _tensor_plan() -> list[tuple[str, tuple[int, ...], float]]:
    """(name, ggml shape, std) of every tensor; std 0 marks a norm weight (1 + small noise)."""
    out = [("token_embd.weight", (N_EMBD, 49152), 2.0 / np.sqrt(N_EMBD))]
    for i in range(N_LAYER):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", (N_EMBD,), 0.0),
                (p + "attn_q.weight", (N_EMBD, N_HEAD * HEAD_DIM), N_EMBD ** -0.5),
                (p + "attn_k.weight", (N_EMBD, N_HEAD_KV * HEAD_DIM), N_EMBD ** -0.5),
                (p + "attn_v.weight", (N_EMBD, N_HEAD_KV * HEAD_DIM), N_EMBD ** -0.5),
                (p + "attn_output.weight", (N_HEAD * HEAD_DIM, N_EMBD), (N_HEAD * HEAD_DIM) ** -0.5),
                (p + "attn_q_norm.weight", (HEAD_DIM,), 0.0), (p + "attn_k_norm.weight", (HEAD_DIM,), 0.0),
                (p + "ffn_norm.weight", (N_EMBD,), 0.0),
                (p + "ffn_gate_inp.weight", (N_EMBD, N_EXPERT), N_EMBD ** -0.5),
                (p + "ffn_gate_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT), N_EMBD ** -0.5),
                (p + "ffn_up_exps.weight", (N_EMBD, N_FF_EXP, N_EXPERT), N_EMBD ** -0.5),
                (p + "ffn_down_exps.weight", (N_FF_EXP, N_EMBD, N_EXPERT), N_FF_EXP ** -0.5)]
    return out + [("output_norm.weight", (N_EMBD,), 0.0)]


def _values(name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """The tensor's float32 values (numpy order, rows of ne0), seeded from its name; matrices
    rounded through F16 so that the Q8_0 variant quantizes exactly the base's weights."""
    seed = int.from_bytes(hashlib.sha256(f"bench-moe-1b:{name}".encode()).digest()[:8], "little")
    x = np.random.default_rng(seed).standard_normal(size=tuple(reversed(shape)), dtype=np.float32)
    if std == 0.0:
        return (1.0 + 0.05 * x).astype(np.float32)
    x *= np.float32(std)
    return x.astype(np.float16).astype(np.float32)


def _metadata() -> tuple[dict, dict]:
    """qwen3moe hyper-parameters plus SmolLM2's tokenizer keys (values and their GGUF types)."""
    from evalkit.gguf import GGUFFile
    from evalkit.sources import resolve_model
    smol = GGUFFile(resolve_model("smollm2"))
    meta = {k: v for k, v in smol.metadata.items() if k.startswith("tokenizer.")}
    types = {k: smol.metadata_types[k] for k in meta}
    a = ARCH
    meta.update({"general.architecture": a, "general.name": "bench-moe-1b", "general.quantization_version": 2,
                 f"{a}.block_count": N_LAYER, f"{a}.context_length": 40960, f"{a}.embedding_length": N_EMBD,
                 f"{a}.feed_forward_length": 3072, f"{a}.attention.head_count": N_HEAD,
                 f"{a}.attention.head_count_kv": N_HEAD_KV, f"{a}.rope.freq_base": 1e6,
                 f"{a}.attention.layer_norm_rms_epsilon": 1e-6, f"{a}.expert_used_count": N_USED,
                 f"{a}.attention.key_length": HEAD_DIM, f"{a}.attention.value_length": HEAD_DIM,
                 f"{a}.expert_count": N_EXPERT, f"{a}.expert_feed_forward_length": N_FF_EXP})
    u32, f32, string = 4, 6, 8        # GGUF value types
    for k, v in meta.items():
        if k not in types:
            types[k] = (string, None) if isinstance(v, str) else (f32, None) if isinstance(v, float) else (u32, None)
    return meta, types


def _write(path: Path, kind: str) -> None:
    """Write the base (kind F16) or the variant (Q8_0), one tensor in memory at a time."""
    from evalkit import quantize
    from evalkit.formats import get_format
    from evalkit.gguf import TensorSpec, write_gguf
    meta, types = _metadata()
    plan = {n: (s, std) for n, s, std in _tensor_plan()}

    def type_of(name: str, std: float) -> str:
        if std == 0.0 or name.endswith("ffn_gate_inp.weight"):
            return "F32"
        return kind

    specs = [TensorSpec(n, s, get_format(type_of(n, std)).type_id) for n, (s, std) in plan.items()]

    def data(spec: TensorSpec) -> np.ndarray:
        shape, std = plan[spec.name]
        x = _values(spec.name, shape, std)
        t = type_of(spec.name, std)
        if t == "F32":
            return x.reshape(-1).view(np.uint8)
        if t == "F16":
            return x.astype(np.float16).reshape(-1).view(np.uint8)
        return quantize(x.reshape(-1, shape[0]), t, threads=2).reshape(-1)
    write_gguf(path, meta, specs, data, types)


def models() -> tuple[Path, Path]:
    """The base (F16) and variant (Q8_0) files, generated on first use."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for kind in ("F16", "Q8_0"):
        path = folder / f"bench-moe-1b-v{GEN_VERSION}-{kind}.gguf"
        if not path.exists():
            t0 = time.time()
            _write(path, kind)
            print(f"generated {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f} s", flush=True)
        out.append(path)
    return out[0], out[1]


def _measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of one child process; RuntimeError if it fails."""
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    return time.time() - t0, ru.ru_maxrss * 1024.0       # Linux: KiB


def _sizes(paths: list[Path], n_tokens: int) -> tuple[list[int], int]:
    """Each model's largest layer (bytes) and the hidden states of all models (bytes)."""
    from evalkit.model.layerwise import LayerwiseModel
    layers, hidden = [], 0
    for p in paths:
        m = LayerwiseModel(p)
        layers.append(m.layer_bytes())
        hidden += 4 * n_tokens * m.config.n_embd
        m.close()
    return layers, hidden


def main(argv=None) -> int:
    """Generate the models, measure every configuration, write the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "results" / "layer-major-rss.md"))
    args = ap.parse_args(argv)
    base, variant = models()
    exe = [str(Path(sys.executable).parent / "evalkit")]      # the venv's console script
    tmp = Path(tempfile.mkdtemp(prefix="evalkit-rss-"))
    try:
        return _bench(args, base, variant, exe, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(args, base: Path, variant: Path, exe: list[str], tmp: Path) -> int:
    """Every measurement (run folders and JSON under ``tmp``), then the report."""
    rows = []
    floor = _measure([sys.executable, "-c", "import torch, evalkit, evalkit.model, evalkit.pipeline"])
    rows.append(("interpreter + torch + evalkit imported, nothing loaded", None, *floor))
    common = ["--corpus", "wikitext-2-raw-test", "--ctx", str(args.ctx), "--chunks", str(args.chunks),
              "--threads", str(args.threads), "--batch", str(args.ctx)]
    # the same pass on a tiny MoE of the same vocabulary: the libraries' touched pages, the logits and
    # scoring buffers, the allocator's slack: what does not grow with the model
    sys.path.insert(0, str(REPO / "tests"))
    from moe_models import model_path
    tiny = model_path("tiny-qwen3moe")
    warm = _measure(exe + ["perplexity", str(tiny), *common, "--order", "layer"])
    rows.append(("`evalkit perplexity --order layer` on tiny-qwen3moe (same vocabulary, ctx, chunks)", [tiny], *warm))
    ppl = {}
    for order in ("layer", "model"):
        js = tmp / f"ppl-{order}.json"
        rows.append((f"`evalkit perplexity --order {order}` (base)", [base],
                     *_measure(exe + ["perplexity", str(base), *common, "--order", order, "--json", str(js)])))
        ppl[order] = json.loads(js.read_text())
    runs = {}
    for order in ("layer", "model"):
        cfg = tmp / f"run-{order}.yaml"
        cfg.write_text(json.dumps({"name": f"rss-{order}", "base": str(base), "corpus": "wikitext-2-raw-test",
                                   "ctx": args.ctx, "chunks": args.chunks, "threads": args.threads,
                                   "batch": args.ctx, "output_dir": str(tmp), "order": order,
                                   "variants": [{"name": "Q8_0", "gguf": str(variant)}]}))
        rows.append((f"`evalkit run` base + Q8_0, `order: {order}`", [base, variant],
                     *_measure(exe + ["run", str(cfg)])))
        runs[order] = json.loads((tmp / f"rss-{order}" / "results.json").read_text())
    same_ppl = ppl["layer"]["ppl"] == ppl["model"]["ppl"]
    same_kld = runs["layer"]["variants"]["Q8_0"]["kld_mean"] == runs["model"]["variants"]["Q8_0"]["kld_mean"]
    text = _report(args, base, variant, rows, (floor[1], warm[1]), same_ppl, same_kld,
                   runs["layer"].get("router_stats"))
    from evalkit.files import atomic_write_text
    atomic_write_text(Path(args.out), text)
    print(text)
    return 0


def _report(args, base: Path, variant: Path, rows, floors: tuple[float, float], same_ppl: bool, same_kld: bool,
            router) -> str:
    """The markdown report; ``floors``: the peak RSS of the bare interpreter (torch and evalkit
    imported) and of the tiny model's layer-major pass."""
    program, tiny = floors
    mib = 2.0 ** 20
    n_tok = args.chunks * args.ctx
    lines = ["# Layer-major evaluation: peak RSS on a ~1B-parameter MoE", "",
             f"`bench/layer_major_rss.py --chunks {args.chunks} --ctx {args.ctx} --threads {args.threads}`. "
             f"Model: random-weight {ARCH}, {N_LAYER} layers, n_embd {N_EMBD}, {N_EXPERT} experts of {N_FF_EXP} "
             f"({N_USED} used), SmolLM2 vocabulary (49152), tied output; base `{base.name}` "
             f"({base.stat().st_size / 2**30:.2f} GiB), variant `{variant.name}` "
             f"({variant.stat().st_size / 2**30:.2f} GiB). {args.chunks} chunks of {args.ctx}, one chunk per "
             "forward call. Peak RSS is the child's `ru_maxrss`.", "",
             "| what | peak RSS MiB | largest layer(s) MiB | hidden states MiB | RSS / (layers + hidden) | "
             "**(RSS − program) / (layers + hidden)** | (RSS − tiny) / (layers + hidden) | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    goal = None
    for what, paths, secs, rss in rows:
        if paths is None:
            lines.append(f"| {what} | {rss / mib:.0f} | | | | | | {secs:.1f} |")
            continue
        layers, hidden = _sizes(paths, n_tok)
        ref = sum(layers) + hidden
        lines.append(f"| {what} | {rss / mib:.0f} | {' + '.join(f'{x / mib:.1f}' for x in layers)} | "
                     f"{hidden / mib:.1f} | {rss / ref:.2f} | **{(rss - program) / ref:.2f}** | "
                     f"{(rss - tiny) / ref:.2f} | {secs:.1f} |")
        if what.startswith("`evalkit run`") and "layer" in what:
            goal = (rss - program) / ref
    lines += ["", "`program` is the first row: an interpreter with torch and evalkit imported and nothing else "
              "(torch's libraries are most of it; no evalkit setting changes it). Everything the run itself "
              "allocates counts against the goal: the tokenizer and its leftovers, the layers, the hidden states, "
              "the logits, log-probability and KLD buffers of one forward call, the allocator's slack. "
              f"Goal: layer-major `evalkit run` ≤ 1.5 × (largest layers + hidden states): **{goal:.2f}** "
              f"({'met' if goal is not None and goal <= 1.5 else 'NOT met'}). "
              "`tiny` is the peak of the layer-major perplexity of tiny-qwen3moe (the part of a run that does not "
              "grow with the model), for reference.", "",
              f"Same numbers in both orders: perplexity PPL {'identical' if same_ppl else 'DIFFERENT'}, "
              f"run KLD mean {'identical' if same_kld else 'DIFFERENT'}."]
    if router:
        m = router["mean"]["Q8_0"]
        lines.append(f"Router statistics of the Q8_0 variant (mean over {len(router['layers'])} layers): top-k "
                     f"agreement {m['topk_agreement']:.4f}, top-1 {m['top1_agreement']:.4f}, load TVD "
                     f"{m['load_tvd']:.4f}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
