"""The int4 W4A8 decode GEMV at SmolLM2-135M's fused shapes, to compare two builds of the CPU kernels.

    PYTHONPATH=<tree> python benchmarks/compare_gemv_builds.py [--threads 1] [--reps 300]

Runs `qcompile::int4_mm_a8_kernel` as built from <tree>'s lowering/cpu_kernels.cpp (the kernel cache keys
on the source, so two trees give two builds) on one row of x against 30 random weights of each shape
(group 64, bf16 scales, fp16 zero-points), cycling through them so the weights come from memory as in
a decode step. Prints the median of 7 timings of --reps calls, in us per call and GB/s of weight bytes.
Timings here are noisy: run the two trees alternately (old, new, old, new, ...; e.g. a `git worktree`
of the old commit against the working tree) and compare the rounds.
"""
from __future__ import annotations

import argparse
import time

import torch

from qcompile.formats import pack_nibbles
from qcompile.ops.kernels import load_kernels

SHAPES = [(576, 960, "q+k+v"), (576, 576, "o_proj"), (576, 3072, "gate+up"), (1536, 576, "down_proj")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args()
    assert load_kernels(torch.device("cpu")), "the CPU kernels did not build"
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    op, group = torch.ops.qcompile.int4_mm_a8_kernel, 64
    for K, N, name in SHAPES:
        weights = [(pack_nibbles(torch.randint(0, 16, (N, K), generator=g)),
                    ((torch.rand(N, K // group, generator=g) + .5) * .01).to(torch.bfloat16),
                    (torch.rand(N, K // group, generator=g) * 15).to(torch.float16)) for _ in range(30)]
        x = torch.randn(1, K)
        for w in weights:
            op(x, *w, group)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for i in range(args.reps):
                op(x, *weights[i % 30], group)
            times.append((time.perf_counter() - t0) / args.reps * 1e6)
        us = sorted(times)[3]
        nbytes = N * K // 2 + N * (K // group) * 4
        print(f"{name:10s} {K}x{N}: {us:7.1f} us  {nbytes / us / 1e3:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
