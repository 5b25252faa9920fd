"""CUDA path of `qcompile::int4_mm`: a fused int4-dequantize + GEMM Triton kernel.

The kernel reads the canonical int4 layout (`qcompile.formats.int4`) as saved, so CUDA needs no
repacking:
    qweight uint8 [N, K/2]  byte j of a row holds k = 2j (low nibble) and k = 2j + 1 (high nibble)
    scales, zeros [N, K/g]  w[n, k] = scales[n, k // g] * (q[n, k] - zeros[n, k // g])
Each program computes a [BLOCK_M, BLOCK_N] tile of x @ W.T: it loads a [BLOCK_N, BLOCK_K/2] byte
tile, splits and interleaves the nibbles to [BLOCK_N, BLOCK_K], dequantizes with the tile's group
scale/zero and feeds `tl.dot` with fp32 accumulation. Float weights never reach global memory.
Decode configs (M <= 16) split K over several programs per output tile (`triton_tiles`: the last
split sums the fp32 partials in a fixed order; one launch, deterministic, CUDA-graph safe): with
one program per tile, N / BLOCK_N programs are too few to keep the weight streaming (H200 sweep:
0.5-0.9x fp16 cuBLAS at M = 1-16 without it).

The same kernel serves the int8 layout (`qcompile::int8_mm` on CUDA, `int8_mm_triton`): int8
[N, K] codes, scales (and optional zeros) per channel or per group, w = scales * (q - zeros);
BITS = 8 only changes how codes are loaded (an int8 lm_head is the largest weight of a small
model, and its dequantize + matmul fallback would move 3x its bytes per token).

Layout follows Triton's matmul tutorial: the kernel, its autotune configs beside it, a thin
launcher (`int4_mm_triton`), and a float64 reference for tests (`int4_mm_reference`).
`qcompile.lowering.inductor_int4` renders the same kernel as an Inductor template.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.ops import dequantize_int4
from qcompile.ops.linear import _check_int8 as check_int8, int8_mm_reference

from .triton_tiles import DEFAULT_NUM_SMS, device_limits, grouped_tile, split_k_buffers, split_k_for, split_k_range, store_split_k

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --- autotune configs ---------------------------------------------------------------------------
class Int4Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # programs sharing one output tile's K range

    def meta(self) -> dict:
        # GROUP_M: launch order that keeps GROUP_M row-blocks on one weight tile while it is in L2.
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": 8,
                "SPLIT_K": self.split_k}

    def tiles(self, m: int, n: int) -> int:
        return triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n)

    def fits(self, k: int, group_size: int) -> bool:
        """The kernel has no K mask, and indexes scales either once per tile or per k-column."""
        bk = self.block_k
        return k % bk == 0 and (group_size % bk == 0 or bk % group_size == 0)


# M = 1: a GEMV. BLOCK_M = 1 selects the kernel's FMA path (no 16-row tensor-core tile, 15 of
# whose rows would be padding); each lane keeps BLOCK_N * BLOCK_K / threads fp32 partial sums.
GEMV_CONFIGS = (
    Int4Config(1, 16, 256, 4, 4),
    Int4Config(1, 32, 256, 4, 4),
    Int4Config(1, 8, 512, 4, 3),
    Int4Config(1, 16, 512, 8, 3),
    Int4Config(1, 64, 128, 4, 4),
)
# Decode (M <= 16): memory-bound on the weight. tl.dot needs 16 rows, so one 16-row tile; narrow
# BLOCK_N and split-K (chosen per shape by `int4_mm_configs`) spread the weight over every SM, long
# BLOCK_K makes wide loads (128 B of codes a row at 256). Small BLOCK_K entries serve K or group
# sizes that are not multiples of 128.
DECODE_CONFIGS = (
    Int4Config(16, 32, 256, 4, 4),
    Int4Config(16, 16, 256, 2, 4),
    Int4Config(16, 32, 128, 2, 4),
    Int4Config(16, 32, 128, 4, 4),  # best single-pass tile on 4096x11008 at M = 1 (H100 sweep)
    Int4Config(16, 64, 128, 4, 4),
    Int4Config(16, 32, 256, 4, 3),
    Int4Config(16, 64, 256, 4, 3),
    Int4Config(16, 128, 128, 4, 4),
    Int4Config(16, 64, 64, 4, 4),
    Int4Config(16, 32, 32, 2, 4),
)
SMALL_BATCH_CONFIGS = (
    Int4Config(32, 64, 128, 4, 4),
    Int4Config(64, 64, 128, 4, 4),
    Int4Config(32, 128, 128, 4, 4),
    Int4Config(64, 128, 64, 4, 4),
    Int4Config(64, 64, 64, 4, 3),
    Int4Config(32, 64, 32, 4, 4),
)
# Prefill: compute-bound, classic GEMM tiles. With fp32 activations the largest may not fit in
# shared memory; triton.autotune skips those (explicit `config=` callers choose for themselves).
PREFILL_CONFIGS = (
    Int4Config(128, 128, 64, 8, 3),
    Int4Config(128, 64, 64, 4, 4),
    Int4Config(64, 128, 64, 4, 4),
    Int4Config(128, 128, 128, 8, 3),
    Int4Config(64, 64, 128, 4, 4),
    Int4Config(128, 256, 64, 8, 3),
    Int4Config(64, 64, 32, 4, 4),
)
ALL_CONFIGS = GEMV_CONFIGS + DECODE_CONFIGS + SMALL_BATCH_CONFIGS + PREFILL_CONFIGS


def int4_mm_configs(m: int, k: int | None = None, group_size: int | None = None, n: int | None = None, *,
                    num_sms: int | None = None) -> list[Int4Config]:
    """The configs worth trying for M rows (those whose BLOCK_K fits K and the group size), best
    guess first; with N, decode tiles (M <= 16) get the split-K that fills `num_sms` SMs."""
    bucket = DECODE_CONFIGS if m <= 16 else SMALL_BATCH_CONFIGS if m <= 64 else PREFILL_CONFIGS
    if m == 1:
        bucket = GEMV_CONFIGS + DECODE_CONFIGS
    if k is None:
        return list(bucket)
    group_size = group_size or k
    configs = [c for c in bucket if c.fits(k, group_size)]
    if not configs:
        for bk in (64, 32, 16):  # odd K: the bucket's first tile with a shorter K step (tl.dot needs 16)
            if (c := bucket[0]._replace(block_k=bk)).fits(k, group_size):
                configs = [c]
                break
        else:
            raise NotImplementedError(
                f"int4_mm Triton kernel: no BLOCK_K in 16..256 divides K={k} and divides or is a multiple "
                f"of group_size={group_size}")
    if n is None or m > 16:
        return configs
    num_sms = num_sms or DEFAULT_NUM_SMS
    return [c._replace(split_k=split_k_for(c.tiles(m, n), k, c.block_k, num_sms)) for c in configs]


@functools.cache
def _triton_config(c: Int4Config) -> triton.Config:
    return triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)


def _prune(configs, named_args, **kwargs):
    # triton.autotune starts from ALL_CONFIGS; keep this M bucket's that fit K and g, each with its split-K.
    configs = int4_mm_configs(named_args["M"], named_args["K"], named_args["GROUP_SIZE"], named_args["N"],
                              num_sms=device_limits(named_args["x_ptr"].device)["num_sms"])
    return [_triton_config(c) for c in configs]


# --- the kernel ---------------------------------------------------------------------------------
@triton.jit
def int4_mm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, partials_ptr, tickets_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only: decode and prefill get different tiles
    stride_xm, stride_xk, stride_qn, stride_sn, stride_om,
    GROUP_SIZE: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K,  # not a constexpr: one compile serves every split (triton specializes SPLIT_K == 1)
    BITS: tl.constexpr = 4, HAS_ZEROS: tl.constexpr = True,  # int8 layout: BITS = 8, zeros optional
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Edge rows/columns wrap around rather than mask the loads; the store mask drops them.
    xm = rm % M
    wn = rn % N
    rk = tl.arange(0, BLOCK_K)
    k_lo, k_hi = split_k_range(K, SPLIT_K, BLOCK_K)
    x_ptrs = x_ptr + xm[:, None] * stride_xm + (k_lo + rk)[None, :] * stride_xk
    if BITS == 8:
        q_ptrs = qw_ptr + wn[:, None] * stride_qn + (k_lo + rk)[None, :]
    else:
        q_ptrs = qw_ptr + wn[:, None] * stride_qn + (k_lo // 2 + tl.arange(0, BLOCK_K // 2))[None, :]

    if BLOCK_M == 1:  # GEMV: per-lane fp32 products, summed over K once after the loop
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):  # the launcher checks K % BLOCK_K == 0
        x = tl.load(x_ptrs)
        if BITS == 8:
            q = tl.load(q_ptrs).to(tl.float32)
        else:
            packed = tl.load(q_ptrs)
            # Low nibble is k = 2j, high nibble k = 2j + 1: join on a new minor axis, then flatten.
            q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
        if BLOCK_K <= GROUP_SIZE:  # the whole tile lies in one group: one scale per row
            g = k // GROUP_SIZE
            s = tl.load(s_ptr + wn * stride_sn + g).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + wn * stride_sn + g).to(tl.float32)
                w = (q - z[:, None]) * s[:, None]
            else:
                w = q * s[:, None]
        else:  # several groups per tile: a scale per k-column (repeated addresses hit the cache)
            offs = wn[:, None] * stride_sn + ((k + rk) // GROUP_SIZE)[None, :]
            s = tl.load(s_ptr + offs).to(tl.float32)
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs).to(tl.float32)
                w = (q - z) * s
            else:
                w = q * s
        if BLOCK_M == 1:  # one row of x: FMAs on the CUDA cores, no tensor-core tile to fill
            acc += w * x.to(tl.float32)
        else:
            w = w.to(x.dtype)
            # fp32 activations: TF32 only if torch allows it for matmuls (it does not by default).
            if ALLOW_TF32:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32")
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K * BITS // 8

    if BLOCK_M == 1:
        acc = tl.reshape(tl.sum(acc, axis=1), (1, BLOCK_N))
    store_split_k(acc, out_ptr, partials_ptr, tickets_ptr, rm, rn, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N)


int4_mm_autotuned = triton.autotune(
    configs=[_triton_config(c) for c in ALL_CONFIGS],
    key=["M_BUCKET", "N", "K", "GROUP_SIZE", "BITS", "HAS_ZEROS"],  # triton adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune},
)(int4_mm_kernel)


# --- launcher -----------------------------------------------------------------------------------
def _check(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> None:
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    if qweight.dtype != torch.uint8:
        raise TypeError(f"int4_mm: qweight must be uint8, got {qweight.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"int4_mm: x has {x.shape[-1]} features, the weight expects {k}")
    if k % group_size or tuple(scales.shape) != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"int4_mm: scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not match "
                         f"[{n}, {k} // {group_size}]")
    if x.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f"int4_mm Triton kernel: activations must be fp16/bf16/fp32, got {x.dtype}")


def int4_mm_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                   *, out: Tensor | None = None, config: Int4Config | None = None) -> Tensor:
    """x [..., K] @ dequant(W).T in x.dtype; autotuned unless `config` is given (tests, Inductor)."""
    _check(x, qweight, scales, zeros, group_size)
    return _launch(x, qweight, scales, zeros, group_size, 4, out, config)


def int8_mm_triton(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None = None,
                   *, out: Tensor | None = None, config: Int4Config | None = None) -> Tensor:
    """x [..., K] @ dequant(W).T for the int8 layout (`qcompile.ops.dequantize_int8`), in x.dtype."""
    n, k = qweight.shape
    if qweight.dtype != torch.int8 or x.shape[-1] != k:
        raise ValueError(f"int8_mm: need int8 [N, {x.shape[-1]}] codes, got {qweight.dtype} {tuple(qweight.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise NotImplementedError(f"int8_mm Triton kernel: activations must be fp16/bf16/fp32, got {x.dtype}")
    check_int8(qweight, scales, zeros)  # the op's own shape checks
    groups = 1 if scales.dim() == 1 else scales.shape[1]
    scales = scales.reshape(n, groups)
    zeros = None if zeros is None else zeros.reshape(n, groups)
    return _launch(x, qweight, scales, zeros, k // groups, 8, out, config)


def _launch(x, qweight, scales, zeros, group_size, bits, out, config):
    n, k = qweight.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if out is None:
        out = x.new_empty(*x.shape[:-1], n)
    out2 = out.view(m, n)  # the out= form (Inductor's extern choice) passes a contiguous [M, N]
    if m == 0:
        return out
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = scales if zeros is None else zeros.contiguous()  # (not read when HAS_ZEROS is False)
    has_zeros = zeros is not scales

    if config is None:  # (raises NotImplementedError if no tile fits)
        candidates = int4_mm_configs(m, k, group_size, n, num_sms=device_limits(x.device)["num_sms"])
    else:
        candidates = [config]
    partials, tickets = split_k_buffers(x2, m, n, max(c.split_k for c in candidates),
                                        max(c.tiles(m, n) for c in candidates))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (x2, qweight, scales, zeros, out2, partials, tickets, m, n, k, min(triton.next_power_of_2(m), 1024),
            x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), out2.stride(0),
            group_size, torch.backends.cuda.matmul.allow_tf32)
    if config is None:
        int4_mm_autotuned[grid](*args, BITS=bits, HAS_ZEROS=has_zeros)
    else:
        if not config.fits(k, group_size):
            raise ValueError(f"{config} does not fit K={k}, group_size={group_size}")
        int4_mm_kernel[grid](*args, **config.meta(), BITS=bits, HAS_ZEROS=has_zeros, num_warps=config.num_warps,
                             num_stages=config.num_stages)
    return out


def int4_mm_reference(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                      dtype: torch.dtype = torch.float64) -> Tensor:
    """x @ dequant(W).T computed entirely in `dtype` (float64 for tests); returns `dtype`."""
    return x.to(dtype) @ dequantize_int4(qweight, scales, zeros, group_size, dtype).t()


# --- the op's CUDA kernel -----------------------------------------------------------------------
def _int4_mm_cuda(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    try:
        return int4_mm_triton(x, qweight, scales, zeros, group_size)
    except NotImplementedError as e:  # e.g. fp64 activations or an odd K: stay correct, say it is slow
        warnings.warn(f"{e}; using the dequantize + matmul reference instead", stacklevel=2)
        return int4_mm_reference(x, qweight, scales, zeros, group_size, x.dtype)


def _int8_mm_cuda(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None = None) -> Tensor:
    try:
        return int8_mm_triton(x, qweight, scales, zeros)
    except NotImplementedError as e:
        warnings.warn(f"{e}; using the dequantize + matmul reference instead", stacklevel=2)
        return int8_mm_reference(x, qweight, scales, zeros)


_impl = torch.library.Library("qcompile", "IMPL")
_impl.impl("int4_mm_kernel", _int4_mm_cuda, "CUDA")
_impl.impl("int8_mm_kernel", _int8_mm_cuda, "CUDA")
