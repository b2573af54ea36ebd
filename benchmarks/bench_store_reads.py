"""What the driver reads from an object store before a run: many small files, one by one or a chunk at a time.

Every `sdfleet generate` first reads its manifests (footers, `id` and `adapters` columns) and, into an
output that has runs in it, the whole ledger (what is done, with which parameters); `sdfleet report` reads
the ledger too. The ledger gains a part every 256 rows or 10 s and parts are never rewritten, so a nightly
job's output holds thousands; a catalogue is often kept as a file per category. This bench writes
`--parts` ledger parts of `--rows` rows and `--manifests` manifest files to a moto S3 server (its own
process, on loopback) and reads them back with

- `ledger, one by one`     `read_parquet` on each part in turn (sdfleet before 2026-12-05);
- `ledger, chunked`        `manifests.stores.read_parquet_files`: `cat_ranges` fetches FETCH_CHUNK parts at once;
- `manifests, one by one`  `count_ids`, `adapter_names` and `plan_parts`, one file at a time (as before);
- `manifests, survey`      `manifests.reader.survey`: each file opened once, MANIFEST_READS files at a time.

Loopback answers in about a millisecond, where S3 takes tens: `--latency-ms` holds every answer back that
long in a relay between s3fs and the server, to stand in for a real store's round trip. Passes rotate the
variant order; reported: median seconds per variant and the median speed-up of each `chunked`/`survey`
over its `one by one`.

    python -m benchmarks.bench_store_reads [--parts 400] [--rows 64] [--manifests 100] [--latency-ms 20]
                                           [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import median_ratio, rotated, versions

VARIANTS = ["ledger, one by one", "ledger, chunked", "manifests, one by one", "manifests, survey"]
BASELINES = {"ledger, chunked": "ledger, one by one", "manifests, survey": "manifests, one by one"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server(port: int) -> subprocess.Popen:
    """A moto S3 server on 127.0.0.1:`port` (its own process, bench credentials), once it answers."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    return server


class SlowRelay:
    """A TCP relay that holds each answer from the server back `latency` seconds, as a distant store would."""

    def __init__(self, upstream: int, latency: float):
        self.upstream, self.latency = upstream, latency
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.latency), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket, latency: float) -> None:
        last = 0.0  # when bytes last went through: the first bytes after a quiet spell start a new answer
        try:
            while data := source.recv(65536):
                if latency and time.monotonic() - last > 0.005:
                    time.sleep(latency)
                target.sendall(data)
                last = time.monotonic()
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def ledger_rows(part: int, rows: int) -> list[dict]:
    return [{"id": f"sku-{part:05d}-{i:04d}", "status": "ok", "uri": f"images/sku-{part:05d}-{i:04d}.png",
             "sha256": "0" * 64, "png_bytes": 900_000, "params_hash": f"{part * rows + i:064x}", "seed": i,
             "model": "default",
             "adapters": [], "width": 768, "height": 768, "steps": 30, "guidance_scale": 7.5, "scheduler": "ddim",
             "watermark": "sdfleet", "watermark_bits": 1.0, "actor": "a1", "seconds": 0.5,
             "finished_at": f"2026-12-05T00:{part % 60:02d}:{i % 60:02d}+00:00", "source": "m.parquet",
             "row": part * rows + i} for i in range(rows)]


def manifest_rows(k: int, rows: int) -> list[dict]:
    return [{"id": f"cat{k:03d}-{i:04d}", "prompt": f"a product of category {k}, shot {i}", "seed": i,
             "adapters": [{"name": f"style-{k % 5}", "scale": 1.0}]} for i in range(rows)]


def read_manifests_one_by_one(uris: list[str]) -> int:
    from manifests import reader

    saved, reader.MANIFEST_READS = reader.MANIFEST_READS, 1
    try:
        total, _ = reader.count_ids(uris)
        reader.adapter_names(uris)
        reader.plan_parts(uris)
    finally:
        reader.MANIFEST_READS = saved
    return total


