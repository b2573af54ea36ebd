"""A contact sheet of a run's images: thumbnails in a grid, each labelled with its row id.

    python -m jobs.contact_sheet RUN_OUT -o sheet.png [--columns 6] [--thumb 128]
"""

from __future__ import annotations

import argparse
import sys

import fsspec
from PIL import Image, ImageDraw


def contact_sheet(run_out: str, columns: int = 6, thumb: int = 128, label: int = 14) -> Image.Image:
    fs, root = fsspec.core.url_to_fs(run_out)
    paths = sorted(fs.glob(f"{root.rstrip('/')}/images/*.png"))
    if not paths:
        raise SystemExit(f"{run_out} has no images/*.png (give the --out of a `sdfleet generate` run)")
    rows = -(-len(paths) // columns)
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label)), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for i, path in enumerate(paths):
        with fs.open(path, "rb") as f, Image.open(f) as im:
            tile = im.convert("RGB").resize((thumb, thumb), Image.LANCZOS)
        x, y = (i % columns) * thumb, (i // columns) * (thumb + label)
        sheet.paste(tile, (x, y))
        name = path.rsplit("/", 1)[-1].removesuffix(".png")
        pen.text((x + 2, y + thumb + 1), name[: thumb // 6], fill=(0, 0, 0))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.contact_sheet", description=__doc__.splitlines()[0])
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
