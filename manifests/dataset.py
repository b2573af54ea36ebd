"""Training datasets: the Parquet layout `sdfleet dataset build` writes and the fine-tune workers read.

A dataset is a folder of Parquet files (or one Parquet file) with at least a `caption` (string) and an
`image` (encoded image bytes) column; `dataset build` adds `file`, `width`, `height`, and `_dataset.json`,
whose `parts` name the files of the dataset (other files beside them, such as those of a build still
running, are not read). A folder without `_dataset.json` is every `.parquet` file in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from manifests.schema import error_line
from manifests.stores import folder_files, is_folder, read_parquet, url_to_fs

DATASET_SCHEMA = pa.schema([
    ("file", pa.string()),  # path relative to IMAGES_DIR, for tracing a sample back to its source
    ("caption", pa.string()),
    ("image", pa.binary()),  # PNG, RGB, resolution x resolution
    ("width", pa.int64()),
    ("height", pa.int64()),
])
REQUIRED_COLUMNS = ("caption", "image")
SUMMARY_FILE = "_dataset.json"


class DatasetError(ValueError):
    """The dataset cannot be built or read (exit 2): the message says what is wrong and what would work."""


def upright_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB as the photo is seen (what `dataset build` stores, and how training reads a dataset's images):
    turned as its EXIF orientation says (phones store portraits sideways),
    16-bit grey scaled to 8 bits (a plain conversion clips it to white), transparency on white (product
    cut-outs, whether an alpha channel or a PNG's transparent colour key), not black."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return im.convert("RGB")


def unknown_scale(im: Image.Image) -> str | None:
    """Why an image's pixel values cannot be read as brightness, or None. A 32-bit integer image is taken as
    16-bit data (what Pillow opens 16-bit PNGs as); one whose values all fit in 8 bits, or go past 16, and a
    floating-point one, have no scale to go by: each was trained on as a black or near-black sample."""
    if im.mode == "F":
        return "a floating-point image: its brightness scale is not known; save it as 8- or 16-bit"
    if im.mode == "I":
        low, high = im.getextrema()
        if low < 0 or high > 65535 or high < 256:
            return (f"32-bit integer pixels from {low} to {high}: not 16-bit data, and no other scale is known; "
                    "save it as 8- or 16-bit")
    return None


def square_crop(im: Image.Image, size: int) -> Image.Image:
    """The centre square (product shots are centred), resized to `size`. Only the square is resampled: a
    2 x 6000 px image resized whole first took 0.9 GB (a 1 x 60000 one would not have fitted)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return im.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))


