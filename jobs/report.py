"""`sdfleet report OUT`: a static HTML page of a run, for the people who use its images.

    OUT/report/index.html      the page: figures, what changed since the previous run, problems, images
    OUT/report/page-NNNN.html  the images, PAGE_ROWS to a page, when there are more rows than that (index.html
                               then lists the pages, the groups each holds, and links every problem to its page)
    OUT/report/thumbs/*.jpg    one small JPEG per image, named by the PNG's sha256 (a later report reuses it)
    OUT/report/thumbs/index.parquet   the prompt and size read from each PNG when its thumbnail was made
    OUT/report/pages.json      a digest of what each page is made of, so a later report renders and writes only
                               the pages whose rows changed

The page needs no server and no network: it opens from a laptop's disk or from a bucket served over HTTP,
and links to the full PNGs as `../images/<id>.png`. Thumbnails load lazily and groups fold, so a page of
5,000 rows opens at once (one of 10,000 was measured ready in 0.5 s); a nightly catalogue of a million rows
is 200 pages. A row's current state is its newest ledger entry (jobs.outputs); a row whose entry says `ok`
but whose PNG is gone is shown as missing, not as a broken image.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import html
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from actors.png import image_parameters
from jobs import outputs
from jobs.console import log
from jobs.errors import ReportError, one_line
from jobs.outputs import (RunOutput, adapters_text, image_workers, is_recovered, is_relabelled, newest_per_id,
                          open_output)
from manifests.ledger import LEDGER_COLUMNS, atomic_write, png_sizes
from manifests.stores import folder_files, is_local_fs, read_parquet
from manifests.text import NOT_AN_IMAGE

THUMB_SIDE = 192  # px, the longer side
THUMB_QUALITY = 82
OPEN_GROUPS = 12  # groups shown unfolded when the page opens (the rest fold; all of them with few groups)
PAGE_ROWS = 5_000  # tiles on one page (~4.5 MB of HTML); an output with more rows gets pages
PROBLEMS_SHOWN = 1_000  # rows listed under Problems; the count says how many more (the tiles show every one)
PROGRESS_SECONDS = 5.0


def build_report(uri: str, group_by: str | None = None, thumb: int = THUMB_SIDE, workers: int | None = None,
                 flag: str = "--group-by") -> dict:
    """Write OUT/report/ for the run at `uri`; returns what it wrote (path, rows, thumbnails made/reused, pages
    written and left as they were). `flag` is the option `group_by` came from, for the error that names it."""
    started = time.time()
    out = open_output(uri)
    out.check_group_by(group_by, flag)
    current, ids = out.current, out.ids
    statuses = current.column("status").to_pylist()
    names = [thumb_name(*key) for key in zip(current.column("sha256").to_pylist(),
                                                current.column("params_hash").to_pylist(), ids)]
    has_image = [f"{row_id}.png" in out.images for row_id in ids]
    recorded = png_sizes(current)
    resized = [out.resized(row_id, size) if status == "ok" and has else None  # not shown from an old thumbnail
               for row_id, size, status, has in zip(ids, recorded, statuses, has_image)]
    del recorded
    thumbs = Thumbnails(out, thumb)
    shown = [i for i, status in enumerate(statuses) if status == "ok" and has_image[i] and resized[i] is None]
    try:
        made = thumbs.make([(ids[i], names[i]) for i in shown], workers)
        thumbs.prune({names[i] for i in shown})
        thumbs.save()
    except ReportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a read-only store (served over HTTP), a full disk
        raise ReportError(f"cannot write {out.uri}/report/thumbs: {one_line(exc)}") from exc
    del shown
    rows, reused = Rows.of(out, statuses, names, has_image, thumbs.index, resized), thumbs.reused
    del names, has_image, thumbs, resized
    pa.default_memory_pool().release_unused()
    layout = Layout.of(out.groups(group_by), len(ids), group_by)
    pages = Pages(out)
    if layout.paged:
        last = time.time()
        for n in range(len(layout.pages)):
            pages.write(layout.files[n], lambda: render_page(out, rows, layout, n), rows.digest(layout, n))
            if time.time() - last >= PROGRESS_SECONDS:
                last = time.time()
                log(f"report: {n + 1}/{len(layout.pages)} pages ({pages.kept} unchanged)")
    pages.write("index.html", lambda: render(out, rows, layout))
    pages.save(set(layout.files))
    path = f"{out.root}/report/index.html"
    where = path if is_local_fs(out.fs) else out.fs.unstrip_protocol(path)
    return {"path": where, "rows": len(ids), "pages": len(layout.files), "pages_written": pages.written,
            "pages_unchanged": pages.kept, "thumbnails_made": made, "unfinished": out.unfinished,
            "notes": out.notes,
            "thumbnails_reused": reused,
            "missing": sum(1 for status, lack in zip(statuses, rows.lacks) if status == "ok" and lack),
            "seconds": round(time.time() - started, 2), "bytes": pages.bytes}


# Pages are rendered again when the code that renders them changes (what a page shows is its rows and this code).
RENDER_VERSION = hashlib.sha256(Path(__file__).read_bytes() + Path(outputs.__file__).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Rows:
    """The rows a report shows: the output's `current` table (in id order) with, for each row, its thumbnail's
    name (`__thumb`), whether its PNG is in the output (`__has_image`), and what the thumbnail index read from it
    (`__prompt`, `__negative_prompt`, `__thumb_width`, `__thumb_height`, `__thumb_error`). Rows become dicts only
    a page at a time."""

    uri: str  # the output as the report was asked for it (each page names it)
    table: pa.Table
    statuses: list[str]
    lacks: list[bool]  # no image to show: not ok, the PNG gone, or one that does not decode

    @classmethod
    def of(cls, out: RunOutput, statuses: list[str], names: list[str], has_image: list[bool],
           index: pa.Table, resized: list[str | None]) -> "Rows":
        """`statuses`, `names`, `has_image` and `resized` (RunOutput.resized) are per row of `out.current`, in its
        order."""
        at = pc.index_in(pa.array(names, pa.string()), value_set=index.column("name"))
        info = index.take(at)
        table = out.current.drop_columns(["__at"]).append_column("__thumb", pa.array(names, pa.string()))
        table = table.append_column("__has_image", pa.array(has_image, pa.bool_()))
        for column in ("prompt", "negative_prompt", "thumb_width", "thumb_height"):
            table = table.append_column(f"__{column}", info.column(column))
        # a row whose thumbnail the index lacks (its PNG gone since the listing) has none to show: say so
        error = pc.if_else(pc.is_valid(at), info.column("error"),
                           pa.scalar("could not be read when the thumbnails were made", pa.string()))
        error = pc.coalesce(pa.array(resized, pa.string()), error)
        table = table.append_column("__thumb_error", error)
        lacks = [status != "ok" or not has or error is not None
                 for status, has, error in zip(statuses, has_image, error.to_pylist())]
        return cls(out.uri, table, statuses, lacks)

    def take(self, positions: list[int]) -> list[dict]:
        return self.table.take(pa.array(positions, pa.int64())).to_pylist() if positions else []

    def digest(self, layout: "Layout", n: int) -> str:
        """What page `n` is made of (its rows as Arrow bytes, where they sit, the groups, the pages beside it, the
        output's name, this code): the same digest is the same page, so it need not be rendered again."""
        page = layout.pages[n]
        positions = [i for _, group, _ in page for i in group]
        sink = pa.BufferOutputStream()
        taken = self.table.take(pa.array(positions, pa.int64())).combine_chunks()
        with pa.ipc.new_stream(sink, taken.schema) as writer:
            writer.write_table(taken)
        h = hashlib.sha256(RENDER_VERSION.encode())
        h.update(sink.getvalue())
        h.update(np.asarray(positions, np.int64).tobytes())
        h.update(json.dumps([self.uri, layout.group_by, n, len(layout.pages), layout.files[n], layout.goes_on(n),
                             [(key, len(group), continued) for key, group, continued in page]]).encode())
        return h.hexdigest()


def paginate(groups: dict[str, list], size: int) -> list[list[tuple[str, list, bool]]]:
    """The groups laid out on pages of at most `size` rows, in order: each page a list of (group key, its rows
    on this page, whether the group began on an earlier page). A group larger than a page is cut."""
    pages, page, room = [], [], size
    for key, entries in groups.items():
        start = 0
        while start < len(entries):
            if room == 0:
                pages.append(page)
                page, room = [], size
            chunk = entries[start:start + room]
            page.append((key, chunk, start > 0))
            start += len(chunk)
            room -= len(chunk)
    return pages + [page] if page else pages


@dataclass(frozen=True)
class Layout:
    """Where every row's tile goes: the pages (as `paginate` lays them out, rows as their positions in the
    output's `current` table), their files, and the page each row is on. One page may be index.html itself.
    A row's tile is anchored `r<position>`, so Problems and What changed link to it."""

    group_by: str | None
    pages: list[list[tuple[str, list[int], bool]]]
    files: list[str]
    page_of: np.ndarray  # position -> page number

    @classmethod
    def of(cls, groups: dict[str, list[int]], rows: int, group_by: str | None) -> "Layout":
        pages = paginate(groups, PAGE_ROWS)
        files = [f"page-{n:04d}.html" for n in range(1, len(pages) + 1)] if len(pages) > 1 else ["index.html"]
        page_of = np.zeros(rows, np.int32)
        for n, page in enumerate(pages):
            for _, positions, _ in page:
                page_of[positions] = n
        return cls(group_by, pages, files, page_of)

    @property
    def paged(self) -> bool:
        return len(self.files) > 1

    def goes_on(self, n: int) -> bool:
        """Whether page `n`'s last group continues on the next page."""
        return n + 1 < len(self.pages) and bool(self.pages[n + 1]) and self.pages[n + 1][0][2]

    def link(self, position: int) -> str:
        return f"{self.files[self.page_of[position]] if self.paged else ''}#r{position}"


class Pages:
    """Writes the report's HTML files, leaving alone a page made of what it was made of last time: a nightly
    report of a million rows has 200 pages (~7 MB each), and most hold no row the night changed. report/pages.json
    keeps each page's digest (`Rows.digest`) and size; a page gone, or of another size, is written again."""

    def __init__(self, out: RunOutput):
        self.out = out
        self.folder = f"{out.root}/report"
        self.record_path = f"{self.folder}/pages.json"
        self.present = {p.rsplit("/", 1)[-1]: info.get("size") for p, info in folder_files(out.fs, self.folder,
                                                                                              ".html").items()}
        try:
            self.record = json.loads(out.fs.cat_file(self.record_path))
        except (FileNotFoundError, ValueError):
            self.record = {}
        if not isinstance(self.record, dict):
            self.record = {}
        self.written = self.kept = self.bytes = 0

    def write(self, name: str, render: Callable[[], str], digest: str | None = None) -> None:
        """Write the page `render` makes, unless `digest` says it is the page already there."""
        was = self.record.get(name)
        if digest is not None and isinstance(was, dict) and was.get("digest") == digest \
                and was.get("size") == self.present.get(name):
            self.kept += 1
            return
        data = render().encode()
        self._put(f"{self.folder}/{name}", data)
        self.record[name] = {"digest": digest, "size": len(data)}
        self.written += 1
        self.bytes += len(data)

    def save(self, keep: set[str]) -> None:
        """Remove the pages of an earlier, longer report, so none of them is left showing old rows, and record
        what each page written is made of."""
        for name in sorted(self.present):
            if name.startswith("page-") and name not in keep:
                self.out.fs.rm_file(f"{self.folder}/{name}")
        record = {name: was for name, was in self.record.items() if name in keep and name != "index.html"}
        self._put(self.record_path, json.dumps(record, sort_keys=True).encode())

    def _put(self, path: str, data: bytes) -> None:
        try:
            atomic_write(self.out.fs, path, data)
        except Exception as exc:  # noqa: BLE001 - a read-only or unreachable store
            raise ReportError(f"cannot write {self.out.fs.unstrip_protocol(path)}: {one_line(exc)}") from exc


# --- thumbnails -------------------------------------------------------------------------------------

def thumb_name(sha256: str | None, params_hash: str | None, row_id: str) -> str:
    """A thumbnail's file name: the PNG's sha256 from the ledger, so a redrawn image gets a new one."""
    return f"{(sha256 or params_hash or row_id)[:24]}.jpg"


INDEX_SCHEMA = pa.schema([("name", pa.string()), ("side", pa.int32()), ("prompt", pa.string()),
                          ("negative_prompt", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                          ("thumb_width", pa.int32()), ("thumb_height", pa.int32()), ("error", pa.string())])


def _fits(row: dict) -> bool:
    """Whether an index row migrated from index.json holds values of INDEX_SCHEMA's types."""
    try:
        pa.Table.from_pylist([row], INDEX_SCHEMA)
        return True
    except (pa.ArrowException, TypeError, ValueError):
        return False


class Thumbnails:
    """One JPEG per PNG, named by the PNG's sha256 from the ledger, so a report after a nightly run makes
    thumbnails only for the images that run drew. Prompts come from each PNG's parameters chunk (the ledger
    carries none) and are kept beside the thumbnails in thumbs/index.parquet (INDEX_SCHEMA): a million rows'
    prompts are ~40 MB there, read in 0.2 s as Arrow, where the JSON file reports wrote before was 208 MB and a
    million dicts. A thumbnail made at another side than the one asked for is made again."""

    def __init__(self, out: RunOutput, side: int):
        self.out, self.side = out, side
        self.folder = f"{out.root}/report/thumbs"
        self.path = f"{self.folder}/index.parquet"
        fs = out.fs
        listed = fs.ls(self.folder, detail=False) if fs.exists(self.folder) else []
        self.present: set[str] = {p.rstrip("/").rsplit("/", 1)[-1] for p in listed}  # file names in the folder
        self.added: list[dict] = []  # index rows of the thumbnails made
        self.removed: set[str] = set()  # thumbnails pruned
        self.reused = 0
        self.legacy = "index.json" in self.present  # the JSON file reports wrote before index.parquet
        index = INDEX_SCHEMA.empty_table()
        if "index.parquet" in self.present:
            try:
                index = read_parquet(fs, self.path).select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
            except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowTypeError):
                pass  # damaged, or not this version's: every thumbnail is made again and the index written anew
            except OSError as exc:  # the store did not answer: a million thumbnails are not made again for that
                where = self.path if is_local_fs(fs) else fs.unstrip_protocol(self.path)
                raise ReportError(f"cannot read {where} ({one_line(exc)}); try again once the store answers") from exc
        elif self.legacy:
            index = self._legacy()
        self.changed = self.legacy
        other_side = pc.fill_null(pc.not_equal(index.column("side"), side), True)  # no side: made again
        if pc.any(other_side).as_py():  # their rows go; their thumbnails are made again
            index, self.changed = index.filter(pc.invert(other_side)), True
        self._index = index

    def _legacy(self) -> pa.Table:
        try:
            found = json.loads(self.out.fs.cat_file(f"{self.folder}/index.json"))
        except (FileNotFoundError, ValueError):
            found = {}
        side = found.pop("_side", None) if isinstance(found, dict) else None
        rows = []
        for name, info in found.items() if isinstance(found, dict) else []:
            if not isinstance(info, dict) or not (info.get("thumb") or info.get("error")):
                continue  # not an entry a report wrote: its thumbnail is made again
            rows.append(self._row(name, info, side))
        try:
            return pa.Table.from_pylist(rows, INDEX_SCHEMA)
        except (pa.ArrowException, TypeError, ValueError):  # a value of another type (edited by hand)
            return pa.Table.from_pylist([row for row in rows if _fits(row)], INDEX_SCHEMA)  # the rest: made again

    @staticmethod
    def _row(name: str, info: Any, side: Any) -> dict:
        size, thumb = list(info.get("size") or (None, None)), list(info.get("thumb") or (None, None))
        size, thumb = size + [None] * (2 - len(size)), thumb + [None] * (2 - len(thumb))
        return {"name": name, "side": side, "prompt": info.get("prompt"),
                "negative_prompt": info.get("negative_prompt"), "width": size[0], "height": size[1],
                "thumb_width": thumb[0], "thumb_height": thumb[1], "error": info.get("error")}

    @cached_property
    def index(self) -> pa.Table:
        """The index as it stands after `make` and `prune` (asked for once they are done)."""
        gone = pa.array(sorted(self.removed | {row["name"] for row in self.added}), pa.string())
        kept = self._index.filter(pc.invert(pc.is_in(self._index.column("name"), value_set=gone)))
        return pa.concat_tables([kept, pa.Table.from_pylist(self.added, INDEX_SCHEMA)])

    def make(self, rows: list[tuple[str, str]], workers: int | None = None) -> int:
        """Make the thumbnails of (row id, thumbnail name) not made yet; returns how many it made."""
        names = pa.array([name for _, name in rows], pa.string())
        indexed = pc.is_in(names, value_set=self._index.column("name")).to_pylist()
        # a PNG that did not decode has an index row with its error and no JPEG: not read again every report
        failed = set(self._index.filter(pc.is_valid(self._index.column("error"))).column("name").to_pylist())
        have = self.present | failed
        todo = list({name: (row_id, name) for (row_id, name), known in zip(rows, indexed)  # rows may share a name
                     if not (known and name in have)}.values())
        self.reused = len(rows) - len(todo)
        if not todo:
            return 0
        log(f"report: making {len(todo)} thumbnails ({self.reused} reused)")
        self.out.fs.makedirs(self.folder, exist_ok=True)  # local disks need the folder; object stores ignore it
        done, made, last = 0, 0, time.time()
        # Pillow and the stores release the GIL while they decode, resize, encode and move bytes
        try:
            with ThreadPoolExecutor(max_workers=workers or image_workers(self.out.fs)) as pool:
                for row in pool.map(self._one, todo):
                    if row is not None:
                        self.added.append(row)
                        made += row["error"] is None  # a PNG that did not decode has its reason and no thumbnail
                    done += 1
                    if time.time() - last >= PROGRESS_SECONDS:
                        last = time.time()
                        log(f"report: {done}/{len(todo)} thumbnails")
        except BaseException:  # a store gone, Ctrl-C: what was made is indexed, for the next report to reuse
            if self.added:  # (it made every thumbnail again: the index is otherwise written at the end)
                self.changed = True
                with contextlib.suppress(Exception):
                    self.save()
            raise
        self.changed = True
        return made

    def prune(self, keep: set[str]) -> None:
        """Remove the thumbnails of images no row shows any more (redrawn since, or gone): those in the folder, and
        the index rows (a PNG that did not decode has one and no JPEG), that `keep` does not name."""
        for name in sorted(n for n in self.present if n.endswith(".jpg") and n not in keep):
            self.out.fs.rm_file(f"{self.folder}/{name}")
            self.removed.add(name)
        self.removed |= set(self._index.column("name").to_pylist()) - keep
        self.changed |= bool(self.removed)

    def save(self) -> None:
        """Write index.parquet when thumbnails were made or removed (and in place of an older report's
        index.json, which then goes)."""
        if not self.changed:
            return
        buf = io.BytesIO()
        pq.write_table(self.index, buf)
        atomic_write(self.out.fs, self.path, buf.getvalue())
        if self.legacy:
            self.out.fs.rm_file(f"{self.folder}/index.json")
        self.changed = False

    def _one(self, row: tuple[str, str]) -> dict | None:
        row_id, name = row
        try:
            data = self.out.fs.cat_file(self.out.image_path(row_id))
        except FileNotFoundError:
            return None  # deleted since the listing: shown as missing
        try:
            with Image.open(io.BytesIO(data)) as image:
                params = image_parameters(image)
                size = image.size
                image.thumbnail((self.side, self.side), Image.BILINEAR, reducing_gap=2.0)
                thumb = image.size
                buf = io.BytesIO()
                image.convert("RGB").save(buf, "JPEG", quality=THUMB_QUALITY)
        except UnidentifiedImageError:
            return self._row(name, {"error": f"cannot read the image: {NOT_AN_IMAGE}"}, self.side)
        except Exception as exc:  # noqa: BLE001 - a damaged PNG is shown with its reason, not a broken image
            return self._row(name, {"error": f"cannot read the image: {one_line(exc)}"}, self.side)
        self.out.fs.pipe_file(f"{self.folder}/{name}", buf.getvalue())  # a store that refuses stops the report
        return self._row(name, {"prompt": params.get("prompt"), "negative_prompt": params.get("negative_prompt"),
                                "size": size, "thumb": thumb}, self.side)


# --- what changed ---------------------------------------------------------------------------------

def changes(out: RunOutput) -> dict[str, list[str]]:
    """The ids of this run's rows by how they changed against their state before it: new, redrawn, fixed, now
    failing, still failing, and recovered (an earlier run drew it, read back). Rows this run skipped are unchanged
    and not listed. Last, rows with an image that no manifest of this run asked for (a product dropped, an id
    renamed), as far as run.json lists them, failed or invalid rows none asked for (RunOutput.dropped_problems:
    not the output's problems any more), and done rows recorded again, undrawn, because their manifest columns
    changed (relabelled); these three only where there are any."""
    now = out.this_run()
    now = now.take(newest_per_id(now)).sort_by("id")
    ids = now.column("id").to_pylist()
    before = out.status_before_this_run(ids)
    kinds: dict[str, list[str]] = {"new": [], "redrawn": [], "fixed": [], "now failing": [], "still failing": [],
                                   "recovered": []}
    listed = out.summary.get("not_in_manifests_ids") or []
    if listed or out.summary.get("not_in_manifests"):
        kinds["not asked for"] = [row_id for row_id in listed if out.position(row_id) is not None]
    if out.dropped_problems:
        kinds["dropped problems"] = [out.ids[i] for i in out.dropped_problems]
    for row_id, status, warning in zip(ids, now.column("status").to_pylist(), now.column("warning").to_pylist()):
        prev = before.get(row_id)
        if status == "ok" and is_recovered({"warning": warning}):  # an earlier run drew it; this one recorded it
            kind = "recovered"
        elif status == "ok" and is_relabelled({"warning": warning}):  # its image as it was; its columns new
            kinds.setdefault("relabelled", []).append(row_id)  # (listed only where there are any)
            continue
        elif status == "ok":
            kind = "new" if prev is None else "redrawn" if prev == "ok" else "fixed"
        else:
            kind = "still failing" if prev is not None and prev != "ok" else "now failing"
        kinds[kind].append(row_id)
    return kinds


# --- the page -------------------------------------------------------------------------------------

def render(out: RunOutput, rows: Rows, layout: Layout) -> str:
    """index.html: the images themselves when they fit one page, else the list of pages."""
    s = out.summary
    images = (_page_list(layout, rows.lacks, len(rows.lacks)) if layout.paged
              else _images(out, _entries(rows, layout.pages[0]) if layout.pages else [], layout.group_by,
                           len(rows.lacks)))
    parts = [_HEAD.replace("{title}", _e(f"sdfleet report: {out.uri}")),
             f"<header><h1>Run {_e(out.run_id)}</h1><p>{_e(out.uri)} · finished {_e(s.get('finished_at', '?'))} · "
             f"{_e(s.get('backend', '?'))} on {_e(s.get('device', '?'))} · batch {_e(s.get('batch_size', '?'))} · "
             f"report written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}</p>"
             + "".join(f"<p class=bad>{_e(note)}</p>" for note in out.notes) + "</header>",
             _figures(out), _changes(out, layout), _problems(out, rows, layout), images, _FOOT]
    return "\n".join(parts)


def render_page(out: RunOutput, rows: Rows, layout: Layout, n: int) -> str:
    """page-NNNN.html: one page of images, with the way to the pages beside it and back to the index. It names
    no run (the index does; each tile names the run that drew it), so a page whose rows did not change is the
    same bytes after the next run, and is not written again."""
    count, page = len(layout.pages), _entries(rows, layout.pages[n])

    def to(i: int, text: str) -> str:
        return f"<a href='{layout.files[i]}'>{text}</a>" if 0 <= i < count else f"<span>{text}</span>"

    nav = (f"<nav class=pages>{to(n - 1, '← previous')} · <a href='index.html'>index</a> · page {n + 1} of {count}"
           f" · {to(n + 1, 'next →')}</nav>")
    shown = sum(len(entries) for _, entries, _ in page)
    goes_on = layout.goes_on(n)
    return "\n".join([_HEAD.replace("{title}", _e(f"sdfleet report: {out.uri}, page {n + 1} of {count}")),
                      f"<header><h1>Images, page {n + 1} of {count}</h1><p>{_e(out.uri)} · the run, what changed "
                      "and the problems are on the <a href='index.html'>index</a></p></header>",
                      nav, _images(out, page, layout.group_by, shown, f" on page {n + 1}", goes_on=goes_on), nav,
                      _FOOT])


def _entries(rows: Rows, page: list[tuple[str, list[int], bool]]) -> list[tuple[str, list[dict], bool]]:
    """A page's groups with their rows (dicts, each with its "__position") in place of positions."""
    taken = iter(rows.take([i for _, positions, _ in page for i in positions]))
    return [(key, [{**next(taken), "__position": i} for i in positions], continued)
            for key, positions, continued in page]


def _lacks(e: dict) -> bool:
    return e["status"] != "ok" or not e["__has_image"] or e["__thumb_error"] is not None


def _figures(out: RunOutput) -> str:
    s = out.summary
    found = (s.get("recovered") or 0) + (s.get("restored") or 0)  # ok rows an earlier run drew
    drawn = s["ok"] - found if isinstance(s.get("ok"), int) else None
    stats = [("rows", s.get("rows")), ("drawn", drawn), ("skipped", s.get("skipped")),
             ("failed", s.get("failed")), ("invalid", s.get("invalid")), ("recovered", s.get("recovered")),
             *([("restored", s["restored"])] if s.get("restored") else []),
             *([("relabelled", s["relabelled"])] if s.get("relabelled") else []),
             ("images/s", s.get("images_per_second")), ("wall s", s.get("wall_seconds")),
             ("adapter swaps", (s.get("adapter_swaps") or {}).get("total")),
             ("swap s", (s.get("adapter_swaps") or {}).get("seconds"))]
    cells = "".join(f"<div class='stat {_e(k.split()[0].replace('/', ''))}'><b>{_e(_num(v))}</b><span>{_e(k)}"
                    f"</span></div>" for k, v in stats)
    startup = s.get("startup") or {}
    start_line = " · ".join(f"{_e(k.replace('_', ' '))} {v:.1f} s" for k, v in startup.items()
                            if isinstance(v, (int, float)))
    per_actor = s.get("images_per_actor") or {}
    swaps = (s.get("adapter_swaps") or {}).get("per_actor") or {}
    rows = "".join(f"<tr><td>{_e(a)}</td><td>{per_actor.get(a, 0)}</td><td>{swaps.get(a, 0)}</td></tr>"
                   for a in sorted(set(per_actor) | set(swaps)))
    table = (f"<table class=actors><tr><th>actor</th><th>images</th><th>adapter swaps</th></tr>{rows}</table>"
             if rows else "")
    return (f"<section id=figures><h2>Figures</h2><div class=stats>{cells}</div>"
            f"<p class=startup>start-up: {start_line or 'not recorded'}</p>{_rate_chart(out)}{table}</section>")


def _rate_chart(out: RunOutput, bars: int = 60) -> str:
    """Images per second over the run, from the finish times of the rows it drew, as an inline SVG."""
    s = out.summary
    drawn = out.this_run()
    columns = (drawn.column(c).to_pylist() for c in ("status", "actor", "finished_at"))
    stamps = [dt.datetime.fromisoformat(when).timestamp() for status, actor, when in zip(*columns)
              if status == "ok" and actor and when]
    if not stamps or not s.get("finished_at"):
        return "<p class=chart>images/s over time: nothing drawn in this run</p>"
    end = max(max(stamps), dt.datetime.fromisoformat(s["finished_at"]).timestamp())
    start = end - float(s.get("wall_seconds") or (end - min(stamps)))
    width = max(end - start, 1e-3)
    n = max(1, min(bars, math.ceil(width)))
    step = width / n
    counts = [0] * n
    for t in stamps:
        counts[min(n - 1, max(0, int((t - start) / step)))] += 1
    rates = [c / step for c in counts]
    top = max(rates) or 1.0
    w, h = 600, 120
    bar = w / n
    digits = 0 if step >= 10 else 1  # a slice of 1.2 s was titled "7-7 s"
    rects = "".join(f"<rect x='{i * bar:.1f}' y='{h - r / top * h:.1f}' width='{max(bar - 1, 1):.1f}' "
                    f"height='{r / top * h:.1f}'><title>{i * step:.{digits}f}-{(i + 1) * step:.{digits}f} s: "
                    f"{r:.2f} img/s"
                    f"</title></rect>" for i, r in enumerate(rates))
    return (f"<figure class=chart><figcaption>images/s over the run (peak {top:.2f}, {width:.0f} s)</figcaption>"
            f"<svg viewBox='0 0 {w} {h}' width='{w}' height='{h}' role=img aria-label='images per second'>{rects}"
            f"</svg></figure>")


CHANGE_LABELS = {"not asked for": "not asked for by this run's manifests (images kept)",  # others say themselves
                 "dropped problems": "failed or invalid before, and not asked for by this run's manifests (no longer "
                                     "problems; the ledger keeps their entries)",
                 "relabelled": "relabelled: their manifest columns changed, not what they draw (recorded again, not "
                               "drawn)"}


def _changes(out: RunOutput, layout: Layout) -> str:
    kinds = changes(out)
    previous = out.runs[-2]["run_id"] if len(out.runs) > 1 else None
    since = f"since run {_e(previous)}" if previous else "(the first run of this output)"
    items = []
    for kind, ids in kinds.items():
        linked = [(row_id, out.position(row_id)) for row_id in ids[:500]]
        shown = " ".join(f"<a href='{layout.link(at)}'>{_e(row_id)}</a>" for row_id, at in linked if at is not None)
        total = len(ids)
        if kind == "not asked for":  # run.json names the first of these rows and counts them all
            total = max(total, out.summary.get("not_in_manifests") or 0)
        more = f" … and {total - len(linked)} more" if total > len(linked) else ""
        opened = " open" if 0 < len(ids) <= 30 else ""
        items.append(f"<details class='change {kind.replace(' ', '-')}'{opened}>"
                     f"<summary>{total} {_e(CHANGE_LABELS.get(kind, kind))}</summary>"
                     f"<p>{shown}{more}</p></details>")
    return f"<section id=changes><h2>What changed {since}</h2>{''.join(items)}</section>"


def _problems(out: RunOutput, rows: Rows, layout: Layout) -> str:
    dropped = set(out.dropped_problems)  # listed under what changed instead
    bad = [i for i, status in enumerate(rows.statuses) if status != "ok" and i not in dropped]  # in id order
    missing = [i for i, (status, lack) in enumerate(zip(rows.statuses, rows.lacks)) if status == "ok" and lack]
    no_id = out.unread_ids
    total = len(bad) + len(missing) + no_id.num_rows
    if not total:
        said = "every row asked for has its image" if dropped else "every row has its image"
        return f"<section id=problems><h2>Problems</h2><p>none: {said}</p></section>"
    lines = [f"<li class={e['status']}><a href='{layout.link(i)}'>{_e(e['id'])}</a> <b>{e['status']}</b>: "
             f"{_e(e.get('error') or '')}</li>" for i, e in zip(bad, rows.take(bad[:PROBLEMS_SHOWN]))]
    shown = missing[:PROBLEMS_SHOWN - len(lines)]
    lines += [f"<li class=missing><a href='{layout.link(i)}'>{_e(e['id'])}</a> <b>missing</b>: the ledger says "
              f"ok, but images/{_e(e['id'])}.png " + (_e(e["__thumb_error"]) if e["__has_image"] else "is not there")
              + "</li>" for i, e in zip(shown, rows.take(shown))]
    lines += [f"<li class=invalid><b>invalid</b> ({_e(e.get('source'))} row {e.get('row')}): {_e(e.get('error'))}</li>"
              for e in no_id.slice(0, max(0, PROBLEMS_SHOWN - len(lines))).to_pylist()]
    more = (f"<p>… and {total - len(lines)} more; every row's tile shows its state, and the ledger (results/) "
            "holds each reason</p>" if total > len(lines) else "")
    return f"<section id=problems><h2>Problems ({total})</h2><ul>{''.join(lines)}</ul>{more}</section>"


def _label(group_by: str | None, key: str) -> str:
    return f"{_e(group_by)} = {_e(key)}" if group_by else _e(key)


def _page_list(layout: Layout, lacks: list[bool], rows: int) -> str:
    """The index of a report with pages: each page, the groups it holds and how many of its rows lack an image."""
    group_by, items = layout.group_by, []
    for page, name in zip(layout.pages, layout.files):
        count = sum(len(positions) for _, positions, _ in page)
        bad = sum(1 for _, positions, _ in page for i in positions if lacks[i])
        first, last = page[0], page[-1]
        span = _label(group_by, first[0]) + (f" … {_label(group_by, last[0])}" if len(page) > 1 else "")
        note = f", <span class=bad>{bad} without an image</span>" if bad else ""
        items.append(f"<li><a href='{name}'>{name}</a>: {span} ({_count(len(page), 'group')}, "
                     f"{_count(count, 'row')}{note})</li>")
    by = f" by {_e(group_by)}" if group_by else ""
    return (f"<section id=images><h2>Images{by} ({rows} rows on {len(layout.files)} pages of up to {PAGE_ROWS})</h2>"
            f"<ol class=pages>{''.join(items)}</ol></section>")


def _images(out: RunOutput, page: list[tuple[str, list[dict], bool]], group_by: str | None, rows: int,
            where: str = "", goes_on: bool = False) -> str:
    """The images of one page: (group key, entries, continued) sections of tiles; `goes_on`: its last group
    continues on the next page."""
    sections, columns = [], _shown_columns(out)
    for i, (key, entries, continued) in enumerate(page):
        bad = sum(1 for e in entries if _lacks(e))
        label = _label(group_by, key) + (" (continued)" if continued else "")
        label += " (continues on the next page)" if goes_on and i == len(page) - 1 else ""
        note = f", <span class=bad>{bad} without an image</span>" if bad else ""
        tiles = "".join(_tile(e, columns) for e in entries)
        opened = " open" if len(page) <= OPEN_GROUPS or i < OPEN_GROUPS else ""
        summary = f"{label} · {_count(len(entries), 'row')}{note}"
        sections.append(f"<details class=group{opened}><summary>{summary}</summary>"
                        f"<div class=grid>{tiles}</div></details>")
    by = f" by {_e(group_by)}" if group_by else ""
    return (f"<section id=images><h2>Images{by} ({_count(rows, 'row')}{where}, {_count(len(page), 'group')})</h2>"
            "<p class=tools>"
            "<button data-act=open>unfold all</button> <button data-act=close>fold all</button> "
            "<label><input type=checkbox id=only-problems> only rows without an image</label></p>"
            f"{''.join(sections)}</section>")


def _count(n: int, noun: str) -> str:
    """`1 row`, `2 rows`."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _for_script(value):
    """A value as the page's script reads it back: integers past 2**53 (a row's seed) as text, since JavaScript's
    numbers would round them, and NaN or infinity (not JSON) as text."""
    if value is None or isinstance(value, (str, bool)):  # most values: said first, a million tiles ask
        return value
    if isinstance(value, int) and abs(value) > 2**53:
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_for_script(v) for v in value]
    if isinstance(value, dict):
        return {k: _for_script(v) for k, v in value.items()}
    return value


# What a tile's pop-up names each row's parameters (ledger columns under their own names after these).
TILE_PARAMS = ("id", "status", "prompt", "negative prompt", "seed", "size", "steps", "guidance", "scheduler", "model",
               "adapters", "error", "warning", "actor", "seconds", "finished", "run")


def _shown_columns(out: RunOutput) -> list[tuple[str, str]]:
    """(label, column) of the manifest's own columns a pop-up shows after TILE_PARAMS: under their own names, or
    with " (manifest)" after a name TILE_PARAMS already uses (a manifest's `size` or `run`)."""
    return [(f"{c} (manifest)" if c in TILE_PARAMS else c, c) for c in out.group_columns() if c not in LEDGER_COLUMNS]


def _size(width: int | None, height: int | None) -> str | None:
    """`WxH`, or None where the entry records no size (an invalid row: what it asked was not read as a size)."""
    return f"{width}x{height}" if width is not None and height is not None else None


def _tile(e: dict, columns: list[tuple[str, str]]) -> str:
    """One row's tile: its thumbnail linking to the PNG, or the reason it has none; its parameters for the pop-up
    (TILE_PARAMS, then `columns`)."""
    ok = e["status"] == "ok"
    missing = None  # why an `ok` row has no image to show: the pop-up and the hover say `missing`, not `ok`
    if ok and (not e["__has_image"] or e["__thumb_error"] is not None):
        missing = e["__thumb_error"] if e["__has_image"] else f"images/{e['id']}.png is not in the output"
    status = "missing" if missing else e["status"]
    prompt = e["__prompt"] if ok else None
    adapters = adapters_text(e.get("adapters")) or "none"
    params = {"id": e["id"], "status": status, "prompt": prompt,
              "negative prompt": e["__negative_prompt"] if ok else None, "seed": e.get("seed"),
              "size": _size(e.get("width"), e.get("height")), "steps": e.get("steps"),
              "guidance": e.get("guidance_scale"), "scheduler": e.get("scheduler"), "model": e.get("model"),
              "adapters": adapters, "error": missing or e.get("error"), "warning": e.get("warning"),
              "actor": e.get("actor"), "seconds": e.get("seconds"), "finished": e.get("finished_at"),
              "run": e["__run"]}
    params.update({label: e.get(c) for label, c in columns})
    params = {k: _for_script(v) for k, v in params.items() if v not in (None, "")}
    hover = f"{e['id']}: {status}: {prompt}" if missing and prompt else f"{e['id']}: {prompt or status}"
    if e.get("seed") is not None:
        hover += f" (seed {e['seed']})"
    # (JSON escapes C0 itself; DEL and C1 as \u escapes, which the page's script reads back, not _e's \xNN)
    data = _e(json.dumps(params, ensure_ascii=False, default=str, allow_nan=False).translate(_JSON_CONTROLS))
    caption = f"<figcaption>{_e(e['id'])}</figcaption>"
    anchor = f"r{e['__position']}"
    if not ok:
        return (f"<figure class='tile {e['status']}' id={anchor} title='{_e(hover)}' data-p='{data}'><div class=reason>"
                f"<b>{e['status']}</b> {_e(e.get('error') or '')}</div>{caption}</figure>")
    if missing:
        return (f"<figure class='tile missing' id={anchor} title='{_e(hover)}' data-p='{data}'><div class=reason>"
                f"<b>missing</b> {_e(missing)}</div>{caption}</figure>")
    tw, th = e["__thumb_width"], e["__thumb_height"]
    return (f"<figure class='tile ok' id={anchor} title='{_e(hover)}' data-p='{data}'>"
            f"<a href='../images/{_e(e['id'])}.png'><img loading=lazy src='thumbs/{e['__thumb']}' width={tw} "
            f"height={th} alt='{_e(prompt or e['id'])}'></a>{caption}</figure>")


# Control characters (C0 but tab and line breaks, DEL, C1) are parse errors in HTML (a NUL made grep take the
# page for binary): shown as \xNN, as Python writes them
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x09), 0x0b, 0x0c, *range(0x0e, 0x20), *range(0x7f, 0xa0)]}


