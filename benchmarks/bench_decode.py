"""End-to-end greedy decode on the default model: float eager, float Inductor, qcompile, torchao.

    python benchmarks/bench_decode.py [--tokens 64] [--repeats 5] [--model smollm2]
    python benchmarks/bench_decode.py --arch llama-1b     # random weights, no files needed (GPU)
    python benchmarks/bench_decode.py --checkpoint DIR ... # also models saved by qcompile.save

Every variant runs in this one process on a fresh copy of the model, so the ratios compare like
with like (timings on a shared 2-core machine drift; compare ratios from one run). Per variant:
  first token  time of the first generate(max_new_tokens=1): quantization + compile of the prefill graph
  warm-up      the next generate of --tokens tokens (compiles the decode graphs)
  tok/s        --tokens / median time of --repeats generates after that
Writes benchmarks/results/decode_<device>[_<arch>][_<name>].md and .json. torchao runs when it is installed.
--arch builds a named architecture with random weights (speed does not depend on the values; the
text column is then meaningless) for machines without the model files, such as the GPU machine.
Float baselines run in float32 on CPU and bfloat16 on CUDA (--dtype overrides).
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
from qcompile.tools.evaluate import model_bytes
from qcompile.tools.models import load_model

RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the Roman Empire is"


# Random-weight architectures (Hugging Face Llama configs) for --arch.
ARCHS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}


def random_model(arch: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(LlamaConfig(**ARCHS[arch], max_position_embeddings=2048)).to(dtype).eval()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(name, make, tok, args, device):
    torch._dynamo.reset()  # each variant compiles from scratch, within the recompile limit
    model = make()
    if tok is None:
        ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
        gen = dict(do_sample=False, pad_token_id=0)
    else:
        ids = tok(PROMPT, return_tensors="pt").input_ids.to(device)
        gen = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **gen)
        synchronize(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **gen)
        synchronize(device)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **gen)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    row = {"variant": name, "first_token_s": round(first, 1), "warmup_s": round(warm, 1),
           "tok_s": round(args.tokens / statistics.median(times), 1),
           "weight_MiB": round(model_bytes(getattr(model, "_orig_mod", model))["total"] / 2**20, 1),
           "text": "-" if tok is None else tok.decode(out[0, ids.shape[1]:ids.shape[1] + 16])}
    print(f"  {name}: {row}", flush=True)
    return row


def variants(args, device):
    def fresh(dtype=args.dtype):
        m = random_model(args.arch, dtype, device) if args.arch else load_model(args.model, dtype)[0]
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

    def checkpoint(path):
        def load():
            m = fresh()
            qcompile.load(m, path)
            return torch.compile(m, backend=qcompile)
        return load

    fname = str(args.dtype).removeprefix("torch.")
    out = [(f"{fname} eager", fresh), (f"{fname} Inductor", inductor),
           ("qcompile (backend=qcompile)", qcompile_backend),
           ("qcompile (quantize + compile)", qcompile_ahead)]
    out += [(f"qcompile checkpoint {Path(c).name}", checkpoint(c)) for c in args.checkpoint or ()]
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
    p.add_argument("--arch", choices=sorted(ARCHS), help="random weights of this architecture instead of --model")
    p.add_argument("--dtype", help="float baseline dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", help="run only variants whose name contains one of these")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk caches")
    p.add_argument("--checkpoint", nargs="*", help="folders saved by qcompile.save (e.g. by bench_methods.py "
                   "--save): each is loaded into a fresh model and compiled with backend=qcompile")
    p.add_argument("--name", help="suffix of the results file (decode_<device>_<name>.md)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tok = None if args.arch else load_model(args.model)[1]
    rows = []
    for name, make in variants(args, device):
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"{name} ...", flush=True)
        rows.append(measure(name, make, tok, args, device))
    base = rows[0]["tok_s"] if rows else 1
    ind = next((r["tok_s"] for r in rows if r["variant"].endswith(" Inductor")), None)
    what = f"{args.arch} (random weights)" if args.arch else args.model
    lines = [f"# Greedy decode, {what}, {args.tokens} new tokens, median of {args.repeats} "
             f"({device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "",
             f"| variant | tok/s | vs {rows[0]['variant'] if rows else 'eager'} | vs float Inductor | first token (s) | warm-up (s) | weights MiB | text |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_ind = f"{r['tok_s'] / ind:.2f}x" if ind else "-"
        lines.append(f"| {r['variant']} | {r['tok_s']} | {r['tok_s'] / base:.2f}x | {vs_ind} | {r['first_token_s']} "
                     f"| {r['warmup_s']} | {r['weight_MiB']} | {r['text']!r} |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    stem = f"decode_{device.type}" + (f"_{args.arch}" if args.arch else "") + (f"_{args.name}" if args.name else "")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
