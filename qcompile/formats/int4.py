"""The canonical 4-bit weight format: what is saved, what the reference math reads.

    w[n, k] = scales[n, g] * (q[n, k] - zeros[n, g]),   g = k // group_size

- ``qweight``: uint8 [N, K // 2]; byte j of a row holds code k = 2j in its low nibble and
  k = 2j + 1 in its high nibble.
- ``scales``, ``zeros``: [N, K // group_size] floats. Zero-points are in code units and may be
  fractional (a fitted grid) or integral (GPTQ, symmetric grids use 8).

Kernels may keep other layouts at run time (see `qcompile.lowering`); they convert from and back
to this one, so files are portable between CPU and GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def pack_nibbles(codes: Tensor) -> Tensor:
    """[N, K] integer codes in 0..15 -> uint8 [N, K // 2], low nibble first."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes per row into bytes: need an even count")
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """uint8 [N, K // 2] -> uint8 codes [N, K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


@dataclass
class Int4Weight:
    """A 4-bit grouped weight in the canonical layout (see the module docstring)."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    group_size: int

    bits = 4
    format_name = "int4"

    def __post_init__(self) -> None:
        n, half_k = self.qweight.shape
        if self.qweight.dtype != torch.uint8:
            raise ValueError(f"Int4Weight.qweight must be uint8, got {self.qweight.dtype}")
        k = 2 * half_k
        if k % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide in_features {k}")
        want = (n, k // self.group_size)
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if tuple(t.shape) != want:
                raise ValueError(f"Int4Weight.{name} has shape {tuple(t.shape)}, expected {want}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return 2 * self.qweight.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def codes(self) -> Tensor:
        return unpack_nibbles(self.qweight)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [N, K] this format stands for (float64 for test references)."""
        q = self.codes().to(dtype)
        s = self.scales.to(dtype).repeat_interleave(self.group_size, dim=1)
        z = self.zeros.to(dtype).repeat_interleave(self.group_size, dim=1)
        return s * (q - z)

    @staticmethod
    def cat(weights: list["Int4Weight"]) -> "Int4Weight":
        """Stack weights along the output dimension (for q/k/v or gate/up fusion)."""
        gs = {w.group_size for w in weights}
        if len(gs) != 1:
            raise ValueError(f"cannot concatenate int4 weights with different group sizes {sorted(gs)}")
        return Int4Weight(
            torch.cat([w.qweight for w in weights]),
            torch.cat([w.scales for w in weights]),
            torch.cat([w.zeros for w in weights]),
            gs.pop(),
        )

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}

    def meta(self) -> dict:
        return {"format": self.format_name, "bits": self.bits, "group_size": self.group_size,
                "in_features": self.in_features, "out_features": self.out_features}
