"""`sdfleet sheet OUT -o sheet.png`: a run's images as one picture (PNG, JPEG or WebP, as the extension
says), thumbnails in a grid captioned with their row ids, optionally in bands by a ledger column
(`--group-by sku`). A row without its image (failed, invalid, or a PNG gone since) is a grey tile that says
so, so a sheet never hides a gap.

`comparison_sheet` puts the same rows of several runs one run to a row (a base and its fine-tune); the
fine-tune benchmarks draw their pictures with it.
"""

from __future__ import annotations

import bisect
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageDraw

from jobs.errors import ReportError
from jobs.outputs import image_workers, open_output
from manifests.schema import error_line
from manifests.stores import gone_at_exit_reason, process_local, require_bucket, url_to_fs

GAP = "#dddddd"

# The formats a sheet is written in, named by the -o extension; each takes the sheet's RGB as it is.
SHEET_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# The longest side each format can hold (libjpeg's limit, not the format's 65,535; PNG's is far beyond
# MAX_SHEET_PIXELS), and the largest sheet drawn: 200 Mpx is 600 MB of RGB in memory, about 12,000
# thumbnails of 128 px.
MAX_SIDE = {"JPEG": 65_500, "WEBP": 16_383}
MAX_SHEET_PIXELS = 200_000_000
SMALLEST_THUMB = 16  # the least --thumb takes


def sheet_format(uri: str) -> str:
    """The Pillow format to write the sheet at `uri` in, from its extension; ReportError for a name that is
    empty, a directory, or an extension Pillow cannot write here (it would have been PNG bytes misnamed)."""
    if not uri:
        raise ReportError("-o is empty: name the sheet to write, e.g. -o sheet.png")
    if process_local(uri):
        raise ReportError(gone_at_exit_reason("-o", uri, "the sheet"))
    fs, path = url_to_fs(uri)
    # s3fs and gcsfs make a missing bucket when a file's folder is made: a typo would make a new bucket
    require_bucket(fs, path, "-o", uri, ReportError)
    try:
        is_dir = uri.endswith("/") or fs.isdir(path)
    except Exception as exc:  # noqa: BLE001 - the store's own error types
        raise ReportError(f"-o {uri}: the store does not answer ({error_line(exc)})") from exc
    if is_dir:
        raise ReportError(f"-o {uri} is a directory: name the sheet file to write in it, "
                          f"e.g. -o {uri.rstrip('/')}/sheet.png")
    Image.init()  # registers every plugin, so SAVE lists what this Pillow can write (WebP needs libwebp)
    writable = {ext: kind for ext, kind in SHEET_FORMATS.items() if kind in Image.SAVE}
    ext = posixpath.splitext(path)[1].lower()
    if ext not in writable:
        shown = ext if ext.strip(".") else "no extension"  # `sheet.` has the extension "."
        raise ReportError(f"-o {uri}: {shown} is not a format a sheet is written in; "
                          f"end the name in {', '.join(writable)}")
    return writable[ext]


def _thumbnail(fs, path: str, side: int) -> Image.Image:
    """The image at `path` within a `side` square, its shape kept (128x512 stays tall), or a placeholder
    naming why it cannot be shown (cut short, not an image)."""
    return _readable_thumbnail(fs, path, side) or _placeholder(side, "unreadable")


def _readable_thumbnail(fs, path: str, side: int) -> Image.Image | None:
    """`_thumbnail`, or None where the image cannot be read."""
    try:
        with fs.open(path, "rb") as f, Image.open(f) as image:
            scale = side / max(image.size)
            image = image.convert("RGB").resize((max(1, round(image.width * scale)),
                                                 max(1, round(image.height * scale))), Image.LANCZOS)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    tile = Image.new("RGB", (side, side), (255, 255, 255))
    tile.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return tile


def _caption(text: str, room: int) -> str:
    """`text` in `room` characters: a longer one ends in "..", so ids sharing a long prefix do not look alike."""
    if len(text) <= room:
        return text
    return text[:room] if room < 3 else text[: room - 2] + ".."


