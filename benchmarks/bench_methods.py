"""Quantization methods on SmolLM2-135M: perplexity, quantize time and weight bytes of GPTQ and
GANQ against float32 and round to nearest.

    python benchmarks/bench_methods.py [--only SUBSTRING ...] [--save DIR]

Perplexity: `qcompile.evaluate` (first 1024 held-out GPL-3 tokens, two 512-token windows), the
harness of tests/test_smollm2.py. Every quantized row keeps the default int8 per-channel lm_head,
so rows differ only in the 210 decoder linears. Round to nearest is the asymmetric min/max grid
with an integer zero-point (RTNConfig(search="minmax") at 4 bits; GPTQ's own grid with no error
feedback at 3 bits, which RTNConfig does not serve: the two grids are the same). GPTQ runs with
its default calibration (the text that ships with qcompile) and asymmetric grids; GANQ with its
defaults (one fp16 table per output row, K=10) on the same calibration.
--save DIR saves each quantized model (qcompile.save) under DIR/<row name> (bench_decode.py
--checkpoint times them).
Writes benchmarks/results/methods_smollm2.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import qcompile
from qcompile import GANQConfig, GPTQConfig, RTNConfig
from qcompile import devset
from qcompile.evaluate import Perplexity, window_nll
from qcompile.methods import gptq, plan_linear, quantize_linear
from qcompile.models import load_model
from qcompile.quantize import install, linear_modules, untie
from qcompile.report import GraphReport, Report

OUT = Path(__file__).parent / "results"
FLOORS = {  # row name -> the perplexity it must not exceed
    "gptq w4 g64 act_order": 23.69,
    "gptq w3 g64 act_order": 37.0,
    "gptq w3 per-channel act_order": None,  # 2x float32, filled in at run time
    "gptq w3 per-channel act_order float_targets": None,
    "ganq w4": "gptq w4 per-channel",       # GANQ (best variant): no worse than the best GPTQ per channel
    "ganq w3": "gptq w3 per-channel",
}
ORDER = ["float32", "gptq w4 g64 act_order", "gptq w3 g64 act_order", "gptq w3 per-channel act_order",
         "ganq w4", "ganq w3"]
# quantize-time floors, on the rows they are about: GPTQModel's 158 s for 4-bit GPTQ on this CPU,
# 10 minutes for GANQ (K=10); other rows' times are for information (many ran beside other jobs)
TIME_LIMITS_S = {"gptq w4 g64 act_order": 158.0, "ganq w4": 600.0, "ganq w3": 600.0}


def rtn_on_gptq_grid(model, bits: int, group_size: int | None):
    """Round to nearest on GPTQ's asymmetric min/max grid for the decoder linears; int8 lm_head."""
    cfg = GPTQConfig(bits=bits, group_size=group_size, sym=False)
    report = GraphReport(index=0, device="cpu")
    emb = model.get_input_embeddings()
    for path, mod, w in linear_modules(model):
        plan = plan_linear(cfg, path, w, w.device)
        if plan.data_free:
            q = quantize_linear(cfg, plan, w)
        else:
            q = gptq.to_format(gptq.rtn_quantize(w, bits=bits, group_size=None if group_size is None else plan.group_size,
                                                 sym=False, scale_dtype=cfg.scale_dtype))
            plan.reason = f"{bits}-bit round to nearest (min/max grid)"
        report.linears.append(install(model, path, mod, q, plan, emb))
    untie(model)
    model.qcompile_report = Report(config={"method": "rtn-gptq-grid", "bits": bits, "group_size": group_size},
                                   graphs=[report])


