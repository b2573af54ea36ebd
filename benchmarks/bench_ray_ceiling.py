"""What running inside Ray costs the draw: the same loops in this process, in a Ray task and in Ray actors.

The steady-state target of `bench_generate` (sdfleet >= 0.95 of the bare loop) assumes the draw loses nothing
by running inside Ray. This bench measures that alone: no Ray Data, no driver loop, no finishing stage. One
local Ray (all CPUs, no dashboard) stays up for the whole bench, and the same rows (`tiny`, one
torch.Generator per row, `--threads` torch threads) are drawn by

- `bare, in process`      bench_generate's bare diffusers loop in a plain Python process (Ray up, idle);
- `actor class, in process`  sdfleet's own `GeneratorActor` called directly in a plain Python process,
                          finishing its images itself (watermark, read-back, PNG, write): sdfleet's
                          per-batch work without Ray;
- `bare, ray task`        the bare loop inside one Ray task holding one CPU;
- `bare, ray actor`       the bare loop inside a Ray actor holding one CPU, called batch by batch;
- `actor class, ray actor`  `GeneratorActor` as a Ray actor, called batch by batch (what Ray Data does).

Every variant draws in a process of its own, made for its pass and ended after it, so one variant runs at a
time (two loops in one process would each start an OpenMP thread team, and libgomp throttles both once a
process holds more OpenMP threads than there are CPUs: ~30% slower here). The Ray variants get
OMP_NUM_THREADS as sdfleet's CPU actors do. Passes rotate the variant order, so drift on a shared VM
hits all alike; each pass makes one untimed warm-up call. Reported: images/s, cores used (the drawing
process's CPU time over wall time) and the median ratio of each variant to `bare, in process` in its own pass.

    python -m benchmarks.bench_ray_ceiling [--images 48] [--batch-size 8] [--steps 20] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.common import median_ratio, rotated, versions

BASELINE = "bare, in process"


class BareLoop:
    """bench_generate's bare loop: `tiny`, DDIM, `threads` torch threads; call it with lists of rows."""

    def __init__(self, threads: int):
        import torch
        from diffusers import DDIMScheduler

        from actors.presets import build_preset

        torch.set_num_threads(threads)
        self.pipe = build_preset("tiny")
        self.pipe.scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)

    def __call__(self, rows: list[dict]) -> None:
        from benchmarks.bench_generate import call_pipe

        call_pipe(self.pipe, rows)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Timed:
    """Wraps a drawer so the process that draws times itself (a Ray actor's CPU is not the driver's)."""

    def __init__(self, make, *args, **kwargs):
        self.drawer = make(*args, **kwargs)

    def warm(self, batch) -> None:
        self.drawer(batch)

    def run(self, batches: list) -> tuple[float, float]:
        cpu, started = cpu_seconds(), time.perf_counter()
        for batch in batches:
            self.drawer(batch)
        return time.perf_counter() - started, cpu_seconds() - cpu


def timed_once(make, inputs: list, *args, **kwargs) -> tuple[float, float]:
    """Make the drawer, warm it with the first input, time all inputs: (wall seconds, CPU seconds)."""
    timed = Timed(make, *args, **kwargs)
    timed.warm(inputs[0])
    return timed.run(inputs)


def work_tables(rows: list[dict], batch_size: int, watermark: str) -> tuple[list, dict]:
    """The rows resolved for `tiny` as the driver resolves them, in blocks as Ray Data hands them to the actors,
    and the model record (`ModelInfo.defaults()`) the actors are given."""
    from actors.models import describe_model
    from manifests.rows import WORK_SCHEMA, to_table
    from manifests.schema import ManifestRow, resolve_row

    model = describe_model("default", "tiny")
    defaults = model.defaults()
    resolved = [{**resolve_row(ManifestRow(**{k: v for k, v in row.items() if v is not None}), defaults,
                               watermark=watermark), "status": None} for row in rows]
    return [to_table(resolved[i:i + batch_size], WORK_SCHEMA) for i in range(0, len(resolved), batch_size)], defaults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ray_ceiling", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="rows drawn per pass (default 48)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all CPUs)")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each variant (default 3)")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)

    import ray

    from actors.actor import GeneratorActor
    from benchmarks.bench_generate import build_manifest

    tmp = tempfile.TemporaryDirectory()
    rows = build_manifest(args.images, args.steps, Path(tmp.name) / "manifest.parquet")
    batches = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    tables, model = work_tables(rows, args.batch_size, watermark="sdfleet")
    actor_kwargs = dict(models={"default": model}, out_uri=str(Path(tmp.name) / "out"), batch_size=args.batch_size,
                        device="cpu", torch_threads=args.threads, finish_inline=True)

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    options = dict(num_cpus=1, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads),
                                                         "TRANSFORMERS_VERBOSITY": "error"}})
    remote_timed = ray.remote(**options)(Timed)

    def in_process(make, inputs, *a, **kw):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(timed_once, make, inputs, *a, **kw).result()

    def in_actor(make, inputs, *a, **kw):
        actor = remote_timed.remote(make, *a, **kw)
        try:
            ray.get(actor.warm.remote(inputs[0]))
            return ray.get(actor.run.remote(inputs))
        finally:
            ray.kill(actor)

    variants = {
        BASELINE: lambda: in_process(BareLoop, batches, args.threads),
        "actor class, in process": lambda: in_process(GeneratorActor, tables, **actor_kwargs),
        "bare, ray task": lambda: ray.get(ray.remote(**options)(timed_once).remote(BareLoop, batches, args.threads)),
        "bare, ray actor": lambda: in_actor(BareLoop, batches, args.threads),
        "actor class, ray actor": lambda: in_actor(GeneratorActor, tables, **actor_kwargs),
    }
    passes: dict[str, list[dict]] = {name: [] for name in variants}
    try:
        for repeat in range(args.repeats):
            for name in rotated(list(variants), repeat):
                wall, cpu = variants[name]()
                result = {"images_per_second": args.images / wall, "cores": cpu / wall}
                passes[name].append(result)
                print(f"bench: pass {repeat + 1}, {name}: {result['images_per_second']:.3f} img/s, "
                      f"{result['cores']:.2f} cores", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        tmp.cleanup()

    baseline = [p["images_per_second"] for p in passes[BASELINE]]
    ratios = {name: median_ratio([p["images_per_second"] for p in ps], baseline) for name, ps in passes.items()}
    report = {"images": args.images, "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
              "cpu_count": os.cpu_count(), "repeats": args.repeats, "passes": passes,
              "over_bare_in_process": ratios, "versions": versions()}
    print(f"\n{'variant':<26}{'images/s':>10}{'cores':>8}{'/ bare':>8}")
    for name, ps in passes.items():
        print(f"{name:<26}{statistics.median(p['images_per_second'] for p in ps):>10.3f}"
              f"{statistics.median(p['cores'] for p in ps):>8.2f}{ratios[name]:>8.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
