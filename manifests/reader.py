"""Streaming reads of Parquet manifests on any fsspec store.

A manifest is read in parts (one Parquet row group each) so a million-row manifest never sits whole in
one process: the driver plans parts from file metadata alone, and workers read one part at a time.
"""

from __future__ import annotations

import collections
import contextlib
import fnmatch
import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import coerced_id, error_line, row_location
from manifests.stores import file_stamp, is_folder, is_local_fs, tree_files, url_to_fs


MANIFEST_READS = 16  # manifest files the driver reads at once
PART_ROWS = 65_536  # consecutive row groups of one file are planned together up to this many rows
# The Parquet files an sdfleet output holds: its ledger parts (manifests.ledger.write_part) and the report's
# thumbnail index (jobs/report.py, Thumbnails). A folder of manifests may hold an output (`generate folder/
# --out folder/out`); none of these is a manifest.
LEDGER_PART = re.compile(r"(^|/)results/\d{8}T\d{6}-[0-9a-f]{6}-\d{5}\.parquet$")
REPORT_INDEX = re.compile(r"(^|/)report/thumbs/index\.parquet$")


def _output_file(path: str) -> bool:
    return bool(LEDGER_PART.search(path) or REPORT_INDEX.search(path))


class ManifestError(Exception):
    """A manifest cannot be read at all (missing file, not Parquet): the run cannot start."""


class BadManifestFile(ManifestError):
    """A manifest file that is there but cannot be read as one (not Parquet, cut short, a column named twice):
    its message says what to do, and the path was right."""


class DamagedManifest(BadManifestFile):
    """A Parquet file whose footer reads but whose `id` or `adapters` data does not (damaged pages, a bad copy):
    the run cannot check its ids, so it cannot start. Other damaged row groups are `Unreadable` rows."""


@dataclass(frozen=True)
class Unreadable:
    """A row of a row group whose data cannot be decoded: its id where the id column alone still reads, and why.
    `read_part` yields it in the row's place, so the row is accounted for (invalid) and the run goes on."""

    id: Any
    error: str
    problems: tuple[str, ...] = ()  # a line per field that cannot be decoded, where the row was read (`error`: all)


DAMAGED_HINT = "the file's data cannot be decoded: write it again from its source"


@dataclass(frozen=True)
class ManifestPart:
    """Consecutive Parquet row groups of one manifest file (one, unless they are small): the unit a plan task
    reads. A file written in row groups of a few rows is not thousands of tasks, each reading the footer."""

    uri: str
    row_group: int  # the first row group
    first_row: int  # position of the part's first row in its file
    num_rows: int
    row_groups: int = 1  # how many row groups, from `row_group` on
    stamp: str = ""  # the file's version when the driver read it (manifests.stores.file_stamp); "" unchecked


def expand_manifest_paths(paths: list[str], absent: dict[str, ManifestError] | None = None) -> list[str]:
    """Expand local paths, URIs, folders and globs to a sorted, de-duplicated list of file URIs.

    A path that exists is taken as it is, even with glob characters in its name (`shots[1].parquet`). A folder
    gives every .parquet below it, and a glob what it matches, except the Parquet files of sdfleet outputs
    (ledger parts, the report's thumbnail index): they hold no prompts. A path that names no manifest raises
    ManifestError (naming every such path), or, with `absent` given, is put there (path -> the error) and the
    others are expanded."""
    uris: list[str] = []
    missing: dict[str, ManifestError] = {} if absent is None else absent
    for given in paths:
        fs, path = url_to_fs(given)  # a store whose package is missing: said by the CLI, with the fix
        try:
            try:
                found = _files(fs, path, given)
            except ManifestError:
                raise
            except Exception as exc:  # noqa: BLE001 - credentials refused, a store that does not answer
                raise ManifestError(f"manifest {given!r} cannot be read ({error_line(exc)})") from exc
        except ManifestError as exc:
            missing[given] = exc
            continue
        uris += [_uri(fs, p) for p in found]
    if absent is None and missing:
        raise named_together(missing)
    # one file, once: named twice, or reached through a link (its rows would all be duplicates of themselves)
    first: dict[object, str] = {}
    for uri in uris:
        first.setdefault(_same_file_key(uri), uri)
    return list(first.values())


