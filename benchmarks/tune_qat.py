"""Choose DL-QAT's learning rates and LoRA scale on a calibration-side measure: the KL divergence
from the float model on the held-out tenth of the training text (the shipped calibration text).
No development-set text is read.

    python benchmarks/tune_qat.py [--steps 20] [--bits 3] [--init gptq]

Each candidate starts from the same prepared W3 g64 grid (GPTQ act_order on the shipped text, the
default; `--init rtn`: round to nearest) and trains `--steps` steps of 4 x 512 tokens; the grid and the
teacher's targets are computed once. "LoRA lr 0" trains the magnitudes alone (B stays 0).
Writes benchmarks/results/tune_qat[_rtn].{md,json}.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import qcompile
from qcompile.qat import distill as qat_train
from qcompile.tools.models import load_model

OUT = Path(__file__).parent / "results"
CANDIDATES = [  # (name, DLQATConfig fields); alpha = rank (scaling 1): under Adam the LoRA lr sets the step
    ("LoRA lr 0 (magnitudes only), magnitude lr 1e-3", dict(lr=0.0, magnitude_lr=1e-3)),
    ("LoRA lr 3e-3, magnitude lr 1e-3", dict(lr=3e-3, magnitude_lr=1e-3)),
    ("LoRA lr 1e-2, magnitude lr 1e-3", dict(lr=1e-2, magnitude_lr=1e-3)),
    ("LoRA lr 1e-2, magnitude lr 3e-3", dict(lr=1e-2, magnitude_lr=3e-3)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--init", choices=["gptq", "rtn"], default="gptq")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base, tok = load_model("smollm2")
    teacher = copy.deepcopy(base).eval()
    cache = {}
    real = qat_train.teacher_targets

    def cached(*a, **k):  # the same text and teacher for every candidate
        if "t" not in cache:
            cache["t"] = real(*a, **k)
        return cache["t"]

    qat_train.teacher_targets = cached
    prepared = copy.deepcopy(base)
    qcompile.qat.prepare(prepared, qcompile.DLQATConfig(bits=args.bits, group_size=64, init=args.init),
                         tokenizer=tok, progress=True)
    rows = []
    for name, fields in CANDIDATES:
        if args.only and not any(s in name for s in args.only):
            continue
        cfg = qcompile.DLQATConfig(bits=args.bits, group_size=64, init=args.init, steps=args.steps, eval_every=10,
                                   **fields)
        model = copy.deepcopy(prepared)
        t = time.perf_counter()
        r = qcompile.qat.train(model, teacher, tokenizer=tok, config=cfg)
        rows.append({"name": name, "fields": fields, "initial_kl": r.initial_heldout_kl, "best_kl": r.best_heldout_kl,
                     "best_step": r.best_step, "heldout": r.heldout, "seconds": time.perf_counter() - t})
        print(rows[-1], flush=True)
        del model
    init = {"gptq": "GPTQ act_order", "rtn": "RTN"}[args.init]
    head = (f"# DL-QAT learning rates (SmolLM2-135M, W{args.bits} g64 from {init}, {args.steps} steps x 4 x 512 tokens)\n\n"
            f"`python benchmarks/tune_qat.py --steps {args.steps} --bits {args.bits} --init {args.init}` on {platform.machine()}, torch "
            f"{torch.__version__}. Measure: KL divergence from the float model on the held-out tenth of the shipped "
            "calibration text (calibration side; no development-set text). Lower is better.\n\n"
            "| candidate | held-out KL before | best held-out KL | at step | train time (s) |\n|---|---|---|---|---|\n")
    body = "".join(f"| {r['name']} | {r['initial_kl']:.4f} | {r['best_kl']:.4f} | {r['best_step']} | {r['seconds']:.0f} |\n"
                   for r in rows)
    OUT.mkdir(exist_ok=True)
    stem = "tune_qat" if args.init == "gptq" else "tune_qat_rtn"
    (OUT / f"{stem}.md").write_text(head + body)
    (OUT / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    print(head + body)


if __name__ == "__main__":
    main()
