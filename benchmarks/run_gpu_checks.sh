#!/usr/bin/env bash
# The GPU-only checks of the int4, LUT and attention CUDA paths, from a source tree (no pip install
# needed):
#     benchmarks/run_gpu_checks.sh OUT_DIR
# Runs tests/test_gpu_int4.py, tests/test_gpu_lut.py, tests/test_gpu_attention.py and the kernel
# and attention benchmarks (bench_lut.py exits non-zero if its batch-1 floors are missed); the
# TRITON_INTERPRET tests are CPU CI's (triton 3.6's interpreter fails under numpy >= 2.5, as on the
# GPU image); logs, the tables and
# the plot land in OUT_DIR. Exits non-zero if any step failed.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee "$out/versions.log"
python -m pytest tests/test_gpu_int4.py -m gpu -v -rs 2>&1 | tee "$out/test_gpu_int4.log" || status=1
python benchmarks/bench_kernels.py 2>&1 | tee "$out/bench_kernels.log" || status=1
cp benchmarks/results/kernels_cuda.md benchmarks/results/kernels_cuda.png "$out/" 2>/dev/null
# LUT-mpGEMM: ~3 min of tests (mostly Triton compiles while autotuning), ~1 min of benchmark
python -m pytest tests/test_gpu_lut.py -m gpu -v -rs 2>&1 | tee "$out/test_gpu_lut.log" || status=1
python benchmarks/bench_lut.py 2>&1 | tee "$out/bench_lut.log" || status=1
cp benchmarks/results/lut_cuda.md "$out/" 2>/dev/null
# attention: the Triton GQA kernel, the pass on CUDA, decode timing vs repeat_kv
python -m pytest tests/test_gpu_attention.py -m gpu -v -rs 2>&1 | tee "$out/test_gpu_attention.log" || status=1
# the pass against this image's transformers (5.17) graphs: tiny models, on the CPU
python -m pytest tests/test_attention.py -q 2>&1 | tee "$out/test_attention.log" || status=1
python benchmarks/bench_attention.py --skip-models 2>&1 | tee "$out/bench_attention.log" || status=1
cp benchmarks/results/attention_cuda.md "$out/" 2>/dev/null
exit $status
