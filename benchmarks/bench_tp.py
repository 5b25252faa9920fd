"""Tensor parallel decode on one CPU machine (gloo): SmolLM2-135M, GPTQ W4 g64 with act_order.

    python benchmarks/bench_tp.py                 # TP = 1, 2, 3; TP-aware vs naive; writes results
    python benchmarks/bench_tp.py --tp 1 3 --tokens 32 --models smollm2
    python benchmarks/bench_tp.py --memory        # per-rank memory of shard-at-load, a 24-block model

A SIMULATION on one machine: every rank is a process on the same 2 cores, one thread each, talking
over gloo on localhost; TP=3 oversubscribes the cores. The numbers show what the collectives and
the act_order layouts cost here, not what TP gains across devices.

Per row: each rank reads its shard of the checkpoint (``qcompile.load(..., parallel=True)``),
compiles the one-token decode step with ``backend=qcompile`` (static KV cache) and runs a bare
greedy loop (bench_decode.bare_decode: median of 3 after a warm-up); collectives and runtime
permutes per token from the decode graph's report (`qcompile.explain` on one token); sharded
linear bytes on rank 0 (memory per rank: --memory). Each rank fills a meta-device model. "single process" is the model
without parallelize (its down_proj gathers its act_order input). Decode tokens are compared with
the single-process model's (float activations: ``cpu_activations="float"`` everywhere, so that
greedy tokens can match exactly; see qcompile.parallel on int8 activations).
Models: SmolLM2-135M (9 query / 3 KV heads: TP = 1 and 3; 2 does not divide its heads) and a
random-weight Llama from a config that splits 1, 2 and 3 ways ("llama-768": 6 blocks, hidden 768,
12 query / 6 KV heads, intermediate 2304). Checkpoints: GPTQConfig(group_size=64) (act_order on),
calibrated on 8 windows of 256 tokens (SmolLM2: the shipped text; llama-768: random token ids;
speed does not depend on the weights' values), cached under ~/.cache/qcompile/bench_tp.
Writes benchmarks/results/tp_cpu.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import qcompile
from qcompile import lowering
from qcompile.parallel.local import run_local_ranks
from qcompile.tools import devset
from qcompile.tools.models import load_model

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcompile" / "bench_tp"


LLAMA_768 = dict(vocab_size=8192, hidden_size=768, intermediate_size=2304, num_hidden_layers=6,
                 num_attention_heads=12, num_key_value_heads=6, max_position_embeddings=512, tie_word_embeddings=False)
LLAMA_768_DEEP = dict(LLAMA_768, num_hidden_layers=24, intermediate_size=3072)
LAYERS = {"smollm2": 30, "llama-768": 6}
WORLDS = {"smollm2": (1, 3), "llama-768": (1, 2, 3)}


def skeleton(name: str, meta: bool = False):
    """The float model (meta=False: what `checkpoint` quantizes) or its shape on the meta device
    (what a rank fills from the checkpoint: no float weights ever materialize)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = load_model()[0].config if name == "smollm2" else LlamaConfig(**LLAMA_768)
    if name == "smollm2" and not meta:
        return load_model()[0]
    torch.manual_seed(0)
    with torch.device("meta" if meta else "cpu"):
        return LlamaForCausalLM(config).eval()


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak since `reset_peak` (VmHWM), MiB. Not
    ru_maxrss: Linux keeps that across exec, so a spawned rank would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def checkpoint(name: str) -> Path:
    path = CACHE / f"{name}_gptq_w4g64_act_order"
    if not (path / "qcompile.json").is_file():
        model = skeleton(name)
        cfg = qcompile.GPTQConfig(group_size=64, nsamples=8, seqlen=256)
        if name == "smollm2":
            qcompile.quantize(model, cfg, tokenizer=load_model()[1])
        else:
            qcompile.quantize(model, cfg, calibration=torch.randint(0, LLAMA_768["vocab_size"], (8, 256),
                                                                       generator=torch.Generator().manual_seed(1)))
        qcompile.save(model, path)
    return path