def read_manifests_survey(uris: list[str]) -> int:
    from manifests.reader import survey

    return survey(uris).total


def read_one_by_one(fs, paths: list[str]) -> int:
    from manifests.stores import read_parquet

    return sum(read_parquet(fs, p, columns=["id", "status", "params_hash", "finished_at"]).num_rows for p in paths)


def read_chunked(fs, paths: list[str]) -> int:
    from manifests.stores import read_parquet_files

    return sum(t.num_rows for _, t in read_parquet_files(fs, paths, columns=["id", "status", "params_hash",
                                                                             "finished_at"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_store_reads", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, default=400, help="ledger parts (default 400)")
    parser.add_argument("--rows", type=int, default=64, help="rows per ledger part and per manifest (default 64)")
    parser.add_argument("--manifests", type=int, default=100, help="manifest files (default 100)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="added to every answer of the store, in ms (default 20; 0 for bare loopback)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over both variants (default 3)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import importlib.util

    missing = [name for name in ("moto", "s3fs") if importlib.util.find_spec(name) is None]
    if missing:  # the test install's, not the README's first command's
        print(f"bench_store_reads: needs {' and '.join(missing)}, which the test install has (pip install -c "
              "requirements.lock -e '.[test]')", file=sys.stderr)
        return 1
    import s3fs

    from manifests.ledger import write_part

    port = free_port()
    server = moto_server(port)
    try:
        relay = SlowRelay(port, args.latency_ms / 1000)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        writer = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
        writer.mkdir("bench")
        for part in range(args.parts):
            write_part(writer, "bench/out", "20261205T000000-bench", part, ledger_rows(part, args.rows))
        for k in range(args.manifests):
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(manifest_rows(k, args.rows)), buf)
            writer.pipe(f"bench/manifests/category-{k:03d}.parquet", buf.getvalue())
        print(f"bench: {args.parts} ledger parts and {args.manifests} manifests of {args.rows} rows written; store "
              f"latency {args.latency_ms:g} ms", file=sys.stderr)
        manifest_uris = [f"s3://bench/manifests/category-{k:03d}.parquet" for k in range(args.manifests)]
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{relay.port}"  # what the manifest readers' s3fs uses

        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for repeat in range(args.repeats):
            for variant in rotated(VARIANTS, repeat):
                fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{relay.port}"},
                                       skip_instance_cache=True)
                s3fs.S3FileSystem.clear_instance_cache()  # no variant reuses another's listings or connections
                started = time.perf_counter()
                if variant.startswith("ledger"):
                    paths = sorted(fs.glob("bench/out/results/*.parquet"))
                    rows = (read_one_by_one if variant.endswith("one by one") else read_chunked)(fs, paths)
                    expected = args.parts * args.rows
                else:
                    read = read_manifests_one_by_one if variant.endswith("one by one") else read_manifests_survey
                    rows, expected = read(manifest_uris), args.manifests * args.rows
                seconds[variant].append(time.perf_counter() - started)
                if rows != expected:
                    sys.exit(f"{variant} read {rows} rows, not {expected}")
                print(f"bench: pass {repeat + 1}, {variant}: {seconds[variant][-1]:.2f} s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)

    results = {v: {"seconds": round(statistics.median(s), 3), "all_seconds": [round(x, 3) for x in s],
                   "speedup_vs_one_by_one": round(median_ratio(seconds[BASELINES.get(v, v)], s), 3)}
               for v, s in seconds.items()}
    print(f"{'variant':<24}{'seconds':>10}{'speed-up':>10}")
    for variant, r in results.items():
        print(f"{variant:<24}{r['seconds']:>10.2f}{r['speedup_vs_one_by_one']:>10.2f}")
    report = {"parts": args.parts, "manifests": args.manifests, "rows": args.rows, "latency_ms": args.latency_ms,
              "repeats": args.repeats, "results": results, "versions": versions()}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
