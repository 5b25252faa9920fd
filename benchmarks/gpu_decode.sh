#!/usr/bin/env bash
# End-to-end GPU decode (issue 15 item 3), from a source tree on the device machine:
#     bash benchmarks/gpu_decode.sh OUT_DIR        (device run: carry [".gpu-wheels"])
# Random-weight Llama-3.2-1B and Llama-3-8B shapes, bf16, batch 1, static KV cache, decode compiled with
# mode="reduce-overhead" (CUDA graphs): bf16 Inductor, backend=qcompile, torchao int4 weight-only
# (tinygemm) + Inductor. torchao comes from .gpu-wheels/ (the GPU image has no torchao and no package
# registry): `pip download torchao==0.17.0 --no-deps -d .gpu-wheels` here; without it its rows are
# skipped with the reason. Each (shape, variant) runs in its own process under its own timeout (a crash
# or a CUDA error cannot take the other rows with it), in priority order: the qcompile-vs-Inductor pairs
# first, then torchao; the whole run stops starting new steps at the budget (GPU_DECODE_BUDGET_S, 390 s
# by default: with the install, under 7 minutes on an H200). Rows land in
# benchmarks/results/decode_cuda_<arch>_static.md/.json as each step ends, and are copied to OUT_DIR
# with the log (gpu_decode.log) after every step. Exits non-zero if any step failed, timed out or was skipped.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# torchao's own C++/CUDA extensions are not needed (int4 runs through aten._weight_int4pack_mm); not
# loading them avoids any ABI/CUDA mismatch with the image's torch
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
py=${PYTHON:-python3}
budget=${GPU_DECODE_BUDGET_S:-390}
tokens=${GPU_DECODE_TOKENS:-64}
deadline=$((SECONDS + budget))
log="$out/gpu_decode.log"
: >"$log"
status=0

say() { echo "$*" | tee -a "$log"; }

whl=$(ls .gpu-wheels/torchao-*.whl 2>/dev/null | head -n 1)
if [ -n "$whl" ]; then
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/tao "$whl" >>"$log" 2>&1; then
        export PYTHONPATH="$PYTHONPATH:/tmp/tao"
        say "torchao: installed $(basename "$whl") into /tmp/tao"
    else
        say "torchao: pip install of $whl failed (see above): its rows will be skipped"
    fi
else
    say "torchao: no .gpu-wheels/torchao-*.whl (was .gpu-wheels carried?): its rows will be skipped"
fi
"$py" -c "
import torch, triton, transformers
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import torchao
    print('torchao', torchao.__version__)
except Exception as e:
    print('torchao import failed:', type(e).__name__, e)
" 2>&1 | tee -a "$log"

rm -f benchmarks/results/decode_cuda_llama-1b_static.* benchmarks/results/decode_cuda_llama-8b_static.*
declare -A started  # arch -> 1 once its results file has been started (later steps --append)

step() {  # step ARCH TIMEOUT_S VARIANT_FILTER
    local arch=$1 cap=$2 only=$3 left rc append=()
    left=$((deadline - SECONDS))
    if ((left < 40)); then
        say "=== SKIPPED $arch / $only: ${left}s left of the ${budget}s budget"
        status=1
        return
    fi
    ((cap > left)) && cap=$left
    [ -n "${started[$arch]:-}" ] && append=(--append)
    say "=== $arch / $only: timeout ${cap}s, ${SECONDS}s elapsed"
    timeout -k 10 "$cap" "$py" benchmarks/bench_decode.py --arch "$arch" --static --tokens "$tokens" --repeats 3 \
        --max-seconds $((cap - 15)) --only "$only" "${append[@]}" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    started[$arch]=1
    if ((rc != 0)); then
        say "=== $arch / $only: exit status $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
        status=1
    fi
    grep -q '"skipped"' "benchmarks/results/decode_cuda_${arch}_static.json" 2>/dev/null && status=1
    cp benchmarks/results/decode_cuda_*_static.md benchmarks/results/decode_cuda_*_static.json "$out/" 2>/dev/null
}

step llama-1b 110 "bfloat16 Inductor"
step llama-1b 130 "backend=qcompile"
step llama-8b 150 "bfloat16 Inductor"
step llama-8b 170 "backend=qcompile"
step llama-1b 100 "torchao"
step llama-8b 130 "torchao"

for arch in llama-1b llama-8b; do
    f="benchmarks/results/decode_cuda_${arch}_static.md"
    [ -f "$f" ] && { echo; cat "$f"; } | tee -a "$log"
done
say "=== done in ${SECONDS}s, status $status"
exit $status
