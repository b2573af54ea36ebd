"""Benchmark the nightly catalogue case at scale: a large manifest whose rows are all done already.

One run builds, in a work folder:
- a manifest of `--rows` rows (1,000,000 by default; product-shot prompts, explicit seeds, `tiny`'s sizes);
- a ledger that records every row `ok` with the row's own `params_hash` (computed by the schema, as the plan
  will), in parts of 100,000, and an `images/` folder with one (empty) file per row: what a finished run
  leaves, without drawing a million images;
- the same manifest with `--changed` (1%) of its prompts edited.

Then it times, each as a user runs it (a fresh `sdfleet` process), with the driver's peak RSS:
1. `sdfleet generate MANIFEST --out OUT`: start to "nothing to draw" (targets: <= 120 s, <= 2 GB);
2. `sdfleet generate CHANGED --out OUT --plan-only`: the plan of the changed manifest (1% to draw);
3. `sdfleet manifest validate MANIFEST` (2026-12-04, before this bench: 33 s, 525 MB).

    .venv/bin/python -m benchmarks.bench_nightly [--rows 1000000] [--changed 0.01] [--out DIR]

Prints a table and writes DIR/bench.json. Building the folder takes a few minutes the first time; a
second run into the same DIR reuses it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import REPO_ROOT, versions

TARGET_SECONDS = 120.0
TARGET_RSS_MB = 2048.0
PART_ROWS = 100_000
PRODUCTS = ("ceramic mug", "leather wallet", "steel watch", "canvas tote", "glass vase", "wool scarf", "desk lamp")
SCENES = ("on a white background", "on a kitchen table", "in soft window light", "on a marble counter")


def prompt(i: int, changed: bool = False) -> str:
    text = f"a studio photo of a {PRODUCTS[i % len(PRODUCTS)]} {SCENES[(i // 7) % len(SCENES)]}, item {i}"
    return text + ", evening light" if changed else text


def build(folder: Path, rows: int, changed_share: float) -> tuple[Path, Path, Path]:
    """The manifests and a finished output of the first; reused when they are there."""
    manifest, changed, out = folder / "catalog.parquet", folder / "catalog-changed.parquet", folder / "out"
    if (folder / "built.json").exists():
        return manifest, changed, out
    from actors.models import describe_model
    from manifests.schema import ManifestRow, resolve_row

    model = describe_model("default", "tiny").defaults()
    every = max(1, round(1 / changed_share)) if changed_share else 0
    ids = [f"sku-{i:07d}" for i in range(rows)]
    seeds = list(range(rows))
    for path, edit in ((manifest, False), (changed, True)):
        prompts = [prompt(i, edit and every and i % every == 0) for i in range(rows)]
        pq.write_table(pa.table({"id": ids, "prompt": prompts, "seed": seeds}), path, row_group_size=PART_ROWS)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
    from manifests.ledger import LEDGER_SCHEMA

    for start in range(0, rows, PART_ROWS):
        entries = []
        for i in range(start, min(rows, start + PART_ROWS)):
            row = resolve_row(ManifestRow(id=ids[i], prompt=prompt(i), seed=i), model, watermark="sdfleet")
            entries.append({"id": ids[i], "status": "ok", "uri": str(out / "images" / f"{ids[i]}.png"),
                            "params_hash": row["params_hash"], "seed": i, "model": "default", "adapters": [],
                            "width": row["width"], "height": row["height"], "steps": row["steps"],
                            "guidance_scale": row["guidance_scale"], "scheduler": row["scheduler"],
                            "watermark": "sdfleet", "finished_at": now, "source": str(manifest), "row": i})
            (out / "images" / f"{ids[i]}.png").touch()
        pq.write_table(pa.Table.from_pylist(entries, schema=LEDGER_SCHEMA),
                       out / "results" / f"synthetic-{start // PART_ROWS:05d}.parquet")
        print(f"bench: built {min(rows, start + PART_ROWS)}/{rows} rows", file=sys.stderr, flush=True)
    (folder / "built.json").write_text(json.dumps({"rows": rows, "changed": changed_share}) + "\n")
    return manifest, changed, out


def timed(argv: list[str], log: Path) -> dict:
    """Run `sdfleet ARGV` in a fresh process; its wall time, exit code and peak RSS (sampled every 0.1 s)."""
    import psutil

    exe = Path(sys.executable).with_name("sdfleet")
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "jobs"]) + argv
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT)
        peak = 0
        handle = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, handle.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.1)
    wall = time.perf_counter() - started
    return {"argv": argv, "seconds": round(wall, 2), "driver_peak_rss_mb": round(peak / 2**20, 1),
            "exit_code": proc.returncode, "last_lines": log.read_text().splitlines()[-3:]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of rows whose prompt changes (default 0.01)")
    parser.add_argument("--out", help="work folder (default: a new temp dir); a second run reuses what it built")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = Path(args.out or tempfile.mkdtemp(prefix="sdfleet-bench-nightly-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    manifest, changed, out = build(folder, args.rows, args.changed)
    runs = {
        "nothing_to_draw": timed(["generate", str(manifest), "--out", str(out)], folder / "nothing.log"),
        "changed_plan_only": timed(["generate", str(changed), "--out", str(out), "--plan-only"], folder / "changed.log"),
        "validate": timed(["manifest", "validate", str(manifest)], folder / "validate.log"),
    }
    report = {"rows": args.rows, "changed_share": args.changed, "runs": runs, "cpu_count": os.cpu_count(),
              "targets": {"seconds": TARGET_SECONDS, "driver_peak_rss_mb": TARGET_RSS_MB},
              "versions": versions(), "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (folder / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'run':<22}{'seconds':>9}{'peak RSS MB':>13}  exit  last line")
    for name, r in runs.items():
        print(f"{name:<22}{r['seconds']:>9.1f}{r['driver_peak_rss_mb']:>13.0f}  {r['exit_code']:>4}  "
              f"{(r['last_lines'] or [''])[-1][:90]}")
    first = runs["nothing_to_draw"]
    verdict = first["seconds"] <= TARGET_SECONDS and first["driver_peak_rss_mb"] <= TARGET_RSS_MB
    print(f"nothing to draw: target <= {TARGET_SECONDS:.0f} s and <= {TARGET_RSS_MB:.0f} MB: "
          f"{'ok' if verdict else 'MISSED'}")
    print(f"wrote {folder / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
