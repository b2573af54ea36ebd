"""Benchmark `tiny`'s UNet at several attention-head counts: one training step and one denoising step.

`tiny`'s UNet has 64 channels in each attention layer. diffusers splits them into heads
(`attention_head_dim`, which UNet2DConditionModel reads as the number of heads). Eight heads of 8
channels make each layer's score matrix (tokens x tokens, per head) 4x larger than two heads of 32, for
the same parameters: on a CPU the attention then costs more than all the convolutions together. This
bench measures, in one process and interleaved:

- a training step as one Ray Train worker runs it (`actors.train.Denoiser`: text encoder + UNet, MSE,
  backward, AdamW) at the train_tiny batch of 16 per worker, on 1 thread;
- a denoising step as an actor runs it: the UNet forward on a guidance batch of 2 x 8, on 2 threads.

Every variant has the same parameters and the same random init; only the split into heads differs.
Each variant is timed `--repeats` times in turn, the order rotating (A, B, C, then B, C, A, ...): this VM's
speed drifts by up to 30% between minutes, so the ratios are medians of each repeat's own ratios.

    .venv/bin/python -m benchmarks.bench_heads [--heads 8 4 2] [--repeats 5] [--out bench.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import SimpleNamespace

from benchmarks.common import median_ratio, rotated, versions


def build(heads: int) -> SimpleNamespace:
    """`tiny`'s tokenizer, text encoder and UNet at the fixed random init, with the UNet's attention split into
    `heads`. Every split draws the same initial weights (the same seed, the same parameter shapes)."""
    import torch
    from diffusers import UNet2DConditionModel

    from actors.presets import PRESETS, build_preset

    pipe = build_preset("tiny-random")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**PRESETS["tiny-random"]["unet"], "attention_head_dim": heads})
    return SimpleNamespace(unet=unet, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)


def time_training(pipe, steps: int, batch: int) -> float:
    """Seconds per training step (after one warm-up step), on one thread like a train_tiny worker."""
    import torch
    import torch.nn.functional as F

    from actors.train.model import Denoiser

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    net = Denoiser(pipe.unet, pipe.text_encoder).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    latents = torch.randn(batch, 4, 32, 32, generator=g)
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    ids = pipe.tokenizer(["a red star on a gray background"] * batch, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    target = torch.randn(latents.shape, generator=g)

    def step():
        loss = F.mse_loss(net(latents, timesteps, ids), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def time_denoising(pipe, steps: int, batch: int) -> float:
    """Seconds per UNet forward on a guidance batch (2 x `batch`), on two threads like a CPU actor."""
    import torch

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet.eval()
    latents = torch.randn(2 * batch, 4, 32, 32, generator=g)
    timestep = torch.tensor(500)
    with torch.no_grad():
        ids = pipe.tokenizer(["a red star on a gray background"] * batch + [""] * batch, padding="max_length",
                             max_length=77, return_tensors="pt").input_ids
        context = pipe.text_encoder(ids)[0]
        unet(latents, timestep, context)
        start = time.perf_counter()
        for _ in range(steps):
            unet(latents, timestep, context)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_heads", description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[8, 4, 2], help="head counts; the first is the "
                        "baseline (default 8 4 2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per repeat")
    parser.add_argument("--denoise-steps", type=int, default=10, help="timed denoising steps per repeat")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    for h in args.heads:
        if h < 1 or 64 % h:
            parser.error(f"--heads {h}: a head count must divide tiny's 64 attention channels (1, 2, 4, 8, 16, 32, 64)")
    for flag in ("repeats", "train_steps", "denoise_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1; got {getattr(args, flag)}")
    pipes = {h: build(h) for h in args.heads}
    times = {h: {"train": [], "denoise": []} for h in args.heads}
    for repeat in range(args.repeats):
        for h in rotated(args.heads, repeat):
            pipe = pipes[h]
            times[h]["train"].append(time_training(pipe, args.train_steps, batch=16))
            times[h]["denoise"].append(time_denoising(pipe, args.denoise_steps, batch=8))
        print(f"[bench_heads] repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{h} heads {times[h]['train'][-1]:.3f} s/train step, {times[h]['denoise'][-1] * 1000:.0f} ms/denoise"
            for h in args.heads), file=sys.stderr, flush=True)
    base = args.heads[0]
    results = {}
    for h in args.heads:
        results[h] = {k: {"median_seconds": statistics.median(v), "all_seconds": v} for k, v in times[h].items()}
        for k in ("train", "denoise"):
            results[h][k]["speedup_vs_baseline"] = median_ratio(times[base][k], times[h][k])
    for h in args.heads:
        print(f"{h} heads: train step {results[h]['train']['median_seconds']:.3f} s "
              f"({results[h]['train']['speedup_vs_baseline']:.2f}x), denoising step "
              f"{results[h]['denoise']['median_seconds'] * 1000:.0f} ms "
              f"({results[h]['denoise']['speedup_vs_baseline']:.2f}x vs {base} heads)")
    if args.out:
        report = {"baseline_heads": base, "repeats": args.repeats, "train_batch": 16, "denoise_batch": "2 x 8",
                  "results": {str(h): r for h, r in results.items()}, "versions": versions()}
        with open(args.out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
