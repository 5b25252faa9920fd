"""End-to-end greedy decode on the default model: float eager, float Inductor, qcompile, torchao.

    python benchmarks/bench_decode.py [--tokens 64] [--repeats 5] [--model smollm2]
    python benchmarks/bench_decode.py --arch llama-1b     # random weights, no files needed (GPU)
    python benchmarks/bench_decode.py --checkpoint DIR ... # also models saved by qcompile.save
    python benchmarks/bench_decode.py --arch llama-8b --static --tokens 64 --repeats 3   # GPU: CUDA graphs

Every variant runs in this one process on a fresh copy of the model, so the ratios compare like
with like (timings on a shared 2-core machine drift; compare ratios from one run). Per variant:
  first token  time of the first generate(max_new_tokens=1): quantization + compile of the prefill graph
  warm-up      the next generate of --tokens tokens (compiles the decode graphs)
  tok/s        --tokens / median time of --repeats generates after that
Writes benchmarks/results/decode_<device>[_<arch>][_<name>].md and .json. torchao runs when it is installed.
--arch builds a named architecture with random weights (speed does not depend on the values; the
text column is then meaningless) for machines without the model files, such as the GPU machine.
Float baselines run in float32 on CPU and bfloat16 on CUDA (--dtype overrides).
Inductor's on-disk caches are off (a warm cache would hide compile time); --warm-cache keeps them.

--static: the decode path people deploy: a static KV cache and every compiled variant compiled with
mode="reduce-overhead" (CUDA graphs on CUDA; on CPU the same graphs run without them). The forward
is compiled for the decode steps (one new token) and the prefill runs eagerly, as generate()'s own
automatic compilation does: transformers marks the static cache's tensors as fixed addresses only
when the cache is made outside a compiled region (by the prefill); a compiled prefill leaves them
ordinary inputs that CUDA graphs copy on every step. generate()'s automatic compilation is switched
off (disable_compile): on CUDA it would wrap the forward in its own torch.compile(Inductor), which
inlines a compiled forward, so the backend under test would never run. Per variant:
  first generate  time of the first generate of --tokens tokens: quantization, compile, CUDA graph recording
  warm-up         the next generate
  decode tok/s    decode steps after the first one (whose CUDA graphs are re-recorded for each
                  generate's new cache) / their time: median of --repeats generates (fewer when a
                  variant has run past --max-seconds)
  generate tok/s  --tokens / median time of a whole generate (prefill included)
  bare loop tok/s (--bare) --tokens / median time of a bare greedy loop over the same compiled forward
                  and a static cache (prefill included, no generate(): `bare_decode`)
The table says per row whether CUDA graphs were recorded (with Inductor's count of skipped graphs
and of non-static inputs, which graph replays copy: weights there mean a copy of them per step) and
which cache generate() used. A variant that fails is a row with the reason, not a crash. Results go
to decode_<device>_<arch>_static[_<name>].md/.json; --append merges rows into an existing file
(one process per variant, as benchmarks/gpu_decode.sh runs them).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--warm-cache" not in sys.argv:
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # must precede importing torch

import torch

import qcompile
from qcompile.tools.evaluate import model_bytes
from qcompile.tools.models import load_model

RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the Roman Empire is"


# Random-weight architectures (Hugging Face Llama configs) for --arch.
ARCHS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def random_model(arch: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in `dtype` on `device`: an 8B model never exists in float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**ARCHS[arch], max_position_embeddings=2048))
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()  # float buffers (rotary inv_freq) in `dtype` too, as before


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompt(tok, device) -> tuple[torch.Tensor, dict]:
    """(prompt ids, greedy generate() kwargs): PROMPT through the tokenizer, or 8 fixed random ids
    for a random-weight architecture (no tokenizer)."""
    if tok is None:
        ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
        return ids, dict(do_sample=False, pad_token_id=0)
    return tok(PROMPT, return_tensors="pt").input_ids.to(device), dict(do_sample=False, pad_token_id=tok.eos_token_id)


def measure(name, make, tok, args, device):
    torch._dynamo.reset()  # each variant compiles from scratch, within the recompile limit
    model = make()
    ids, gen = prompt(tok, device)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **gen)
        synchronize(device)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **gen)
        synchronize(device)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, **gen)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    row = {"variant": name, "first_token_s": round(first, 1), "warmup_s": round(warm, 1),
           "tok_s": round(args.tokens / statistics.median(times), 1),
           "weight_MiB": round(model_bytes(getattr(model, "_orig_mod", model))["total"] / 2**20, 1),
           "text": "-" if tok is None else tok.decode(out[0, ids.shape[1]:ids.shape[1] + 16])}
    print(f"  {name}: {row}", flush=True)
    return row


# --- --static: static KV cache, compiled decode steps (CUDA graphs on CUDA) ---------------------------
REDUCE_OVERHEAD = dict(mode="reduce-overhead")
UNGUARDED_VARIANT = "qcompile (backend=qcompile), nn.Module guards skipped"
CPP_WRAPPER_VARIANT = "qcompile (backend=qcompile), cpp_wrapper"


def option_variants() -> dict:
    """CPU rows of backend=qcompile compiled with torch.compile options (flag: (variant, options)).
    skip-module-guards: Dynamo stops guarding nn.Module attributes (unsafe: a module changed after
    compiling is not noticed); cpp-wrapper: Inductor's wrapper around the kernels in C++, not Python."""
    return {"skip_module_guards": (UNGUARDED_VARIANT,
                                   {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}),
            "cpp_wrapper": (CPP_WRAPPER_VARIANT, {"cpp_wrapper": True})}


