"""`qcompile::gqa_attention`: attention that reads each shared K/V head directly (GQA/MQA/MHA, ALiBi).

    out = gqa_attention(q, k, v, attn_mask=None, alibi_slopes=None, alibi_positions=None,
                        scale=None, is_causal=False)

    q [B, Hq, L, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], Hq a multiple of Hkv: query head h reads
    K/V head h // (Hq / Hkv) (the order of Hugging Face's `repeat_kv` and of SDPA's enable_gqa).
    attn_mask   broadcastable to [B, Hq, L, S]: bool (True = attend) or float (added to the scores).
    alibi_slopes [Hq] float: adds slope[h] * pos[b, j] to the scores, pos = alibi_positions [B|1, S]
                or, without it, the key index j (ALiBi, BLOOM/MPT/Falcon; `alibi_slopes(n)` gives them).
    scale       default 1/sqrt(D).  is_causal: query i sees keys j <= i (SDPA's convention).
    -> [B, Hq, L, Dv] in q.dtype; a query row that sees no key gets zeros (as torch's SDPA).

No K/V tensor with Hq heads is ever made. Like `qcompile.ops`, the op is two: the public composite
(what passes put in graphs; adds an input gradient when one is needed) and `gqa_attention_kernel`,
which compiled graphs call directly. Its CPU path is here (`gqa_attention_sdpa`); the CUDA path is a
Triton kernel (`qcompile.lowering.triton_attention`); `gqa_attention_reference` is the float64 oracle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _compat
from .kernels import load_kernels

_lib = torch.library.Library("qcompile", "FRAGMENT")
_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask=None, Tensor? alibi_slopes=None, "
           "Tensor? alibi_positions=None, float? scale=None, bool is_causal=False) -> Tensor")
_lib.define("gqa_attention" + _SCHEMA)
_lib.define("gqa_attention_kernel" + _SCHEMA)
# The CPU path's kernel for a few query rows per K/V head (decode): q [B, Hkv, R, D] (the G query heads
# x L tokens of each K/V head), mask broadcastable to [B, Hkv, R, S] (float added / bool attend), float32.
_lib.define("decode_attention_kernel(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
DECODE_MAX_ROWS = 64  # query rows per K/V head up to which the CPU path calls decode_attention_kernel


# --- ALiBi slopes ---------------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi slopes (Press et al. 2022), as BLOOM's `build_alibi_tensor` makes them (float32 [num_heads]).

    For n a power of two: 2^(-8i/n), i = 1..n. Otherwise the n' = largest power of two below n get
    those, and the remaining heads take every other slope of 2n' (2^(-4i/n'), i = 1, 3, 5, ...).
    """
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    extra = [2.0 ** (-8.0 * i / (2 * closest)) for i in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes + extra, dtype=torch.float32)


