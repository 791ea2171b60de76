"""evalkit::rms_norm and evalkit::swiglu (C kernels or the torch fallback) against
independent float64 computations."""
from __future__ import annotations

import pytest
import torch

from evalkit.model import norm_act


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    if request.param == "kernel":
        if not norm_act.kernels_available():
            pytest.skip("no AVX-512F: the C kernels are not used on this CPU")
    else:
        monkeypatch.setattr(norm_act, "kernels_available", lambda: False)
    return request.param


def _rms_ref(x, w, eps):
    xd = x.double()
    return xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("shape", [(576,), (3, 576), (2, 7, 64), (5, 33), (1, 1, 1, 17), (17, 2048)])
def test_rms_norm_matches_float64(shape, path):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3
    w = torch.rand(shape[-1], generator=g) + 0.5
    out = torch.empty(shape)
    torch.ops.evalkit.rms_norm(x, w, 1e-5, out)
    ref = _rms_ref(x, w, 1e-5)
    assert ((out.double() - ref).abs() <= 4e-7 * ref.abs() + 1e-30).all()


def test_rms_norm_of_a_strided_view(path):
    """The last block normalises x[:, keep_from:], rows of a (B, T, E) buffer."""
    buf = torch.randn(3, 40, 96)
    x = buf[:, 25:]
    w = torch.rand(96) + 0.5
    out = torch.empty(x.shape)
    torch.ops.evalkit.rms_norm(x, w, 1e-6, out)
    ref = _rms_ref(x, w, 1e-6)
    assert ((out.double() - ref).abs() <= 4e-7 * ref.abs() + 1e-30).all()


def test_rms_norm_nan_stays_in_its_row(path):
    x = torch.randn(4, 64)
    x[2, 5] = float("nan")
    out = torch.empty_like(x)
    torch.ops.evalkit.rms_norm(x, torch.ones(64), 1e-5, out)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()


def test_swiglu_matches_float64(path):
    g = torch.cat([torch.randn(100_003) * 4, torch.tensor([0.0, -0.0, 30.0, -30.0, 88.0, -88.0, -100.0, 100.0])])
    u = torch.randn(g.numel())
    out = torch.empty_like(g)
    torch.ops.evalkit.swiglu(g, u, out)
    ref = torch.nn.functional.silu(g.double()) * u.double()
    assert ((out.double() - ref).abs() <= 6e-7 * ref.abs() + 1e-37).all()
    torch.ops.evalkit.swiglu(g, u, g)                   # in place, as the forward pass calls it
    assert torch.equal(g, out)
    nan = torch.tensor([float("nan"), 1.0])
    res = torch.empty(2)
    torch.ops.evalkit.swiglu(nan, torch.ones(2), res)
    assert torch.isnan(res[0]) and not torch.isnan(res[1])


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="weight float32"):
        torch.ops.evalkit.rms_norm(x, torch.ones(7), 1e-5, torch.empty(4, 8))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        torch.ops.evalkit.rms_norm(x, torch.ones(8), 1e-5, torch.empty(8, 4).t())
    with pytest.raises(ValueError, match="u must be a contiguous float32"):
        torch.ops.evalkit.swiglu(x, torch.randn(4, 7), x)
    with pytest.raises(ValueError, match="g must be a contiguous float32"):
        torch.ops.evalkit.swiglu(x.double(), x.double(), x.double())


def test_opcheck():
    x, w = torch.randn(3, 5, 32), torch.rand(32)
    torch.library.opcheck(torch.ops.evalkit.rms_norm.default, (x, w, 1e-5, torch.empty(3, 5, 32)))
    torch.library.opcheck(torch.ops.evalkit.swiglu.default, (x, torch.randn(3, 5, 32), torch.empty(3, 5, 32)))
