"""Command line: ``qcompile demo`` (the main job), ``qcompile inspect`` (the report for a model) and
``qcompile eval`` (perplexity and weight bytes, float vs quantized)."""
from __future__ import annotations

import argparse
import json
import sys


def _config(args):
    from ..config import RTNConfig

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
        s.add_argument("--group-size", type=int, default=None, help="int4 group size (-1 or 0: per channel)")
        s.add_argument("--bits", type=int, default=None, help=argparse.SUPPRESS)
        s.add_argument("--minmax", action="store_true", help="plain round-to-nearest grid instead of the fitted one")
    sub.choices["demo"].add_argument("--tokens", type=int, default=64)
    sub.choices["demo"].add_argument("--repeats", type=int, default=3)
    sub.choices["inspect"].add_argument("--json", action="store_true", help="print the report as JSON")
    sub.choices["inspect"].add_argument("--graphs", action="store_true", help="also print each graph after the passes")
    e = sub.add_parser("eval", help="perplexity and weight bytes: float vs quantized, side by side")
    e.add_argument("--model", default="smollm2", help="'smollm2' (bundled) or a local Hugging Face folder")
    e.add_argument("--config", default="default",
                   help="'default', 'minmax', a method name (rtn, gptq, ganq, quik, dlqat: its defaults, the shipped calibration text), or a checkpoint folder (qcompile or GPTQ)")
    e.add_argument("--text", default=None, help="text file to measure on (default: the development set's report split, 52 windows from 9 documents of 3 kinds; see qcompile.tools.devset)")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--max-tokens", type=int, default=0, help="with --text: use its first N tokens (0: all)")
    e.add_argument("--compile", action="store_true", help="run the quantized model through torch.compile(backend=qcompile)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    if args.cmd == "eval":
        return _eval(args)

    if args.cmd == "demo":
        from .demo import run

        run(args.model, tokens=args.tokens, repeats=args.repeats, config=_config(args))
        return 0

    import torch

    from ..explain import explain
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


def _eval(args) -> int:
    from pathlib import Path

    from .evaluate import compare, format_comparison

    text = None
    if args.text is not None:
        if not Path(args.text).is_file():
            print(f"qcompile eval: --text {args.text}: no such file", file=sys.stderr)
            return 2
        text = Path(args.text).read_text()
    results: dict = {}
    try:
        compare(args.model, args.config, text=text, seqlen=args.seqlen, max_tokens=args.max_tokens or None,
                compile=args.compile, progress=not args.no_progress, results=results)
    except KeyboardInterrupt:
        print("\nqcompile eval: interrupted", file=sys.stderr)
        if "float" in results:
            print(format_comparison(results, args.model, args.seqlen))
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        # a bad --config or checkpoint, too short a text, a method that needs calibration data
        print(f"qcompile eval: {err}", file=sys.stderr)
        return 2
    print(format_comparison(results, args.model, args.seqlen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
