#!/usr/bin/env bash
# The GPU checks the open issues owe, for the lent GPU machine (../shared/GPU.md): carry ["gpu-carry"]
# (made by ../shared/tools/gpu-bundle.sh) and run, in one call with timeout_s=600:
#     bash benchmarks/gpu_checks.sh                   # generate, backends, parity, tests, in that order
#     bash benchmarks/gpu_checks.sh startup           # another session: cold and warm start-up alone
# A session has 15 minutes of device time, start-up included: one call, not two. Steps run in the order
# given, each under its own limit cut to what is left of DEADLINE (default 540 s from the script's start,
# the unpacking included); a step with under 30 s left is skipped and says so. A step that fails or times
# out does not stop the next; each writes under $OUT (default ./gpu-out), and the benches write each figure
# as they measure it, so a step cut short still leaves what it measured in $OUT/<step>.txt (and bench.json).
#   generate  issue 29: `sdfleet generate` (finishing stage, the GPU default) against a plain diffusers loop,
#             the 2026-12-04 run again: sd21-random, 768 px, 30 steps, 48 rows, batch 8 (~190 s)
#   backends  issue 32: eager, then compile, a rank-8 LoRA active and none, swap ms, 0 recompiles over the
#             swaps, and every image against eager's (~200 s: compile builds cold)
#   parity    does a row draw the same pixels alone and in a batch of 4 in fp16, at SD 2.1's own shapes
#             (sd21-random, 768 px, 4 steps; ~40 s)?
#   tests     the GPU-marked tests but the two Ray Train ones (~120 s; those took 166 s on 2026-12-04)
#   startup   issue 32: eager and compile start-up in fresh processes, cold and warm cache (~240 s)
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
if [ ! -d /tmp/site/ray ]; then  # a warm machine keeps it from the first call
  mkdir -p /tmp/site && tar -xJf gpu-carry/site.tar.xz -C /tmp/site
fi
export PYTHONPATH="/tmp/site:$PWD" SDFLEET_CACHE=/tmp/sdfleet-cache
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
# Everything the steps import, at once: a missing package shows here, not as a step that ran nothing.
python3 -c "import torch, ray, diffusers, transformers, peft, pydantic, imwatermark, cv2, pytest, yaml, jsonschema
print('torch', torch.__version__, 'ray', ray.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/gpu.txt" 2>&1 || { cat "$OUT/gpu.txt"; echo "missing packages: see $OUT/gpu.txt"; exit 1; }

DEADLINE="${DEADLINE:-540}"  # seconds from the start ($SECONDS), inside a 600 s call
step() {  # step NAME SECONDS COMMAND...: SECONDS at most, and never past DEADLINE
  local name=$1 seconds=$2 left=$((DEADLINE - SECONDS))
  shift 2
  if [ "$left" -lt 30 ]; then
    echo "== $name skipped: ${left}s left of the ${DEADLINE}s deadline" | tee -a "$OUT/steps.txt"
    return
  fi
  [ "$left" -lt "$seconds" ] && seconds=$left
  echo "== $name ($(date +%T), limit ${seconds}s)" | tee -a "$OUT/steps.txt"
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $?" | tee -a "$OUT/steps.txt"
  tail -n 15 "$OUT/$name.txt"
}

BACKENDS=(python3 -m benchmarks.bench_backends --preset sd21-random --device cuda --dtype fp16 --size 768 --steps 30
          --batch-size 4)
for what in "${@:-generate backends parity tests}"; do
  for name in $what; do
    case $name in
      generate) step generate 230 python3 -m benchmarks.bench_generate --preset sd21-random --size 768 --steps 30 \
                  --images 48 --device cuda --no-seed-style --finish stage --out "$OUT/generate" ;;
      backends) step backends 240 "${BACKENDS[@]}" --batches 2 --swaps 3 --backends eager,compile \
                  --out "$OUT/backends" ;;
      parity)   step parity 60 python3 -m benchmarks.bench_batch_parity --preset sd21-random --size 768 --steps 4 \
                  --rows 4 --device cuda --dtype fp16 --out "$OUT/parity.json" ;;
      tests)    step tests 150 python3 -m pytest -q -m gpu -k "not mixed_precision" -p no:cacheprovider tests ;;
      startup)  step startup 240 "${BACKENDS[@]}" --batches 1 --swaps 0 --backends eager,compile --startup \
                  --out "$OUT/startup" ;;
      *) echo "unknown step $name (parity, generate, backends, startup, tests)"; exit 2 ;;
    esac
  done
done
