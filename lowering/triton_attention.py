"""CUDA path of `qcompile::gqa_attention`: a flash-attention Triton kernel that reads shared K/V heads.

One program owns one K/V head of one batch row and a block of query positions, and takes all G query
heads of that K/V head at once: its tile rows are (query head g, position i) pairs,
    row r -> g = r // BLOCK_L, i = l0 + r % BLOCK_L          (BLOCK_M = G_PAD * BLOCK_L rows)
so each K/V tile is loaded once for G heads and no repeated K/V exists anywhere. Scores get the
scale, ALiBi (slope[h] * pos[b, j]), the mask (bool: where; float: added) and causality (j <= i),
then an online softmax in fp32 (rows that see no key end as zeros).

Decode (one query position against a long cache) has only B * Hkv programs per position, too few
for a GPU: the keys are split into NUM_SPLITS chunks run in parallel (flash-decoding), each writes
its partial (max, sum, unnormalised output) and `combine_splits_kernel` merges them.

Layout follows triton_int4.py: kernels, configs beside them, a thin launcher
(`gqa_attention_triton`), and the float64 reference for tests
(`qcompile.ops.attention.gqa_attention_reference`).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.ops.attention import check_attention_inputs, gqa_attention_sdpa

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# --- configs ----------------------------------------------------------------------------------------
class AttentionConfig(NamedTuple):
    block_m: int      # tile rows: (query head, position) pairs, >= 16 for tl.dot
    block_n: int      # keys per step
    num_warps: int
    num_stages: int


# Decode: 16 rows hold the G heads of one K/V head (G <= 16); short key steps, many splits.
DECODE_CONFIGS = (
    AttentionConfig(16, 64, 4, 2),
    AttentionConfig(16, 32, 2, 2),
    AttentionConfig(16, 128, 4, 2),
)
# Prefill: classic flash-attention tiles.
PREFILL_CONFIGS = (
    AttentionConfig(64, 64, 4, 2),
    AttentionConfig(128, 64, 8, 2),
    AttentionConfig(64, 32, 4, 2),
    AttentionConfig(32, 32, 4, 2),
)
ALL_CONFIGS = DECODE_CONFIGS + PREFILL_CONFIGS


def choose_config(q_len: int, group: int) -> AttentionConfig:
    """The heuristic tile for `q_len` query positions and `group` query heads per K/V head."""
    g_pad = triton.next_power_of_2(group)
    c = DECODE_CONFIGS[0] if q_len == 1 or q_len * g_pad <= 16 else PREFILL_CONFIGS[0]
    return c._replace(block_m=max(c.block_m, g_pad))


def choose_splits(batch_kv_heads: int, q_blocks: int, kv_len: int, block_n: int, device) -> int:
    """Key splits so that about two programs run per SM (1 when the grid is already large)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = batch_kv_heads * q_blocks
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(kv_len, 4 * block_n), 64))