def named_together(absent: dict[str, ManifestError]) -> ManifestError:
    """One error for the paths that name no manifest (see expand_manifest_paths): each said, not the first."""
    if len(absent) == 1:
        return next(iter(absent.values()))
    return ManifestError(f"{len(absent)} manifest paths name no manifest: " + "; ".join(map(str, absent.values())))


def _same_file_key(uri: str) -> object:
    """What two names of one file share: a local file's device and inode (symbolic and hard links alike),
    else the URI."""
    if "://" in uri:
        return uri
    try:
        found = os.stat(uri)
    except OSError:
        return os.path.realpath(uri)
    return (found.st_dev, found.st_ino)


def _files(fs, path: str, given: str) -> list[str]:
    """The manifest files `given` (a file, a folder or a glob) names, as paths of `fs`."""
    if is_folder(fs, path):
        root = path.rstrip("/")
        found = sorted(p for p in tree_files(fs, path) if p.lower().endswith(".parquet") and not _output_file(p)
                       and not _left_out(p[len(root) + 1:]))
        if not found:
            raise ManifestError(f"directory {given!r} holds no .parquet manifest (files and folders whose name "
                                "starts with _ or . are left out)")
        for p in found:
            partition = next((s for s in p[len(root) + 1:].split("/")[:-1] if HIVE_FOLDER.fullmatch(s)
                              and s.split("=", 1)[0] not in _column_names(fs, p)), None)
            if partition:  # (its message says what to do: not the hint to check the paths)
                raise BadManifestFile(
                    f"directory {given!r} is partitioned by folder names ({p[len(root) + 1:]}): sdfleet reads a "
                    f"manifest's columns from its files only, so its rows would lose `{partition.split('=', 1)[0]}` "
                    f"({partition}/), or draw with its default where that is a field (`model`, `steps`, ...); "
                    "write the files with the column in them (polars' write_parquet without partition_by, "
                    "pyarrow's write_dataset without partitioning) and give their folder")
        return found
    if fs.isfile(path):
        return [path]
    if fsspec.core.has_magic(path):
        found = sorted(p for p in fs.glob(path) if fs.isfile(p) and not _output_file(p) and not _glob_left_out(path, p))
        if not found:
            raise ManifestError(f"no manifest file matches {given!r} (files and folders whose name starts with _ "
                                "or . are left out, unless the pattern names them so)")
        return found
    if fs.exists(path):  # /dev/null, a pipe: there, but no file to read
        raise ManifestError(f"manifest {given!r} is not a regular file or a folder")
    raise ManifestError(f"manifest {given!r} does not exist")


# A folder of a Hive-partitioned dataset (Spark, polars' partition_by, pyarrow's write_dataset): `key=value`
HIVE_FOLDER = re.compile(r"[^=/]+=[^/]*")


def _column_names(fs, path: str) -> list[str]:
    """The column names of the Parquet file at `path` (its footer only); [] where it cannot be read as one (said
    later, where every manifest is opened)."""
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f).names
    except Exception:  # noqa: BLE001 - not Parquet, cut short, a store that refuses: the survey names it
        return []


def _left_out(relative: str) -> bool:
    """A file of a manifest folder that is no manifest, by the convention Arrow's, Spark's and polars' dataset
    readers keep: a name starting with `_` or `.` on its way (Spark's `_temporary/` copies of a retried task, whose
    rows would all be duplicates; macOS's `._x.parquet` resource forks, which are no Parquet at all)."""
    return any(segment.startswith(("_", ".")) for segment in relative.split("/"))


def _glob_left_out(pattern: str, path: str) -> bool:
    """Whether a file a glob matched is no manifest by the folder rule (_left_out): a name starting with `_` or
    `.` below where the pattern's wildcards begin, unless the pattern's own segment there starts so too
    (`data/.staging/*.parquet` asks for that folder). A macOS `._x.parquet` that `*.parquet` matched stopped the
    run; Spark's `_temporary/` copies that `**` reached made every real row a duplicate."""
    parts, matched = pattern.split("/"), path.split("/")
    fixed = next(i for i, part in enumerate(parts) if fsspec.core.has_magic(part))
    asked = [part for part in parts[fixed:] if _left_out(part)]
    return any(_left_out(segment) and not any(fnmatch.fnmatchcase(segment, a) for a in asked)
               for segment in matched[fixed:])


