"""The main job: the default model in float32 and through qcompile, side by side.

For each: greedy generation, perplexity on the development set's report split (`qcompile.tools.devset`),
decode tokens/s, weight bytes.
Run it with ``qcompile demo`` (see README).
"""
from __future__ import annotations

import statistics
import time

import torch

from . import devset
from .evaluate import Perplexity, model_bytes, window_nll
from .models import load_model
from ..quantize import quantize

PROMPT = "The history of the Roman Empire is"


def _decode(model, tok, ids, tokens: int, repeats: int):
    gen = dict(do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tok.eos_token_id)
    out = model.generate(ids, **gen)  # also the warm-up (compiles the decode graphs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(ids, **gen)
        times.append(time.perf_counter() - t0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), tokens / statistics.median(times)


@torch.no_grad()
def run(model_name: str = "smollm2", tokens: int = 64, repeats: int = 3, prompt: str = PROMPT, config=None) -> dict:
    import qcompile

    model, tok = load_model(model_name)
    ids = tok(prompt, return_tensors="pt").input_ids
    windows = devset.windows(tok, "report").ids
    rows = {}

    print(f"[1/2] float32 eager: {model_name}", flush=True)
    fbytes = model_bytes(model)
    f_text, f_tps = _decode(model, tok, ids, tokens, repeats)
    f_ppl = Perplexity(window_nll(model, windows, desc="float32 perplexity"))
    rows["float32"] = dict(ppl=f_ppl, tok_s=f_tps, text=f_text, **fbytes)

    print("[2/2] qcompile: quantize, then torch.compile(model, backend=qcompile) (first compile takes minutes)", flush=True)
    t0 = time.perf_counter()
    quantize(model, config)
    qbytes = model_bytes(model)
    compiled = torch.compile(model, backend=qcompile.backend(config))
    q_text, q_tps = _decode(compiled, tok, ids, tokens, repeats)
    q_ppl = Perplexity(window_nll(compiled, windows, desc="qcompile perplexity"))
    rows["qcompile"] = dict(ppl=q_ppl, tok_s=q_tps, text=q_text, setup_s=time.perf_counter() - t0, **qbytes)
    print(format_table(rows, model_name, tokens))
    return rows


def format_table(rows: dict, model_name: str, tokens: int) -> str:
    f, q = rows["float32"], rows["qcompile"]
    mib = 2**20
    ratio, ratio_se = q["ppl"].ratio_to(f["ppl"])
    n = f["ppl"].nll.numel()
    lines = [
        "",
        f"{model_name}: float32 eager vs qcompile (default recipe, torch.compile)",
        f"{'':28}{'float32':>16}{'qcompile':>16}{'ratio':>10}",
        f"{'perplexity (dev set)':28}{f['ppl'].ppl:>9.2f} ± {f['ppl'].se:<4.2f}{q['ppl'].ppl:>9.2f} ± {q['ppl'].se:<4.2f}"
        f"{ratio:>7.3f} ± {ratio_se:.3f}",
        f"{'decode tokens/s (greedy)':28}{f['tok_s']:>16.1f}{q['tok_s']:>16.1f}{q['tok_s'] / f['tok_s']:>9.2f}x",
        f"{'weight bytes, all (MiB)':28}{f['total'] / mib:>16.1f}{q['total'] / mib:>16.1f}{q['total'] / f['total']:>9.3f}x",
        f"{'weight bytes, linears (MiB)':28}{f['linear'] / mib:>16.1f}{q['linear'] / mib:>16.1f}{q['linear'] / f['linear']:>9.3f}x",
        f"(perplexity: {n} windows of 512 tokens from 9 documents of 3 kinds, ± standard error over"
        " windows; the ratio is paired)",
        "",
        f"greedy, {tokens} tokens, prompt {PROMPT!r}:",
        f"  float32 : {f['text']!r}",
        f"  qcompile: {q['text']!r}",
    ]
    return "\n".join(lines)
