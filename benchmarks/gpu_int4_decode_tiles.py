"""Which tiles make the int4 Triton kernel fast at decode sizes (M = 1..16)? GPU only.

    PYTHONPATH=. python benchmarks/gpu_int4_decode_tiles.py

Times every candidate tile of the one kernel (the launcher's `config=`), plus a split-K variant
(fp32 atomics, then a cast) as the known remedy for too few programs, on Llama-7B shapes, with
the method of bench_kernels.py (CUDA graphs over weight copies larger than L2). Prints the best
tiles per shape and batch and the achieved bandwidth; the results pick DECODE_CONFIGS.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl
import triton.testing

from qcompile.lowering import triton_int4 as ti
from qcompile.lowering.triton_int4 import Int4Config

from bench_kernels import int4_bytes, random_int4


@triton.jit
def int4_gemv_splitk(x_ptr, qw_ptr, s_ptr, z_ptr, acc_ptr, M, N, K, K_PER,
                     GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    wn = rn % N
    rk = tl.arange(0, BLOCK_K)
    k0 = pid_k * K_PER
    x_ptrs = x_ptr + (rm % M)[:, None] * K + (k0 + rk)[None, :]
    q_ptrs = qw_ptr + wn[:, None] * (K // 2) + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k0, k0 + K_PER, BLOCK_K):
        x = tl.load(x_ptrs)
        packed = tl.load(q_ptrs)
        q = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK_N, BLOCK_K)).to(tl.float32)
        g = k // GROUP_SIZE
        s = tl.load(s_ptr + wn * (K // GROUP_SIZE) + g).to(tl.float32)
        z = tl.load(z_ptr + wn * (K // GROUP_SIZE) + g).to(tl.float32)
        w = ((q - z[:, None]) * s[:, None]).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // 2
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.atomic_add(acc_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask, sem="relaxed")


def splitk(x, w, group, split, block_n=64, block_k=128, warps=4, stages=3):
    m, k = x.shape
    n = w.qweight.shape[0]
    acc = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, block_n), split)
    int4_gemv_splitk[grid](x, w.qweight, w.scales, w.zeros, acc, m, n, k, k // split, group,
                           BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return acc.to(x.dtype)


def main():
    shapes = [(4096, 4096), (4096, 11008), (1536, 576)]
    tiles = [Int4Config(16, bn, bk, nw, ns) for bn, bk, nw, ns in itertools.product(
        (16, 32, 64), (128, 256, 512), (2, 4), (3, 4, 6))]
    rows = []
    for (n, k), m in itertools.product(shapes, (1, 16)):
        group = 128 if k % 128 == 0 else 64
        copies = max(2, min(64, 256 * 2**20 // (n * k // 2)))
        ws = [random_int4(n, k, group, "cuda", torch.float16) for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = ti.int4_mm_reference(x, ws[0].qweight, ws[0].scales, ws[0].zeros, group, torch.float32)

        def timed(fn):
            fn(ws[0])
            run = lambda: [fn(w) for w in ws]  # noqa: E731
            return triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median") * 1e-3 / copies

        results = []
        for c in tiles:
            if not c.fits(k, group) or c.block_k > k:
                continue
            fn = lambda w, c=c: ti.int4_mm_triton(x, w.qweight, w.scales, w.zeros, group, config=c)  # noqa: E731
            try:
                err = (fn(ws[0]).float() - ref).norm() / ref.norm()
                if err > 1e-2:
                    print("WRONG", c, err.item())
                    continue
                results.append((timed(fn), str(c)))
            except Exception as e:  # out of resources etc.
                print("skip", c, type(e).__name__)
        for split, bn, bk in itertools.product((2, 4, 8, 16), (32, 64), (128, 256)):
            if k % (split * bk) or (k // split) % group and group % bk:
                continue
            fn = lambda w, s=split, bn=bn, bk=bk: splitk(x, w, group, s, bn, bk)  # noqa: E731
            try:
                err = (fn(ws[0]).float() - ref).norm() / ref.norm()
                if err > 1e-2:
                    print("WRONG splitk", split, bn, bk, err.item())
                    continue
                results.append((timed(fn), f"splitK={split} BN={bn} BK={bk}"))
            except Exception as e:
                print("skip splitk", split, bn, bk, type(e).__name__)
        results.sort()
        current = min((t for t, c in results if any(str(d) == c for d in ti.int4_mm_configs(m, k, group))), default=None)
        best_t, best_c = results[0]
        gbs = int4_bytes(n, k, m, group) / best_t / 1e9
        rows.append(f"| {n}x{k} | {m} | {current * 1e6:.1f} | {best_t * 1e6:.1f} | {gbs:.0f} | {best_c} | "
                    + "; ".join(f"{c} {t * 1e6:.1f}" for t, c in results[1:5]) + " |")
        print(rows[-1], flush=True)
    print("\n| N x K | M | current configs best (us) | best (us) | best GB/s | best tile | next four |")
    print("|---|---:|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
