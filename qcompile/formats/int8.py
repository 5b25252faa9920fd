"""8-bit symmetric weight, one scale per output channel:  w[n, k] = scales[n] * qweight[n, k].

Used for the output projection (lm_head) by default: it is the layer most sensitive to
quantization, as llama.cpp's mixes also keep it at higher precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Int8Weight:
    qweight: Tensor  # int8 [N, K]
    scales: Tensor   # [N]

    bits = 8
    group_size = None
    format_name = "int8"

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2:
            raise ValueError(f"Int8Weight.qweight must be a 2-D int8 tensor, got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        if tuple(self.scales.shape) != (self.qweight.shape[0],):
            raise ValueError(f"Int8Weight.scales has shape {tuple(self.scales.shape)}, expected ({self.qweight.shape[0]},)")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.qweight.to(dtype) * self.scales.to(dtype)[:, None]

    @staticmethod
    def cat(weights: list["Int8Weight"]) -> "Int8Weight":
        return Int8Weight(torch.cat([w.qweight for w in weights]), torch.cat([w.scales for w in weights]))

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def meta(self) -> dict:
        return {"format": self.format_name, "bits": self.bits, "group_size": None,
                "in_features": self.in_features, "out_features": self.out_features}
