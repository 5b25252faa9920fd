"""Decode attention on CPU inside a compiled SmolLM2 decode step: qcompile's decode kernel vs SDPA.

    python benchmarks/bench_decode_attention.py [--tokens 128] [--rounds 5] [--threads 2] [--cache 256 2048]

The default recipe (`qcompile.quantize`, then backend=qcompile on a static KV cache, one compiled
one-token step) compiled twice in one process (Dynamo reset before each variant's turn): with the CPU attention path's `decode_attention_kernel`
(the default) and with `qcompile.ops.attention.DECODE_MAX_ROWS = 0`, which sends every call to SDPA on
the grouped query rows, as before the kernel existed. The same weights; the bare greedy loops of the
two alternate (A, B, A, B, ...: both see the same machine load). Per static-cache length (HF's static
cache attends over all its positions, masked): median tokens/s, the median of the paired ratios, whether
the tokens agree, and a torch.profiler table of one step of each. Writes
benchmarks/results/decode_attention_cpu.md.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import qcompile  # noqa: E402
from qcompile.ops import attention  # noqa: E402
from qcompile.tools.models import load_model  # noqa: E402
from eval_w4a8 import PROMPTS, bare_loop, compile_decode, profile_step  # noqa: E402


def with_decode_rows(model, rows: int):
    """Every call of `model` (and so every trace and recompile it triggers: the graphs read the value
    when they are traced) runs with attention.DECODE_MAX_ROWS = rows."""
    forward = model.forward

    def call(*a, **kw):
        saved, attention.DECODE_MAX_ROWS = attention.DECODE_MAX_ROWS, rows
        try:
            return forward(*a, **kw)
        finally:
            attention.DECODE_MAX_ROWS = saved

    model.forward = call
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", type=int, nargs="+", default=[256, 2048], help="static cache lengths")
    args = p.parse_args()
    from transformers import StaticCache

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    load_before = open("/proc/loadavg").read().split()[:3]
    model, tok = load_model("smollm2")
    qcompile.quantize(model, qcompile.default_config(model), progress=False)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    variants = {}
    for name, rows in (("SDPA (grouped rows)", 0), ("decode_attention_kernel", attention.DECODE_MAX_ROWS)):
        variants[name] = with_decode_rows(compile_decode(copy.deepcopy(model)), rows)
    lines = [f"# Decode attention in a compiled SmolLM2-135M step (CPU, {args.threads} threads, torch "
             f"{torch.__version__})", "", "Written by `python benchmarks/bench_decode_attention.py "
             + " ".join(sys.argv[1:]) + "`; default recipe, quantize + compile, static KV cache, bare greedy "
             f"loop of {args.tokens} tokens, {args.rounds} alternating rounds; /proc/loadavg before: "
             f"{' '.join(load_before)}.", "",
             "| static cache length | SDPA tok/s | decode kernel tok/s | kernel / SDPA (median of paired rounds) "
             "| tokens identical |", "|---|---|---|---|---|"]
    profiles = []
    for length in args.cache:
        caches = {n: StaticCache(config=m.config, max_cache_len=length) for n, m in variants.items()}
        times = {n: [] for n in variants}
        tokens = {}
        for r in range(args.rounds + 1):  # round 0 warms up
            for n, m in variants.items():
                # Dynamo would serve one variant's graph to the other (same code, same guards): start
                # afresh; the compile is a hit in Inductor's cache, whose key holds DECODE_MAX_ROWS
                torch._dynamo.reset()
                bare_loop(m, caches[n], ids, 2)
                t0 = time.perf_counter()
                tokens[n] = bare_loop(m, caches[n], ids, args.tokens)
                if r:
                    times[n].append(time.perf_counter() - t0)
            print(f"cache {length} round {r}: " + ", ".join(f"{n} {args.tokens / t[-1]:.1f} tok/s"
                                                            for n, t in times.items() if t), flush=True)
        a, b = times.values()
        paired = statistics.median(x / y for x, y in zip(a, b))
        same = torch.equal(*tokens.values())
        lines.append(f"| {length} | {args.tokens / statistics.median(a):.1f} | {args.tokens / statistics.median(b):.1f} "
                     f"| {paired:.3f}x | {same} |")
        for n, m in variants.items():
            torch._dynamo.reset()
            profiles += ["", f"One step, static cache {length}, {n} (torch.profiler, self CPU time, 20 steps):", "",
                         profile_step(m, caches[n], ids, top=8)]
    lines.append("")
    lines.append(f"/proc/loadavg after: {' '.join(open('/proc/loadavg').read().split()[:3])}.")
    lines += profiles
    out = ROOT / "benchmarks" / "results" / "decode_attention_cpu.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
