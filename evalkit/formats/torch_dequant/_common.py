"""Building blocks of the torch dequantizers: byte fields, exact scale conversions, tables.

Every helper works on any torch device and uses integer operations only, except where a
float value is formed the way the C kernel forms it. Nothing here depends on the C
library. Bit identity with kernels/*.c rests on three rules that every family module
keeps:

* integer → float conversions happen on the same (exactly representable) integers;
* every float operation is one torch elementwise op on float32 tensors (never a Python
  float scalar, whose promotion rules differ between ops and devices; never a fused op
  such as ``addcmul``), so each result is rounded once, as with ``-ffp-contract=off``;
* the operands are combined in the C expression's order (``(d * sc) * q`` is not
  ``d * (sc * q)``).

fp16 and bf16 scales are widened with integer bit manipulation rather than by torch's
half → float conversion, so NaN payloads come out exactly as ``ek_fp16_to_fp32`` writes
them on every device.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["consts", "f32_const", "split_rows", "u16", "u32", "f16_scale", "f32_scale", "bits_to_f32",
           "with_sign", "gather_bits"]

_INT32_MIN = -(1 << 31)

# Device-resident constants (tables, index maps), built once per (key, device).
_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}


def consts(key: str, device: torch.device, build) -> torch.Tensor:
    """The tensor ``build()`` (numpy array or tensor) on ``device``, built once per (key, device)."""
    k = (key, torch.device(device))
    t = _CACHE.get(k)
    if t is None:
        # an ordinary tensor even when first built inside the forward's inference mode, so
        # that any later caller, in any grad mode, may use it
        with torch.inference_mode(False):
            v = build()
            t = (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v).to(device)
        _CACHE[k] = t
    return t


def f32_const(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d float32 tensor holding ``value`` rounded to float32 once (a C ``1.05f`` literal)."""
    return consts(f"f32:{float(value).hex()}", device, lambda: torch.tensor(value, dtype=torch.float32))


def split_rows(q: torch.Tensor, header_bytes: int, block_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (R, row_bytes) → (row header (R, header_bytes), blocks (R, nb, block_bytes)), views."""
    rows = q.shape[0]
    blocks = q[:, header_bytes:].reshape(rows, -1, block_bytes)
    return q[:, :header_bytes], blocks


def u16(b: torch.Tensor, off: int) -> torch.Tensor:
    """Little-endian uint16 at byte ``off`` of the last dimension, as int32 (trailing dim kept: (..., 1))."""
    return b[..., off:off + 1].to(torch.int32) | (b[..., off + 1:off + 2].to(torch.int32) << 8)


def u32(b: torch.Tensor, off: int) -> torch.Tensor:
    """Little-endian uint32 at byte ``off`` of the last dimension, as int64 ((..., 1))."""
    v = b[..., off:off + 4].to(torch.int64)
    return v[..., 0:1] | (v[..., 1:2] << 8) | (v[..., 2:3] << 16) | (v[..., 3:4] << 24)


def bits_to_f32(bits: torch.Tensor) -> torch.Tensor:
    """The float32 whose IEEE bits are the uint32 values ``bits`` (int64 tensor, 0 ≤ bits < 2^32).

    The narrowing to int32 subtracts 2^32 explicitly (an int64 → int32 cast of a larger
    value is implementation-defined), then the int32 tensor is reinterpreted.
    """
    signed = torch.where(bits >= (1 << 31), bits - (1 << 32), bits).to(torch.int32)
    return signed.view(torch.float32)


def with_sign(magnitude_bits: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """float32 from int32 bits below 2^31 and a sign flag: the sign bit set by integer xor."""
    sign = torch.where(negative, _INT32_MIN, 0).to(torch.int32)
    return (magnitude_bits ^ sign).view(torch.float32)


def f16_scale(h: torch.Tensor) -> torch.Tensor:
    """IEEE binary16 bit patterns (int32, 0..65535) → float32, exactly as ``ek_fp16_to_fp32``.

    Normal and Inf/NaN halves are rebiased bit patterns (the NaN payload shifted up by 13,
    never quieted); subnormals are m·2^-24, which float32 holds exactly.
    """
    mag = (h & 0x7FFF) << 13                       # exponent and mantissa at float32's positions
    e = (h >> 10) & 0x1F
    normal = torch.where(e == 31, mag + (224 << 23), mag + (112 << 23))
    two_m24 = f32_const(2.0 ** -24, h.device)
    sub = ((h & 0x3FF).to(torch.float32) * two_m24).view(torch.int32)
    bits = torch.where(e == 0, sub, normal)
    return with_sign(bits, (h & 0x8000) != 0)


def f32_scale(b: torch.Tensor, off: int) -> torch.Tensor:
    """The little-endian float32 at byte ``off`` of the last dimension ((..., 1)), bits kept."""
    return bits_to_f32(u32(b, off))


def gather_bits(b: torch.Tensor, byte_idx: torch.Tensor, shift: torch.Tensor, mask: int) -> torch.Tensor:
    """``(b[..., byte_idx] >> shift) & mask`` as int32: one small field per output element.

    ``byte_idx`` (int64) and ``shift`` (int32) are index maps of the element positions,
    built once per format (see :func:`consts`).
    """
    return (b[..., byte_idx].to(torch.int32) >> shift) & mask