def rows():
    """(name, how to quantize a fresh model or None for float32, note)."""
    yield "float32", None, ""
    yield "rtn w4 g64", lambda m: qcompile.quantize(m, RTNConfig(group_size=64, search="minmax"), progress=False), ""
    yield "rtn w4 per-channel", lambda m: qcompile.quantize(m, RTNConfig(group_size=None, search="minmax"),
                                                            progress=False), ""
    yield "rtn w3 g64", lambda m: rtn_on_gptq_grid(m, 3, 64), "GPTQ's grid, no error feedback"
    yield "rtn w3 per-channel", lambda m: rtn_on_gptq_grid(m, 3, None), "GPTQ's grid, no error feedback"
    for bits, groups in ((4, (64, 128, None)), (3, (64, None))):
        for group in groups:
            for act_order in (True, False):
                g = "per-channel" if group is None else f"g{group}"
                name = f"gptq w{bits} {g}" + (" act_order" if act_order else "")
                note = "g64 on the 576-wide inputs (128 does not divide 576), g128 on down_proj" if group == 128 else ""
                cfg = GPTQConfig(bits=bits, group_size=group, sym=False, act_order=act_order)
                yield name, (lambda m, cfg=cfg: qcompile.quantize(m, cfg, progress=False)), note
    for bits, group in ((4, 64), (3, 64), (3, None)):
        g = "per-channel" if group is None else f"g{group}"
        cfg = GPTQConfig(bits=bits, group_size=group, sym=False, act_order=True, float_targets=True)
        yield f"gptq w{bits} {g} act_order float_targets", (lambda m, cfg=cfg: qcompile.quantize(m, cfg, progress=False)), \
            "each layer refitted to the float model's outputs first"
    yield "gptq defaults (GPTQConfig())", lambda m: qcompile.quantize(m, GPTQConfig(), progress=False), \
        "w4 g128 sym act_order: g64 on 576-wide inputs"
    for bits in (4, 3):
        yield f"ganq w{bits}", (lambda m, b=bits: qcompile.quantize(m, GANQConfig(bits=b), progress=False)), \
            "one fp16 table per output row (no groups)"
        yield f"ganq w{bits} float_targets", \
            (lambda m, b=bits: qcompile.quantize(m, GANQConfig(bits=b, float_targets=True), progress=False)), \
            "each layer refitted to the float model's outputs first"


