"""Devices: names and availability, the torch implementations of every op (forced onto the
CPU with ``cpu-torch`` / :func:`evalkit.devices.torch_kernels`) against the C-kernel path,
and the ``device`` key / ``--device`` flag end to end.

No GPU is needed: the device path is the torch path, which runs on the CPU here. What only
a GPU can show (PPL over 40 chunks on cuda, tokens/s) is measured with bench/forward.py.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from conftest import GOLDEN, SHARED
from evalkit import quantize
from evalkit.cli import main as cli_main
from evalkit.devices import (DeviceError, DeviceSpec, TORCH_KERNELS_ENV, check_device_name, move_to_device,
                             resolve_device, torch_kernels, torch_kernels_forced, use_torch_kernels)
from evalkit.formats import get_format
from evalkit.model import QEmbedding, QLinear
from evalkit.model import attention as att
from evalkit.model import norm_act
from evalkit.model import qlinear as qlinear_module
from evalkit.run_config import ConfigError, config_from_dict

TINY = GOLDEN / "gguf" / "tiny-base.gguf"
KT_MIX = GOLDEN / "gguf" / "tiny-kt-mix-imatrix.gguf"
CORPUS = SHARED / "data" / "wikitext-2-raw-test.txt"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


# ----------------------------------------------------------------- names and availability

def test_cpu_names_resolve():
    assert resolve_device("cpu") == DeviceSpec("cpu", "cpu", False) and resolve_device("cpu").is_plain_cpu
    spec = resolve_device("cpu-torch")
    assert spec.torch_device == "cpu" and spec.torch_kernels and not spec.is_plain_cpu


@pytest.mark.parametrize("bad", [3, None, "", "CUDA", "cuda:x", "cuda 0", "cpu-torch:1", "../cuda"])
def test_malformed_device_names(bad):
    with pytest.raises(DeviceError, match="is not a device name"):
        check_device_name(bad)


@pytest.mark.parametrize("name, why", [("warp9", "not a torch device type"), ("meta", "holds no data")])
def test_devices_that_cannot_run_the_model(name, why):
    with pytest.raises(DeviceError, match=why):
        resolve_device(name)


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:3"])
def test_missing_cuda_is_a_named_error(name):
    with pytest.raises(DeviceError, match=rf"device '{name}' is not available: .*use --device cpu"):
        resolve_device(name)


def test_forcing_the_torch_kernels(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv(TORCH_KERNELS_ENV, raising=False)
    assert not use_torch_kernels(t)
    with torch_kernels():
        with torch_kernels():
            assert use_torch_kernels(t)
        assert torch_kernels_forced()
    with torch_kernels(False):
        assert not use_torch_kernels(t)
    monkeypatch.setenv(TORCH_KERNELS_ENV, "1")
    assert use_torch_kernels(t)


def test_move_to_device_copies_a_shared_buffer_once():
    """A tied embedding (one tensor seen by two modules) stays one tensor on the device."""
    shared = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    model = nn.Module()
    model.a, model.b = nn.Module(), nn.Module()
    model.a.register_buffer("weight", shared, persistent=False)
    model.b.register_buffer("weight", shared, persistent=False)
    model.b.register_buffer("bias", torch.ones(3))
    move_to_device(model, DeviceSpec("meta", "meta", True))          # "meta": a device without data
    assert model.a.weight.device.type == "meta" and model.a.weight is model.b.weight
    assert model.b.bias.device.type == "meta" and model.device_spec.name == "meta"


# ----------------------------------------------------------------- ops: torch path == C path

def _packed(type_name: str, rows: int = 333, n: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32)
    im = rng.uniform(0.5, 2.0, n).astype(np.float32) if get_format(type_name).needs_imatrix else None
    return quantize(w, type_name, imatrix=im)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q6_K", "IQ4_K", "IQ6_K", "IQ4_KS", "IQ2_KT", "F16", "F32"])
def test_qlinear_and_qembedding_on_the_torch_path_equal_the_c_path(type_name):
    """Same dequantized bits, same tiles, same GEMM calls: identical outputs."""
    q = _packed(type_name)
    x = torch.randn(2, 7, 512, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[0, 5, 332], [17, 17, 3]])
    lin, emb = QLinear(q, type_name, 512), QEmbedding(q, type_name, 512)
    with torch.inference_mode():
        want, want_rows, want_w = lin(x), emb(ids), lin.dequantized()
        out = torch.empty(2, 7, 333)
        with torch_kernels():
            got, got_rows, got_w = lin(x), emb(ids), lin.dequantized()
            lin(x, out=out)
    assert torch.equal(got, want) and torch.equal(out, want)
    assert torch.equal(got_rows, want_rows) and torch.equal(got_w, want_w)


def test_torch_path_checks_devices_and_ids():
    lin, emb = QLinear(_packed("Q8_0", 64, 64), "Q8_0", 64), QEmbedding(_packed("Q8_0", 64, 64), "Q8_0", 64)
    with torch_kernels():
        with pytest.raises(IndexError, match="token id 64 out of range"):
            emb(torch.tensor([1, 64]))
    # (a meta tensor dispatches to the op's fake implementation, so the check is called directly)
    with pytest.raises(ValueError, match="activations are on meta but the packed weight is on cpu"):
        qlinear_module._check_same_device(torch.empty(2, 64, device="meta"), lin.weight, "qlinear")


def test_rms_norm_and_swiglu_on_the_torch_path():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, 576, generator=g) * 3
    w = torch.rand(576, generator=g) + 0.5
    outs = []
    for forced in (False, True):
        y, a = torch.empty_like(x), torch.empty_like(x)
        with torch_kernels(forced):
            torch.ops.evalkit.rms_norm(x[:, 5:], w, 1e-5, y[:, 5:].contiguous())   # strided input
            torch.ops.evalkit.rms_norm(x, w, 1e-5, y)
            torch.ops.evalkit.swiglu(x, x * 0.5, a)
        outs.append((y, a))
    (y_c, a_c), (y_t, a_t) = outs
    if norm_act.kernels_available():
        # the C kernel's maths (squares summed in double, sqrtf, two roundings): the same bits
        assert torch.equal(y_t, y_c)
    # the C kernel's exp is a polynomial within about 1 ulp of torch's
    torch.testing.assert_close(a_t, a_c, rtol=1e-6, atol=1e-7)
    xd = x.double()
    ref = xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + 1e-5) * w.double()
    torch.testing.assert_close(y_t.double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("B, T, H, Hkv, D, q_from", [(2, 40, 6, 2, 16, 0), (2, 40, 6, 2, 16, 17),
                                                     (1, 9, 4, 4, 32, 8), (1, 70, 9, 3, 64, 35)])
def test_sdpa_attention_path(B, T, H, Hkv, D, q_from):
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g), \
        torch.randn(B, T, Hkv, D, generator=g)
    with torch_kernels():
        got = att.CausalAttention()(q, k, v, q_from=q_from)
    G = H // Hkv
    kr, vr = k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    s = torch.einsum("bthd,bshd->bhts", q.double(), kr) / D ** 0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhts,bshd->bthd", s.softmax(-1), vr)[:, q_from:]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_norm_act_module_exposes_the_device_path():
    assert callable(norm_act._rms_norm_torch) and callable(att._sdpa_attention)


# ----------------------------------------------------------------- model, perplexity, run

def test_model_logits_on_cpu_torch():
    from evalkit.evaluation import ModelForward, ScoredWindow, load_model
    from evalkit.model import Workspace
    tokens = np.random.default_rng(4).integers(0, 49152, (2, 64)).astype(np.int32)
    w = ScoredWindow(64)
    want = ModelForward(load_model(TINY), w, Workspace())(tokens).copy()
    model = load_model(TINY, "cpu-torch")
    assert model.device_spec.name == "cpu-torch"
    got = ModelForward(model, w, Workspace())(tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_perplexity_device_argument(tmp_path):
    from evalkit.evaluation.perplexity import perplexity
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(CORPUS.read_bytes()[:6000])
    kw = dict(ctx=64, chunks=2, threads=2, out=io.StringIO())
    a = perplexity(str(KT_MIX), str(corpus), **kw)
    b = perplexity(str(KT_MIX), str(corpus), device="cpu-torch", **kw)
    assert a["device"] == "cpu" and b["device"] == "cpu-torch"
    np.testing.assert_allclose(b["running_ppl"], a["running_ppl"], rtol=1e-5)


def test_config_device_key():
    cfg = config_from_dict({"name": "t"})
    assert cfg.device == "cpu" and cfg.to_dict()["device"] == "cpu"
    assert config_from_dict({"name": "t", "device": "cuda:1"}).device == "cuda:1"   # form only, here
    for bad in (3, None, "cuda:x"):
        with pytest.raises(ConfigError, match="'device': device .* is not a device name"):
            config_from_dict({"name": "t", "device": bad})


@no_cuda
def test_cli_unavailable_device_exits_2(tmp_path, capsys):
    rc = cli_main(["perplexity", str(TINY), "--corpus", str(CORPUS), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "evalkit perplexity: error: device 'cuda' is not available" in err
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"name": "t", "base": str(TINY), "corpus": str(CORPUS), "device": "cuda",
                                   "output_dir": str(tmp_path / "out"), "variants": [{"ftype": "IQ4_K"}]}))
    rc = cli_main(["run", str(cfg), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "evalkit run: error: device 'cuda' is not available" in err
    assert not (tmp_path / "out").exists()                    # nothing quantized, nothing written
    rc = cli_main(["run", str(cfg), "--no-progress", "--device", "tpu!"])
    assert rc == 2 and "'tpu!' is not a device name" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_perplexity_through_the_torch_path():
    """The issue's check: SmolLM2 (4 chunks) on cpu-torch equals the C path to 1e-6 relative."""
    from evalkit.evaluation.perplexity import perplexity
    kw = dict(ctx=512, chunks=4, threads=2, out=io.StringIO())
    a = perplexity("smollm2", str(CORPUS), **kw)
    b = perplexity("smollm2", str(CORPUS), device="cpu-torch", **kw)
    np.testing.assert_allclose(b["running_ppl"], a["running_ppl"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(b["ppl"], a["ppl"], rtol=1e-6, atol=0)


@pytest.mark.slow
def test_run_with_device_cpu_torch(tmp_path, capsys):
    """`evalkit run --device cpu-torch` end to end (KT/IQ mix variant): the same statistics, and
    results.json records the device."""
    import json
    results = {}
    for device in ("cpu", "cpu-torch"):
        cfg = tmp_path / f"{device}.yaml"
        cfg.write_text(yaml.safe_dump({"name": device, "base": str(TINY), "corpus": str(CORPUS), "ctx": 64,
                                       "chunks": 2, "threads": 2, "output_dir": str(tmp_path / "out"),
                                       "variants": [{"name": "kt", "gguf": str(KT_MIX)}]}))
        args = ["run", str(cfg), "--no-progress"] + (["--device", device] if device != "cpu" else [])
        assert cli_main(args) == 0, capsys.readouterr().err
        results[device] = json.loads((tmp_path / "out" / device / "results.json").read_text())
    assert results["cpu-torch"]["config"]["device"] == "cpu-torch" and results["cpu"]["config"]["device"] == "cpu"
    a, b = results["cpu"]["variants"]["kt"], results["cpu-torch"]["variants"]["kt"]
    for key in ("ppl", "kld_mean", "same_top_p"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-7)
