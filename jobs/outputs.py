"""A `generate --out` read back: its runs, its ledger entry by entry with the run that wrote each, and every
row's current state. What `sdfleet report` and `sdfleet sheet` stand on.

The ledger is append-only (manifests.ledger): a row's current state is its newest entry, and a run's own
entries are the parts named after its run id (`results/<run_id>-<seq>.parquet`). Run ids start with their
start time, so sorting by (run id, finished_at) puts every entry in the order it was written.

The ledger stays an Arrow table: a nightly catalogue holds a million rows and every night's entries, and only
the rows a caller asks for (a page of a report, the first problems) become Python dicts.
"""

from __future__ import annotations

import bisect
import datetime as dt
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from jobs.errors import GroupByError, ReportError, one_line
from manifests.ledger import (as_text, concat_parts, damaged_part, ledger_parts, not_a_part, read_parts,
                              size_differs)
from manifests.stores import UnreadableFile, folder_files, is_local_fs, url_to_fs

class SwapsRead(BaseModel):
    """run.json's `adapter_swaps` (jobs.recorder.Recorder.adapter_swaps), as SummaryRead reads it."""

    model_config = ConfigDict(extra="allow", strict=True)

    total: int | None = None
    seconds: float | None = None
    per_actor: dict[str, int] | None = None


class SummaryRead(BaseModel):
    """The fields of run.json the report, sheet and eval read, with the types `sdfleet generate` writes them in
    (jobs.generate.run): a run.json edited by hand is refused by field, in one line, before anything is shown.
    Fields a version before them did not write are absent (None); every other field passes unread."""

    model_config = ConfigDict(extra="allow", strict=True)

    run_id: str
    rows: int | None = None
    ok: int | None = None
    skipped: int | None = None
    failed: int | None = None
    invalid: int | None = None
    recovered: int | None = None
    restored: int | None = None
    relabelled: int | None = None
    not_in_manifests: int | None = None
    not_in_manifests_ids: list[str] | None = None
    ledger_parts: int | None = None
    wall_seconds: float | None = None
    images_per_second: float | None = None
    images_per_actor: dict[str, int] | None = None
    adapter_swaps: SwapsRead | None = None
    startup: dict[str, Any] | None = None  # (the report shows the stamps that are numbers)
    finished_at: str | None = None

    @field_validator("finished_at")
    @classmethod
    def _a_time(cls, value: str | None) -> str | None:
        if value is not None:
            dt.datetime.fromisoformat(value)  # its ValueError says what is wrong
        return value


def summary_problem(summary: dict) -> str | None:
    """Why run.json cannot be read as a run's summary (its first wrong field, named), or None."""
    try:
        SummaryRead.model_validate(summary)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        got = json.dumps(error["input"], default=str)
        got = got if len(got) <= 60 else got[:57] + "..."
        message = error["msg"][:1].lower() + error["msg"][1:]
        return f"field {where} is {got}: {message}" if error["type"] != "missing" else f"it has no {where}"
    return None


# Ledger columns that say how an entry was made, not what was asked for: never offered as groups.
BOOKKEEPING = ("status", "uri", "sha256", "png_bytes", "params_hash", "error", "warning", "watermark", "watermark_bits",
               "actor", "seconds", "finished_at", "source", "row", "passthrough_hash")