def prompt_ids(name: str):
    if name != "smollm2":
        return torch.randint(0, LLAMA_768["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(2))
    _, tok = load_model()
    return devset.windows(tok, "tune").ids[:1, :32]


def decode(rank, world, name, path, mode, tokens, parallel=True):
    """One rank: load its shard, compile the decode step, time greedy decode."""
    from bench_decode import bare_decode, static_decode

    model = skeleton(name, meta=True)
    kwargs = {"tp_aware": mode != "naive"} if parallel else {}
    qcompile.load(model, path, cpu_activations="float", parallel=parallel or None, **kwargs)
    ids = prompt_ids(name)
    counts = qcompile.explain(model, ids[:, :1]).summary()["collectives"]  # one token: the decode graph's structure
    torch._dynamo.reset()
    model = static_decode(model, {"backend": qcompile})
    t = time.perf_counter()
    tps, out = bare_decode(model, ids, tokens, torch.device("cpu"), 3)
    wall = time.perf_counter() - t
    par = getattr(model, "qcompile_parallel", None)
    d = par.to_dict() if par is not None else {}
    return {"tokens_per_s": tps, "tokens": [int(x) for x in out], "counts": counts,
            "local_sharded_bytes": d.get("local_sharded_bytes"), "sharded_bytes": d.get("sharded_bytes"),
            "replicated_bytes": d.get("replicated_bytes"), "wall_s": wall}


def memory(rank, world, path):
    """One rank fills a meta-device model from the checkpoint (its shard only when world > 1):
    the peak memory loading added, and what stays resident after."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_768_DEEP)).eval()
    lowering.cpu_kernels.load()  # the kernels' build and libraries are not the model's memory
    before, anon_before = rss_mib(), rss_mib("RssAnon")
    reset_peak()
    qcompile.load(model, path, parallel=True if world > 1 else None)
    peak = rss_mib("VmHWM") - before
    anon = rss_mib("RssAnon") - anon_before
    par = getattr(model, "qcompile_parallel", None)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if t is not None}
    return {"peak_mib": peak, "resident_mib": rss_mib() - before, "anon_mib": anon, "live_mib": sum(storages.values()) / 2**20,
            "local_sharded_mib": par.to_dict()["local_sharded_bytes"] / 2**20 if par else None}


def memory_table(worlds, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    # integer zero-points (min-max RTN) so that the same layers also save as a GPTQ checkpoint
    path, gptq_path = CACHE / "llama-768-deep_rtn_minmax_g64", CACHE / "llama-768-deep_rtn_minmax_g64_gptq"
    if not (path / "qcompile.json").is_file() or not (gptq_path / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_768_DEEP)).eval()
        qcompile.quantize(model, qcompile.RTNConfig(group_size=64, search="minmax"))
        qcompile.save(model, path)
        qcompile.save(model, gptq_path, format="gptq")
        del model
    file_mib = (path / "model.safetensors").stat().st_size / 2**20
    lines = ["# Memory per rank when each rank reads its shard (`qcompile.load(meta_model, path, parallel=True)`)", "",
             f"A random Llama, 24 blocks, hidden 768, 12/6 heads, intermediate 3072, RTN (min-max) int4 g64 (qcompile file "
             f"{file_mib:.0f} MiB; the float32 embedding, 24 MiB, and the int8 lm_head, 6 MiB, are replicated), saved as a qcompile checkpoint "
             "and as a Hugging Face GPTQ checkpoint. Each rank fills a meta-device model; MiB added to the process by "
             "loading (RSS), max over ranks, with QCOMPILE_KEEP_FREED_MEMORY=0 (glibc's defaults: freed memory that "
             "glibc keeps still counts); the model's tensors: the storages its parameters and buffers hold on the "
             "rank; private (RssAnon): RSS less file-backed pages (qcompile reads checkpoints with plain reads, "
             "nothing is mapped). Both are read as slices: each rank its rows / columns of layers without act_order.", "",
             "| checkpoint | TP | model tensors on the rank | of which sharded linears | RSS added, peak while loading "
             "| peak / the rank's tensors | RSS added, after | of which private (RssAnon) |",
             "|---|---|---|---|---|---|---|---|"]
    # glibc's defaults, so that freed memory leaves the process (qcompile/malloc.py keeps it by default)
    os.environ["QCOMPILE_KEEP_FREED_MEMORY"] = "0"
    for kind, ckpt in (("qcompile", path), ("HF GPTQ", gptq_path)):
        for world in worlds:
            res = run_local_ranks(world, memory, ckpt, timeout_s=900)
            peak, resident = max(r["peak_mib"] for r in res), max(r["resident_mib"] for r in res)
            local, live = res[0]["local_sharded_mib"], max(r["live_mib"] for r in res)
            anon = max(r["anon_mib"] for r in res)
            lines.append(f"| {kind} | {world} | {live:.0f} | {'all' if local is None else f'{local:.0f}'} | {peak:.0f} "
                         f"| {peak / live:.2f} | {resident:.0f} | {anon:.0f} |")
            print(lines[-1], flush=True)
    Path(out + "_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama-768"], choices=list(LAYERS))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "results" / "tp_cpu"))
    ap.add_argument("--memory", action="store_true", help="only the shard-at-load memory table")
    args = ap.parse_args()
    if args.memory:
        return memory_table(args.tp, args.out)
    rows = []
    for name in args.models:
        path = checkpoint(name)
        single = run_local_ranks(1, decode, name, path, "single", args.tokens, False, timeout_s=1200)[0]
        rows.append((name, "single process (no parallelize)", 1, dict(single, base=single["tokens_per_s"])))
        print(name, "single", single["tokens_per_s"], single["counts"], flush=True)
        for world in [w for w in args.tp if w in WORLDS[name]]:
            for mode in ("tp_aware", "naive"):
                res = run_local_ranks(world, decode, name, path, mode, args.tokens, timeout_s=1800)
                r0 = dict(res[0], same_tokens=all(r["tokens"] == single["tokens"] for r in res),
                          ranks_agree=all(r["tokens"] == res[0]["tokens"] for r in res), base=single["tokens_per_s"])
                rows.append((name, mode, world, r0))
                print(name, world, mode, r0["tokens_per_s"], r0["counts"], r0["same_tokens"], flush=True)

    lines = ["# Tensor parallel decode, SmolLM2-135M GPTQ W4 g64 act_order (CPU, gloo: a one-machine simulation)", "",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; every "
             f"rank one thread on the same cores (TP=3 oversubscribes 2 cores); float activations; bare greedy "
             f"decode of {args.tokens} tokens after a 32-token prompt, static cache, decode step compiled with "
             "backend=qcompile; median of 3. Per token = per decode step (SmolLM2: 30 decoder blocks; llama-768: 6).", "",
             "| model | TP | path | tok/s | vs single | all_reduce / token | all_gather / token | runtime permutes / token | "
             "sharded linears on rank 0 (MiB, share) | tokens = single process |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, mode, world, r in rows:
        layers = LAYERS[name]
        c = r["counts"]
        share = (f"{r['local_sharded_bytes'] / 2**20:.1f} ({r['local_sharded_bytes'] / r['sharded_bytes']:.3f})"
                 if r.get("local_sharded_bytes") else "all")
        lines.append(f"| {name} | {world} | {mode} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / r['base']:.2f}x | "
                     f"{c.get('all_reduce', 0)} ({c.get('all_reduce', 0) / layers:.0f}/block) | "
                     f"{c.get('all_gather_into_tensor', 0)} | {c.get('runtime_index', 0)} | {share} | "
                     f"{r.get('same_tokens', True)} |")
    lines += ["", "tp_aware: down_proj's act_order permutation folded into gate/up (no collective, no permute); "
              "o_proj's columns regrouped per rank (no collective, one local index). naive: every act_order "
              "row-parallel layer all-gathers its input, permutes and slices. The remaining runtime permutes are "
              "the act_order gathers of q/k/v and gate/up, whose input is replicated."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps([{"model": n, "path": m, "tp": w, **r} for n, m, w, r in rows], indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
