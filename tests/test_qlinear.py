"""evalkit::qlinear / evalkit::qembedding against plain torch on dequantized weights.

Every type is parametrized; a type is skipped only while its kernels are missing from
the build (the set grows as kernels land), so an implemented type can never silently
drop out of the comparison.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evalkit import dequantize, quantize
from evalkit.formats import FORMATS, get_format
from evalkit.model import QLinear, qlinear as ql
from evalkit.model.qlinear import QEmbedding

REQUIRED = ["IQ2_K", "IQ3_K", "IQ4_K", "IQ5_K", "IQ6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q6_0", "Q8_0",
            "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F32", "F16", "BF16"]
# every other registered type is checked as well once its kernels exist
ALL_TYPES = REQUIRED + [t for t in FORMATS if t not in REQUIRED]

N_PER_ROW = 512          # a multiple of every block size
OUT_ROWS = 333           # with the small tile below: tiles of 84, 84, 84, 81 rows (ragged)


def _need(type_name: str):
    fmt = get_format(type_name)
    if not (fmt.can_quantize and fmt.can_dequantize):
        pytest.skip(f"{type_name}: kernels not in this build yet (quantize={fmt.can_quantize}, "
                    f"dequantize={fmt.can_dequantize})")
    return fmt


def _weights(type_name: str, rows: int = OUT_ROWS, n: int = N_PER_ROW, seed: int = 0):
    """(packed uint8 (rows, row_bytes), float32 weights the matmul kernels use (rows, n))."""
    fmt = get_format(type_name)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, n)) * 0.05).astype(np.float32)
    imatrix = rng.uniform(0.5, 2.0, n).astype(np.float32) if fmt.needs_imatrix else None
    q = quantize(w, type_name, imatrix=imatrix)
    return q, dequantize(q, type_name, n, variant="inference")


def _assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """Equal up to float32 rounding: |y - x Wᵀ| <= 1e-5 |x Wᵀ| + 1e-6 (|x| |W|ᵀ)."""
    ref = F.linear(x.double(), w.double())
    bound = 1e-5 * ref.abs() + 1e-6 * F.linear(x.abs().double(), w.abs().double())
    err = (y.double() - ref).abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (f"max error {err.max().item():.3e} exceeds bound "
                                        f"{bound.reshape(-1)[worst].item():.3e}")
    # and against torch's own float32 GEMM on the same weights
    assert torch.allclose(y, F.linear(x, w), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.fixture
def small_tiles(monkeypatch):
    """Force several tiles (the last one ragged) for the OUT_ROWS x N_PER_ROW weights."""
    monkeypatch.setattr(ql, "TILE_ELEMENTS", 100 * N_PER_ROW)
    assert ql.tile_rows_for(N_PER_ROW, OUT_ROWS) == 84


@pytest.fixture(params=[1, 3])
def mode(request):
    """torch with 1 and with 3 threads (the GEMM splits the tiles' columns unevenly)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.mark.parametrize("m", [1, 17, 512])
@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_qlinear_matches_dequantized_linear(type_name, m, small_tiles, mode):
    fmt = _need(type_name)
    q, w = _weights(type_name)
    x = torch.from_numpy(np.random.default_rng(m).standard_normal((m, N_PER_ROW)).astype(np.float32))
    y = torch.ops.evalkit.qlinear(x, torch.from_numpy(q), fmt.type_id, N_PER_ROW, 1)
    assert y.shape == (m, OUT_ROWS) and y.dtype == torch.float32
    _assert_matmul_close(y, x, torch.from_numpy(w))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_K", "F16"])
def test_qlinear_default_tiles_and_batch_dims(type_name):
    fmt = _need(type_name)
    rows = 3 * ql.TILE_ELEMENTS // 1024 + 37   # several default-size tiles, ragged end
    q, w = _weights(type_name, rows=rows, n=1024)
    x = torch.randn(2, 5, 1024)
    y = torch.ops.evalkit.qlinear(x, torch.from_numpy(q), fmt.type_id, 1024, 1)
    assert y.shape == (2, 5, rows)
    _assert_matmul_close(y.reshape(10, rows), x.reshape(10, 1024), torch.from_numpy(w))


def test_iq6_k_uses_the_inference_table(small_tiles):
    fmt = _need("IQ6_K")
    q, w_inf = _weights("IQ6_K")
    w_tf = dequantize(q, "IQ6_K", N_PER_ROW, variant="to_float")
    assert not np.array_equal(w_inf, w_tf), "IQ6_K's two dequantizers should differ"
    x = torch.randn(17, N_PER_ROW)
    y = torch.ops.evalkit.qlinear(x, torch.from_numpy(q), fmt.type_id, N_PER_ROW, 1)
    _assert_matmul_close(y, x, torch.from_numpy(w_inf))
    lin = QLinear(q, "IQ6_K", N_PER_ROW)                 # the module defaults to "inference"
    assert torch.equal(lin(x), y)
    assert torch.equal(lin.dequantized(), torch.from_numpy(w_inf))
    # the cubic would give a measurably different product
    assert (y - F.linear(x, torch.from_numpy(w_tf))).abs().max() > 1e-4


@pytest.mark.parametrize("type_name", ALL_TYPES)
def test_qembedding_gathers_to_float_rows(type_name):
    _need(type_name)
    q, _ = _weights(type_name, rows=100)
    deq = dequantize(q, type_name, N_PER_ROW, variant="to_float")      # the reference's get_rows
    ids = torch.tensor([[3, 99, 0, 3], [42, 42, 7, 1]])
    emb = QEmbedding(q, type_name, N_PER_ROW)
    got = emb(ids)
    assert got.shape == (2, 4, N_PER_ROW)
    assert torch.equal(got, torch.from_numpy(deq)[ids])                 # bit-exact
    with pytest.raises(IndexError, match="100"):
        emb(torch.tensor([100]))


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K"])
def test_opcheck(type_name):
    fmt = _need(type_name)
    q, _ = _weights(type_name, rows=40, n=256)
    w = torch.from_numpy(q)
    for x in (torch.randn(3, 256), torch.randn(2, 4, 256)):
        torch.library.opcheck(torch.ops.evalkit.qlinear.default, (x, w, fmt.type_id, 256, 1))
    torch.library.opcheck(torch.ops.evalkit.qembedding.default, (torch.tensor([[1, 5], [39, 0]]), w,
                                                                 fmt.type_id, 256, 0))
    torch.library.opcheck(torch.ops.evalkit.qlinear_out.default,
                          (torch.randn(2, 4, 256), w, fmt.type_id, 256, 1, torch.empty(2, 4, 40)))


@pytest.mark.parametrize("type_name", ["F32", "Q4_1", "IQ4_K"])
def test_qlinear_out_writes_what_qlinear_returns(type_name, small_tiles, mode):
    fmt = _need(type_name)
    q, w = _weights(type_name)
    x = torch.randn(2, 9, N_PER_ROW)
    out = torch.full((2, 9, OUT_ROWS), float("nan"))
    lin = QLinear(q, type_name, N_PER_ROW)
    assert lin(x, out=out) is out
    _assert_matmul_close(out.view(-1, OUT_ROWS), x.view(-1, N_PER_ROW), torch.from_numpy(w))
    biased = QLinear(q, type_name, N_PER_ROW, bias=torch.linspace(-1, 1, OUT_ROWS))
    assert torch.equal(biased(x, out=out), biased(x))
    assert torch.equal(biased(x), lin(x) + biased.bias)


def test_qlinear_out_rejects_a_wrong_buffer():
    fmt = _need("Q8_0")
    q, _ = _weights("Q8_0", rows=48, n=256)
    w, x = torch.from_numpy(q), torch.randn(3, 256)
    for bad in (torch.empty(3, 47), torch.empty(3, 48, dtype=torch.float64), torch.empty(48, 3).t()):
        with pytest.raises(ValueError, match="out must be a contiguous float32 tensor of shape"):
            torch.ops.evalkit.qlinear_out(x, w, fmt.type_id, 256, 1, bad)


def test_qlinear_traces_with_fake_tensors():
    _need("Q8_0")
    q, w = _weights("Q8_0", rows=48, n=256)
    lin = QLinear(q, "Q8_0", 256, bias=torch.arange(48, dtype=torch.float32))
    ep = torch.export.export(lin, (torch.randn(7, 256),))
    assert any("evalkit.qlinear" in str(n.target) for n in ep.graph.nodes)
    x = torch.randn(7, 256)
    assert torch.allclose(lin(x), F.linear(x, torch.from_numpy(w), lin.bias), rtol=1e-5, atol=1e-4)


def test_f32_weights_multiply_in_place():
    q, w = _weights("F32", rows=20, n=64)
    x = torch.randn(4, 64)
    y = torch.ops.evalkit.qlinear(x, torch.from_numpy(q), 0, 64, 1)
    assert torch.equal(y, F.linear(x, torch.from_numpy(w)))
    # a misaligned F32 buffer falls back to the tiled copy and still matches
    raw = np.zeros(q.size + 1, np.uint8)
    raw[1:] = q.reshape(-1)
    mis = torch.from_numpy(raw[1:].reshape(q.shape))
    assert mis.data_ptr() % 4
    assert torch.equal(torch.ops.evalkit.qlinear(x, mis, 0, 64, 1), y)


def test_bad_inputs_raise_clearly():
    q, _ = _weights("F16", rows=8, n=64)
    w = torch.from_numpy(q)
    with pytest.raises(ValueError, match="features"):
        torch.ops.evalkit.qlinear(torch.randn(2, 32), w, 1, 64, 1)
    with pytest.raises(ValueError, match="bytes"):
        torch.ops.evalkit.qlinear(torch.randn(2, 64), w[:, :64], 1, 64, 1)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.evalkit.qlinear(torch.randn(2, 64, dtype=torch.float64), w, 1, 64, 1)
    with pytest.raises(ValueError, match="bias"):
        QLinear(q, "F16", 64, bias=torch.zeros(3))
    missing = [t for t in ALL_TYPES if not get_format(t).can_dequantize]
    if missing:
        fmt = get_format(missing[0])
        with pytest.raises(NotImplementedError, match=fmt.name):
            QLinear(np.zeros((2, fmt.row_bytes(256)), np.uint8), fmt.name, 256)


def test_concurrent_calls_from_several_threads(mode):
    from concurrent.futures import ThreadPoolExecutor
    fmt = _need("Q4_0")
    q, w = _weights("Q4_0", rows=700, n=512)
    qt, wt = torch.from_numpy(q), torch.from_numpy(w)
    xs = [torch.randn(33, 512) for _ in range(8)]
    with ThreadPoolExecutor(4) as ex:
        ys = list(ex.map(lambda x: torch.ops.evalkit.qlinear(x, qt, fmt.type_id, 512, 1), xs))
    for x, y in zip(xs, ys):
        _assert_matmul_close(y, x, wt)


def test_buffers_survive_switching_inference_mode(monkeypatch):
    # the per-thread scratch buffer is first made under inference mode, then reused outside it
    monkeypatch.setattr(ql._tls, "buf", None, raising=False)
    q, w = _weights("F16", rows=64, n=256)
    x = torch.randn(5, 256)
    with torch.inference_mode():
        a = torch.ops.evalkit.qlinear(x, torch.from_numpy(q), 1, 256, 1)
    b = torch.ops.evalkit.qlinear(x, torch.from_numpy(q), 1, 256, 1)
    assert torch.equal(a, b)
