"""The main job: the default model in float32 and through qcompile, side by side.

For each: greedy generation, perplexity on held-out text, decode tokens/s, weight bytes.
Run it with ``qcompile demo`` (see README).
"""
from __future__ import annotations

import statistics
import time

import torch

from .evaluate import held_out_text, perplexity
from .models import load_model
from .quantize import quantize

PROMPT = "The history of the Roman Empire is"


def model_bytes(model) -> dict:
    """Bytes of all tensors (shared ones once) and of the linear layers' weights."""
    from .modules import QuantLinear

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    linear = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            linear += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantLinear):
            linear += sum(getattr(m, n).numel() * getattr(m, n).element_size() for n in m._tensor_names)
    return {"total": total, "linear": linear}


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
    text = held_out_text()
    rows = {}

    print(f"[1/2] float32 eager: {model_name}", flush=True)
    fbytes = model_bytes(model)
    f_text, f_tps = _decode(model, tok, ids, tokens, repeats)
    f_ppl = perplexity(model, tok, text)
    rows["float32"] = dict(ppl=f_ppl, tok_s=f_tps, text=f_text, **fbytes)

    print("[2/2] qcompile: quantize, then torch.compile(model, backend=qcompile) (first compile takes minutes)", flush=True)
    t0 = time.perf_counter()
    quantize(model, config)
    qbytes = model_bytes(model)
    compiled = torch.compile(model, backend=qcompile.backend(config))
    q_text, q_tps = _decode(compiled, tok, ids, tokens, repeats)
    q_ppl = perplexity(compiled, tok, text)
    rows["qcompile"] = dict(ppl=q_ppl, tok_s=q_tps, text=q_text, setup_s=time.perf_counter() - t0, **qbytes)
    print(format_table(rows, model_name, tokens))
    return rows


def format_table(rows: dict, model_name: str, tokens: int) -> str:
    f, q = rows["float32"], rows["qcompile"]
    mib = 2**20
    lines = [
        "",
        f"{model_name}: float32 eager vs qcompile (default recipe, torch.compile)",
        f"{'':28}{'float32':>16}{'qcompile':>16}{'ratio':>10}",
        f"{'perplexity (GPL-3, 1024 tok)':28}{f['ppl']:>16.2f}{q['ppl']:>16.2f}{q['ppl'] / f['ppl']:>9.3f}x",
        f"{'decode tokens/s (greedy)':28}{f['tok_s']:>16.1f}{q['tok_s']:>16.1f}{q['tok_s'] / f['tok_s']:>9.2f}x",
        f"{'weight bytes, all (MiB)':28}{f['total'] / mib:>16.1f}{q['total'] / mib:>16.1f}{q['total'] / f['total']:>9.3f}x",
        f"{'weight bytes, linears (MiB)':28}{f['linear'] / mib:>16.1f}{q['linear'] / mib:>16.1f}{q['linear'] / f['linear']:>9.3f}x",
        "",
        f"greedy, {tokens} tokens, prompt {PROMPT!r}:",
        f"  float32 : {f['text']!r}",
        f"  qcompile: {q['text']!r}",
    ]
    return "\n".join(lines)
