"""Benchmark the backends against eager in one run: images/s, set-up time, adapter swap cost.

Every backend draws the same rows (one batch to warm up, then `--batches` timed batches) on a freshly
built preset pipeline in this process. With `--swaps N` (the default 10) each backend also swaps between
two random LoRAs N times: swap seconds are `activate()` alone, and `compiles` (compile) counts graphs
built during the swaps, which must stay 0.

- eager: diffusers + peft, the reference.
- compile: torch.compile of the UNet, LoRA slot rank 8 (2 adapters x rank 4).
- onnx: ONNX Runtime (exports cached under a temporary `SDFLEET_CACHE` unless one is set; the first
  export is part of set-up).
- int8: eager with `torch.ao.quantization.quantize_dynamic` on the UNet's Linear layers (CPU only; no
  LoRA swapping: peft cannot wrap quantized layers). Measured to decide whether it earns a flag.

    .venv/bin/python -m benchmarks.bench_backends                  # tiny, 256 px, 20 steps, batch 8, CPU
    python -m benchmarks.bench_backends --preset sd21-random --device cuda --dtype fp16 --size 768 --steps 30 \\
        --batch-size 4 --backends eager,compile               # the GPU comparison

Prints a table and writes bench.json to --out (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ALL = ("eager", "compile", "onnx", "int8")


def make_store(preset: str, folder: Path) -> "object":
    """Two random rank-4 LoRAs on the UNet's attention projections of `preset`."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from actors.adapters import AdapterStore
    from actors.presets import PRESETS

    unet = UNet2DConditionModel.from_config(PRESETS[preset]["unet"])
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    for i, name in enumerate(("A", "B")):
        g = torch.Generator().manual_seed(500 + i)
        layers = {}
        for path, layer in unet.named_modules():
            if path.endswith(targets) and isinstance(layer, torch.nn.Linear):
                std = 0.15 * (64 / layer.in_features) ** 0.5  # a visible change at any width, not chaos
                layers[f"{path}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=g) * std
                layers[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=g) * std
        StableDiffusionPipeline.save_lora_weights(folder / name, unet_lora_layers=layers)
    return AdapterStore(str(folder))


def rows_for(preset: str, count: int, size: int, steps: int, adapters=(), store=None) -> list[dict]:
    from actors.presets import PRESETS
    from manifests.schema import ManifestRow, resolve_row

    model = {**PRESETS[preset]["defaults"], "fingerprint": f"bench-{preset}"}
    out = []
    for i in range(count):
        row = ManifestRow(id=f"b{i}", prompt=f"a product photo, variation {i}", seed=1000 + i, steps=steps,
                          width=size, height=size, adapters=[{"name": n, "scale": 1.0} for n in adapters])
        out.append(resolve_row(row, model, watermark=None, adapter_fingerprints=store.fingerprints(adapters) if adapters else {}))
    return out


def measure(name: str, args, store) -> dict:
    import torch

    from actors.backends import make_backend
    from actors.generate import draw
    from actors.presets import build_preset

    device = torch.device(args.device)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    started = time.perf_counter()
    pipe = build_preset(args.preset).to(device=device, dtype=dtype)
    built = time.perf_counter() - started
    started = time.perf_counter()
    if name == "int8":
        pipe.unet = torch.ao.quantization.quantize_dynamic(pipe.unet, {torch.nn.Linear}, dtype=torch.qint8)
        backend = make_backend("eager", pipe, None)
    else:
        backend = make_backend(name, pipe, store if args.swaps else None, fingerprint=f"bench-{args.preset}",
                               max_batch=args.batch_size)
    rows = rows_for(args.preset, args.batch_size, args.size, args.steps)
    draw(backend.pipe, rows)  # warm-up: compiles, exports, builds
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    setup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(args.batches):
        images = draw(backend.pipe, rows)
    sync()
    seconds = time.perf_counter() - started
    result = {"backend": name, "images_per_second": args.batches * len(rows) / seconds, "setup_seconds": setup,
              "pipeline_build_seconds": built, "first_pixel_sum": int(images[0].astype("int64").sum())}
    if args.swaps and name != "int8":
        compiles_before = getattr(backend, "compiles", None)
        costs = []
        for i in range(args.swaps):
            chosen = [{"name": "AB"[i % 2], "scale": 1.0}]
            t0 = time.perf_counter()
            backend.activate(chosen)
            sync()
            costs.append(time.perf_counter() - t0)
        draw(backend.pipe, rows_for(args.preset, args.batch_size, args.size, args.steps, adapters=["A"], store=store))
        sync()
        result["swap_seconds_mean"] = sum(costs[1:]) / max(1, len(costs) - 1)  # the first loads the files
        result["swap_seconds_first"] = costs[0]
        if compiles_before is not None:
            result["compiles_during_swaps"] = backend.compiles - compiles_before
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_backends", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="timed batches per backend (default 2)")
    parser.add_argument("--backends", default=",".join(ALL), help=f"comma-separated, from {', '.join(ALL)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on CPU")
    parser.add_argument("--swaps", type=int, default=10, help="adapter swaps to time per backend (0: none)")
    parser.add_argument("--out", help="folder for bench.json (default: a temporary one)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL))
    if unknown or "eager" not in names:
        parser.error(f"--backends must include eager (the baseline) and name only {', '.join(ALL)}; got {args.backends}")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-backends-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SDFLEET_CACHE", str(out / "cache"))
    store = make_store(args.preset, out / "adapters") if args.swaps else None
    results = []
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, args, store))
        print(f"[bench] {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    eager = next(r for r in results if r["backend"] == "eager")
    for r in results:
        r["vs_eager"] = r["images_per_second"] / eager["images_per_second"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    report = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "torch": torch.__version__,
              "results": results}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.preset} {args.size}px, {args.steps} steps, batch {args.batch_size}, {args.dtype}, {device}")
    print(f"{'backend':<9} {'img/s':>8} {'vs eager':>9} {'set-up s':>9} {'swap ms':>8} {'compiles':>9}")
    for r in results:
        swap = f"{r['swap_seconds_mean'] * 1000:.1f}" if "swap_seconds_mean" in r else "-"
        print(f"{r['backend']:<9} {r['images_per_second']:>8.3f} {r['vs_eager']:>8.2f}x {r['setup_seconds']:>9.1f} "
              f"{swap:>8} {str(r.get('compiles_during_swaps', '-')):>9}")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
