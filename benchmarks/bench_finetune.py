"""Benchmark data-parallel fine-tuning: samples/s with 2 Ray Train workers against 1, on the CPU.

One run, on the `tiny` preset, a synthetic dataset and the same per-worker batch:

1. `sdfleet finetune full --workers 1 --cpus-per-worker C`
2. `sdfleet finetune full --workers 2 --cpus-per-worker C`  (target: >= 1.7x the samples/s of 1)
3. `sdfleet finetune full --workers 1 --cpus-per-worker 2C` (reference: one worker given every core)

Each worker gets the same cores in 1 and 2 (one torch thread per core), as each would get its own GPU
on a cluster, so 2 over 1 measures what data parallelism adds: gradient all-reduce, the per-step barrier.
3 says whether two workers beat one worker on the same cores. Samples/s come from the run's
train_log.jsonl: the mean of the logged windows after the first (which carries start-up). Peak memory
is each worker's max RSS, which each worker reports at the end.

The three runs are repeated `--repeats` times, interleaved, the order rotating (1 2 3, 2 3 1, ...), and the
ratios are medians of each repeat's own ratio. On a shared 2-core VM the same run's samples/s moved by up to 30%
between back-to-back runs (neighbours on the host), so one pair of runs cannot tell 1.6x from 1.8x.

    .venv/bin/python -m benchmarks.bench_finetune [--steps 60] [--repeats 3] [--batch-size 4] [--resolution 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.common import rotated, run_cli, versions

TARGET_SCALING = 1.7


def run(data: Path, out: Path, workers: int, cpus: int, args) -> dict:
    wall = run_cli(["finetune", "full", "--data", str(data), "--base", "tiny", "--out", str(out),
            "--workers", str(workers), "--cpus-per-worker", str(cpus), "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--resolution", str(args.resolution), "--lr", "1e-4",
            "--log-every", str(args.log_every), "--checkpoint-every", str(args.steps)], out)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    windows = [r["samples_per_second"] for r in records if "samples_per_second" in r][1:]
    finished = next(r for r in records if r.get("event") == "finished")
    return {"workers": workers, "cpus_per_worker": cpus, "wall_seconds": wall,
            "samples_per_second": sum(windows) / len(windows), "windows": len(windows),
            "peak_rss_mb_per_worker": finished["peak_rss_mb_per_worker"], "out": str(out)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the three runs (default 3)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per worker per step (default 4)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--images", type=int, default=64, help="synthetic training images (default 64)")
    parser.add_argument("--out", help="folder for the dataset, runs and bench.json (default: a new temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.steps < 3 * args.log_every:
        parser.error("--steps must be at least 3 x --log-every (the first window is start-up)")
    cores = os.cpu_count() or 1
    per_worker = max(1, cores // 2)

    from jobs.dataset import build_dataset
    from jobs.synthetic import write_images

    out = Path(args.out or tempfile.mkdtemp(prefix="sdfleet-bench-finetune-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_images(out / "images", args.images, size=args.resolution)
    build_dataset(str(out / "images"), str(out / "data"), resolution=args.resolution, log=lambda _: None)
    print(f"bench: {args.images} images at {args.resolution} px, {args.steps} steps, batch {args.batch_size} "
          f"per worker, {per_worker} core(s) per worker; out: {out}", file=sys.stderr, flush=True)

    labels = (("1 worker", 1, per_worker), ("2 workers", 2, per_worker), ("1 worker, all cores", 1, 2 * per_worker))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in labels}
    for repeat in range(args.repeats):
        for label, workers, cpus in rotated(list(labels), repeat):
            folder = out / f"{label.replace(' ', '-').replace(',', '')}-{repeat}"
            runs[label].append(run(out / "data", folder, workers, cpus, args))
            print(f"bench: {label} (repeat {repeat + 1}/{args.repeats}) done in {runs[label][-1]['wall_seconds']:.1f} s: "
                  f"{runs[label][-1]['samples_per_second']:.2f} samples/s", file=sys.stderr, flush=True)

    def ratios(a: str, b: str) -> list[float]:  # each repeat's own ratio: the drift between repeats cancels
        return [x["samples_per_second"] / y["samples_per_second"] for x, y in zip(runs[a], runs[b])]

    scaling_each, same_cores_each = ratios("2 workers", "1 worker"), ratios("2 workers", "1 worker, all cores")
    scaling, same_cores = statistics.median(scaling_each), statistics.median(same_cores_each)
    results = {label: {"workers": rs[0]["workers"], "cpus_per_worker": rs[0]["cpus_per_worker"],
                       "samples_per_second": statistics.median(r["samples_per_second"] for r in rs),
                       "samples_per_second_each": [round(r["samples_per_second"], 3) for r in rs],
                       "peak_rss_mb_per_worker": [max(r["peak_rss_mb_per_worker"][i] for r in rs)
                                                  for i in range(rs[0]["workers"])],
                       "repeats": rs} for label, rs in runs.items()}
    report = {"steps": args.steps, "batch_size_per_worker": args.batch_size, "resolution": args.resolution,
              "images": args.images, "preset": "tiny", "method": "full", "repeats": args.repeats, "runs": results,
              "two_over_one": scaling, "two_over_one_each": [round(r, 3) for r in scaling_each],
              "two_over_one_with_all_cores": same_cores,
              "two_over_one_with_all_cores_each": [round(r, 3) for r in same_cores_each],
              "target_two_over_one": TARGET_SCALING, "cpu_count": cores, "versions": versions(),
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{'run':<22}{'cores each':>11}{'samples/s (median)':>20}   {'each repeat':<30}{'peak RSS MB per worker':>24}")
    for label, r in results.items():
        peaks = ", ".join(f"{p:.0f}" for p in r["peak_rss_mb_per_worker"])
        each = ", ".join(f"{x:.1f}" for x in r["samples_per_second_each"])
        print(f"{label:<22}{r['cpus_per_worker']:>11}{r['samples_per_second']:>20.2f}   {each:<30}{peaks:>24}")
    mark = "ok" if scaling >= TARGET_SCALING else "BELOW TARGET"
    print(f"\n2 workers / 1 worker: {scaling:.2f}x median of {', '.join(f'{r:.2f}' for r in scaling_each)} "
          f"(target >= {TARGET_SCALING}: {mark}); 2 workers / 1 worker on all cores: {same_cores:.2f}x")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
