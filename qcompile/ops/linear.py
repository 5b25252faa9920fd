"""The custom ops quantized graphs call: schema, fake (shape) function, reference implementation.

Each op computes ``x @ W.T`` for a quantized W held in one layout. The reference implementations
here dequantize and matmul in float (slow, exact, any device); `qcompile.lowering` registers the
fast CPU kernels, the Triton kernels and the Inductor lowerings for the same ops.

| op                       | layout of W (the canonical formats of `qcompile.formats`) |
|--------------------------|-----------------------------------------------------------|
| qcompile::int4_mm        | int4: uint8 [N, K/2] codes + [N, K/g] scales and zeros    |
| qcompile::int8_mm        | int8 [N, K] + scales [N] (per channel) or [N, G] (groups of K/G), optional zeros like scales |
(each with a `_kernel` op underneath that the device kernels implement)
| qcompile::int8_embedding | row gather of an int8 table (tied lm_head/embedding)      |

`int4_mm_a8` and `int8_mm_a8` (kernels `int4_mm_a8_kernel`, `int8_mm_a8_kernel`) read the int4 and
the per-channel int8 layouts too, but quantize decode-size activations to int8 (W4A8 / W8A8, see
`int4_mm_a8_reference`); `PackedLinear` picks them on CPU when the config asks (`cpu_activations`).

The kernels read these layouts as they are saved, on every device, so a file moves between CPU
and GPU without repacking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import CPU_ACTIVATIONS
from ..formats.int4 import unpack_nibbles
from .kernels import KERNEL_LOADERS, load_kernels as _load_kernels  # noqa: F401  (KERNEL_LOADERS: public here)
from .quik import QUIK_MM


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


# Each matmul is two ops. The public one (what graphs, passes and reports show) is a composite
# that calls the kernel op, through an autograd.Function only when the input needs a gradient.
# After AOTAutograd, compiled inference graphs call the kernel op directly, and its device kernels
# (`qcompile.lowering`) run with no Python: the dispatcher overhead of @custom_op or of a Python
# autograd formula (10-40 us a call) is as large as a decode-size matmul on a small model.
_lib = torch.library.Library("qcompile", "FRAGMENT")
_lib.define("int4_mm(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor")
_lib.define("int4_mm_kernel(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor")
# int8: the grouping follows from the shape of `scales` ([N]: per channel, [N, G]: G groups of K/G);
# zeros=None is the symmetric grid (the default lm_head, the kernels' fastest path).
_lib.define("int8_mm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros=None) -> Tensor")
_lib.define("int8_mm_kernel(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros=None) -> Tensor")
_lib.define("lut_mm(Tensor x, Tensor codes, Tensor tables) -> Tensor")
_lib.define("lut_mm_kernel(Tensor x, Tensor codes, Tensor tables) -> Tensor")
# W4A8 / W8A8 decode: x quantized to int8 per (row, group of features), integer dot products (see
# int4_mm_a8_reference). Only for decode-size x (at most A8_MAX_ROWS rows in all); more rows run the
# W4A16 / W8A16 ops (int4_mm_kernel, int8_mm_kernel), unquantized. int4_mm_a8: activation groups are the
# weight's groups (group_size = K: one scale per token); int8_mm_a8: per-channel symmetric int8 weights
# (scales [N], the default lm_head), act_group_size = K for one scale per token (QUIK) or a divisor of K.
_lib.define("int4_mm_a8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor")
_lib.define("int4_mm_a8_kernel(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor")
_lib.define("int8_mm_a8(Tensor x, Tensor qweight, Tensor scales, int act_group_size) -> Tensor")
_lib.define("int8_mm_a8_kernel(Tensor x, Tensor qweight, Tensor scales, int act_group_size) -> Tensor")
_lib.define("int8_embedding(Tensor ids, Tensor qweight, Tensor scales, ScalarType dtype, Tensor? zeros=None) -> Tensor")


# --- int4 ---------------------------------------------------------------------------------------
def int4_mm_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ dequant(W).T: dequantize to x's dtype, then matmul (any device)."""
    _check_input("int4_mm", x, 2 * qweight.shape[1])
    return x @ dequantize_int4(qweight, scales, zeros, group_size, x.dtype).t()


