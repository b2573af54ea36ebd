#!/usr/bin/env bash
# The GPU checks the open issues owe, in order of importance, for one call of the lent GPU machine
# (../shared/GPU.md): carry ["gpu-carry"] (made by ../shared/tools/gpu-bundle.sh) and run
#     bash benchmarks/gpu_checks.sh
# Each step has its own timeout and writes under $OUT (default ./gpu-out); a step that fails or times out
# does not stop the next. The steps add up to about 560 s, inside one 600 s call.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT" /tmp/site
tar -xJf gpu-carry/site.tar.xz -C /tmp/site
export PYTHONPATH="/tmp/site:$PWD" SDFLEET_CACHE=/tmp/sdfleet-cache
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date +%T), limit ${seconds}s)" | tee -a "$OUT/steps.txt"
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $?" | tee -a "$OUT/steps.txt"
  tail -n 15 "$OUT/$name.txt"
}

# 1. issue 29: generate against a plain diffusers loop, sd21-random 768 px, 30 steps
step generate 200 python3 -m benchmarks.bench_generate --preset sd21-random --size 768 --steps 30 --images 48 \
  --device cuda --no-seed-style --out "$OUT/generate"
# 2. issue 32: each backend and compile setting against eager, a rank-8 LoRA active and none, start-up cold/warm
step backends 240 python3 -m benchmarks.bench_backends --preset sd21-random --device cuda --dtype fp16 --size 768 \
  --steps 30 --batch-size 4 --batches 2 --backends eager,compile,compile/qkv=0/cl=0,compile/mode=default --startup \
  --out "$OUT/backends"
# 3. every GPU-marked test
step gpu-tests 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests
