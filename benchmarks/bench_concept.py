"""Proof that fine-tuning works: teach `tiny` a new concept in minutes on a CPU, scored before and after.

One concept per method, each something the base cannot draw from its prompt:

- `--method lora` (default): the shape `diamond` (an upright rhombus, jobs.synthetic.NEW_SHAPES). `tiny`
  is trained on circles, squares, triangles and stars only, so "a red diamond on a white background"
  draws some other shape. The LoRA (`--lora-layers all`: tiny draws corners at its full-resolution level,
  which has no attention layers) must make diamonds: scored on shape.
- `--method textual-inversion`: the new word `<gem>` for a purple star, which tiny can draw but has no
  word for: "a <gem> on a gray background" is a prompt of unknown bytes to the base. Textual Inversion
  trains only the word's vectors: scored on colour and shape both.
- `--method dreambooth`: the subject `zwx star`, a green star, in DreamBooth's form "a [identifier]
  [class]". The whole UNet trains on it, with prior preservation: the base first draws class images of
  stars, by default "a {colour} star on a {background} background" for every colour on the white and
  black backgrounds (`--class-prompt` replaces them; an earlier run with the one colourless prompt "a
  star on a white background" let "star" itself turn green). Scored on the subject's colour and shape,
  and on the class: prompts for stars of the other colours, on every background and with other seeds
  than the class images', must keep their colour, which is what prior preservation is for. The gray
  ones were never class prompts: they show whether the protection reaches beyond the prompts trained on.
- `--method dreambooth-lora`: the same subject, class images and scores, but a LoRA learns it (`finetune
  lora` with the class prompts, `--lora-layers`, the text encoder too) instead of the whole UNet: an
  adapter the generation actors swap in, not a model of its own.

Stages, every one the project's own CLI:

    1. synthetic images of the concept in every background (and colour, for the diamond) -> `dataset build`
    2. the base model on the concept's prompts (unseen seeds) -> `sdfleet generate` + `sdfleet eval`: before
    3. `sdfleet finetune lora|textual-inversion|dreambooth` (timed, class images included: the budget is
       10 minutes)
    4. the same prompts with the adapter (`--adapters`) or the new model -> `sdfleet eval`: after
    5. DIR/report.json (scores, confusions, train time) and DIR/sheet.png (the first 9 prompts, before
       and after: the concept sheets in docs/benchmarks.md)

Passes (exit 0) when every scored attribute reaches --target (0.70) within --budget-minutes of training.

    .venv/bin/python -m benchmarks.bench_concept [--method lora|textual-inversion|dreambooth|dreambooth-lora] [--out DIR]
                                           [--steps 300]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import run_cli
from jobs.sheet import comparison_sheet

METHODS = ("lora", "textual-inversion", "dreambooth", "dreambooth-lora")
# 2e-4 let DreamBooth's class drift; DreamBooth-LoRA takes the LoRA bench's lr
DEFAULT_LR = {"lora": 1e-3, "textual-inversion": 5e-3, "dreambooth": 5e-5, "dreambooth-lora": 1e-3}
GEM = {"token": "<gem>", "color": "purple", "shape": "star", "init_word": "star"}
# green: tiny draws "a zwx star" purple 89% of the time (a purple subject would score well untrained)
SUBJECT = {"word": "zwx", "color": "green", "shape": "star"}


CLASS_BACKGROUNDS = ("white", "black")  # gray is kept out of the class prompts, to score the class beyond them


def class_prompts() -> list[str]:
    """DreamBooth's default class prompts: stars as the base draws them, in every colour, on CLASS_BACKGROUNDS."""
    from jobs.synthetic import COLORS, caption

    return [caption(c, SUBJECT["shape"], b) for c, b in itertools.product(COLORS, CLASS_BACKGROUNDS)]


def concept_rows(method: str, count: int) -> list[dict]:
    """The scored prompts, with the colour, shape and background each asks for (what `sdfleet eval` reads)."""
    from jobs.synthetic import BACKGROUNDS, COLORS, caption

    if method == "lora":
        combos = list(itertools.product(COLORS, ["diamond"], BACKGROUNDS))
        make = lambda c, s, b: caption(c, s, b)  # noqa: E731
    elif method in ("dreambooth", "dreambooth-lora"):
        combos = [(SUBJECT["color"], SUBJECT["shape"], b) for b in BACKGROUNDS]
        make = lambda c, s, b: f"a {SUBJECT['word']} {s} on a {b} background"  # noqa: E731
    elif method == "class":  # dreambooth's class check: stars of every other colour
        combos = [(c, "star", b) for c, b in itertools.product(COLORS, BACKGROUNDS) if c != SUBJECT["color"]]
        make = lambda c, s, b: caption(c, s, b)  # noqa: E731
    else:
        combos = [(GEM["color"], GEM["shape"], b) for b in BACKGROUNDS]
        make = lambda c, s, b: f"a {GEM['token']} on a {b} background"  # noqa: E731
    rows = []
    for i in range(count):
        color, shape, background = combos[i % len(combos)]
        rows.append({"id": f"concept-{i:03d}", "prompt": make(color, shape, background), "seed": 700_000 + i,
                     "steps": 20, "color": color, "shape": shape, "background": background})
    return rows