def int4_mm_g_idx_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """x @ W.T for an int4 weight kept in its layer's input order with a group per input channel
    (GPTQ's g_idx layout): W[n, k] = s[n, g_idx[k]] * (q[n, k] - z[n, g_idx[k]]).

    The alternative to qcompile's act_order design (gather x by perm, then the contiguous-group
    kernel), kept as a reference for tests and benchmarks/bench_act_order.py.
    """
    _check_input("int4_mm", x, 2 * qweight.shape[1])
    g = g_idx.long()
    w = scales.to(x.dtype)[:, g] * (unpack_nibbles(qweight).to(x.dtype) - zeros.to(x.dtype)[:, g])
    return x @ w.t()


@torch.library.register_fake("qcompile::int4_mm_kernel")
def _(x, qweight, scales, zeros, group_size):
    _check_input("int4_mm", x, 2 * qweight.shape[1])
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


class _Int4MM(torch.autograd.Function):
    """The kernel forward with an input gradient (the weight is frozen): dx = dy @ dequant(W).
    With int8 activations (`kernel` = int4_mm_a8_kernel) the rounding of x passes the gradient
    straight through."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, group_size, kernel):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.group_size = group_size
        return kernel(x, qweight, scales, zeros, group_size)

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros = ctx.saved_tensors
        return grad @ dequantize_int4(qweight, scales, zeros, ctx.group_size, grad.dtype), None, None, None, None, None


def int4_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ dequant(W).T for W in the canonical int4 layout."""
    _check_input("int4_mm", x, 2 * qweight.shape[1])
    _load_kernels(x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Int4MM.apply(x, qweight, scales, zeros, group_size, torch.ops.qcompile.int4_mm_kernel)
    return torch.ops.qcompile.int4_mm_kernel(x, qweight, scales, zeros, group_size)


# --- int8 ---------------------------------------------------------------------------------------
def _check_int8(qweight: Tensor, scales: Tensor, zeros: Tensor | None) -> None:
    n, k = qweight.shape
    if scales.dim() not in (1, 2) or scales.shape[0] != n or (scales.dim() == 2 and k % scales.shape[1]):
        raise ValueError(f"qcompile::int8_mm: scales {tuple(scales.shape)} do not fit a {n}x{k} weight: "
                         f"expected [{n}] (per channel) or [{n}, G] with G dividing {k}")
    if zeros is not None and zeros.shape != scales.shape:
        raise ValueError(f"qcompile::int8_mm: zeros {tuple(zeros.shape)} must have the shape of scales {tuple(scales.shape)}")


def dequantize_int8(qweight: Tensor, scales: Tensor, zeros: Tensor | None, dtype: torch.dtype) -> Tensor:
    """scales * (qweight - zeros), per channel ([N]) or per group ([N, G]) of any rows of a table."""
    q = qweight.to(dtype)
    if scales.dim() == qweight.dim() - 1:  # per channel
        s, z = scales.to(dtype)[..., None], None if zeros is None else zeros.to(dtype)[..., None]
    else:
        group = qweight.shape[-1] // scales.shape[-1]
        s = scales.to(dtype).repeat_interleave(group, dim=-1)
        z = None if zeros is None else zeros.to(dtype).repeat_interleave(group, dim=-1)
    return s * (q if z is None else q - z)


def int8_mm_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    """x [..., K] @ dequant(W).T: dequantize to x's dtype, then matmul (any device)."""
    _check_input("int8_mm", x, qweight.shape[1])
    _check_int8(qweight, scales, zeros)
    return x @ dequantize_int8(qweight, scales, zeros, x.dtype).t()


@torch.library.register_fake("qcompile::int8_mm_kernel")
def _(x, qweight, scales, zeros=None):
    _check_input("int8_mm", x, qweight.shape[1])
    _check_int8(qweight, scales, zeros)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


class _Int8MM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scales, zeros):
        ctx.save_for_backward(qweight, scales, zeros)
        return torch.ops.qcompile.int8_mm_kernel(x, qweight, scales, zeros)

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros = ctx.saved_tensors
        return grad @ dequantize_int8(qweight, scales, zeros, grad.dtype), None, None, None


