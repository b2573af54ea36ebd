"""`sdfleet dataset build`: a folder of captioned images into a Parquet training dataset on any fsspec store.

    IMAGES_DIR/shoe-01.png + shoe-01.txt ...   (or --captions DIR of <stem>.txt, or a CSV/JSONL of file,caption)
      -> resize the shortest side to --resolution, centre-crop to a square
      -> OUT/part-<build>-00000.parquet ... (file, caption, image PNG bytes, width, height) + OUT/_dataset.json

Every file that cannot be used is reported with its reason (corrupt, no caption, too small) and skipped;
the rest are written. `sdfleet finetune --data OUT` reads what this writes.

OUT is a new or empty folder, or an earlier build's output (it has `_dataset.json`), which a rebuild replaces.
Readers take the parts `_dataset.json` names, so writing it is the commit: a build writes its parts under
names of their own beside the old ones, then the summary, then removes the old parts. A build that fails or is
stopped before the summary removes what it wrote and leaves the earlier dataset whole.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import posixpath
import re
import secrets
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from jobs.console import recorded_json
from manifests.csv_text import CsvProblem, csv_records
from manifests.dataset import (DATASET_SCHEMA, SUMMARY_FILE, DatasetError, folder_names, square_crop,
                               unknown_scale, upright_rgb)
from manifests.ledger import atomic_write
from manifests.text import NOT_AN_IMAGE
from manifests.schema import MAX_SIDE, error_line, first_few
from manifests.stores import is_local_fs, missing, require_bucket, tree_files, url_to_fs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # a GIF: its first frame
# Files beside the images that are not meant as images: not reported. Any other file is skipped with its reason.
OTHER_SUFFIXES = (".txt", ".csv", ".json", ".jsonl", ".md", ".yaml", ".yml")
ROWS_PER_PART = 500
# The part files of a build, named by the build (UTC time and a random tag) so that a rebuild writes beside the
# parts it replaces; builds before 2026-12-05 wrote part-NNNNN.parquet.
BUILD_PART = re.compile(r"part-\d{8}T\d{6}-[0-9a-f]{6}-\d{5}\.parquet")
OLD_PART = re.compile(r"part-\d{5}\.parquet")
TEMPORARY = re.compile(r"\.part-.*\.tmp")  # manifests.ledger.atomic_write's, on a local disk


@dataclass
class Skipped:
    file: str
    reason: str


def build_dataset(images_dir: str, out: str, captions: str | None = None, resolution: int = 256,
                  min_size: int | None = None, log=print) -> dict:
    """Build the dataset; returns the summary written to OUT/_dataset.json. Raises DatasetError if nothing is usable."""
    if resolution < 64 or resolution % 8 or resolution > MAX_SIDE:  # (finetune --resolution takes no less)
        raise DatasetError(f"--resolution must be a multiple of 8 (the VAE downsamples 8x) in 64..{MAX_SIDE}, as "
                           f"the generation sizes are; got {resolution}")
    if min_size is not None and min_size < 1:
        raise DatasetError(f"--min-size must be at least 1 px; got {min_size}")
    min_size = resolution if min_size is None else min_size
    if not out.strip():
        raise DatasetError("-o is empty; give the folder to write the dataset into (a path or URI)")
    out_fs, out_root = url_to_fs(out)
    out_root = out_root.rstrip("/")
    require_bucket(out_fs, out_root, "-o", out, DatasetError)
    try:
        _check_out(out_fs, out_root, out)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - credentials that may not list it: said naming -o, not "a store"
        raise DatasetError(f"-o {out} cannot be read ({error_line(exc)})") from exc
    fs, root = url_to_fs(images_dir)
    try:
        found = tree_files(fs, root) if fs.isdir(root) else None
    except Exception as exc:  # noqa: BLE001 - credentials refused, a server that does not answer
        raise DatasetError(f"IMAGES_DIR {images_dir} cannot be read ({error_line(exc)})") from exc
    if found is None:
        raise DatasetError(f"IMAGES_DIR {images_dir} is not a folder")
    if type(out_fs) is type(fs):  # -o inside IMAGES_DIR: a rebuild would skip its own parts as "not an image"
        found = [p for p in found if not p.startswith(out_root + "/")]
    # and an earlier build's output inside IMAGES_DIR (written there with another -o) is no one's images either
    built = sorted({p.rsplit("/", 1)[0] for p in found if posixpath.basename(p) == SUMMARY_FILE} - {root.rstrip("/")})
    if built:
        found = [p for p in found if not any(p.startswith(folder + "/") for folder in built)]
        log(f"note: left out {len(built)} `dataset build` output(s) inside IMAGES_DIR: "
            f"{first_few([os.path.relpath(b, root) for b in built], 3)}")
    images = [p for p in found if p.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise DatasetError(f"IMAGES_DIR {images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    rel = {p: os.path.relpath(p, root) for p in images}
    unknown = [os.path.relpath(p, root) for p in found if not p.lower().endswith(IMAGE_SUFFIXES + OTHER_SUFFIXES)
               and not posixpath.basename(p).startswith(".")]
    lookup, listed = _caption_lookup(fs, root, captions)
    stray = sorted(set(listed) - set(rel.values()))
    if stray:  # a typo'd or moved file: its caption is not used
        log(f"warning: {len(stray)} caption(s) in {captions} name no image in {images_dir}: {first_few(stray, 5)}")

    def one(path: str):
        name = rel[path]
        caption, why = lookup(name)
        if caption is None:
            return Skipped(name, why)
        try:
            data = fs.cat_file(path)
            return _prepare(name, data, caption, resolution, min_size)
        except OSError as exc:
            return Skipped(name, f"cannot be read ({exc})")

    build = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    before = _is_dataset(out_fs, out_root)
    made = _new_folders(out_root) if is_local_fs(out_fs) else []  # what this build's first write will make
    rows, skipped, parts, committed = [], [], [], False
    for name in unknown:  # .heic, .avif, .svg...: said, not silently left out
        skipped.append(Skipped(name, f"not an image type this reads ({', '.join(IMAGE_SUFFIXES)})"))
        log(f"skipped {name}: {skipped[-1].reason}")
    try:
        # large photos are fine (Pillow warns past 89 Mpx on the terminal); past its limit it raises, said per file
        with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL decodes without the GIL
            for i, result in enumerate(pool.map(one, images), 1):
                if isinstance(result, Skipped):
                    skipped.append(result)
                    log(f"skipped {result.file}: {result.reason}")
                else:
                    rows.append(result)
                if len(rows) == ROWS_PER_PART:
                    parts.append(_write_part(out_fs, out_root, build, len(parts), rows, out))
                    rows = []
                if i % 200 == 0:
                    log(f"{i}/{len(images)} images read")
        if rows:
            parts.append(_write_part(out_fs, out_root, build, len(parts), rows, out))
        written = sum(n for _, n, _ in parts)
        if not written:
            raise DatasetError(f"no usable images in {images_dir}: all {len(images)} were skipped (see the reasons "
                               "above)" + (f"; the dataset already in {out} is left as it was" if before else ""))
        summary = {
            "rows": written, "skipped": [vars(s) for s in skipped], "resolution": resolution, "min_size": min_size,
            "source": images_dir, "parts": [posixpath.basename(p) for p, _, _ in parts],
            # what a fine-tune's resume checks the dataset by (manifests.dataset.dataset_fingerprint): the parts'
            # bytes, so a caption changed or images swapped between captions tell one build from another
            "content_sha256": hashlib.sha256("".join(digest for _, _, digest in parts).encode()).hexdigest(),
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        # the commit: from here on the summary names this build's parts, and readers read those
        text = recorded_json(summary)  # `source` as given, less a URI's password
        _write(out_fs, f"{out_root}/{SUMMARY_FILE}", text.encode(), out)
        committed = True
    finally:
        if not committed:  # failed or stopped: what this build wrote goes, and an earlier build stays whole
            for path, _, _ in parts:
                with contextlib.suppress(Exception):  # a store gone: the next build removes them (not read)
                    out_fs.rm_file(path)
            for folder in made:  # the folders this build made for -o (a full disk): not left behind empty
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
    try:  # an earlier build's parts, or a killed one's: no longer read, now removed
        for name in _own_parts(out_fs, out_root) - set(summary["parts"]):
            out_fs.rm_file(f"{out_root}/{name}")
    except Exception as exc:  # noqa: BLE001 - the dataset is written; what is left over is never read
        log(f"warning: old part files in {out} could not all be removed ({exc}); they are not read, and the "
            "next build removes them")
    return summary


def _new_folders(path: str) -> list[str]:
    """The folders that making the local folder `path` would create, deepest first."""
    new = []
    while path and not os.path.isdir(path) and os.path.dirname(path) != path:
        new.append(path)
        path = os.path.dirname(path)
    return new


def _is_dataset(fs, root: str) -> bool:
    return fs.isfile(f"{root}/{SUMMARY_FILE}")


def _own_parts(fs, root: str) -> set[str]:
    """The part files `dataset build`s wrote into `root`, once this build's summary is there: this version's
    (named by their build) and older builds' (part-NNNNN.parquet; `_check_out` let no other folder holding
    such files through)."""
    return {name for name in folder_names(fs, root) if BUILD_PART.fullmatch(name) or OLD_PART.fullmatch(name)}


def _check_out(fs, root: str, out: str) -> None:
    """OUT must be new, empty, or an earlier build's output: a build removes the earlier build's part files
    from it, and so must not write into a folder of something else's files."""
    if fs.isfile(root):
        raise DatasetError(f"-o {out} is a file; give a folder to write the dataset into (a new one, or an earlier "
                           "`dataset build` output to rebuild)")
    if not fs.isdir(root) or _is_dataset(fs, root):
        return
    # a killed first build's parts, and the temporary files of its writes, are no one else's
    held = [name for name in folder_names(fs, root) if not (BUILD_PART.fullmatch(name) or TEMPORARY.fullmatch(name))]
    if held:
        raise DatasetError(f"-o {out} holds files ({first_few(held, 3)}) and is not a `dataset build` output (no {SUMMARY_FILE}); "
                           "give a new or empty folder, or an earlier build's output to rebuild it")


