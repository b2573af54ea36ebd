"""Benchmark ways to speed up one UNet training step of `tiny`, side by side: is the CPU recipe compute-bound?

`train_tiny`'s UNet stage is 4,000 steps of this step (text encoder + UNet forward, v-loss, backward,
AdamW) on each of 2 Ray Train workers, one thread each, at batch 8 a worker. This bench runs the step in one
process, the way a worker does (`actors.train.Denoiser`, the committed `tiny` weights, 1 thread), at batch
16 by default (the recipe's batch until 2026-11-27; `batch-half` times the 8 it runs now), in variants:

- `eager`: the step as `actors/train.py` runs it (the baseline);
- `channels-last`: the UNet and its input in channels-last memory format (oneDNN's preferred conv layout);
- `compile`: the Denoiser under `torch.compile` (inductor), forward and backward; its first steps compile;
- `foreach`: AdamW's multi-tensor (`foreach=True`) update; on a CPU torch defaults to one tensor at a time;
- `batch-half`: eager at half the batch (twice the steps for the same samples): is the per-sample cost flat?

Each variant is timed `--repeats` times in turn, the order rotating, and its speed-up is the median of
each repeat's own ratio to `eager` in seconds per sample (this VM's speed drifts between minutes).

    .venv/bin/python -m benchmarks.bench_train_step [--variants eager compile ...] [--repeats 5] [--out bench.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

from benchmarks.common import median_ratio, rotated, versions

VARIANTS = ("eager", "channels-last", "compile", "foreach", "batch-half")


def make_step(variant: str, pipe, batch: int, device: str):
    """A closure running one training step of `variant`, and the samples it takes."""
    import torch
    import torch.nn.functional as F

    from actors.train.model import Denoiser

    if variant == "batch-half":
        batch = max(1, batch // 2)
    g = torch.Generator().manual_seed(0)
    net = Denoiser(copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)).to(device).train()
    latents = torch.randn(batch, 4, 32, 32, generator=g).to(device)
    if variant == "channels-last":
        net.unet.to(memory_format=torch.channels_last)
        latents = latents.to(memory_format=torch.channels_last)
    timesteps = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ids = pipe.tokenizer(["a red star on a gray background"] * batch, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids.to(device)
    target = torch.randn(latents.shape, generator=g).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=variant == "foreach" or None)
    forward = torch.compile(net) if variant == "compile" else net

    def step() -> None:
        loss = F.mse_loss(forward(latents, timesteps, ids), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device != "cpu":
            torch.cuda.synchronize()

    return step, batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="eager is always run first and is the baseline")
    parser.add_argument("--batch", type=int, default=16, help="per worker (default 16; train_tiny runs 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, as one train_tiny worker (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile compiles in them)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the same bench on a GPU")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    for flag in ("batch", "threads", "repeats", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1; got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more; got {args.warmup}")
    import torch

    from actors.presets import build_preset

    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no GPU here; use --device cpu")
    torch.set_num_threads(args.threads)
    variants = ["eager"] + [v for v in dict.fromkeys(args.variants) if v != "eager"]
    pipe = build_preset("tiny")
    steps = {}
    for v in variants:
        steps[v] = make_step(v, pipe, args.batch, args.device)
        started = time.perf_counter()
        for _ in range(args.warmup):
            steps[v][0]()
        print(f"[bench_train_step] {v}: {args.warmup} warm-up steps in {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)
    per_sample = {v: [] for v in variants}  # seconds per training sample, one entry per repeat
    for repeat in range(args.repeats):
        for v in rotated(variants, repeat):
            step, batch = steps[v]
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            per_sample[v].append((time.perf_counter() - started) / args.steps / batch)
        print(f"[bench_train_step] repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{v} {per_sample[v][-1] * steps[v][1]:.3f} s/step" for v in variants), file=sys.stderr, flush=True)
    results = {}
    for v in variants:
        results[v] = {"batch": steps[v][1], "median_seconds_per_step": statistics.median(per_sample[v]) * steps[v][1],
                      "median_ms_per_sample": statistics.median(per_sample[v]) * 1000,
                      "speedup_vs_eager": median_ratio(per_sample["eager"], per_sample[v]),
                      "all_seconds_per_sample": per_sample[v]}
        print(f"{v:>13}: {results[v]['median_seconds_per_step']:.3f} s a step of {steps[v][1]}, "
              f"{results[v]['median_ms_per_sample']:.1f} ms a sample ({results[v]['speedup_vs_eager']:.2f}x eager)")
    if args.out:
        report = {"device": args.device, "threads": args.threads, "repeats": args.repeats, "steps": args.steps,
                  "results": results, "versions": versions()}
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
