"""Benchmark adapter swapping: `sdfleet generate` over many LoRAs in random order, against reloading.

One run, on the `tiny` preset at 256x256, on the same manifest (rows over `--adapters` LoRAs, shuffled
with a fixed seed so consecutive rows rarely share an adapter):

1. sdfleet, 1 actor and 2 actors (`sdfleet generate --adapters STORE`, as subprocesses). From run.json
   and the ledger: adapter swaps against the minimum (every actor loads every adapter once: adapters x
   actors), and swap time as a share of generation time (target <= 2%). Generation time is the sum of the
   ledger's per-row `seconds`, which include the swaps made for those rows.
2. reload, the seed article's approach, in this process: walk the rows in manifest order and, whenever
   the adapter changes, load a fresh pipeline and `load_lora_weights` into it; consecutive rows with the
   same adapter share a pipeline call (up to the batch size), so the gap is the reloading, not batching.

The speedup is sdfleet (1 actor, end to end, Ray start-up included) over reload, on the same CPU. On the
`tiny` preset a pipeline builds in well under a second; SD 2.1 takes seconds to load from local disk, so
the reload figure here is the most favourable reloading can look.

    .venv/bin/python -m benchmarks.bench_adapters [--rows 200] [--adapters 10] [--steps 20] [--batch-size 8] [--out DIR]

Prints a table and writes the same numbers to DIR/bench.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.common import run_cli, versions

TARGET_SWAP_SHARE = 0.02
LORA_STD = 0.15  # clearly changes the tiny model's image without making it chaotic
WIDTH = HEIGHT = 256


def make_store(store: Path, n: int) -> list[str]:
    """Write n random rank-4 LoRAs for the tiny UNet as `<name>/pytorch_lora_weights.safetensors`."""
    import torch
    from diffusers import UNet2DConditionModel

    from actors.lora_io import add_unet_lora, save_lora
    from actors.presets import PRESETS

    names = [f"style-{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        unet = UNet2DConditionModel.from_config(PRESETS["tiny"]["unet"])
        add_unet_lora(unet, rank=4)
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for param_name, param in unet.named_parameters():
                if ".lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=g) * LORA_STD)
        save_lora(unet, None, store / name)
    return names


def build_manifest(path: Path, n_rows: int, names: list[str], steps: int) -> list[dict]:
    """n_rows rows spread evenly over the adapters, in a shuffled (seeded) order."""
    from manifests.expand import write_manifest

    rng = random.Random(0)
    adapter_of = [names[i % len(names)] for i in range(n_rows)]
    rng.shuffle(adapter_of)
    rows = [{"id": f"row-{i:04d}", "prompt": f"a studio photo of product {i}", "negative_prompt": None,
             "seed": i, "model": "default", "steps": steps,
             "width": WIDTH, "height": HEIGHT, "guidance_scale": 7.5, "scheduler": "ddim",
             "adapters": [{"name": name, "scale": 1.0}]} for i, name in enumerate(adapter_of)]
    import pyarrow as pa

    write_manifest(pa.Table.from_pylist(rows), str(path))
    return rows


def run_sdfleet(manifest: Path, store: Path, out: Path, actors: int, batch_size: int) -> dict:
    """`sdfleet generate` as a user runs it; returns its figures from run.json and the ledger."""
    wall = run_cli(["generate", str(manifest), "--out", str(out), "--adapters", str(store), "--actors", str(actors),
                    "--batch-size", str(batch_size), "--no-watermark"], out)
    summary = json.loads((out / "run.json").read_text())
    ledger = pq.read_table(str(out / "results")).select(["status", "seconds"]).to_pylist()
    generation = sum(r["seconds"] for r in ledger if r["status"] == "ok")
    swaps = summary["adapter_swaps"]
    return {
        "actors": actors, "ok": summary["ok"], "wall_seconds": wall, "images_per_second": summary["ok"] / wall,
        "swaps": swaps["total"], "swaps_per_actor": swaps["per_actor"], "swap_seconds": swaps["seconds"],
        "generation_seconds": generation, "swap_share": swaps["seconds"] / generation if generation else None,
        "out": str(out),
    }


def run_reload(rows: list[dict], store: Path, batch_size: int) -> dict:
    """The seed article's way: a fresh pipeline plus `load_lora_weights` whenever the adapter changes."""
    import torch
    from diffusers.utils import logging as diffusers_logging

    from actors.generate import draw
    from actors.models import describe_model, load_pipeline

    diffusers_logging.set_verbosity_error()  # a warning per UNet-only LoRA load otherwise
    torch.set_num_threads(os.cpu_count() or 1)
    info = describe_model("default", "tiny")
    runs: list[list[dict]] = []  # consecutive rows with one adapter, cut at the batch size
    for row in rows:
        if runs and runs[-1][0]["adapters"] == row["adapters"] and len(runs[-1]) < batch_size:
            runs[-1].append(row)
        else:
            runs.append([row])
    loads, load_seconds, current, pipe = 0, 0.0, None, None
    started = time.perf_counter()
    for batch in runs:
        name = batch[0]["adapters"][0]["name"]
        if name != current:
            t0 = time.perf_counter()
            pipe = load_pipeline(info, "cpu", torch.float32)
            pipe.load_lora_weights(str(store / name), weight_name="pytorch_lora_weights.safetensors")
            load_seconds += time.perf_counter() - t0
            loads, current = loads + 1, name
        draw(pipe, batch)
    wall = time.perf_counter() - started
    return {"wall_seconds": wall, "images_per_second": len(rows) / wall, "pipeline_loads": loads,
            "load_seconds": load_seconds, "calls": len(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_adapters", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="rows in the manifest (default 200)")
    parser.add_argument("--adapters", type=int, default=10, help="LoRAs the rows are spread over (default 10)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per pipeline call (default 8)")
    parser.add_argument("--out", help="folder for the store, manifest, runs and bench.json (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.adapters < 1 or args.rows < args.adapters:
        parser.error("need at least one adapter and at least one row per adapter")

    out = Path(args.out or tempfile.mkdtemp(prefix="sdfleet-bench-adapters-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = make_store(out / "store", args.adapters)
    rows = build_manifest(out / "manifest.parquet", args.rows, names, args.steps)
    changes = 1 + sum(a["adapters"] != b["adapters"] for a, b in zip(rows, rows[1:]))
    print(f"bench: {args.rows} rows over {args.adapters} LoRAs ({changes} adapter changes in manifest order), "
          f"{args.steps} steps, batch {args.batch_size}; out: {out}", file=sys.stderr, flush=True)

    # 1. sdfleet with 1 and 2 actors, each into a fresh output folder
    sdfleet = {}
    for actors in (1, 2):
        sdfleet[actors] = run_sdfleet(out / "manifest.parquet", out / "store",
                                      Path(tempfile.mkdtemp(prefix=f"run-{actors}actor-", dir=out)),
                                      actors, args.batch_size)
        print(f"bench: sdfleet with {actors} actor(s) done in {sdfleet[actors]['wall_seconds']:.1f} s",
              file=sys.stderr, flush=True)

    # 2. reloading a pipeline per adapter change
    reload = run_reload(rows, out / "store", args.batch_size)
    print(f"bench: reload done in {reload['wall_seconds']:.1f} s", file=sys.stderr, flush=True)

    report = {
        "rows": args.rows, "adapters": args.adapters, "steps": args.steps, "batch_size": args.batch_size,
        "width": WIDTH, "height": HEIGHT, "preset": "tiny", "adapter_changes_in_manifest_order": changes,
        "sdfleet": {f"{k}_actor": v for k, v in sdfleet.items()},
        "reload": reload,
        "swaps_over_minimum": {f"{k}_actor": v["swaps"] / (args.adapters * k) for k, v in sdfleet.items()},
        "speedup_over_reload": sdfleet[1]["images_per_second"] / reload["images_per_second"],
        "target_swap_share": TARGET_SWAP_SHARE,
        "cpu_count": os.cpu_count(),
        "versions": versions(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{'run':<22}{'images/s':>10}{'seconds':>10}{'swaps':>8}{'minimum':>9}{'swap share':>12}")
    for k, v in sdfleet.items():
        share = v["swap_share"]
        mark = "ok" if share is not None and share <= TARGET_SWAP_SHARE else "ABOVE TARGET"
        print(f"{f'sdfleet {k} actor(s)':<22}{v['images_per_second']:>10.3f}{v['wall_seconds']:>10.1f}"
              f"{v['swaps']:>8}{args.adapters * k:>9}{share:>11.2%} {mark}")
    print(f"{'reload per change':<22}{reload['images_per_second']:>10.3f}{reload['wall_seconds']:>10.1f}"
          f"{reload['pipeline_loads']:>8}{'':>9}{reload['load_seconds'] / reload['wall_seconds']:>11.2%}")
    print(f"\nsdfleet (1 actor, end to end) over reload: {report['speedup_over_reload']:.2f}x; "
          f"swap share target <= {TARGET_SWAP_SHARE:.0%}")
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
