"""LUT-mpGEMM (`qcompile::lut_mm`) vs fp16 `torch.mm` (cuBLAS) and the int4 kernel, on a CUDA GPU.

    PYTHONPATH=. python benchmarks/bench_lut.py           # 4 shapes x batch 1, 4, 16, 64
    PYTHONPATH=. python benchmarks/bench_lut.py --quick   # the judged point only: 4096x11008, batch 1

Kernel time per call with the method of bench_kernels.py: each timed call is a CUDA-graph replay
over enough weight copies (> 4x the L2 cache) that weights come from HBM, as in decoding, and
launch overhead is left out (`do_bench_cudagraph`, median). The ops are called as eager code
calls them (`torch.ops.qcompile.lut_mm` / `int4_mm`, autotuned before the timing).
Shapes are N x K (out x in features), as bench_kernels.py names them: 4096x11008 is Llama-7B's
MLP down projection (K = 11008), 11008x4096 its up/gate projection.
LUT weights: 4-bit codes, fp16 tables (3-bit codes are stored as nibbles too: same bytes, same
kernel). int4: group 128, fp16 scales and zeros. Activations fp16.
Writes benchmarks/results/lut_cuda.md; exits non-zero if a floor is missed: at batch 1 on
4096x11008, LUT >= 2.5x fp16 torch.mm and within 1.3x of the int4 kernel's time.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import int4_bytes, random_int4  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = {"4096x4096": (4096, 4096), "4096x11008": (4096, 11008), "11008x4096": (11008, 4096),
          "8192x8192": (8192, 8192)}  # name: (N out, K in)
BATCHES = [1, 4, 16, 64]
FLOOR_SHAPE, FLOOR_BATCH = "4096x11008", 1
FLOOR_VS_FP16, FLOOR_VS_INT4 = 2.5, 1.3


def random_lut(n, k, bits=4):
    from qcompile.formats import LutWeight, pack_nibbles

    codes = torch.randint(0, 2**bits, (n, k), device="cuda")
    tables = (torch.randn(n, 2**bits, device="cuda") * 0.02).half()
    return LutWeight(pack_nibbles(codes), tables, bits)


def lut_bytes(n, k, m, bits=4) -> int:
    """The fewest bytes a LUT matmul moves: nibble codes, fp16 tables, x and y in fp16."""
    return n * k // 2 + 2 * n * 2**bits + 2 * m * (k + n)


def bench_shape(n, k, m) -> dict:
    """Seconds per call of each kernel on an [m, k] x [k, n] product, weights from HBM."""
    import triton.testing

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)

    def copies(nbytes):
        return max(2, min(64, -(-4 * l2 // nbytes)))

    luts = [random_lut(n, k) for _ in range(copies(n * k // 2))]
    int4s = [random_int4(n, k, 128, "cuda", torch.float16) for _ in range(copies(n * k // 2))]
    w16s = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies(n * k * 2))]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    lut_op, int4_op = torch.ops.qcompile.lut_mm, torch.ops.qcompile.int4_mm

    def lut():
        for w in luts:
            lut_op(x, w.codes, w.tables)

    def int4():
        for w in int4s:
            int4_op(x, w.qweight, w.scales, w.zeros, 128)

    def fp16():
        for w in w16s:
            torch.mm(x, w.t())

    times = {}
    for name, fn, count in (("lut", lut, len(luts)), ("int4", int4, len(int4s)), ("fp16", fp16, len(w16s))):
        fn()  # autotune outside the graph and the timing
        times[name] = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") * 1e-3 / count
    del luts, int4s, w16s
    torch.cuda.empty_cache()
    return times


@torch.no_grad()
def main(argv=None) -> int:
    args = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args.add_argument("--quick", action="store_true", help=f"only {FLOOR_SHAPE} at batch {FLOOR_BATCH}")
    args = args.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lut.py times the CUDA kernels and needs a CUDA GPU; none is available here. "
              "(The CPU path of qcompile::lut_mm is benchmarked elsewhere.)", file=sys.stderr)
        return 2

    shapes = {FLOOR_SHAPE: SHAPES[FLOOR_SHAPE]} if args.quick else SHAPES
    batches = [FLOOR_BATCH] if args.quick else BATCHES
    name = torch.cuda.get_device_name()
    rows = []
    for label, (n, k) in shapes.items():
        for m in batches:
            t = bench_shape(n, k, m)
            rows.append((label, m, t))
            print(f"{label:11} M={m:3d}  " + "  ".join(f"{v}: {s * 1e6:7.1f} us" for v, s in t.items())
                  + f"  lut vs fp16 {t['fp16'] / t['lut']:.2f}x, lut/int4 time {t['lut'] / t['int4']:.2f}",
                  flush=True)

    lines = [f"# LUT-mpGEMM vs fp16 torch.mm and the int4 kernel, {name} (torch {torch.__version__})", "",
             "Weight N x K (out x in), fp16 activations; LUT: 4-bit codes, fp16 tables; int4: group 128. "
             "Microseconds per call (median, CUDA graphs over weight copies > 4x L2).", "",
             "| weight (N x K) | batch | lut (us) | int4 (us) | fp16 (us) | lut speedup vs fp16 | lut / int4 time "
             "| lut GB/s | int4 GB/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, m, t in rows:
        n, k = SHAPES[label]
        lut_gbs, int4_gbs = lut_bytes(n, k, m) / t["lut"] / 1e9, int4_bytes(n, k, m, 128) / t["int4"] / 1e9
        lines.append(f"| {label} | {m} | {t['lut'] * 1e6:.1f} | {t['int4'] * 1e6:.1f} | {t['fp16'] * 1e6:.1f} "
                     f"| {t['fp16'] / t['lut']:.2f}x | {t['lut'] / t['int4']:.2f} | {lut_gbs:.0f} | {int4_gbs:.0f} |")
    floor = next(t for label, m, t in rows if label == FLOOR_SHAPE and m == FLOOR_BATCH)
    vs_fp16, vs_int4 = floor["fp16"] / floor["lut"], floor["lut"] / floor["int4"]
    met = vs_fp16 >= FLOOR_VS_FP16 and vs_int4 <= FLOOR_VS_INT4
    lines += ["", f"Floors at {FLOOR_SHAPE}, batch {FLOOR_BATCH}: LUT {vs_fp16:.2f}x fp16 torch.mm (floor "
              f"{FLOOR_VS_FP16}x), {vs_int4:.2f}x the int4 kernel's time (floor {FLOOR_VS_INT4}x): "
              + ("met." if met else "**missed**.")]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "lut_cuda.md").write_text(table)
        print(f"wrote {RESULTS / 'lut_cuda.md'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
