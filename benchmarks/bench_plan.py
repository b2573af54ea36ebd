"""What a manifest's row-group layout costs the plan: the same rows in one row group, and in row groups of one.

A streaming writer (a database export, a job that appends as it goes) can leave a manifest of thousands of
tiny row groups. The plan reads manifests in parts; each part is a Ray task that opens its file and reads the
footer, so one part per row group made planning grow with the square of such a file. Each pass starts one fresh
process per layout and times `sdfleet generate MANIFEST --out NEW --plan-only` in it (Ray's start included, the
same for both); passes rotate the order.

    python -m benchmarks.bench_plan [--rows 3000] [--repeats 3] [--done] [--out FILE]

Reported: each layout's median seconds, and the median of each pass's ratio of tiny groups to one group
(1.0: the layout costs nothing). `--done` plans into an output that already holds every row (its ledger in
parts of 256 entries, an image per row: what a nightly job meets), 1% of the rows changed since: the plan state
then carries the whole done-ledger to every plan task.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import fresh_process_parser, fresh_process_passes, median_ratio, save_report, versions

VARIANTS = ["one-group", "groups-of-1"]


def write_manifests(folder: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": [f"row-{i:06d}" for i in range(rows)],
                      "prompt": [f"a red star on a gray background, number {i}" for i in range(rows)]})
    pq.write_table(table, folder / "one-group.parquet")
    pq.write_table(table, folder / "groups-of-1.parquet", row_group_size=1)


def write_done_output(folder: Path, rows: int) -> Path:
    """An output in which every row of the manifests is done, as a finished run leaves it, except every 100th row,
    recorded with another hash (its prompt changed since). Images are links to one PNG: the plan lists them and
    reads none of those its ledger vouches for."""
    import fsspec
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from actors.models import describe_model
    from manifests.ledger import ledger_row, write_part
    from manifests.schema import ManifestRow, resolve_row

    out = folder / "done-out"
    (out / "images").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(folder / "one.png")
    model = describe_model("default", "tiny").defaults()
    records = pq.read_table(folder / "one-group.parquet").to_pylist()
    entries = []
    for i, record in enumerate(records):
        (out / "images" / f"{record['id']}.png").hardlink_to(folder / "one.png")
        resolved = resolve_row(ManifestRow(**record), model, watermark="sdfleet")
        if i % 100 == 0:
            resolved["params_hash"] = "changed-since"
        entries.append(ledger_row({**resolved, "source": str(folder / "one-group.parquet"), "row": i}, "ok"))
    fs = fsspec.filesystem("file")
    for seq, start in enumerate(range(0, len(entries), 256)):
        write_part(fs, str(out), "20261206T000000-bench0", seq, entries[start:start + 256])
    return out


def one_process(variant: str, folder: Path) -> None:
    """In the pass's own process: plan the variant's manifest into a new output (or the done one), print the
    seconds as JSON."""
    from jobs.cli import main

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        done = folder / "done-out"
        target = str(done) if done.is_dir() else f"{out}/run"
        code = main(["generate", str(folder / f"{variant}.parquet"), "--out", target, "--plan-only"])
    if code != 0:
        sys.exit(f"{variant}: generate --plan-only exited {code}")
    print(json.dumps({"seconds": time.perf_counter() - started}))


def main(argv: list[str] | None = None) -> int:
    parser = fresh_process_parser("benchmarks.bench_plan", __doc__, VARIANTS, repeats=3)
    parser.add_argument("--rows", type=int, default=3000, help="manifest rows (default 3000)")
    parser.add_argument("--done", action="store_true", help="plan into an output holding every row, 1%% changed")
    parser.add_argument("--folder", help=argparse.SUPPRESS)  # the manifests, for a pass's own process
    args = parser.parse_args(argv)
    if args.one:
        one_process(args.one, Path(args.folder))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        write_manifests(Path(tmp), args.rows)
        if args.done:
            write_done_output(Path(tmp), args.rows)
        passes = fresh_process_passes("benchmarks.bench_plan", VARIANTS, args.repeats, ("--folder", tmp))
    seconds = {v: [p["seconds"] for p in runs] for v, runs in passes.items()}
    results = {v: round(statistics.median(s), 2) for v, s in seconds.items()}
    ratio = round(median_ratio(seconds["groups-of-1"], seconds["one-group"]), 2)
    into = "into a done output (1% changed)" if args.done else "into a new output"
    print(f"{args.rows} rows, plan only {into}: one row group {results['one-group']:.1f} s, row groups of one "
          f"{results['groups-of-1']:.1f} s, ratio {ratio:.2f} (median of {args.repeats} passes)")
    save_report(args.out, {"rows": args.rows, "repeats": args.repeats, "done": args.done, "seconds": results,
                           "ratio_groups_of_1": ratio, "passes": seconds, "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