_JSON_CONTROLS = {c: f"\\u{c:04x}" for c in range(0x7f, 0xa0)}


def _e(value) -> str:
    return html.escape(str(value).translate(_CONTROLS), quote=True)


def _num(value) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


_HEAD = """<!doctype html>
<html lang=en><head><meta charset=utf-8><meta name=viewport content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5rem 3rem;color:#222;background:#fafafa}
h1{font-size:1.4rem;margin:1rem 0 .2rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}header p{color:#666;margin:0}
.stats{display:flex;flex-wrap:wrap;gap:.5rem}.stat{background:#fff;border:1px solid #ddd;border-radius:6px;
padding:.4rem .8rem;min-width:5.5rem}.stat b{display:block;font-size:1.3rem}.stat span{color:#666}
.stat.failed b,.stat.invalid b{color:#b00020}.chart svg{background:#fff;border:1px solid #ddd}
.chart rect{fill:#3a7bd5}table.actors{border-collapse:collapse;margin-top:.5rem;background:#fff}
table.actors td,table.actors th{border:1px solid #ddd;padding:.2rem .6rem;text-align:left}
details.group{background:#fff;border:1px solid #ddd;border-radius:6px;margin:.5rem 0;padding:.3rem .6rem}
details.group>summary{cursor:pointer;font-weight:600}.bad{color:#b00020}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:.6rem;margin:.5rem 0}
figure.tile{margin:0;background:#f3f3f3;border-radius:4px;overflow:hidden;cursor:pointer;min-height:120px}
figure.tile img{display:block;width:100%;height:auto;aspect-ratio:1/1;object-fit:contain;background:#eee}
figure.tile figcaption{font:12px monospace;padding:.2rem .4rem;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}
.tile .reason{padding:.6rem;min-height:100px;font-size:12px;word-break:break-word}
.tile.failed,.tile.invalid{background:#fde8ea}.tile.missing{background:#fff4d6}
#problems li.failed b,#problems li.invalid b{color:#b00020}#problems li.missing b{color:#9a6700}
body.only-problems figure.tile.ok{display:none}
dialog{max-width:48rem;border:1px solid #999;border-radius:8px}dialog table td{vertical-align:top;padding:.1rem .5rem}
dialog td:first-child{color:#666;white-space:nowrap}nav.pages{margin:.8rem 0}nav.pages span{color:#aaa}
</style></head><body>"""

