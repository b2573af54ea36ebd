"""Does finishing (watermark, read-back, PNG, write) overlap with drawing? Measured without a GPU.

The draw stage is replaced by a stand-in for an accelerator: an actor that sleeps a fixed time per batch
(holding no CPU while it waits, as a process waiting on a GPU does) and returns ready-made pixels. The
rest is the real `sdfleet generate` path: the real plan, Ray Data stages, watermark, PNG and ledger.
Each `--finish` mode runs on the same rows in one invocation:

- `stage`: the finishing stage on CPU workers of its own (the default on GPUs);
- `inline`: each actor finishes its own batch before it takes the next (how sdfleet worked before).

The stand-in allows `batch / seconds-per-batch` images/s; a path that overlaps reaches close to it.
Defaults follow the H200 figures in ../shared/GPU.md: 768 px, batch 8, 3.8 s a batch (SD 2.1, 30 steps).
Half the stand-in's images are product shots on a white background, so the watermark's headroom retries
are in the figure.

    python -m benchmarks.bench_overlap [--images 96] [--seconds-per-batch 3.8] [--size 768] [--batch-size 8]
                                       [--finish stage inline] [--out DIR]

A 10,000-row run (`--images 10000 --seconds-per-batch 0.2 --size 256 --finish stage`) shows whether
memory stays bounded: peak memory in use on the machine during each run is reported beside its start.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from actors.actor import GeneratorActor
from benchmarks.common import image_bank, steady_state, versions

TARGET = 0.9  # images/s of the stage path over what the stand-in allows


def stand_in(seconds_per_batch: float) -> type:
    """A GeneratorActor whose draw waits `seconds_per_batch` per batch of rows instead of using a model."""

    class StandInActor(GeneratorActor):
        def load(self):
            self.bank: dict[int, list[np.ndarray]] = {}  # no model: pixels come from a bank of test images
            self.threads = 0  # no torch: what run.json's backend_stats say it drew on

        def draw(self, rows):
            drawn = []
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                time.sleep(seconds_per_batch)  # the device works; this process holds no CPU
                for row in batch:
                    if row["width"] not in self.bank:
                        self.bank[row["width"]] = image_bank(row["width"])
                    bank = self.bank[row["width"]]
                    drawn.append({**row, "status": None, "pixels": bank[row["row"] % len(bank)].tobytes(),
                                  "seconds": seconds_per_batch / len(batch), "warning": None})
            return drawn

    return StandInActor


class PeakMemory:
    """Peak memory in use on this machine (all processes: driver, Ray, workers) while a block runs."""

    def __enter__(self):
        import psutil

        self.baseline = self.peak = psutil.virtual_memory().used
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        import psutil

        while not self._stop.wait(0.25):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def write_manifest(path: Path, images: int, size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"standin-{i:05d}", "prompt": f"product {i} on a white background", "seed": i,
             "width": size, "height": size, "steps": 30} for i in range(images)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def run_mode(mode: str, manifest: Path, out: Path, args) -> dict:
    from jobs.generate import GenerateConfig, run_generate

    cfg = GenerateConfig(manifests=[str(manifest)], out=str(out), batch_size=args.batch_size, finish=mode,
                         actors=args.actors)
    with PeakMemory() as memory:
        started = time.perf_counter()
        summary = run_generate(cfg, actor_cls=stand_in(args.seconds_per_batch))
        wall = time.perf_counter() - started
    if summary["ok"] != args.images:
        sys.exit(f"{mode}: {summary['ok']} of {args.images} rows ok; see {out}")
    steady = steady_state(out / "results", args.batch_size * args.actors)
    allowed = args.batch_size * args.actors / args.seconds_per_batch
    return {
        "wall_seconds": round(wall, 3),
        "whole_run_images_per_second": args.images / wall,
        "steady_images_per_second": steady["steady_images_per_second"],
        "steady_over_allowed": steady["steady_images_per_second"] / allowed,
        "peak_memory_mb_over_start": round((memory.peak - memory.baseline) / 2**20, 1),
        "startup": summary["startup"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_overlap", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--seconds-per-batch", type=float, default=3.8, help="the stand-in's draw time per batch")
    parser.add_argument("--size", type=int, default=768, help="image side in px (default 768)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--finish", nargs="+", default=["stage", "inline"], choices=["stage", "inline"])
    parser.add_argument("--out", help="folder for the runs and bench.json (default: a new temp dir)")
    args = parser.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="sdfleet-overlap-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.parquet"
    write_manifest(manifest, args.images, args.size)
    allowed = args.batch_size * args.actors / args.seconds_per_batch
    print(f"bench: {args.images} images at {args.size} px, batch {args.batch_size}, {args.actors} stand-in actor(s) "
          f"at {args.seconds_per_batch} s a batch: {allowed:.3f} img/s allowed", file=sys.stderr, flush=True)
    results = {}
    for mode in args.finish:
        results[mode] = run_mode(mode, manifest, out / f"run-{mode}", args)
        print(f"bench: {mode} done: steady {results[mode]['steady_images_per_second']:.3f} img/s", file=sys.stderr,
              flush=True)
    report = {"images": args.images, "size": args.size, "batch_size": args.batch_size, "actors": args.actors,
              "seconds_per_batch": args.seconds_per_batch, "allowed_images_per_second": allowed,
              "target_stage_steady_over_allowed": TARGET, "modes": results, "versions": versions()}
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'finish':<8}{'steady img/s':>14}{'/ allowed':>11}{'whole run img/s':>17}{'peak MB':>9}")
    for mode, r in results.items():
        print(f"{mode:<8}{r['steady_images_per_second']:>14.3f}{r['steady_over_allowed']:>11.3f}"
              f"{r['whole_run_images_per_second']:>17.3f}{r['peak_memory_mb_over_start']:>9.0f}")
    if "stage" in results and "inline" in results:
        print(f"\nstage / inline steady: {results['stage']['steady_images_per_second'] / results['inline']['steady_images_per_second']:.3f}x")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
