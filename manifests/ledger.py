"""The results ledger: one row per input row per run, in append-only Parquet parts under `results/`.

Parts are written whole or not at all and never rewritten, so a killed run keeps every part it
finished, and reading the ledger back tells a rerun which rows are done.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import shutil
import uuid
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import error_line
from manifests.stores import MissingColumns, UnreadableFile, folder_files, is_local_fs, read_parquet_files

STATUSES = ("ok", "failed", "invalid")

ADAPTER_TYPE = pa.list_(pa.struct([("name", pa.string()), ("scale", pa.float64())]))

# The columns every part has, in order. Columns of the manifest that are not fields follow these.
LEDGER_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("status", pa.string()),
    ("uri", pa.string()),
    ("sha256", pa.string()),
    ("png_bytes", pa.int64()),  # the PNG's size: a rerun redraws an image whose size no longer matches (damaged in place)
    ("params_hash", pa.string()),
    ("seed", pa.int64()),
    ("model", pa.string()),
    ("adapters", ADAPTER_TYPE),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("steps", pa.int64()),
    ("guidance_scale", pa.float64()),
    ("scheduler", pa.string()),
    ("watermark", pa.string()),
    ("watermark_bits", pa.float64()),  # share of the payload's bits read back before the image was written
    ("error", pa.string()),
    ("warning", pa.string()),
    ("actor", pa.string()),
    ("seconds", pa.float64()),
    ("finished_at", pa.string()),
    ("source", pa.string()),
    ("row", pa.int64()),
    # a digest of the row's pass-through columns: a rerun records a done row again, undrawn, when they changed
    ("passthrough_hash", pa.string()),
    ("extra", pa.string()),  # JSON of the manifest's pass-through columns, expanded when a part is written
])
LEDGER_COLUMNS = tuple(LEDGER_SCHEMA.names)
# What every part has had since the first: a Parquet file in results/ without them is not a ledger part (a manifest
# copied there by mistake), refused by name rather than read with its own `status` taken for the rows' status
PART_KEY = ("id", "status", "params_hash", "finished_at")


def ledger_row(row: dict[str, Any], status: str, **fields) -> dict[str, Any]:
    """A ledger entry for `row` (the ledger carries no prompt: it lives in the manifest and the PNG)."""
    keep = ("id", "params_hash", "seed", "model", "width", "height", "steps", "guidance_scale", "scheduler",
            "watermark", "source", "row", "passthrough_hash", "extra", "error", "warning")
    entry = {k: row.get(k) for k in keep}
    entry["adapters"] = [{"name": a["name"], "scale": a["scale"]} for a in row.get("adapters") or []]
    entry["status"] = status
    entry["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")
    entry.update(fields)
    return entry


def settled_row(row: dict[str, Any], **fields) -> dict[str, Any]:
    """The ledger entry of a row the plan settled: invalid, failed, or ok when it recovered the image."""
    return ledger_row(row, row["status"], uri=row.get("uri"), sha256=row.get("sha256"), png_bytes=row.get("png_bytes"),
                      watermark_bits=row.get("watermark_bits"), **fields)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` so that `path` appears complete or not at all.

    Local files go through a hidden temporary file in the same folder and `os.replace`; object stores
    (S3, GCS) make an object visible only once its upload completes, so one put is already atomic.
    """
    if not is_local_fs(fs):
        fs.pipe_file(path, data)
        return
    with _replaced(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_put_file(fs: fsspec.AbstractFileSystem, local: str, path: str) -> None:
    """Copy the local file `local` to `path` as atomic_write writes bytes (a model's weights are GBs: not read
    into memory): a file copied over in place (shutil.copyfile truncates it first) was left cut short by a kill."""
    if not is_local_fs(fs):
        fs.put_file(local, path)
        return
    with _replaced(path) as tmp:
        shutil.copyfile(local, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


@contextlib.contextmanager
def _replaced(path: str):
    """A hidden temporary file's path beside the local file `path`, which replaces `path` once the body has written
    it; removed if the body fails (a full disk, a read-only folder: what it wrote would only take space)."""
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove_stale_temp_files(fs: fsspec.AbstractFileSystem, root: str, older_than: float = 3600.0) -> int:
    """Delete temporary files that killed runs left under images/ and results/; returns how many.

    Only local stores have them (see atomic_write). A temp file younger than `older_than` seconds may
    belong to a run still writing into the same output, so it stays.
    """
    if not is_local_fs(fs):
        return 0
    import time

    removed = 0
    for folder in ("images", "results"):
        path = os.path.join(root, folder)
        if not os.path.isdir(path):
            continue
        for entry in os.scandir(path):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                if time.time() - entry.stat().st_mtime > older_than:
                    os.unlink(entry.path)
                    removed += 1
    return removed


def extra_columns(names: list[str]) -> dict[str, str]:
    """The ledger column for each of a manifest's own columns (extra_column)."""
    return {name: extra_column(name) for name in names}


def extra_column(name: str) -> str:
    """The ledger column of a manifest's own column `name`: its name, unless that is a ledger column (say `status`)
    or one of the fields Arrow's dataset reader adds (`__filename`, ...); then `manifest_` in front. A name that
    is such a name with `manifest_` in front already (`manifest_status`) gets one more, so that no two columns of
    any manifests ever meet in one ledger column, whatever rows a ledger part holds (`status` is always
    `manifest_status`, `manifest_status` always `manifest_manifest_status`)."""
    base = name
    while base.startswith("manifest_"):
        base = base.removeprefix("manifest_")
    return f"manifest_{name}" if base in LEDGER_COLUMNS or base.startswith("__") else name


def to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Ledger rows (dicts with LEDGER_COLUMNS) as a table; pass-through columns become real columns."""
    rows = list(rows)
    table = pa.Table.from_pylist([{k: r.get(k) for k in LEDGER_COLUMNS} for r in rows], schema=LEDGER_SCHEMA)
    extras = [json.loads(r["extra"]) if r.get("extra") else {} for r in rows]
    for name, column in extra_columns(list(dict.fromkeys(k for e in extras for k in e))).items():
        values = [e.get(name) for e in extras]
        table = table.append_column(column, extra_array(values))
    return table.drop_columns(["extra"])


def extra_array(values: list) -> pa.Array:
    """One pass-through column of a ledger part (or of a manifest `manifest expand` writes), typed as Arrow infers
    it from the values; else text.

    One flush can hold rows of several manifests that type a column differently (an int `sku` here, text
    there), and integers past int64 (a uint64 hash column) overflow Arrow's inference: the part is written
    anyway, with unsigned 64-bit integers where they fit and text otherwise, rather than lost."""
    try:
        return pa.array(values)
    except OverflowError:
        if all(v is None or (type(v) is int and 0 <= v < 2**64) for v in values):
            return pa.array(values, pa.uint64())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    return pa.array([as_text(v) for v in values], pa.string())


def as_text(value: Any) -> str | None:
    """A pass-through value in a column that holds text and other types: text as it is, lists and dicts as JSON
    (what a program reading the ledger can parse back), anything else as Python writes it (`7`, `True`)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def write_part(fs: fsspec.AbstractFileSystem, root: str, run_id: str, seq: int, rows: list[dict]) -> str:
    """Write one ledger part atomically; returns its path."""
    buf = io.BytesIO()
    pq.write_table(to_table(rows), buf)
    path = f"{root.rstrip('/')}/results/{run_id}-{seq:05d}.parquet"
    atomic_write(fs, path, buf.getvalue())
    return path


def ledger_parts(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, int | None]:
    """The ledger parts of the output at `root`, in name order, each with its size in bytes (one listing)."""
    found = folder_files(fs, f"{root.rstrip('/')}/results", ".parquet")
    return {path: found[path].get("size") for path in sorted(found)}


def read_parts(fs: fsspec.AbstractFileSystem, parts: dict[str, int | None], columns: list[str] | None = None,
               optional: tuple[str, ...] = ()) -> Iterator[tuple[str, pa.Table]]:
    """(path, table) for each of `parts` (ledger_parts), as manifests.stores.read_parquet_files reads them; a file
    without the PART_KEY columns raises UnreadableFile (damaged) naming it."""
    return read_parquet_files(fs, list(parts), columns=columns, sizes=parts, optional=optional, required=PART_KEY)


def not_a_part(exc: UnreadableFile) -> str | None:
    """The line for a file in results/ that read_parts refused for lacking the ledger's columns (a manifest copied
    there), or None for a part that is damaged or cannot be fetched."""
    if isinstance(exc.cause, MissingColumns):
        return (f"{exc.path} is not a ledger part ({exc.cause}): a Parquet file sdfleet did not write, which "
                "results/ must not hold; move it out of results/")
    return None


def damaged_part(exc: UnreadableFile) -> str:
    """The line for a ledger part that is damaged (parts are written whole: it was damaged afterwards), the same
    in every command that reads the ledger, with the one way out that keeps the rows: generate's rerun."""
    return (f"ledger part {exc.path} cannot be read ({error_line(exc.cause)}); move it out of results/ and rerun "
            "`sdfleet generate` with the run's manifests: the rows it recorded that they ask for are recovered from "
            "their images (read back, not drawn), or drawn again where an image is gone")


def read_latest_ok(fs: fsspec.AbstractFileSystem, root: str,
                   finished: dict[str, tuple[str, int | None]] | None = None,
                   superseded: set[str] | None = None,
                   labels: dict[str, str] | None = None) -> dict[str, str]:
    """Map id -> params_hash of the newest `ok` entry for every id the ledger holds; `finished`, when given,
    is filled with id -> that entry's (`finished_at`, `png_bytes`): what a rerun checks the image against
    (`png_bytes` is None in parts written before the column was). `superseded`, when given, gets the ids whose
    newest entry is not that `ok` one (a `failed` or `invalid` entry written after it). `labels`, when given, gets
    id -> that entry's `passthrough_hash`, where it has one (parts written before the column was have none).

    Only the newest counts: if a row was drawn with hash A, then B, then changed back to A, the image
    on disk is B's, so A must be drawn again.
    """
    parts = ledger_parts(fs, root)
    latest: dict[str, tuple[str, str, int | None, str | None]] = {}
    not_ok: dict[str, str] = {}  # id -> when its newest entry that is not `ok` was written
    columns = ["id", "status", "params_hash", "finished_at", "png_bytes", "passthrough_hash"]
    for _, table in read_parts(fs, parts, columns, optional=("png_bytes", "passthrough_hash")):
        values = [table.column(c).to_pylist() for c in columns[:4]]
        for rid, status, phash, when, size, label in zip(*values, png_sizes(table), passthrough_hashes(table)):
            if status == "ok":
                if rid not in latest or when >= latest[rid][1]:
                    latest[rid] = (phash, when, size, label)
            elif superseded is not None and when is not None and (rid not in not_ok or when > not_ok[rid]):
                not_ok[rid] = when
    if finished is not None:
        finished.update((rid, (when, size)) for rid, (_, when, size, _) in latest.items())
    if superseded is not None:
        superseded.update(rid for rid, when in not_ok.items() if rid in latest and when > (latest[rid][1] or ""))
    if labels is not None:
        labels.update((rid, label) for rid, (_, _, _, label) in latest.items() if label is not None)
    return {rid: phash for rid, (phash, _, _, _) in latest.items()}


def newest_statuses(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, str]:
    """id -> the status of its newest entry, for every id the ledger holds ({} without a ledger)."""
    parts = ledger_parts(fs, root)
    newest: dict[str, tuple[str, str]] = {}  # id -> (finished_at, status)
    for _, table in read_parts(fs, parts, ["id", "status", "finished_at"]):
        for rid, status, when in zip(*(table.column(c).to_pylist() for c in ("id", "status", "finished_at"))):
            if rid is not None and (rid not in newest or (when or "") >= newest[rid][0]):
                newest[rid] = (when or "", status)
    return {rid: status for rid, (_, status) in newest.items()}


# What a row recorded again without drawing it keeps of its newest `ok` entry (newest_ok_entries)
KEPT_FROM_OK = ("uri", "sha256", "png_bytes", "watermark_bits", "warning")


def newest_ok_entries(fs: fsspec.AbstractFileSystem, root: str, ids: set[str]) -> dict[str, dict[str, Any]]:
    """id -> the KEPT_FROM_OK fields of the newest `ok` entry of each of `ids`: what a rerun records again for a
    row that failed since, or whose pass-through columns changed (jobs.plan), from the ledger, not by reading its
    image back (a night that failed a whole catalogue would have every image read the next, two requests each on
    an object store)."""
    import pyarrow.compute as pc

    parts = ledger_parts(fs, root)
    wanted = pa.array(sorted(ids), pa.string())
    newest: dict[str, tuple[str, dict[str, Any]]] = {}
    columns = ["id", "status", "finished_at", *KEPT_FROM_OK]
    optional = ("png_bytes", "watermark_bits", "warning")
    for _, table in read_parts(fs, parts, columns, optional=optional):
        table = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_in(table["id"], value_set=wanted)))
        kept = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
                for c in ("uri", "sha256", "watermark_bits", "warning")}
        kept["png_bytes"] = png_sizes(table)
        for i, (rid, when) in enumerate(zip(table.column("id").to_pylist(), table.column("finished_at").to_pylist())):
            if rid not in newest or when >= newest[rid][0]:
                newest[rid] = (when, {c: kept[c][i] for c in KEPT_FROM_OK})
    return {rid: entry for rid, (_, entry) in newest.items()}