def _placeholder(side: int, text: str) -> Image.Image:
    tile = Image.new("RGB", (side, side), GAP)
    ImageDraw.Draw(tile).text((4, side // 2 - 6), text[: side // 6], fill=(120, 0, 0))
    return tile


def square_columns(sizes: list[int], thumb: int, label: int, band: int) -> int:
    """Thumbnails per line (at least 6) for a sheet of groups of `sizes` rows about as wide as it is tall: the
    fewest whose width reaches the height (more than the largest group's rows widens nothing), and of those that
    make as many lines, the fewest (36 rows: 6 lines of 6, not 6 lines of 7)."""
    def height(columns: int) -> int:
        return sum(band + -(-n // columns) * (thumb + label) for n in sizes)

    lines = range(6, max(6, *sizes) + 1)
    columns = lines[min(bisect.bisect_left(lines, True, key=lambda c: c * thumb >= height(c)), len(lines) - 1)]
    while columns > 6 and height(columns - 1) == height(columns):
        columns -= 1
    return columns


def contact_sheet(uri: str, group_by: str | None = None, columns: int | None = None, thumb: int = 128,
                  label: int = 14, image_format: str = "PNG", warn=None, gaps=None) -> Image.Image:
    """Every row of the run at `uri` in id order (within each group when `group_by` names a ledger column),
    `columns` to a line (default: `square_columns`). ReportError, before anything is drawn, for a sheet larger
    than `image_format` or memory can hold. `warn` is told of a later run that wrote rows and did not finish (the
    sheet shows the rows as they stand); `gaps`, once it is drawn, of `ok` rows whose image is not on it
    (missing, changed, unreadable)."""
    out = open_output(uri)
    for note in out.notes if warn else ():
        warn(note)
    out.check_group_by(group_by)
    groups = out.groups(group_by)
    if not groups:
        raise ReportError(f"{uri} has a run.json but an empty ledger: nothing to show")
    band = 20 if group_by else 0
    columns = columns or square_columns([len(rows) for rows in groups.values()], thumb, label, band)
    height = sum(band + -(-len(rows) // columns) * (thumb + label) for rows in groups.values())
    width, limit = columns * thumb, MAX_SIDE.get(image_format)
    too_big = (f"more than {image_format} can hold ({limit} px a side)" if limit and max(width, height) > limit
               else f"more than {MAX_SHEET_PIXELS // 1_000_000} Mpx" if width * height > MAX_SHEET_PIXELS else "")
    if too_big:
        rows = sum(len(positions) for positions in groups.values())
        # the least a sheet of these rows can be: the smallest thumbnail, each with its caption (any --columns)
        fits = rows * SMALLEST_THUMB * (SMALLEST_THUMB + label) <= MAX_SHEET_PIXELS
        way_out = "give a smaller --thumb or another --columns, or" if fits else (
            f"no sheet holds {rows} rows (about {MAX_SHEET_PIXELS // (SMALLEST_THUMB * (SMALLEST_THUMB + label)):,} at "
            f"--thumb {SMALLEST_THUMB}):")
        raise ReportError(f"a sheet of {rows} rows, {columns} to a line at {thumb} px, would be {width}x{height} px, "
                          f"{too_big}; {way_out} see every row with `sdfleet report {uri}`")
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)

    def tile(entry: dict) -> tuple[Image.Image, str | None]:
        """The row's tile, and why an `ok` row's image is not on it."""
        if entry["status"] != "ok":
            return _placeholder(thumb, entry["status"]), None
        if not out.has_image(entry):
            return _placeholder(thumb, "missing"), "missing"
        if out.resized(entry["id"], entry.get("png_bytes")):  # cut short or written over since it was drawn
            return _placeholder(thumb, "changed"), "changed"
        made = _readable_thumbnail(out.fs, out.image_path(entry["id"]), thumb)
        return (made, None) if made else (_placeholder(thumb, "unreadable"), "unreadable")

    without = Counter()  # ok rows whose image is not on the sheet, by why: said, not only drawn grey
    y = 0
    # the images read several at once (one at a time, a sheet on S3 took 5 to 10 times as long as on a disk)
    with ThreadPoolExecutor(max_workers=image_workers(out.fs)) as pool:
        for key, positions in groups.items():  # each group's entries as dicts only now, the size known to fit
            entries = out.rows(positions)
            if band:
                pen.rectangle((0, y, columns * thumb, y + band - 1), fill=(235, 235, 235))
                pen.text((4, y + 4), f"{group_by} = {key} ({len(entries)})", fill=(0, 0, 0))
                y += band
            for i, (entry, (made, why)) in enumerate(zip(entries, pool.map(tile, entries))):
                x, top = (i % columns) * thumb, y + (i // columns) * (thumb + label)
                sheet.paste(made, (x, top))
                if why:
                    without[why] += 1
                pen.text((x + 2, top + thumb + 1), _caption(entry["id"], thumb // 6), fill=(0, 0, 0))
            y += -(-len(entries) // columns) * (thumb + label)
    if gaps and (count := sum(without.values())):
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(without.items()))
        gaps(f"{count} ok row(s) without their image on the sheet ({why}); `sdfleet report {uri}` lists them, and a "
             "rerun of `sdfleet generate` draws them again")
    return sheet


def comparison_sheet(runs: dict[str, str], ids: list[str], thumb: int = 96, label: int = 72) -> Image.Image:
    """One row per run (labelled with its key), one column per row id: the same prompts and seeds drawn by
    each run, e.g. before and after a fine-tune."""
    sheet = Image.new("RGB", (label + len(ids) * thumb, len(runs) * thumb), (255, 255, 255))
    pen = ImageDraw.Draw(sheet)
    for r, (name, run_out) in enumerate(runs.items()):
        fs, root = url_to_fs(run_out)
        pen.text((4, r * thumb + thumb // 2 - 6), name, fill=(0, 0, 0))
        for c, row_id in enumerate(ids):
            path = f"{root.rstrip('/')}/images/{row_id}.png"
            if not fs.exists(path):
                raise ReportError(f"{run_out} has no image for row {row_id!r} ({path}): is it a `sdfleet generate` "
                                  "run of the same manifest rows?")
            sheet.paste(_thumbnail(fs, path, thumb), (label + c * thumb, r * thumb))
    return sheet
