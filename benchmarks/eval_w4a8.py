"""W4A8 vs W4A16 on CPU for the default recipe on SmolLM2-135M: greedy-token parity and perplexity.

    python benchmarks/eval_w4a8.py parity [--prompts 3] [--tokens 256]
    python benchmarks/eval_w4a8.py ppl --split tune [--int8-groups 64 576 32] [--max-windows N]
    python benchmarks/eval_w4a8.py ppl --split report
    python benchmarks/eval_w4a8.py speed [--tokens 128] [--repeats 5]

One quantization (`qcompile.quantize`, default recipe); W4A16 and W4A8 are the same weights with the
activations cpu_activations="float" / "int8" give each layer (`QuantLinear.set_cpu_activations`).
parity: greedy generate (eager, dynamic cache) from each prompt under both; per prompt the first step
  where the tokens differ and there the logit gap between the two tokens under the W4A16 model (a near-tie
  when small against the usual top-2 gap); and teacher-forced: on the W4A16 sequence, the steps where W4A8's
  top-1 differs (no cascade after a first split). --float: the float model against W4A16 likewise.
ppl: `window_nll` on the development set's windows. A window runs as one prefill, which the a8 ops send to
  the float kernel (> 8 rows); to score what decode computes, every int8-activation layer runs on chunks of
  at most 8 rows (`decode_rows`): activations are quantized per row, so this is what token-by-token decode
  multiplies. Paired per window: delta NLL (W4A8 - W4A16), mean +- standard error, perplexity ratio.
speed: both compiled (backend=qcompile, static cache, one-token forward compiled) and timed in alternation,
  a bare greedy loop and HF generate; then a torch.profiler table of one decode step each.
--int8-groups: W4A8 rows with int8 layers' activation group (lm_head, last block) at each size (576: per token;
  0: int8 layers keep float activations); with --head-only, to the lm_head alone.
Prints markdown tables; writes benchmarks/results/w4a8_<what>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import torch

import qcompile
from qcompile.config import cpu_activations_for
from qcompile.modules import QuantLinear
from qcompile.ops import linear as ops_linear
from qcompile.tools import devset
from qcompile.tools.evaluate import window_nll
from qcompile.tools.models import load_model

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["The history of the Roman Empire is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Photosynthesis is the process by which plants"]


def set_activations(model, value: str, int8_group: int | None = None, head_only: bool = False) -> None:
    """Every QuantLinear of `model` to cpu_activations=value (int8 layers' activation group: int8_group;
    0: int8 layers keep float activations; head_only: int8 layers other than the lm_head do)."""
    saved = ops_linear.INT8_ACT_GROUP
    ops_linear.INT8_ACT_GROUP = int8_group or saved
    try:
        for path, m in model.named_modules():
            if isinstance(m, QuantLinear):
                floating = m.layout == "int8" and (int8_group == 0 or (head_only and path != "lm_head"))
                m.set_cpu_activations("float" if floating else value)
    finally:
        ops_linear.INT8_ACT_GROUP = saved


def as_configured(model, value: str) -> None:
    """Every QuantLinear as a config with cpu_activations=value makes it (`cpu_activations_for`)."""
    for path, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.set_cpu_activations(cpu_activations_for(value, path, m.layout))


@contextlib.contextmanager
def decode_rows(model):
    """Int8-activation layers run their op on at most A8_MAX_ROWS rows at a time (as decode does)."""
    rows = ops_linear.A8_MAX_ROWS
    patched = [m for m in model.modules() if isinstance(m, QuantLinear) and m.activations == "int8"]

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        y = torch.cat([QuantLinear.forward(self, c) for c in flat.split(rows)])
        return y.reshape(*x.shape[:-1], y.shape[-1])

    for m in patched:
        m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def generate(model, ids, tokens, tok):
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.cat(out.logits).float()


def teacher_forced(model, seq, n, tokens, ref_logits):
    """Steps where `model`'s argmax on the reference sequence (prompt n tokens + reference tokens) differs
    from the reference's token, and the largest reference-logit gap among them."""
    with decode_rows(model):  # as decode multiplies each row (a no-op for float layers)
        logits = model(seq[None]).logits[0, n - 1:n - 1 + tokens].float()
    ref = seq[n:n + tokens]
    got = logits.argmax(-1)
    bad = (got != ref).nonzero().flatten()
    gaps = ref_logits[bad, ref[bad]] - ref_logits[bad, got[bad]]
    return int(bad.numel()), round(float(gaps.max()), 3) if bad.numel() else None


