"""Benchmark the backends against eager in one run: images/s with no LoRA and with one active, swap cost,
start-up cold and warm, peak GPU memory.

Every backend draws the same rows (one batch to warm up, then `--batches` timed batches) on a freshly
built preset pipeline in this process, first with no adapter, then with a rank-8 LoRA active. With
`--swaps N` (the default 10) each backend also swaps between two random LoRAs N times: swap seconds are
`activate()` alone, and `compiles` (compile) counts graphs built during the swaps, which must stay 0.
Eager runs first, and every other backend's images are compared with eager's (mean and max difference in
0..255 levels): with no adapter, with the LoRA, and with the LoRA again after the swaps (what they left).
bench.json is written after each backend, so a run cut short keeps what it measured.
With `--startup`, each backend's start-up (a fresh process: build the pipeline, make the backend, draw
one batch) is timed twice: cold (an empty backend cache and torch cache) and warm (what the cold run left
in the backend cache, torch's local cache still empty, as on another node).

- eager: diffusers + peft, the reference.
- compile: the compile backend with this device's defaults; `compile/qkv=0/cl=1/vae=0/mode=max-autotune`
  changes one setting each (qkv: fused QKV, cl: channels-last, vae: VAE decoder compiled, mode: torch.compile's).
- onnx: ONNX Runtime (exports cached under a temporary `SDFLEET_CACHE` unless one is set; the first
  export is part of set-up).
- int8: eager with `torch.ao.quantization.quantize_dynamic` on the UNet's Linear layers (CPU only; no
  LoRA swapping: peft cannot wrap quantized layers). Measured to decide whether it earns a flag.

    .venv/bin/python -m benchmarks.bench_backends                  # tiny, 256 px, 20 steps, batch 8, CPU
    python -m benchmarks.bench_backends --preset sd21-random --device cuda --dtype fp16 --size 768 --steps 30 \\
        --batch-size 4 --backends eager,compile,compile/qkv=0,compile/cl=0,compile/mode=default --startup

Prints a table and writes bench.json to --out (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import gc
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ALL = ("eager", "compile", "onnx", "int8")
RANK = 8  # the benchmark LoRAs' rank


def compile_settings(name: str, device: str):
    """`compile/qkv=0/cl=1/vae=0/mode=default` -> CompileSettings: this device's defaults, then the changes."""
    import dataclasses

    from actors.backends.compile import CompileSettings

    fields = {"qkv": "fuse_qkv", "cl": "channels_last", "vae": "compile_vae", "mode": "mode"}
    changes = {}
    for part in name.split("/")[1:]:
        key, _, value = part.partition("=")
        if key not in fields or not value:
            raise ValueError(f"{name}: {part!r} is not one of {', '.join(k + '=' for k in fields)}")
        changes[fields[key]] = value if key == "mode" else value not in ("0", "false", "no")
    return dataclasses.replace(CompileSettings.for_device(device), **changes)


