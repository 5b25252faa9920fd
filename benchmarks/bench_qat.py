"""DL-QAT on SmolLM2-135M: perplexity against float32, round to nearest and GPTQ at W4 / W3 / W2 g64 and
W3 per channel, with tokens trained, wall time, peak memory and the trainable fraction.

    python benchmarks/bench_qat.py [--only NAME ...] [--steps N]      # rows run one by one, each in its own process
    python benchmarks/bench_qat.py --rewrite                          # the table again from the saved JSON

Perplexity: the development set's report split (`qcompile.tools.devset`, 52 windows of 512 tokens, 9
documents) ± standard error over windows; "vs float32" paired over the same windows. DL-QAT trains on
the text that ships with qcompile (`calibration=` left out: the GPTQ init calibrates on the calibration
text, training uses `training_text()`, that text plus ~100k tokens of other documentation; 16 of its
windows held out for the best-state choice), never on development-set text; its learning rates were
chosen on held-out windows of the shipped text (benchmarks/tune_qat.py). "GPTQ gap closed": (ppl_gptq − ppl) / (ppl_gptq − ppl_float32) ± a
bootstrap standard error over windows. Float32, round-to-nearest and GPTQ rows at W4/W3 g64 and W3 per
channel are read from benchmarks/results/methods_smollm2.json (the same windows; GPTQ calibrated on
the same shipped text, bf16 scales); W2 g64's are measured here. Each DL-QAT row runs in a fresh process:
"peak RSS" is that process's (model, float teacher, training), wall time includes the initial grid,
the teacher pass, training and conversion; "fake-quant ppl" is the trained model before conversion.
Writes benchmarks/results/qat_smollm2.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results"
RESULTS = OUT / "qat_smollm2.json"
SETTINGS = {  # name -> (bits, group_size); baseline row names in methods_smollm2.json
    "w4 g64": (4, 64), "w3 g64": (3, 64), "w2 g64": (2, 64), "w3 per-channel": (3, None)}
BASELINES = {"w4 g64": ("rtn w4 g64", "gptq w4 g64 act_order shipped"),
             "w3 g64": ("rtn w3 g64", "gptq w3 g64 act_order shipped"),
             "w3 per-channel": ("rtn w3 per-channel", "gptq w3 per-channel act_order shipped")}
# the floors: DL-QAT's share of GPTQ's gap closed, or ppl bounds
GAP_CLOSED = {"dlqat w3 g64": 0.50}
NOT_WORSE_THAN_GPTQ = ("dlqat w4 g64",)
W2 = ("dlqat w2 g64", 0.5, 4.0)  # ppl <= 0.5 x GPTQ's and <= 4 x float32's
DEFAULT_RECIPE = ("dlqat w3 g64", 30 * 60, 12 * 2**30)  # wall time and peak memory of the default recipe


def dlqat_rows(steps: int | None):
    for setting in SETTINGS:
        yield f"dlqat {setting}", setting, "gptq", steps
        yield f"dlqat {setting} rtn-init", setting, "rtn", steps


def run_row(name: str, setting: str, init: str | None, steps: int | None) -> dict:
    """Quantize a fresh SmolLM2 as the row says and measure it (in this process)."""
    import qcompile
    from qcompile import GPTQConfig
    from qcompile.qat import trainable_fraction
    from qcompile.tools import devset
    from qcompile.tools.evaluate import Perplexity, window_nll
    from qcompile.tools.models import load_model

    torch.set_num_threads(2)
    bits, group = SETTINGS[setting]
    phase, peaks = ["load"], {}
    threading.Thread(target=_sample_rss, args=(phase, peaks), daemon=True).start()
    model, tok = load_model()
    ids = devset.windows(tok, "report").ids
    load = os.getloadavg()[0]
    t = time.perf_counter()
    r: dict = {"name": name}
    if init is None and name.startswith("rtn"):
        qcompile.qat._rtn_init(model, GPTQConfig(bits=bits, group_size=group, sym=False), progress=False)
    elif init is None:  # GPTQ on the shipped calibration text, or on DL-QAT's larger training text
        from qcompile.methods.calibration import training_text
        text = training_text() if name.endswith("training-text") else None
        qcompile.quantize(model, GPTQConfig(bits=bits, group_size=group, sym=False, act_order=True),
                          calibration=text, tokenizer=tok if text else None, progress=False)
    else:
        fields = {"steps": steps} if steps else {}
        cfg = qcompile.DLQATConfig(bits=bits, group_size=group, init=init, **fields)
        teacher = load_model()[0].eval()
        phase[0] = "prepare"
        qcompile.qat.prepare(model, cfg, progress=True)
        phase[0] = "teacher pass + training"
        r["prepare_s"] = round(time.perf_counter() - t, 1)
        trained, total = trainable_fraction(model)
        result = qcompile.qat.train(model, teacher, tokenizer=tok)
        del teacher
        r |= {"steps": result.steps, "tokens": result.tokens, "train_s": round(result.seconds, 1),
              "heldout_kl_before": result.initial_heldout_kl, "heldout_kl_best": result.best_heldout_kl,
              "best_step": result.best_step, "heldout": result.heldout, "train_precision": result.precision, "trainable": trained, "params": total,
              "config": cfg.to_dict()}
        recipe_s = time.perf_counter() - t
        phase[0] = "evaluate + convert"
        r["fake_quant_ppl"] = round(Perplexity(window_nll(model, ids, progress=False)).ppl, 3)
        t = time.perf_counter()  # the fake-quant evaluation is not part of the recipe's time
        qcompile.qat.convert(model)
        t -= recipe_s
    r["wall_s"] = round(time.perf_counter() - t, 1)
    nll = window_nll(model, ids, progress=False)
    p = Perplexity(nll)
    r |= {"ppl": round(p.ppl, 3), "se": round(p.se, 3), "nll": nll.tolist(), "load_avg": round(max(load, os.getloadavg()[0]), 1),
          "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
          "peak_rss_gib_by_phase": {k: round(v, 2) for k, v in peaks.items()}}
    return r


def _sample_rss(phase: list[str], peaks: dict[str, float]) -> None:
    """Every 0.5 s: the process's resident memory (GiB), the peak kept per phase."""
    while True:
        with open("/proc/self/status") as f:
            gib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20
        peaks[phase[0]] = max(peaks.get(phase[0], 0.0), gib)
        time.sleep(0.5)


