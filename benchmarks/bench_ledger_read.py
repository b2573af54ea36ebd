"""Reading a long-lived output's ledger from an object store: part by part against a chunk at a time.

Every `sdfleet generate` into an output that has runs in it first reads the whole ledger (what is done,
with which parameters), and `sdfleet report` reads it too. The ledger gains a part every 256 rows or 10 s
and parts are never rewritten, so a nightly job's output holds thousands of them. This bench writes
`--parts` parts of `--rows` rows each to a moto S3 server (its own process, on loopback) and reads them
back with

- `one by one`  `read_parquet` on each part in turn (what sdfleet did before 2026-12-05);
- `chunked`     `manifests.stores.read_parquet_files`: `cat_ranges` fetches FETCH_CHUNK parts concurrently.

Loopback answers in about a millisecond, where S3 takes tens: `--latency-ms` holds every answer back that
long in a relay between s3fs and the server, to stand in for a real store's round trip. Passes rotate the
variant order; reported: median seconds per variant and the median speed-up over `one by one`.

    python -m benchmarks.bench_ledger_read [--parts 400] [--rows 64] [--latency-ms 20] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import median_ratio, rotated, versions

BASELINE = "one by one"
VARIANTS = [BASELINE, "chunked"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
             "sha256": "0" * 64, "params_hash": f"{part * rows + i:064x}", "seed": i, "model": "default",
             "adapters": [], "width": 768, "height": 768, "steps": 30, "guidance_scale": 7.5, "scheduler": "ddim",
             "watermark": "sdfleet", "watermark_bits": 1.0, "actor": "a1", "seconds": 0.5,
             "finished_at": f"2026-12-05T00:{part % 60:02d}:{i % 60:02d}+00:00", "source": "m.parquet",
             "row": part * rows + i} for i in range(rows)]


def read_one_by_one(fs, paths: list[str]) -> int:
    from manifests.stores import read_parquet

    return sum(read_parquet(fs, p, columns=["id", "status", "params_hash", "finished_at"]).num_rows for p in paths)


def read_chunked(fs, paths: list[str]) -> int:
    from manifests.stores import read_parquet_files

    return sum(t.num_rows for _, t in read_parquet_files(fs, paths, columns=["id", "status", "params_hash",
                                                                             "finished_at"]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ledger_read", description=__doc__.split("\n")[0])
    parser.add_argument("--parts", type=int, default=400, help="ledger parts (default 400)")
    parser.add_argument("--rows", type=int, default=64, help="rows per part (default 64)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="added to every answer of the store, in ms (default 20; 0 for bare loopback)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over both variants (default 3)")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import s3fs

    from manifests.ledger import write_part

    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        relay = SlowRelay(port, args.latency_ms / 1000)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        writer = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
        writer.mkdir("bench")
        for part in range(args.parts):
            write_part(writer, "bench/out", "20261205T000000-bench", part, ledger_rows(part, args.rows))
        print(f"bench: {args.parts} parts of {args.rows} rows written; store latency {args.latency_ms:g} ms",
              file=sys.stderr)

        seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for repeat in range(args.repeats):
            for variant in rotated(VARIANTS, repeat):
                fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{relay.port}"},
                                       skip_instance_cache=True)
                started = time.perf_counter()
                paths = sorted(fs.glob("bench/out/results/*.parquet"))
                rows = (read_one_by_one if variant == BASELINE else read_chunked)(fs, paths)
                seconds[variant].append(time.perf_counter() - started)
                if rows != args.parts * args.rows:
                    sys.exit(f"{variant} read {rows} rows, not {args.parts * args.rows}")
                print(f"bench: pass {repeat + 1}, {variant}: {seconds[variant][-1]:.2f} s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)

    results = {v: {"seconds": round(statistics.median(s), 3), "all_seconds": [round(x, 3) for x in s],
                   "speedup_vs_one_by_one": round(median_ratio(seconds[BASELINE], s), 3)}
               for v, s in seconds.items()}
    print(f"{'variant':<12}{'seconds':>10}{'speed-up':>10}")
    for variant, r in results.items():
        print(f"{variant:<12}{r['seconds']:>10.2f}{r['speedup_vs_one_by_one']:>10.2f}")
    report = {"parts": args.parts, "rows_per_part": args.rows, "latency_ms": args.latency_ms,
              "repeats": args.repeats, "results": results, "versions": versions()}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
