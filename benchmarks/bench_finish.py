"""Per-image cost of finishing, today's code against what it replaced, side by side on the same images.

- watermark: invisible-watermark's own `dwtDctSvd` encoder (the baseline) against `actors.watermark.embed`,
  and `embed_checked` (embed, read back, headroom retries where bits are lost): what the finishing stage runs;
- PNG: Pillow's `save` at its default level (the baseline) against `actors.png.png_bytes` (OpenCV, level 1,
  the same iTXt parameters chunk): milliseconds and bytes.

Images: the overlap bench's bank (coloured objects on white, smooth colourful scenes) at each size.
Variants are interleaved image by image, so drift on a shared VM hits them alike.

    python -m benchmarks.bench_finish [--sizes 256 768] [--repeats 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from actors import watermark as wm
from actors.png import pillow_png_bytes, png_bytes
from benchmarks.common import image_bank

PARAMS = {"prompt": "a studio photo of a teapot on a white background", "seed": 1, "steps": 30}


def timed(fn, image) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn(image)
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_finish", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 768])
    parser.add_argument("--repeats", type=int, default=5, help="passes over the image bank (default 5)")
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)

    variants = {
        "watermark_library": lambda im: wm.library_embed(im, "sdfleet"),
        "watermark_fast": lambda im: wm.embed(im, "sdfleet"),
        "watermark_checked": lambda im: wm.embed_checked(im, "sdfleet")[0],
        "png_pillow": lambda im: pillow_png_bytes(im, PARAMS),
        "png_fast": lambda im: png_bytes(im, PARAMS),
    }
    report = {}
    for size in args.sizes:
        bank = image_bank(size)
        seconds = {name: [] for name in variants}
        sizes = {name: [] for name in variants if name.startswith("png")}
        for _ in range(args.repeats):
            for image in bank:
                for name, fn in variants.items():
                    spent, out = timed(fn, image)
                    seconds[name].append(spent)
                    if name in sizes:
                        sizes[name].append(len(out))
        ms = {name: 1000 * statistics.median(v) for name, v in seconds.items()}
        report[size] = {
            "ms_per_image": {k: round(v, 2) for k, v in ms.items()},
            "bytes_per_image": {k: int(statistics.median(v)) for k, v in sizes.items()},
            "speedup": {"watermark_fast": round(ms["watermark_library"] / ms["watermark_fast"], 2),
                        "watermark_checked": round(ms["watermark_library"] / ms["watermark_checked"], 2),
                        "png_fast": round(ms["png_pillow"] / ms["png_fast"], 2)},
        }
    for size, r in report.items():
        print(f"\n{size} px, median of {args.repeats} x {len(image_bank(8))} images")
        print(f"{'variant':<20}{'ms/image':>10}{'bytes':>10}")
        for name, value in r["ms_per_image"].items():
            print(f"{name:<20}{value:>10.1f}{r['bytes_per_image'].get(name, ''):>10}")
        print("speed-up over the baseline: " + ", ".join(f"{k} {v}x" for k, v in r["speedup"].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
