"""The compiled kernels must be present: a missing build fails the suite instead of skipping it."""
import numpy as np


def test_kernel_library_loads_and_converts_fp16():
    from evalkit import _kernels, dequantize, quantize
    assert _kernels.lib is not None
    x = np.linspace(-3, 3, 512, dtype=np.float32).reshape(2, 256)
    q = quantize(x, "F16")
    assert q.tobytes() == x.astype(np.float16).tobytes()
    np.testing.assert_array_equal(dequantize(q, "F16", 256), x.astype(np.float16).astype(np.float32))
