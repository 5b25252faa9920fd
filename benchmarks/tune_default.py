"""Choosing the default (data-free) recipe's settings on the development set's tune split.

    python benchmarks/tune_default.py [--only NAME ...]

The default recipe (`torch.compile(model, backend=qcompile)`, `qcompile.quantize(model)`) cannot
calibrate: int4 groups fitted by HQQ, optionally weighting each input channel by the gain of the
norm that feeds it. Each row quantizes SmolLM2-135M one way and measures perplexity on the tune
split (`qcompile.tools.devset`, 28 windows of 512 tokens), paired against float32 on the same
windows, plus model bytes. Which blocks to keep at int8 follows a per-type/per-block sensitivity
sweep on the same tune split (each leaving one layer type or block in float). Never the report split: its numbers are bench_methods.py's.
Writes benchmarks/results/tune_default.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path


import qcompile
from qcompile import RTNConfig
from qcompile.methods import rtn
from qcompile.tools import devset
from qcompile.tools.evaluate import Perplexity, model_bytes, window_nll
from qcompile.tools.models import load_model

OUT = Path(__file__).parent / "results"


@contextmanager
def hqq(p: float = rtn._HQQ_P, iters: int = rtn._HQQ_ITERS):
    """HQQ's Lp exponent and iteration count for the block (module constants of qcompile.methods.rtn)."""
    before = rtn._HQQ_P, rtn._HQQ_ITERS
    rtn._HQQ_P, rtn._HQQ_ITERS = p, iters
    try:
        yield
    finally:
        rtn._HQQ_P, rtn._HQQ_ITERS = before


VARIANTS = {  # name: (config, HQQ settings)
    "default (hqq p0.7 g64, norm-weighted)": (RTNConfig(), {}),
    "no norm weighting": (RTNConfig(norm_weighting=False), {}),
    "hqq p0.5": (RTNConfig(), {"p": 0.5}),
    "hqq p1.0": (RTNConfig(), {"p": 1.0}),
    "hqq 60 iterations": (RTNConfig(), {"iters": 60}),
    "minmax g64": (RTNConfig(search="minmax"), {}),
    "last block int8": (RTNConfig(int8=("model.layers.29.*",)), {}),
    "last 2 blocks int8": (RTNConfig(int8=("model.layers.28.*", "model.layers.29.*")), {}),
    "first and last block int8": (RTNConfig(int8=("model.layers.0.*", "model.layers.29.*")), {}),
    "last block's down_proj int8": (RTNConfig(int8=("model.layers.29.mlp.down_proj",)), {}),
}
# No group-32 row: the test model's weights sit on its GGUF file's Q4_1 grid (blocks of 32), so
# int4 g32 recovers them almost exactly (1.0004x float32 measured): a property of the file, not of
# the method (../shared/reference/torch-notes.md).


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    _, tok = load_model()
    ids = devset.windows(tok, "tune").ids
    model, _ = load_model()
    base = Perplexity(window_nll(model, ids, progress=False))
    rows = [{"name": "float32", "ppl": base.ppl, "se": base.se, "ratio": 1.0, "ratio_se": 0.0, "seconds": 0,
             "mib": model_bytes(model)["total"] / 2**20}]
    print(f"float32 {base.ppl:.3f} ± {base.se:.3f}", flush=True)
    for name, (config, settings) in VARIANTS.items():
        if args.only and not any(o in name for o in args.only):
            continue
        model, _ = load_model()
        t = time.perf_counter()
        with hqq(**settings):
            qcompile.quantize(model, config, progress=False)
        seconds = time.perf_counter() - t
        ppl = Perplexity(window_nll(model, ids, progress=False))
        ratio, ratio_se = ppl.ratio_to(base)
        rows.append({"name": name, "ppl": ppl.ppl, "se": ppl.se, "ratio": ratio, "ratio_se": ratio_se,
                     "seconds": round(seconds, 1), "mib": model_bytes(model)["total"] / 2**20})
        print(f"{name:<40} {ppl.ppl:.3f} ± {ppl.se:.3f}  {ratio:.4f}x ± {ratio_se:.4f}  {seconds:.1f} s", flush=True)
        write(rows)


def write(rows: list[dict]) -> None:
    (OUT / "tune_default.json").write_text(json.dumps(rows, indent=1))
    lines = ["# Default recipe settings on the tune split (SmolLM2-135M)", "",
             "`python benchmarks/tune_default.py`: perplexity on the development set's tune split (28 windows of 512 "
             "tokens) ± standard error over windows; vs float32 paired over the same windows. Weights: whole model "
             "(int8 lm_head, tied embedding).", "",
             "| variant | perplexity | vs float32 | quantize (s) | model MiB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ppl']:.3f} ± {r['se']:.3f} | {r['ratio']:.4f}x ± {r['ratio_se']:.4f} "
                     f"| {r['seconds']} | {r['mib']:.1f} |")
    (OUT / "tune_default.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
