"""The read-only types (kernels/read_only.c): IQ4_XS and Q8_KV, dequantized only.

IQ4_XS {d; scales_h u16; scales_l[4]; qs[128]}: sub-block ib's 6-bit scale is nibble ib%2
of scales_l[ib/2] with bits 2ib..2ib+1 of scales_h on top; x = (d * (float)(ls - 32)) * T[q],
its 16 qs bytes holding elements j (low nibble) and j + 16 (high). Q8_KV rows are
[float32 d][int32 sum][int8 qs]: x = d * (float)q.
"""
from __future__ import annotations

import numpy as np
import torch

from evalkit.formats.torch_dequant._common import consts, f16_scale, f32_scale, split_rows, u16
from evalkit.formats.torch_dequant.legacy import IQ4NL_VALUES

__all__ = ["iq4_xs", "q8_kv"]


def iq4_xs(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """IQ4_XS super-blocks of 256: eight 32-element sub-blocks with 6-bit scales."""
    _, b = split_rows(q, 0, 136)                                          # (R, nb, 136)
    d = f16_scale(u16(b, 0))                                              # (R, nb, 1)
    ib = consts("iq4_xs:ib", q.device, lambda: np.arange(8, dtype=np.int32))
    lo = (b[..., 4 + ib.long() // 2].to(torch.int32) >> (4 * (ib % 2))) & 0xF
    hi = (u16(b, 2) >> (2 * ib)) & 3
    dl = d * ((lo | (hi << 4)) - 32).to(torch.float32)                     # (R, nb, 8)
    qs = b[..., 8:136].reshape(*b.shape[:-1], 8, 16).to(torch.int32)
    codes = torch.cat((qs & 0xF, qs >> 4), dim=-1)                         # (R, nb, 8, 32)
    table = consts("iq4nl", q.device, lambda: np.array(IQ4NL_VALUES, dtype=np.float32))
    return (dl.unsqueeze(-1) * table[codes]).reshape(q.shape[0], n)


def q8_kv(q: torch.Tensor, n: int, variant: int) -> torch.Tensor:
    """Q8_KV [float32 d][int32 sum] int8 qs: x = d * (float)q."""
    head = q[:, :8]
    d = f32_scale(head, 0)                                                 # (R, 1)
    codes = q[:, 8:8 + n].to(torch.int32)
    codes = codes - ((codes & 0x80) << 1)                                  # int8 sign extension
    return d * codes.to(torch.float32)