_FOOT = """<dialog id=detail><form method=dialog><button>close</button></form><table id=detail-table></table>
<p id=detail-link></p></dialog>
<script>
document.querySelectorAll('button[data-act]').forEach(b => b.addEventListener('click', () =>
  document.querySelectorAll('details.group').forEach(d => d.open = b.dataset.act === 'open')));
document.getElementById('only-problems')?.addEventListener('change', ev =>
  document.body.classList.toggle('only-problems', ev.target.checked));
document.querySelector('#images .tools') && document.getElementById('images').addEventListener('click', ev => {
  const tile = ev.target.closest('figure.tile');
  if (!tile || ev.target.closest('a')) return;
  const p = JSON.parse(tile.dataset.p), table = document.getElementById('detail-table');
  table.replaceChildren(...Object.entries(p).map(([k, v]) => {
    const tr = document.createElement('tr');
    for (const text of [k, typeof v === 'object' ? JSON.stringify(v) : String(v)]) {
      const td = document.createElement('td'); td.textContent = text; tr.append(td);
    }
    return tr;
  }));
  const link = document.getElementById('detail-link');
  link.replaceChildren();
  if (p.status === 'ok') {
    const a = document.createElement('a'); a.href = '../images/' + encodeURIComponent(p.id) + '.png';
    a.textContent = 'full image'; link.append(a);
  }
  document.getElementById('detail').showModal();
});
// a link to a row (from Problems, What changed, or another page) unfolds the group that holds its tile:
// Chromium does so itself on fragment navigation, Safari did not
function reveal() {
  const tile = location.hash && document.getElementById(location.hash.slice(1));
  if (tile && tile.closest('details.group')) { tile.closest('details.group').open = true; tile.scrollIntoView(); }
}
window.addEventListener('hashchange', reveal);
reveal();
</script></body></html>"""
