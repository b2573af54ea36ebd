"""`sdfleet sheet`, a first `sdfleet report`, `sdfleet eval` and `sdfleet watermark verify` of an output on an
object store: images read one (or 4) at a time against `jobs.outputs.image_workers` at a time.

Builds an output as bench_report does (`--rows` rows, PNGs with their parameters chunk, ledger parts,
run.json) on this disk, copies it to a moto S3 server (its own process, on loopback) and reaches it through
bench_store_reads' relay, which holds each answer back `--latency-ms` to stand in for a real store's round
trip. Then, in one process, for each variant (order rotated over `--repeats` passes): a sheet of every row
(`--columns 40 --thumb 32`), a first report (its thumbnails removed before each), eval of a manifest naming
every row's colour, shape and background, and verify of every image (the bench's images carry no mark: each is
read and its mark looked for all the same). Variants:

- `before`        sheet, eval and verify read their images one at a time, the report with 4 threads (sdfleet
                  before 2026-12-07 for sheet, report and verify, 2026-12-08 for eval);
- `image_workers` all with `image_workers(fs)` threads (16 on an object store).

Reported: median seconds per variant and command, and before/image_workers ratios.

    python -m benchmarks.bench_review_store [--rows 1000] [--size 256] [--latency-ms 20] [--repeats 2] [--out F]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_report import write_run
from benchmarks.bench_store_reads import SlowRelay, free_port, moto_server
from benchmarks.common import image_bank, rotated, save_report, versions

VARIANTS = ["before", "image_workers"]
COMMANDS = ["sheet", "report", "eval", "verify"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_review_store",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256, help="image side in px (tiny draws 256; SD 2.1 768)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs

    import jobs.cli as cli
    import jobs.evaluate as evaluate
    import jobs.report as report
    import jobs.sheet as sheet
    from jobs.cli import main as sdfleet
    from jobs.outputs import image_workers

    port = free_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    server = moto_server(port)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "out"
            write_run(local, "20261207T000000-bench", list(range(args.rows)), 50, 1, image_bank(args.size))
            writer = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
            writer.mkdir("bench")
            writer.put(str(local) + "/", "bench/out/", recursive=True)
        relay = SlowRelay(port, args.latency_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{relay.port}"
        print(f"bench: {args.rows} rows of {args.size} px on S3 (moto), latency {args.latency_ms:g} ms",
              file=sys.stderr)
        one, verify_workers = (lambda fs: 1), cli._verify_workers
        readers = {"before": (one, lambda fs: 4, one, lambda images: 1),
                   "image_workers": (image_workers, image_workers, image_workers, verify_workers)}
        seconds: dict[str, dict[str, list[float]]] = {v: {c: [] for c in COMMANDS} for v in VARIANTS}
        with tempfile.TemporaryDirectory() as tmp:
            manifest = f"{tmp}/shapes.parquet"  # every row's prompt as drawn, and an intent eval can score
            pq.write_table(pa.Table.from_pylist([{"id": f"row-{i:06d}", "prompt": f"product {i} on white, run 1",
                                                  "color": "red", "shape": "circle", "background": "white"}
                                                 for i in range(args.rows)]), manifest)
            for repeat in range(args.repeats):
                for variant in rotated(VARIANTS, repeat):
                    sheet.image_workers, report.image_workers, evaluate.image_workers, cli._verify_workers = \
                        readers[variant]
                    s3fs.S3FileSystem.clear_instance_cache()
                    started = time.perf_counter()
                    assert sdfleet(["sheet", "s3://bench/out", "-o", f"{tmp}/sheet.jpg", "--columns", "40",
                                    "--thumb", "32"]) == 0
                    seconds[variant]["sheet"].append(time.perf_counter() - started)
                    if writer.exists("bench/out/report"):
                        writer.rm("bench/out/report", recursive=True)
                    started = time.perf_counter()
                    assert sdfleet(["report", "s3://bench/out"]) == 0
                    seconds[variant]["report"].append(time.perf_counter() - started)
                    s3fs.S3FileSystem.clear_instance_cache()
                    started = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):
                        assert sdfleet(["eval", manifest, "--out", "s3://bench/out"]) == 0
                    seconds[variant]["eval"].append(time.perf_counter() - started)
                    s3fs.S3FileSystem.clear_instance_cache()
                    started = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):  # exit 1: every image says MISSING
                        assert sdfleet(["watermark", "verify", "s3://bench/out/images/*.png"]) == 1
                    seconds[variant]["verify"].append(time.perf_counter() - started)
        sheet.image_workers = report.image_workers = evaluate.image_workers = image_workers
        cli._verify_workers = verify_workers
    finally:
        server.terminate()
    medians = {v: {c: round(statistics.median(s), 2) for c, s in by.items()} for v, by in seconds.items()}
    ratios = {c: round(medians["before"][c] / medians["image_workers"][c], 2) for c in COMMANDS}
    for variant in VARIANTS:
        print(f"{variant:>14}: " + ", ".join(f"{c} {medians[variant][c]:.2f} s" for c in COMMANDS))
    print("before / image_workers: " + ", ".join(f"{c} {ratios[c]}x" for c in COMMANDS))
    save_report(args.out, {"bench": "review_store", "rows": args.rows, "size": args.size,
                           "latency_ms": args.latency_ms, "repeats": args.repeats, "seconds": medians,
                           "ratios": ratios, "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
