#!/usr/bin/env bash
# Every GPU check and benchmark, in parts that each fit one device call (< 8 minutes on an H200),
# from a source tree (no pip install needed; torch 2.11 / triton 3.6 on the device image):
#     bash benchmarks/run_gpu_checks.sh PART OUT_DIR      PART: kernels | decode | tests | quik | all
# kernels  int4 and LUT kernel benchmarks on Llama-7B shapes (tables + floors), their split-K and
#          launcher correctness tests                                              (~4 min)
# decode   end-to-end decode, static cache + CUDA graphs: Llama-3.2-1B and Llama-3-8B shapes,
#          bf16 Inductor vs qcompile vs torchao int4 (benchmarks/gpu_decode.sh)  (~6 min)
# tests    the remaining GPU tests: Inductor lowerings, whole models, attention  (~6 min)
# quik     QUIK's Triton int8 GEMM and quik_mm on CUDA, and their speed vs fp16 cuBLAS (~2 min)
# Logs and tables land in OUT_DIR; every step has its own timeout, so one slow step cannot eat the
# device budget. Exits non-zero if any step failed.
set -uo pipefail
part=${1:?usage: $0 kernels|decode|tests|quik|all OUT_DIR}
out=${2:?usage: $0 PART OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "=== $name: exit $rc"
    [ $rc -eq 0 ] || status=1
}
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee "$out/versions.log"

if [ "$part" = kernels ] || [ "$part" = all ]; then
    step bench_kernels 200 python benchmarks/bench_kernels.py --lut --shapes 4096 11008
    cp benchmarks/results/kernels_cuda.md benchmarks/results/kernels_cuda.png "$out/" 2>/dev/null
    step bench_lut 60 python benchmarks/bench_lut.py --quick
    cp benchmarks/results/lut_cuda.md "$out/" 2>/dev/null
    step test_gpu_kernels 150 python -m pytest -m gpu -x -q -rs tests/test_gpu_int4.py tests/test_gpu_lut.py \
        -k "launcher_matches or deterministic or decode_takes_split_k"
fi
if [ "$part" = decode ] || [ "$part" = all ]; then
    step decode 420 bash benchmarks/gpu_decode.sh "$out"
fi
if [ "$part" = tests ] || [ "$part" = all ]; then
    step test_gpu_int4 150 python -m pytest -m gpu -q -rs tests/test_gpu_int4.py \
        -k "not launcher_matches and not deterministic and not decode_takes_split_k"
    step test_gpu_lut 200 python -m pytest -m gpu -q -rs tests/test_gpu_lut.py \
        -k "not launcher_matches and not decode_takes_split_k"
    step test_gpu_attention 100 python -m pytest -m gpu -q -rs tests/test_gpu_attention.py
    step bench_attention 60 python benchmarks/bench_attention.py --skip-models
    cp benchmarks/results/attention_cuda.md "$out/" 2>/dev/null
fi
if [ "$part" = quik ] || [ "$part" = all ]; then
    step test_gpu_quik 120 python -m pytest -m gpu -q -rs tests/test_gpu_quik.py
    step bench_quik_cuda 120 python benchmarks/bench_quik.py --speed --device cuda
    cp benchmarks/results/quik_cuda_speed.md "$out/" 2>/dev/null
fi
exit $status
