"""What the benchmark scripts share: running the CLI as a user would, the run's steady rate from its ledger,
interleaved repeats and their ratios, and the versions every result records."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(argv: list[str], out: Path) -> float:
    """Run `sdfleet ARGV...` as a user would, logging to `<out>.log`; returns wall seconds. Exits on failure."""
    exe = Path(sys.executable).with_name("sdfleet")
    cmd = ([str(exe)] if exe.exists() else [sys.executable, "-m", "jobs"]) + argv
    log = out.parent / f"{out.name}.log"
    started = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if rc != 0:
        sys.exit(f"sdfleet {argv[0]} exited {rc}; its log:\n{log.read_text()[-4000:]}")
    return wall


def steady_state(results_dir: Path, batch_size: int) -> dict:
    """Steady-state images/s of a finished run, from its ledger.

    Definition: sort the `finished_at` times of the ok rows. The first `batch_size` rows to finish are the
    first batch; it carries the actor's first-call cost, just as the bare loop's warm-up call does. The
    steady rate is the rows that finished after it, divided by the time from the first batch's last
    finish to the last row's finish. That span includes everything between batches (watermark, PNG
    writes, Ray Data hand-offs), so it is comparable to the bare loop's timed section.
    `in_actor` is ok rows / sum(`seconds`): time inside the actor's draw-and-write only, no Ray gaps.
    """
    table = pq.read_table(str(results_dir))  # all ledger parts of the run
    ok = [r for r in table.select(["status", "finished_at", "seconds"]).to_pylist() if r["status"] == "ok"]
    times = sorted(dt.datetime.fromisoformat(r["finished_at"]).timestamp() for r in ok)
    if len(times) <= batch_size:
        return {"ok_rows": len(times), "steady_images_per_second": None, "in_actor_images_per_second": None}
    span = times[-1] - times[batch_size - 1]
    return {
        "ok_rows": len(times),
        "steady_rows": len(times) - batch_size,
        "steady_seconds": round(span, 3),
        "steady_images_per_second": (len(times) - batch_size) / span,
        "in_actor_images_per_second": len(ok) / sum(r["seconds"] for r in ok),
    }


def rotated(variants: list, repeat: int) -> list:
    """The order of one repeat of an interleaved bench: shifted by one each repeat (A B C, B C A, C A B, ...),
    so no variant always runs first; this VM's speed drifts by up to 30% between minutes."""
    shift = repeat % len(variants)
    return variants[shift:] + variants[:shift]


def fresh_process_parser(module: str, doc: str, variants: list[str], repeats: int) -> argparse.ArgumentParser:
    """The flags of a bench run by `fresh_process_passes`: --repeats, --out, and the hidden --one VARIANT
    that a pass's own process is started with; add the bench's own."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=repeats, help=f"passes over every variant (default {repeats})")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--one", choices=variants, help=argparse.SUPPRESS)
    return parser


def fresh_process_passes(module: str, variants: list[str], repeats: int, args: tuple[str, ...] = (),
                         timeout: int = 600) -> dict[str, list[dict]]:
    """Each variant once a repeat, orders rotated, each in a fresh `python -m module --one VARIANT *args`
    process that prints its figures as JSON on its last line; the figures gain `launch_to_exit` (seconds).
    Returns every pass's figures by variant."""
    passes: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(repeats):
        for variant in rotated(variants, repeat):
            launched = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", module, "--one", variant, *args], cwd=REPO_ROOT,
                                  capture_output=True, text=True, timeout=timeout)
            wall = time.perf_counter() - launched
            if proc.returncode != 0:
                sys.exit(f"{variant} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            passes[variant].append({**json.loads(proc.stdout.strip().splitlines()[-1]), "launch_to_exit": wall})
            print(f"bench: pass {repeat + 1}, {variant}: {passes[variant][-1]}", file=sys.stderr)
    return passes


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of each repeat's own ratio. Ratios taken within a repeat cancel the drift that a ratio of
    medians would keep: pass baseline seconds over variant seconds for a speed-up, or throughputs the other way."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError(f"need one pair a repeat; got {len(numerators)} and {len(denominators)} values")
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def versions() -> dict:
    import diffusers
    import ray
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__, "numpy": np.__version__}


def image_bank(size: int, count: int = 8) -> list[np.ndarray]:
    """Natural-looking test images: even ones a coloured object on white, odd ones smooth colourful scenes."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    bank = []
    for i in range(count):
        if i % 2 == 0:
            image = np.full((size, size, 3), 255.0)
            inside = (x - 0.5) ** 2 + (y - 0.55) ** 2 < (0.12 + 0.02 * i) ** 2
            image[inside] = rng.uniform(20, 230, 3)
            image -= 25 * np.exp(-((y - 0.72) ** 2) / 0.002)[..., None] * (np.abs(x - 0.5) < 0.2)[..., None]  # shadow
        else:
            phase = rng.uniform(0, 6, 3)
            image = np.stack([128 + 100 * np.sin(5 * x + 3 * y + phase[0]), 128 + 90 * np.cos(4 * y + phase[1]),
                              128 + 80 * np.sin(6 * x * y + phase[2])], -1)
        bank.append(np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8))
    return bank


def save_report(out: str | None, report: dict) -> None:
    """Write a bench's figures as JSON to `out` (its --out), when one was given."""
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
