"""The canonical 8-bit weight format:

    w[n, k] = scales[n, g] * (qweight[n, k] - zeros[n, g]),   g = k // group_size

- ``qweight``: int8 [N, K].
- ``group_size``: None (default) for one scale per output channel: ``scales`` is [N] and
  ``w[n, k] = scales[n] * (qweight[n, k] - zeros[n])``. Otherwise ``scales`` is [N, K // group_size].
- ``zeros`` (optional, same shape as ``scales``): zero-points in code units. None is the symmetric
  grid (zero = 0): the default int8 lm_head, which the kernels serve on their fastest path.
  Unsigned 8-bit grids (GPTQ: codes and zeros in 0..255) are stored shifted by 128, so that
  ``qweight = codes - 128`` fits int8 and ``zeros - 128`` keeps ``q - z`` unchanged.
- ``perm`` (optional, int32 [K]): act_order input order, as in `Int4Weight`:
  ``stored[:, j] = W[:, perm[j]]``, groups contiguous in storage.

The default int8 lm_head (per channel, symmetric) is the layer most sensitive to quantization, as
llama.cpp's mixes also keep it at higher precision.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Int8Weight:
    qweight: Tensor                  # int8 [N, K]
    scales: Tensor                   # [N] per channel, or [N, K // group_size]
    zeros: Tensor | None = None      # like scales; None: symmetric
    group_size: int | None = None    # None: per output channel
    perm: Tensor | None = None       # int32 [K]: act_order input order

    bits = 8
    format_name = "int8"

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2:
            raise ValueError(f"Int8Weight.qweight must be a 2-D int8 tensor, got {self.qweight.dtype} {tuple(self.qweight.shape)}")
        n, k = self.qweight.shape
        if self.group_size is None:
            want = (n,)
        else:
            if self.group_size <= 0 or k % self.group_size:
                raise ValueError(f"Int8Weight: group_size {self.group_size} does not divide in_features {k}")
            want = (n, k // self.group_size)
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != want:
                raise ValueError(f"Int8Weight.{name} has shape {tuple(t.shape)}, expected {want} "
                                 f"(group_size={self.group_size})")
        if self.perm is not None:
            if self.perm.shape != (k,) or self.perm.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"Int8Weight.perm must be an int32/int64 vector of {k} input channels, "
                                 f"got {self.perm.dtype} {tuple(self.perm.shape)}")
            self.perm = self.perm.to(torch.int32)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [N, K] in the layer's own input order (float64 for test references)."""
        q = self.qweight.to(dtype)
        s, z = self.scales.to(dtype), None if self.zeros is None else self.zeros.to(dtype)
        if self.group_size is None:
            w = s[:, None] * (q if z is None else q - z[:, None])
        else:
            s = s.repeat_interleave(self.group_size, dim=1)
            w = s * (q if z is None else q - z.repeat_interleave(self.group_size, dim=1))
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm.long()] = w
        return out

    @staticmethod
    def cat(weights: list["Int8Weight"]) -> "Int8Weight":
        """Stack weights along the output dimension (for q/k/v or gate/up fusion)."""
        from .int4 import same_perm

        gs = {w.group_size for w in weights}
        if len(gs) != 1:
            raise ValueError(f"cannot concatenate int8 weights with different group sizes {sorted(gs, key=str)}")
        if not same_perm([w.perm for w in weights]):
            raise ValueError("cannot concatenate int8 weights with different input orders (perm)")
        zeros = None
        if any(w.zeros is not None for w in weights):  # symmetric members get explicit zero-points 0
            dtype = next(w.zeros.dtype for w in weights if w.zeros is not None)
            zeros = torch.cat([w.zeros if w.zeros is not None else torch.zeros_like(w.scales, dtype=dtype)
                               for w in weights])
        return Int8Weight(torch.cat([w.qweight for w in weights]), torch.cat([w.scales for w in weights]),
                          zeros, gs.pop(), weights[0].perm)

    def tensors(self) -> dict[str, Tensor]:
        t = {"qweight": self.qweight, "scales": self.scales}
        if self.zeros is not None:
            t["zeros"] = self.zeros
        if self.perm is not None:
            t["perm"] = self.perm
        return t

    def meta(self) -> dict:
        return {"format": self.format_name, "bits": self.bits, "group_size": self.group_size,
                "zeros": self.zeros is not None, "act_order": self.perm is not None,
                "in_features": self.in_features, "out_features": self.out_features}