def png_sizes(table: pa.Table) -> list[int | None]:
    """Each entry's `png_bytes`; None throughout where the column is missing (a part written before it was one)
    or holds something else (a manifest's own column of that name, passed through before it was one)."""
    return _own_column(table, "png_bytes", pa.types.is_integer)


def passthrough_hashes(table: pa.Table) -> list[str | None]:
    """Each entry's `passthrough_hash`; None throughout where the column is missing or not text (as png_sizes)."""
    return _own_column(table, "passthrough_hash", pa.types.is_string)


def _own_column(table: pa.Table, name: str, of_its_type) -> list:
    """The values of the ledger column `name`, or None for every entry where a part lacks it or holds a manifest's
    own column of that name (passed through before the ledger had one: its type is not `of_its_type`)."""
    column = table.column(name) if name in table.column_names else None
    if column is None or not of_its_type(column.type):
        return [None] * table.num_rows
    return column.to_pylist()


def size_differs(listed, recorded: int | None) -> bool:
    """Whether an image's size in the store's listing is not the `png_bytes` its entry recorded: a file cut short
    or replaced since. Where either is unknown (a store that gives no size, an entry from before the column),
    the entry is trusted. What `generate` and the report both ask."""
    return listed is not None and recorded is not None and int(listed) != recorded