def static_decode(model, compile_kwargs: dict | None):
    """`model` generating with a static KV cache; its forward compiled with `compile_kwargs` for the
    decode steps (one new token), the prefill eager (see the module docstring). None: eager."""
    import functools

    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # else generate() on CUDA compiles the forward itself
    model._bench_compiled = compile_kwargs is not None
    if compile_kwargs is None:
        return model
    forward = model.forward
    compiled = torch.compile(forward, **compile_kwargs)

    @functools.wraps(forward)  # generate() reads the forward's signature
    def decode_compiled(*args, **kwargs):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        step = compiled if ids is not None and ids.shape[-1] == 1 else forward
        return step(*args, **kwargs)

    model.forward = decode_compiled
    return model


def bare_decode(model, ids, tokens: int, device, repeats: int) -> tuple[float, list[int]]:
    """(tokens/s, tokens) of a bare greedy loop: one static KV cache, the prefill, then one forward
    per token with argmax between (no generate(), no logits processors); median of `repeats` after
    one warm-up. The model's forward as static_decode left it (compiled for one-token steps)."""
    from transformers import StaticCache

    n = ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n + tokens)

    def run() -> list[int]:
        cache.reset()
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device=device),
                    use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        got = [nxt]
        for i in range(tokens - 1):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([n + i], device=device))
            nxt = out.logits[:, -1:].argmax(-1)
            got.append(nxt)
        synchronize(device)
        return torch.cat(got, -1)[0].tolist()

    with torch.no_grad():
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            text = run()
            times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times), text


def _counts() -> dict:
    c = torch._dynamo.utils.counters
    return {"graphs": c["stats"]["unique_graphs"], "cudagraph_skips": c["inductor"]["cudagraph_skips"],
            "non_static_inputs": c["inductor"]["cudagraph_recorded_non_static_inputs"]}


def _weight_mib(model) -> float:
    try:
        return round(model_bytes(model)["total"] / 2**20, 1)
    except Exception:  # tensor subclasses (torchao) have no data_ptr: count their inner tensors
        def nbytes(t):
            if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
                return sum(nbytes(getattr(t, n)) for n in t.__tensor_flatten__()[0])
            return t.numel() * t.element_size()
        seen = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        return round(sum(nbytes(t) for t in seen.values()) / 2**20, 1)


def measure_static(name, make, tok, args, device):
    """One --static variant; a failure becomes a row with its reason."""
    import traceback

    from transformers import LogitsProcessor, LogitsProcessorList

    class DecodeClock(LogitsProcessor):
        """Changes nothing; when the second step's logits arrive (the first decode step done), waits
        for the device and notes the time: the decode phase is timed from there to the end."""
        def __init__(self):
            self.calls, self.t = 0, None

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 2:
                synchronize(device)
                self.t = time.perf_counter()
            return scores

    torch._dynamo.reset()
    start, before = time.perf_counter(), _counts()
    row, model = {"variant": name}, None
    try:
        model = make()
        ids, gen = prompt(tok, device)
        clock = DecodeClock()
        gen.update(max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                   logits_processor=LogitsProcessorList([clock]))
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(ids, return_dict_in_generate=True, **gen)
            synchronize(device)
            first = time.perf_counter() - t0
            cache = next((out[k] for k in ("cache", "past_key_values") if k in out), None)  # name varies
            text = "-" if tok is None else tok.decode(out.sequences[0, ids.shape[1]:ids.shape[1] + 16])
            out_ids = out.sequences[0, ids.shape[1]:].tolist()
            del out
            t0 = time.perf_counter()
            model.generate(ids, **gen)
            synchronize(device)
            warm = time.perf_counter() - t0
            warm_counts, totals, decodes = _counts(), [], []
            while len(totals) < args.repeats:
                if totals and args.max_seconds and time.perf_counter() - start > args.max_seconds:
                    print(f"  {name}: past --max-seconds {args.max_seconds}: {len(totals)} timed generate(s)")
                    break
                clock.calls = 0
                t0 = time.perf_counter()
                model.generate(ids, **gen)
                synchronize(device)
                t1 = time.perf_counter()
                totals.append(t1 - t0)
                decodes.append(t1 - clock.t)
            timed_counts = _counts()  # before the bare loop, which compiles its own graph
            if args.bare:
                bare, bare_ids = bare_decode(model, ids, args.tokens, device, max(1, len(totals)))
                row.update(bare_tok_s=round(bare, 1),
                           bare_matches_generate=bare_ids == out_ids[:len(bare_ids)])
        after = {k: v - before[k] for k, v in _counts().items()}
        if device.type != "cuda":
            graphs = "no (CPU)"
        elif not model._bench_compiled:
            graphs = "no (eager)"
        elif after["non_static_inputs"] == 0:
            graphs = f"no ({after['cudagraph_skips']} skipped)"
        else:
            graphs = "yes" if not after["cudagraph_skips"] else f"partly ({after['cudagraph_skips']} skipped)"
            graphs += f", {after['non_static_inputs']} non-static inputs"
        row.update(decode_tok_s=round((args.tokens - 2) / statistics.median(decodes), 1),
                   generate_tok_s=round(args.tokens / statistics.median(totals), 1), timed=len(totals),
                   cuda_graphs=graphs, cache=type(cache).__name__ if cache is not None else "?",
                   graphs=after["graphs"], recompiled_while_timed=timed_counts["graphs"] > warm_counts["graphs"],
                   first_s=round(first, 1), warmup_s=round(warm, 1), weight_MiB=_weight_mib(model), text=text,
                   counters=after)
    except Exception as e:
        traceback.print_exc()
        row["skipped"] = (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]
    finally:
        del model
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"  {name}: {row}", flush=True)
    return row