@dataclass
class RunOutput:
    uri: str
    fs: Any
    root: str
    summary: dict  # run.json: the newest finished run
    runs: list[dict]  # runs/*.json, oldest first (the newest is `summary`)
    current: pa.Table  # every row this output was ever asked for, as it stands now: each id's newest entry, by id
    history: pa.Table  # every ledger entry, in HISTORY columns, with "__run" (the run that wrote it) and "__at" (its
    # place in the order entries were written)
    unfinished: list[str] = field(default_factory=list)  # runs after `summary` that wrote rows but no run.json
    lost_parts: list[str] = field(default_factory=list)  # one line per run with fewer ledger parts than it wrote

    # A million-row catalogue's ledger, with its nights of history, stays in Arrow: only the rows a caller asks
    # for become Python dicts (`rows`), a page of a report at a time.

    @cached_property
    def images(self) -> dict[str, int | None]:
        """The file names under images/, each with its size where the store gives one (listed when first asked:
        a million of them take ~12 s)."""
        folder = f"{self.root}/images"
        if is_local_fs(self.fs):  # os.scandir: fsspec's detailed listing takes ~4x as long (a stat and a dict each)
            try:
                return {e.name: e.stat().st_size for e in os.scandir(folder) if e.is_file()}
            except FileNotFoundError:
                return {}
        listed = folder_files(self.fs, folder)
        return {path.rsplit("/", 1)[-1]: info.get("size") for path, info in listed.items()}

    def resized(self, row_id: str, recorded: int | None) -> str | None:
        """Why `row_id`'s PNG is not the one its ledger entry recorded, going by size alone, or None: a file cut
        short or replaced since (`generate` checks it again before it counts as done)."""
        size = self.images.get(f"{row_id}.png")
        if not size_differs(size, recorded):
            return None
        return (f"is {int(size):,} bytes, not the {recorded:,} the ledger recorded (damaged or replaced since it was "
                "drawn; the next generate reads it back, and draws it again unless it decodes whole)")

    @property
    def run_id(self) -> str:
        return self.summary["run_id"]

    @cached_property
    def columns(self) -> list[str]:
        """Ledger columns, pass-through columns of the manifests included."""
        return [c for c in self.current.column_names if not c.startswith("__")]

    @cached_property
    def ids(self) -> list[str]:
        """The ids of `current`, in its order (sorted)."""
        return self.current.column("id").to_pylist()

    def position(self, row_id: str) -> int | None:
        """Where `row_id` is in `current`, or None when the ledger never held it."""
        i = bisect.bisect_left(self.ids, row_id)  # Arrow sorts text by its UTF-8 bytes: code point order, as here
        return i if i < len(self.ids) and self.ids[i] == row_id else None

    def rows(self, positions: Sequence[int]) -> list[dict]:
        """The current entries at `positions`, as dicts."""
        return self.current.take(pa.array(positions, pa.int64())).to_pylist() if len(positions) else []

    @cached_property
    def dropped_problems(self) -> list[int]:
        """Positions in `current` of the rows whose newest entry is failed or invalid and older than the newest
        finished run. That run drew again every row its manifests asked for that was not ok, so none of them asks
        for these any more: a bad row dropped from the catalogue, no longer a problem of this output. Not where
        that run met rows whose id it could not read (recorded `invalid` without one: a damaged row group): one
        of those may be such a row, still asked for, so none is said to be dropped."""
        if self.unread_ids.num_rows:
            return []
        table = self.current
        older = pc.and_(pc.not_equal(table.column("status"), "ok"), pc.less(table.column("__run"), self.run_id))
        return np.flatnonzero(pc.fill_null(older, False).to_numpy(zero_copy_only=False)).tolist()

    def this_run(self) -> pa.Table:
        """The entries the newest finished run wrote (HISTORY columns), in the order they were written."""
        return self.history.filter(pc.equal(self.history.column("__run"), self.run_id)).sort_by("__at")

    @cached_property
    def unread_ids(self) -> pa.Table:
        """The entries the newest finished run wrote for rows whose id it could not read (`invalid`, no id)."""
        this_run = self.this_run()
        return this_run.filter(pc.is_null(this_run.column("id")))

    def status_before_this_run(self, ids: list[str]) -> dict[str, str]:
        """id -> the status of its newest entry written by a run earlier than the newest one, for `ids`."""
        table = self.history
        table = table.filter(pc.and_(pc.less(table.column("__run"), self.run_id),
                                     pc.is_in(table.column("id"), value_set=pa.array(ids, pa.string()))))
        newest = table.take(newest_per_id(table))
        return dict(zip(newest.column("id").to_pylist(), newest.column("status").to_pylist()))

    def image_path(self, row_id: str) -> str:
        return f"{self.root}/images/{row_id}.png"

    def has_image(self, entry: dict) -> bool:
        return f"{entry['id']}.png" in self.images

    @property
    def notes(self) -> list[str]:
        """What a reader of this output must be told before trusting what it shows: later runs that did not
        finish, and runs whose ledger parts are not all here (said by the report's page, `report` and `sheet`)."""
        return [unfinished_note(run) for run in self.unfinished] + self.lost_parts

    def group_columns(self) -> list[str]:
        return [c for c in self.columns if c not in BOOKKEEPING]

    def group_keys(self, column: str | None) -> list[str]:
        """The text each row of `current` is grouped under: `adapters` as `name@scale + ...`, a missing value (and
        an adapter set that loads nothing) as "(none)", lists and structs as JSON (as the ledger writes them where
        runs typed a column differently: one spelling for one value). Text that would read as blank or as
        "(none)" is shown quoted ("", " ", "(none)"), a group of its own: it merged with the missing values."""
        if column is None:
            return ["all rows"] * self.current.num_rows
        values = self.current.column(column).to_pylist()
        if column == "adapters":
            values = [adapters_text(v) or None for v in values]
        return [_group_key(v) for v in values]

    def groups(self, column: str | None) -> dict[str, list[int]]:
        """The positions in `current` of every row by its group key: groups in order ("(none)" last), ids in
        order within each."""
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(self.group_keys(column)):
            groups.setdefault(key, []).append(i)
        numeric = column is not None and (pa.types.is_integer(kind := self.current.column(column).type)
                                          or pa.types.is_floating(kind) or pa.types.is_decimal(kind))

        def order(key: str) -> tuple:  # numbers by value (2 before 10), NaN after them; text as text
            if key == "(none)" or not numeric:
                return key == "(none)", 0.0, key
            value = float(key)
            return False, value if value == value else math.inf, key

        return {key: groups[key] for key in sorted(groups, key=order)}

    def check_group_by(self, column: str | None, flag: str = "--group-by") -> None:
        if column is not None and column not in self.group_columns():
            raise GroupByError(f"{flag} {column!r}: {not_a_group(column, self.uri)}; group by one of "
                              f"{', '.join(self.group_columns())}")