def _caption_lookup(fs, root: str, captions: str | None):
    """A function: image path relative to IMAGES_DIR -> (caption, None) or (None, why there is none); and the
    files a captions table names (none for caption files)."""
    def from_text(cfs, folder: str, name: str):
        path = f"{folder}/{os.path.splitext(name)[0]}.txt"
        if not cfs.exists(path):
            return None, f"no caption (expected {path})"
        text, why = _caption_text(cfs.cat_file(path), path)
        return (text, None) if text else (None, why or f"empty caption in {path}")

    if captions is None:
        return (lambda name: from_text(fs, root, name)), []
    cfs, croot = url_to_fs(captions)
    try:
        if cfs.isdir(croot):
            return (lambda name: from_text(cfs, croot, name)), []
        if missing(cfs, croot):
            raise DatasetError(f"--captions {captions} does not exist (give a folder of .txt files, a .csv or a "
                               ".jsonl)")
        table = _caption_table(cfs, croot, captions)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - credentials refused, a server that does not answer
        raise DatasetError(f"--captions {captions} cannot be read ({error_line(exc)})") from exc
    return (lambda name: ((table[name], None) if table.get(name) else
                          (None, f"no caption for {name!r} in {captions}"))), list(table)


def _caption_table(cfs, path: str, label: str) -> dict[str, str]:
    try:  # utf-8-sig: spreadsheets save CSV with a byte-order mark, which would rename the first column
        text = cfs.cat_file(path).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"--captions {label} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                           "save it as UTF-8 (in a spreadsheet: CSV UTF-8)") from exc
    if path.lower().endswith(".csv"):
        try:
            header, found = csv_records(text)
        except CsvProblem as exc:
            hint = " (keep each caption on one line)" if exc.runs_on else ""
            raise DatasetError(f"--captions {label} {exc}{hint}") from exc
        if not {"file", "caption"} <= set(header):
            raise DatasetError(f"--captions {label}: a CSV needs the columns file,caption; it has {header}")
        records = [{**dict.fromkeys(header), **dict(zip(header, fields))} for _, fields in found]
    elif path.lower().endswith((".jsonl", ".json")):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"--captions {label} line {n}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or "file" not in record or "caption" not in record:
                raise DatasetError(f"--captions {label} line {n}: needs {{\"file\": ..., \"caption\": ...}}")
            wrong = [key for key in ("file", "caption") if not isinstance(record[key], str)]
            if wrong:  # str() of a list or an object was trained on as the caption
                raise DatasetError(f"--captions {label} line {n}: `{wrong[0]}` must be text, got "
                                   f"{type(record[wrong[0]]).__name__} {record[wrong[0]]!r:.80}")
            records.append(record)
    else:
        raise DatasetError(f"--captions {label}: expected a folder, a .csv or a .jsonl file")
    table: dict[str, str] = {}
    for r in records:
        # `./a.png` and `sub\\a.png` (a Windows export) name the image `a.png` and `sub/a.png` the build lists
        name = posixpath.normpath(str(r["file"]).strip().replace("\\", "/"))
        caption = str(r["caption"] or "").strip()
        if table.get(name, caption) != caption:  # which one was meant? (the same caption twice is harmless)
            raise DatasetError(f"--captions {label} gives {name!r} two captions ({table[name]!r} and {caption!r}); "
                               "keep one")
        table[name] = caption
    return table