def decoder_bytes(model) -> int:
    report = getattr(model, "qcompile_report", None)
    if report is None:
        return sum(4 * w.numel() for p, _, w in linear_modules(model) if p.startswith("model.layers."))
    return sum(x.quant_bytes or x.float_bytes for x in report.linears if x.path.startswith("model.layers."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the .md from the saved .json")
    ap.add_argument("--save", type=Path, help="save each quantized model under this folder")
    args = ap.parse_args()
    if args.rewrite:
        write(json.loads((OUT / "methods_smollm2.json").read_text())["results"])
        return
    torch.manual_seed(0)
    _, tok = load_model()
    ids = devset.windows(tok, "report").ids
    # with --only, the other rows of the last run stay in the table
    old = json.loads((OUT / "methods_smollm2.json").read_text())["results"] if args.only and \
        (OUT / "methods_smollm2.json").exists() else []
    results = []
    first = {n: i for i, n in enumerate(ORDER)}  # the rows with floors run first
    for name, apply, note in sorted(rows(), key=lambda r: first.get(r[0], len(ORDER))):
        # an --only that names a row exactly selects that row alone, others match as substrings
        names = {r[0] for r in rows()}
        if args.only and name != "float32" and not any(s == name if s in names else s in name for s in args.only):
            continue
        model, _ = load_model()
        load = os.getloadavg()[0]
        t, cpu = time.perf_counter(), time.process_time()
        if apply is not None:
            apply(model)
        seconds = time.perf_counter() - t if apply is not None else 0.0
        cpu_s = time.process_time() - cpu if apply is not None else 0.0
        nll = window_nll(model, ids, progress=False)
        ppl = Perplexity(nll).ppl
        r = {"name": name, "ppl": round(ppl, 3), "nll": nll.tolist(), "quantize_s": round(seconds, 1), "quantize_cpu_s": round(cpu_s, 1),
             "load_avg": round(max(load, os.getloadavg()[0]), 1),
             "decoder_weight_mib": round(decoder_bytes(model) / 2**20, 2), "note": note}
        results.append(r)
        old = [o for o in old if o["name"] != name]
        if args.save and apply is not None:
            qcompile.save(model, args.save / name.replace(" ", "_"))
        print(f"{name:<34} ppl {ppl:7.3f}  quantize {seconds:6.1f} s (cpu {cpu_s:6.1f} s, load {r['load_avg']})  "
              f"decoder weights {r['decoder_weight_mib']:6.2f} MiB  {note}", flush=True)
        del model
        write(results + old)  # after every row: a long run that is stopped keeps what it measured


def write(results: list[dict]) -> None:
    base = next((r["ppl"] for r in results if r["name"] == "float32"), None)
    floors = dict(FLOORS)
    if base is not None:
        floors["gptq w3 per-channel act_order"] = round(2 * base, 2)
        floors["gptq w3 per-channel act_order float_targets"] = round(2 * base, 2)
    cfg = GPTQConfig()
    lines = [
        "# Quantization methods on SmolLM2-135M-Instruct (CPU)",
        "",
        f"`python benchmarks/bench_methods.py` on {platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Perplexity: first 1024 GPL-3 tokens, two 512-token windows "
        "(`qcompile.evaluate`). All quantized rows: asymmetric grid with integer zero-points (min/max for "
        "round to nearest; GPTQ's default clip search shrinks it), bf16 scales, int8 per-channel lm_head "
        "(also read by the tied embedding). Decoder weight bytes include scales, zero-points and act_order "
        "permutations; 3-bit codes are stored in 4-bit nibbles (the int4 kernels serve them), so they take "
        "the bytes of 4-bit. GPTQ: default calibration "
        f"({cfg.nsamples} x {cfg.seqlen} tokens of qcompile's calibration text), damp {cfg.damp_percent}, "
        f"true-sequential, clip search {cfg.clip_search}, blocks of 128. GANQ (`GANQConfig()` defaults): the "
        f"same calibration, one fp16 table of 2^bits entries per output row, K={GANQConfig().iters}, damp "
        f"{GANQConfig().damp_percent}; 3-bit codes take 4-bit nibbles in memory (dense 3-bit in files). Quantize time: wall and process "
        "CPU time on a 2-core machine shared with other jobs (load avg: the 1-minute load when the row ran; "
        "above 2 the wall time is inflated by other processes).",
        "",
        "| variant | perplexity | vs float32 | quantize wall (s) | quantize CPU (s) | load avg | decoder weights (MiB) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rel = f"{r['ppl'] / base:.3f}x" if base else ""
        q = f"{r['quantize_s']:.1f} | {r['quantize_cpu_s']:.1f}" if r["quantize_s"] else "- | -"
        lines.append(f"| {r['name']} | {r['ppl']:.2f} | {rel} | {q} | {r['load_avg']} | {r['decoder_weight_mib']:.2f} | {r['note']} |")
    lines += ["", "Floors:"]
    by_name = {r["name"]: r for r in results}
    best = lambda prefix: min((r for r in results if r["name"].startswith(prefix)), key=lambda r: r["ppl"],  # noqa: E731
                              default=None)
    for name, floor in floors.items():
        row = by_name.get(name)
        if isinstance(floor, str):  # best row of one family against the best of the other
            row, rival = best(name), best(floor)
            floor = None if rival is None else rival["ppl"]
            name = None if row is None else f"{row['name']} (best {name}) vs {rival['name'] if rival else '-'}"
        if row is not None and floor is not None:
            ok = row["ppl"] <= floor
            lines.append(f"- {name}: {row['ppl']:.2f} <= {floor} {'met' if ok else 'MISSED'}")
    for r in results:
        limit = TIME_LIMITS_S.get(r["name"])
        if limit is not None:
            ok = r["quantize_s"] < limit
            lines.append(f"- quantize time {r['name']}: {r['quantize_s']:.1f} s < {limit} s "
                         f"{'met' if ok else 'MISSED'}")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(exist_ok=True)
    (OUT / "methods_smollm2.md").write_text(text)
    (OUT / "methods_smollm2.json").write_text(json.dumps({"results": results, "floors": floors}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
