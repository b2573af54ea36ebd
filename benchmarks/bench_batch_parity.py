"""Does a row draw the same pixels alone and inside a batch? On the CPU the tests hold it (tests/test_actors.py);
on a GPU in fp16, cuBLAS and cuDNN may choose other kernels for another batch size and sum in another order, so
this measures it rather than assuming it.

    python -m benchmarks.bench_batch_parity --device cuda --dtype fp16 --out parity.json

Draws `--rows` rows as one batch and each row alone (the eager backend, the actors' own `draw`), with a
deterministic and an ancestral scheduler, and prints per-row mean and max absolute differences in 0..255 levels.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks.bench_backends import rows_for
from benchmarks.common import save_report, versions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)

    import torch

    from actors.generate import draw
    from actors.presets import build_preset

    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    pipe = build_preset(args.preset).to(device=args.device, dtype=dtype)
    report = {"preset": args.preset, "device": args.device, "dtype": args.dtype, "size": args.size,
              "steps": args.steps, "rows": args.rows, "versions": versions(), "schedulers": {}}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for scheduler in ("ddim", "euler_a"):
        rows = [{**r, "scheduler": scheduler} for r in rows_for(args.preset, args.rows, args.size, args.steps)]
        together = np.stack(draw(pipe, rows)).astype(int)
        alone = np.stack([draw(pipe, [row])[0] for row in rows]).astype(int)
        diff = np.abs(together - alone)
        per_row = [{"mean": round(float(d.mean()), 3), "max": int(d.max()), "equal_share": round(float((d == 0).mean()), 4)}
                   for d in diff]
        report["schedulers"][scheduler] = {"mean": round(float(diff.mean()), 3), "max": int(diff.max()),
                                           "rows": per_row}
        print(f"{scheduler}: batch of {args.rows} against each row alone: mean {diff.mean():.3f}, max {diff.max()} "
              f"(of 255), {(diff == 0).mean():.1%} of values equal", flush=True)
    save_report(args.out, report)
    if not args.out:
        print(json.dumps(report["schedulers"], indent=1))


if __name__ == "__main__":
    main()
