"""End-to-end greedy decode on the default model: float eager, float Inductor, qcompile, torchao.

    python benchmarks/bench_decode.py [--tokens 64] [--repeats 5] [--model smollm2]

Every variant runs in this one process on a fresh copy of the model, so the ratios compare like
with like (timings on a shared 2-core machine drift; compare ratios from one run). Per variant:
  first token  time of the first generate(max_new_tokens=1): quantization + compile of the prefill graph
  warm-up      the next generate of --tokens tokens (compiles the decode graphs)
  tok/s        --tokens / median time of --repeats generates after that
Writes benchmarks/results/decode_<device>.md and .json. torchao runs when it is installed.
Inductor's on-disk caches are off (a warm cache would hide compile time); --warm-cache keeps them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--warm-cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # must precede importing torch

import torch

import qcompile
from qcompile.demo import model_bytes
from qcompile.models import load_model

RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the Roman Empire is"


def measure(name, make, tok, args, device):
    torch._dynamo.reset()  # each variant compiles from scratch, within the recompile limit
    model = make()
    ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
    gen = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **gen)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **gen)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **gen)
            times.append(time.perf_counter() - t0)
    row = {"variant": name, "first_token_s": round(first, 1), "warmup_s": round(warm, 1),
           "tok_s": round(args.tokens / statistics.median(times), 1),
           "weight_MiB": round(model_bytes(getattr(model, "_orig_mod", model))["total"] / 2**20, 1),
           "text": tok.decode(out[0, ids.shape[1]:ids.shape[1] + 16])}
    print(f"  {name}: {row}", flush=True)
    return row


def variants(args, device):
    def fresh(dtype=torch.float32):
        m, _ = load_model(args.model, dtype)
        return m.to(device)

    def inductor():
        m = fresh()
        m.compile()  # nn.Module.compile: generate() then runs the compiled forward
        return m

    def qcompile_backend():
        return torch.compile(fresh(), backend=qcompile)

    def qcompile_ahead():
        m = fresh()
        qcompile.quantize(m, progress=False)
        return torch.compile(m, backend=qcompile)

    out = [("float32 eager", fresh), ("float32 Inductor", inductor),
           ("qcompile (backend=qcompile)", qcompile_backend),
           ("qcompile (quantize + compile)", qcompile_ahead)]
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        def torchao_int4():
            # torchao's CPU int4 path (tinygemm); its fp32 path is slow, so run it in bf16 as torchao does
            m = fresh(torch.bfloat16)
            quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=64))
            m.compile()
            return m

        out.append(("torchao int4 g64 bf16 + Inductor", torchao_int4))
    except ImportError:
        print("torchao not installed: skipping its row")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", help="run only variants whose name contains one of these")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk caches")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, tok = load_model(args.model)
    rows = []
    for name, make in variants(args, device):
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"{name} ...", flush=True)
        rows.append(measure(name, make, tok, args, device))
    base = rows[0]["tok_s"] if rows else 1
    ind = next((r["tok_s"] for r in rows if "Inductor" in r["variant"] and "float" in r["variant"]), None)
    lines = [f"# Greedy decode, {args.model}, {args.tokens} new tokens, median of {args.repeats} "
             f"({device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "",
             "| variant | tok/s | vs fp32 eager | vs fp32 Inductor | first token (s) | warm-up (s) | weights MiB | text |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_ind = f"{r['tok_s'] / ind:.2f}x" if ind else "-"
        lines.append(f"| {r['variant']} | {r['tok_s']} | {r['tok_s'] / base:.2f}x | {vs_ind} | {r['first_token_s']} "
                     f"| {r['warmup_s']} | {r['weight_MiB']} | {r['text']!r} |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode_{device.type}.md").write_text(table + "\n")
    (RESULTS / f"decode_{device.type}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
