"""The format registry: one small record per quantization type, in one table.

Every type evalkit knows is registered here with the facts the rest of the
package needs (ggml type id, block geometry, per-row header, bits per weight,
whether the reference requires an importance matrix).  Whether the compiled
kernel library can quantize / dequantize a type is asked of the library itself
(`QuantFormat.can_quantize`).
"""
from __future__ import annotations

from dataclasses import dataclass

from evalkit.errors import EvalkitError
from evalkit.registry import lookup

__all__ = ["QuantFormat", "FORMATS", "FORMATS_BY_ID", "get_format", "known_names", "ReadOnlyTypeError"]


class ReadOnlyTypeError(EvalkitError, NotImplementedError):
    """A type evalkit reads (dequantizes) but cannot quantize into (``QuantFormat.quantizable``)."""


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
    quantizable: bool = True     # False: read-only (dequantized from published files, never written)

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
        return self.quantizable and _kernels.has_quantize(self.type_id)

    def require_quantizable(self) -> None:
        """ReadOnlyTypeError for a type evalkit only reads (no quantizer by design)."""
        if not self.quantizable:
            raise ReadOnlyTypeError(f"{self.name}: evalkit reads (dequantizes) this type from published files "
                                    "but cannot quantize into it; choose another target type")

    @property
    def can_dequantize(self) -> bool:
        """True when the compiled kernels implement this type's dequantizer."""
        from evalkit import _kernels
        return _kernels.has_dequantize(self.type_id)


# Block geometry as in ggml's block structs (ggml/src/ggml-common.h of ik_llama.cpp): each
# bytes-per-block value is the sum of its struct's fields, named in the comment, in struct
# order; "row header" is the per-row scale stored before the first block of each row.
# tests/test_geometry.py checks every row against the kernel library's own table.
QK_K = 256         # elements per super-block (k-quants, IQ*_K, KS/KL and KT types)
QK = 32            # elements per block of the legacy types (QK4_0 ... QK8_0, QK4_NL)
K_SCALE_SIZE = 12  # packed 6-bit scales (and mins) of Q3_K, Q4_K, Q5_K
F16 = 2            # ggml_half
F32 = 4            # float
U16 = 2            # uint16_t
U32 = 4            # uint32_t
I32 = 4            # int32_t

