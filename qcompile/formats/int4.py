"""The canonical 4-bit weight format: what is saved, what the reference math reads.

    w[n, k] = scales[n, g] * (q[n, k] - zeros[n, g]),   g = k // group_size

- ``qweight``: uint8 [N, K // 2]; byte j of a row holds code k = 2j in its low nibble and
  k = 2j + 1 in its high nibble.
- ``scales``, ``zeros``: [N, K // group_size] floats. Zero-points are in code units and may be
  fractional (a fitted grid) or integral (GPTQ, symmetric grids use 2^(bits-1)).
- ``bits``: 2, 3 or 4. Narrower codes (0..2^bits-1) are stored in nibbles too, so they run on the
  int4 kernels; `bits` records the grid for reports and export.
- ``perm`` (optional, int32 [K]): an input-channel order (GPTQ's act_order). Columns are stored
  permuted, ``stored[:, j] = W[:, perm[j]]``, so groups are contiguous in storage and
  ``x @ W.T == x[..., perm] @ stored.T``: the kernel gathers the activation, never the weight.

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
    bits: int = 4
    perm: Tensor | None = None

    format_name = "int4"

    def __post_init__(self) -> None:
        n, half_k = self.qweight.shape
        if self.qweight.dtype != torch.uint8:
            raise ValueError(f"Int4Weight.qweight must be uint8, got {self.qweight.dtype}")
        k = 2 * half_k
        if k % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide in_features {k}")
        if self.bits not in (2, 3, 4):
            raise ValueError(f"Int4Weight holds 2-, 3- or 4-bit codes, got bits={self.bits}")
        if self.perm is not None:
            if self.perm.shape != (k,) or self.perm.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"Int4Weight.perm must be an int32/int64 vector of {k} input channels, "
                                 f"got {self.perm.dtype} {tuple(self.perm.shape)}")
            self.perm = self.perm.to(torch.int32)
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
        """The float weight [N, K] this format stands for, in the layer's own input order
        (float64 for test references)."""
        q = self.codes().to(dtype)
        s = self.scales.to(dtype).repeat_interleave(self.group_size, dim=1)
        z = self.zeros.to(dtype).repeat_interleave(self.group_size, dim=1)
        w = s * (q - z)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm.long()] = w
        return out

    @staticmethod
    def cat(weights: list["Int4Weight"]) -> "Int4Weight":
        """Stack weights along the output dimension (for q/k/v or gate/up fusion)."""
        gs = {w.group_size for w in weights}
        if len(gs) != 1:
            raise ValueError(f"cannot concatenate int4 weights with different group sizes {sorted(gs)}")
        if not same_perm([w.perm for w in weights]):
            raise ValueError("cannot concatenate int4 weights with different input orders (perm)")
        return Int4Weight(
            torch.cat([w.qweight for w in weights]),
            torch.cat([w.scales for w in weights]),
            torch.cat([w.zeros for w in weights]),
            gs.pop(),
            max(w.bits for w in weights),
            weights[0].perm,
        )

    def tensors(self) -> dict[str, Tensor]:
        t = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.perm is not None:
            t["perm"] = self.perm
        return t

    def meta(self) -> dict:
        return {"format": self.format_name, "bits": self.bits, "group_size": self.group_size,
                "act_order": self.perm is not None,
                "in_features": self.in_features, "out_features": self.out_features}


def same_perm(perms: list[Tensor | None]) -> bool:
    """Whether input orders agree (None: the identity), so weights can share one gathered input."""
    first = perms[0]
    return all((p is None and first is None) or (p is not None and first is not None and torch.equal(p, first))
               for p in perms)
