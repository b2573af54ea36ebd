"""Proof that fine-tuning works: a LoRA teaches `tiny` a shape it never saw, in minutes on a CPU.

The concept is `diamond` (an upright rhombus, jobs.synthetic.NEW_SHAPES): `tiny` is trained on circles,
squares, triangles and stars only, so "a red diamond on a white background" draws some other shape.

    1. synthetic diamonds in every colour and background -> `sdfleet dataset build`
    2. the base model on diamond prompts (unseen seeds)  -> `sdfleet generate` + `sdfleet eval`: before
    3. `sdfleet finetune lora --train-text-encoder --lora-layers all` (timed: the budget is 10 minutes;
       `all` because tiny draws corners at its full-resolution level, which has no attention layers)
    4. the same prompts with the LoRA (`--adapters`)     -> `sdfleet eval`: after

Passes (exit 0) when shape adherence on diamond prompts reaches --target (0.70) within --budget-minutes
of training. Every stage is the project's own CLI.

    .venv/bin/python -m jobs.bench_lora_concept [--out DIR] [--base tiny] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from jobs.bench_generate import run_cli


def prompts_manifest(path: Path, count: int, adapter: str | None, guidance: float) -> None:
    import itertools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.synthetic import BACKGROUNDS, COLORS, caption

    combos = list(itertools.product(COLORS, ["diamond"], BACKGROUNDS))
    rows = [{"id": f"diamond-{i:03d}", "prompt": caption(*combos[i % len(combos)]), "seed": 700_000 + i,
             "steps": 20, "guidance_scale": guidance, "adapters": [{"name": adapter, "scale": 1.0}] if adapter else []}
            for i in range(count)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_lora_concept", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("--base", default="tiny", help="the model to teach (default: the tiny preset)")
    parser.add_argument("--images", type=int, default=360)
    parser.add_argument("--prompts", type=int, default=54, help="diamond prompts scored before and after")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-layers", default="all", choices=["attention", "transformer", "all"],
                        help="the UNet layers the LoRA adapts (default all: tiny draws edges at its attention-free "
                             "full-resolution level, which only the convolutions reach)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance of the scored images (default 3)")
    parser.add_argument("--target", type=float, default=0.70)
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="lora-concept-")).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"[lora-concept] {message}", file=sys.stderr, flush=True)

    from jobs.synthetic import write_images

    # 1. the new concept's data
    write_images(out / "images", args.images, seed=3, shapes=["diamond"])
    run_cli(["dataset", "build", str(out / "images"), "-o", str(out / "data"), "--resolution", "256"], out / "data")
    # 2. before
    prompts_manifest(out / "before.parquet", args.prompts, adapter=None, guidance=args.guidance)
    run_cli(["generate", str(out / "before.parquet"), "--out", str(out / "before"), "--model", f"default={args.base}",
             "--no-watermark"], out / "before")
    run_cli(["eval", str(out / "before.parquet"), "--out", str(out / "before")], out / "before-eval")
    # 3. the LoRA, into an adapter store whose folder name is the adapter's name
    seconds = run_cli(["finetune", "lora", "--base", args.base, "--data", str(out / "data"),
                       "--out", str(out / "adapters" / "diamond"), "--train-text-encoder", "--rank", str(args.rank),
                       "--lora-layers", args.lora_layers,
                       "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                       "--workers", str(args.workers), "--warmup-steps", "20", "--log-every", "50", "--cache-latents",
                       "--checkpoint-every", "100", "--validation-prompt", "a blue diamond on a white background"],
                      out / "lora")
    # 4. after
    prompts_manifest(out / "after.parquet", args.prompts, adapter="diamond", guidance=args.guidance)
    run_cli(["generate", str(out / "after.parquet"), "--out", str(out / "after"), "--model", f"default={args.base}",
             "--adapters", str(out / "adapters"), "--no-watermark"], out / "after")
    run_cli(["eval", str(out / "after.parquet"), "--out", str(out / "after")], out / "after-eval")
    before = json.loads((out / "before" / "eval.json").read_text())
    after = json.loads((out / "after" / "eval.json").read_text())
    report = {
        "base": args.base, "prompts": args.prompts, "guidance": args.guidance, "train_minutes": round(seconds / 60, 2), "steps": args.steps,
        "rank": args.rank, "lr": args.lr, "lora_layers": args.lora_layers,
        "before": {k: before[k] for k in ("shape", "color", "drawn")},
        "after": {k: after[k] for k in ("shape", "color", "drawn")},
        "chance_shape": before["chance"]["shape"], "target": args.target,
        "confusion_before": before["confusion"]["shape"], "confusion_after": after["confusion"]["shape"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"diamond shape adherence: {before['shape']:.0%} before -> {after['shape']:.0%} after "
        f"(chance {before['chance']['shape']:.0%}); colour {before['color']:.0%} -> {after['color']:.0%}; "
        f"LoRA trained in {seconds / 60:.1f} min; report: {out / 'report.json'}")
    passed = after["shape"] >= args.target and seconds <= args.budget_minutes * 60
    say("PASS" if passed else f"FAIL (target {args.target:.0%} within {args.budget_minutes:g} min)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