# --- input checks -----------------------------------------------------------------------------------
def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                           alibi_slopes: Tensor | None = None, alibi_positions: Tensor | None = None) -> None:
    """Raise a specific error for inputs `gqa_attention` cannot take."""
    name = "qcompile::gqa_attention"
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ValueError(f"{name}: {what} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: {what} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"{name}: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same heads and length")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"{name}: {hq} query heads are not a multiple of {k.shape[1]} key/value heads")
    if k.shape[3] != d:
        raise ValueError(f"{name}: q head_dim {d} != k head_dim {k.shape[3]}")
    s = k.shape[2]
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{name}: attn_mask must be bool (True = attend) or float (added), got {attn_mask.dtype}")
        full = (b, hq, q.shape[2], s)
        if attn_mask.dim() > 4 or any(m != 1 and m != f for m, f in zip(reversed(attn_mask.shape), reversed(full))):
            raise ValueError(f"{name}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[batch, q_heads, q_len, kv_len] = {list(full)}")
    if alibi_slopes is not None:
        if tuple(alibi_slopes.shape) != (hq,) or not alibi_slopes.is_floating_point():
            raise ValueError(f"{name}: alibi_slopes must be a float tensor of shape [{hq}] (one per query head), "
                             f"got {alibi_slopes.dtype} {tuple(alibi_slopes.shape)}")
    if alibi_positions is not None:
        if alibi_slopes is None:
            raise ValueError(f"{name}: alibi_positions given without alibi_slopes")
        if alibi_positions.dim() != 2 or alibi_positions.shape[0] not in (1, b) or alibi_positions.shape[1] != s:
            raise ValueError(f"{name}: alibi_positions must be [{b} or 1, {s}], got {tuple(alibi_positions.shape)}")


# --- the additive bias: mask, ALiBi and causality in one float tensor ----------------------------
def attention_bias(q: Tensor, k: Tensor, attn_mask: Tensor | None, alibi_slopes: Tensor | None,
                   alibi_positions: Tensor | None, is_causal: bool, dtype: torch.dtype) -> Tensor | None:
    """What gets added to the scores, broadcastable to [B, Hq, L, S] (-inf where masked), or None.

    Only the dimensions the inputs use are materialised: a decode step with ALiBi and a padding mask
    makes [B, Hq, 1, S], never anything with head_dim.
    """
    L, S = q.shape[2], k.shape[2]
    bias = None
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        else:
            bias = mask.to(dtype)
    if alibi_slopes is not None:
        pos = (torch.arange(S, device=q.device, dtype=torch.float32)[None] if alibi_positions is None
               else alibi_positions.to(torch.float32))
        alibi = (alibi_slopes.to(torch.float32)[None, :, None, None] * pos[:, None, None, :]).to(dtype)
        bias = alibi if bias is None else bias + alibi
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril_()
        causal = torch.zeros(L, S, dtype=dtype, device=q.device).masked_fill_(~causal, float("-inf"))
        bias = causal[None, None] if bias is None else bias + causal
    return bias


# --- float64 oracle ----------------------------------------------------------------------------------
def gqa_attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                            alibi_slopes: Tensor | None = None, alibi_positions: Tensor | None = None,
                            scale: float | None = None, is_causal: bool = False,
                            dtype: torch.dtype = torch.float64) -> Tensor:
    """Attention written out in `dtype` (float64 for tests): softmax(q k^T * scale + bias) v, per group."""
    check_attention_inputs(q, k, v, attn_mask, alibi_slopes, alibi_positions)
    b, hq, L, d = q.shape
    hkv, S, dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.to(dtype).reshape(b, hkv, hq // hkv, L, d)
    scores = torch.einsum("bkgld,bksd->bkgls", qg, k.to(dtype)).reshape(b, hq, L, S) * scale
    bias = attention_bias(q, k, attn_mask, alibi_slopes, alibi_positions, is_causal, dtype)
    if bias is not None:
        scores = scores + bias
    row_max = scores.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(scores - row_max)
    denom = p.sum(-1, keepdim=True)
    p = torch.where(denom > 0, p / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(p))
    out = torch.einsum("bkgls,bksd->bkgld", p.reshape(b, hkv, hq // hkv, L, S), v.to(dtype))
    return out.reshape(b, hq, L, dv)


# --- CPU path (and any device without a kernel) -------------------------------------------------------
def _grouped_rows(bias: Tensor, hkv: int, g: int) -> Tensor:
    """A bias broadcastable to [B, Hq, L, S] as [B|1, Hkv|1, G*L, S] (rows of one K/V head's group)."""
    b, h, L, S = bias.shape
    if h == 1:
        return bias[:, :, None].expand(b, 1, g, L, S).reshape(b, 1, g * L, S)
    return bias.reshape(b, hkv, g * L, S)


def gqa_attention_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                       alibi_slopes: Tensor | None = None, alibi_positions: Tensor | None = None,
                       scale: float | None = None, is_causal: bool = False) -> Tensor:
    """The op through torch's SDPA without repeating K/V.

    Not causal (decode, encoders, padded prefill): the G query heads of a K/V head become G*L rows of
    one head, q [B, Hkv, G*L, D], so SDPA sees plain multi-head attention over the Hkv stored heads and
    reads each K/V head once (on 1 CPU thread, decode: 1.1x faster than SDPA's enable_gqa at SmolLM2
    shapes, 1.8x at Llama-3-8B shapes with an 8k cache). On CPU in float32 with at most
    DECODE_MAX_ROWS rows, those rows go to `decode_attention_kernel` instead (C++, lowering/
    cpu_kernels.cpp): SDPA's CPU kernel costs 30-60 us a call at decode sizes whatever the work.
    Causal with L > 1 on CPU: SDPA's own GQA (enable_gqa=True; its CPU flash kernel indexes the shared
    head, checked: no repeat_interleave, and skips the masked blocks that the grouped rows would need an
    explicit mask for).
    """
    b, hq, L, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    native = g == 1 or (is_causal and L > 1 and q.device.type == "cpu" and v.shape[3] == d
                        and _compat.sdpa_has_enable_gqa())
    if native:
        mask = attn_mask
        if alibi_slopes is not None or (is_causal and attn_mask is not None):
            mask = attention_bias(q, k, attn_mask, alibi_slopes, alibi_positions, is_causal, q.dtype)
            is_causal = False
        extra = {"enable_gqa": True} if g > 1 else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=is_causal, **extra)
        return out.contiguous()  # the op's output is contiguous (its fake says so); SDPA's may be [B, L, H, D]
    rows = q.reshape(b, hkv, g * L, d)
    if alibi_slopes is None and not is_causal and attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    else:
        mask = attention_bias(q, k, attn_mask, alibi_slopes, alibi_positions, is_causal, q.dtype)
    if mask is not None:
        mask = _grouped_rows(mask.expand(mask.shape[0], mask.shape[1], L, mask.shape[3]), hkv, g)
    if (q.device.type == "cpu" and g * L <= DECODE_MAX_ROWS and q.dtype == k.dtype == torch.float32
            and (mask is None or mask.dtype in (torch.float32, torch.bool)) and load_kernels(q.device)):
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        out = torch.ops.qcompile.decode_attention_kernel(rows, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, L, v.shape[3]).contiguous()


def decode_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """`decode_attention_kernel` without the compiled kernel (q's rows read their own K/V head)."""
    if mask is not None and mask.dtype == torch.bool:  # SDPA gives NaN where a bool mask hides every key
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.nan_to_num(out, nan=0.0).contiguous()  # a row that sees no key: zeros


@torch.library.register_fake("qcompile::decode_attention_kernel")
def _(q, k, v, mask, scale):
    return q.new_empty(*q.shape[:3], v.shape[3])


@torch.library.register_fake("qcompile::gqa_attention_kernel")
def _(q, k, v, attn_mask=None, alibi_slopes=None, alibi_positions=None, scale=None, is_causal=False):
    check_attention_inputs(q, k, v, attn_mask, alibi_slopes, alibi_positions)
    return q.new_empty(*q.shape[:3], v.shape[3])


# --- the public op: autograd around the kernel op -----------------------------------------------------
class _GQAAttention(torch.autograd.Function):
    """Kernel forward; backward recomputes the grouped attention in float math (q, k, v gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, alibi_slopes, alibi_positions, scale, is_causal):
        ctx.save_for_backward(q, k, v, attn_mask, alibi_slopes, alibi_positions)
        ctx.scale, ctx.is_causal = scale, is_causal
        return torch.ops.qcompile.gqa_attention_kernel(q, k, v, attn_mask, alibi_slopes, alibi_positions,
                                                       scale, is_causal)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, attn_mask, slopes, positions = ctx.saved_tensors
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in (q, k, v)]
            out = gqa_attention_reference(*qkv, attn_mask, slopes, positions, ctx.scale, ctx.is_causal, q.dtype)
            grads = torch.autograd.grad(out, qkv, grad, allow_unused=True)
        return (*grads, None, None, None, None, None)


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                  alibi_slopes: Tensor | None = None, alibi_positions: Tensor | None = None,
                  scale: float | None = None, is_causal: bool = False) -> Tensor:
    """Attention of Hq query heads over Hkv shared K/V heads (module docstring)."""
    check_attention_inputs(q, k, v, attn_mask, alibi_slopes, alibi_positions)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _GQAAttention.apply(q, k, v, attn_mask, alibi_slopes, alibi_positions, scale, is_causal)
    return torch.ops.qcompile.gqa_attention_kernel(q, k, v, attn_mask, alibi_slopes, alibi_positions, scale,
                                                   is_causal)


_lib.impl("gqa_attention_kernel", gqa_attention_sdpa, "CompositeExplicitAutograd")
_lib.impl("decode_attention_kernel", decode_attention_reference, "CompositeExplicitAutograd")
_lib.impl("gqa_attention", gqa_attention, "CompositeImplicitAutograd")

GQA_ATTENTION = torch.ops.qcompile.gqa_attention.default
