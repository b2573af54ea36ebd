"""What sdfleet tells Prometheus while a run goes, through Ray's metrics API (ray.util.metrics).

Ray's metrics agent on each node serves every process's metrics on its metrics export port (8080 on
KubeRay's pods), prefixed `ray_`, counters suffixed `_total`; a KubeRay cluster's Prometheus scrapes
them with a PodMonitor and no extra service (docs/kubernetes.md lists them, with PromQL).

    sdfleet_images_drawn{model}          counter    images an actor drew (pixels out of the pipeline)
    sdfleet_images_written               counter    PNGs the finishing step wrote
    sdfleet_image_seconds{model}         histogram  an actor's seconds per image (its batch's time / rows)
    sdfleet_adapter_swaps                counter    adapter-set changes on the actors
    sdfleet_adapter_swap_seconds         histogram  seconds per swap
    sdfleet_row_failures{kind}           counter    rows that got no image: invalid, adapter (the plan), draw,
                                                    actor_died (a row that killed its actor twice), write
    sdfleet_rows{status}                 counter    the driver's ledger rows: ok, skipped, failed, invalid
    sdfleet_rows_remaining               gauge      the driver's rows not yet in the ledger

Images drawn but not yet written (`drawn - written`) are the queue between the draw and finish stages;
Ray Data's own `ray_data_*` metrics break each stage's queues down further.

Outside Ray (unit tests calling the drawing code directly) every function here does nothing.
"""

from __future__ import annotations

from types import SimpleNamespace

IMAGE_SECONDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
SWAP_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
FAILURE_KINDS = ("invalid", "adapter", "draw", "actor_died", "write")

_made: SimpleNamespace | None = None


def _metrics() -> SimpleNamespace | None:
    """This process's metric objects, made once Ray is up; None outside Ray."""
    global _made
    if _made is None:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util.metrics import Counter, Gauge, Histogram

        _made = SimpleNamespace(
            drawn=Counter("sdfleet_images_drawn", "images an actor drew", tag_keys=("model",)),
            written=Counter("sdfleet_images_written", "PNGs the finishing step wrote"),
            image_seconds=Histogram("sdfleet_image_seconds", "an actor's seconds per image",
                                    boundaries=IMAGE_SECONDS, tag_keys=("model",)),
            swaps=Counter("sdfleet_adapter_swaps", "adapter-set changes on the actors"),
            swap_seconds=Histogram("sdfleet_adapter_swap_seconds", "seconds per adapter swap",
                                   boundaries=SWAP_SECONDS),
            failures=Counter("sdfleet_row_failures", "rows that got no image, by kind", tag_keys=("kind",)),
            rows=Counter("sdfleet_rows", "ledger rows the driver recorded, by status", tag_keys=("status",)),
            remaining=Gauge("sdfleet_rows_remaining", "rows not yet in the ledger"),
        )
    return _made


def images_drawn(rows: list[dict]) -> None:
    """Drawn rows (with pixels and `seconds` per image) out of an actor's pipeline."""
    m = _metrics()
    if m is None:
        return
    by_model: dict[str, int] = {}
    for row in rows:
        if row.get("pixels") is not None:
            by_model[row["model"]] = by_model.get(row["model"], 0) + 1
            m.image_seconds.observe(float(row.get("seconds") or 0.0), tags={"model": row["model"]})
    for model, n in by_model.items():
        m.drawn.inc(n, tags={"model": model})


def images_written(n: int) -> None:
    m = _metrics()
    if m is not None and n:
        m.written.inc(n)


def adapter_swaps(swaps: int, seconds: float) -> None:
    """`swaps` new swaps that took `seconds` together (recorded as that many swaps of the mean length)."""
    m = _metrics()
    if m is None or swaps <= 0:
        return
    m.swaps.inc(swaps)
    for _ in range(swaps):
        m.swap_seconds.observe(seconds / swaps)


def row_failures(kind: str, n: int = 1) -> None:
    m = _metrics()
    if m is not None and n:
        m.failures.inc(n, tags={"kind": kind})


def rows_recorded(new: dict[str, int], remaining: int) -> None:
    """The driver's newly recorded rows by status, and how many are still to come."""
    m = _metrics()
    if m is None:
        return
    for status, n in new.items():
        if n:
            m.rows.inc(n, tags={"status": status})
    m.remaining.set(remaining)