# --- the kernels ------------------------------------------------------------------------------------
@triton.jit
def gqa_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, slopes_ptr, pos_ptr, out_ptr, part_ptr, stats_ptr,
    HKV, L, S, keys_per_split, scale,
    sqb, sqh, sql, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
    smb, smh, sml, sms, spb, sps,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, SPLIT: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)          # batch * HKV + kv head
    pid_l = tl.program_id(1)           # block of query positions
    pid_s = tl.program_id(2)           # key split
    b = pid_bh // HKV
    kvh = pid_bh % HKV

    r = tl.arange(0, BLOCK_M)
    g = r // BLOCK_L
    i = pid_l * BLOCK_L + r % BLOCK_L
    h = kvh * G + g
    row_ok = (g < G) & (i < L)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)

    q = tl.load(q_ptr + b * sqb + h[:, None] * sqh + i[:, None] * sql + d[None, :] * sqd,
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + h, mask=row_ok, other=0.0).to(tl.float32)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, S)
    if IS_CAUSAL:  # keys after the tile's last query position are masked for every row
        end = tl.minimum(end, tl.minimum(pid_l * BLOCK_L + BLOCK_L, L))

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        key_ok = j < end
        k = tl.load(k_ptr + b * skb + kvh * skh + j[:, None] * sks + d[None, :] * skd,
                    mask=key_ok[:, None] & (d[None, :] < D), other=0.0)
        if ALLOW_TF32:
            s = tl.dot(q, tl.trans(k), input_precision="tf32")
        else:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        s = s * scale
        if HAS_ALIBI:
            if HAS_POS:
                pos = tl.load(pos_ptr + b * spb + j * sps, mask=key_ok, other=0).to(tl.float32)
            else:
                pos = j.to(tl.float32)
            s += slope[:, None] * pos[None, :]
        visible = row_ok[:, None] & key_ok[None, :]
        if HAS_MASK:
            m_ptrs = mask_ptr + b * smb + h[:, None] * smh + i[:, None] * sml + j[None, :] * sms
            if MASK_IS_BOOL:
                visible &= tl.load(m_ptrs, mask=visible, other=0) != 0
            else:
                s += tl.load(m_ptrs, mask=visible, other=0.0).to(tl.float32)
        if IS_CAUSAL:
            visible &= j[None, :] <= i[:, None]
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + b * svb + kvh * svh + j[:, None] * svs + dv[None, :] * svd,
                    mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
        if ALLOW_TF32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="tf32")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    # out / partials are laid out [B, Hq, L, (split,) DV]
    row = (b * HKV * G + h) * L + i
    if SPLIT == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row[:, None] * DV + dv[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dv[None, :] < DV))
    else:
        part = row * SPLIT + pid_s
        tl.store(part_ptr + part[:, None] * DV + dv[None, :], acc, mask=row_ok[:, None] & (dv[None, :] < DV))
        tl.store(stats_ptr + part * 2, m_i, mask=row_ok)
        tl.store(stats_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def combine_splits_kernel(part_ptr, stats_ptr, out_ptr, DV: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_SPLIT: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out[row] = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s (one program per row)."""
    row = tl.program_id(0)
    sp = tl.arange(0, BLOCK_SPLIT)
    dv = tl.arange(0, BLOCK_DV)
    ok = sp < SPLIT
    m = tl.load(stats_ptr + (row * SPLIT + sp) * 2, mask=ok, other=float("-inf"))
    l = tl.load(stats_ptr + (row * SPLIT + sp) * 2 + 1, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(ok, tl.exp(m - m_max), 0.0)
    acc = tl.load(part_ptr + (row * SPLIT + sp)[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV),
                  other=0.0)
    total = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * DV + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


# --- launcher -----------------------------------------------------------------------------------------
def gqa_attention_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                         alibi_slopes: Tensor | None = None, alibi_positions: Tensor | None = None,
                         scale: float | None = None, is_causal: bool = False, *,
                         config: AttentionConfig | None = None, num_splits: int | None = None) -> Tensor:
    """`qcompile::gqa_attention` with the Triton kernel; `config`/`num_splits` override the heuristics."""
    check_attention_inputs(q, k, v, attn_mask, alibi_slopes, alibi_positions)
    if q.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f"gqa_attention Triton kernel: q/k/v must be fp16/bf16/fp32, got {q.dtype}")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise NotImplementedError(f"gqa_attention Triton kernel: head_dim up to {MAX_HEAD_DIM}, got "
                                  f"{max(q.shape[3], v.shape[3])}")
    b, hq, L, d = q.shape
    hkv, S, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    out = q.new_empty(b, hq, L, dv)
    if out.numel() == 0:
        return out
    c = config or choose_config(L, group)
    g_pad = triton.next_power_of_2(group)
    if c.block_m < max(16, g_pad):
        raise ValueError(f"{c}: block_m must be >= 16 and >= the padded group size {g_pad}")
    block_l = c.block_m // g_pad
    q_blocks = triton.cdiv(L, block_l)
    splits = num_splits or choose_splits(b * hkv, q_blocks, S, c.block_n, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), c.block_n) * c.block_n
    splits = max(1, triton.cdiv(S, keys_per_split))

    mask = None
    if attn_mask is not None:
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(b, hq, L, S)
    pos = alibi_positions.expand(b, S) if alibi_positions is not None else None
    dummy = q  # unused pointer arguments
    if splits > 1:
        part = torch.empty(b * hq * L * splits, dv, device=q.device, dtype=torch.float32)
        stats = torch.empty(b * hq * L * splits, 2, device=q.device, dtype=torch.float32)
    else:
        part = stats = dummy
    mstr = mask.stride() if mask is not None else (0, 0, 0, 0)
    pstr = pos.stride() if pos is not None else (0, 0)
    grid = (b * hkv, q_blocks, splits)
    gqa_attention_kernel[grid](
        q, k, v, mask if mask is not None else dummy, alibi_slopes if alibi_slopes is not None else dummy,
        pos if pos is not None else dummy, out, part, stats,
        hkv, L, S, keys_per_split, float(d ** -0.5 if scale is None else scale),
        *q.stride(), *k.stride(), *v.stride(), *mstr, *pstr,
        G=group, D=d, DV=dv, HAS_MASK=mask is not None, MASK_IS_BOOL=mask is not None and mask.dtype == torch.bool,
        HAS_ALIBI=alibi_slopes is not None, HAS_POS=pos is not None, IS_CAUSAL=bool(is_causal), SPLIT=splits,
        ALLOW_TF32=bool(torch.backends.cuda.matmul.allow_tf32),
        BLOCK_M=c.block_m, BLOCK_L=block_l, BLOCK_N=c.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        num_warps=c.num_warps, num_stages=c.num_stages,
    )
    if splits > 1:
        combine_splits_kernel[(b * hq * L,)](part, stats, out, DV=dv, SPLIT=splits,
                                             BLOCK_SPLIT=max(2, triton.next_power_of_2(splits)),
                                             BLOCK_DV=max(16, triton.next_power_of_2(dv)))
    return out


# --- the op's CUDA kernel -------------------------------------------------------------------------------
def _gqa_attention_cuda(q, k, v, attn_mask=None, alibi_slopes=None, alibi_positions=None, scale=None,
                        is_causal=False):
    try:
        return gqa_attention_triton(q, k, v, attn_mask, alibi_slopes, alibi_positions, scale, is_causal)
    except NotImplementedError as e:  # e.g. fp64 or head_dim > 256: stay correct, say it is slower
        warnings.warn(f"{e}; using the SDPA path instead", stacklevel=2)
        return gqa_attention_sdpa(q, k, v, attn_mask, alibi_slopes, alibi_positions, scale, is_causal)


_impl = torch.library.Library("qcompile", "IMPL")
_impl.impl("gqa_attention_kernel", _gqa_attention_cuda, "CUDA")
