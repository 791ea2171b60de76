"""The MoE test models: generated once per machine by ../shared/tools/make_moe_models.py, checked
against moe-reference.json's sha256, cached under $EVALKIT_CACHE (default ~/.cache/evalkit)
in ``moe-models/<generator sha256[:16]>/``.

Generation is deterministic (the generator seeds every tensor from its name) and takes
seconds for a tiny model, ~30 s for the two 1.4 GB smol-moe files. A verified file gets a
``.verified`` stamp (size, mtime, sha256), so later sessions skip re-hashing it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from conftest import GOLDEN, SHARED

GENERATOR = SHARED / "tools" / "make_moe_models.py"
REFERENCE = GOLDEN / "moe" / "moe-reference.json"

# model key in moe-reference.json -> the generator's --only name
GENERATOR_NAME = {"tiny-qwen3moe": "qwen3moe", "tiny-deepseek2": "deepseek2", "tiny-glm4moe": "glm4moe",
                  "smol-moe": "smol-moe", "smol-moe-mistral3": "smol-moe"}


def reference() -> dict:
    """moe-reference.json as a dict."""
    return json.loads(REFERENCE.read_text())


def cache_dir() -> Path:
    """One folder per version of the generator, reused across runs on this machine."""
    gen_sha = hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("EVALKIT_CACHE", Path.home() / ".cache" / "evalkit"))
    return root / "moe-models" / gen_sha


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _verified(path: Path, sha: str) -> bool:
    """The file's bytes hash to ``sha`` (trusting a stamp written for this very size and mtime)."""
    st = path.stat()
    key = f"{st.st_size} {st.st_mtime_ns} {sha}"
    stamp = _stamp(path)
    if stamp.exists() and stamp.read_text() == key:
        return True
    if _sha256(path) != sha:
        return False
    tmp = stamp.with_name(stamp.name + f".{os.getpid()}")
    tmp.write_text(key)
    os.replace(tmp, stamp)
    return True


def _generate(only: str, out: Path) -> None:
    """Run the generator for one model into ``out`` (atomically: a temporary folder, then renames)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=out))
    try:
        proc = subprocess.run([sys.executable, str(GENERATOR), "--out", str(tmp), "--only", only],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{GENERATOR} --only {only} failed:\n{proc.stderr[-2000:]}")
        for f in tmp.iterdir():
            os.replace(f, out / f.name)                                 # never a half-written model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_path(key: str) -> Path:
    """The path of reference model ``key`` (e.g. ``tiny-qwen3moe``), generated if needed; its
    sha256 must be moe-reference.json's (AssertionError otherwise)."""
    ref = reference()["models"][key]
    path = cache_dir() / ref["file"]
    if not path.exists():
        _generate(GENERATOR_NAME[key], path.parent)
    assert _verified(path, ref["sha256"]), \
        f"{path}: sha256 differs from moe-reference.json's {ref['sha256']} (delete it to regenerate)"
    return path


def plain_moe_layer(g, cfg, il: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 MoE layer from fully dequantized matrices, token by token; also each token's
    relative top-k margin (tokens near a tie may route differently in float32)."""
    W = lambda n: g.dequantize(f"blk.{il}.{n}.weight", variant="inference").astype(np.float64)  # noqa: E731
    router, gate, up, down = W("ffn_gate_inp"), W("ffn_gate_exps"), W("ffn_up_exps"), W("ffn_down_exps")
    bias_name = f"blk.{il}.exp_probs_b.bias"
    bias = g.dequantize(bias_name).astype(np.float64) if bias_name in g.tensors else 0.0
    shared = [W(f"ffn_{n}_shexp") for n in ("gate", "up", "down")] if cfg.n_expert_shared else None
    silu = lambda v: v / (1 + np.exp(-v))                  # noqa: E731
    out, margin = np.zeros_like(h, dtype=np.float64), np.zeros(len(h))
    for t, x in enumerate(h.astype(np.float64)):
        z = router @ x
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum() if cfg.expert_gating == "softmax" else 1 / (1 + np.exp(-z))
        sel = p + bias
        order = np.argsort(-sel)
        k = cfg.n_expert_used
        margin[t] = (sel[order[k - 1]] - sel[order[k]]) / abs(sel[order[k - 1]])
        w = p[order[:k]]
        w = w / w.sum() if cfg.expert_weights_norm else w
        w = w * cfg.expert_weights_scale
        for e, we in zip(order[:k], w):
            out[t] += we * (down[e] @ (silu(gate[e] @ x) * (up[e] @ x)))
        if shared:
            out[t] += shared[2] @ (silu(shared[0] @ x) * (shared[1] @ x))
    return out, margin
