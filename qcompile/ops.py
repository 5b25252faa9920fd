"""The custom ops quantized graphs call: schema, fake (shape) function, reference implementation.

Each op computes ``x @ W.T`` for a quantized W held in one layout. The reference implementations
here dequantize and matmul in float (slow, exact, any device); `qcompile.lowering` registers the
fast CPU kernels, the Triton kernels and the Inductor lowerings for the same ops.

| op                    | layout of W                                             |
|-----------------------|---------------------------------------------------------|
| qcompile::int4_mm     | canonical int4 (`formats.Int4Weight`); Triton reads it   |
| qcompile::int4_mm_cpu | torch's CPU int4 pack + [G, N, 2] (scale, offset) bf16  |
| qcompile::int8_mm     | int8 [N, K] + per-channel scales                         |
| qcompile::int8_embedding | row gather of an int8 table (tied lm_head/embedding) |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .formats.int4 import unpack_nibbles


def _check_input(name: str, x: Tensor, in_features: int) -> None:
    if not x.is_floating_point():
        raise TypeError(f"qcompile::{name}: input must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"qcompile::{name}: input has {x.shape[-1]} features in its last dimension, "
            f"the quantized weight expects {in_features}"
        )


def dequantize_int4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    q = unpack_nibbles(qweight).to(dtype)
    s = scales.to(dtype).repeat_interleave(group_size, dim=1)
    z = zeros.to(dtype).repeat_interleave(group_size, dim=1)
    return s * (q - z)


# --- int4, canonical layout -------------------------------------------------------------------
@torch.library.custom_op("qcompile::int4_mm", mutates_args=())
def int4_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ dequant(W).T with W in the canonical int4 layout (reference: dequantize + matmul)."""
    _check_input("int4_mm", x, 2 * qweight.shape[1])
    w = dequantize_int4(qweight, scales, zeros, group_size, x.dtype)
    return x @ w.t()


@int4_mm.register_fake
def _(x, qweight, scales, zeros, group_size):
    _check_input("int4_mm", x, 2 * qweight.shape[1])
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


# --- ops that decompose into aten kernels -------------------------------------------------------
# Defined as CompositeImplicitAutograd: Dynamo's graph (and so the passes and the report) sees the
# qcompile op, and AOTAutograd then traces through it, so Inductor fuses the bf16 casts into the
# neighbouring kernels and calls torch's own int4/int8 CPU kernel with no Python in between.
_lib = torch.library.Library("qcompile", "FRAGMENT")
_lib.define("int4_mm_cpu(Tensor x, Tensor packed, Tensor scale_zero, int group_size) -> Tensor")
_lib.define("int8_mm(Tensor x, Tensor qweight, Tensor scales) -> Tensor")
_lib.define("int8_embedding(Tensor ids, Tensor qweight, Tensor scales, ScalarType dtype) -> Tensor")


def int4_mm_cpu(x: Tensor, packed: Tensor, scale_zero: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ W.T with W in torch's CPU int4 layout, computed in bf16 (the fast kernel's dtype)."""
    k = scale_zero.shape[0] * group_size
    _check_input("int4_mm_cpu", x, k)
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scale_zero)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def int8_mm(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [..., K] @ (qweight * scales[:, None]).T; torch's int8 kernel in bf16 on CPU."""
    _check_input("int8_mm", x, qweight.shape[1])
    if x.device.type == "cpu":
        x2 = x.reshape(-1, qweight.shape[1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(torch.bfloat16))
        return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
    return x @ (qweight.to(x.dtype) * scales.to(x.dtype)[:, None]).t()


_lib.impl("int4_mm_cpu", int4_mm_cpu, "CompositeImplicitAutograd")
_lib.impl("int8_mm", int8_mm, "CompositeImplicitAutograd")


def int8_embedding(ids: Tensor, qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows `ids` of an int8 table, dequantized to `dtype` (an embedding tied to an int8 lm_head)."""
    return qweight[ids].to(dtype) * scales[ids].to(dtype).unsqueeze(-1)


_lib.impl("int8_embedding", int8_embedding, "CompositeImplicitAutograd")


# --- weights packed for a kernel --------------------------------------------------------------
LAYOUT_OPS = {
    "int4": torch.ops.qcompile.int4_mm.default,
    "int4_cpu": torch.ops.qcompile.int4_mm_cpu.default,
    "int8": torch.ops.qcompile.int8_mm.default,
}
QUANTIZED_LINEAR_OPS = frozenset(LAYOUT_OPS.values())


@dataclass
class PackedLinear:
    """A quantized weight in the layout one kernel reads, and the op that runs it.

    ``op(x, *tensors.values(), *consts)`` computes ``x @ W.T``. Made by `qcompile.lowering.pack`
    from a canonical format, turned back by `qcompile.lowering.unpack`.
    """

    layout: str
    tensors: dict[str, Tensor]
    consts: tuple
    in_features: int
    out_features: int
    meta: dict  # the canonical format's description (format, bits, group_size, ...)

    @property
    def op(self):
        return LAYOUT_OPS[self.layout]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def __call__(self, x: Tensor) -> Tensor:
        return self.op(x, *self.tensors.values(), *self.consts)
