"""What a fresh process pays at its first draw, and whether a warm-up draw would buy it back.

An actor's first batch runs torch's kernels for the first time (oneDNN primitives, allocator growth); a
warm-up draw of one step at the same batch and size, before the first block arrives, would move that cost
out of the run where the actor would otherwise wait. Each pass starts one fresh process per variant, builds
`tiny` (2 torch threads, as an actor on 2 cores) and times batches of 8 at 256 px:

- `cold`     three batches straight away: the first carries the first-call cost;
- `warm-up`  a 1-step batch first (timed on its own), then the same three batches.

Passes rotate the variant order. Reported: the median of each batch's seconds, the warm-up's, and the
first-call cost (cold's first batch over its later ones) against what the warm-up costs.

    python -m benchmarks.bench_first_call [--repeats 3] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.common import fresh_process_parser, fresh_process_passes, save_report, versions

VARIANTS = ["cold", "warm-up"]
BATCH, SIZE, THREADS = 8, 256, 2


def one_process(variant: str, steps: int) -> None:
    """In the pass's own process: build tiny, draw, print the seconds as JSON."""
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import torch

    from actors.presets import build_preset

    torch.set_num_threads(THREADS)
    pipe = build_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a red star on a gray background, {i}" for i in range(BATCH)]

    def draw(n_steps: int) -> float:
        generators = [torch.Generator().manual_seed(i) for i in range(BATCH)]
        started = time.perf_counter()
        pipe(prompts, num_inference_steps=n_steps, generator=generators, output_type="np", height=SIZE, width=SIZE)
        return time.perf_counter() - started

    warm_up = draw(1) if variant == "warm-up" else 0.0
    print(json.dumps({"warm_up": warm_up, "batches": [draw(steps) for _ in range(3)]}))


def build_parser() -> argparse.ArgumentParser:
    parser = fresh_process_parser("benchmarks.bench_first_call", __doc__, VARIANTS, repeats=3)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of a batch (default 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        one_process(args.one, args.steps)
        return 0
    passes = fresh_process_passes("benchmarks.bench_first_call", VARIANTS, args.repeats, ("--steps", str(args.steps)))
    results = {}
    for variant, runs in passes.items():
        results[variant] = {"warm_up": round(statistics.median(r["warm_up"] for r in runs), 3),
                            "batches": [round(statistics.median(r["batches"][i] for r in runs), 3) for i in range(3)]}
    cold = results["cold"]["batches"]
    results["first_call_cost"] = round(cold[0] - statistics.median(cold[1:]), 3)
    print(f"{'variant':<10}{'warm-up s':>10}{'batch 1 s':>11}{'batch 2 s':>11}{'batch 3 s':>11}")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:<10}{r['warm_up']:>10.2f}" + "".join(f"{b:>11.2f}" for b in r["batches"]))
    print(f"first call costs {results['first_call_cost']:.2f} s; a warm-up costs {results['warm-up']['warm_up']:.2f} s")
    save_report(args.out, {"repeats": args.repeats, "steps": args.steps, "batch": BATCH, "size": SIZE,
                           "threads": THREADS, "results": results, "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
