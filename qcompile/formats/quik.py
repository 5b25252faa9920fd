"""QUIK's weight format: integer columns on a symmetric grid plus float outlier columns.

    W[:, int_idx[j]] = scales[:, j // group] * qweight[:, j]      (group = K_int / G)
    W[:, fp_idx]     = fp_weight

- ``qweight``: int8 [N, K_int], signed codes (4-bit weights: −8..7, 8-bit: −128..127; a symmetric
  grid, so no zero-point). Stored one code per byte: the CPU integer GEMM reads int8.
- ``scales``: [N, G] floats; G = 1 is per output channel (QUIK's own choice).
- ``int_idx`` int32 [K_int], ``fp_idx`` int32 [k]: which input channel each column is; together a
  permutation of the K inputs. The outlier channels are chosen at calibration (largest max|x|) and
  stored, never recomputed.
- ``fp_weight``: float16 [N, k], the outlier columns as QUIK keeps them.
- ``bits`` (weight) and ``act_bits`` (activations, quantized per token at run time).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class QuikWeight:
    qweight: Tensor
    scales: Tensor
    int_idx: Tensor
    fp_idx: Tensor
    fp_weight: Tensor
    bits: int = 4
    act_bits: int = 4

    format_name = "quik"

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2:
            raise ValueError(f"QuikWeight.qweight must be a 2-D int8 tensor, got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        n, k_int = self.qweight.shape
        if self.scales.dim() != 2 or self.scales.shape[0] != n or k_int % self.scales.shape[1]:
            raise ValueError(f"QuikWeight.scales must be [{n}, G] with G dividing {k_int}, got {tuple(self.scales.shape)}")
        self.int_idx, self.fp_idx = self.int_idx.to(torch.int32), self.fp_idx.to(torch.int32)
        k = k_int + self.fp_idx.numel()
        if self.int_idx.shape != (k_int,) or self.fp_weight.shape != (n, self.fp_idx.numel()):
            raise ValueError(f"QuikWeight: int_idx {tuple(self.int_idx.shape)} must be [{k_int}], fp_weight "
                             f"{tuple(self.fp_weight.shape)} [{n}, {self.fp_idx.numel()}]")
        seen = torch.cat([self.int_idx, self.fp_idx]).sort().values.cpu()
        if not torch.equal(seen, torch.arange(k, dtype=torch.int32)):
            raise ValueError(f"QuikWeight: int_idx and fp_idx must together list each of the {k} input channels once")
        if self.bits not in (2, 3, 4, 8) or self.act_bits not in (4, 8):
            raise ValueError(f"QuikWeight: bits={self.bits} (use 2, 3, 4 or 8), act_bits={self.act_bits} (use 4 or 8)")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] + self.fp_idx.numel()

    @property
    def group_size(self) -> int | None:
        g = self.qweight.shape[1] // self.scales.shape[1]
        return None if self.scales.shape[1] == 1 else g

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def rowsum(self) -> Tensor:
        """int32 [N, G]: the sum of each group's codes (the kernel's zero-point correction)."""
        n, g = self.scales.shape
        return self.qweight.to(torch.int32).reshape(n, g, -1).sum(-1, dtype=torch.int32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [N, K] in the layer's own input order."""
        n, k_int = self.qweight.shape
        g = k_int // self.scales.shape[1]
        w = torch.empty(n, self.in_features, dtype=dtype, device=self.qweight.device)
        w[:, self.int_idx.long()] = self.scales.to(dtype).repeat_interleave(g, dim=1) * self.qweight.to(dtype)
        w[:, self.fp_idx.long()] = self.fp_weight.to(dtype)
        return w

    def tensors(self) -> dict[str, Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "int_idx": self.int_idx, "fp_idx": self.fp_idx,
                "fp_weight": self.fp_weight}

    @staticmethod
    def file_names(meta: dict) -> list[str]:
        """The tensors a checkpoint holds for a layer of this format."""
        return ["qweight", "scales", "int_idx", "fp_idx", "fp_weight"]

    @classmethod
    def from_file(cls, fields: dict, meta: dict) -> "QuikWeight":
        return cls(**{n: fields[n] for n in cls.file_names(meta)}, bits=meta["bits"], act_bits=meta["act_bits"])

    def meta(self) -> dict:
        return {"format": self.format_name, "bits": self.bits, "act_bits": self.act_bits,
                "group_size": self.group_size, "outliers": self.fp_idx.numel(),
                "in_features": self.in_features, "out_features": self.out_features}