# Where a run keeps its images and records under its --out, which a file of a tool's own (a contact sheet) must not
# take the place of (report/ and logs/ may hold one: they are views and notes).
RUN_FOLDERS = ("images", "results", "runs")


def run_file(out: str, path: str) -> str | None:
    """Why `path` is one of the run's own files at `out` (under images/, the ledger, ...), in words, or None."""
    out_fs, root = url_to_fs(out)
    fs, target = url_to_fs(path)
    if type(fs) is not type(out_fs):
        return None
    if is_local_fs(fs):
        root, target = os.path.realpath(root), os.path.realpath(target)
    root, target = root.rstrip("/"), target.rstrip("/")
    for folder in RUN_FOLDERS:
        if target.startswith(f"{root}/{folder}/"):
            return f"inside the run's {folder}/ folder, which holds the run's own files"
    return None


def _group_key(value) -> str:
    if value is None:
        return "(none)"
    text = as_text(value)
    return json.dumps(text, ensure_ascii=False) if not text.strip() or text == "(none)" else text


def not_a_group(column: str, where: str) -> str:
    """Why `column` cannot group rows: a bookkeeping column of the ledger, or none of its columns."""
    if column in BOOKKEEPING:
        return ("a column of how each entry was made (" + ", ".join(BOOKKEEPING) + "), which does not group "
                "rows (the report's Problems list the rows without an image)")
    return f"the ledger of {where} has no such column"


# The columns of `RunOutput.history`: what the report's What changed, Problems and rate chart read of past entries.
HISTORY = ("id", "status", "warning", "error", "actor", "finished_at", "source", "row")


def newest_per_id(table: pa.Table) -> pa.Array:
    """The indices in `table` (with an "__at" column: the order its entries were written) of each id's last entry;
    entries without an id are left out."""
    valid = pc.is_valid(table.column("id"))
    keyed = pa.table({"id": table.column("id"), "at": table.column("__at"),
                      "i": pa.array(np.arange(table.num_rows, dtype=np.int64))}).filter(valid)
    last = keyed.group_by("id", use_threads=False).aggregate([("at", "max")])
    # the row of each (id, newest at): `at` is unique, so a join on it finds exactly one
    found = last.join(keyed.select(["at", "i"]), keys="at_max", right_keys="at", use_threads=False)
    return found.column("i")


# How the `warning` of an `ok` entry the plan settled from an earlier run's image begins (jobs/plan.py).
RECOVERED_MARK = "recovered:"  # an image no ledger entry vouched for, read back (`recovered`)
RESTORED_MARK = "restored:"  # a row failed since its last ok entry, which still vouches for its image (`RESTORED`)
RELABELLED_MARK = "relabelled:"  # a done row whose pass-through columns changed, recorded again (`RELABELLED`)
AS_DRAWN = "; as drawn: "  # in such an entry's warning, before the warning its image was drawn with, if any


def is_recovered(entry: dict) -> bool:
    """An `ok` entry a run recorded for an image an earlier, killed run drew (see jobs/plan.py `recovered`)."""
    return (entry.get("warning") or "").startswith(RECOVERED_MARK)


def is_restored(entry: dict) -> bool:
    """An `ok` entry recorded again for a row failed since its last one (see jobs/plan.py `RESTORED`)."""
    return (entry.get("warning") or "").startswith(RESTORED_MARK)


