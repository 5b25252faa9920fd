"""CPU int4 path: torch's own int4 GEMM kernel (`aten._weight_int4pack_mm_for_cpu`).

It is the fastest int4 CPU kernel torch ships (AVX-512/AVX2), but only with bf16 activations
(its float32 path is ~30x slower), so `qcompile::int4_mm_cpu` runs it in bf16 and Inductor fuses
the casts into the neighbouring kernels. Its layout:
  packed      uint8 [N, K/2], a blocked nibble order private to torch (it differs by CPU ISA),
  scale_zero  bf16 [K/g, N, 2] holding (scale, offset) with  w = (q - 8) * scale + offset.
We never decode the private order by hand: `unpack` recovers it by packing index patterns, so it
stays right whatever order the running torch build uses.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qcompile import _compat, ops
from qcompile.formats.int4 import Int4Weight, pack_nibbles
from qcompile.ops import PackedLinear

CPU_GROUP_SIZES = (256, 128, 64, 32)
_INNER_K_TILES = 2


def kernel_group_size(group_size: int) -> int | None:
    """The largest group size the kernel serves that divides the format's group (None if none)."""
    return next((g for g in CPU_GROUP_SIZES if group_size % g == 0), None)


def unsupported_reason(out_features: int, in_features: int, group_size: int) -> str | None:
    if out_features % 16:
        return f"the CPU int4 kernel needs out_features divisible by 16 (got {out_features})"
    if kernel_group_size(group_size) is None or in_features % 32:
        return f"the CPU int4 kernel needs groups of 32..256 channels (in_features={in_features}, group={group_size})"
    return None


def pack(w: Int4Weight) -> PackedLinear:
    reason = unsupported_reason(w.out_features, w.in_features, w.group_size)
    if reason:
        raise ValueError(reason)
    g = kernel_group_size(w.group_size)
    rep = w.group_size // g
    codes = w.codes().to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES)
    s = w.scales.float().repeat_interleave(rep, dim=1)
    z = w.zeros.float().repeat_interleave(rep, dim=1)
    offset = (8 - z) * s
    scale_zero = torch.stack((s, offset), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return PackedLinear("int4_cpu", {"packed": packed, "scale_zero": scale_zero}, (g,),
                        w.in_features, w.out_features, w.meta() | {"scale_dtype": str(w.scales.dtype)})


def _source_index(n: int, k: int) -> Tensor:
    """For each nibble of the packed layout, the flat index (row * k + col) of the code it holds."""
    idx = torch.arange(n * k, dtype=torch.int64).reshape(n, k)
    src = torch.zeros(n, k, dtype=torch.int64)
    shift = 0
    while (1 << shift) < n * k:
        nib = ((idx >> shift) & 0xF).to(torch.int32)
        p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib, _INNER_K_TILES)
        both = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(n, k).to(torch.int64)
        src |= both << shift
        shift += 4
    return src


def unpack(p: PackedLinear) -> Int4Weight:
    """The canonical weight back from the CPU layout (codes exact; zero-points in float32)."""
    n, k = p.out_features, p.in_features
    packed, scale_zero = p.tensors["packed"].cpu(), p.tensors["scale_zero"].cpu()
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(-1)
    codes = torch.empty(n * k, dtype=torch.uint8)
    codes[_source_index(n, k).reshape(-1)] = nibbles
    group = p.meta["group_size"]
    step = group // p.consts[0]
    s = scale_zero[..., 0].transpose(0, 1)[:, ::step]
    offset = scale_zero[..., 1].transpose(0, 1)[:, ::step]
    scale_dtype = getattr(torch, p.meta["scale_dtype"].removeprefix("torch."))
    zeros = 8 - offset.float() / s.float()
    return Int4Weight(pack_nibbles(codes.reshape(n, k)), s.to(scale_dtype), zeros, group)


# Inductor decomposes the CPU ops into the aten kernel calls (below autograd, so the ops' own
# backward formulas still apply): the bf16 casts then fuse into neighbouring Inductor kernels.
@_compat.register_inductor_decomposition(torch.ops.qcompile.int4_mm_cpu.default)
def _decompose_int4_mm_cpu(x, packed, scale_zero, group_size):
    return ops._int4_cpu_forward(x, packed, scale_zero, group_size)


@_compat.register_inductor_decomposition(torch.ops.qcompile.int8_mm.default)
def _decompose_int8_mm(x, qweight, scales):
    return ops._int8_forward(x, qweight, scales)


_compat.require_contiguous_inputs(torch.ops.aten._weight_int4pack_mm_for_cpu.default)
_compat.require_contiguous_inputs(torch.ops.aten._weight_int8pack_mm.default)