def read_ledger(fs: fsspec.AbstractFileSystem, root: str) -> pa.Table:
    """The whole ledger as one table (parts may carry different pass-through columns)."""
    parts = ledger_parts(fs, root)
    return concat_parts([table for _, table in read_parts(fs, parts)])


def concat_parts(tables: list[pa.Table]) -> pa.Table:
    """Ledger parts as one table: a column some parts lack is null there, and a pass-through column that parts
    type differently is text in all of them (see _as_text_where_types_differ)."""
    if not tables:
        return LEDGER_SCHEMA.empty_table().drop_columns(["extra"])
    return pa.concat_tables(_as_text_where_types_differ(tables), promote_options="default")


def _as_text_where_types_differ(tables: list[pa.Table]) -> list[pa.Table]:
    """Parts written by different runs may type a pass-through column differently (a `sku` of numbers in
    one manifest, of text in another). Such columns become text in every part, as they do within one part."""
    kinds: dict[str, set] = {}
    for table in tables:
        for field in table.schema:
            if not pa.types.is_null(field.type):
                kinds.setdefault(field.name, set()).add(field.type)
    clashing = [name for name, types in kinds.items() if len(types) > 1 and name not in LEDGER_COLUMNS]
    out = []
    for table in tables:
        for name in clashing:
            if name in table.column_names:
                values = [as_text(v) for v in table.column(name).to_pylist()]
                table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
        out.append(table)
    return out
