"""Choosing GPTQ's defaults on the development set's tune split (never on the report split).

    python benchmarks/tune_gptq.py [--grids 4:64 3:64 3:pc] [--calib shipped calib training] \
        [--damps 0.01 0.1 0.3] [--float-targets 0 1] [--nsamples 32] [--seqlen 512]

For each grid (bits:group, pc = per channel; asymmetric, act_order, clip search) and each setting,
quantizes SmolLM2-135M with GPTQ and measures perplexity on the tune split (`qcompile.tools.devset`, 28
windows of 512 tokens from 6 documents of 3 kinds). Calibration is either the text that ships
with qcompile ("shipped": what a user gets who passes none), the calib split ("calib": text a
user passes, of the same kinds as the evaluation text, other documents) or DL-QAT's training text
("training": the shipped text plus ~100k tokens of other documentation, to see what a more diverse
default text would give; windows are spread over the whole text). Each row also gives the
share of round to nearest's loss recovered, (ppl_rtn − ppl) / (ppl_rtn − ppl_float), with
round to nearest on the same grid (min/max, integer zero-point). Rows are appended to
benchmarks/results/tune_gptq.json as they finish (a stopped run keeps them; a rerun skips them).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qcompile
from qcompile import GPTQConfig
from qcompile.methods import calibration
from qcompile.tools import devset
from qcompile.tools.evaluate import Perplexity, window_nll
from qcompile.tools.models import load_model

OUT = Path(__file__).parent / "results"
JSON = OUT / "tune_gptq.json"


def grid(spec: str) -> tuple[int, int | None]:
    bits, group = spec.split(":")
    return int(bits), None if group == "pc" else int(group)


def write_md(done: list[dict]) -> None:
    base = next((r for r in done if r["key"] == "float32"), None)
    lines = ["# GPTQ settings on the development set's tune split (SmolLM2-135M)", "",
             "`python benchmarks/tune_gptq.py` (see its docstring). Perplexity on the tune split (28 windows of 512 "
             "tokens, 6 documents); recovered: share of round to nearest's loss (same grid) won back.", "",
             "| run | perplexity | recovered | quantize (s) |", "|---|---|---|---|"]
    for r in done:
        rtn = next((x for x in done if x["key"] == f"rtn {r.get('grid')}"), None)
        share = ""
        if base and rtn and r["key"].startswith("gptq"):
            share = f"{(rtn['ppl'] - r['ppl']) / (rtn['ppl'] - base['ppl']):.0%}"
        lines.append(f"| {r['key']} | {r['ppl']:.3f} | {share} | {r['quantize_s']} |")
    (OUT / "tune_gptq.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", nargs="*", default=["4:64", "3:64", "3:pc"])
    ap.add_argument("--calib", nargs="*", default=["shipped", "calib"], choices=["shipped", "calib", "training"])
    ap.add_argument("--damps", type=float, nargs="*", default=[0.01, 0.1, 0.3])
    ap.add_argument("--float-targets", type=int, nargs="*", default=[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--clip-search", type=int, nargs="*", default=[1])
    args = ap.parse_args()

    from bench_methods import rtn_on_gptq_grid  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

    torch.manual_seed(0)
    _, tok = load_model()
    tune = devset.windows(tok, "tune").ids
    texts = {"shipped": None, "calib": [d.text for d in devset.documents("calib")],
             "training": [calibration.training_text()]}
    done = json.loads(JSON.read_text()) if JSON.exists() else []
    have = {r["key"] for r in done}

    def measure(key: str, apply, **info):
        if key in have:
            return next(r for r in done if r["key"] == key)
        model, _ = load_model()
        t0 = time.perf_counter()
        if apply is not None:
            apply(model)
        seconds = time.perf_counter() - t0
        nll = window_nll(model, tune, progress=False)
        row = dict(key=key, ppl=Perplexity(nll).ppl, nll=nll.tolist(), quantize_s=round(seconds, 1), **info)
        done.append(row)
        have.add(key)
        OUT.mkdir(exist_ok=True)
        JSON.write_text(json.dumps(done, indent=1) + "\n")
        write_md(done)
        return row

    base = measure("float32", None)
    print(f"float32 tune ppl {base['ppl']:.3f}", flush=True)
    for spec in args.grids:
        bits, group = grid(spec)
        rtn = measure(f"rtn {spec}", lambda m: rtn_on_gptq_grid(m, bits, group), grid=spec)
        print(f"rtn {spec}: {rtn['ppl']:.3f}", flush=True)
        for calib in args.calib:
            for damp in args.damps:
                for ft in args.float_targets:
                    for clip in args.clip_search:
                        cfg = GPTQConfig(bits=bits, group_size=group, sym=False, act_order=True, damp_percent=damp,
                                         float_targets=bool(ft), nsamples=args.nsamples, seqlen=args.seqlen,
                                         clip_search=bool(clip))
                        key = f"gptq {spec} calib={calib} damp={damp} ft={ft} n={args.nsamples}x{args.seqlen} clip={clip}"
                        row = measure(key, lambda m: qcompile.quantize(m, cfg, calibration=texts[calib], tokenizer=tok,
                                                                       progress=False),
                                      grid=spec, calib=calib, damp=damp, float_targets=ft, nsamples=args.nsamples,
                                      seqlen=args.seqlen, clip_search=clip)
                        share = (rtn["ppl"] - row["ppl"]) / (rtn["ppl"] - base["ppl"])
                        print(f"{key}: ppl {row['ppl']:.3f}  recovered {share:.0%}  ({row['quantize_s']} s)", flush=True)


if __name__ == "__main__":
    main()