def is_relabelled(entry: dict) -> bool:
    """An `ok` entry recorded again, undrawn, for a done row whose pass-through columns changed (jobs/plan.py)."""
    return (entry.get("warning") or "").startswith(RELABELLED_MARK)


def recorded_again(mark: str, warning: str | None) -> str:
    """The warning of an `ok` entry recorded again from an earlier one whose warning is `warning`: `mark`, then the
    warning the image was drawn with (a prompt cut short, a weak mark), which would be lost otherwise."""
    if warning and warning.startswith((RECOVERED_MARK, RESTORED_MARK, RELABELLED_MARK)):  # what it kept, if any
        warning = warning.split(AS_DRAWN, 1)[1] if AS_DRAWN in warning else None
    return f"{mark}{AS_DRAWN}{warning}" if warning else mark


def running(fs, root: str) -> dict | None:
    """The lease of the run writing to this output now (its heartbeat fresh), or None (jobs.lease)."""
    from jobs.lease import LEASE_FILE, STALE_SECONDS

    try:
        held = json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))
        fresh = time.time() - float(held.get("heartbeat", 0)) <= STALE_SECONDS
    except Exception:  # noqa: BLE001 - no lease, or none that reads: nothing says a run is going
        return None
    return held if fresh else None


def unfinished_note(run_id: str) -> str:
    return (f"run {run_id} wrote rows after this one and did not finish (killed, or still running): its rows are "
            "shown as far as it got; run the same `sdfleet generate` again to finish it")


def adapters_text(adapters: list[dict] | None) -> str:
    """A row's adapters as `name@scale + ...` ("" for none), by name and without scale-0 entries: a blend is
    the same in any order, and an entry at scale 0 loads nothing (params_hash and pixels agree), so the report
    and the sheet group each once."""
    return " + ".join(f"{a['name']}@{a['scale']:g}" for a in sorted(adapters or [], key=lambda a: a["name"])
                      if a["scale"] != 0)


def open_output(uri: str) -> RunOutput:
    """Read a run's output, or say in one line why it cannot be read (missing, or a run that did not finish)."""
    if not uri.strip():  # ("error:  holds no sdfleet run": the working directory, named by nothing)
        raise ReportError("no output was given (OUT is blank): give the --out of a `sdfleet generate` run")
    fs, root = url_to_fs(uri)
    root = root.rstrip("/") or root
    try:
        exists = fs.exists(root)
    except Exception as exc:  # noqa: BLE001 - a store that cannot be reached
        raise ReportError(f"cannot reach {uri}: {one_line(exc)}") from exc
    if not exists:
        raise ReportError(f"{uri} does not exist: give the --out of a `sdfleet generate` run")
    if fs.isfile(root):
        raise ReportError(f"{uri} is a file: give the --out folder of a `sdfleet generate` run")
    parts = ledger_parts(fs, root)  # path -> size, in name order
    try:
        summary = json.loads(fs.cat_file(f"{root}/run.json"))
    except FileNotFoundError:
        if parts and (live := running(fs, root)):
            raise ReportError(f"{uri} has {len(parts)} ledger parts but no run.json yet: its first run "
                              f"{live.get('run_id')} is still running (host {live.get('host')}, pid {live.get('pid')}, "
                              "its lease renewed within the minute); report on it once it finishes") from None
        if parts:
            raise ReportError(f"{uri} has {len(parts)} ledger parts but no run.json: its run did not finish (killed, "
                              "or still running); run the same `sdfleet generate` again to finish it") from None
        raise ReportError(f"{uri} holds no sdfleet run (no run.json, no ledger parts): give the --out of a "
                          "`sdfleet generate` run") from None
    except ValueError as exc:
        raise ReportError(f"{uri}/run.json is not valid JSON ({one_line(exc)}): a half-written or edited file; "
                          "run the same `sdfleet generate` again to rewrite it") from exc
    if not isinstance(summary, dict) or "run_id" not in summary:
        raise ReportError(f"{uri}/run.json has no run_id: not written by `sdfleet generate` (or by a version "
                          "before reports)")
    if problem := summary_problem(summary):
        fix = ("run the same `sdfleet generate` again to rewrite it" if isinstance(summary["run_id"], str) else
               "put back its copy from runs/ (the newest runs/<run id>.json): `sdfleet generate` refuses an --out "
               "whose run.json has no run_id")
        raise ReportError(f"{uri}/run.json cannot be read: {problem}; an edited file? {fix}")
    runs = []
    # one per run: a nightly output holds hundreds, fetched at once
    paths = sorted(folder_files(fs, f"{root}/runs", ".json"))
    for data in fs.cat_ranges(paths, None, None, on_error="return") if paths else []:
        try:
            found = None if isinstance(data, BaseException) else json.loads(data)  # unfetched: its error
            if isinstance(found, dict) and isinstance(found.get("run_id"), str):  # (its run_id and ledger_parts
                runs.append(found)  # are what is read of an older run, the second where it is a number)
        except ValueError:
            continue  # an older run's summary is only context; the newest is run.json
    if not runs or runs[-1].get("run_id") != summary["run_id"]:
        runs.append(summary)
    tables = []
    try:
        for path, table in read_parts(fs, parts):
            run = part_run(path)
            tables.append(table.append_column("__run", pa.array([run] * table.num_rows, pa.string())))
    except UnreadableFile as exc:
        if foreign := not_a_part(exc):
            raise ReportError(foreign) from exc
        if exc.damaged:
            raise ReportError(damaged_part(exc)) from exc
        raise ReportError(f"cannot read ledger part {exc.path} from the store ({one_line(exc.cause)}); try again "
                          "once it answers") from exc
    ledger = concat_parts(tables)
    del tables
    if "__run" not in ledger.column_names:  # no parts
        ledger = ledger.append_column("__run", pa.array([], pa.string()))
    # each entry's place in the order entries were written (a run's entries by finish time; the sort is stable)
    # (an entry without a finish time ties with an empty one, as it did when entries were sorted as dicts)
    when = pc.fill_null(ledger.column("finished_at"), "")
    order = pc.sort_indices(pa.table({"run": ledger.column("__run"), "when": when}),
                            [("run", "ascending"), ("when", "ascending")])
    at = np.empty(ledger.num_rows, np.int64)
    at[order.to_numpy()] = np.arange(ledger.num_rows)
    ledger = ledger.append_column("__at", pa.array(at))
    newest = newest_per_id(ledger)
    by_id = pc.sort_indices(ledger.column("id").take(newest))
    current = ledger.take(newest.take(by_id))  # one copy of the current rows, in id order
    history = ledger.select([*HISTORY, "__run", "__at"]).combine_chunks()  # copied: parts stay referenced otherwise
    del ledger, newest  # the rest of each entry (uri, hashes, pass-through columns) is only needed for current rows
    pa.default_memory_pool().release_unused()  # the parts as read (~2x the current rows at a million rows) go
    finished = {r.get("run_id") for r in runs}
    later = pc.unique(history.filter(pc.greater(history.column("__run"), summary["run_id"])).column("__run"))
    unfinished = sorted(run for run in later.to_pylist() if run not in finished)
    return RunOutput(uri=uri, fs=fs, root=root, summary=summary, runs=runs, current=current, history=history,
                     unfinished=unfinished, lost_parts=lost_parts(runs, parts))