def folder_names(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The names in folder `root`, sorted (an object store may list a folder's own marker object: left out)."""
    root = root.rstrip("/")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if p.rstrip("/") != root)


def dataset_files(uri: str, flag: str = "--data") -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """The Parquet files of a dataset (a folder of parts, or one file); DatasetError, naming `flag`, if none or
    if the store does not answer."""
    try:
        return _dataset_files(uri, flag)
    except (DatasetError, ImportError, ValueError):  # ours; a protocol with no library here (said by the caller)
        raise
    except Exception as exc:  # noqa: BLE001 - any store error: the dataset cannot be read, named by its flag
        raise DatasetError(f"{flag} {uri}: the store refused or did not answer ({error_line(exc)}); check the URI "
                           "and the store's credentials in the environment") from exc


def _dataset_files(uri: str, flag: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    fs, root = url_to_fs(uri)
    root = root.rstrip("/")
    if is_folder(fs, root):
        try:
            parts = json.loads(fs.cat_file(f"{root}/{SUMMARY_FILE}"))["parts"]
        except FileNotFoundError:
            files = sorted(folder_files(fs, root, ".parquet"))
        except (ValueError, KeyError, TypeError) as exc:
            raise DatasetError(f"{flag} {uri}: {SUMMARY_FILE} cannot be read ({exc}); build the dataset again") from exc
        else:
            files = [f"{root}/{name}" for name in parts]
            present = set(folder_names(fs, root))  # one listing
            missing = [name for name in parts if name not in present]
            if missing:
                raise DatasetError(f"{flag} {uri}: {SUMMARY_FILE} names {', '.join(missing[:3])}, which "
                                   f"{'is' if len(missing) == 1 else 'are'} not there; build the dataset again")
    elif fs.isfile(root):
        files = [root]
    else:
        raise DatasetError(f"{flag} {uri} does not exist (build one with `sdfleet dataset build`)")
    if not files:
        raise DatasetError(f"{flag} {uri} holds no .parquet files (build one with `sdfleet dataset build`)")
    return fs, files


# What each required column holds, as `dataset build` writes it.
COLUMN_KINDS = {
    "caption": ("text", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "image": ("encoded image bytes (binary)", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
}


def check_dataset(uri: str, flag: str = "--data") -> int:
    """Check a training dataset from its Parquet footers; returns its row count. Raises DatasetError, whose
    message names the dataset by `flag`."""
    fs, files = dataset_files(uri, flag)
    rows = 0
    for path in files:
        with contextlib.ExitStack() as stack:
            try:
                meta = pq.ParquetFile(stack.enter_context(fs.open(path, "rb")))
                schema = meta.schema_arrow
                rows += meta.metadata.num_rows
            except Exception as exc:  # noqa: BLE001 - any unreadable footer means the same thing
                raise DatasetError(f"{flag} {uri}: {path} is not a readable Parquet file ({exc})") from exc
            names = schema.names
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise DatasetError(f"{flag} {uri}: {path} has no {', '.join(repr(c) for c in missing)} column "
                                   f"(it has {names}); a dataset needs {list(REQUIRED_COLUMNS)}")
            for column, (kind, is_kind) in COLUMN_KINDS.items():  # else it fails in every worker, after Ray starts
                if not is_kind(schema.field(column).type):
                    raise DatasetError(f"{flag} {uri}: {path}'s `{column}` column is {schema.field(column).type}, "
                                       f"not {kind}; build the dataset with `sdfleet dataset build`")
                # captions are small: read where a writer kept no statistics (images are GBs: the worker names one)
                empty = _nulls(meta, column, read_unknown=column == "caption")
                if empty:
                    raise DatasetError(f"{flag} {uri}: {path} has {empty} row(s) whose `{column}` is null; every row "
                                       "needs one (an empty caption is \"\"); build the dataset with `sdfleet dataset "
                                       "build`")
    if rows == 0:
        raise DatasetError(f"{flag} {uri} is empty: 0 rows")
    return rows


def _nulls(meta: pq.ParquetFile, name: str, read_unknown: bool = False) -> int:
    """Nulls in the top-level column `name`, from the footer's statistics; in a row group whose writer kept none,
    read from the column itself if `read_unknown`, else taken as 0."""
    leaves = [i for i in range(meta.metadata.num_columns) if meta.metadata.schema.column(i).path == name]
    if not leaves:
        return 0
    count = 0
    for group in range(meta.metadata.num_row_groups):
        stats = meta.metadata.row_group(group).column(leaves[0]).statistics
        if stats is not None and stats.has_null_count:
            count += stats.null_count
        elif read_unknown:
            count += meta.read_row_group(group, columns=[name]).column(0).null_count
    return count


def dataset_fingerprint(uri: str, flag: str = "--data") -> str:
    """What tells one build of a dataset from another at the same URI: the digest of its parts' bytes that
    `dataset build` records in _dataset.json (a caption changed, or images swapped between captions, change it;
    the same images and captions built again do not), read, not computed (a dataset may be GBs on an object
    store). A dataset without one (another tool's Parquet, a build before 2026-12-07): its parts' sizes, hashed
    (not their names: `dataset build` names each part by when it was written)."""
    fs, files = dataset_files(uri, flag)
    root = url_to_fs(uri)[1].rstrip("/")
    with contextlib.suppress(Exception):  # (none: one file, or a folder of another tool's parts)
        digest = json.loads(fs.cat_file(f"{root}/{SUMMARY_FILE}")).get("content_sha256")
        if isinstance(digest, str) and digest:
            return "content:" + digest[:16]
    return hashlib.sha256(json.dumps([fs.size(path) for path in files]).encode()).hexdigest()[:16]


def read_dataset(uri: str) -> pa.Table:
    """The dataset's caption and image columns, all parts, in file order."""
    fs, files = dataset_files(uri)
    tables = []
    for path in files:
        tables.append(read_parquet(fs, path, columns=list(REQUIRED_COLUMNS)))
    return pa.concat_tables(tables)