def prompts_manifest(path: Path, rows: list[dict], adapter: str | None, guidance: float) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    adapters = [{"name": adapter, "scale": 1.0}] if adapter else []
    pq.write_table(pa.Table.from_pylist([{**r, "guidance_scale": guidance, "adapters": adapters} for r in rows]), path)


def concept_images(method: str, out: Path, count: int) -> None:
    """Training images and captions of the concept, for `sdfleet dataset build`."""
    from jobs.synthetic import write_images

    if method == "lora":
        write_images(out, count, seed=3, shapes=["diamond"])
        return
    import random

    from jobs.synthetic import BACKGROUNDS, draw_shape

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(3)
    concept = GEM if method == "textual-inversion" else SUBJECT
    what = GEM["token"] if method == "textual-inversion" else f"{SUBJECT['word']} {SUBJECT['shape']}"
    for i in range(count):
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        draw_shape(concept["color"], concept["shape"], background, 256, rng).save(out / f"{i:05d}.png")
        (out / f"{i:05d}.txt").write_text(f"a {what} on a {background} background\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_concept", description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=METHODS)
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("--base", default="tiny", help="the model to teach (default: the tiny preset)")
    parser.add_argument("--images", type=int, default=360)
    parser.add_argument("--prompts", type=int, default=54, help="prompts scored before and after")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--lr", type=float, help="default: " + ", ".join(f"{v:g} {k}" for k, v in DEFAULT_LR.items()))
    parser.add_argument("--class-images", type=int, default=96, help="dreambooth(-lora): class images the base draws "
                        "(default 96: 8 for each default class prompt)")
    parser.add_argument("--class-prompt", action="append", dest="class_prompts", metavar="TEXT",
                        help="dreambooth(-lora): class prompt, repeatable (default: 'a {colour} star on a {background} "
                             "background' for every colour, on white and black)")
    parser.add_argument("--prior-loss-weight", type=float, default=1.0, help="dreambooth(-lora) (default 1)")
    parser.add_argument("--rank", type=int, default=8, help="lora, dreambooth-lora")
    parser.add_argument("--lora-layers", default="all", choices=["attention", "transformer", "all"],
                        help="lora, dreambooth-lora: the UNet layers it adapts (default all: tiny draws edges at its attention-free "
                             "full-resolution level, which only the convolutions reach)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance of the scored images (default 3)")
    parser.add_argument("--target", type=float, default=0.70)
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="concept-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    lora, dreambooth = args.method == "lora", args.method in ("dreambooth", "dreambooth-lora")
    adapter = args.method != "dreambooth"  # the rest train an adapter; DreamBooth a whole model
    name = {"lora": "diamond", "textual-inversion": "gem"}.get(args.method, SUBJECT["word"])
    scored = ("shape",) if lora else ("color", "shape")

    def say(message: str) -> None:
        print(f"[concept] {message}", file=sys.stderr, flush=True)

    # 1. the new concept's data
    concept_images(args.method, out / "images", args.images)
    run_cli(["dataset", "build", str(out / "images"), "-o", str(out / "data"), "--resolution", "256"], out / "data")
    # 2. before
    rows = concept_rows(args.method, args.prompts)
    if dreambooth:  # and the class, in the same runs: ids keep them apart
        rows += [{**r, "id": r["id"].replace("concept", "class")} for r in concept_rows("class", args.prompts)]
    prompts_manifest(out / "before.parquet", rows, adapter=None, guidance=args.guidance)
    run_cli(["generate", str(out / "before.parquet"), "--out", str(out / "before"), "--model", f"default={args.base}",
             "--no-watermark"], out / "before")
    run_cli(["eval", str(out / "before.parquet"), "--out", str(out / "before")], out / "before-eval")
    # 3. the adapter, into an adapter store whose folder name is the adapter's name
    common = ["--base", args.base, "--data", str(out / "data"), "--out", str(out / "adapters" / name),
              "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
              "--warmup-steps", "20", "--log-every", "50", "--cache-latents", "--checkpoint-every", "100"]
    lr = args.lr or DEFAULT_LR[args.method]
    lora_flags = ["--train-text-encoder", "--rank", str(args.rank), "--lora-layers", args.lora_layers]
    if dreambooth:
        args.class_prompts = args.class_prompts or class_prompts()
        prior = [*itertools.chain.from_iterable(("--class-prompt", p) for p in args.class_prompts),
                 "--class-images", str(args.class_images), "--prior-loss-weight", str(args.prior_loss_weight),
                 "--validation-prompt", f"a {SUBJECT['word']} star on a gray background"]
    if args.method == "dreambooth":  # a whole model, not an adapter: it goes to models/, generate loads it with --model
        common[common.index("--out") + 1] = str(out / "models" / name)
        command = ["finetune", "dreambooth", *common, *prior, "--lr", str(lr)]
    elif args.method == "dreambooth-lora":
        command = ["finetune", "lora", *common, *lora_flags, *prior, "--lr", str(lr)]
    elif lora:
        command = ["finetune", "lora", *common, *lora_flags, "--lr", str(lr),
                   "--validation-prompt", "a blue diamond on a white background"]
    else:
        command = ["finetune", "textual-inversion", *common, "--token", GEM["token"], "--init-word", GEM["init_word"],
                   "--lr", str(lr), "--validation-prompt", f"a {GEM['token']} on a gray background"]
    seconds = run_cli(command, out / "train")
    # 4. after
    prompts_manifest(out / "after.parquet", rows, adapter=name if adapter else None, guidance=args.guidance)
    model = args.base if adapter else str(out / "models" / name)
    run_cli(["generate", str(out / "after.parquet"), "--out", str(out / "after"), "--model", f"default={model}",
             "--adapters", str(out / "adapters"), "--no-watermark"], out / "after")
    run_cli(["eval", str(out / "after.parquet"), "--out", str(out / "after")], out / "after-eval")
    prompted = set(args.class_prompts or [])
    unprompted = {r["id"] for r in rows if r["id"].startswith("class-") and r["prompt"] not in prompted}
    before, after = (scores(out / run, rows, unprompted) for run in ("before", "after"))
    report = {
        "method": args.method, "concept": name, "base": args.base, "prompts": args.prompts, "guidance": args.guidance,
        "train_minutes": round(seconds / 60, 2), "steps": args.steps, "lr": lr,
        **({"rank": args.rank, "lora_layers": args.lora_layers} if args.method in ("lora", "dreambooth-lora") else {}),
        **({"token": GEM["token"]} if args.method == "textual-inversion" else {}),
        "scored": list(scored),
        "before": {k: before[k] for k in ("shape", "color", "drawn")},
        "after": {k: after[k] for k in ("shape", "color", "drawn")},
        "chance": before["chance"], "target": args.target,
        "confusion_before": before["confusion"], "confusion_after": after["confusion"],
    }
    if dreambooth:
        report["class_prompts"] = args.class_prompts
        report["class_images"] = args.class_images
        report["prior_loss_weight"] = args.prior_loss_weight
        report["class_before"], report["class_after"] = before["class"], after["class"]
        report["class_unprompted_before"] = before["class_unprompted"]
        report["class_unprompted_after"] = after["class_unprompted"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    # the first prompts of the concept (every background in turn), before and after: what docs/benchmarks.md shows
    sheet_ids = [r["id"] for r in rows if r["id"].startswith("concept-")][:9]
    label = f"+ {GEM['token']}" if args.method == "textual-inversion" else f"+ {name}"
    comparison_sheet({"base": str(out / "before"), label: str(out / "after")}, sheet_ids).save(out / "sheet.png")
    changes = "; ".join(f"{k} {before[k]:.0%} -> {after[k]:.0%}" for k in ("shape", "color"))
    say(f"{name} ({args.method}): {changes} (scored: {', '.join(scored)}); trained in {seconds / 60:.1f} min; "
        f"report: {out / 'report.json'}")
    if dreambooth:
        say(f"the class (stars of the other colours): colour {before['class']['color']:.0%} -> "
            f"{after['class']['color']:.0%}, shape {before['class']['shape']:.0%} -> {after['class']['shape']:.0%}")
        if after["class_unprompted"]["n"]:
            say(f"  of them, the {after['class_unprompted']['n']} that were not class prompts: colour "
                f"{before['class_unprompted']['color']:.0%} -> {after['class_unprompted']['color']:.0%}")
    passed = all(after[k] >= args.target for k in scored) and seconds <= args.budget_minutes * 60
    if dreambooth:  # prior preservation: the class keeps its colours, beyond the class prompts too
        kept = [after[k]["color"] for k in ("class", "class_unprompted") if after[k]["n"]]
        passed = passed and min(kept) >= args.target
    say("PASS" if passed else f"FAIL (target {args.target:.0%} within {args.budget_minutes:g} min)")
    return 0 if passed else 1


def scores(run: Path, rows: list[dict], unprompted: set[str] = frozenset()) -> dict:
    """A run's eval.json; for dreambooth, its concept rows' scores on top, the class rows' under "class", and
    those of the class rows in `unprompted` (prompts that were not class prompts) under "class_unprompted"."""
    summary = json.loads((run / "eval.json").read_text())
    if not any(r["id"].startswith("class-") for r in rows):
        return summary

    def score(reads: list[dict]) -> dict:
        if not reads:
            return {"color": None, "shape": None, "drawn": None, "n": 0}
        right = {k: sum(r[k] == r[f"want_{k}"] for r in reads) / len(reads) for k in ("color", "shape")}
        return {**right, "drawn": sum(r["drawn"] for r in reads) / len(reads), "n": len(reads)}

    def rows_of(prefix: str) -> list[dict]:
        return [r for r in summary["rows"] if r["id"].startswith(prefix)]

    return {**summary, **score(rows_of("concept-")), "class": score(rows_of("class-")),
            "class_unprompted": score([r for r in rows_of("class-") if r["id"] in unprompted])}


if __name__ == "__main__":
    sys.exit(main())
