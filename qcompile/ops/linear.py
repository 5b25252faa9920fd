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

`int4_mm_a8_kernel` and `int8_mm_a8_kernel` read the int4 and the per-channel int8 layouts too, but
quantize decode-size activations to int8 (W4A8 / W8A8, see `int4_mm_a8_reference`).

The kernels read these layouts as they are saved, on every device, so a file moves between CPU
and GPU without repacking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats.int4 import unpack_nibbles


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
_lib.define("int4_mm_a8_kernel(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor")
_lib.define("int8_mm_a8_kernel(Tensor x, Tensor qweight, Tensor scales, int act_group_size) -> Tensor")
_lib.define("int8_embedding(Tensor ids, Tensor qweight, Tensor scales, ScalarType dtype, Tensor? zeros=None) -> Tensor")

# device type -> loader of its compiled kernels (set by qcompile.lowering; called on first use)
KERNEL_LOADERS: dict = {}


def _load_kernels(device: torch.device) -> None:
    loader = KERNEL_LOADERS.get(device.type)
    if loader is not None:
        loader()


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
    """The kernel forward with an input gradient (the weight is frozen): dx = dy @ dequant(W)."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, group_size):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.group_size = group_size
        return torch.ops.qcompile.int4_mm_kernel(x, qweight, scales, zeros, group_size)

    @staticmethod
    def backward(ctx, grad):
        qweight, scales, zeros = ctx.saved_tensors
        return grad @ dequantize_int4(qweight, scales, zeros, ctx.group_size, grad.dtype), None, None, None, None


def int4_mm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x [..., K] @ dequant(W).T for W in the canonical int4 layout."""
    _check_input("int4_mm", x, 2 * qweight.shape[1])
    _load_kernels(x.device)
    if torch.is_grad_enabled() and x.requires_grad:
        return _Int4MM.apply(x, qweight, scales, zeros, group_size)
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


# --- weights packed for a kernel --------------------------------------------------------------
LAYOUT_OPS = {
    "int4": torch.ops.qcompile.int4_mm.default,
    "int8": torch.ops.qcompile.int8_mm.default,
    "lut": torch.ops.qcompile.lut_mm.default,
}
QUANTIZED_LINEAR_OPS = frozenset(LAYOUT_OPS.values())


@dataclass
class PackedLinear:
    """A quantized weight in the layout one kernel reads, and the op that runs it.

    ``op(x[..., perm], *tensors.values(), *consts)`` computes ``x @ W.T`` (``perm``: the input
    order of an act_order weight, or None). Made by `qcompile.lowering.pack` from a canonical
    format, turned back by `qcompile.lowering.unpack`.
    """

    layout: str
    tensors: dict[str, Tensor]
    consts: tuple
    in_features: int
    out_features: int
    meta: dict  # the canonical format's description (format, bits, group_size, ...)
    perm: Tensor | None = None

    @property
    def op(self):
        return LAYOUT_OPS[self.layout]

    @property
    def nbytes(self) -> int:
        perm = [] if self.perm is None else [self.perm]
        return sum(t.numel() * t.element_size() for t in [*self.tensors.values(), *perm])

    def __call__(self, x: Tensor) -> Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return self.op(x, *self.tensors.values(), *self.consts)