def _uri(fs, path: str) -> str:
    """A URI that reopens `path` from any process: local files as absolute plain paths (Ray's workers do not
    share the driver's working directory: on a `ray start` cluster a relative path named another file)."""
    if is_local_fs(fs):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


TABLE_TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".json", ".jsonl", ".xlsx", ".xls")


def _open_parquet(uri: str) -> pq.ParquetFile:
    fs, path = url_to_fs(uri)
    try:
        pf = pq.ParquetFile(fs.open(path, "rb"))
    except pa.ArrowInvalid as exc:  # before OSError: ArrowInvalid is one
        if posixpath.splitext(uri)[1].lower() in TABLE_TEXT_SUFFIXES:  # (a manifest is Parquet alone)
            why = ("a manifest is Parquet: make one from CSV lists of products and scenes with `sdfleet manifest "
                   "expand`, or write the table as Parquet")
        else:
            why = "an empty or cut-short file, or another format: write it again as Parquet"
        raise BadManifestFile(f"{uri} is not a readable Parquet file: {exc} ({why})") from exc
    except pa.ArrowNotImplementedError as exc:  # polars' Int128, say: a column of a type Arrow has not
        raise BadManifestFile(f"{uri} holds a column of a type Arrow cannot read ({exc}): write that column as "
                              "another type (integers of 64 bits or fewer, or text)") from exc
    except OSError as exc:
        raise ManifestError(f"{uri} is not a readable Parquet file: {exc}") from exc
    names = pf.schema_arrow.names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # read by name, one of the two would be lost without a word
        pf.close(force=True)
        raise BadManifestFile(f"{uri} has more than one column named {', '.join(map(repr, twice))}; "
                              "a manifest's column names must be unique")
    return pf


@contextlib.contextmanager
def _opened(uri: str) -> Iterator[pq.ParquetFile]:
    """A manifest's ParquetFile, its file closed on the way out."""
    pf = _open_parquet(uri)
    try:
        yield pf
    finally:
        pf.close(force=True)  # force: the file object was opened here, not by pyarrow


def _each_file(uris: list[str], read: Callable[..., Any], stamped: bool = False) -> Iterator[Any]:
    """`read(uri, opened file)` for every manifest, MANIFEST_READS files at a time, yielded in the order given:
    a catalogue kept as hundreds of files on an object store is mostly waiting on round trips, read one by one.
    The first error stops the reads not yet started. `stamped`: `read(uri, opened file, the file's stamp)`, the
    stamp taken before the file is opened (a file replaced in between then fails the plan's check: safe)."""

    def opened(uri: str) -> Any:
        stamp = _stamp(uri) if stamped else None
        with _opened(uri) as pf:
            try:
                return read(uri, pf, stamp) if stamped else read(uri, pf)
            except (OSError, pa.ArrowException) as exc:
                raise DamagedManifest(f"{uri} cannot be read ({error_line(exc)}): {DAMAGED_HINT}") from exc

    if len(uris) <= 1:
        yield from map(opened, uris)
        return
    pool = ThreadPoolExecutor(max_workers=min(MANIFEST_READS, len(uris)))
    try:
        yield from pool.map(opened, uris)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class Survey:
    """What the driver learns from every manifest before a run, in one read of each file."""

    uris: list[str]  # the manifest files
    total: int  # rows in all manifests
    id_counts: collections.Counter  # how often each id occurs, as the schema coerces it
    adapter_names: set[str]  # every adapter name the `adapters` columns mention
    parts: list[ManifestPart]  # the row groups, in file order
    # every `model` value of the rows (`default` for null), or None where a file's column could not tell
    model_names: set[str] | None = field(default_factory=set)
    columns: set[str] = field(default_factory=set)  # every column name any manifest has
    file_columns: dict[str, list[str]] = field(default_factory=dict)  # each manifest's column names
    # `ok` rows of the output's ledger these manifests do not ask for: how many, and the first ids (generate fills)
    not_in_manifests_count: int = 0
    not_in_manifests: list = field(default_factory=list)
    loaded_adapter_names: set[str] = field(default_factory=set)  # those some row lists at a scale other than 0


