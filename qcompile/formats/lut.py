"""Per-row lookup-table weights (GANQ): every output row has its own table of 2^bits values.

    w[n, k] = tables[n, codes[n, k]]

- ``codes``: uint8 [N, K // 2], two codes per byte, k = 2j in the low nibble (as int4). 3-bit
  codes use nibbles too in memory, the layout the kernels read; files store them densely, eight
  codes in three bytes (`pack_codes` / `unpack_codes`).
- ``tables``: [N, 2^bits] fp16 or bf16, one table per output row; no scales, zeros or groups.
- ``outliers`` (optional, GANQ*): a sparse float part added on top, COO as
  (rows int32 [nnz], cols int32 [nnz], values [nnz]); the table part holds 0's share there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .int4 import pack_nibbles, unpack_nibbles


@dataclass
class LutWeight:
    codes: Tensor
    tables: Tensor
    bits: int = 4
    outliers: tuple[Tensor, Tensor, Tensor] | None = None

    format_name = "lut"

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4):
            raise ValueError(f"LutWeight holds 2-, 3- or 4-bit codes, got bits={self.bits}")
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise ValueError(f"LutWeight.codes must be a 2-D uint8 tensor of nibbles, got {self.codes.dtype} "
                             f"{tuple(self.codes.shape)}")
        want = (self.codes.shape[0], 2**self.bits)
        if tuple(self.tables.shape) != want or not self.tables.is_floating_point():
            raise ValueError(f"LutWeight.tables must be a float tensor of shape {want}, got "
                             f"{self.tables.dtype} {tuple(self.tables.shape)}")
        if self.outliers is not None:
            rows, cols, vals = self.outliers
            if not (rows.shape == cols.shape == vals.shape and rows.dim() == 1):
                raise ValueError("LutWeight.outliers must be three 1-D tensors of equal length (rows, cols, values)")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return 2 * self.codes.shape[1]

    @property
    def group_size(self) -> None:
        return None

    @property
    def nbytes(self) -> int:
        """Bytes as stored in a file (3-bit codes packed densely)."""
        code_bytes = self.out_features * self.in_features * self.bits // 8
        extra = sum(t.numel() * t.element_size() for t in self.outliers) if self.outliers else 0
        return code_bytes + self.tables.numel() * self.tables.element_size() + extra

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = self.tables.to(dtype).gather(1, unpack_nibbles(self.codes).long())
        if self.outliers is not None:
            rows, cols, vals = self.outliers
            w = w.index_put((rows.long(), cols.long()), vals.to(dtype), accumulate=True)
        return w

    def rows(self, start: int, end: int) -> "LutWeight":
        """Output rows start..end-1 (a layer's share of a fit done on stacked layers)."""
        if self.outliers is not None:
            raise ValueError("cannot slice the rows of a lookup-table weight with outliers")
        return LutWeight(self.codes[start:end].contiguous(), self.tables[start:end].contiguous(), self.bits)

    @staticmethod
    def cat(weights: list["LutWeight"]) -> "LutWeight":
        bits = {w.bits for w in weights}
        if len(bits) != 1 or any(w.outliers is not None for w in weights):
            raise ValueError("can only concatenate lookup-table weights of one width without outliers")
        return LutWeight(torch.cat([w.codes for w in weights]), torch.cat([w.tables for w in weights]), bits.pop())

    def tensors(self) -> dict[str, Tensor]:
        t = {"codes": self.codes, "tables": self.tables}
        if self.outliers is not None:
            t.update(zip(("outlier_rows", "outlier_cols", "outlier_values"), self.outliers))
        return t

    def file_tensors(self) -> dict[str, Tensor]:
        """The tensors as saved: 3-bit codes packed eight to three bytes."""
        t = self.tensors()
        if self.bits == 3:
            t["codes"] = pack_codes(unpack_nibbles(self.codes), 3)
        return t

    @staticmethod
    def from_file(tensors: dict[str, Tensor], meta: dict) -> "LutWeight":
        codes = tensors["codes"]
        if meta["bits"] == 3:
            codes = pack_nibbles(unpack_codes(codes, 3, meta["in_features"]))
        outliers = None
        if "outlier_rows" in tensors:
            outliers = (tensors["outlier_rows"], tensors["outlier_cols"], tensors["outlier_values"])
        return LutWeight(codes, tensors["tables"], meta["bits"], outliers)

    def meta(self) -> dict:
        return {"format": self.format_name, "bits": self.bits, "group_size": None,
                "table_entries": 2**self.bits, "outliers": 0 if self.outliers is None else int(self.outliers[0].numel()),
                "in_features": self.in_features, "out_features": self.out_features}


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """[N, K] codes -> uint8 bytes of the file layout: nibbles for 4 bits; for 3 bits eight codes
    in three bytes, little-endian, code i at bits 3i..3i+2 of the 24-bit group (K % 8 == 0)."""
    if bits == 4 or bits == 2:
        return pack_nibbles(codes)
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"3-bit codes pack eight to three bytes: in_features {k} is not a multiple of 8")
    c = codes.to(torch.int32).reshape(n, k // 8, 8)
    word = (c << (3 * torch.arange(8, dtype=torch.int32, device=codes.device))).sum(-1)
    return torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1).to(torch.uint8).reshape(n, -1)


def unpack_codes(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of `pack_codes`: uint8 codes [N, K]."""
    if bits == 4 or bits == 2:
        return unpack_nibbles(packed)
    n = packed.shape[0]
    b = packed.to(torch.int32).reshape(n, in_features // 8, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    shifts = 3 * torch.arange(8, dtype=torch.int32, device=packed.device)
    return ((word[..., None] >> shifts) & 7).to(torch.uint8).reshape(n, in_features)
