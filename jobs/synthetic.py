"""A synthetic product-shot world: one coloured shape on a plain background, with its caption.

Captions follow exactly `a {color} {shape} on a {background} background`. Size and position vary, shapes
are never rotated. Some colour-shape-background combinations are held out of training (`HELD_OUT`) so a
model can be tested on combinations it never saw. Used to train and test fine-tuning on a CPU:

    python -m jobs.synthetic OUT_DIR [--count 200] [--size 256] [--seed 0] [--split train|held-out|all]
    python -m jobs.synthetic manifests/examples/shapes.parquet --example-manifest

writes OUT_DIR/NNNNN.png + NNNNN.txt, ready for `sdfleet dataset build OUT_DIR`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "orange": (245, 140, 30), "purple": (140, 60, 190),
}
PALETTE = COLORS  # the colours eval tells apart
SHAPES = ("circle", "square", "triangle", "star")
# A shape the tiny model is never trained on (an upright rhombus): a LoRA teaches it as a new concept,
# word and look (benchmarks.bench_concept). A new colour would not do: the tiny VAE, trained on the
# palette alone, gives unseen hues back as palette colours, and no UNet can draw what its VAE cannot carry.
NEW_SHAPES = ("diamond",)
ALL_SHAPES = SHAPES + NEW_SHAPES  # the shapes eval tells apart
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
# One combination per colour kept out of training; each colour, shape and background is still seen.
HELD_OUT = {("red", "star", "gray"), ("green", "triangle", "black"), ("blue", "circle", "white"),
            ("yellow", "square", "gray"), ("orange", "star", "black"), ("purple", "circle", "gray")}
ALL = list(itertools.product(COLORS, SHAPES, BACKGROUNDS))


def caption(color: str, shape: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


def draw_shape(color: str, shape: str, background: str, size: int = 256, rng: random.Random | None = None) -> Image.Image:
    """One image: `shape` in `color`, centred somewhere on `background`, 30-60% of the image wide."""
    rng = rng or random.Random(0)
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(0.15, 0.30) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    fill = PALETTE[color]
    if shape == "circle":
        pen.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif shape == "square":
        half = radius * 0.85
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "triangle":  # upright: apex at the top
        pen.polygon([(cx, cy - radius), (cx + radius * math.sqrt(3) / 2, cy + radius / 2),
                     (cx - radius * math.sqrt(3) / 2, cy + radius / 2)], fill=fill)
    elif shape == "diamond":  # an upright rhombus, as tall as a circle, 0.7 as wide
        pen.polygon([(cx, cy - radius), (cx + radius * 0.7, cy), (cx, cy + radius), (cx - radius * 0.7, cy)], fill=fill)
    elif shape == "star":  # five points, one pointing straight up
        points = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        pen.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES + NEW_SHAPES)}")
    return image


def probe(i: int, size: int = 256) -> tuple[tuple[str, str, str], Image.Image]:
    """The `i`-th fixed probe image, the same on every run: combination `ALL[i % len(ALL)]`, placed by
    `random.Random(i)`. VAE checks and benches draw these, so their numbers compare across runs."""
    combination = ALL[i % len(ALL)]
    return combination, draw_shape(*combination, size, random.Random(i))


def combinations(split: str) -> list[tuple[str, str, str]]:
    if split == "train":
        return [c for c in ALL if c not in HELD_OUT]
    if split == "held-out":
        return sorted(HELD_OUT)
    if split == "all":
        return list(ALL)
    raise ValueError(f"split must be train, held-out or all; got {split!r}")


def write_images(out: str | Path, count: int, size: int = 256, seed: int = 0, split: str = "train",
                 shapes: list[str] | None = None) -> list[str]:
    """Write `count` images and captions, cycling through the split's combinations (or, with `shapes`,
    every colour and background in those shapes); returns the captions."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    combos = list(itertools.product(COLORS, shapes, BACKGROUNDS)) if shapes else combinations(split)
    written = []
    for i in range(count):
        color, shape, background = combos[i % len(combos)]
        draw_shape(color, shape, background, size, rng).save(out / f"{i:05d}.png")
        text = caption(color, shape, background)
        (out / f"{i:05d}.txt").write_text(text + "\n")
        written.append(text)
    return written


def example_manifest(path: str | Path) -> None:
    """The quick start's manifest: every colour x shape once, backgrounds in turn, with its intent columns,
    at guidance 3 (what `tiny` was scored at; it was trained with 10% caption dropout)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i, (color, shape) in enumerate(itertools.product(COLORS, SHAPES)):
        background = list(BACKGROUNDS)[i % len(BACKGROUNDS)]
        rows.append({"id": f"{color}-{shape}-on-{background}", "prompt": caption(color, shape, background),
                     "seed": 1000 + i, "guidance_scale": 3.0, "color": color, "shape": shape, "background": background})
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write NNNNN.png + NNNNN.txt into")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", choices=["train", "held-out", "all"])
    parser.add_argument("--example-manifest", action="store_true",
                        help="write the quick start's manifest (24 rows) to OUT instead of images")
    args = parser.parse_args(argv)
    if args.example_manifest:
        example_manifest(args.out)
        print(f"wrote {args.out}")
        return 0
    write_images(args.out, args.count, args.size, args.seed, args.split)
    print(f"wrote {args.count} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
