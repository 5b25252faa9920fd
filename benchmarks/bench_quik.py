"""QUIK on SmolLM2-135M: perplexity of W4A4 with float outlier columns, and linear-layer speed on CPU.

    python benchmarks/bench_quik.py --split tune      # choose the defaults (outlier share, groups)
    python benchmarks/bench_quik.py                   # the report table (--only NAME ... for some rows)
    python benchmarks/bench_quik.py --speed           # linear layers at M = 1, 16, 128, 512
    python benchmarks/bench_quik.py --speed --device cuda   # 4096-wide layers vs fp16 cuBLAS (GPU)

Perplexity: the development set's windows (`qcompile.tools.devset`; the report split unless
--split tune), exp(mean NLL) ± standard error over windows, "vs float32" paired over the same
windows. QUIK rows are `qcompile.quantize(model, QUIKConfig(...))` calibrated on the text that ships
with qcompile (no calibration= passed), the compiled model's path (eager here: the same ops). Every
quantized row keeps the int8 per-channel lm_head. "same weights, float x": the QUIK model with
every quik layer replaced by a float linear holding its dequantized weight — weight-only on exactly
QUIK's weights, so the ratio to it is what quantizing activations costs. "rtn w4a4 no outliers":
every decoder linear (down_proj too) round to nearest per channel, symmetric, activations 4-bit per
token, no float columns.

Speed: one linear of each SmolLM2 shape, median of repeats, 2 threads: float32 ``F.linear``;
qcompile's weight-only int4 (RTN g64, the default recipe's layers: the CPU int4 kernel, W4A8 at
M <= 8); QUIK (`QUIKConfig()`'s layer settings; W8A8 for down_proj's shape) eager and under
``torch.compile`` (Inductor fuses the activation quantization and the epilogue around the integer
GEMM, qcompile::quik_linear); the other weight grouping; the oneDNN int8 GEMM path.
Writes benchmarks/results/quik_smollm2[_tune].{md,json} or quik_cpu_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qcompile
from qcompile import QUIKConfig, lowering
from qcompile.formats import QuikWeight
from qcompile.methods import gptq, rtn
from qcompile.modules import QuantLinear, linear_modules
from qcompile.quantize import install, untie
from qcompile.report import GraphReport, Report
from qcompile.methods import plan_linear
from qcompile.tools import devset
from qcompile.tools.evaluate import Perplexity, paired_ratio_text, window_nll
from qcompile.tools.models import load_model

OUT = Path(__file__).parent / "results"
DEFAULT = QUIKConfig()


def rtn_w4a4(model) -> None:
    """Every decoder linear: symmetric per-channel 4-bit round to nearest, 4-bit activations, no outliers."""
    cfg = QUIKConfig(outliers=0, w8a8=())
    report = GraphReport(index=0, device="cpu")
    emb = model.get_input_embeddings()
    for path, mod, w in linear_modules(model):
        plan = plan_linear(cfg, path, w, w.device)
        if plan.data_free:
            q = rtn.quantize_int8(w, scale_dtype=cfg.scale_dtype)
        else:
            r = gptq.rtn_quantize(w, bits=4, group_size=None, sym=True, scale_dtype=cfg.scale_dtype)
            k = w.shape[1]
            q = QuikWeight((r.codes - 8).to(torch.int8), r.scales, torch.arange(k), torch.arange(0),
                           w.new_zeros(w.shape[0], 0, dtype=torch.float16), 4, 4)
            plan.reason = "W4A4 per channel sym, round to nearest, no outlier columns"
        report.linears.append(install(model, path, mod, q, plan, emb))
    untie(model)
    model.qcompile_report = Report(config={"method": "rtn-w4a4"}, graphs=[report])


def float_activations(model) -> None:
    """Replace each quik layer by a float linear holding its dequantized weight (weight-only)."""
    for path, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and mod.layout == "quik":
            w = lowering.unpack(mod.packed_weight()).dequantize(torch.float32)
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None)
            lin.weight.data, lin.bias = w, mod.bias
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, lin)


def quik(**kw):
    cfg = QUIKConfig(**kw)
    return lambda m: qcompile.quantize(m, cfg, progress=False)


def rows(split: str):
    """(name, quantize a fresh model or None, evaluate it with float activations too, note)."""
    yield "float32", None, False, ""
    if split == "tune":  # the choices the defaults come from
        for group in (None, 32):
            for share in (0.02, 0.05, 0.1):
                g = "per-channel" if group is None else f"g{group}"
                yield f"quik w4a4 {g} outliers {share}", quik(outliers=share, group_size=group), False, ""
        return
    yield "rtn w4a4 no outliers", rtn_w4a4, False, "collapses: no float columns, 4-bit down_proj"
    g = "per-channel" if DEFAULT.group_size is None else f"g{DEFAULT.group_size}"
    for share in (0.0, 0.02, 0.05, 0.1):
        default = share == DEFAULT.outliers
        yield (f"quik w4a4 {g} outliers {share}" + (" (default)" if default else ""), quik(outliers=share), default,
               "down_proj W8A8 with twice the float columns" + ("; QUIKConfig()" if default else ""))
    other = 32 if DEFAULT.group_size is None else None
    yield (f"quik w4a4 {'per-channel' if other is None else f'g{other}'} outliers {DEFAULT.outliers}",
           quik(group_size=other), False, "the other weight grouping" + (" (QUIK's own)" if other is None else ""))
    yield "quik all 4-bit", quik(w8a8=()), False, "down_proj W4A4 too (QUIK's 8.87 ablation)"
    yield "w8a8", quik(bits=8, act_bits=8, outliers=0, w8a8=(), group_size=None), False, "per-channel weights, per-token activations, no float columns"


def evaluate(split: str, only: list[str] | None) -> None:
    torch.manual_seed(0)
    _, tok = load_model()
    ids = devset.windows(tok, split).ids
    path = OUT / f"quik_smollm2{'_tune' if split == 'tune' else ''}.json"
    old = json.loads(path.read_text())["results"] if only and path.exists() else []
    results = []
    for name, apply, also_float_x, note in rows(split):
        if only and name != "float32" and not any(s in name for s in only):
            continue
        model, _ = load_model()
        t = time.perf_counter()
        if apply is not None:
            apply(model)
        seconds = time.perf_counter() - t
        evaluated = [(name, note)]
        for label, n in evaluated + ([(f"{name}: same weights, float x", "weight-only on QUIK's weights")]
                                     if also_float_x else []):
            if label != name:
                float_activations(model)
            nll = window_nll(model, ids, progress=False)
            p = Perplexity(nll)
            r = {"name": label, "ppl": round(p.ppl, 3), "se": round(p.se, 3), "nll": nll.tolist(),
                 "quantize_s": round(seconds, 1) if label == name else 0.0,
                 "load_avg": round(os.getloadavg()[0], 1), "note": n}
            results.append(r)
            old = [o for o in old if o["name"] != label]
            print(f"{label:<50} ppl {p.ppl:8.3f} ± {p.se:.3f}  quantize {seconds:6.1f} s  {n}", flush=True)
        del model
        write(results + old, split, path)


def write(results: list[dict], split: str, path: Path) -> None:
    by = {r["name"]: r for r in results}
    base = by.get("float32")
    lines = [f"# QUIK on SmolLM2-135M-Instruct (CPU), {split} split", "",
             f"`python benchmarks/bench_quik.py{' --split tune' if split == 'tune' else ''}` on {platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}. Development set {split} split "
             f"({len(base['nll']) if base else '-'} windows of 512 tokens), perplexity ± standard error over windows; "
             "\"vs float32\" paired over the same windows. QUIK: GPTQ (symmetric, clip search, damp 0.01, outlier "
             "columns last) calibrated on the text that ships with qcompile; activations per token, asymmetric. "
             "All quantized rows keep the int8 per-channel lm_head.", "",
             "| variant | perplexity | vs float32 | quantize (s) | note |", "|---|---|---|---|---|"]
    for r in results:
        rel = paired_ratio_text(r["nll"], base["nll"]) if base and r is not base else ""
        q = f"{r['quantize_s']:.0f}" if r["quantize_s"] else "-"
        lines.append(f"| {r['name']} | {r['ppl']:.2f} ± {r['se']:.2f} | {rel} | {q} | {r['note']} |")
    default = next((r for r in results if "(default)" in r["name"] and "float x" not in r["name"]), None)
    if split == "report" and base and default:
        f, d = base["ppl"], default["ppl"]
        lines += ["", "Floors:", f"- QUIK defaults: {d / f:.3f}x float32 (floor 1.6x) {'met' if d / f <= 1.6 else 'MISSED'}"]
        if "rtn w4a4 no outliers" in by:
            rr = by["rtn w4a4 no outliers"]["ppl"] / d
            lines.append(f"- RTN W4A4 without outliers / QUIK defaults: {rr:.1f}x (floor 10x) {'met' if rr >= 10 else 'MISSED'}")
        wo = by.get(default["name"] + ": same weights, float x")
        if wo:
            rw = d / wo["ppl"]
            lines.append(f"- activation quantization's cost, QUIK defaults / same weights with float x: {rw:.3f}x "
                         f"(floor 1.3x) {'met' if rw <= 1.3 else 'MISSED'}")
        if "w8a8" in by:
            r8 = by["w8a8"]["ppl"] / f
            lines.append(f"- W8A8: {r8:.3f}x float32 (floor 1.03x) {'met' if r8 <= 1.03 else 'MISSED'}")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(exist_ok=True)
    path.with_suffix(".md").write_text(text)
    path.write_text(json.dumps({"results": results}, indent=1) + "\n")
    print(text)


# --- speed ------------------------------------------------------------------------------------
SHAPES = {"q_proj / o_proj": (576, 576), "k_proj / v_proj": (192, 576), "gate_proj / up_proj": (1536, 576),
          "down_proj": (576, 1536),
          # what the compiled model runs: siblings fused into one op (passes/fuse_quantized.py), int4's too
          "q+k+v (one op)": (960, 576), "gate+up (one op)": (3072, 576)}


def median_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


@torch.no_grad()
def speed(repeats: int) -> None:
    from qcompile.methods import quik as quik_method

    torch.manual_seed(0)
    results = []
    for label, (n, k) in SHAPES.items():
        w = torch.randn(n, k) * 0.02
        int4 = lowering.pack(rtn.quantize_int4(w, 64, sym=False, search="minmax"), "cpu", "int8")
        path = "model.layers.0.mlp.down_proj" if label == "down_proj" else "model.layers.0.self_attn.q_proj"
        bits, act_bits = DEFAULT.layer_bits(path)
        variants = {}
        for group in (DEFAULT.group_size, 32 if DEFAULT.group_size is None else None):
            q, _, _ = quik_method.quik_quantize(w, torch.eye(k), torch.rand(k), outliers=DEFAULT.outlier_count(path, k),
                                                bits=bits, act_bits=act_bits, group_size=group)
            packed = lowering.pack(q, "cpu")
            variants[group] = (q, packed, torch.compile(lambda x, p=packed: p(x), backend="inductor", dynamic=False))
        q, packed, compiled = variants[DEFAULT.group_size]
        other_group, (_, _, other) = next((g, v) for g, v in variants.items() if g != DEFAULT.group_size)
        # the same layer through oneDNN's s8s8s32 GEMM (the canonical, unblocked codes: qcompile::int8_gemm)
        canonical = dict(packed.tensors, qweight=q.qweight, scales=q.scales, rowsum=q.rowsum(),
                         fp_weight=q.fp_weight.float())
        onednn = torch.compile(lambda x: torch.ops.qcompile.quik_mm(x, *canonical.values(), act_bits),
                               backend="inductor", dynamic=False)
        for m in (1, 16, 128, 512):
            x = torch.randn(m, k)
            t_f = median_us(lambda: F.linear(x, w), repeats)
            t_4 = median_us(lambda: int4(x), repeats)
            t_qe = median_us(lambda: packed(x), repeats)
            t_qc = median_us(lambda: compiled(x), repeats)
            t_o = median_us(lambda: other(x), repeats)
            t_d = median_us(lambda: onednn(x), repeats)
            r = {"layer": label, "n": n, "k": k, "m": m,
                 "quik": f"W{bits}A{act_bits}, {q.fp_idx.numel()} float columns",
                 "float32_us": round(t_f, 1), "int4_us": round(t_4, 1), "quik_eager_us": round(t_qe, 1),
                 "quik_compiled_us": round(t_qc, 1), "other_group": other_group, "other_compiled_us": round(t_o, 1),
                 "onednn_compiled_us": round(t_d, 1)}
            results.append(r)
            print(r, flush=True)
    lines = ["# QUIK linear layers on CPU (SmolLM2-135M shapes)", "",
             f"`python benchmarks/bench_quik.py --speed` on {platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}; median of {repeats} calls, microseconds; load avg {os.getloadavg()[0]:.1f} at the "
             "end. int4: qcompile's weight-only int4 (RTN g64; W4A8 kernel at M <= 8). QUIK: `QUIKConfig()`'s "
             f"layer settings (weight groups: {DEFAULT.group_size or 'per channel'}), symmetric weights, per-token "
             "asymmetric activations, qcompile::quik_linear (activation quantization, then blocked weights, VNNI, "
             "int32 sums scaled per group and the float columns, in one C++ op); compiled: under torch.compile. "
             "Last columns: the same layer with the other weight grouping, and through oneDNN's int8 GEMM (one "
             "per weight group), both compiled.", "",
             "| layer | N x K | M | QUIK | float32 | int4 | QUIK eager | QUIK compiled | compiled vs float32 | vs int4 "
             "| other grouping | oneDNN path |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        grouping = "per channel" if r["other_group"] is None else f"g{r['other_group']}"
        other = f"{r['other_compiled_us']:.0f} ({grouping})"
        lines.append(f"| {r['layer']} | {r['n']}x{r['k']} | {r['m']} | {r['quik']} | {r['float32_us']:.0f} | "
                     f"{r['int4_us']:.0f} | {r['quik_eager_us']:.0f} | {r['quik_compiled_us']:.0f} | "
                     f"{r['float32_us'] / r['quik_compiled_us']:.2f}x | {r['int4_us'] / r['quik_compiled_us']:.2f}x | "
                     f"{other} | {r['onednn_compiled_us']:.0f} |")
    lines += model_speed(max(3, repeats // 10))
    text = "\n".join(lines) + "\n"
    (OUT / "quik_cpu_speed.md").write_text(text)
    (OUT / "quik_cpu_speed.json").write_text(json.dumps({"results": results}, indent=1) + "\n")
    print(text)


@torch.no_grad()
def model_speed(repeats: int) -> list[str]:
    """SmolLM2-135M end to end: prefill of 512 tokens and bare greedy decode (static cache, one
    compiled step), float32 under Inductor, the default recipe (int4) and QUIKConfig() under
    backend=qcompile. QUIK's weights here come from a small calibration (8 windows): speed does not
    depend on their values."""
    from bench_decode import bare_decode, static_decode

    _, tok = load_model()
    ids = devset.windows(tok, "tune").ids[:1, :512]
    variants = {"float32 (Inductor)": (None, "inductor"), "default recipe (int4)": (None, qcompile),
                "QUIKConfig()": (QUIKConfig(nsamples=8), qcompile)}
    rows = []
    for name, (cfg, backend) in variants.items():
        model, _ = load_model()
        if cfg is not None:
            qcompile.quantize(model, cfg, progress=False)
        prefill = torch.compile(model, backend=backend)
        times = []
        for i in range(repeats + 2):
            t = time.perf_counter()
            prefill(ids, use_cache=False, logits_to_keep=1)
            times.append(time.perf_counter() - t)
        t_prefill = statistics.median(times[2:])
        torch._dynamo.reset()
        model = static_decode(model, {"backend": backend})
        tps, _ = bare_decode(model, ids[:, :32], 64, torch.device("cpu"), 3)
        rows.append((name, t_prefill, tps))
        print(name, f"prefill {t_prefill * 1e3:.0f} ms, decode {tps:.1f} tok/s", flush=True)
        torch._dynamo.reset()
        del model, prefill
    base = rows[0]
    lines = ["", "## SmolLM2-135M end to end", "",
             f"Prefill: one forward over 512 tokens (median of {repeats}); decode: bare greedy loop after a 32-token "
             "prompt, 64 tokens, static cache, one compiled step (median of 3). Compiled with Inductor (float32) or "
             "backend=qcompile.", "", "| model | prefill 512 (ms) | vs float32 | decode (tokens/s) | vs float32 |",
             "|---|---|---|---|---|"]
    for name, tp, tps in rows:
        lines.append(f"| {name} | {tp * 1e3:.0f} | {base[1] / tp:.2f}x | {tps:.1f} | {tps / base[2]:.2f}x |")
    return lines


@torch.no_grad()
def speed_cuda() -> None:
    """QUIK linear (W4A4 per channel, 256 float columns, QUIK's setting at 4096 wide) vs fp16 cuBLAS."""
    import triton.testing

    from qcompile.methods import quik as quik_method

    torch.manual_seed(0)
    lines = ["# QUIK linear layers on CUDA", "", f"`python benchmarks/bench_quik.py --speed --device cuda` on "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}; triton.testing.do_bench medians (ms). "
             "QUIK: W4A4 per channel, 256 fp16 columns, compiled (Inductor around the Triton int8 GEMM).", "",
             "| N x K | M | fp16 cuBLAS | QUIK | speedup |", "|---|---|---|---|---|"]
    results = []
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        w = torch.randn(n, k) * 0.02
        q, _, _ = quik_method.quik_quantize(w, torch.eye(k), torch.rand(k), outliers=256, bits=4, act_bits=4,
                                            group_size=None)
        packed = lowering.pack(q, "cuda")
        w16 = w.half().cuda()
        fn = torch.compile(lambda x: packed(x), dynamic=False)
        for m in (1, 16, 512, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16 = triton.testing.do_bench(lambda: F.linear(x, w16))
            tq = triton.testing.do_bench(lambda: fn(x))
            results.append({"n": n, "k": k, "m": m, "fp16_ms": t16, "quik_ms": tq})
            lines.append(f"| {n}x{k} | {m} | {t16:.4f} | {tq:.4f} | {t16 / tq:.2f}x |")
    text = "\n".join(lines) + "\n"
    (OUT / "quik_cuda_speed.md").write_text(text)
    (OUT / "quik_cuda_speed.json").write_text(json.dumps({"results": results}, indent=1) + "\n")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=("report", "tune"), default="report")
    ap.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    ap.add_argument("--speed", action="store_true", help="time linear layers instead")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="--speed on this device")
    args = ap.parse_args()
    if args.speed:
        speed_cuda() if args.device == "cuda" else speed(args.repeats)
    else:
        evaluate(args.split, args.only)


if __name__ == "__main__":
    main()
