"""Time to the first token in a fresh process, compile caches cold and warm (CPU).

    python benchmarks/bench_first_token.py [--repeats 2] [--tokens 8]

Each run is a new Python process doing what a user's script does: import torch and qcompile, load
the default model (its converted Hugging Face folder, already in qcompile's cache),
``torch.compile(model, backend=qcompile)``, greedy ``generate()``. Times are from the moment the
parent starts the process to the first generated token (the prefill graph compiled and run) and to
the second (the first decode step's graph compiled and run), with the phases before them.

cold: an empty Inductor cache (TORCHINDUCTOR_CACHE_DIR) and empty qcompile caches ($QCOMPILE_CACHE:
the C++ kernels build again, the weights are quantized again); warm: the same directories again,
as a user's second run finds them. Writes benchmarks/results/first_token_cpu.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the Roman Empire is"


def child(tokens: int) -> None:
    """One user run; prints its timestamps (time.time()) as JSON on the last line."""
    stamps = {}
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    import qcompile
    from qcompile.tools.models import load_model
    stamps["imported"] = time.time()
    model, tok = load_model("smollm2")
    stamps["loaded"] = time.time()
    model = torch.compile(model, backend=qcompile)
    steps = []

    class Clock(LogitsProcessor):
        """Changes nothing; notes when each step's logits are ready."""
        def __call__(self, input_ids, scores):
            steps.append(time.time())
            return scores

    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([Clock()]))
    stamps.update(first_token=steps[0], second_token=steps[1], done=time.time())
    text = tok.decode(out[0, ids["input_ids"].shape[1]:])
    print(json.dumps(dict(stamps=stamps, text=text, threads=torch.get_num_threads(), torch=torch.__version__)))


def run_once(env: dict, tokens: int) -> dict:
    start = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", "--tokens", str(tokens)], env=env,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"the child process failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    s = r["stamps"]
    r["seconds"] = {"import torch + qcompile": s["imported"] - start, "load model": s["loaded"] - s["imported"],
                    "first token": s["first_token"] - start, "second token": s["second_token"] - start,
                    f"all {tokens} tokens": s["done"] - start}
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="cold and warm runs each (a fresh cache per cold run)")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.tokens)
    if args.tokens < 2:
        p.error("--tokens must be >= 2 (the second token times the decode graph)")
    from qcompile.tools.models import _smollm2_dir, cache_dir

    model_dir = _smollm2_dir()  # converted once here, so no run times the GGUF conversion
    runs = {"cold": [], "warm": []}
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="qcompile-first-token-") as tmp:
            qc = Path(tmp) / "qcompile"
            qc.mkdir()
            (qc / model_dir.name).symlink_to(model_dir)
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor"), QCOMPILE_CACHE=str(qc))
            env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
            for kind in ("cold", "warm"):
                r = run_once(env, args.tokens)
                runs[kind].append(r)
                print(f"{kind} run {i + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["seconds"].items()), flush=True)
    phases = list(runs["cold"][0]["seconds"])
    med = {k: {ph: statistics.median(r["seconds"][ph] for r in rs) for ph in phases} for k, rs in runs.items()}
    same = all(r["text"] == runs["cold"][0]["text"] for rs in runs.values() for r in rs)
    import torch

    lines = [f"# Time to the first token in a fresh process (CPU, {platform.processor() or platform.machine()}, "
             f"{runs['cold'][0]['threads']} threads, torch {torch.__version__}, {cache_dir() / model_dir.name} "
             "already converted)", "",
             f"`python benchmarks/bench_first_token.py --repeats {args.repeats} --tokens {args.tokens}`: each run a new "
             "process: import, load SmolLM2-135M, torch.compile(model, backend=qcompile), greedy generate() of "
             f"{args.tokens} tokens (dynamic cache, the README's usage). Seconds from process start, median of "
             f"{args.repeats}; cold: empty Inductor and qcompile caches (C++ kernels, quantized weights), warm: the same "
             "caches on the next run. "
             f"Load average at the end: {os.getloadavg()[0]:.2f}.", "",
             "| caches | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for kind in runs:
        lines.append(f"| {kind} | " + " | ".join(f"{med[kind][ph]:.1f}" for ph in phases) + " |")
    lines += ["", f"Every run generated the same text: {'yes' if same else 'no'} ({runs['cold'][0]['text']!r})."]
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "first_token_cpu.md").write_text(table + "\n")
    (RESULTS / "first_token_cpu.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