def int8_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    """x [..., K] @ dequant(W).T for W in the canonical int8 layout."""
    _check_input("int8_mm", x, qweight.shape[1])
    _check_int8(qweight, scales, zeros)
    _load_kernels(x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Int8MM.apply(x, qweight, scales, zeros)
    return torch.ops.qcompile.int8_mm_kernel(x, qweight, scales, zeros)


# --- lut (per-row lookup tables, GANQ) ------------------------------------------------------------
def dequantize_lut(codes: Tensor, tables: Tensor, dtype: torch.dtype) -> Tensor:
    return tables.to(dtype).gather(1, unpack_nibbles(codes).long())


def lut_mm_reference(x: Tensor, codes: Tensor, tables: Tensor) -> Tensor:
    """x [..., K] @ W.T with W[n, k] = tables[n, codes[n, k]]: dequantize, then matmul (any device)."""
    _check_input("lut_mm", x, 2 * codes.shape[1])
    return x @ dequantize_lut(codes, tables, x.dtype).t()


@torch.library.register_fake("qcompile::lut_mm_kernel")
def _(x, codes, tables):
    _check_input("lut_mm", x, 2 * codes.shape[1])
    return x.new_empty(*x.shape[:-1], codes.shape[0])


class _LutMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codes, tables):
        ctx.save_for_backward(codes, tables)
        return torch.ops.qcompile.lut_mm_kernel(x, codes, tables)

    @staticmethod
    def backward(ctx, grad):
        codes, tables = ctx.saved_tensors
        return grad @ dequantize_lut(codes, tables, grad.dtype), None, None