def survey(uris: list[str]) -> Survey:
    """Footers, `id`, `adapters` and `model` columns of every manifest, each file opened once (`_each_file`)."""
    found = Survey(uris, 0, collections.Counter(), set(), [])
    for uri, (rows, file_counts, file_names, parts, columns, models) in zip(uris, _each_file(uris, _survey_file, True)):
        found.total += rows  # merged as they come
        found.id_counts.update(file_counts)
        found.adapter_names |= file_names[0]
        found.loaded_adapter_names |= file_names[1]
        found.model_names = None if models is None or found.model_names is None else found.model_names | models
        found.parts += parts
        found.columns |= set(columns)
        found.file_columns[uri] = columns
    return found


def _survey_file(uri: str, pf: pq.ParquetFile, stamp: str = "") -> tuple[
        int, collections.Counter, tuple[set[str], set[str]], list[ManifestPart], list[str], set[str]]:
    return (pf.metadata.num_rows, _id_counts(pf), _adapter_names(pf), _parts(uri, pf, stamp), pf.schema_arrow.names,
            _model_names(pf))


def _model_names(pf: pq.ParquetFile) -> set[str] | None:
    """The `model` values of a file's rows as the schema reads them (`default` for a null cell or no such
    column), or None where that is not known here: a column of another type (binary, numbers: the plan reads
    or refuses each row), or one that cannot be read (the plan names its damaged rows)."""
    if "model" not in pf.schema_arrow.names:
        return {"default"} if pf.metadata.num_rows else set()
    kind = pf.schema_arrow.field("model").type if pf.schema_arrow.names.count("model") == 1 else None
    if pa.types.is_dictionary(kind):  # a pandas Categorical
        kind = kind.value_type
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        return None
    found: set[str] = set()
    try:
        for batch in pf.iter_batches(batch_size=65536, columns=["model"]):
            column = batch.column(0)
            if isinstance(column, pa.DictionaryArray):
                column = column.dictionary_decode()
            found.update("default" if v is None else v for v in _texts(column.unique()))
    except (OSError, pa.ArrowException):
        return None
    return found


def _parts(uri: str, pf: pq.ParquetFile, stamp: str = "") -> list[ManifestPart]:
    parts, first, meta = [], 0, pf.metadata
    start = rows = count = 0
    for rg in range(meta.num_row_groups + 1):
        n = meta.row_group(rg).num_rows if rg < meta.num_row_groups else None
        if count and (n is None or rows + n > PART_ROWS):  # close the part so far before this group
            parts.append(ManifestPart(uri, start, first - rows, rows, count, stamp))
            rows = count = 0
        if n is None:
            break
        # read_part reads a part's row groups as one range: an empty group inside it is counted with it, else
        # each one would push a group of rows off the end of the range (a streaming writer's empty batch)
        if n or count:
            if not count:
                start = rg
            rows, count = rows + n, count + 1
        first += n
    return parts


def unreadable_files(uris: list[str]) -> dict[str, str]:
    """Each manifest of `uris` that cannot be opened as one, with why (`manifest validate` names every such file,
    then checks the rest; a run stops at the first)."""

    def why(uri: str) -> str | None:
        try:
            with _opened(uri):
                return None
        except ManifestError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=max(1, min(MANIFEST_READS, len(uris)))) as pool:
        return {uri: said for uri, said in zip(uris, pool.map(why, uris)) if said}


def plan_parts(uris: list[str]) -> list[ManifestPart]:
    """The parts of every manifest, from footers alone."""
    return [p for file_parts in _each_file(uris, _parts, True) for p in file_parts]


def read_part(part: ManifestPart, batch_rows: int = 1024) -> Iterator[tuple[int, dict[str, Any] | Unreadable]]:
    """Yield (row position in file, row as a dict) for one part, reading `batch_rows` at a time.

    The rows of a row group whose data cannot be decoded come as `Unreadable`, and the next row group is read.
    A part whose file changed since the driver surveyed it raises ManifestError, before and after its rows."""
    position = part.first_row
    _check_unchanged(part)
    with _opened(part.uri) as pf:
        meta = pf.metadata
        for rg in range(part.row_group, part.row_group + part.row_groups):
            start, end = position, position + meta.row_group(rg).num_rows
            try:
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg]):
                    for row in _batch_rows(batch, part.uri, position):
                        yield position, row
                        position += 1
            except (OSError, pa.ArrowException) as exc:
                error = (f"{part.uri} rows {position}-{end - 1} (row group {rg}) cannot be read ({error_line(exc)}): "
                         f"{DAMAGED_HINT}")
                ids = _row_group_ids(pf, rg) or [None] * (end - start)
                for pos in range(position, end):
                    yield pos, Unreadable(ids[pos - start], error)
            position = end
    _check_unchanged(part)  # what was read is the version surveyed, not one replaced while it was read