def image_workers(fs) -> int:
    """Threads that read (and write) a run's images at once: on an object store each read is mostly waiting (a
    report of 2,376 images took 39 s on S3 with 4, against 4.5 s on a disk), on a disk Pillow's decoding is the
    work (it releases the GIL)."""
    cores = 2 * (os.cpu_count() or 1)
    return min(8, cores) if is_local_fs(fs) else max(16, cores)


def part_run(path: str) -> str:
    """The run that wrote the ledger part at `path` (`results/<run id>-<seq>.parquet`, manifests.ledger.write_part)."""
    return path.rsplit("/", 1)[-1].removesuffix(".parquet").rsplit("-", 1)[0]


def lost_parts(runs: list[dict], parts: dict[str, int | None]) -> list[str]:
    """A line for each finished run whose summary counts more ledger parts than results/ holds of it (a copy or
    sync that missed files, a part deleted): the rows only those parts recorded are not shown, and nothing else
    would say so. Not for a run a later one finished after: that run recorded again every row its manifests ask
    for (the repair the line asks for), and the line, said on every later report, had become a false alarm."""
    present = Counter(part_run(path) for path in parts)
    newest = max((r["run_id"] for r in runs if isinstance(r.get("run_id"), str)), default="")
    lines = []
    for summary in runs:
        wrote, run = summary.get("ledger_parts"), summary.get("run_id")
        if isinstance(wrote, int) and run == newest and present[run] < wrote:  # (no later run finished after it)
            lines.append(f"run {run} wrote {wrote} ledger part(s) and results/ holds {present[run]} of them: rows "
                         "that only those parts recorded are not shown (a copy or sync that missed files: copy the "
                         "output again, whole; a damaged part moved out of results/: a rerun of `sdfleet generate` "
                         "with the run's manifests records again the rows they ask for, and the rest stay unshown)")
    return lines
