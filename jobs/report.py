"""`sdfleet report OUT`: a static HTML page of a run, for the people who use its images.

    OUT/report/index.html      the page: figures, what changed since the previous run, problems, images
    OUT/report/page-NNNN.html  the images, PAGE_ROWS to a page, when there are more rows than that (index.html
                               then lists the pages, the groups each holds, and links every problem to its page)
    OUT/report/thumbs/*.jpg    one small JPEG per image, named by the PNG's sha256 (a later report reuses it)
    OUT/report/thumbs/index.json   the prompt and size read from each PNG when its thumbnail was made

The page needs no server and no network: it opens from a laptop's disk or from a bucket served over HTTP,
and links to the full PNGs as `../images/<id>.png`. Thumbnails load lazily and groups fold, so a page of
5,000 rows opens at once (one of 10,000 was measured ready in 0.5 s); a nightly catalogue of a million rows
is 200 pages. A row's current state is its newest ledger entry (jobs.outputs); a row whose entry says `ok`
but whose PNG is gone is shown as missing, not as a broken image.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from actors.png import image_parameters
from jobs.console import log
from jobs.errors import ReportError, one_line
from jobs.outputs import RunOutput, adapters_text, is_recovered, open_output, unfinished_note
from manifests.ledger import atomic_write
from manifests.stores import folder_files, is_local_fs

THUMB_SIDE = 192  # px, the longer side
THUMB_QUALITY = 82
OPEN_GROUPS = 12  # groups shown unfolded when the page opens (the rest fold; all of them with few groups)
PAGE_ROWS = 5_000  # tiles on one page (~4.5 MB of HTML); an output with more rows gets pages
PROBLEMS_SHOWN = 1_000  # rows listed under Problems; the count says how many more (the tiles show every one)
PROGRESS_SECONDS = 5.0


def build_report(uri: str, group_by: str | None = None, thumb: int = THUMB_SIDE, workers: int | None = None,
                 flag: str = "--group-by") -> dict:
    """Write OUT/report/ for the run at `uri`; returns what it wrote (path, rows, thumbnails made/reused).
    `flag` is the option `group_by` came from, for the error that names it."""
    started = time.time()
    out = open_output(uri)
    out.check_group_by(group_by, flag)
    current = out.current()
    thumbs = Thumbnails(out, thumb)
    shown = [e for e in current.values() if e["status"] == "ok" and out.has_image(e)]
    try:
        made = thumbs.make(shown, workers)
        thumbs.prune({thumbs.name(e) for e in shown})
        thumbs.save()
    except ReportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a read-only store (served over HTTP), a full disk
        raise ReportError(f"cannot write {out.uri}/report/thumbs: {one_line(exc)}") from exc
    layout = Layout.of(current, out.groups(group_by), group_by)
    written = 0
    if layout.paged:
        for n in range(len(layout.pages)):
            written += _write(out, layout.files[n], render_page(out, layout, n, thumbs))
    written += _write(out, "index.html", render(out, current, thumbs, layout))
    _prune_pages(out, set(layout.files))
    path = f"{out.root}/report/index.html"
    shown = path if is_local_fs(out.fs) else out.fs.unstrip_protocol(path)
    return {"path": shown, "rows": len(current), "pages": len(layout.files), "thumbnails_made": made,
            "unfinished": out.unfinished,
            "thumbnails_reused": thumbs.reused, "missing": sum(1 for e in current.values()
                                                              if e["status"] == "ok" and thumbs.lacks_image(e)),
            "seconds": round(time.time() - started, 2), "bytes": written}


def paginate(groups: dict[str, list[dict]], size: int) -> list[list[tuple[str, list[dict], bool]]]:
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
    """Where every row's tile goes: the pages (as `paginate` lays them out), their files, each row's anchor and
    the link to its tile from the index (Problems, What changed). One page is index.html itself."""

    group_by: str | None
    pages: list[list[tuple[str, list[dict], bool]]]
    files: list[str]
    anchors: dict[str, str]
    links: dict[str, str]

    @classmethod
    def of(cls, current: dict[str, dict], groups: dict[str, list[dict]], group_by: str | None) -> "Layout":
        pages = paginate(groups, PAGE_ROWS)
        files = [f"page-{n:04d}.html" for n in range(1, len(pages) + 1)] if len(pages) > 1 else ["index.html"]
        anchors = {row_id: f"r{i}" for i, row_id in enumerate(sorted(current))}
        links = {e["id"]: f"{files[n] if len(files) > 1 else ''}#{anchors[e['id']]}"
                 for n, page in enumerate(pages) for _, entries, _ in page for e in entries}
        return cls(group_by, pages, files, anchors, links)

    @property
    def paged(self) -> bool:
        return len(self.files) > 1


def _write(out: RunOutput, name: str, page: str) -> int:
    path, data = f"{out.root}/report/{name}", page.encode()
    try:
        atomic_write(out.fs, path, data)
    except Exception as exc:  # noqa: BLE001 - a read-only or unreachable store
        raise ReportError(f"cannot write {out.fs.unstrip_protocol(path)}: {one_line(exc)}") from exc
    return len(data)


def _prune_pages(out: RunOutput, keep: set[str]) -> None:
    """Remove the pages of an earlier, longer report, so none of them is left showing old rows."""
    for path in folder_files(out.fs, f"{out.root}/report", ".html"):
        if path.rsplit("/", 1)[-1].startswith("page-") and path.rsplit("/", 1)[-1] not in keep:
            out.fs.rm_file(path)


# --- thumbnails -------------------------------------------------------------------------------------

class Thumbnails:
    """One JPEG per PNG, named by the PNG's sha256 from the ledger, so a report after a nightly run makes
    thumbnails only for the images that run drew. Prompts come from each PNG's parameters chunk (the
    ledger carries none) and are kept in index.json beside the thumbnails."""

    def __init__(self, out: RunOutput, side: int):
        self.out, self.side = out, side
        self.folder = f"{out.root}/report/thumbs"
        self.index_path = f"{self.folder}/index.json"
        try:
            self.index = json.loads(out.fs.cat_file(self.index_path))
        except (FileNotFoundError, ValueError):
            self.index = {}
        if self.index.get("_side") != side:  # another size was asked for: make them all again
            self.index = {"_side": side}
        self.reused = 0
        self.present: set[str] = set()  # file names in the folder when `make` listed it
        self.changed = False  # whether index.json needs writing

    def name(self, entry: dict) -> str:
        return f"{(entry.get('sha256') or entry['params_hash'] or entry['id'])[:24]}.jpg"

    def info(self, entry: dict) -> dict:
        return self.index.get(self.name(entry), {})

    def lacks_image(self, entry: dict) -> bool:
        """Whether a row has no image to show: not ok, its file gone, or a file that does not decode."""
        if entry["status"] != "ok" or not self.out.has_image(entry):
            return True
        info = self.info(entry)
        return not info or "error" in info

    def make(self, entries: list[dict], workers: int | None = None) -> int:
        fs = self.out.fs
        if fs.exists(self.folder):
            self.present = {p.rsplit("/", 1)[-1] for p in fs.ls(self.folder, detail=False)}
        todo = [e for e in entries if not (self.name(e) in self.present and self.name(e) in self.index)]
        self.reused = len(entries) - len(todo)
        if not todo:
            return 0
        log(f"report: making {len(todo)} thumbnails ({self.reused} reused)")
        fs.makedirs(self.folder, exist_ok=True)  # local disks need the folder; object stores ignore it
        done, last = 0, time.time()
        # Pillow and the stores release the GIL while they decode, resize, encode and move bytes
        with ThreadPoolExecutor(max_workers=workers or min(8, 2 * (os.cpu_count() or 1))) as pool:
            for name, info in pool.map(self._one, todo):
                if info is not None:
                    self.index[name] = info
                done += 1
                if time.time() - last >= PROGRESS_SECONDS:
                    last = time.time()
                    log(f"report: {done}/{len(todo)} thumbnails")
        self.changed = True
        return len(todo)

    def prune(self, keep: set[str]) -> None:
        """Remove the thumbnails of images no row shows any more (redrawn since, or gone): those `make` found
        in the folder that `keep` does not name (every thumbnail it made is kept)."""
        for name in sorted(n for n in self.present if n.endswith(".jpg") and n not in keep):
            self.out.fs.rm_file(f"{self.folder}/{name}")
            self.index.pop(name, None)
            self.changed = True

    def save(self) -> None:
        """Write index.json when thumbnails were made or removed."""
        if self.changed:
            atomic_write(self.out.fs, self.index_path, json.dumps(self.index, ensure_ascii=False).encode())

    def _one(self, entry: dict) -> tuple[str, dict | None]:
        name = self.name(entry)
        try:
            data = self.out.fs.cat_file(self.out.image_path(entry["id"]))
        except FileNotFoundError:
            return name, None  # deleted since the listing: shown as missing
        try:
            with Image.open(io.BytesIO(data)) as image:
                params = image_parameters(image)
                size = image.size
                image.thumbnail((self.side, self.side), Image.BILINEAR, reducing_gap=2.0)
                thumb = image.size
                buf = io.BytesIO()
                image.convert("RGB").save(buf, "JPEG", quality=THUMB_QUALITY)
        except Exception as exc:  # noqa: BLE001 - a damaged PNG is shown with its reason, not a broken image
            return name, {"error": f"cannot read the image: {one_line(exc)}"}
        self.out.fs.pipe_file(f"{self.folder}/{name}", buf.getvalue())  # a store that refuses stops the report
        return name, {"prompt": params.get("prompt"), "negative_prompt": params.get("negative_prompt"),
                      "size": list(size), "thumb": list(thumb)}


# --- what changed ---------------------------------------------------------------------------------

def changes(out: RunOutput) -> dict[str, list[dict]]:
    """This run's rows against their state before it: new, redrawn, fixed, now failing, still failing, and
    recovered (an earlier, killed run drew it). Rows this run skipped are unchanged and not listed. Last, rows
    with an image that no manifest of this run asked for (a product dropped, an id renamed), as far as run.json
    lists them."""
    before = out.before_this_run()
    kinds: dict[str, list[dict]] = {"new": [], "redrawn": [], "fixed": [], "now failing": [], "still failing": [],
                                    "recovered": []}
    listed = out.summary.get("not_in_manifests_ids") or []
    if listed or out.summary.get("not_in_manifests"):
        current = out.current()
        kinds["not asked for"] = [current[i] for i in listed if i in current]
    now = {e["id"]: e for e in out.this_run() if e.get("id") is not None}
    for row_id in sorted(now):
        entry, prev = now[row_id], before.get(row_id)
        if entry["status"] == "ok" and is_recovered(entry):  # an earlier run drew it; this run only recorded it
            kind = "recovered"
        elif entry["status"] == "ok":
            kind = "new" if prev is None else "redrawn" if prev["status"] == "ok" else "fixed"
        else:
            kind = "still failing" if prev is not None and prev["status"] != "ok" else "now failing"
        kinds[kind].append(entry)
    return kinds


# --- the page -------------------------------------------------------------------------------------

def render(out: RunOutput, current: dict[str, dict], thumbs: Thumbnails, layout: Layout) -> str:
    """index.html: the images themselves when they fit one page, else the list of pages."""
    s = out.summary
    images = (_page_list(layout, thumbs, len(current)) if layout.paged
              else _images(out, layout.pages[0] if layout.pages else [], thumbs, layout, len(current)))
    parts = [_HEAD.replace("{title}", _e(f"sdfleet report: {out.uri}")),
             f"<header><h1>Run {_e(out.run_id)}</h1><p>{_e(out.uri)} · finished {_e(s.get('finished_at', '?'))} · "
             f"{_e(s.get('backend', '?'))} on {_e(s.get('device', '?'))} · batch {_e(s.get('batch_size', '?'))} · "
             f"report written {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}</p>"
             + "".join(f"<p class=bad>{_e(unfinished_note(run))}</p>" for run in out.unfinished) + "</header>",
             _figures(out), _changes(out, layout.links), _problems(out, current, thumbs, layout.links), images, _FOOT]
    return "\n".join(parts)


def render_page(out: RunOutput, layout: Layout, n: int, thumbs: Thumbnails) -> str:
    """page-NNNN.html: one page of images, with the way to the pages beside it and back to the index."""
    count, page = len(layout.pages), layout.pages[n]

    def to(i: int, text: str) -> str:
        return f"<a href='{layout.files[i]}'>{text}</a>" if 0 <= i < count else f"<span>{text}</span>"

    nav = (f"<nav class=pages>{to(n - 1, '← previous')} · <a href='index.html'>index</a> · page {n + 1} of {count}"
           f" · {to(n + 1, 'next →')}</nav>")
    rows = sum(len(entries) for _, entries, _ in page)
    return "\n".join([_HEAD.replace("{title}", _e(f"sdfleet report: {out.uri}, page {n + 1} of {count}")),
                      f"<header><h1>Run {_e(out.run_id)}, page {n + 1} of {count}</h1><p>{_e(out.uri)}</p></header>",
                      nav, _images(out, page, thumbs, layout, rows, f" on page {n + 1}"), nav, _FOOT])


def _figures(out: RunOutput) -> str:
    s = out.summary
    drawn = s["ok"] - (s.get("recovered") or 0) if isinstance(s.get("ok"), int) else None  # ok counts recovered
    stats = [("rows", s.get("rows")), ("drawn", drawn), ("skipped", s.get("skipped")),
             ("failed", s.get("failed")), ("invalid", s.get("invalid")), ("recovered", s.get("recovered")),
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
    stamps = [dt.datetime.fromisoformat(e["finished_at"]).timestamp() for e in out.this_run()
              if e["status"] == "ok" and e.get("actor") and e.get("finished_at")]
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
    rects = "".join(f"<rect x='{i * bar:.1f}' y='{h - r / top * h:.1f}' width='{max(bar - 1, 1):.1f}' "
                    f"height='{r / top * h:.1f}'><title>{i * step:.0f}-{(i + 1) * step:.0f} s: {r:.2f} img/s"
                    f"</title></rect>" for i, r in enumerate(rates))
    return (f"<figure class=chart><figcaption>images/s over the run (peak {top:.2f}, {width:.0f} s)</figcaption>"
            f"<svg viewBox='0 0 {w} {h}' width='{w}' height='{h}' role=img aria-label='images per second'>{rects}"
            f"</svg></figure>")


CHANGE_LABELS = {"not asked for": "not asked for by this run's manifests (images kept)"}  # others say themselves


def _changes(out: RunOutput, links: dict[str, str]) -> str:
    kinds = changes(out)
    previous = out.runs[-2]["run_id"] if len(out.runs) > 1 else None
    since = f"since run {_e(previous)}" if previous else "(the first run of this output)"
    items = []
    for kind, entries in kinds.items():
        shown = " ".join(f"<a href='{links[e['id']]}'>{_e(e['id'])}</a>"
                         for e in entries[:500] if e["id"] in links)
        total, linked = len(entries), min(len(entries), 500)
        if kind == "not asked for":  # run.json names the first of these rows and counts them all
            total = max(total, out.summary.get("not_in_manifests") or 0)
        more = f" … and {total - linked} more" if total > linked else ""
        opened = " open" if 0 < len(entries) <= 30 else ""
        items.append(f"<details class='change {kind.replace(' ', '-')}'{opened}>"
                     f"<summary>{total} {_e(CHANGE_LABELS.get(kind, kind))}</summary>"
                     f"<p>{shown}{more}</p></details>")
    return f"<section id=changes><h2>What changed {since}</h2>{''.join(items)}</section>"


def _problems(out: RunOutput, current: dict[str, dict], thumbs: Thumbnails, links: dict[str, str]) -> str:
    bad = [e for e in current.values() if e["status"] != "ok"]
    missing = [e for e in current.values() if e["status"] == "ok" and thumbs.lacks_image(e)]
    invalid_without_id = [e for e in out.this_run() if e.get("id") is None]
    total = len(bad) + len(missing) + len(invalid_without_id)
    if not total:
        return "<section id=problems><h2>Problems</h2><p>none: every row has its image</p></section>"
    lines = [f"<li class={e['status']}><a href='{links[e['id']]}'>{_e(e['id'])}</a> <b>{e['status']}</b>: "
             f"{_e(e.get('error') or '')}</li>" for e in sorted(bad, key=lambda e: e["id"])[:PROBLEMS_SHOWN]]
    lines += [f"<li class=missing><a href='{links[e['id']]}'>{_e(e['id'])}</a> <b>missing</b>: the ledger says "
              f"ok, but images/{_e(e['id'])}.png "
              + (_e(thumbs.info(e)["error"]) if out.has_image(e) and "error" in thumbs.info(e) else "is not there")
              + "</li>" for e in sorted(missing, key=lambda e: e["id"])[:PROBLEMS_SHOWN - len(lines)]]
    lines += [f"<li class=invalid><b>invalid</b> ({_e(e.get('source'))} row {e.get('row')}): {_e(e.get('error'))}</li>"
              for e in invalid_without_id[:PROBLEMS_SHOWN - len(lines)]]
    more = (f"<p>… and {total - len(lines)} more; every row's tile shows its state, and the ledger (results/) "
            "holds each reason</p>" if total > len(lines) else "")
    return f"<section id=problems><h2>Problems ({total})</h2><ul>{''.join(lines)}</ul>{more}</section>"


def _label(group_by: str | None, key: str) -> str:
    return f"{_e(group_by)} = {_e(key)}" if group_by else _e(key)


def _page_list(layout: Layout, thumbs: Thumbnails, rows: int) -> str:
    """The index of a report with pages: each page, the groups it holds and how many of its rows lack an image."""
    group_by, items = layout.group_by, []
    for page, name in zip(layout.pages, layout.files):
        count = sum(len(entries) for _, entries, _ in page)
        bad = sum(1 for _, entries, _ in page for e in entries if thumbs.lacks_image(e))
        first, last = page[0], page[-1]
        span = _label(group_by, first[0]) + (f" … {_label(group_by, last[0])}" if len(page) > 1 else "")
        note = f", <span class=bad>{bad} without an image</span>" if bad else ""
        items.append(f"<li><a href='{name}'>{name}</a>: {span} ({len(page)} groups, {count} rows{note})</li>")
    by = f" by {_e(group_by)}" if group_by else ""
    return (f"<section id=images><h2>Images{by} ({rows} rows on {len(layout.files)} pages of up to {PAGE_ROWS})</h2>"
            f"<ol class=pages>{''.join(items)}</ol></section>")


def _images(out: RunOutput, page: list, thumbs: Thumbnails, layout: Layout, rows: int, where: str = "") -> str:
    """The images of one page: (group key, rows, continued) sections of tiles."""
    group_by, sections = layout.group_by, []
    for i, (key, entries, continued) in enumerate(page):
        bad = sum(1 for e in entries if thumbs.lacks_image(e))
        label = _label(group_by, key) + (" (continued)" if continued else "")
        note = f", <span class=bad>{bad} without an image</span>" if bad else ""
        tiles = "".join(_tile(out, e, thumbs, layout.anchors[e["id"]]) for e in entries)
        opened = " open" if len(page) <= OPEN_GROUPS or i < OPEN_GROUPS else ""
        sections.append(f"<details class=group{opened}><summary>{label} · {len(entries)} rows{note}</summary>"
                        f"<div class=grid>{tiles}</div></details>")
    by = f" by {_e(group_by)}" if group_by else ""
    return (f"<section id=images><h2>Images{by} ({rows} rows{where}, {len(page)} groups)</h2><p class=tools>"
            "<button data-act=open>unfold all</button> <button data-act=close>fold all</button> "
            "<label><input type=checkbox id=only-problems> only rows without an image</label></p>"
            f"{''.join(sections)}</section>")


def _for_script(value):
    """A value as the page's script reads it back: integers past 2**53 (a row's seed) as text, since JavaScript's
    numbers would round them, and NaN or infinity (not JSON) as text."""
    if isinstance(value, bool):
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


def _tile(out: RunOutput, e: dict, thumbs: Thumbnails, anchor: str) -> str:
    info = thumbs.info(e) if e["status"] == "ok" else {}
    adapters = adapters_text(e.get("adapters")) or "none"
    params = {"id": e["id"], "status": e["status"], "prompt": info.get("prompt"),
              "negative prompt": info.get("negative_prompt"), "seed": e.get("seed"),
              "size": f"{e.get('width')}x{e.get('height')}", "steps": e.get("steps"),
              "guidance": e.get("guidance_scale"), "scheduler": e.get("scheduler"), "model": e.get("model"),
              "adapters": adapters, "error": e.get("error"), "warning": e.get("warning"),
              "actor": e.get("actor"), "seconds": e.get("seconds"), "finished": e.get("finished_at"),
              "run": e["_run"]}
    params.update({c: e.get(c) for c in out.group_columns() if c not in params and c not in (
        "width", "height", "guidance_scale", "negative_prompt")})
    params = {k: _for_script(v) for k, v in params.items() if v not in (None, "")}
    hover = f"{e['id']}: {info.get('prompt') or e['status']} (seed {e.get('seed')})"
    data = _e(json.dumps(params, ensure_ascii=False, default=str, allow_nan=False))
    caption = f"<figcaption>{_e(e['id'])}</figcaption>"
    if e["status"] != "ok":
        return (f"<figure class='tile {e['status']}' id={anchor} title='{_e(hover)}' data-p='{data}'><div class=reason>"
                f"<b>{e['status']}</b> {_e(e.get('error') or '')}</div>{caption}</figure>")
    if not out.has_image(e) or info.get("error") or not info:
        reason = info.get("error") or f"images/{e['id']}.png is not in the output"
        return (f"<figure class='tile missing' id={anchor} title='{_e(hover)}' data-p='{data}'><div class=reason>"
                f"<b>missing</b> {_e(reason)}</div>{caption}</figure>")
    tw, th = info.get("thumb") or (thumbs.side, thumbs.side)
    return (f"<figure class='tile ok' id={anchor} title='{_e(hover)}' data-p='{data}'>"
            f"<a href='../images/{_e(e['id'])}.png'><img loading=lazy src='thumbs/{thumbs.name(e)}' width={tw} "
            f"height={th} alt='{_e(info.get('prompt') or e['id'])}'></a>{caption}</figure>")


def _e(value) -> str:
    return html.escape(str(value), quote=True)


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