# family -> (name, ggml type id, elements per block, bytes per block[, row header bytes])
_TABLE: dict[str, list[tuple]] = {
    "float": [
        ("F32",       0, 1, F32),
        ("F16",       1, 1, F16),
        ("BF16",     30, 1, 2),                                                # ggml_bf16_t
    ],
    "legacy": [
        ("Q4_0",      2, QK, F16 + QK // 2),                                   # d | qs
        ("Q4_1",      3, QK, F16 + F16 + QK // 2),                             # d | m | qs
        ("Q5_0",      6, QK, F16 + QK // 8 + QK // 2),                         # d | qh | qs
        ("Q5_1",      7, QK, F16 + F16 + QK // 8 + QK // 2),                   # d | m | qh | qs
        ("Q6_0",    133, QK, F16 + QK // 4 + QK // 2),                         # d | qh | qs
        ("Q8_0",      8, QK, F16 + QK),                                        # d | qs (int8)
        ("IQ4_NL",   20, QK, F16 + QK // 2),                                   # d | qs
    ],
    "k": [
        ("Q2_K",     10, QK_K, QK_K // 16 + QK_K // 4 + F16 + F16),            # scales | qs | d | dmin
        ("Q3_K",     11, QK_K, QK_K // 8 + QK_K // 4 + K_SCALE_SIZE + F16),    # hmask | qs | scales | d
        ("Q4_K",     12, QK_K, F16 + F16 + K_SCALE_SIZE + QK_K // 2),          # d | dmin | scales | qs
        ("Q5_K",     13, QK_K, F16 + F16 + K_SCALE_SIZE                        # d | dmin | scales
                               + QK_K // 8 + QK_K // 2),                       # | qh | qs
        ("Q6_K",     14, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + F16),      # ql | qh | scales | d
    ],
    "iqk": [  # IQ*_K (Iwan Kawrakow, ik_llama.cpp)
        ("IQ2_K",   137, QK_K, F16 + U16 + QK_K // 32 + QK_K // 4),            # d | extra | scales | qs
        ("IQ3_K",   138, QK_K, F16 + U16 + U16 + QK_K // 32                    # d | extra | scales_h | scales_l
                               + QK_K // 4 + QK_K // 8),                       # | qs | qh
        ("IQ4_K",   139, QK_K, F16 + U16 + QK_K // 64 + QK_K // 32             # d | extra | scales_h | scales_l
                               + QK_K // 2),                                   # | qs
        ("IQ5_K",   140, QK_K, F16 + U16 + QK_K // 64 + QK_K // 32             # d | extra | scales_h | scales_l
                               + QK_K // 2 + QK_K // 8),                       # | qs | qh
        ("IQ6_K",   141, QK_K, F16 + U16 + QK_K // 16                          # d | extra | scales
                               + QK_K // 2 + QK_K // 4),                       # | qs | qh
    ],
    "iqks": [  # row-scaled IQK types: [row header][blocks]
        ("IQ4_KS",  144, QK_K, QK_K // 32 + QK_K // 2, F32),                   # scales | qs
        ("IQ2_KS",  145, QK_K, U16 + QK_K // 64 + QK_K // 4, F16),             # extra | scales | qs
        ("IQ4_KSS", 146, QK_K, U32 * (QK_K // 8), F32),                        # qs
        ("IQ5_KS",  152, QK_K, QK_K // 32 + QK_K // 2 + QK_K // 8, F32),       # scales | qs | qh
        ("IQ3_KS",  156, QK_K, U16 + QK_K // 64                                # extra | scales
                               + QK_K // 4 + QK_K // 8, F16),                  # | qs | qh
        ("IQ2_KL",  157, QK_K, U16 + QK_K // 64                                # scales_h | scales_l
                               + QK_K // 4 + QK_K // 16, F16),                 # | qs | qh
    ],
    "kt": [  # trellis types: [float32 row header][blocks]
        ("IQ2_KT",  153, QK_K, QK_K // 64 + QK_K // 4, F32),                   # scales | ql
        ("IQ3_KT",  154, QK_K, QK_K // 64 + QK_K // 4 + QK_K // 8, F32),       # scales | ql | qh
        ("IQ4_KT",  155, QK_K, U32 * (QK_K // 8), F32),                        # qs
        ("IQ1_KT",  158, QK_K, QK_K // 32 + QK_K // 8 + QK_K // 16, F32),      # sh | ql | qh
    ],
    # read only: the plain side of repacked published tensors (IQ4_XS_R8, Q8_KV_R8);
    # dequantizers in kernels/read_only.c, no quantizer
    "read-only": [
        ("IQ4_XS",   23, QK_K, F16 + U16 + QK_K // 64 + QK_K // 2),            # d | scales_h | scales_l | qs
        ("Q8_KV",   151, QK, QK, F32 + I32),                                   # [d | sum of quants] qs (int8)
    ],
}
# llama-quantize refuses these without an imatrix (except for token_embd / output)
_NEEDS_IMATRIX = {"IQ1_KT", "IQ2_KT"}

FORMATS: dict[str, QuantFormat] = {
    name: QuantFormat(name, type_id, block_size, type_size, *header, needs_imatrix=name in _NEEDS_IMATRIX,
                      family=family, quantizable=family != "read-only")
    for family, rows in _TABLE.items() for name, type_id, block_size, type_size, *header in rows
}

FORMATS_BY_ID: dict[int, QuantFormat] = {f.type_id: f for f in FORMATS.values()}


def known_names() -> list[str]:
    """Names of every registered type, in registry order."""
    return list(FORMATS)


def get_format(name_or_id: str | int) -> QuantFormat:
    """Look a type up by name (case-insensitive) or ggml type id; ValueError lists the known ones."""
    return lookup(name_or_id, FORMATS, FORMATS_BY_ID, "quantization type", "ggml type id")
