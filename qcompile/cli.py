"""Command line: ``qcompile demo`` (the main job) and ``qcompile inspect`` (the report for a model)."""
from __future__ import annotations

import argparse
import json
import sys


def _config(args):
    from .config import RTNConfig

    if args.group_size is None and args.bits is None and not args.minmax:
        return None  # the default recipe
    kw = {}
    if args.group_size is not None:
        kw["group_size"] = None if args.group_size <= 0 else args.group_size
    if args.minmax:
        kw["search"] = "minmax"
    return RTNConfig(**kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qcompile", description="Quantized LLMs through torch.compile.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("demo", "float32 vs qcompile on a model: text, perplexity, tokens/s, bytes"),
                        ("inspect", "print what qcompile does to each layer of a model")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local Hugging Face folder")
        s.add_argument("--group-size", type=int, default=None, help="int4 group size (0: per channel)")
        s.add_argument("--bits", type=int, default=None, help=argparse.SUPPRESS)
        s.add_argument("--minmax", action="store_true", help="plain round-to-nearest grid instead of the fitted one")
    sub.choices["demo"].add_argument("--tokens", type=int, default=64)
    sub.choices["demo"].add_argument("--repeats", type=int, default=3)
    sub.choices["inspect"].add_argument("--json", action="store_true", help="print the report as JSON")
    sub.choices["inspect"].add_argument("--graphs", action="store_true", help="also print each graph after the passes")
    args = p.parse_args(argv)

    if args.cmd == "demo":
        from .demo import run

        run(args.model, tokens=args.tokens, repeats=args.repeats, config=_config(args))
        return 0

    import torch

    from .explain import explain
    from .models import load_model

    model, tok = load_model(args.model)
    ids = tok("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        report = explain(model, ids, config=_config(args))
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1)
    else:
        print(report)
        if args.graphs:
            for g in report.graphs:
                for pr in g.passes:
                    print(f"\n# graph {g.index}, after pass {pr.name}\n{pr.after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
