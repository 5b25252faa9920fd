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


# --- ops served by torch's own CPU kernels ------------------------------------------------------
# Custom ops (so Dynamo's graph, the passes and the report see them), each with a backward for
# its input; `qcompile.lowering.cpu_int4` gives Inductor a decomposition into the aten kernel, so
# the bf16 casts fuse into the neighbouring kernels with no Python call in between.
def _int4_cpu_forward(x: Tensor, packed: Tensor, scale_zero: Tensor, group_size: int) -> Tensor:
    k = scale_zero.shape[0] * group_size
    x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scale_zero)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("qcompile::int4_mm_cpu", mutates_args=())
def int4_mm_cpu(x: Tensor, packed: Tensor, scale_zero: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ W.T with W in torch's CPU int4 layout, computed in bf16 (the fast kernel's dtype)."""
    _check_input("int4_mm_cpu", x, scale_zero.shape[0] * group_size)
    return _int4_cpu_forward(x, packed, scale_zero, group_size)


@int4_mm_cpu.register_fake
def _(x, packed, scale_zero, group_size):
    _check_input("int4_mm_cpu", x, scale_zero.shape[0] * group_size)
    return x.new_empty(*x.shape[:-1], scale_zero.shape[1])


def _int4_cpu_backward(ctx, grad):
    # dx = dy @ W. The kernel only multiplies by W.T, so read W.T out of it with an identity.
    packed, scale_zero = ctx.saved_tensors
    k = scale_zero.shape[0] * ctx.group_size
    eye = torch.eye(k, dtype=torch.bfloat16, device=grad.device)
    w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, ctx.group_size, scale_zero)
    return (grad.to(torch.bfloat16) @ w_t.t()).to(grad.dtype), None, None, None


def _int4_cpu_setup(ctx, inputs, output):
    _, packed, scale_zero, group_size = inputs
    ctx.save_for_backward(packed, scale_zero)
    ctx.group_size = group_size


int4_mm_cpu.register_autograd(_int4_cpu_backward, setup_context=_int4_cpu_setup)


def _int8_forward(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    if x.device.type == "cpu":
        x2 = x.reshape(-1, qweight.shape[1]).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.to(torch.bfloat16))
        return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])
    return x @ (qweight.to(x.dtype) * scales.to(x.dtype)[:, None]).t()


@torch.library.custom_op("qcompile::int8_mm", mutates_args=())
def int8_mm(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [..., K] @ (qweight * scales[:, None]).T; torch's int8 kernel in bf16 on CPU."""
    _check_input("int8_mm", x, qweight.shape[1])
    return _int8_forward(x, qweight, scales)


@int8_mm.register_fake
def _(x, qweight, scales):
    _check_input("int8_mm", x, qweight.shape[1])
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _int8_backward(ctx, grad):
    qweight, scales = ctx.saved_tensors
    return grad @ (qweight.to(grad.dtype) * scales.to(grad.dtype)[:, None]), None, None


def _int8_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


int8_mm.register_autograd(_int8_backward, setup_context=_int8_setup)


def _int4_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    return grad @ dequantize_int4(qweight, scales, zeros, ctx.group_size, grad.dtype), None, None, None, None


def _int4_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:4])
    ctx.group_size = inputs[4]


int4_mm.register_autograd(_int4_backward, setup_context=_int4_setup)

_lib = torch.library.Library("qcompile", "FRAGMENT")
_lib.define("int8_embedding(Tensor ids, Tensor qweight, Tensor scales, ScalarType dtype) -> Tensor")


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