def step_time(steps: int = 6) -> None:
    """Seconds per training step (4 x 512 tokens, W3 g64) with the fake-quantized weights built eagerly,
    by the torch.compile'd function, and compiled under bf16 autocast (the matmuls in bf16), taking
    turns in one process; median of the steps after the first two (compile warm-up). Writes
    benchmarks/results/qat_step_time.md."""
    import contextlib
    import copy
    import statistics

    import qcompile
    from qcompile.qat import QATLinear, trainable_parameters
    from qcompile.qat.distill import distill_kl, teacher_targets, training_windows
    from qcompile.tools.models import load_model

    torch.set_num_threads(2)
    base, tok = load_model()
    teacher = copy.deepcopy(base).eval()
    model = copy.deepcopy(base)
    qcompile.qat.prepare(model, qcompile.DLQATConfig(bits=3, init="rtn"), progress=False)
    ids = training_windows(None, model=model, tokenizer=tok)[:4]
    t = teacher_targets(teacher, ids, 64, 4, False)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-4)
    layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    variants = {"eager": (False, False), "torch.compile": (True, False), "torch.compile, bf16 autocast": (True, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(steps * len(variants)):
        name = list(variants)[i % len(variants)]
        compiled, bf16 = variants[name]
        for m in layers:
            m.compile = compiled
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = distill_kl(model(ids, use_cache=False).logits, t.logp, t.index)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times[name].append(time.perf_counter() - start)
        print(f"step {i} {name}: {times[name][-1]:.1f} s", flush=True)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    text = (f"# DL-QAT training step: eager vs compiled fake-quant, fp32 vs bf16 autocast (SmolLM2-135M W3 g64, 4 x 512 tokens)\n\n"
            f"`python benchmarks/bench_qat.py --step-time` on {platform.machine()}, 2 threads, torch {torch.__version__}; "
            f"load avg {os.getloadavg()[0]:.1f}. Median of {steps - 2} steps each (after 2 warm-up steps), taking turns.\n\n"
            "| fake-quantized weights built | s / step | tokens / s | vs eager |\n|---|---|---|---|\n"
            + "".join(f"| {k} | {v:.2f} | {2048 / v:.0f} | {med['eager'] / v:.2f}x |\n" for k, v in med.items()))
    (OUT / "qat_step_time.md").write_text(text)
    print(text)


def baselines() -> dict[str, dict]:
    """float32 / rtn / gptq rows from bench_methods' results (same windows), by name."""
    path = OUT / "methods_smollm2.json"
    rows = json.loads(path.read_text())["results"] if path.exists() else []
    return {r["name"]: r | {"source": "methods_smollm2.json"} for r in rows}


def write(results: dict[str, dict]) -> None:
    from bench_methods import bootstrap_recovered  # share of a baseline's loss recovered, bootstrap SE
    from qcompile.tools.evaluate import paired_ratio_text

    base = baselines()
    allrows = base | results
    f = allrows.get("float32")
    lines = ["# DL-QAT on SmolLM2-135M-Instruct (CPU)", "", (__doc__ or "").split("\n\n")[2].replace("\n", " "), "",
             f"Machine: {platform.machine()}, 2 threads, torch {torch.__version__}. Load avg: the 1-minute load when the "
             "row ran (above 2: something else ran beside it and inflated the wall time).", "",
             "| setting | variant | perplexity | vs float32 | GPTQ gap closed | fake-quant ppl | tokens trained | "
             "wall (s) | peak RSS (GiB) | trainable | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    floors = []
    for setting in SETTINGS:
        rtn_name, gptq_name = BASELINES.get(setting, (f"rtn {setting}", f"gptq {setting} act_order shipped"))
        gptq = allrows.get(gptq_name)
        names = [("float32", "float32"), (rtn_name, "round to nearest"), (gptq_name, "GPTQ act_order"),
                 (f"gptq {setting} act_order training-text", "GPTQ act_order, calibrated on DL-QAT's training text"),
                 (f"dlqat {setting}", "DL-QAT (GPTQ init)"), (f"dlqat {setting} rtn-init", "DL-QAT (RTN init)")]
        for name, label in names:
            r = allrows.get(name)
            if r is None:
                continue
            rel = paired_ratio_text(r["nll"], f["nll"]) if f and r is not f else ""
            gap = ""
            if gptq and f and name.startswith("dlqat"):
                share, se = bootstrap_recovered(f["nll"], gptq["nll"], r["nll"])  # GPTQ's gap closed
                gap = f"{share:.0%} ± {se:.0%}"
                same_text = allrows.get(f"gptq {setting} act_order training-text")
                if same_text:  # the share of the gap left by GPTQ given the same (larger) text
                    share2, se2 = bootstrap_recovered(f["nll"], same_text["nll"], r["nll"])
                    gap += f" ({share2:.0%} ± {se2:.0%} of the same-text GPTQ's)"
                if name in GAP_CLOSED:
                    floors.append(f"- {name}: closed {share:.0%} ± {se:.0%} of GPTQ's gap to float32 (floor "
                                  f"{GAP_CLOSED[name]:.0%}) {'met' if share >= GAP_CLOSED[name] else 'MISSED'}")
                if name in NOT_WORSE_THAN_GPTQ:
                    floors.append(f"- {name}: {r['ppl']:.2f} vs GPTQ {gptq['ppl']:.2f} "
                                  f"{'met' if r['ppl'] <= gptq['ppl'] else 'MISSED'}")
                if name == W2[0]:
                    ok = r["ppl"] <= W2[1] * gptq["ppl"] and r["ppl"] <= W2[2] * f["ppl"]
                    floors.append(f"- {name}: {r['ppl']:.2f} vs ½ GPTQ {W2[1] * gptq['ppl']:.2f} and 4x float32 "
                                  f"{W2[2] * f['ppl']:.2f} {'met' if ok else 'MISSED'}")
                if name == DEFAULT_RECIPE[0]:
                    ok = r["wall_s"] <= DEFAULT_RECIPE[1] and r["peak_rss_gib"] * 2**30 <= DEFAULT_RECIPE[2]
                    floors.append(f"- default recipe ({name}): {r['wall_s']:.0f} s (floor 1800 s), peak RSS "
                                  f"{r['peak_rss_gib']:.1f} GiB (floor 12) {'met' if ok else 'MISSED'} "
                                  f"(load avg {r['load_avg']})")
            if r is f and setting != next(iter(SETTINGS)):
                continue
            train = "-"
            if "tokens" in r:
                prec = r.get("train_precision")  # None: the earlier recipe
                train = (f"{r['tokens']:,} ({r['steps']} steps, {prec})" if prec else
                         f"{r['tokens']:,} ({r['steps']} steps, float32, calibration text only: the earlier recipe)")
            frac = f"{r['trainable'] / r['params']:.2%}" if "trainable" in r else "-"
            lines.append(f"| {setting} | {label} | {r['ppl']:.2f} ± {r['se']:.2f} | {rel} | {gap} | "
                         f"{r.get('fake_quant_ppl', '-')} | {train} | {r.get('wall_s', r.get('quantize_s', '-'))} | "
                         f"{r.get('peak_rss_gib', '-')} | {frac} | {r.get('load_avg', '-')} |")
    lines += ["", "Floors:"] + (floors or ["- (no DL-QAT row measured yet)"])
    OUT.mkdir(exist_ok=True)
    (OUT / "qat_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="rows to run (exact names; default: every DL-QAT row)")
    ap.add_argument("--steps", type=int, help="training steps (default: DLQATConfig's)")
    ap.add_argument("--rewrite", action="store_true")
    ap.add_argument("--step-time", action="store_true", help="time training steps, eager vs compiled fake-quant")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args()
    if args.step_time:
        step_time()
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.row:
        setting, init = json.loads(args.row)
        name = args.only[0]
        print(json.dumps(run_row(name, setting, init, args.steps)), file=open(os.environ["QAT_ROW_OUT"], "w"))
        return
    if not args.rewrite:
        todo = [(n, s, i) for n, s, i, _ in dlqat_rows(args.steps)]
        todo += [("rtn w2 g64", "w2 g64", None), ("gptq w2 g64 act_order shipped", "w2 g64", None),
                 ("gptq w3 g64 act_order training-text", "w3 g64", None)]
        for name, setting, init in todo:
            if args.only is not None and name not in args.only:
                continue
            if args.only is None and name in results:
                continue
            out = OUT / f".qat_row_{os.getpid()}.json"
            cmd = [sys.executable, __file__, "--row", json.dumps([setting, init]), "--only", name]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            print(f"== {name}", flush=True)
            subprocess.run(cmd, check=True, env=os.environ | {"QAT_ROW_OUT": str(out)})
            results[name] = json.loads(out.read_text())
            out.unlink()
            RESULTS.write_text(json.dumps(results, indent=1))  # after every row: a stopped run keeps what it measured
    write(results)


if __name__ == "__main__":
    main()
