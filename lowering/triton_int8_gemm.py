"""CUDA kernel of qcompile::int8_gemm (QUIK's integer part) in Triton: int32 group sums of
a [M, K] int8 @ b [N, K]ᵀ int8, one program per (M tile, N tile, weight group), int8 ``tl.dot``
with int32 accumulation (Hopper and Ampere tensor cores have int8 MMA, no int4: 4-bit codes are
held one per byte). The epilogue (scales, zero-point correction, float columns) stays in torch ops
around it, which Inductor fuses.

Not yet: packed 4-bit weights unpacked in registers, an Inductor template (the op runs as an
extern kernel), decode-shaped split-K. Checked under TRITON_INTERPRET=1 (tests/test_triton_int8_gemm.py);
GPU timing owed (benchmarks/run_gpu_checks.sh).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor


@dataclass(frozen=True)
class Int8GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# int8 MMA wants K tiles of >= 32 bytes; small M (decode, QUIK's token rows) takes the 16-row tile.
DECODE_CONFIGS = [Int8GemmConfig(16, 64, 64, 4, 4), Int8GemmConfig(16, 128, 128, 4, 3)]
PREFILL_CONFIGS = [Int8GemmConfig(64, 64, 64, 4, 3), Int8GemmConfig(128, 128, 64, 8, 3),
                   Int8GemmConfig(128, 64, 128, 4, 3)]


def int8_gemm_configs(m: int) -> list[Int8GemmConfig]:
    """The configs worth trying for M rows (a K tile never crosses a weight group)."""
    return DECODE_CONFIGS if m <= 16 else PREFILL_CONFIGS


@triton.jit
def int8_gemm_kernel(a_ptr, b_ptr, out_ptr, M, N, GROUP_K, stride_am, stride_ak, stride_bn, stride_bk,
                     stride_og, stride_om, stride_on,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n, group = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k0 = group * GROUP_K
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak
    b_ptrs = b_ptr + rn[None, :] * stride_bn + (k0 + rk)[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kk in range(0, GROUP_K, BLOCK_K):  # a group's last tile may be partial (QUIK: K - outliers columns)
        k_ok = kk + rk < GROUP_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=(rn[None, :] < N) & k_ok[:, None], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out = out_ptr + group * stride_og + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def int8_gemm_triton(a: Tensor, b: Tensor, groups: int, config: Int8GemmConfig | None = None) -> Tensor:
    """int32 [G, M, N] group sums of a [M, K] @ b [N, K]ᵀ (int8), with `config` or the first that fits."""
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != torch.int8 or b.dtype != torch.int8 or b.shape[1] != k or k % groups:
        raise ValueError(f"qcompile::int8_gemm: int8 [M, K] @ int8 [N, K]ᵀ in {groups} groups of K, got "
                         f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    group_k = k // groups
    c = config or int8_gemm_configs(m)[0]
    out = torch.empty(groups, m, n, dtype=torch.int32, device=a.device)
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n), groups)
    int8_gemm_kernel[grid](a, b, out, m, n, group_k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                           out.stride(0), out.stride(1), out.stride(2), BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                           BLOCK_K=c.block_k, num_warps=c.num_warps, num_stages=c.num_stages)
    return out


_impl = torch.library.Library("qcompile", "IMPL")
_impl.impl("int8_gemm", lambda a, b, groups: int8_gemm_triton(a, b, groups), "CUDA")
