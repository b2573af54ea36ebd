#!/usr/bin/env bash
# The GPU checks the open issues owe, for the lent GPU machine (../shared/GPU.md): carry ["gpu-carry"]
# (made by ../shared/tools/gpu-bundle.sh) and run
#     bash benchmarks/gpu_checks.sh                    # first call: generate, backends, parity (~580 s)
#     bash benchmarks/gpu_checks.sh startup tests      # a second call, if device time is left (~520 s)
# Steps run in the order given, each under its own timeout, writing under $OUT (default ./gpu-out); a step
# that fails or times out does not stop the next. The benches print each figure as it is measured, so a
# step cut short by its timeout still leaves what it measured in $OUT/<step>.txt.
#   parity    does a row draw the same pixels alone and in a batch of 8 in fp16 (tiny, 256 px; ~40 s)?
#   generate  issue 29: `sdfleet generate` (finishing stage, the GPU default) against a plain diffusers loop,
#             the 2026-12-04 run again: sd21-random, 768 px, 30 steps, 48 rows, batch 8 (~190 s)
#   backends  issue 32: eager against compile and each compile setting left out, a rank-8 LoRA active and
#             none, swap ms, 0 recompiles over the swaps (~300 s)
#   startup   issue 32: eager and compile start-up in fresh processes, cold and warm cache (~240 s)
#   tests     every GPU-marked test (~280 s; the two Ray Train LoRA tests took 166 s on 2026-12-04)
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

step() {  # step NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date +%T), limit ${seconds}s)" | tee -a "$OUT/steps.txt"
  timeout "$seconds" "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $?" | tee -a "$OUT/steps.txt"
  tail -n 15 "$OUT/$name.txt"
}

BACKENDS=(python3 -m benchmarks.bench_backends --preset sd21-random --device cuda --dtype fp16 --size 768 --steps 30
          --batch-size 4)
for what in "${@:-generate backends parity}"; do
  for name in $what; do
    case $name in
      parity)   step parity 60 python3 -m benchmarks.bench_batch_parity --device cuda --dtype fp16 --out "$OUT/parity.json" ;;
      generate) step generate 230 python3 -m benchmarks.bench_generate --preset sd21-random --size 768 --steps 30 \
                  --images 48 --device cuda --no-seed-style --finish stage --out "$OUT/generate" ;;
      backends) step backends 300 "${BACKENDS[@]}" --batches 2 --swaps 5 \
                  --backends eager,compile,compile/qkv=0,compile/cl=0,compile/mode=default --out "$OUT/backends" ;;
      startup)  step startup 240 "${BACKENDS[@]}" --batches 1 --swaps 0 --backends eager,compile --startup \
                  --out "$OUT/startup" ;;
      tests)    step tests 280 python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
      *) echo "unknown step $name (parity, generate, backends, startup, tests)"; exit 2 ;;
    esac
  done
done
