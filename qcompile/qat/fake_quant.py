"""The trained layer of DL-QAT: a frozen integer grid, a magnitude per group and LoRA inside the rounding.

Per layer, in storage order (the act_order permutation of the initial grid, if any, is kept):

    t = Φ0 + (α/r)·B·A                          code units; B [N, r] starts at 0, A [r, K] random
    q = clamp(round(t), 0, 2^bits − 1)          round: straight-through (identity gradient)
    s = fp16(m · s0)                            m [N, K/g] starts at 1; the storage dtype, straight-through
    Ŵ = s · (q − z)                             z: the initial grid's integer zero-points (frozen)

Φ0 = Q0 + clamp(W/s0 + z − Q0, ±125/256) holds the initial codes Q0 (GPTQ's or RTN's) plus where
the float weight sat between grid points, in 1/256 steps, so round(Φ0) = Q0 exactly: before any step
the layer computes the post-training weight bit for bit, and the codes the LoRA term moves first
are those the float weight was closest to moving anyway. It is stored as int16 (2 bytes a weight,
not a float copy). The LoRA term is in code units, as in LR-QAT (Bondarenko et al., 2024): every
group gets the same push per unit of B·A whatever its step; algorithms.md's weight-domain form
(W + BA)/s differs only by a per-group rescaling of BA. The scale is cast to the storage dtype in
the forward pass, so what training saw is exactly what is saved.

`merged_weight` applies the same `codes` function to the same tensors, so the deployed codes are
the trained ones: no re-derived grid, no second rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats.int4 import Int4Weight, pack_nibbles

PHI_FRACTION = 256          # Φ0 in units of 1/256 code
PHI_RESIDUAL = 125          # |Φ0 − Q0| ≤ 125/256 < 1/2: round(Φ0) is Q0


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _CastSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None


def initial_phi(codes: Tensor, scales: Tensor, zeros: Tensor, float_weight: Tensor, group_size: int) -> Tensor:
    """int16 [N, K]: Φ0·256 from the initial integer codes and the float weight (both in storage order)."""
    n, k = codes.shape
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    cont = float_weight.float() / s + z
    residual = torch.round((cont - codes.float()) * PHI_FRACTION).clamp(-PHI_RESIDUAL, PHI_RESIDUAL)
    residual = torch.nan_to_num(residual, nan=0.0)
    return (codes.to(torch.int16) * PHI_FRACTION + residual.to(torch.int16)).contiguous()


def codes(phi: Tensor, lora_b: Tensor | None, lora_a: Tensor | None, scaling: float, qmax: int) -> Tensor:
    """clamp(round_ste(Φ0 + scaling·B·A), 0, qmax) as float32 [N, K] (the integer codes, as floats)."""
    t = phi.float() * (1.0 / PHI_FRACTION)
    if lora_b is not None:
        t = t + (lora_b @ lora_a) * scaling
    return torch.clamp(_RoundSTE.apply(t), 0, qmax)


def group_scales(magnitude: Tensor, scales0: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """s = m·s0 rounded to the storage dtype (straight-through). Kept out of the compiled function:
    Inductor keeps float32 precision through a cast pair inside a fused kernel, which would train on
    scales that are not the saved ones."""
    return _CastSTE.apply(magnitude * scales0, scale_dtype)


def fake_quant_weight(phi: Tensor, lora_b: Tensor | None, lora_a: Tensor | None, scaling: float, qmax: int,
                      scales: Tensor, zeros: Tensor) -> Tensor:
    """Ŵ [N, K] = s · (q − z) per group, in storage order; `scales` from `group_scales`."""
    q = codes(phi, lora_b, lora_a, scaling, qmax)
    n, k = q.shape
    groups = scales.shape[1]
    return (scales[:, :, None] * (q.view(n, groups, k // groups) - zeros[:, :, None])).view(n, k)


_compiled_fake_quant = None


def compiled_fake_quant():
    """`fake_quant_weight` under torch.compile (one graph per layer shape, forward and backward fused)."""
    global _compiled_fake_quant
    if _compiled_fake_quant is None:
        _compiled_fake_quant = torch.compile(fake_quant_weight, dynamic=False)
    return _compiled_fake_quant


class QATLinear(nn.Module):
    """A linear layer under DL-QAT training (see the module docstring); `merged_weight()` gives the
    trained int4 weight. Trainable: ``magnitude`` [N, K/g] and ``lora_a`` / ``lora_b``."""

    def __init__(self, weight: Int4Weight, float_weight: Tensor, bias: Tensor | None, *, rank: int,
                 lora_alpha: float, scale_dtype: torch.dtype, compile: bool = False, init: str = ""):
        super().__init__()
        n, k = weight.out_features, weight.in_features
        self.in_features, self.out_features = k, n
        self.group_size, self.bits, self.rank = weight.group_size, weight.bits, rank
        self.qmax = 2**weight.bits - 1
        self.scale_dtype, self.compile, self.init = scale_dtype, compile, init
        self.scaling = lora_alpha / max(rank, 1)
        perm = None if weight.perm is None else weight.perm.long()
        stored_float = float_weight.detach() if perm is None else float_weight.detach()[:, perm]
        self.register_buffer("phi", initial_phi(weight.codes(), weight.scales, weight.zeros, stored_float,
                                                weight.group_size))
        self.register_buffer("scales0", weight.scales.float().contiguous())
        self.register_buffer("zeros", weight.zeros.float().contiguous())
        self.register_buffer("zeros_stored", weight.zeros.clone())  # the saved dtype (fp16), for merging
        self.register_buffer("perm", perm)
        self.magnitude = nn.Parameter(torch.ones_like(self.scales0))
        if rank:
            self.lora_a = nn.Parameter(torch.empty(rank, k, device=self.phi.device))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear / PEFT's LoRA A
            self.lora_b = nn.Parameter(torch.zeros(n, rank, device=self.phi.device))
        else:
            self.lora_a = self.lora_b = None
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def fake_weight(self) -> Tensor:
        """Ŵ [N, K] in storage order (differentiable in the trainable parameters)."""
        fn = compiled_fake_quant() if self.compile else fake_quant_weight
        return fn(self.phi, self.lora_b, self.lora_a, self.scaling, self.qmax,
                  group_scales(self.magnitude, self.scales0, self.scale_dtype), self.zeros)

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:  # act_order: gather the inputs, as the deployed kernel does
            x = x.index_select(-1, self.perm)
        with torch.autocast(x.device.type, enabled=False):  # the grid math in float32 under bf16 training too
            weight = self.fake_weight()
        return F.linear(x, weight.to(x.dtype), self.bias)  # (autocast, if on, casts this matmul to bf16)

    @torch.no_grad()
    def merged_weight(self) -> Int4Weight:
        """The trained layer as plain int4: the same `codes` on the same tensors, scales (m·s0) in the storage dtype."""
        q = codes(self.phi, self.lora_b, self.lora_a, self.scaling, self.qmax)
        return Int4Weight(pack_nibbles(q.to(torch.uint8)), group_scales(self.magnitude, self.scales0, self.scale_dtype)
                          .to(self.scale_dtype),
                          self.zeros_stored.clone(), self.group_size, bits=self.bits,
                          perm=None if self.perm is None else self.perm.to(torch.int32))

    def trainable_count(self) -> int:
        return sum(p.numel() for p in (self.magnitude, self.lora_a, self.lora_b) if p is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.rank}, act_order={self.perm is not None}")


class FrozenQuantLinear(nn.Module):
    """A quantized layer training leaves alone (the int8 lm_head, int8 blocks): its dequantized weight
    in float, so gradients flow through it to the layers before; `original` is restored at convert."""

    def __init__(self, original: nn.Module, weight: Tensor):
        super().__init__()
        self.original = [original]  # a list: not a submodule (its buffers are not the model's while training)
        self.in_features, self.out_features = original.in_features, original.out_features
        self.register_buffer("weight", weight.float().contiguous())
        self.bias = original.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
