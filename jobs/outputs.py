"""A `generate --out` read back: its runs, its ledger entry by entry with the run that wrote each, and every
row's current state. What `sdfleet report` and `sdfleet sheet` stand on.

The ledger is append-only (manifests.ledger): a row's current state is its newest entry, and a run's own
entries are the parts named after its run id (`results/<run_id>-<seq>.parquet`). Run ids start with their
start time, so sorting by (run id, finished_at) puts every entry in the order it was written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from jobs.errors import ReportError, one_line
from manifests.ledger import ledger_parts
from manifests.stores import UnreadableFile, folder_files, read_parquet_files, url_to_fs

# Ledger columns that say how an entry was made, not what was asked for: never offered as groups.
BOOKKEEPING = ("status", "uri", "sha256", "params_hash", "error", "warning", "watermark", "watermark_bits",
               "actor", "seconds", "finished_at", "source", "row")


@dataclass
class RunOutput:
    uri: str
    fs: Any
    root: str
    summary: dict  # run.json: the newest finished run
    runs: list[dict]  # runs/*.json, oldest first (the newest is `summary`)
    entries: list[dict]  # every ledger entry, oldest first, each with "_run": the run id that wrote it
    columns: list[str]  # ledger columns, pass-through columns of the manifests included
    images: set[str] = field(default_factory=set)  # file names under images/
    unfinished: list[str] = field(default_factory=list)  # runs after `summary` that wrote rows but no run.json

    @property
    def run_id(self) -> str:
        return self.summary["run_id"]

    def current(self) -> dict[str, dict]:
        """id -> its newest entry: every row this output has ever been asked for, as it stands now."""
        return {e["id"]: e for e in self.entries if e.get("id") is not None}

    def this_run(self) -> list[dict]:
        return [e for e in self.entries if e["_run"] == self.run_id]

    def before_this_run(self) -> dict[str, dict]:
        """id -> its newest entry written by an earlier run than the newest one."""
        return {e["id"]: e for e in self.entries if e["_run"] < self.run_id and e.get("id") is not None}

    def image_path(self, row_id: str) -> str:
        return f"{self.root}/images/{row_id}.png"

    def has_image(self, entry: dict) -> bool:
        return f"{entry['id']}.png" in self.images

    def group_columns(self) -> list[str]:
        return [c for c in self.columns if c not in BOOKKEEPING]

    def group_key(self, entry: dict, column: str | None) -> str:
        """The text an entry is grouped under: `adapters` as `name@scale + ...`, an empty value as "(none)"."""
        if column is None:
            return "all rows"
        value = adapters_text(entry.get(column)) if column == "adapters" else entry.get(column)
        return "(none)" if value in (None, "") else str(value)

    def groups(self, column: str | None) -> dict[str, list[dict]]:
        """Every row's current entry by `group_key`: groups in order ("(none)" last), ids in order within each."""
        current = self.current()
        groups: dict[str, list[dict]] = {}
        for row_id in sorted(current):
            groups.setdefault(self.group_key(current[row_id], column), []).append(current[row_id])
        return {key: groups[key] for key in sorted(groups, key=lambda k: (k == "(none)", k))}

    def check_group_by(self, column: str | None, flag: str = "--group-by") -> None:
        if column is not None and column not in self.group_columns():
            raise ReportError(f"{flag} {column!r}: the ledger of {self.uri} has no such column; group by one "
                              f"of {', '.join(self.group_columns())}")


def is_recovered(entry: dict) -> bool:
    """An `ok` entry a run recorded for an image an earlier, killed run drew (see jobs/plan.py `recovered`)."""
    return (entry.get("warning") or "").startswith("recovered:")


def unfinished_note(run_id: str) -> str:
    return (f"run {run_id} wrote rows after this one and did not finish (killed, or still running): its rows are "
            "shown as far as it got; run the same `sdfleet generate` again to finish it")


def adapters_text(adapters: list[dict] | None) -> str:
    """A row's adapters as `name@scale + ...` ("" for none)."""
    return " + ".join(f"{a['name']}@{a['scale']:g}" for a in adapters or [])


def open_output(uri: str) -> RunOutput:
    """Read a run's output, or say in one line why it cannot be read (missing, or a run that did not finish)."""
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
        if parts:
            raise ReportError(f"{uri} has {len(parts)} ledger parts but no run.json: its run did not finish (killed, "
                              "or still running); run the same `sdfleet generate` again to finish it") from None
        raise ReportError(f"{uri} holds no sdfleet run (no run.json, no results/): give the --out of a "
                          "`sdfleet generate` run") from None
    except ValueError as exc:
        raise ReportError(f"{uri}/run.json is not valid JSON ({one_line(exc)}): a half-written or edited file; "
                          "run the same `sdfleet generate` again to rewrite it") from exc
    if not isinstance(summary, dict) or "run_id" not in summary:
        raise ReportError(f"{uri}/run.json has no run_id: not written by `sdfleet generate` (or by a version "
                          "before reports)")
    runs = []
    paths = sorted(folder_files(fs, f"{root}/runs", ".json"))  # one per run: a nightly output holds hundreds, fetched at once
    for data in fs.cat_ranges(paths, None, None, on_error="return") if paths else []:
        try:
            found = None if isinstance(data, BaseException) else json.loads(data)  # unfetched: its error
            if isinstance(found, dict):
                runs.append(found)
        except ValueError:
            continue  # an older run's summary is only context; the newest is run.json
    if not runs or runs[-1].get("run_id") != summary["run_id"]:
        runs.append(summary)
    entries, columns = [], []
    try:
        for path, table in read_parquet_files(fs, list(parts), sizes=parts):
            run = path.rsplit("/", 1)[-1].removesuffix(".parquet").rsplit("-", 1)[0]
            columns += [c for c in table.column_names if c not in columns]
            entries += [{**e, "_run": run} for e in table.to_pylist()]
    except UnreadableFile as exc:
        if exc.damaged:  # parts are written whole, so this one was damaged afterwards
            raise ReportError(f"ledger part {exc.path} cannot be read ({one_line(exc.cause)}); move it aside and "
                              "rerun `sdfleet generate` to redraw its rows") from exc
        raise ReportError(f"cannot read ledger part {exc.path} from the store ({one_line(exc.cause)}); try again "
                          "once it answers") from exc
    entries.sort(key=lambda e: (e["_run"], e.get("finished_at") or ""))
    finished = {r.get("run_id") for r in runs}
    unfinished = sorted({e["_run"] for e in entries if e["_run"] > summary["run_id"] and e["_run"] not in finished})
    images = set()
    if fs.exists(f"{root}/images"):
        images = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/images", detail=False)}
    return RunOutput(uri=uri, fs=fs, root=root, summary=summary, runs=runs, entries=entries, columns=columns,
                     images=images, unfinished=unfinished)
