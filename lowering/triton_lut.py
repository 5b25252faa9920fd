"""CUDA path of `qcompile::lut_mm`: a fused lookup-table (GANQ) mpGEMM Triton kernel.

The kernel reads the lookup-table layout (`qcompile.formats.lut`) as saved:
    codes  uint8 [N, K/2]      byte j of a row holds k = 2j (low nibble) and k = 2j + 1 (high
                               nibble); 2- and 3-bit codes are nibbles too
    tables [N, 2^bits]         w[n, k] = tables[n, codes[n, k]], fp16 or bf16 (fp32 works too)
Each program computes a [BLOCK_M, BLOCK_N] tile of x @ W.T. Per K step it loads the codes as
32-bit words (eight codes each, k = 8i + j in nibble j), looks every code up in its row's table
and feeds the [BLOCK_N, BLOCK_K] weight tile to `tl.dot` with fp32 accumulation. Float weights
never reach global memory.

The lookup is a load of the table entry itself, from L1: a row's table is 32 bytes (16 fp16
entries), and with BLOCK_K = 256 the lanes of a warp share four rows, one 128-byte line a load.
`tl.gather` on a [BLOCK_N, 2^bits] register tile is not used: Triton's thread-locality pass gives
a 2-D gather a warp-local layout that costs shuffles and selects for every looked-up value (~30
instructions a weight in an sm_90 build with triton 3.9, against ~6 here), and releases that
size that layout from the table alone fail to compile an index wider than the table
(triton#11600, reported on 3.8). A select tree costs 2^bits - 1 selects a weight. When the
tables are aligned to their row size (always, for tensors torch allocates), the entry's address
is the row's address with the code's byte offset OR-ed into its low bits: two integer
instructions a weight, not four; otherwise the kernel runs a second copy of its loop that adds.

Decode configs split K over several programs per tile (`triton_tiles`: fp32 partials, the last
split of a tile sums them in a fixed order; one launch, deterministic).

Layout follows Triton's matmul tutorial: the kernel, its autotune configs beside it, a thin
launcher (`lut_mm_triton`), and a float64 reference for tests (`lut_mm_reference`).
`qcompile.lowering.inductor_lut` renders the same kernel (its tile function `lut_mm_tile`
verbatim) as an Inductor template.
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.ops import dequantize_lut

from .triton_tiles import (DEFAULT_NUM_SMS, DEFAULT_SHARED_MEMORY, device_limits, grouped_tile,
                           split_k_buffers, split_k_for, split_k_range, store_split_k)
from . import triton_tiles

_tickets = triton_tiles.tickets  # the split-K tickets (tests check they return to zero)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --- autotune configs ---------------------------------------------------------------------------
class LutConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # a multiple of 8 (one 32-bit word of codes) and >= 16 (tl.dot)
    num_warps: int
    num_stages: int
    split_k: int = 1  # programs sharing one output tile's K range

    def meta(self) -> dict:
        # GROUP_M: launch order that keeps GROUP_M row-blocks on one weight tile while it is in L2.
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "GROUP_M": 8,
                "SPLIT_K": self.split_k}

    def tiles(self, m: int, n: int) -> int:
        return triton.cdiv(m, self.block_m) * triton.cdiv(n, self.block_n)

    def shared_memory(self, x_itemsize: int) -> int:
        """An upper bound on the kernel's shared memory: per pipeline stage the activation tile, a
        weight tile in the activation dtype (Hopper's wgmma reads it from shared memory) and the
        codes (sm_90 builds with triton 3.9 used 45-100% of it)."""
        per_stage = self.block_k * (self.block_m + self.block_n) * x_itemsize + self.block_n * self.block_k // 2
        return self.num_stages * per_stage


# Decode (M <= 16): memory-bound on the codes. tl.dot needs 16 rows, so one 16-row tile (rows past
# M are masked, never loaded). A weight costs ~5.5-7 instructions (sm_90 SASS, fp16: the entry's
# load, two integer ops for its address, packing for tl.dot). BLOCK_K = 256 gives each warp 4 rows
# of codes, so one lookup load touches one 128-byte line of tables (BLOCK_K = 128: 8 rows, 2
# lines). Tiles use 106-184 registers a thread (2-4 programs of 4 warps fit an SM); split-K
# supplies the programs.
DECODE_CONFIGS = (
    LutConfig(16, 32, 256, 4, 4),
    LutConfig(16, 64, 256, 4, 3),
    LutConfig(16, 16, 256, 2, 4),
    LutConfig(16, 64, 128, 4, 4),
    LutConfig(16, 32, 128, 2, 4),
)
SMALL_BATCH_CONFIGS = (
    LutConfig(32, 64, 128, 4, 3),
    LutConfig(64, 64, 128, 4, 3),
    LutConfig(32, 128, 128, 4, 3),
    LutConfig(64, 64, 256, 4, 3),
    LutConfig(32, 64, 64, 4, 4),
)
# Prefill: compute-bound, classic GEMM tiles; BLOCK_M rows share each lookup. With fp32
# activations the largest do not fit in shared memory (`lut_mm_configs` leaves them out).
PREFILL_CONFIGS = (
    LutConfig(128, 128, 128, 8, 3),
    LutConfig(64, 128, 128, 4, 3),
    LutConfig(128, 128, 64, 8, 3),
    LutConfig(64, 64, 256, 4, 3),
    LutConfig(64, 64, 128, 4, 4),
    LutConfig(128, 256, 64, 8, 3),
)
ALL_CONFIGS = DECODE_CONFIGS + SMALL_BATCH_CONFIGS + PREFILL_CONFIGS


def lut_mm_configs(m: int, n: int | None = None, k: int | None = None, *, x_itemsize: int = 2,
                   split_k: bool = True, num_sms: int | None = None, shared_memory: int | None = None
                   ) -> list[LutConfig]:
    """The configs worth trying for M rows, best guess first, that fit in shared memory with
    activations of `x_itemsize` bytes; with N and K, decode and small-batch tiles get the split-K
    that fills the GPU (`split_k=False`: one program per tile, as the Inductor template runs)."""
    bucket = DECODE_CONFIGS if m <= 16 else SMALL_BATCH_CONFIGS if m <= 64 else PREFILL_CONFIGS
    limit = shared_memory or DEFAULT_SHARED_MEMORY
    configs = [c for c in bucket if c.shared_memory(x_itemsize) <= limit]
    configs = configs or [min(bucket, key=lambda c: c.shared_memory(x_itemsize))]
    if n is None or k is None or not split_k or bucket is PREFILL_CONFIGS:
        return configs
    num_sms = num_sms or DEFAULT_NUM_SMS
    return [c._replace(split_k=split_k_for(c.tiles(m, n), k, c.block_k, num_sms)) for c in configs]


@functools.cache
def _triton_config(c: LutConfig) -> triton.Config:
    return triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)


def _prune(configs, named_args, **kwargs):
    # triton.autotune starts from ALL_CONFIGS; keep this M bucket's that fit, each with its split-K.
    x = named_args["x_ptr"]
    configs = lut_mm_configs(named_args["M"], named_args["N"], named_args["K"], **device_limits(x.device),
                             x_itemsize=x.element_size())
    return [_triton_config(c) for c in configs]


# --- the kernel ---------------------------------------------------------------------------------
@triton.jit
def _lut_lookup(words, row_addr, J: tl.constexpr, BITS: tl.constexpr, ALIGNED: tl.constexpr, table_ty: tl.constexpr):
    """The table entries of nibble J of every code word: [BLOCK_N, BLOCK_K // 8]."""
    # Byte offset of the entry, taken straight from the nibble's bits: code << ENTRY_SHIFT.
    ENTRY_SHIFT: tl.constexpr = 1 if table_ty.primitive_bitwidth == 16 else 2
    SHIFT: tl.constexpr = 4 * J - ENTRY_SHIFT
    MASK: tl.constexpr = ((1 << BITS) - 1) << ENTRY_SHIFT
    if SHIFT >= 0:
        offset = (words >> SHIFT) & MASK
    else:
        offset = (words << -SHIFT) & MASK
    if ALIGNED:  # the row address has zeros where the offset goes: OR, no carry into the high word
        addr = row_addr[:, None] | offset.to(tl.int64)
    else:
        addr = row_addr[:, None] + offset.to(tl.int64)
    return tl.load(addr.to(tl.pointer_type(table_ty)))


@triton.jit
def _lut_mm_steps(acc, x_ptrs, w_ptrs, row_addr, rm, M, k_lo, k_hi, stride_xk,
                  BITS: tl.constexpr, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, ALLOW_TF32: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, table_ty: tl.constexpr):
    """acc += x[:, k_lo:k_hi] @ W[:, k_lo:k_hi].T, BLOCK_K columns a step."""
    rk = tl.arange(0, BLOCK_K)
    rw = tl.arange(0, BLOCK_K // 8)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
            words = tl.load(w_ptrs)
        else:  # masked columns: x is 0 there, so the looked-up weight of code 0 adds nothing
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (k + rk[None, :] < k_hi), other=0.0)
            words = tl.load(w_ptrs, mask=k + 8 * rw[None, :] < k_hi, other=0)
        w0 = _lut_lookup(words, row_addr, 0, BITS, ALIGNED, table_ty)
        w1 = _lut_lookup(words, row_addr, 1, BITS, ALIGNED, table_ty)
        w2 = _lut_lookup(words, row_addr, 2, BITS, ALIGNED, table_ty)
        w3 = _lut_lookup(words, row_addr, 3, BITS, ALIGNED, table_ty)
        w4 = _lut_lookup(words, row_addr, 4, BITS, ALIGNED, table_ty)
        w5 = _lut_lookup(words, row_addr, 5, BITS, ALIGNED, table_ty)
        w6 = _lut_lookup(words, row_addr, 6, BITS, ALIGNED, table_ty)
        w7 = _lut_lookup(words, row_addr, 7, BITS, ALIGNED, table_ty)
        # Back to k order, k = 8i + j: each join adds a minor axis (the outermost join the fastest),
        # so join j's bit 2 first, then bit 1, then bit 0, and flatten.
        w = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x.dtype)
        # fp32 activations: TF32 only if torch allows it for matmuls (it does not by default).
        if ALLOW_TF32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32")
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K // 8
    return acc


@triton.jit
def lut_mm_tile(x_ptr, codes_ptr, tables_ptr, rm, rn, M, N, k_lo, k_hi,
                stride_xm, stride_xk, stride_cn, stride_tn,
                BITS: tl.constexpr, EVEN_K: tl.constexpr, ALLOW_TF32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N]: x[rm, k_lo:k_hi] @ W[rn, k_lo:k_hi].T (rows of x past M read as 0).

    stride_cn is in bytes and a multiple of 4; k_lo a multiple of BLOCK_K; K a multiple of 8.
    """
    # Edge weight rows wrap around rather than mask their loads; the caller's store drops them.
    wn = rn % N
    words_ptr = codes_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)
    w_ptrs = words_ptr + wn[:, None] * (stride_cn // 4) + (k_lo // 8 + tl.arange(0, BLOCK_K // 8))[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo + tl.arange(0, BLOCK_K))[None, :] * stride_xk
    table_ty: tl.constexpr = tables_ptr.dtype.element_ty
    ROW_BYTES: tl.constexpr = (1 << BITS) * (table_ty.primitive_bitwidth // 8)
    row_addr = (tables_ptr + wn * stride_tn).to(tl.int64, bitcast=True)
    aligned = ((tables_ptr.to(tl.int64, bitcast=True) | (stride_tn * (ROW_BYTES >> BITS))) & (ROW_BYTES - 1)) == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One branch outside the loop (a branch per step would stall the pipelined loads).
    if aligned:
        acc = _lut_mm_steps(acc, x_ptrs, w_ptrs, row_addr, rm, M, k_lo, k_hi, stride_xk,
                            BITS, True, EVEN_K, ALLOW_TF32, BLOCK_N, BLOCK_K, table_ty)
    else:
        acc = _lut_mm_steps(acc, x_ptrs, w_ptrs, row_addr, rm, M, k_lo, k_hi, stride_xk,
                            BITS, False, EVEN_K, ALLOW_TF32, BLOCK_N, BLOCK_K, table_ty)
    return acc


@triton.jit
def lut_mm_kernel(
    x_ptr, codes_ptr, tables_ptr, out_ptr, partials_ptr, tickets_ptr,
    M, N, K,
    M_BUCKET,  # autotune key only: decode and prefill get different tiles
    stride_xm, stride_xk, stride_cn, stride_tn, stride_om,
    BITS: tl.constexpr, EVEN_K: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K,  # not a constexpr: one compile serves every split (triton specializes SPLIT_K == 1)
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    k_lo, k_hi = split_k_range(K, SPLIT_K, BLOCK_K)
    acc = lut_mm_tile(x_ptr, codes_ptr, tables_ptr, rm, rn, M, N, k_lo, k_hi,
                      stride_xm, stride_xk, stride_cn, stride_tn,
                      BITS, EVEN_K, ALLOW_TF32, BLOCK_M, BLOCK_N, BLOCK_K)
    store_split_k(acc, out_ptr, partials_ptr, tickets_ptr, rm, rn, M, N, stride_om, SPLIT_K, BLOCK_M, BLOCK_N)


lut_mm_autotuned = triton.autotune(
    configs=[_triton_config(c) for c in ALL_CONFIGS],
    key=["M_BUCKET", "N", "K", "BITS", "EVEN_K"],  # triton adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _prune},
)(lut_mm_kernel)


# --- launcher -----------------------------------------------------------------------------------
def table_bits(tables: Tensor) -> int:
    entries = tables.shape[-1]
    if entries not in (4, 8, 16):
        raise ValueError(f"lut_mm: tables have {entries} entries a row; 2-, 3- or 4-bit codes need 4, 8 or 16")
    return entries.bit_length() - 1


def _check(x: Tensor, codes: Tensor, tables: Tensor) -> None:
    n, k = codes.shape[0], 2 * codes.shape[1]
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise TypeError(f"lut_mm: codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if x.shape[-1] != k:
        raise ValueError(f"lut_mm: x has {x.shape[-1]} features, the weight expects {k}")
    if tables.dim() != 2 or tables.shape[0] != n:
        raise ValueError(f"lut_mm: tables {tuple(tables.shape)} do not match {n} rows of codes")
    table_bits(tables)
    if x.dtype not in KERNEL_DTYPES or tables.dtype not in TABLE_DTYPES:
        raise NotImplementedError(f"lut_mm Triton kernel: activations and tables must be fp16/bf16/fp32, "
                                  f"got {x.dtype} and {tables.dtype}")
    if k % 8:
        raise NotImplementedError(f"lut_mm Triton kernel: reads codes as 32-bit words, in_features {k} "
                                  "is not a multiple of 8")


def lut_mm_triton(x: Tensor, codes: Tensor, tables: Tensor, *, out: Tensor | None = None,
                  config: LutConfig | None = None) -> Tensor:
    """x [..., K] @ W.T in x.dtype, W[n, k] = tables[n, codes[n, k]]; autotuned unless `config`
    is given (tests, Inductor)."""
    _check(x, codes, tables)
    n, k = codes.shape[0], x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if out is None:
        out = x.new_empty(*x.shape[:-1], n)
    out2 = out.view(m, n)  # the out= form (Inductor's extern choice) passes a contiguous [M, N]
    if m == 0:
        return out
    # Codes are read as aligned 32-bit words; tables entry by entry along a row.
    if codes.stride(1) != 1 or codes.stride(0) % 4 or codes.data_ptr() % 4:
        codes = codes.contiguous() if not codes.is_contiguous() else codes.clone()
    if tables.stride(1) != 1:
        tables = tables.contiguous()

    if config is None:
        candidates = lut_mm_configs(m, n, k, x_itemsize=x.element_size(), **device_limits(x.device))
    else:
        candidates = [config]
    partials, tickets = split_k_buffers(x2, m, n, max(c.split_k for c in candidates),
                                        max(c.tiles(m, n) for c in candidates))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (x2, codes, tables, out2, partials, tickets, m, n, k, min(triton.next_power_of_2(m), 1024),
            x2.stride(0), x2.stride(1), codes.stride(0), tables.stride(0), out2.stride(0), table_bits(tables))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    # EVEN_K: K is whole BLOCK_K steps (splits cover whole steps), so no column masks are needed
    even_k = all(k % c.block_k == 0 for c in candidates)
    if config is None:
        lut_mm_autotuned[grid](*args, even_k, tf32)
    else:
        lut_mm_kernel[grid](*args, even_k, tf32, **config.meta(), num_warps=config.num_warps,
                            num_stages=config.num_stages)
    return out


def lut_mm_reference(x: Tensor, codes: Tensor, tables: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """x @ W.T computed entirely in `dtype` (float64 for tests); returns `dtype`."""
    return x.to(dtype) @ dequantize_lut(codes, tables, dtype).t()


# --- the op's CUDA kernel -----------------------------------------------------------------------
def _lut_mm_cuda(x: Tensor, codes: Tensor, tables: Tensor) -> Tensor:
    try:
        return lut_mm_triton(x, codes, tables)
    except NotImplementedError as e:  # e.g. fp64 activations or K % 8: stay correct, say it is slow
        warnings.warn(f"{e}; using the dequantize + matmul reference instead", stacklevel=2)
        return lut_mm_reference(x, codes, tables, x.dtype)


_impl = torch.library.Library("qcompile", "IMPL")
_impl.impl("lut_mm_kernel", _lut_mm_cuda, "CUDA")