def _caption_text(data: bytes, path: str) -> tuple[str | None, str | None]:
    """A caption file's text: UTF-8 (a byte-order mark dropped) or UTF-16 with its mark (Windows Notepad's
    "Unicode"); (None, why) for anything else, which would be trained on as mojibake."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16").strip(), None
        except UnicodeDecodeError as exc:  # a UTF-16 mark on bytes that are not UTF-16 (cut short, or not text)
            return None, (f"caption {path} starts with a UTF-16 byte-order mark but is not UTF-16 text "
                          f"({exc.reason} at byte {exc.start}); save it as UTF-8")
    try:
        return data.decode("utf-8-sig").strip(), None
    except UnicodeDecodeError as exc:
        return None, (f"caption {path} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); save it as "
                      "UTF-8")


def _prepare(name: str, data: bytes, caption: str, resolution: int, min_size: int):
    """Decode, check and square-crop one image; a Skipped says why it cannot be used."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            unknown = unknown_scale(im)
            if unknown:
                return Skipped(name, unknown)
            im = upright_rgb(im)
    except Image.DecompressionBombError as exc:
        return Skipped(name, f"too large to decode safely ({exc}); downscale it first")
    except UnidentifiedImageError:
        return Skipped(name, NOT_AN_IMAGE)
    except (OSError, ValueError) as exc:
        return Skipped(name, f"corrupt (cannot decode: {exc})")
    w, h = im.size
    if min(w, h) < min_size:
        return Skipped(name, f"too small ({w}x{h}; the shortest side must be at least {min_size} px)")
    im = square_crop(im, resolution)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return {"file": name, "caption": caption, "image": buf.getvalue(), "width": resolution, "height": resolution}


def _write_part(fs, root: str, build: str, index: int, rows: list[dict], out: str) -> tuple[str, int, str]:
    """Write one part; (its path, its rows, the sha256 of its bytes)."""
    path = f"{root}/part-{build}-{index:05d}.parquet"  # a new name: no earlier build's part is overwritten
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=DATASET_SCHEMA), buf)
    _write(fs, path, buf.getvalue(), out)
    return path, len(rows), hashlib.sha256(buf.getvalue()).hexdigest()


def _write(fs, path: str, data: bytes, out: str) -> None:
    """atomic_write, where a folder that cannot be written (read-only, a full disk) is one line naming -o."""
    try:
        atomic_write(fs, path, data)
    except OSError as exc:
        raise DatasetError(f"cannot write -o {out}: {error_line(exc)}") from exc
