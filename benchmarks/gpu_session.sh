#!/usr/bin/env bash
# One GPU lease, everything that needs the GPU: kernel and lowering tests, kernel benchmark,
# decode benchmarks on random-weight architectures. Usage (device machine, source tree):
#     bash benchmarks/gpu_session.sh OUT_DIR
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
bash benchmarks/run_gpu_checks.sh "$out" || status=1
for arch in smollm2-135m llama-1b; do
    timeout 600 python benchmarks/bench_decode.py --arch "$arch" --tokens 64 --repeats 3 --only eager Inductor "backend=qcompile" 2>&1 | tee "$out/decode_$arch.log" || status=1
    cp "benchmarks/results/decode_cuda_$arch.md" "$out/" 2>/dev/null
done
exit $status
