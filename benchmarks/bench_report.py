"""How long `sdfleet report` takes on a large output, and what a nightly's report costs after the first.

Builds an output the way `generate` leaves it (PNGs with their parameters chunk from the image bank,
ledger parts of 256 rows, runs/*.json, run.json) with `--rows` rows over two runs: the second redraws 5%
of the rows, fails 1% and finds 0.5% invalid, and a few PNGs are then deleted. Then, in one process:

- cold: the first report (every thumbnail made);
- warm: the same report again (every thumbnail reused): the baseline of what a page costs by itself;
- nightly: after a third run redraws 5% of the rows, the report that makes only their thumbnails.

Prints seconds for each, thumbnails made, the HTML written (a page whose rows did not change is not written
again), and cold/warm and nightly/warm ratios.

    python -m benchmarks.bench_report [--rows 10000] [--size 256] [--groups 500] [--out FILE.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import fsspec

from actors.png import png_bytes
from benchmarks.common import image_bank, versions
from jobs.report import build_report
from manifests.ledger import ledger_row, write_part

PART_ROWS = 256


def _row(i: int, groups: int, run: int) -> dict:
    return {"id": f"row-{i:06d}", "params_hash": f"h{i}-{run}", "seed": i, "model": "default", "width": 0,
            "height": 0, "steps": 30, "guidance_scale": 7.5, "scheduler": "ddim", "watermark": "sdfleet",
            "source": "catalog.parquet", "row": i, "extra": json.dumps({"sku": f"sku-{i % groups:05d}"}),
            "error": None, "warning": None, "adapters": []}


def write_run(root: Path, run_id: str, ids: list[int], groups: int, run: int, bank, failing=(), invalid=()) -> None:
    fs = fsspec.filesystem("file")
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in ids:
        row = {**_row(i, groups, run), "width": bank[0].shape[1], "height": bank[0].shape[0]}
        if i in invalid:
            entries.append(ledger_row(row, "invalid", error=f"catalog.parquet row {i}: `steps`: must be 1..500"))
            continue
        if i in failing:
            entries.append(ledger_row(row, "failed", actor="host:1", error="RuntimeError: CUDA out of memory"))
            continue
        data = png_bytes(bank[(i + run) % len(bank)], {"id": row["id"], "prompt": f"product {i} on white, run {run}"})
        (root / "images" / f"{row['id']}.png").write_bytes(data)
        entries.append(ledger_row(row, "ok", actor="host:1", seconds=0.4, uri=str(root / "images" / f"{row['id']}.png"),
                                  sha256=hashlib.sha256(data).hexdigest()))
    for seq in range(0, len(entries), PART_ROWS):
        write_part(fs, str(root), run_id, seq // PART_ROWS, entries[seq:seq + PART_ROWS])
    counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "failed", "invalid")}
    summary = {"run_id": run_id, "rows": len(entries), **counts, "skipped": 0, "wall_seconds": 600.0,
               "images_per_second": counts["ok"] / 600, "actors": 4, "images_per_actor": {"host:1": counts["ok"]},
               "adapter_swaps": {"total": 0, "per_actor": {}, "seconds": 0.0}, "startup": {}, "backend": "compile",
               "device": "cuda", "batch_size": 8, "finished_at": entries[-1]["finished_at"]}
    (root / "runs").mkdir(exist_ok=True)
    (root / "runs" / f"{run_id}.json").write_text(json.dumps(summary))
    (root / "run.json").write_text(json.dumps(summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_report", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=256, help="image side in px (tiny draws 256; SD 2.1 768)")
    parser.add_argument("--groups", type=int, default=500, help="distinct sku values (default 500)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--keep", help="build the output in this folder and keep it (default: a temp folder)")
    args = parser.parse_args(argv)

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-report-"))
    if root.exists():
        shutil.rmtree(root)
    rng = random.Random(0)
    bank = image_bank(args.size, 8)
    ids = list(range(args.rows))
    started = time.perf_counter()
    write_run(root, "20261201T020000-aaaaaa", ids, args.groups, 1, bank)
    again = rng.sample(ids, args.rows // 20)
    write_run(root, "20261202T020000-bbbbbb", again, args.groups, 2, bank,
              failing=set(again[: args.rows // 100]), invalid=set(again[-args.rows // 200:]))
    for i in rng.sample(ids, 5):
        (root / "images" / f"row-{i:06d}.png").unlink(missing_ok=True)
    built = time.perf_counter() - started
    print(f"built {args.rows} rows of {args.size} px in {built:.1f} s at {root}", file=sys.stderr)

    results = {"rows": args.rows, "size": args.size, "groups": args.groups, "cpus": os.cpu_count(), **versions()}
    for name in ("cold", "warm"):
        results[name] = build_report(str(root), group_by="sku")
    write_run(root, "20261203T020000-cccccc", rng.sample(ids, args.rows // 20), args.groups, 3, bank)
    results["nightly"] = build_report(str(root), group_by="sku")
    results["cold_over_warm"] = round(results["cold"]["seconds"] / results["warm"]["seconds"], 2)
    results["nightly_over_warm"] = round(results["nightly"]["seconds"] / results["warm"]["seconds"], 2)
    for name in ("cold", "warm", "nightly"):
        r = results[name]
        print(f"{name:8s} {r['seconds']:7.2f} s  {r['thumbnails_made']:6d} thumbnails made  "
              f"{r['bytes'] / 1e6:5.1f} MB of HTML written ({r['pages_written']} file(s); {r['pages_unchanged']} of "
              f"{r['pages']} page(s) unchanged)")
    print(f"cold/warm {results['cold_over_warm']}x, nightly/warm {results['nightly_over_warm']}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