def lut_mm(x: Tensor, codes: Tensor, tables: Tensor) -> Tensor:
    """x [..., K] @ W.T for W in the per-row lookup-table layout (`qcompile.formats.lut`)."""
    _check_input("lut_mm", x, 2 * codes.shape[1])
    if tables.shape[0] != codes.shape[0]:
        raise ValueError(f"qcompile::lut_mm: {tables.shape[0]} tables for {codes.shape[0]} rows of codes")
    _load_kernels(x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _LutMM.apply(x, codes, tables)
    return torch.ops.qcompile.lut_mm_kernel(x, codes, tables)


# --- int8 activations (W4A8 / W8A8 decode) -------------------------------------------------------
A8_MAX_ROWS = 8  # the CPU kernels' GEMV_MAX_ROWS


def quantize_activations(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """x [M, K] -> int8 codes a [M, K/g, g] and scales sx [M, K/g] (both float64, exact), symmetric per
    group of g features: sx = absmax / 127, a = round-half-even(x / sx), both computed in float32
    (llama.cpp's Q8_0 without its fp16 scale); an all-zero group has sx = 0 and a = 0."""
    xg = x.float().reshape(x.shape[0], -1, group_size)
    sx = xg.abs().amax(-1, keepdim=True) / 127
    a = torch.where(sx > 0, torch.round(xg / sx), 0.0).clamp(-127, 127)
    return a.double(), sx.squeeze(-1).double()


def _check_a8(name: str, x: Tensor, qweight: Tensor, qdtype: torch.dtype, in_features: int, group: int) -> None:
    if not x.is_floating_point():
        raise TypeError(f"qcompile::{name}: input must be a floating-point tensor, got {x.dtype}")
    if qweight.dtype != qdtype or qweight.dim() != 2:
        raise TypeError(f"qcompile::{name}: qweight must be a 2-D {qdtype} tensor, "
                        f"got {qweight.dtype} {tuple(qweight.shape)}")
    _check_input(name, x, in_features)
    if group <= 0 or in_features % group or (qdtype == torch.uint8 and group % 2):
        raise ValueError(f"qcompile::{name}: group size {group} does not divide {in_features} input features"
                         + (" into groups of even size" if qdtype == torch.uint8 else ""))


def _check_int4_a8(x, qweight, scales, zeros, group_size) -> None:
    _check_a8("int4_mm_a8", x, qweight, torch.uint8, 2 * qweight.shape[-1], group_size)
    shape = (qweight.shape[0], 2 * qweight.shape[1] // group_size)
    if not (scales.is_floating_point() and zeros.is_floating_point()):
        raise TypeError("qcompile::int4_mm_a8: scales and zeros must be floating-point")
    if scales.shape != shape or zeros.shape != shape:
        raise ValueError(f"qcompile::int4_mm_a8: scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} "
                         f"must be {list(shape)}")


def _check_int8_a8(x, qweight, scales, act_group_size) -> None:
    _check_a8("int8_mm_a8", x, qweight, torch.int8, qweight.shape[-1], act_group_size)
    if not scales.is_floating_point():
        raise TypeError("qcompile::int8_mm_a8: scales must be floating-point")
    if scales.shape != qweight.shape[:1]:
        raise ValueError(f"qcompile::int8_mm_a8: scales must be [{qweight.shape[0]}] (per channel), "
                         f"got {tuple(scales.shape)}")


def int4_mm_a8_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ W.T for an int4 weight, x quantized to int8 per (row, weight group) (any device):
        y[m,n] = sum_g s[n,g] sx[m,g] (sum_{k in g} q[n,k] a[m,k] - z[n,g] sum_{k in g} a[m,k])
    in float64 (the integer sums are exact). More than A8_MAX_ROWS rows: `int4_mm_reference`."""
    _check_int4_a8(x, qweight, scales, zeros, group_size)
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] > A8_MAX_ROWS:
        return int4_mm_reference(x, qweight, scales, zeros, group_size)
    a, sx = quantize_activations(x2, group_size)
    q = unpack_nibbles(qweight).double().reshape(n, -1, group_size)
    dot = torch.einsum("mgk,ngk->mng", a, q) - zeros.double() * a.sum(-1)[:, None, :]
    y = (scales.double() * sx[:, None, :] * dot).sum(-1)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def int8_mm_a8_reference(x: Tensor, qweight: Tensor, scales: Tensor, act_group_size: int) -> Tensor:
    """x [..., K] @ W.T for a per-channel symmetric int8 weight (scales [N]), x quantized to int8 per
    (row, group of act_group_size features) (any device):
        y[m,n] = s[n] sum_g sx[m,g] sum_{k in g} q[n,k] a[m,k]
    in float64. More than A8_MAX_ROWS rows: `int8_mm_reference`."""
    _check_int8_a8(x, qweight, scales, act_group_size)
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] > A8_MAX_ROWS:
        return int8_mm_reference(x, qweight, scales)
    a, sx = quantize_activations(x2, act_group_size)
    dot = torch.einsum("mgk,ngk->mng", a, qweight.double().reshape(n, -1, act_group_size))
    y = scales.double() * (sx[:, None, :] * dot).sum(-1)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.register_fake("qcompile::int4_mm_a8_kernel")
def _(x, qweight, scales, zeros, group_size):
    _check_int4_a8(x, qweight, scales, zeros, group_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.register_fake("qcompile::int8_mm_a8_kernel")
def _(x, qweight, scales, act_group_size):
    _check_int8_a8(x, qweight, scales, act_group_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


class _Int8MMA8(torch.autograd.Function):
    """int8_mm_a8_kernel with an input gradient: dx = dy @ dequant(W) (x's rounding passed straight through)."""

    @staticmethod
    def forward(ctx, x, qweight, scales, act_group_size):
        ctx.save_for_backward(qweight, scales)
        return torch.ops.qcompile.int8_mm_a8_kernel(x, qweight, scales, act_group_size)

    @staticmethod
    def backward(ctx, grad):
        qweight, scales = ctx.saved_tensors
        return grad @ dequantize_int8(qweight, scales, None, grad.dtype), None, None, None


def int4_mm_a8(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ dequant(W).T for W in the canonical int4 layout, x quantized to int8 per (row,
    weight group) when it has at most A8_MAX_ROWS rows (`int4_mm_a8_reference`); more rows: `int4_mm`."""
    _check_input("int4_mm_a8", x, 2 * qweight.shape[1])  # the kernels check the rest
    _load_kernels(x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Int4MM.apply(x, qweight, scales, zeros, group_size, torch.ops.qcompile.int4_mm_a8_kernel)
    return torch.ops.qcompile.int4_mm_a8_kernel(x, qweight, scales, zeros, group_size)


def int8_mm_a8(x: Tensor, qweight: Tensor, scales: Tensor, act_group_size: int) -> Tensor:
    """x [..., K] @ dequant(W).T for a per-channel symmetric int8 W, x quantized to int8 per (row,
    group of act_group_size features) when it has at most A8_MAX_ROWS rows (`int8_mm_a8_reference`)."""
    _check_input("int8_mm_a8", x, qweight.shape[1])
    _load_kernels(x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Int8MMA8.apply(x, qweight, scales, act_group_size)
    return torch.ops.qcompile.int8_mm_a8_kernel(x, qweight, scales, act_group_size)


def int8_embedding(ids: Tensor, qweight: Tensor, scales: Tensor, dtype: torch.dtype,
                   zeros: Tensor | None = None) -> Tensor:
    """Rows `ids` of an int8 table, dequantized to `dtype` (an embedding tied to an int8 lm_head).
    Columns come in the table's stored order (the caller undoes an act_order perm)."""
    return dequantize_int8(qweight[ids], scales[ids], None if zeros is None else zeros[ids], dtype)


# References serve every device that `qcompile.lowering` gives no kernel.
_lib.impl("int4_mm_kernel", int4_mm_reference, "CompositeExplicitAutograd")
_lib.impl("int8_mm_kernel", int8_mm_reference, "CompositeExplicitAutograd")
_lib.impl("int4_mm", int4_mm, "CompositeImplicitAutograd")
_lib.impl("int8_mm", int8_mm, "CompositeImplicitAutograd")
_lib.impl("lut_mm_kernel", lut_mm_reference, "CompositeExplicitAutograd")
_lib.impl("lut_mm", lut_mm, "CompositeImplicitAutograd")
_lib.impl("int8_embedding", int8_embedding, "CompositeImplicitAutograd")
_lib.impl("int4_mm_a8_kernel", int4_mm_a8_reference, "CompositeExplicitAutograd")
_lib.impl("int8_mm_a8_kernel", int8_mm_a8_reference, "CompositeExplicitAutograd")
_lib.impl("int4_mm_a8", int4_mm_a8, "CompositeImplicitAutograd")
_lib.impl("int8_mm_a8", int8_mm_a8, "CompositeImplicitAutograd")


# --- weights packed for a kernel --------------------------------------------------------------
LAYOUT_OPS = {
    "int4": torch.ops.qcompile.int4_mm.default,
    "int8": torch.ops.qcompile.int8_mm.default,
    "lut": torch.ops.qcompile.lut_mm.default,
}
# The same layouts with int8 activations (W4A8 / W8A8 decode; CPU kernels only, see PackedLinear).
A8_OPS = {
    "int4": torch.ops.qcompile.int4_mm_a8.default,
    "int8": torch.ops.qcompile.int8_mm_a8.default,
}
# Ops whose every weight tensor is a block of output rows: siblings stored end to end run as one op
# (`qcompile.passes.fuse_quantized`). QUIK's index tensors are per input, not per row.
ROW_BLOCK_OPS = frozenset([*LAYOUT_OPS.values(), *A8_OPS.values()])
LAYOUT_OPS["quik"] = QUIK_MM
QUANTIZED_LINEAR_OPS = frozenset([*LAYOUT_OPS.values(), *A8_OPS.values()])
# int8_mm_a8's activation group (int8 weights have no groups of their own). SmolLM2's lm_head, tune
# split: per token (576) +1.46% perplexity, 64: +0.19%; 32 is slower than float activations in the
# kernel (per-group overhead). benchmarks/results/w4a8_cpu.md
INT8_ACT_GROUP = 64


def layout_op(layout: str, activations: str):
    """The op that multiplies by a weight in `layout` with `activations` (`PackedLinear.activations`)."""
    return A8_OPS[layout] if activations == "int8" and layout in A8_OPS else LAYOUT_OPS[layout]


def activation_group(layout: str, consts: tuple, in_features: int) -> int:
    """The group of features that share an int8 activation scale: the int4 weight's own group, or
    INT8_ACT_GROUP for an int8 weight (the whole row if INT8_ACT_GROUP does not divide it)."""
    if layout == "int4":
        return consts[0]
    return INT8_ACT_GROUP if in_features % INT8_ACT_GROUP == 0 else in_features


def rows_end_to_end(tensors: list[Tensor]) -> bool:
    """True if `tensors` are contiguous and lie one after the other in one storage (row blocks of
    one tensor): then `rows_view` spans them without a copy."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset or t.shape[1:] != first.shape[1:] or t.dtype != first.dtype):
            return False
        offset += t.numel()
    return True


def rows_view(tensors: list[Tensor]) -> Tensor:
    """The rows of `tensors` (`rows_end_to_end`) as one tensor, a view of their storage."""
    first = tensors[0]
    return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride(),
                            first.storage_offset())


@dataclass
class PackedLinear:
    """A quantized weight in the layout one kernel reads, and the op that runs it.

    ``op(x[..., perm], *tensors.values(), *op_consts)`` computes ``x @ W.T`` (``perm``: the input
    order of an act_order weight, or None). Made by `qcompile.lowering.pack` from a canonical
    format, turned back by `qcompile.lowering.unpack`.

    ``cpu_activations`` is what the config asks for decode on CPU ("int8" or "float");
    ``activations`` is what the op does: "int8" (the W4A8 / W8A8 CPU kernels, which quantize x to
    int8 for at most `A8_MAX_ROWS` rows and run the float kernel above) where the weight is on the
    CPU in a layout they read (int4; int8 per channel, symmetric), else "float".
    """

    layout: str
    tensors: dict[str, Tensor]
    consts: tuple
    in_features: int
    out_features: int
    meta: dict  # the canonical format's description (format, bits, group_size, ...)
    perm: Tensor | None = None
    cpu_activations: str = "float"

    def __post_init__(self):
        if self.cpu_activations not in CPU_ACTIVATIONS:
            raise ValueError(f"cpu_activations={self.cpu_activations!r}: use one of {CPU_ACTIVATIONS}")

    @property
    def activations(self) -> str:
        if self.layout == "quik":  # QUIK quantizes activations per token at every size, on every device
            return f"int{self.consts[0]}"
        if self.cpu_activations != "int8" or self.layout not in A8_OPS:
            return "float"
        t = self.tensors
        if t["qweight"].device.type != "cpu":
            return "float"
        if self.layout == "int8" and (t["scales"].dim() != 1 or t.get("zeros") is not None):
            return "float"  # grouped or asymmetric int8: no a8 kernel
        return "int8"

    @property
    def op(self):
        return layout_op(self.layout, self.activations)

    @property
    def op_consts(self) -> tuple:
        """The op's arguments after the tensors."""
        if self.activations == "int8" and self.layout == "int8":
            return (activation_group(self.layout, self.consts, self.in_features),)
        return self.consts

    @property
    def nbytes(self) -> int:
        perm = [] if self.perm is None else [self.perm]
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *perm])

    def __call__(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return self.op(x, *self.tensors.values(), *self.op_consts)