def make_store(preset: str, folder: Path) -> "object":
    """Two random rank-8 LoRAs on the UNet's attention projections of `preset`."""
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
                layers[f"{path}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=g) * std
                layers[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=g) * std
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


def make(name: str, args, store, pipe):
    import torch

    from actors.backends import make_backend

    if name == "int8":
        pipe.unet = torch.ao.quantization.quantize_dynamic(pipe.unet, {torch.nn.Linear}, dtype=torch.qint8)
        return make_backend("eager", pipe, None)
    if name.startswith("compile"):
        from actors.backends.compile import CompileBackend

        return CompileBackend(pipe, store, fingerprint=f"bench-{args.preset}",
                              settings=compile_settings(name, args.device))
    return make_backend(name, pipe, store, fingerprint=f"bench-{args.preset}", max_batch=args.batch_size)


def timed(backend, rows, batches: int, sync) -> float:
    """Images per second over `batches` draws of `rows`, after one untimed draw."""
    from actors.generate import draw

    draw(backend.pipe, rows)
    sync()
    started = time.perf_counter()
    for _ in range(batches):
        draw(backend.pipe, rows)
    sync()
    return batches * len(rows) / (time.perf_counter() - started)


def difference(images, reference) -> dict:
    """Mean and max absolute difference of two uint8 image stacks, in 0..255 levels."""
    import numpy as np

    diff = np.abs(np.asarray(images, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    return {"mean": round(float(diff.mean()), 3), "max": int(diff.max())}


def measure(name: str, args, store, reference: dict) -> dict:
    """One backend's figures. `reference` holds eager's images by case ("plain", "lora"): filled when `name`
    is eager, compared with otherwise (`vs_eager_pixels`)."""
    import torch

    from actors.generate import draw
    from actors.presets import build_preset

    device = torch.device(args.device)
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch._dynamo.reset()  # the previous variant's graphs (and their CUDA graph pools) go, and this one compiles cold
    gc.collect()  # the previous variant's backend and pipeline refer to each other: freed by a collection only
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    pixels: dict = {}
    started = time.perf_counter()
    pipe = build_preset(args.preset).to(device=device, dtype=dtype)
    built = time.perf_counter() - started
    started = time.perf_counter()
    backend = make(name, args, store, pipe)
    rows = rows_for(args.preset, args.batch_size, args.size, args.steps)
    draw(backend.pipe, rows)  # warm-up: compiles, exports, builds
    sync()
    setup = time.perf_counter() - started
    pixels["plain"] = images = draw(backend.pipe, rows)
    result = {"backend": name, "images_per_second": timed(backend, rows, args.batches, sync), "setup_seconds": setup,
              "pipeline_build_seconds": built, "first_pixel_sum": int(images[0].astype("int64").sum())}
    lora_rows = rows_for(args.preset, args.batch_size, args.size, args.steps, adapters=["A"], store=store) \
        if store is not None and name != "int8" else None
    if lora_rows:
        backend.activate(lora_rows[0]["adapters"])
        pixels["lora"] = draw(backend.pipe, lora_rows)
        result["images_per_second_lora"] = timed(backend, lora_rows, args.batches, sync)
    if args.swaps and name != "int8":
        compiles_before = getattr(backend, "compiles", None)
        costs = []
        for i in range(args.swaps):
            chosen = [{"name": "AB"[i % 2], "scale": 1.0}]
            t0 = time.perf_counter()
            backend.activate(chosen)
            sync()
            costs.append(time.perf_counter() - t0)
        backend.activate(lora_rows[0]["adapters"])  # back to A: its images must be A's again, nothing left over
        pixels["lora_after_swaps"] = draw(backend.pipe, lora_rows)
        sync()
        result["swap_seconds_mean"] = sum(costs[1:]) / max(1, len(costs) - 1)  # the first loads the files
        result["swap_seconds_first"] = costs[0]
        if compiles_before is not None:
            result["compiles_during_swaps"] = backend.compiles - compiles_before
    if device.type == "cuda":
        # reserved counts what the caching allocator holds (CUDA graph pools among it), allocated only live tensors
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1024**3
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1024**3
    if name == "eager":
        reference.update(pixels)
    else:
        eager_case = {"plain": "plain", "lora": "lora", "lora_after_swaps": "lora"}  # what each is drawn as
        result["vs_eager_pixels"] = {case: difference(images, reference[eager_case[case]])
                                     for case, images in pixels.items() if eager_case[case] in reference}
    return result


def startup(name: str, args, folder: Path) -> dict:
    """Seconds from a fresh process's start to its first batch drawn: cold, then warm from the backend cache."""
    import subprocess

    cache = folder / f"startup-{name.replace('/', '_')}"
    times = {}
    for run in ("cold", "warm"):
        env = {**os.environ, "SDFLEET_CACHE": str(cache / "backend"), "TORCHINDUCTOR_CACHE_DIR": str(cache / run)}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_backends", "--child", name,
                               *_child_flags(args)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"start-up of {name} failed:\n{proc.stderr[-2000:]}")
        times[f"startup_{run}_seconds"] = time.perf_counter() - started
    return times


def _child_flags(args) -> list[str]:
    return ["--preset", args.preset, "--size", str(args.size), "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]


def child(name: str, args) -> None:
    """What --startup times in a fresh process: build, make the backend, draw one batch."""
    import torch

    from actors.generate import draw
    from actors.presets import build_preset

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    pipe = build_preset(args.preset).to(device=args.device, dtype=dtype)
    backend = make(name, args, None, pipe)
    draw(backend.pipe, rows_for(args.preset, args.batch_size, args.size, args.steps))
    if args.device == "cuda":
        torch.cuda.synchronize()


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
    parser.add_argument("--startup", action="store_true", help="also time each backend's start-up, cold and warm, "
                        "in fresh processes")
    parser.add_argument("--out", help="folder for bench.json (default: a temporary one)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        child(args.child, args)
        return 0
    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    names = sorted(names, key=lambda n: n != "eager")  # eager first: the others' pixels are compared with its
    unknown = sorted({n.split("/")[0] for n in names} - set(ALL))
    if unknown or "eager" not in names:
        parser.error(f"--backends must include eager (the baseline) and name only {', '.join(ALL)}; got {args.backends}")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-backends-"))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SDFLEET_CACHE", str(out / "cache"))
    store = make_store(args.preset, out / "adapters") if args.swaps else None
    results, reference = [], {}
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    report = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "torch": torch.__version__,
              "results": results}
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(measure(name, args, store, reference))
        if args.startup:
            results[-1].update(startup(name, args, out))
        results[-1]["vs_eager"] = results[-1]["images_per_second"] / results[0]["images_per_second"]
        print(f"[bench] {json.dumps(results[-1])}", file=sys.stderr, flush=True)
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")  # after each: a timeout keeps it
    eager = results[0]
    print(f"{args.preset} {args.size}px, {args.steps} steps, batch {args.batch_size}, {args.dtype}, {device}")
    for r in results:
        if "images_per_second_lora" in r:
            r["vs_eager_lora"] = r["images_per_second_lora"] / eager["images_per_second_lora"]
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'backend':<28} {'img/s':>7} {'vs eager':>8} {'LoRA img/s':>10} {'vs eager':>8} {'set-up s':>8} "
          f"{'cold s':>7} {'warm s':>7} {'swap ms':>8} {'compiles':>8} {'peak GB':>7} {'max diff':>8}")

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    for r in results:
        swap = f"{r['swap_seconds_mean'] * 1000:.1f}" if "swap_seconds_mean" in r else "-"
        print(f"{r['backend']:<28} {r['images_per_second']:>7.3f} {r['vs_eager']:>7.2f}x "
              f"{cell(r, 'images_per_second_lora', '.3f'):>10} {cell(r, 'vs_eager_lora', '.2f'):>7}x "
              f"{r['setup_seconds']:>8.1f} {cell(r, 'startup_cold_seconds', '.1f'):>7} "
              f"{cell(r, 'startup_warm_seconds', '.1f'):>7} {swap:>8} {str(r.get('compiles_during_swaps', '-')):>8} "
              f"{cell(r, 'peak_memory_gb', '.1f'):>7} "
              f"{max((d['max'] for d in r.get('vs_eager_pixels', {}).values()), default='-'):>8}")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
