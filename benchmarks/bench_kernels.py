"""Quantized matmul kernels vs float, across batch sizes 1-64, on this machine's device.

    python benchmarks/bench_kernels.py            # CPU here; the same script on a CUDA machine
    python benchmarks/bench_kernels.py --lut      # CUDA: adds a column for the LUT-mpGEMM kernel
    python benchmarks/bench_kernels.py --shapes 4096 --batches 1 16   # a subset (substring of the names)

CPU:  qcompile's int4 kernel op (as compiled graphs call it; float32 compute) vs float32 and bf16
      `F.linear`, and torch's own CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, bf16 only).
      Each call reads a different copy of the weights (> 100 MB in all), so weights come from
      memory, not cache, as in decoding a real model. Median of 7 runs of a timed loop.
CUDA: the Triton int4 kernel (`qcompile::int4_mm`) vs fp16 `torch.mm` (cuBLAS): CUDA-graph
      replays over weight copies larger than L2 (`do_bench_cudagraph`, median), so neither
      Python launch overhead nor cache residency counts. `--lut` adds `qcompile::lut_mm` (4-bit
      codes, fp16 tables); benchmarks/bench_lut.py compares the two kernels in detail.
Shapes: SmolLM2-135M's linears (hidden 576) and Llama-7B's (4096/11008); group size 64 on CPU
(576 is not a multiple of 128), 128 on CUDA. Writes benchmarks/results/kernels_<device>.md/.png.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qcompile
from qcompile.formats import Int4Weight, pack_nibbles

RESULTS = Path(__file__).parent / "results"
BATCHES = [1, 2, 4, 8, 16, 32, 64]
SHAPES = {  # name: (N out, K in)
    "576x576 (q/o_proj)": (576, 576), "1536x576 (gate/up)": (1536, 576), "576x1536 (down)": (576, 1536),
    "49152x576 (lm_head)": (49152, 576), "4096x4096": (4096, 4096), "11008x4096": (11008, 4096),
    "4096x11008": (4096, 11008),
}
COLD_BYTES = 100 * 2**20


def random_int4(n, k, group, device, scale_dtype):
    codes = torch.randint(0, 16, (n, k), device=device)
    scales = (torch.rand(n, k // group, device=device) * 0.01 + 0.001).to(scale_dtype)
    return Int4Weight(pack_nibbles(codes), scales, torch.full_like(scales, 8.0), group)


def _cpu_time(fns, x_by_copy) -> float:
    """Seconds per call, cycling through weight copies; median of 7 timed loops."""
    n = len(fns)
    loops = max(20, 2 * n)
    for i in range(n):
        fns[i](x_by_copy)
    runs = []
    for _ in range(7):
        t0 = time.perf_counter()
        for i in range(loops):
            fns[i % n](x_by_copy)
        runs.append((time.perf_counter() - t0) / loops)
    return statistics.median(runs)


def bench_cpu(n, k, m):
    group = 64
    copies = max(1, min(16, COLD_BYTES // (n * k * 4)))
    w32 = [torch.randn(n, k) * 0.02 for _ in range(copies)]
    w16 = [w.bfloat16() for w in w32]
    q = [random_int4(n, k, group, "cpu", torch.bfloat16) for _ in range(copies)]
    kernel = torch.ops.qcompile.int4_mm_kernel.default
    torch.ops.qcompile.int4_mm(torch.randn(1, k), q[0].qweight, q[0].scales, q[0].zeros, group)  # builds/loads
    tiny = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes().int(), 2) for w in q]
    sz = torch.rand(k // group, n, 2).bfloat16()
    x = torch.randn(m, k)
    xb = x.bfloat16()
    return {
        "int4": _cpu_time([lambda x, w=w: kernel(x, w.qweight, w.scales, w.zeros, group) for w in q], x),
        "fp32": _cpu_time([lambda x, w=w: F.linear(x, w) for w in w32], x),
        "bf16": _cpu_time([lambda x, w=w: F.linear(x, w) for w in w16], xb),
        "torch int4 (bf16)": _cpu_time([lambda x, p=p: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, group, sz)
                                        for p in tiny], xb),
    }


def bench_cuda(n, k, m, lut=False):
    """Kernel time per call. Each timed call runs a CUDA graph over enough weight copies (> 4x the
    L2 cache) that weights come from HBM, as in decoding, and launch overhead is left out."""
    import triton.testing

    group = 128 if k % 128 == 0 else 64
    copies = max(2, min(64, 256 * 2**20 // (n * k * 2)))
    q = [random_int4(n, k, group, "cuda", torch.float16) for _ in range(copies)]
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    op = torch.ops.qcompile.int4_mm

    def int4():
        for w in q:
            op(x, w.qweight, w.scales, w.zeros, group)

    def fp16():
        for w in w16:
            torch.mm(x, w.t())

    int4()  # autotune outside the graph and the timing
    ms = lambda f: triton.testing.do_bench_cudagraph(f, rep=200, return_mode="median") * 1e-3 / copies  # noqa: E731
    times = {"int4": ms(int4), "fp16": ms(fp16)}
    if lut:  # as many copies as int4 (the same code bytes), so the same share of them sits in L2
        luts = [(pack_nibbles(torch.randint(0, 16, (n, k), device="cuda")),
                 (torch.randn(n, 16, device="cuda") * 0.02).half()) for _ in range(copies)]

        def lut_mm():
            for codes, tables in luts:
                torch.ops.qcompile.lut_mm(x, codes, tables)

        lut_mm()
        times["lut"] = ms(lut_mm)
    return times


def cuda_floors(rows) -> list[str]:
    """The GPU floors on the Llama-7B shapes: int4 >= 2.5x fp16 at M = 1, >= 1.5x at M = 16,
    >= 1.0x for every M <= 64."""
    out = []
    for label, m, t in rows:
        if "x" not in label or label.startswith(("576", "1536", "49152")):
            continue
        speedup = t["fp16"] / t["int4"]
        floor = 2.5 if m == 1 else 1.5 if m == 16 else 1.0
        out.append(f"{label} M={m}: {speedup:.2f}x (floor {floor}x) {'met' if speedup >= floor else 'MISSED'}")
    return out


def int4_bytes(n, k, m, group=64) -> int:
    """The fewest bytes an int4 matmul moves: packed codes, fp16 scales and zeros, x and y in fp16."""
    return n * k // 2 + 2 * 2 * n * (k // group) + 2 * m * (k + n)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lut", action="store_true", help="CUDA: also time the LUT-mpGEMM kernel (qcompile::lut_mm)")
    parser.add_argument("--shapes", nargs="*", help="only the shapes whose name contains one of these")
    parser.add_argument("--batches", nargs="*", type=int, default=BATCHES)
    args = parser.parse_args()
    shapes = {k: v for k, v in SHAPES.items() if not args.shapes or any(s in k for s in args.shapes)}
    cuda = torch.cuda.is_available()
    if args.lut and not cuda:
        print("--lut: the LUT-mpGEMM kernel is CUDA-only here; timing the CPU kernels without it")
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    base = "fp16" if cuda else "fp32"
    rows = []
    for label, (n, k) in shapes.items():
        for m in args.batches:
            t = bench_cuda(n, k, m, lut=args.lut) if cuda else bench_cpu(n, k, m)
            rows.append((label, m, t))
            print(f"{label:22} M={m:3d} " + "  ".join(f"{v}: {s * 1e6:9.1f} us" for v, s in t.items())
                  + f"  speedup vs {base}: {t[base] / t['int4']:.2f}x", flush=True)
    variants = list(rows[0][2])
    lines = [f"# int4 kernel vs float, {name} (torch {torch.__version__})", "",
             "Times in microseconds per call (median); speedup = float time / int4 time.", "",
             "| weight (N x K) | batch | " + " | ".join(f"{v} (us)" for v in variants)
             + f" | speedup vs {base} |" + (" speedup vs torch int4 |" if not cuda else " int4 GB/s |"),
             "|---|---:|" + "---:|" * (len(variants) + 2)]
    for label, m, t in rows:
        n, k = SHAPES[label]
        group = 128 if k % 128 == 0 else 64
        extra = (f" {t['torch int4 (bf16)'] / t['int4']:.2f}x |" if not cuda
                 else f" {int4_bytes(n, k, m, group) / t['int4'] / 1e9:.0f} |")
        lines.append(f"| {label} | {m} | " + " | ".join(f"{t[v] * 1e6:.1f}" for v in variants)
                     + f" | {t[base] / t['int4']:.2f}x |" + extra)
    if cuda:
        lines += ["", "Floors (issue 15, Llama-7B shapes): " + "; ".join(cuda_floors(rows))]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"kernels_{device}.md").write_text(table)
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: table only")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in shapes:
        pts = [(m, t[base] / t["int4"]) for lab, m, t in rows if lab == label]
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="batch (rows of x)", ylabel=f"speedup of int4 over {base}",
           title=f"qcompile int4 vs {base} matmul — {name}")
    ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"kernels_{device}.png", dpi=120)
    print(f"wrote {RESULTS / f'kernels_{device}.md'} and .png")


if __name__ == "__main__":
    main()