def parity(args, model, tok):
    """Free-running greedy generations W4A16 vs W4A8 (first divergence, near-tie check) and teacher-forced
    top-1 agreement on the W4A16 sequence; with --float, the float model against W4A16 the same way."""
    ref_model = load_model()[0] if args.float else None
    rows = []
    for p in PROMPTS[:args.prompts]:
        ids = tok(p, return_tensors="pt").input_ids
        n = ids.shape[1]
        as_configured(model, "float")
        a16, l16 = generate(model, ids, args.tokens, tok)
        seq = torch.cat([ids[0], a16])
        row = {"prompt": p, "tokens": args.tokens}
        others = {"w4a8": model} | ({"float": ref_model} if ref_model is not None else {})
        for name, m in others.items():
            if name == "w4a8":
                as_configured(model, "int8")
            other, lo = generate(m, ids, args.tokens, tok)
            diff = (a16 != other).nonzero()
            first = int(diff[0]) if diff.numel() else None
            row[name] = {"agree": int((a16 == other).sum()), "first_divergence": first}
            if first is not None:
                x, y = int(a16[first]), int(other[first])
                row[name].update(gap_w4a16=round(float(l16[first, x] - l16[first, y]), 3),
                                 gap_other=round(float(lo[first, y] - lo[first, x]), 3),
                                 tokens=[tok.decode([x]), tok.decode([y])],
                                 top2_gap_median_w4a16=round(float((lambda t: (t[:, 0] - t[:, 1]).median())(
                                     l16[:first + 1].topk(2).values)), 3))
            row[name]["forced_differ"], row[name]["forced_max_gap"] = teacher_forced(m, seq, n, args.tokens, l16)
            as_configured(model, "float")
        print(row, flush=True)
        rows.append(row)
    lines = ["| prompt | vs W4A16 | new tokens | first divergence (step) | W4A16 logit gap there | its logit gap "
             "there | tokens (W4A16 / it) | median W4A16 top-2 gap before | teacher-forced: steps whose top-1 "
             "differs | their largest W4A16 gap |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name in ("w4a8", "float"):
            if name not in r:
                continue
            v = r[name]
            lines.append(f"| {r['prompt'][:32]!r} | {name} | {r['tokens']} | {v['first_divergence']} | "
                         f"{v.get('gap_w4a16', '-')} | {v.get('gap_other', '-')} | {v.get('tokens', '-')} | "
                         f"{v.get('top2_gap_median_w4a16', '-')} | {v['forced_differ']} / {r['tokens']} | "
                         f"{v['forced_max_gap']} |")
    return rows, "\n".join(lines)


def perplexity(args, model, tok):
    windows = devset.windows(tok, args.split).ids
    if args.max_windows:
        windows = windows[:args.max_windows]
    set_activations(model, "float")
    base = window_nll(model, windows, desc="W4A16")
    rows = [{"variant": "W4A16 (cpu_activations='float')", "ppl": math.exp(base.mean().item())}]
    for g in args.int8_groups:
        set_activations(model, "int8", g, args.head_only)
        with decode_rows(model):
            nll = window_nll(model, windows, desc=f"W4A8 int8 group {g}")
        d = nll - base
        se = d.std().item() / math.sqrt(d.numel())
        which = "the int8 lm_head's (other int8 layers W8A16)" if args.head_only else "int8 layers'"
        rows.append({"variant": f"W4A8, {which} activation group {g}" if g else "W4A8, int8 layers W8A16", "ppl": math.exp(nll.mean().item()),
                     "delta_nll": d.mean().item(), "delta_nll_se": se, "ratio": math.exp(d.mean().item()),
                     "ratio_se": math.exp(d.mean().item()) * se})
        print(rows[-1], flush=True)
    lines = [f"{args.split} split: {windows.shape[0]} windows x {windows.shape[1]} tokens", "",
             "| variant | perplexity | delta NLL vs W4A16 (mean +- SE) | ppl ratio (+- SE) |", "|---|---|---|---|"]
    for r in rows:
        if "delta_nll" in r:
            lines.append(f"| {r['variant']} | {r['ppl']:.4f} | {r['delta_nll']:+.5f} +- {r['delta_nll_se']:.5f} | "
                         f"{r['ratio']:.5f} +- {r['ratio_se']:.5f} |")
        else:
            lines.append(f"| {r['variant']} | {r['ppl']:.4f} | - | - |")
    return rows, "\n".join(lines)


def compile_decode(model):
    """Static KV cache; the forward compiled (backend=qcompile, reduce-overhead) for one-token steps,
    the prefill eager (as benchmarks/bench_decode.py --static does)."""
    import functools

    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True
    forward = model.forward
    compiled = torch.compile(forward, backend=qcompile, mode="reduce-overhead")

    @functools.wraps(forward)
    def step(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        return (compiled if ids is not None and ids.shape[-1] == 1 else forward)(*a, **kw)

    model.forward = step
    return model


def bare_loop(model, cache, ids, tokens):
    """Greedy tokens from a bare loop over the static cache (no generate())."""
    n = ids.shape[1]
    cache.reset()
    out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n), use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    got = [nxt]
    for i in range(tokens - 1):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=torch.tensor([n + i]))
        nxt = out.logits[:, -1:].argmax(-1)
        got.append(nxt)
    return torch.cat(got, -1)