def write_static(new_rows, args, device, stem):
    """The --static table; with --append, rows of an earlier run in the same file are kept (a row of
    the same variant is replaced)."""
    import transformers

    path = RESULTS / f"{stem}.json"
    rows = json.loads(path.read_text()) if args.append and path.exists() else []
    names = [r["variant"] for r in new_rows]
    rows = [r for r in rows if r["variant"] not in names] + new_rows
    fname = str(args.dtype).removeprefix("torch.")
    ind = next((r.get("decode_tok_s") for r in rows if r["variant"] == f"{fname} Inductor"), None)
    what = f"{args.arch} (random weights)" if args.arch else args.model
    where = (torch.cuda.get_device_name() if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [f"# Greedy decode, {what}, batch 1, {args.tokens} new tokens, static KV cache, compiled rows with "
             f'mode="reduce-overhead", median of {args.repeats} ({device}: {where}, torch {torch.__version__}, '
             f"transformers {transformers.__version__})", "",
             f"| variant | decode tok/s | vs {fname} Inductor | generate tok/s | bare loop tok/s | CUDA graphs "
             "| KV cache | graphs | first generate (s) | warm-up (s) | weights MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | - | - | - | skipped: {r['skipped']} |")
            continue
        vs = f"{r['decode_tok_s'] / ind:.2f}x" if ind else "-"
        note = "; ".join(n for n in (f"{r['timed']} timed" if r["timed"] < args.repeats else "",
                                     "recompiled while timed" if r["recompiled_while_timed"] else "",
                                     "bare loop's tokens differ from generate's"
                                     if r.get("bare_matches_generate") is False else "") if n)
        lines.append(f"| {r['variant']} | {r['decode_tok_s']} | {vs} | {r['generate_tok_s']} "
                     f"| {r.get('bare_tok_s', '-')} | {r['cuda_graphs']} "
                     f"| {r['cache']} | {r['graphs']} | {r['first_s']} | {r['warmup_s']} | {r['weight_MiB']} | {note} |")
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    path.write_text(json.dumps(rows, indent=1))
    return table


def variants(args, device):
    def fresh(dtype=args.dtype):
        m = random_model(args.arch, dtype, device) if args.arch else load_model(args.model, dtype)[0]
        return m.to(device)

    def eager():
        return static_decode(fresh(), None) if args.static else fresh()

    def inductor():
        m = fresh()
        if args.static:
            return static_decode(m, REDUCE_OVERHEAD)
        m.compile()  # nn.Module.compile: generate() then runs the compiled forward
        return m

    def config_for(m, activations):
        """The default recipe, with cpu_activations set (None: as the default has it)."""
        config = qcompile.default_config(m)
        return config if activations is None else dataclasses.replace(config, cpu_activations=activations)

    def with_qcompile(m, activations=None, fuse=True, options=None):
        backend = qcompile if activations is None and fuse else \
            qcompile.backend(config_for(m, activations), fuse_projections=fuse)
        # torch.compile takes mode= or options=, not both; on CPU reduce-overhead changes nothing,
        # so rows with options (option_variants) leave it out
        kwargs = REDUCE_OVERHEAD if options is None else dict(options=options)
        if args.static:
            return static_decode(m, dict(backend=backend, **kwargs))
        return torch.compile(m, backend=backend, **({} if options is None else kwargs))

    def qcompile_backend_with(options):
        return lambda: with_qcompile(fresh(), options=options)

    def qcompile_backend(activations=None):
        return lambda: with_qcompile(fresh(), activations)

    def qcompile_ahead(activations=None, fuse=True):
        def make():
            m = fresh()
            qcompile.quantize(m, config_for(m, activations), progress=False)
            return with_qcompile(m, fuse=fuse)
        return make

    def checkpoint(path):
        def load():
            m = fresh()
            qcompile.load(m, path)
            return with_qcompile(m)
        return load

    fname = str(args.dtype).removeprefix("torch.")
    out = [(f"{fname} eager", eager), (f"{fname} Inductor", inductor)]
    for a in args.cpu_activations or [None]:
        x = "" if a is None else f", x {a}"
        out += [(f"qcompile (backend=qcompile{x})", qcompile_backend(a)),
                (f"qcompile (quantize + compile{x})", qcompile_ahead(a))]
        if getattr(args, "unfused", False):
            out.append((f"qcompile (quantize + compile{x}, unfused)", qcompile_ahead(a, fuse=False)))
    for flag, (name, options) in option_variants().items():
        if getattr(args, flag, False):
            if device.type == "cuda":
                raise SystemExit(f"--{flag.replace('_', '-')} is a CPU row (it drops mode='reduce-overhead')")
            out.append((name, qcompile_backend_with(options)))
    out += [(f"qcompile checkpoint {Path(c).name}", checkpoint(c)) for c in args.checkpoint or ()]
    if args.static:
        out.append(torchao_static(args, device, fresh))
        return out
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        def torchao_int4():
            # torchao's CPU int4 path (tinygemm); its fp32 path is slow, so run it in bf16 as torchao does
            m = fresh(torch.bfloat16)
            quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=64))
            m.compile()
            return m

        out.append(("torchao int4 g64 bf16 + Inductor", torchao_int4))
    except ImportError:
        print("torchao not installed: skipping its row")
    return out


