"""The read-only plain types IQ4_XS and Q8_KV (kernels/read_only.c): dequantized, never quantized.

Their golden check is the repacked set (IQ4_XS_R8 and Q8_KV_R8 de-interleave to them and
hash as the reference, tests/test_repacked.py); here the C and torch dequantizers are
compared with ggml's formulas written out independently in numpy, and quantizing into
them must be refused with a named error.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import evalkit
from evalkit.errors import EvalkitError
from evalkit.formats import FORMATS, ReadOnlyTypeError, get_format
from evalkit.formats.torch_dequant import dequantize_torch
from evalkit.recipes import TypeOptions, quantize_model

from conftest import GOLDEN

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def ref_iq4_xs(q: np.ndarray, n: int) -> np.ndarray:
    """ggml's dequantize_row_iq4_xs: dl = d * (ls - 32); y = dl * kvalues[q]."""
    b = q.reshape(q.shape[0], n // 256, 136)
    d = b[..., 0:2].copy().view("<f2").astype(np.float32)                 # (R, nb, 1)
    sh = b[..., 2:4].copy().view("<u2").astype(np.int32)
    out = np.empty((q.shape[0], n // 256, 8, 32), np.float32)
    for ib in range(8):
        ls = ((b[..., 4 + ib // 2].astype(np.int32) >> 4 * (ib % 2)) & 0xF) | (((sh[..., 0] >> 2 * ib) & 3) << 4)
        dl = d[..., 0] * (ls - 32).astype(np.float32)
        qs = b[..., 8 + 16 * ib:24 + 16 * ib]
        out[..., ib, :16] = dl[..., None] * KVALUES[qs & 0xF]
        out[..., ib, 16:] = dl[..., None] * KVALUES[qs >> 4]
    return out.reshape(q.shape[0], n)


def ref_q8_kv(q: np.ndarray, n: int) -> np.ndarray:
    """dequantize_row_q8_KV: y = d * q with d the row's leading float."""
    d = q[:, 0:4].copy().view("<f4")
    return d * q[:, 8:8 + n].view(np.int8).astype(np.float32)


def _random_rows(name: str, n: int, rows: int = 200) -> np.ndarray:
    rng = np.random.default_rng(get_format(name).type_id)
    q = rng.integers(0, 256, (rows, get_format(name).row_bytes(n)), dtype=np.uint8)
    if name == "Q8_KV":     # finite row scales (random bits would often be NaN/inf)
        q[:, 0:4] = rng.standard_normal(rows).astype("<f4").view(np.uint8).reshape(rows, 4)
    else:
        q.reshape(rows, -1, 136)[..., 1] &= 0x3B          # finite fp16 super-block scales
    return q


@pytest.mark.parametrize("name,ref", [("IQ4_XS", ref_iq4_xs), ("Q8_KV", ref_q8_kv)])
def test_dequantize_matches_ggml_formula(name, ref):
    n = 512
    q = _random_rows(name, n)
    want = ref(q, n)
    assert np.isfinite(want).all()
    got = evalkit.dequantize(q, name, n, threads=2)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    got_t = dequantize_torch(torch.from_numpy(q), name, n).numpy()
    np.testing.assert_array_equal(got_t.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("name", ["IQ4_XS", "Q8_KV"])
def test_read_only_types_refuse_to_quantize(name):
    fmt = FORMATS[name]
    assert not fmt.quantizable and not fmt.can_quantize and fmt.can_dequantize
    with pytest.raises(ReadOnlyTypeError, match=f"{name}: evalkit reads .* cannot quantize"):
        evalkit.quantize(np.zeros((2, 256), np.float32), name)
    assert issubclass(ReadOnlyTypeError, EvalkitError) and issubclass(ReadOnlyTypeError, NotImplementedError)


def test_quantize_model_refuses_a_read_only_target(tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(NotImplementedError, match="IQ4_XS"):
        quantize_model(str(GOLDEN / "gguf" / "tiny-base.gguf"), out, "Q4_0",
                       options=TypeOptions(overrides=["ffn_down=IQ4_XS"]), progress=False)
    assert not out.exists()


def test_geometry():
    assert get_format("IQ4_XS").row_bytes(256) == 136 and get_format("IQ4_XS").bpw == 4.25
    assert get_format("Q8_KV").row_bytes(64) == 8 + 64