def speed(args, model, tok):
    """W4A16 and W4A8 compiled side by side, timed in alternation (A, B, A, B, ...: both see the same
    machine load); a bare loop and HF generate, --tokens each; then a profile of one decode step."""
    import copy
    import statistics

    from transformers import StaticCache

    load_before = open("/proc/loadavg").read().strip()
    torch.set_num_threads(args.threads)
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    variants = {}
    for a in ("float", "int8"):
        m = copy.deepcopy(model)
        as_configured(m, a)
        variants[a] = (compile_decode(m), StaticCache(config=m.config, max_cache_len=ids.shape[1] + args.tokens))
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    times = {(a, k): [] for a in variants for k in ("bare", "generate")}
    texts = {}
    for r in range(args.repeats + 1):  # the first round compiles and warms up
        for a, (m, cache) in variants.items():
            t0 = time.perf_counter()
            texts[a] = bare_loop(m, cache, ids, args.tokens)
            t1 = time.perf_counter()
            m.generate(ids, **gen)
            t2 = time.perf_counter()
            if r:
                times[a, "bare"].append(t1 - t0)
                times[a, "generate"].append(t2 - t1)
        print(f"round {r}: " + ", ".join(f"{a} {k} {args.tokens / v[-1]:.1f} tok/s" for (a, k), v in times.items() if v),
              flush=True)
    rows = []
    for k in ("bare", "generate"):
        tps = {a: [args.tokens / t for t in times[a, k]] for a in variants}
        paired = [b / f for b, f in zip(times["float", k], times["int8", k])]
        rows.append({"loop": k, "w4a16_tok_s": statistics.median(tps["float"]), "w4a8_tok_s": statistics.median(tps["int8"]),
                     "speedup_median_paired": statistics.median(paired), "w4a16_all": tps["float"], "w4a8_all": tps["int8"]})
    profiles = {a: profile_step(m, cache, ids) for a, (m, cache) in variants.items()}
    lines = [f"{args.tokens} new tokens, {args.repeats} alternating rounds, {torch.get_num_threads()} threads, "
             f"/proc/loadavg before: {load_before}, after: {open('/proc/loadavg').read().strip()}; "
             f"bare-loop tokens identical: {bool((texts['float'] == texts['int8']).all())}", "",
             "| loop | W4A16 tok/s | W4A8 tok/s | W4A8 / W4A16 (median of paired rounds) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loop']} | {r['w4a16_tok_s']:.1f} | {r['w4a8_tok_s']:.1f} | {r['speedup_median_paired']:.3f}x |")
    for a, table in profiles.items():
        lines += ["", f"One decode step, {'W4A8' if a == 'int8' else 'W4A16'} (torch.profiler, self CPU time, "
                  "20 steps):", "", table]
    return rows + [{"profiles": profiles}], "\n".join(lines)


def profile_step(model, cache, ids, steps: int = 20, top: int = 12) -> str:
    """Markdown table of the ops that take the self CPU time of a decode step (one token, compiled)."""
    from torch.profiler import ProfilerActivity, profile

    n = ids.shape[1]
    cache.reset()
    model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n), use_cache=True, logits_to_keep=1)
    nxt = ids[:, -1:]
    for i in range(3):
        model(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=torch.tensor([n + i]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(3, 3 + steps):
            model(input_ids=nxt, past_key_values=cache, use_cache=True, cache_position=torch.tensor([n + i]))
        wall = (time.perf_counter() - t0) / steps * 1e6
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"wall {wall:.0f} us per step under the profiler", "",
             "| op | calls / step | self CPU us / step | share |", "|---|---|---|---|"]
    for e in events[:top]:
        lines.append(f"| {e.key[:70]} | {e.count / steps:.0f} | {e.self_cpu_time_total / steps:.0f} | "
                     f"{e.self_cpu_time_total / total:.1%} |")
    lines.append(f"| (all) | | {total / steps:.0f} | 100% |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("parity", "ppl", "speed"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--float", action="store_true", help="parity: the float model against W4A16 too")
    p.add_argument("--split", default="tune", choices=("tune", "report"))
    p.add_argument("--int8-groups", type=int, nargs="*", default=[ops_linear.INT8_ACT_GROUP])
    p.add_argument("--max-windows", type=int)
    p.add_argument("--head-only", action="store_true", help="--int8-groups apply to the lm_head only")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_model()
    qcompile.quantize(model, progress=False)
    with torch.no_grad():
        rows, table = {"parity": parity, "ppl": perplexity, "speed": speed}[args.what](args, model, tok)
    print("\n" + table)
    name = {"ppl": f"ppl_{args.split}", "speed": f"speed_{args.threads}t"}.get(args.what, args.what)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"w4a8_{name}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
