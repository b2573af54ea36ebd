"""A contact sheet of a run's images: thumbnails in a grid, each labelled with its row id.

    python -m benchmarks.contact_sheet RUN_OUT -o sheet.png [--columns 6] [--thumb 128]

`comparison_sheet` puts the same rows of several runs (a base and its fine-tune) one run to a row.
"""

from __future__ import annotations

import argparse
import sys

import fsspec
from PIL import Image, ImageDraw


def _thumbnail(fs, path: str, thumb: int) -> Image.Image:
    with fs.open(path, "rb") as f, Image.open(f) as im:
        return im.convert("RGB").resize((thumb, thumb), Image.LANCZOS)


def contact_sheet(run_out: str, columns: int = 6, thumb: int = 128, label: int = 14) -> Image.Image:
    fs, root = fsspec.core.url_to_fs(run_out)
    paths = sorted(fs.glob(f"{root.rstrip('/')}/images/*.png"))
    if not paths:
        raise SystemExit(f"{run_out} has no images/*.png (give the --out of a `sdfleet generate` run)")
    rows = -(-len(paths) // columns)
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for i, path in enumerate(paths):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + label)
        sheet.paste(_thumbnail(fs, path, thumb), (x, y))
        name = path.rsplit("/", 1)[-1].removesuffix(".png")
        pen.text((x + 2, y + thumb + 1), name[: thumb // 6], fill=(0, 0, 0))
    return sheet


def comparison_sheet(runs: dict[str, str], ids: list[str], thumb: int = 96, label: int = 72) -> Image.Image:
    """One row per run (labelled with its key), one column per row id: the same prompts and seeds drawn by
    each run, e.g. before and after a fine-tune."""
    sheet = Image.new("RGB", (label + len(ids) * thumb, len(runs) * thumb), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for r, (name, run_out) in enumerate(runs.items()):
        fs, root = fsspec.core.url_to_fs(run_out)
        pen.text((4, r * thumb + thumb // 2 - 6), name, fill=(0, 0, 0))
        for c, row_id in enumerate(ids):
            path = f"{root.rstrip('/')}/images/{row_id}.png"
            if not fs.exists(path):
                raise SystemExit(f"{run_out} has no image for row {row_id!r} ({path}): is it a `sdfleet generate` "
                                 "run of the same manifest rows?")
            sheet.paste(_thumbnail(fs, path, thumb), (label + c * thumb, r * thumb))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contact_sheet", description=__doc__.splitlines()[0])
    parser.add_argument("run_out", help="the --out of a `sdfleet generate` run")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--thumb", type=int, default=128, help="thumbnail side in px")
    args = parser.parse_args(argv)
    contact_sheet(args.run_out, args.columns, args.thumb).save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
