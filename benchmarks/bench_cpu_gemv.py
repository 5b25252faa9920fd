"""Decode GEMV on CPU: float activations (W4A16 / W8A16) vs int8 activations (W4A8 / W8A8).

    python benchmarks/bench_cpu_gemv.py

SmolLM2-135M's decode shapes (K in, N out) at M = 1 row, on the kernel ops as compiled graphs call
them: int4 g64 (bf16 scales, fp16 zeros: the default recipe's layers) through
`int4_mm_kernel` and `int4_mm_a8_kernel`; int8 per channel (bf16 scales: the default lm_head) through
`int8_mm_kernel` and `int8_mm_a8_kernel` with one activation scale per token. Two cache states:
"L3" re-reads one weight (the small layers fit in L3), "memory" cycles through copies of it
(> 100 MiB in all), as decoding a real model does. The two ops of a pair alternate, each time the
median of 7 timed loops; the speedup is their ratio in the same run. GB/s counts the weight's bytes
(codes, scales, zeros). Two tables: 2 threads timed by the wall clock, and 1 thread timed by its own
CPU time (`time.thread_time`), which a busy machine disturbs less: a 2-thread call waits for both
threads, so on a loaded machine it can wait out a scheduler time slice (ms). Writes
benchmarks/results/cpu_gemv.md.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from qcompile.formats import pack_nibbles
from qcompile.lowering import cpu_kernels

RESULTS = Path(__file__).parent / "results"
SHAPES = [(576, 576, "q/o_proj"), (576, 192, "k/v_proj"), (576, 1536, "gate/up"), (1536, 576, "down"),
          (576, 49152, "lm_head")]
GROUP = 64
COLD_BYTES = 100 * 2**20
OPS = torch.ops.qcompile


def int4_weight(n, k):
    codes = torch.randint(0, 16, (n, k))
    scales = (torch.rand(n, k // GROUP) * 0.01 + 0.001).bfloat16()
    return pack_nibbles(codes), scales, torch.randint(0, 16, (n, k // GROUP)).half()


def int8_weight(n, k):
    return torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) * 0.01 + 0.001).bfloat16()


CASES = {  # weight: (make, its bytes, float-activation op, int8-activation op)
    "int4 g64": (int4_weight, lambda n, k: n * k // 2 + 4 * n * (k // GROUP),
                 lambda x, w: OPS.int4_mm_kernel(x, *w, GROUP), lambda x, w: OPS.int4_mm_a8_kernel(x, *w, GROUP)),
    "int8/channel": (int8_weight, lambda n, k: n * k + 2 * n,
                     lambda x, w: OPS.int8_mm_kernel(x, *w), lambda x, w: OPS.int8_mm_a8_kernel(x, *w, x.shape[-1])),
}


def time_pair(fa, fb, weights, x, clock, runs=7):
    """Seconds per call of fa and fb over `weights` (cycled), alternating timed loops; medians."""
    loops = max(50, 2 * len(weights))
    times = ([], [])
    for f in (fa, fb):
        for w in weights:
            f(x, w)
    for _ in range(runs):
        for f, t in zip((fa, fb), times):
            t0 = clock()
            for i in range(loops):
                f(x, weights[i % len(weights)])
            t.append((clock() - t0) / loops)
    return statistics.median(times[0]), statistics.median(times[1])


def table(threads: int, clock) -> list[str]:
    torch.set_num_threads(threads)
    rows = []
    for k, n, name in SHAPES:
        x = torch.randn(1, k)
        for weight, (make, nbytes, a16, a8) in CASES.items():
            b = nbytes(n, k)
            weights = [make(n, k) for _ in range(max(1, COLD_BYTES // b))]
            for state, ws in (("L3", weights[:1]), ("memory", weights)):
                if state == "L3" and b > 16 * 2**20:
                    continue  # the int8 lm_head never fits
                t16, t8 = time_pair(a16, a8, ws, x, clock)
                rows.append(f"| {k}x{n} ({name}) | {weight} | {state} | {t16 * 1e6:.1f} | {t8 * 1e6:.1f} | "
                            f"{b / t16 / 1e9:.1f} | {b / t8 / 1e9:.1f} | {t16 / t8:.2f}x |")
                print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def main():
    assert cpu_kernels.load(), "the CPU kernels did not build"
    torch.manual_seed(0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    text = [f"# Decode GEMV, float vs int8 activations, CPU (torch {torch.__version__})", "",
            f"{cpu}; M = 1 row of x. A16 = `int4_mm_kernel` / `int8_mm_kernel` (fp32 FMA), A8 = `int4_mm_a8_kernel`",
            "/ `int8_mm_a8_kernel` (int8 activations, vpdpbusd); median microseconds per call; GB/s of weight bytes;",
            "speedup = A16 / A8, measured in the same run."]
    for threads, clock, label in ((2, time.perf_counter, "wall clock"), (1, time.thread_time, "the thread's CPU time")):
        before = Path("/proc/loadavg").read_text().strip()
        rows = table(threads, clock)
        after = Path("/proc/loadavg").read_text().strip()
        text += ["", f"## {threads} thread{'s' * (threads > 1)}, timed by {label}", "",
                 f"`/proc/loadavg` before: `{before}`, after: `{after}`", "",
                 "| K x N | weight | weights from | A16 (us) | A8 (us) | A16 GB/s | A8 GB/s | speedup |",
                 "|---|---|---|---:|---:|---:|---:|---:|", *rows]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_gemv.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