def torchao_static(args, device, fresh):
    """The torchao int4 weight-only row of --static; torchao is imported when the row runs, so a
    missing or broken torchao makes a skipped row with the reason."""
    if device.type == "cuda":
        def torchao_int4():
            from torchao.quantization import Int4WeightOnlyConfig, quantize_
            try:
                from torchao.quantization.quantize_.workflows import Int4PackingFormat
                packing = Int4PackingFormat.TILE_PACKED_TO_4D
            except ImportError:
                packing = "tile_packed_to_4d"
            m = fresh(torch.bfloat16)
            # tinygemm (torch.ops.aten._weight_int4pack_mm) through the tile_packed_to_4d format
            # (torchao >= 0.14); Inductor's settings are left as the other rows have them
            quantize_(m, Int4WeightOnlyConfig(group_size=64, int4_packing_format=packing, set_inductor_config=False))
            return static_decode(m, REDUCE_OVERHEAD)

        return "torchao int4 g64 tinygemm + Inductor", torchao_int4

    def torchao_int4_cpu():
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import quantize_

        m = fresh(torch.bfloat16)
        quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=64))
        return static_decode(m, REDUCE_OVERHEAD)

    return "torchao int4 g64 bf16 + Inductor", torchao_int4_cpu


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--arch", choices=sorted(ARCHS), help="random weights of this architecture instead of --model")
    p.add_argument("--dtype", help="float baseline dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="*", help="run only variants whose name contains one of these")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk caches")
    p.add_argument("--checkpoint", nargs="*", help="folders saved by qcompile.save (e.g. by bench_methods.py "
                   "--save): each is loaded into a fresh model and compiled with backend=qcompile")
    p.add_argument("--name", help="suffix of the results file (decode_<device>_<name>.md)")
    p.add_argument("--static", action="store_true", help="static KV cache, compiled variants with "
                   'mode="reduce-overhead" (CUDA graphs), decode tokens/s (see above)')
    p.add_argument("--max-seconds", type=float, help="--static: stop a variant's timed generates once it has "
                   "run this long (at least one is timed)")
    p.add_argument("--append", action="store_true", help="--static: merge the rows into an existing results file")
    p.add_argument("--bare", action="store_true", help="--static: also time a bare greedy loop (static cache, "
                   "the compiled one-token forward, argmax; no generate()): the 'bare loop tok/s' column")
    p.add_argument("--skip-module-guards", action="store_true", help="CPU: also time backend=qcompile compiled "
                   "with guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe (Dynamo's guard "
                   "evaluation was ~20%% of a SmolLM2 decode step; unsafe if a module is changed after compiling)")
    p.add_argument("--cpp-wrapper", action="store_true", help="CPU: also time backend=qcompile compiled with "
                   "options={'cpp_wrapper': True} (Inductor's wrapper code in C++: no Python between kernels)")
    p.add_argument("--unfused", action="store_true", help="also time quantize + compile with "
                   "fuse_projections=False (q/k/v and gate/up as separate ops)")
    p.add_argument("--cpu-activations", nargs="*", choices=("int8", "float"),
                   help="one row per qcompile variant and value of QuantConfig.cpu_activations (default: the "
                   "default recipe's)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tok = None if args.arch else load_model(args.model)[1]
    if args.static:
        if args.tokens < 3:
            p.error("--static needs --tokens >= 3 (the decode phase is timed after the first decode step)")
        stem = (f"decode_{device.type}" + (f"_{args.arch}" if args.arch else "") + "_static"
                + (f"_{args.name}" if args.name else ""))
        done, table = [], ""
        for name, make in variants(args, device):
            if args.only and not any(o in name for o in args.only):
                continue
            print(f"{name} ...", flush=True)
            done.append(measure_static(name, make, tok, args, device))
            table = write_static(done, args, device, stem)  # after each row: a killed run keeps its rows
        print("\n" + table)
        return
    rows = []
    for name, make in variants(args, device):
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"{name} ...", flush=True)
        rows.append(measure(name, make, tok, args, device))
    base = rows[0]["tok_s"] if rows else 1
    ind = next((r["tok_s"] for r in rows if r["variant"].endswith(" Inductor")), None)
    what = f"{args.arch} (random weights)" if args.arch else args.model
    lines = [f"# Greedy decode, {what}, {args.tokens} new tokens, median of {args.repeats} "
             f"({device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "",
             f"| variant | tok/s | vs {rows[0]['variant'] if rows else 'eager'} | vs float Inductor | first token (s) | warm-up (s) | weights MiB | text |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_ind = f"{r['tok_s'] / ind:.2f}x" if ind else "-"
        lines.append(f"| {r['variant']} | {r['tok_s']} | {r['tok_s'] / base:.2f}x | {vs_ind} | {r['first_token_s']} "
                     f"| {r['warmup_s']} | {r['weight_MiB']} | {r['text']!r} |")
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    stem = f"decode_{device.type}" + (f"_{args.arch}" if args.arch else "") + (f"_{args.name}" if args.name else "")
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