def _stamp(uri: str) -> str:
    fs, path = url_to_fs(uri)
    try:
        return file_stamp(fs, path)
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {uri} does not exist") from exc
    except Exception as exc:  # noqa: BLE001 - credentials refused, a store that does not answer
        raise ManifestError(f"manifest {uri} cannot be read ({error_line(exc)})") from exc


def _check_unchanged(part: ManifestPart) -> None:
    """The survey counted the rows of every manifest and checked their ids across all of them: a file
    rewritten since (the catalogue export running again) would be planned unchecked, its duplicate ids drawn
    over each other and rows missing from the ledger."""
    if part.stamp and (now := _stamp(part.uri)) != part.stamp:
        raise ManifestError(f"manifest {part.uri} changed since this run read it ({part.stamp} then, {now} now): its "
                            "rows were counted and their ids checked on the version read first; rerun once it is "
                            "written whole")


# What converting an Arrow value to Python may raise for a value no Python object holds: text that is not UTF-8,
# a date or time past year 9999 or before year 1 (Postgres' `infinity`, exported as the largest int64), a time
# zone this machine's database does not know.
UNCONVERTIBLE = (UnicodeDecodeError, OverflowError, ValueError, pa.ArrowException)


def _batch_rows(batch: pa.RecordBatch, uri: str, first: int) -> list[dict[str, Any] | Unreadable]:
    """The rows of `batch` (its first at position `first` of `uri`) as dicts. A row with a value no Python object
    holds (UNCONVERTIBLE: Arrow's own writers refuse text that is not UTF-8, but other tools' may not) comes as
    `Unreadable`, naming the fields and why, and the rest of the batch reads."""
    try:
        return batch.to_pylist()
    except UNCONVERTIBLE:
        pass
    rows: list[dict[str, Any] | Unreadable] = []
    for i in range(batch.num_rows):
        row = batch.slice(i, 1)
        try:
            rows.append(row.to_pylist()[0])
            continue
        except UNCONVERTIBLE:
            pass
        said = {name: why for name, column in zip(row.schema.names, row.columns) if (why := _unconvertible(column))}
        row_id = None if "id" in said or "id" not in row.schema.names else coerced_id(row.column("id")[0].as_py())
        text = any(why.startswith("is not UTF-8") for why in said.values())
        hint = ("write the manifest's text as UTF-8 (the tool that wrote it did not check)" if text else
                "write such values as null or as text (dates and times within years 1-9999)")
        where = row_location(uri, first + i, row_id)
        rows.append(Unreadable(row_id, f"{where}: " + "; ".join(f"`{name}` {why}" for name, why in said.items())
                               + f"; {hint}", tuple(f"{where}: `{name}` {why}; {hint}" for name, why in said.items())))
    return rows


def _unconvertible(column: pa.Array) -> str | None:
    """Why the one value of `column` cannot become a Python value, or None."""
    try:
        column.to_pylist()
        return None
    except UnicodeDecodeError:
        return f"is not UTF-8 text{_raw_bytes(column)}"
    except UNCONVERTIBLE as exc:
        kind, stored = column.type, ""
        if pa.types.is_timestamp(kind) or pa.types.is_duration(kind) or pa.types.is_date(kind):
            stored = f", stored as {column.cast(pa.int64() if not pa.types.is_date32(kind) else pa.int32())[0]}"
        return f"holds a {kind} value that cannot be read ({error_line(exc)}{stored})"


def _raw_bytes(column: pa.Array) -> str:
    """` (bytes b'...')` for a one-value text column, cut to 40 bytes; "" for other types."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        raw = column.view(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())[0].as_py()
        return f" (bytes {raw[:40]!r}{'...' if len(raw) > 40 else ''})"
    return ""


def _texts(column: pa.Array) -> list[Any]:
    """`column.to_pylist()`, with None in place of any value holding text that is not UTF-8 (its row is
    invalid: `read_part` says why)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = []
        for scalar in column:
            try:
                values.append(scalar.as_py())
            except UnicodeDecodeError:
                values.append(None)
        return values


