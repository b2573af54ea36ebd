"""Benchmark `sdfleet generate` against a bare diffusers loop, side by side (default: `tiny` at 256x256 on CPU).

One run measures four figures on the same rows (same prompts, same seeds, one torch.Generator per row):

1. bare          a plain diffusers loop in this process, batches of `--batch-size`, output_type="np",
                 no watermark, no PNG: the ceiling sdfleet is measured against.
2. seed-style    the seed article's loop: one image per pipeline call (batch 1).
2b. bare e2e    the bare loop as a script of its own, timed from launch to exit (imports, model build, no
                 warm-up): the end-to-end baseline a user's own script would be.
3. sdfleet e2e   `sdfleet generate MANIFEST --out FRESH --actors 1 --batch-size B --finish MODE` as a
                 subprocess, timed from launch to exit: Python imports, Ray start-up, model build, drawing,
                 shutdown. Once per `--finish` mode (default: stage and inline), watermark on.
4. sdfleet steady  images/s of that same run once the actor is warm, from the ledger's timestamps.

The in-process loops (1, 2) each make one untimed warm-up call first (`--warmup N` for more), so they
measure the steady state too. Compare 4 with 1 for per-image overhead (watermark, PNG, Ray Data hand-offs)
and 3 with 1 for everything a user waits for.

    .venv/bin/python -m benchmarks.bench_generate [--images 96] [--steps 20] [--batch-size 8] [--warmup 1]
                                            [--finish stage inline] [--no-seed-style] [--out DIR]

On a GPU (the 2026-12-04 H200 check of ../shared/GPU.md, in one command):

    python -m benchmarks.bench_generate --preset sd21-random --size 768 --steps 30 --images 48 --device cuda --no-seed-style

Prints a table and writes the same numbers to DIR/bench.json. Nothing else in the repo is touched.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from benchmarks.common import REPO_ROOT, run_cli, steady_state, versions

# Targets the lead set for sdfleet relative to the bare loop.
TARGET_STEADY = 0.95
TARGET_E2E = 0.75


def build_manifest(n: int, steps: int, path: Path, size: int = 256) -> list[dict]:
    """Write an n-row product-shot manifest with explicit seeds; returns its rows as the loops see them."""
    from manifests.expand import expand, write_manifest

    products = [{"sku": f"bench-{i:04d}", "product": f"{color} {thing}"}
                for i, (color, thing) in enumerate(_names(n))]
    table = expand("a studio photo of a {product} on a white background", products,
                   negative_prompt="blurry, low quality",
                   fixed={"steps": steps, "width": size, "height": size, "guidance_scale": 7.5, "scheduler": "ddim"})
    write_manifest(table, str(path))
    return table.to_pylist()


def _names(n: int):
    colors = ["red", "blue", "green", "black", "white", "silver", "golden", "wooden"]
    things = ["sneaker", "teapot", "backpack", "wristwatch", "lamp", "chair", "camera", "guitar", "mug", "bicycle", "vase", "headphones"]
    return [(colors[i % len(colors)], things[(i // len(colors)) % len(things)]) for i in range(n)]


def call_pipe(pipe, rows: list[dict]) -> np.ndarray:
    """One pipeline call over rows that share size/steps/guidance; one generator per row, as sdfleet does."""
    import torch

    first = rows[0]
    return pipe(
        prompt=[r["prompt"] for r in rows],
        negative_prompt=[r["negative_prompt"] for r in rows],
        height=first["height"], width=first["width"],
        num_inference_steps=first["steps"], guidance_scale=first["guidance_scale"],
        generator=[torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows],
        output_type="np",
    ).images


def time_loop(pipe, batches: list[list[dict]], warmup: int) -> tuple[float, np.ndarray]:
    """Call the first batch `warmup` times (not timed), then time every batch; returns (seconds, images)."""
    for _ in range(warmup):  # first-call allocations and lazy inits stay out of the timing
        call_pipe(pipe, batches[0])
    started = time.perf_counter()
    images = [call_pipe(pipe, batch) for batch in batches]
    return time.perf_counter() - started, np.concatenate(images)


def run_sdfleet(manifest: Path, out: Path, batch_size: int, finish: str = "auto", preset: str = "tiny",
                device: str = "auto") -> float:
    """`sdfleet generate` with one actor; returns wall seconds."""
    return run_cli(["generate", str(manifest), "--out", str(out), "--actors", "1", "--batch-size", str(batch_size),
                    "--finish", finish, "--model", f"default={preset}", "--device", device], out)


def bare_script(manifest: str, batch_size: int, preset: str, device: str) -> None:
    """The bare loop as a user's own script would run it: imports, model build, every batch, no warm-up.
    Run in a fresh process and timed from launch to exit, it is the end-to-end baseline."""
    import torch
    from diffusers import DDIMScheduler

    from actors.presets import build_preset

    rows = pq.read_table(manifest).to_pylist()
    torch.set_num_threads(os.cpu_count() or 1)
    pipe = build_preset(preset)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if device == "cuda":
        pipe = pipe.to("cuda", torch.float16)
    for i in range(0, len(rows), batch_size):
        call_pipe(pipe, rows[i:i + batch_size])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_generate", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="rows in the manifest (default 96)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per pipeline call (default 8)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before each in-process loop (default 1)")
    parser.add_argument("--finish", nargs="+", default=["stage", "inline"], choices=["auto", "stage", "inline"],
                        help="sdfleet runs, one per finishing mode (default: stage inline)")
    parser.add_argument("--no-seed-style", action="store_true", help="skip the batch-1 loop")
    parser.add_argument("--preset", default="tiny", help="model preset (default tiny; sd21-random on a GPU)")
    parser.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where both the bare loop and sdfleet draw (cuda: fp16, as sdfleet's GPU actors)")
    parser.add_argument("--out", help="folder for the manifest, the sdfleet run and bench.json (default: a new temp dir)")
    return parser


def print_table(report: dict) -> None:
    """The figures of one bench.json as a table, each ratio against its target."""
    def mark(ratio: float, target: float) -> str:
        return "ok" if ratio >= target else "BELOW TARGET"

    n, b, runs = report["images"], report["batch_size"], report["sdfleet"]
    bare, bare_s, bare_e2e_s = report["bare_images_per_second"], report["bare_seconds"], report["bare_end_to_end_seconds"]
    seed_s = None if report["seed_style_images_per_second"] is None else n / report["seed_style_images_per_second"]
    print(f"\n{'run':<30}{'images/s':>10}{'seconds':>10}{'/ bare':>8}")
    print(f"{'bare (batch %d, warm)' % b:<30}{bare:>10.3f}{bare_s:>10.2f}{1:>8.3f}")
    print(f"{'bare end-to-end (a script)':<30}{n / bare_e2e_s:>10.3f}{bare_e2e_s:>10.2f}{bare_s / bare_e2e_s:>8.3f}")
    if seed_s is not None:
        print(f"{'seed-style (batch 1, warm)':<30}{n / seed_s:>10.3f}{seed_s:>10.2f}{bare_s / seed_s:>8.3f}")
    for mode, r in runs.items():
        print(f"{f'sdfleet --finish {mode} e2e':<30}{r['end_to_end_images_per_second']:>10.3f}"
              f"{r['seconds_end_to_end']:>10.2f}{r['end_to_end_over_bare']:>8.3f}  "
              f"(target >= {TARGET_E2E}: {mark(r['end_to_end_over_bare'], TARGET_E2E)}; "
              f"{r['end_to_end_over_bare_end_to_end']:.3f} of the bare script end to end)")
        print(f"{f'sdfleet --finish {mode} steady':<30}{r['steady_images_per_second']:>10.3f}"
              f"{r['steady_state']['steady_seconds']:>10.2f}{r['steady_over_bare']:>8.3f}  "
              f"(target >= {TARGET_STEADY}: {mark(r['steady_over_bare'], TARGET_STEADY)})")
    print(f"torch threads {report['torch_threads']}, CPUs {report['cpu_count']}")


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--bare-script"]:  # the end-to-end baseline's own process
        manifest, batch, preset, device = sys.argv[2:6]
        bare_script(manifest, int(batch), preset, device)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.images < 2 * args.batch_size:
        parser.error(f"--images must be at least 2 x --batch-size ({2 * args.batch_size}) for a steady-state figure")

    import torch
    from diffusers import DDIMScheduler

    from actors.presets import build_preset

    out = Path(args.out or tempfile.mkdtemp(prefix="sdfleet-bench-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n, b = args.images, args.batch_size

    # 1. the manifest, and the same rows as plain dicts for the in-process loops
    manifest = out / "manifest.parquet"
    rows = build_manifest(n, args.steps, manifest, args.size)
    batches = [rows[i:i + b] for i in range(0, n, b)]
    singles = [[r] for r in rows]

    # 2. the pipeline, as plain diffusers: tiny preset, float32 on the CPU, all cores, DDIM (the rows' scheduler)
    torch.set_num_threads(os.cpu_count() or 1)
    pipe = build_preset(args.preset)
    if args.device == "cuda":
        pipe = pipe.to("cuda", torch.float16)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    print(f"bench: {n} images, {args.steps} steps, batch {b}, {args.preset} at {args.size} px on {args.device}, "
          f"{torch.get_num_threads()} torch threads; "
          f"out: {out}", file=sys.stderr, flush=True)

    # 3. bare: batches of b, after the warm-up call(s)
    bare_s, bare_images = time_loop(pipe, batches, args.warmup)
    print(f"bench: bare done in {bare_s:.2f} s", file=sys.stderr, flush=True)

    # 3b. bare end to end: the same loop as a script of its own, from launch to exit
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.bench_generate", "--bare-script", str(manifest), str(b), args.preset,
                    args.device], cwd=REPO_ROOT, check=True, capture_output=True)
    bare_e2e_s = time.perf_counter() - started
    print(f"bench: bare end to end done in {bare_e2e_s:.2f} s", file=sys.stderr, flush=True)

    # 4. seed-style: one image per call, after the warm-up call(s). The article takes `.images[0]` as PIL;
    #    output_type="np" here too, so the ratio to bare measures batching alone.
    seed_s, seed_images = (None, None) if args.no_seed_style else time_loop(pipe, singles, args.warmup)
    if seed_s is not None:
        print(f"bench: seed-style done in {seed_s:.2f} s", file=sys.stderr, flush=True)
    del pipe  # give the memory back before sdfleet's actor builds its own copy: the pipeline, then the blocks
    gc.collect()  # the caching allocator keeps for this process (the actor is another process)
    if args.device == "cuda":
        torch.cuda.empty_cache()

    # 5. sdfleet end to end, once per finishing mode, each into a fresh folder so no row is skipped;
    # 6. its steady state, from the same run's ledger
    bare = n / bare_s
    runs = {}
    for mode in args.finish:
        run_dir = Path(tempfile.mkdtemp(prefix=f"sdfleet-run-{mode}-", dir=out))
        e2e_s = run_sdfleet(manifest, run_dir, b, mode, args.preset, args.device)
        summary = json.loads((run_dir / "run.json").read_text())
        if summary["ok"] != n or summary["skipped"]:
            sys.exit(f"sdfleet drew {summary['ok']} of {n} rows ({summary['skipped']} skipped); see {run_dir}")
        print(f"bench: sdfleet --finish {mode} done in {e2e_s:.2f} s", file=sys.stderr, flush=True)
        steady = steady_state(run_dir / "results", b)
        runs[mode] = {
            "finish": summary["finish"], "seconds_end_to_end": e2e_s, "end_to_end_images_per_second": n / e2e_s,
            "steady_images_per_second": steady["steady_images_per_second"],
            "in_actor_images_per_second": steady["in_actor_images_per_second"],
            "steady_over_bare": steady["steady_images_per_second"] / bare, "end_to_end_over_bare": n / e2e_s / bare,
            "end_to_end_over_bare_end_to_end": bare_e2e_s / e2e_s,
            "run_json": {k: summary[k] for k in ("wall_seconds", "images_per_second", "startup", "watermark", "device")},
            "out": str(run_dir), "steady_state": steady,
        }

    # 7. the figures
    report = {
        "images": n, "steps": args.steps, "batch_size": b, "width": args.size, "height": args.size, "preset": args.preset, "device": args.device,
        "scheduler": "ddim", "guidance_scale": 7.5,
        "bare_images_per_second": bare, "bare_seconds": bare_s, "bare_end_to_end_seconds": bare_e2e_s,
        "seed_style_images_per_second": None if seed_s is None else n / seed_s,
        "bare_batch_over_seed_style": None if seed_s is None else seed_s / bare_s,
        "sdfleet": runs,
        "targets": {"steady_over_bare": TARGET_STEADY, "end_to_end_over_bare": TARGET_E2E},
        # Per-row generators should make batch 1 and batch b draw the same pixels; float noise only.
        "bare_vs_seed_style_max_abs_diff": None if seed_s is None else float(np.abs(bare_images - seed_images).max()),
        "warmup_calls": args.warmup,  # untimed calls before each of bare and seed-style; sdfleet has none
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "versions": versions(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")

    print_table(report)
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
