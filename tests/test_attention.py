"""evalkit::causal_attention (C kernel on torch's team, or the torch path) against an
independent float64 computation, across shapes, head groupings, query offsets and threads."""
from __future__ import annotations

import threading

import pytest
import torch

from evalkit import _kernels
from evalkit.model import attention as att
from evalkit.model.attention import CausalAttention

# (B, T, H, Hkv, D): SmolLM2's geometry, odd lengths, G = 1, 2, 3, 4, 6, 8 and D = 16 .. 128
SHAPES = [(2, 512, 9, 3, 64), (1, 37, 4, 2, 32), (2, 100, 8, 8, 48), (1, 70, 6, 1, 16),
          (2, 65, 4, 4, 128), (3, 33, 8, 2, 80), (1, 1, 3, 3, 64), (1, 130, 8, 1, 16)]


def _qkv(B, T, H, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g) * 2,
            torch.randn(B, T, Hkv, D, generator=g))


def _reference(q, k, v, q_from=0):
    """float64 softmax attention with an explicit causal mask and repeated kv heads."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    kr, vr = k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    scores = torch.einsum("bthd,bshd->bhts", q.double(), kr) / D ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vr)[:, q_from:]


def _run(q, k, v, q_from=0):
    out = torch.empty(q.shape[0], q.shape[1] - q_from, *q.shape[2:])
    torch.ops.evalkit.causal_attention(q, k, v, q_from, out)
    return out


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """The C kernel (skipped where the CPU lacks it) and the torch fallback."""
    if request.param == "kernel":
        if not att.kernel_available(64):
            pytest.skip("no AVX-512F: the attention kernel is not used on this CPU")
    else:
        monkeypatch.setattr(att, "kernel_available", lambda d: False)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_float64_reference(shape, path):
    q, k, v = _qkv(*shape)
    T = shape[1]
    for q_from in sorted({0, T // 2, T - 1}):
        got = _run(q, k, v, q_from)
        ref = _reference(q, k, v, q_from)
        err = (got.double() - ref).abs().max().item()
        assert err < 4e-6, f"{path} q_from={q_from}: max error {err:.2e} against float64"


def test_kernel_agrees_with_torch_path(monkeypatch):
    if not att.kernel_available(64):
        pytest.skip("no AVX-512F")
    q, k, v = _qkv(4, 512, 9, 3, 64, seed=3)
    kern = _run(q, k, v)
    monkeypatch.setattr(att, "kernel_available", lambda d: False)
    ref = _run(q, k, v)
    assert (kern - ref).abs().max().item() < 8e-6        # each is within 4e-6 of float64


def test_query_offset_and_threads_do_not_change_a_bit():
    """Each row's arithmetic is fixed (dot products over d, softmax and P V over keys in
    order), so the thread count, the team or pthreads, and q_from cannot change it."""
    if not att.kernel_available(64):
        pytest.skip("no AVX-512F")
    B, T, H, Hkv, D = 2, 200, 9, 3, 64
    q, k, v = _qkv(B, T, H, Hkv, D, seed=5)
    full = torch.empty(B, T, H, D)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.ops.evalkit.causal_attention(q, k, v, 0, full)
        for n in (2, 3):
            torch.set_num_threads(n)
            assert torch.equal(_run(q, k, v), full), f"torch threads {n}"
    finally:
        torch.set_num_threads(saved)
    for nthreads, runner in ((3, None), (2, None)):        # the pthread driver, no team
        out = torch.empty(B, T - 37, H, D)
        rc = _kernels.lib.ek_causal_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, T, H,
                                              Hkv, D, 37, D ** -0.5, nthreads, runner)
        assert rc == 0 and torch.equal(out, full[:, 37:])


def test_from_another_thread():
    q, k, v = _qkv(1, 64, 4, 2, 32)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("y", _run(q, k, v)))
    t.start()
    t.join()
    assert torch.equal(box["y"], _run(q, k, v))


def test_nan_spreads_only_where_it_is_seen(path):
    B, T, H, Hkv, D = 1, 80, 4, 2, 16
    q, k, v = _qkv(B, T, H, Hkv, D)
    k[0, 50, 1, 3] = float("nan")               # key 50 of kv head 1 (query heads 2, 3)
    q[0, 10, 0, 0] = float("nan")               # query 10 of head 0
    y = _run(q, k, v)
    bad = torch.isnan(y).any(-1)[0]             # (T, H)
    expect = torch.zeros(T, H, dtype=torch.bool)
    expect[50:, 2:] = True
    expect[10, 0] = True
    assert torch.equal(bad, expect)


def test_wrapper_and_bad_arguments():
    q, k, v = _qkv(1, 16, 4, 2, 32)
    y = CausalAttention()(q, k, v, q_from=4)
    assert y.shape == (1, 12, 4, 32)
    with pytest.raises(ValueError, match="q_from 16 outside"):
        _run(q, k, v, 16)
    with pytest.raises(ValueError, match="Hkv dividing H"):
        _run(q, k[:, :, :1].expand(1, 16, 3, 32).contiguous(), v[:, :, :1].expand(1, 16, 3, 32).contiguous())
    with pytest.raises(ValueError, match="contiguous 4-D float32"):
        _run(q.double(), k, v)
    with pytest.raises(ValueError, match="contiguous 4-D float32"):
        _run(q.transpose(1, 2), k, v)
    with pytest.raises(ValueError, match="out must have shape"):
        torch.ops.evalkit.causal_attention(q, k, v, 0, torch.empty(1, 15, 4, 32))


def test_kernel_rejects_what_it_cannot_do():
    lib = _kernels.lib
    q, k, v = _qkv(1, 8, 2, 1, 24)
    out = torch.empty_like(q)
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr())
    assert lib.ek_has_causal_attention(24) == 0                        # D % 16 != 0
    assert lib.ek_causal_attention(*args, 1, 8, 2, 1, 24, 0, 0.2, 1, None) == -2
    assert lib.ek_causal_attention(*args, 1, 8, 3, 2, 32, 0, 0.2, 1, None) == -4   # H % Hkv
    assert lib.ek_causal_attention(*args, 1, 8, 2, 1, 32, 8, 0.2, 1, None) == -4   # q_from >= T


def test_opcheck():
    q, k, v = _qkv(2, 24, 4, 2, 32)
    torch.library.opcheck(torch.ops.evalkit.causal_attention.default, (q, k, v, 5, torch.empty(2, 19, 4, 32)))
