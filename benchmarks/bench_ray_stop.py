"""What a local Ray costs a run before its first task and after its last: start and stop, two ways of stopping.

Every `sdfleet generate` or `finetune` without `--address` starts a local Ray and stops it at the end; on a
96-image `tiny` run those seconds are part of the end-to-end figure of `bench_generate`. Each pass starts a
fresh Python process per variant, which imports Ray, calls `cluster.connect.connect()` (a local Ray, as a
run starts it), runs one task, and stops Ray with

- `ray.shutdown`  Ray's own call (what sdfleet did before 2026-12-05);
- `disconnect`    `cluster.connect.disconnect()`, which first kills Ray's autoscaler monitor: on SIGTERM it
                  reports to the already stopped GCS and is killed by Ray only after a second.

Passes rotate the variant order, so drift on a shared VM hits both alike. Reported per variant: median
seconds to import Ray, to start it, to stop it, and the process's launch-to-exit time; and the median ratio
of each stop to `ray.shutdown`'s in its own pass.

    python -m benchmarks.bench_ray_stop [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import fresh_process_parser, fresh_process_passes, median_ratio, versions

BASELINE = "ray.shutdown"
VARIANTS = [BASELINE, "disconnect"]


def one_process(variant: str) -> None:
    """In the pass's own process: import, start, one task, stop; prints the times as JSON."""
    started = time.perf_counter()
    import ray

    from cluster.connect import connect, disconnect

    imported = time.perf_counter()
    connect(quiet=True)
    ray.get(ray.remote(lambda: 1).options(num_cpus=0.25).remote())
    connected = time.perf_counter()
    disconnect() if variant == "disconnect" else ray.shutdown()
    stopped = time.perf_counter()
    print(json.dumps({"import": imported - started, "start": connected - imported, "stop": stopped - connected}))


def build_parser() -> argparse.ArgumentParser:
    return fresh_process_parser("benchmarks.bench_ray_stop", __doc__, VARIANTS, repeats=5)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        one_process(args.one)
        return 0
    passes = fresh_process_passes("benchmarks.bench_ray_stop", VARIANTS, args.repeats, timeout=300)
    results = {}
    for variant, runs in passes.items():
        results[variant] = {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        results[variant]["stop_speedup_vs_ray_shutdown"] = round(
            median_ratio([r["stop"] for r in passes[BASELINE]], [r["stop"] for r in runs]), 3)
        results[variant]["all_stop_seconds"] = [round(r["stop"], 3) for r in runs]
    print(f"{'variant':<16}{'import s':>10}{'start s':>10}{'stop s':>10}{'launch-exit s':>15}")
    for variant, r in results.items():
        print(f"{variant:<16}{r['import']:>10.2f}{r['start']:>10.2f}{r['stop']:>10.2f}{r['launch_to_exit']:>15.2f}")
    report = {"repeats": args.repeats, "results": results, "versions": versions()}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
