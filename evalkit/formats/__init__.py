"""The format registry: one small record per quantization type, in one table.

Every type evalkit knows is registered here with the facts the rest of the
package needs (ggml type id, block geometry, per-row header, bits per weight,
whether the reference requires an importance matrix).  Whether the compiled
kernel library can quantize / dequantize a type is asked of the library itself
(`QuantFormat.can_quantize`).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QuantFormat", "FORMATS", "FORMATS_BY_ID", "get_format", "known_names"]


@dataclass(frozen=True)
class QuantFormat:
    """Geometry and identity of one ggml tensor type."""

    name: str
    type_id: int
    block_size: int          # elements per block
    type_size: int           # bytes per block
    header_bytes: int = 0    # per-row prefix (fp16 or float32 row scale) of KS/KL/KT types
    needs_imatrix: bool = False  # llama-quantize refuses it without an imatrix (except embd/output)
    family: str = ""

    @property
    def bpw(self) -> float:
        """Bits per weight of the blocks (the per-row header is not counted)."""
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        """Bytes of one row of ``n_per_row`` elements, header included."""
        if n_per_row <= 0 or n_per_row % self.block_size:
            raise ValueError(
                f"{self.name}: row length {n_per_row} is not a positive multiple of the block size {self.block_size}")
        return self.header_bytes + (n_per_row // self.block_size) * self.type_size

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor with ggml shape (ne0, ne1, ...): ne0 is the row length."""
        nrows = 1
        for d in shape[1:]:
            nrows *= int(d)
        return nrows * self.row_bytes(int(shape[0]))

    @property
    def can_quantize(self) -> bool:
        """True when the compiled kernels implement this type's quantizer."""
        from evalkit import _kernels
        return _kernels.has_quantize(self.type_id)

    @property
    def can_dequantize(self) -> bool:
        """True when the compiled kernels implement this type's dequantizer."""
        from evalkit import _kernels
        return _kernels.has_dequantize(self.type_id)


_F = QuantFormat
FORMATS: dict[str, QuantFormat] = {f.name: f for f in [
    # float
    _F("F32", 0, 1, 4, family="float"),
    _F("F16", 1, 1, 2, family="float"),
    _F("BF16", 30, 1, 2, family="float"),
    # legacy 32-element blocks
    _F("Q4_0", 2, 32, 18, family="legacy"),
    _F("Q4_1", 3, 32, 20, family="legacy"),
    _F("Q5_0", 6, 32, 22, family="legacy"),
    _F("Q5_1", 7, 32, 24, family="legacy"),
    _F("Q6_0", 133, 32, 26, family="legacy"),
    _F("Q8_0", 8, 32, 34, family="legacy"),
    _F("IQ4_NL", 20, 32, 18, family="legacy"),
    # k-quants
    _F("Q2_K", 10, 256, 84, family="k"),
    _F("Q3_K", 11, 256, 110, family="k"),
    _F("Q4_K", 12, 256, 144, family="k"),
    _F("Q5_K", 13, 256, 176, family="k"),
    _F("Q6_K", 14, 256, 210, family="k"),
    # IQ*_K (Iwan Kawrakow, ik_llama.cpp)
    _F("IQ2_K", 137, 256, 76, family="iqk"),
    _F("IQ3_K", 138, 256, 110, family="iqk"),
    _F("IQ4_K", 139, 256, 144, family="iqk"),
    _F("IQ5_K", 140, 256, 176, family="iqk"),
    _F("IQ6_K", 141, 256, 212, family="iqk"),
    # row-scaled IQK types
    _F("IQ4_KS", 144, 256, 136, 4, family="iqks"),
    _F("IQ2_KS", 145, 256, 70, 2, family="iqks"),
    _F("IQ4_KSS", 146, 256, 128, 4, family="iqks"),
    _F("IQ5_KS", 152, 256, 168, 4, family="iqks"),
    _F("IQ3_KS", 156, 256, 102, 2, family="iqks"),
    _F("IQ2_KL", 157, 256, 86, 2, family="iqks"),
    # trellis types
    _F("IQ2_KT", 153, 256, 68, 4, needs_imatrix=True, family="kt"),
    _F("IQ3_KT", 154, 256, 100, 4, family="kt"),
    _F("IQ4_KT", 155, 256, 128, 4, family="kt"),
    _F("IQ1_KT", 158, 256, 56, 4, needs_imatrix=True, family="kt"),
]}
del _F

FORMATS_BY_ID: dict[int, QuantFormat] = {f.type_id: f for f in FORMATS.values()}


def known_names() -> list[str]:
    """Names of every registered type, in registry order."""
    return list(FORMATS)


def get_format(name_or_id: str | int) -> QuantFormat:
    """Look a type up by name (case-insensitive) or ggml type id; ValueError lists the known ones."""
    if isinstance(name_or_id, bool):
        raise TypeError(f"type must be a name or a ggml type id, got {name_or_id!r}")
    if isinstance(name_or_id, int):
        fmt = FORMATS_BY_ID.get(name_or_id)
        if fmt is None:
            raise ValueError(f"unknown ggml type id {name_or_id}; known ids: "
                             + ", ".join(f"{f.name}={f.type_id}" for f in FORMATS.values()))
        return fmt
    if not isinstance(name_or_id, str):
        raise TypeError(f"type must be a name or a ggml type id, got {type(name_or_id).__name__}")
    fmt = FORMATS.get(name_or_id.strip().upper())
    if fmt is None:
        raise ValueError(f"unknown quantization type {name_or_id!r}; known types: {', '.join(FORMATS)}")
    return fmt