def _row_group_ids(pf: pq.ParquetFile, rg: int) -> list[Any]:
    """The ids of one row group, read alone; [] where there is no id column or it cannot be read either."""
    try:
        if "id" in pf.schema_arrow.names:
            return [coerced_id(i) for i in _texts(pf.read_row_group(rg, columns=["id"]).column(0))]
    except (OSError, pa.ArrowException):
        pass
    return []


def iter_rows(uris: list[str]) -> Iterator[tuple[str, int, dict[str, Any] | Unreadable]]:
    """Yield (uri, row position, row) over all manifests, streaming (see `read_part` for `Unreadable`)."""
    for part in plan_parts(uris):
        for position, row in read_part(part):
            yield part.uri, position, row


def column_names(uris: list[str]) -> dict[str, list[str]]:
    """Each manifest's column names, from its footer."""
    return dict(zip(uris, _each_file(uris, lambda _, pf: pf.schema_arrow.names)))


def count_ids(uris: list[str], skip_damaged: bool = False) -> tuple[int, collections.Counter]:
    """Read only the `id` columns: (total rows, how often each id occurs).

    Duplicates must be known before any row is drawn, since all rows sharing an id are invalid. Ids are
    counted as the schema coerces them (`coerced_id`), whatever the column's Arrow type. With `skip_damaged`,
    a row group whose ids cannot be read is counted as none (`manifest validate` names it where it reads the
    rows, and goes on to the rest), instead of raising DamagedManifest.
    """
    def read(uri: str, pf: pq.ParquetFile) -> tuple[int, collections.Counter]:
        if not skip_damaged:
            return pf.metadata.num_rows, _id_counts(pf)
        counts: collections.Counter = collections.Counter()
        for group in range(pf.metadata.num_row_groups):
            with contextlib.suppress(OSError, pa.ArrowException):
                counts.update(_id_counts(pf, group))
        return pf.metadata.num_rows, counts

    counts: collections.Counter = collections.Counter()
    total = 0
    for rows, file_counts in _each_file(uris, read):
        total += rows
        counts.update(file_counts)
    return total, counts


def _id_counts(pf: pq.ParquetFile, group: int | None = None) -> collections.Counter:
    """How often each id occurs in the file (or in its row group `group`)."""
    counts: collections.Counter = collections.Counter()
    if "id" not in pf.schema_arrow.names:
        return counts
    groups = None if group is None else [group]
    for batch in pf.iter_batches(batch_size=65536, row_groups=groups, columns=["id"]):
        column = batch.column(0)
        values = _texts(column)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            counts.update(v for v in values if v is not None)
        else:  # binary or another type: count what the schema will make of each value
            counts.update(i for i in map(coerced_id, values) if i is not None)
    return counts


def adapter_names(uris: list[str]) -> set[str]:
    """Every adapter name the manifests' `adapters` columns mention (read alone, streaming).

    The driver resolves and fingerprints only these, not everything in the adapter store.
    """
    return named_adapters(uris)[0]


def named_adapters(uris: list[str]) -> tuple[set[str], set[str]]:
    """(every adapter name the manifests mention, those some row lists at a scale other than 0: the ones an
    actor may load)."""
    found = list(_each_file(uris, lambda _, pf: _adapter_names(pf)))
    return set().union(*(n for n, _ in found)), set().union(*(loaded for _, loaded in found))


def _adapter_names(pf: pq.ParquetFile) -> tuple[set[str], set[str]]:
    names: set[str] = set()
    loaded: set[str] = set()
    if "adapters" not in pf.schema_arrow.names:
        return names, loaded
    for batch in pf.iter_batches(batch_size=65536, columns=["adapters"]):
        for value in _texts(batch.column(0)):
            for item in value or []:
                if isinstance(item, dict) and isinstance(item.get("name"), str):
                    names.add(item["name"])
                    if item.get("scale") != 0:  # (null is 1; a scale that is no number: the row is invalid)
                        loaded.add(item["name"])
    return names, loaded
