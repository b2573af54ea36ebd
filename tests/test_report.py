"""`sdfleet report` and `sdfleet sheet`: what a catalogue team sees of a run, read back from its output.

The outputs here are written the way `generate` writes them (ledger parts named by run, runs/*.json,
run.json, PNGs with their parameters chunk), by hand and without Ray, so each case is exact: two runs
over one --out, with a row redrawn, one new, one fixed, one now failing, an invalid row and a PNG deleted.
The browser test opens the page in Debian's chromium (headless, from disk, no network).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.png import png_bytes
import jobs.report
from jobs.cli import main
from jobs.errors import ReportError
from jobs.outputs import open_output
from jobs.report import build_report, changes
from jobs.sheet import contact_sheet
from manifests.ledger import ledger_row, write_part

COLOURS = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200), "d": (200, 200, 30), "e": (30, 200, 200)}


def _row(row_id: str, sku: str, n: int, adapters=()) -> dict:
    return {"id": row_id, "params_hash": f"h-{row_id}-{n}", "seed": n, "model": "default", "width": 64,
            "height": 64, "steps": 2, "guidance_scale": 7.5, "scheduler": "ddim", "watermark": None,
            "source": "m.parquet", "row": n, "extra": json.dumps({"sku": sku}), "error": None, "warning": None,
            "adapters": [{"name": a, "scale": 0.8} for a in adapters]}


def _draw(out: Path, row_id: str, colour, prompt: str) -> dict:
    rgb = np.zeros((64, 64, 3), np.uint8) + np.array(colour, np.uint8)
    data = png_bytes(rgb, {"id": row_id, "prompt": prompt, "negative_prompt": "blurry"})
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "images" / f"{row_id}.png").write_bytes(data)
    return {"uri": str(out / "images" / f"{row_id}.png"), "sha256": hashlib.sha256(data).hexdigest(),
            "png_bytes": len(data)}


def _damage_in_place(path: Path) -> None:
    """Zeros over the pixels (all after the first IDAT chunk's name): the file no longer decodes, and keeps its
    size (which the ledger records: a file cut short is told by that, without being opened)."""
    data = path.read_bytes()
    pixels = data.index(b"IDAT") + 4
    path.write_bytes(data[:pixels] + bytes(len(data) - pixels))


def _run(out: Path, run_id: str, entries: list[dict], counts: dict) -> None:
    write_part(fsspec.filesystem("file"), str(out), run_id, 0, entries)
    summary = {"run_id": run_id, "rows": len(entries), **counts, "wall_seconds": 10.0, "images_per_second": 0.5,
               "actors": 1, "images_per_actor": {"host:1": counts["ok"]}, "recovered": 0,
               "adapter_swaps": {"total": 2, "per_actor": {"host:1": 2}, "seconds": 0.01},
               "startup": {"ray_connected": 1.5, "first_image_written": 6.0}, "batch_size": 4, "backend": "eager",
               "device": "cpu", "finished_at": entries[-1]["finished_at"], "ledger_parts": 1}
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{run_id}.json").write_text(json.dumps(summary))
    (out / "run.json").write_text(json.dumps(summary))


def make_output(out: Path) -> Path:
    """Run 1 draws a, b, c; d fails. Run 2 redraws a (blue now), fixes d, draws e new, c now fails, f is
    invalid; then b's PNG is deleted by hand."""
    run1 = [ledger_row(_row(i, "sku-1" if i in "ab" else "sku-2", n), "ok", actor="host:1", seconds=0.5,
                       **_draw(out, i, COLOURS[i], f"a photo of {i} <b>bold</b>"))
            for n, i in enumerate("abc")]
    run1.append(ledger_row(_row("d", "sku-2", 3, adapters=["gone"]), "failed",
                           error="m.parquet row 3 (`d`): adapter 'gone' is not in the store"))
    _run(out, "20261201T000000-aaaaaa", run1, {"ok": 3, "skipped": 0, "failed": 1, "invalid": 0})
    run2 = [ledger_row(_row("a", "sku-1", 0), "ok", actor="host:1", seconds=0.5,
                       **_draw(out, "a", (0, 0, 255), "a photo of a, again")),
            ledger_row(_row("d", "sku-2", 3, adapters=["style"]), "ok", actor="host:1", seconds=0.5,
                       **_draw(out, "d", COLOURS["d"], "a photo of d")),
            ledger_row(_row("e", "sku-3", 4), "ok", actor="host:1", seconds=0.5,
                       **_draw(out, "e", COLOURS["e"], "a photo of e")),
            ledger_row(_row("c", "sku-2", 2), "failed", actor="host:1",
                       error="m.parquet row 2 (`c`): RuntimeError: CUDA out of memory"),
            ledger_row({**_row("f", "sku-3", 5), "seed": None, "width": None, "height": None}, "invalid",
                       error="m.parquet row 5 (`f`): `scheduler`: 'nope' is not one of ddim, euler")]
    _run(out, "20261202T000000-bbbbbb", run2, {"ok": 3, "skipped": 1, "failed": 1, "invalid": 1})
    (out / "images" / "b.png").unlink()
    return out


@pytest.fixture
def output(tmp_path) -> Path:
    return make_output(tmp_path / "out")


def _tiles(page: str) -> dict[str, str]:
    """row id -> the class of its tile."""
    return {m.group(2): m.group(1) for m in re.finditer(
        r"<figure class='tile (\w+)'.*?<figcaption>([^<]*)</figcaption>", page)}


def test_report_shows_each_row_as_it_stands_with_reasons_and_missing_images(output):
    done = build_report(str(output), group_by="sku")
    page = (output / "report" / "index.html").read_text()
    assert done["rows"] == 6 and done["missing"] == 1 and done["thumbnails_made"] == 3
    assert _tiles(page) == {"a": "ok", "b": "missing", "c": "failed", "d": "ok", "e": "ok", "f": "invalid"}
    assert "CUDA out of memory" in page and "&#x27;nope&#x27; is not one of ddim" in page
    assert "images/b.png is not in the output" in page
    # the missing tile's hover and pop-up say so too: its pop-up said `ok` and linked the full PNG that is gone
    tile = html.unescape(re.search(r"title='(b: [^']*)' data-p='([^']*)'", page).group(2))
    assert json.loads(tile)["status"] == "missing", tile
    assert "images/b.png is not in the output" in json.loads(tile)["error"]
    assert re.search(r"title='b: missing[^']*'", page), re.search(r"title='b: [^']*'", page).group(0)
    # thumbnails are files beside the page, never the PNGs inlined; the page reaches nothing outside OUT
    thumbs = sorted(p.name for p in (output / "report" / "thumbs").glob("*.jpg"))
    assert len(thumbs) == 3 and all(f"thumbs/{t}" in page for t in thumbs)
    assert "data:image" not in page and not re.search(r"(src|href)=['\"]?(https?:)?//", page)
    with Image.open(output / "report" / "thumbs" / thumbs[0]) as im:
        assert max(im.size) <= 192
    # groups by the manifest's sku column, in order; the prompt comes from the PNG, escaped
    assert re.findall(r"<summary>sku = (sku-\d)", page) == ["sku-1", "sku-2", "sku-3"]
    assert "a photo of a, again" in page and "<b>bold</b>" not in page
    # the rate chart's bars over 10 s name their slice to a tenth of a second (1.2 s slices read "7-7 s")
    assert re.findall(r"<title>([\d.]+-[\d.]+ s):", page)[:2] == ["0.0-1.0 s", "1.0-2.0 s"]


def test_a_damaged_image_is_a_problem_and_the_pop_up_keeps_every_digit_of_the_seed(output):
    _damage_in_place(output / "images" / "e.png")
    seed = 5397352375133113116  # a default seed: 63 bits, past what a JavaScript number holds exactly
    part = next((output / "results").glob("20261202*.parquet"))
    table = pq.read_table(part)
    seeds = [seed if i == "d" else s for i, s in zip(table.column("id").to_pylist(), table.column("seed").to_pylist())]
    pq.write_table(table.set_column(table.schema.get_field_index("seed"), "seed", pa.array(seeds, pa.int64())), part)
    done = build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert done["missing"] == 2 and _tiles(page)["e"] == "missing"
    problems = page[page.index("<section id=problems>"):page.index("</section>", page.index("<section id=problems>"))]
    assert "<b>missing</b>: the ledger says ok, but images/e.png cannot read the image" in problems, problems
    assert f"&quot;seed&quot;: &quot;{seed}&quot;" in page  # text in the pop-up's JSON, not a rounded number


def test_a_damaged_image_is_read_once_and_its_index_row_goes_when_it_is_redrawn(output):
    _damage_in_place(output / "images" / "e.png")
    thumbs = output / "report" / "thumbs"
    assert build_report(str(output))["thumbnails_made"] == 2  # a and d: e's PNG was read, and made none
    stamp = (thumbs / "index.parquet").stat().st_mtime_ns
    again = build_report(str(output))  # the damaged PNG is not read again, nor the index written again
    assert (again["thumbnails_made"], again["missing"]) == (0, 2)
    assert (thumbs / "index.parquet").stat().st_mtime_ns == stamp
    (damaged,) = [name for name, row in _index(thumbs).items() if row["error"]]
    _redraw(output, "e", "20261203T000000-cccccc")
    assert build_report(str(output))["thumbnails_made"] == 1 and damaged not in _index(thumbs)


def test_an_image_written_over_with_other_bytes_is_said_in_words(output):
    """The problem read 'cannot identify image file <_io.BytesIO object at 0x...>'."""
    e = output / "images" / "e.png"
    e.write_bytes(bytes(range(256)) * (e.stat().st_size // 256) + bytes(e.stat().st_size % 256))
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert "images/e.png cannot read the image: not an image Pillow reads (PNG, JPEG, WebP, ...)" in page
    assert "BytesIO" not in page


def test_an_image_cut_short_after_its_thumbnail_was_made_is_missing_in_the_next_report(output):
    """A thumbnail is made once, from the PNG as it was: a PNG cut short later (a copy that kept its time) was
    shown from the old thumbnail for good. Its size, against the ledger's `png_bytes`, says so without opening it."""
    assert build_report(str(output))["missing"] == 1
    e = output / "images" / "e.png"
    e.write_bytes(e.read_bytes()[:-100])
    done = build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert (done["missing"], done["thumbnails_made"]) == (2, 0) and _tiles(page)["e"] == "missing"
    size = e.stat().st_size
    assert (f"<b>missing</b>: the ledger says ok, but images/e.png is {size:,} bytes, not the {size + 100:,} the "
            "ledger recorded (damaged or replaced since it was drawn") in page
    assert len(list((output / "report" / "thumbs").glob("*.jpg"))) == 2, "e's old thumbnail is not shown, nor kept"


def test_a_store_that_does_not_answer_for_the_index_stops_the_report_instead_of_remaking_every_thumbnail(
        output, monkeypatch):
    build_report(str(output))

    def unavailable(fs, path, columns=None):
        raise OSError("503 SlowDown")

    monkeypatch.setattr(jobs.report, "read_parquet", unavailable)
    with pytest.raises(ReportError, match=r"cannot read /.*/index.parquet \(OSError: 503 SlowDown\); try again"):
        build_report(str(output))
    monkeypatch.undo()
    assert build_report(str(output))["thumbnails_made"] == 0


def test_a_kept_page_is_written_again_when_its_last_group_comes_to_continue_on_the_next(tmp_path, monkeypatch):
    """A page is rewritten only when its digest changes: a row added to its last group, on the next page, left
    it without "(continues on the next page)"."""
    monkeypatch.setattr(jobs.report, "PAGE_ROWS", 2)
    out = tmp_path / "out"
    night = [ledger_row(_row(i, sku, n), "ok", actor="host:1", **_draw(out, i, COLOURS[i], f"p {i}"))
             for n, (i, sku) in enumerate([("a", "K"), ("b", "K"), ("c", "L")])]
    _run(out, "20261201T000000-aaaaaa", night, {"ok": 3, "skipped": 0, "failed": 0, "invalid": 0})
    build_report(str(out), group_by="sku")
    assert re.findall(r"<summary>([^<]*)", (out / "report" / "page-0001.html").read_text()) == ["sku = K · 2 rows"]
    added = [ledger_row(_row("d", "K", 3), "ok", actor="host:1", **_draw(out, "d", COLOURS["d"], "p d"))]
    _run(out, "20261202T000000-bbbbbb", added, {"ok": 1, "skipped": 3, "failed": 0, "invalid": 0})
    build_report(str(out), group_by="sku")
    assert re.findall(r"<summary>([^<]*)", (out / "report" / "page-0001.html").read_text()) == [
        "sku = K (continues on the next page) · 2 rows"]


def test_the_pop_up_shows_a_manifest_column_named_like_one_of_its_own_labels(output):
    extra = json.dumps({"sku": "sku-9", "size": "XL", "run": "spring"})
    entry = ledger_row({**_row("g", "", 6), "extra": extra}, "ok", actor="host:1", **_draw(output, "g", (1, 2, 3), "g"))
    _run(output, "20261203T000000-cccccc", [entry], {"ok": 1, "skipped": 5, "failed": 0, "invalid": 0})
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    (tile,) = [m for m in re.findall(r"data-p='([^']*)'", page) if "&quot;id&quot;: &quot;g&quot;" in m]
    shown = json.loads(html.unescape(tile))
    assert (shown["size"], shown["size (manifest)"]) == ("64x64", "XL")
    # an invalid row records no size: its pop-up showed "size: NonexNone"
    (tile,) = [m for m in re.findall(r"data-p='([^']*)'", page) if "&quot;id&quot;: &quot;f&quot;" in m]
    assert "size" not in json.loads(html.unescape(tile)) and "None" not in tile
    assert (shown["run"], shown["run (manifest)"]) == ("20261203T000000-cccccc", "spring")


def test_a_report_of_more_rows_than_a_page_holds_is_cut_into_pages_that_show_every_row_once(output, monkeypatch,
                                                                                            capsys):
    monkeypatch.setattr(jobs.report, "PAGE_ROWS", 4)  # six rows: sku-1 (a, b), sku-2 (c, d), sku-3 (e, f)
    assert main(["report", str(output), "--group-by", "sku"]) == 0
    report = output / "report"
    said = capsys.readouterr().err
    assert f"report: {report / 'index.html'} (6 rows on 2 pages, 0 of them unchanged, 3 thumbnails made" in said
    assert sorted(p.name for p in report.glob("*.html")) == [
        "index.html", "page-0001.html", "page-0002.html"]
    index = (report / "index.html").read_text()
    first, second = ((report / f"page-000{n}.html").read_text() for n in (1, 2))
    assert _tiles(index) == {}, "the index lists the pages; the tiles are on them"
    assert _tiles(first) == {"a": "ok", "b": "missing", "c": "failed", "d": "ok"}
    assert _tiles(second) == {"e": "ok", "f": "invalid"}
    assert re.findall(r"<summary>sku = (sku-\d)", first) == ["sku-1", "sku-2"]
    assert "continue" not in first + second  # each group ends on the page it starts on
    assert "<a href='page-0001.html'>page-0001.html</a>: sku = sku-1 … sku = sku-2 (2 groups, 4 rows, " in index
    # every problem and change links to the page holding its row, and that page has the anchor
    for href in re.findall(r"<a href='(page-\d{4}\.html#r\d+)'>", index):
        name, anchor = href.split("#")
        assert f" id={anchor} " in (report / name).read_text(), href
    assert "href='page-0001.html#r2'>c</a> <b>failed</b>" in index  # c is the third row by id
    assert "href='page-0002.html#r4'>e</a>" in index  # e is new in this run
    # the pages lead to each other and back
    assert "<a href='page-0002.html'>next →</a>" in first and "<a href='page-0001.html'>← previous</a>" in second
    assert "<a href='index.html'>index</a>" in first

    # a group larger than a page is cut and says it goes on; a later, shorter report leaves no old page behind
    monkeypatch.setattr(jobs.report, "PAGE_ROWS", 1)
    assert build_report(str(output))["pages"] == 6
    pages = [(report / f"page-000{n}.html").read_text() for n in range(1, 7)]
    assert "<summary>all rows (continues on the next page) · 1 row" in pages[0]  # it said nothing of the rest
    assert "<summary>all rows (continued) (continues on the next page) · 1 row" in pages[2]
    assert "<summary>all rows (continued) · 1 row" in pages[5]
    monkeypatch.setattr(jobs.report, "PAGE_ROWS", 100)
    assert build_report(str(output))["pages"] == 1
    assert sorted(p.name for p in report.glob("*.html")) == ["index.html"]
    assert set(_tiles((report / "index.html").read_text())) == set("abcdef")


def test_problems_beyond_the_shown_number_are_counted(output, monkeypatch):
    monkeypatch.setattr(jobs.report, "PROBLEMS_SHOWN", 2)  # b missing, c failed, f invalid
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert "<h2>Problems (3)</h2>" in page and "… and 1 more;" in page
    assert len(re.findall(r"<li class=(failed|invalid|missing)>", page)) == 2


def test_report_says_what_changed_since_the_previous_run(output):
    from jobs.outputs import open_output

    kinds = changes(open_output(str(output)))
    assert kinds == {"new": ["e"], "redrawn": ["a"], "fixed": ["d"], "now failing": ["c", "f"], "still failing": [],
                     "recovered": []}
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert "What changed since run 20261201T000000-aaaaaa" in page
    assert "<summary>2 now failing</summary>" in page and "<summary>1 fixed</summary>" in page


def test_recovered_rows_are_not_drawn_and_a_later_run_that_did_not_finish_is_said(output):
    drawn_before = {"uri": str(output / "images" / "e.png"), "sha256": "same"}
    recovered = ledger_row(_row("e", "sku-3", 4), "ok", **drawn_before,
                           warning="recovered: an earlier run drew this image and stopped before recording it")
    redrawn = ledger_row(_row("d", "sku-2", 3), "ok", actor="host:1", seconds=0.5,
                         **_draw(output, "d", (9, 9, 9), "a photo of d, darker"))
    _run(output, "20261203T000000-cccccc", [recovered, redrawn], {"ok": 2, "skipped": 3, "failed": 0, "invalid": 0})
    summary = json.loads((output / "run.json").read_text())
    (output / "run.json").write_text(json.dumps({**summary, "recovered": 1}))
    kinds = changes(open_output(str(output)))
    assert kinds["recovered"] == ["e"] and kinds["redrawn"] == ["d"]
    page_of = lambda: (output / "report" / "index.html").read_text()  # noqa: E731
    build_report(str(output))
    assert "<b>1</b><span>drawn</span>" in page_of() and "did not finish" not in page_of()
    (output / "run.json").write_text(json.dumps({**summary, "ok": 3, "recovered": 1, "restored": 1}))
    build_report(str(output))  # a row failed since its image and mended is restored, not drawn either
    assert "<b>1</b><span>drawn</span>" in page_of() and "<b>1</b><span>restored</span>" in page_of()
    (output / "run.json").write_text(json.dumps({**summary, "recovered": 1}))
    # a later run killed after its first ledger part: no run.json of its own, so run.json is the one before
    write_part(fsspec.filesystem("file"), str(output), "20261204T000000-dddddd", 0,
               [ledger_row(_row("a", "sku-1", 0), "failed", actor="host:1", error="killed mid-batch")])
    (output / "runs" / "20261204T000000-notes.json").write_text("[1, 2]")  # not a run summary: passed over
    done = build_report(str(output))
    assert done["unfinished"] == ["20261204T000000-dddddd"]
    assert "run 20261204T000000-dddddd wrote rows after this one and did not finish" in page_of()
    warned = []  # the sheet draws the rows as they stand: it says so too (it said nothing)
    contact_sheet(str(output), thumb=32, warn=warned.append)
    assert len(warned) == 1 and "run 20261204T000000-dddddd wrote rows after this one and did not finish" in warned[0]


def test_a_second_report_reuses_thumbnails_and_makes_only_new_ones(output):
    assert build_report(str(output))["thumbnails_made"] == 3
    again = build_report(str(output))
    assert again["thumbnails_made"] == 0 and again["thumbnails_reused"] == 3
    _draw(output, "e", (9, 9, 9), "e redrawn")  # a new PNG: a new sha256 in a newer ledger entry
    import fsspec

    entry = ledger_row(_row("e", "sku-3", 4), "ok", actor="host:1", **_draw(output, "e", (9, 9, 9), "e redrawn"))
    write_part(fsspec.filesystem("file"), str(output), "20261203T000000-cccccc", 0, [entry])
    summary = json.loads((output / "run.json").read_text())
    (output / "run.json").write_text(json.dumps({**summary, "run_id": "20261203T000000-cccccc"}))
    third = build_report(str(output))
    assert third["thumbnails_made"] == 1 and third["thumbnails_reused"] == 2  # a and d; e's old one is gone
    assert len(list((output / "report" / "thumbs").glob("*.jpg"))) == 3


def _redraw(output: Path, row_id: str, run_id: str) -> None:
    """A run that redraws one row (a new PNG: a new sha256) and skips the rest."""
    n = "abcdef".index(row_id)
    entry = ledger_row(_row(row_id, "sku-3", n), "ok", actor="host:1", seconds=0.5,
                       **_draw(output, row_id, (9, 9, 9), f"{row_id} redrawn"))
    _run(output, run_id, [entry], {"ok": 1, "skipped": 5, "failed": 0, "invalid": 0})


def test_a_later_report_writes_again_only_the_pages_whose_rows_changed(output, monkeypatch):
    """A nightly catalogue's report has hundreds of pages of ~7 MB; the pages whose rows the night did not
    touch are left as they are (the index, which says when it was written, is always written)."""
    monkeypatch.setattr(jobs.report, "PAGE_ROWS", 2)  # a b | c d | e f
    report = output / "report"
    first = build_report(str(output))
    assert (first["pages"], first["pages_written"], first["pages_unchanged"]) == (3, 4, 0)
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in report.glob("page-*.html")}
    again = build_report(str(output))
    assert (again["pages_written"], again["pages_unchanged"]) == (1, 3)
    assert {p.name: p.stat().st_mtime_ns for p in report.glob("page-*.html")} == {n: m for n, (m, _) in before.items()}
    _redraw(output, "e", "20261203T000000-cccccc")
    third = build_report(str(output))
    assert (third["pages_written"], third["pages_unchanged"]) == (2, 2)
    assert [n for n, (_, text) in sorted(before.items()) if (report / n).read_text() != text] == ["page-0003.html"]
    assert "e redrawn" in (report / "page-0003.html").read_text()
    (report / "page-0001.html").unlink()  # a page gone (or edited by hand) is written again
    (report / "page-0002.html").write_text("edited")
    fourth = build_report(str(output))
    assert (fourth["pages_written"], fourth["pages_unchanged"]) == (3, 1)
    assert (report / "page-0001.html").read_text() == before["page-0001.html"][1]
    assert (report / "page-0002.html").read_text() == before["page-0002.html"][1]
    monkeypatch.chdir(output.parent)  # the same output by another name: each page names it, so all are new
    assert build_report("out")["pages_unchanged"] == 0 and "<p>out · " in (report / "page-0001.html").read_text()


def _index(thumbs: Path) -> dict[str, dict]:
    """The thumbnail index, read back: thumbnail name -> what it holds of it."""
    return {row["name"]: row for row in pq.read_table(thumbs / "index.parquet").to_pylist()}


def test_the_thumbnail_index_holds_each_shown_thumbnail_and_is_written_only_when_they_change(output):
    thumbs = output / "report" / "thumbs"
    build_report(str(output))
    names = sorted(p.name for p in thumbs.glob("*.jpg"))
    assert set(_index(thumbs)) == set(names) and sorted(p.name for p in thumbs.glob("index*")) == ["index.parquet"]
    stamp = (thumbs / "index.parquet").stat().st_mtime_ns
    build_report(str(output))
    assert (thumbs / "index.parquet").stat().st_mtime_ns == stamp  # nothing made or removed: not written
    _redraw(output, "e", "20261203T000000-cccccc")
    build_report(str(output))
    (new,) = set(p.name for p in thumbs.glob("*.jpg")) - set(names)
    (gone,) = set(names) - set(p.name for p in thumbs.glob("*.jpg"))
    index = _index(thumbs)
    assert index[new]["prompt"] == "e redrawn" and set(index) == set(names) - {gone} | {new}
    assert {row["side"] for row in index.values()} == {192}
    assert (index[new]["width"], index[new]["thumb_width"]) == (64, 64)


def test_a_report_written_before_the_parquet_index_is_read_and_its_thumbnails_reused(output):
    thumbs = output / "report" / "thumbs"
    build_report(str(output))
    legacy = {"_side": 192}
    for name, row in _index(thumbs).items():  # as reports wrote it before: one JSON file
        legacy[name] = {"prompt": row["prompt"], "negative_prompt": row["negative_prompt"],
                        "size": [row["width"], row["height"]], "thumb": [row["thumb_width"], row["thumb_height"]]}
    (thumbs / "index.parquet").unlink()
    (thumbs / "index.json").write_text(json.dumps(legacy))
    again = build_report(str(output))
    assert again["thumbnails_made"] == 0 and again["thumbnails_reused"] == 3
    assert not (thumbs / "index.json").exists() and set(_index(thumbs)) == set(legacy) - {"_side"}
    assert "a photo of a, again" in (output / "report" / "index.html").read_text()  # prompts came across
    del legacy["_side"]  # an index that does not say its side: its thumbnails are made again
    (thumbs / "index.json").write_text(json.dumps(legacy))
    (thumbs / "index.parquet").unlink()
    assert build_report(str(output))["thumbnails_made"] == 3
    smaller = build_report(str(output), thumb=96)  # another size: every thumbnail made again
    assert smaller["thumbnails_made"] == 3
    assert {row["side"] for row in _index(thumbs).values()} == {96} and len(_index(thumbs)) == 3
    assert build_report(str(output), thumb=96)["thumbnails_made"] == 0


def test_a_damaged_thumbnail_index_costs_the_thumbnails_not_the_report(output):
    thumbs = output / "report" / "thumbs"
    build_report(str(output))
    (thumbs / "index.parquet").write_bytes(b"not parquet")
    again = build_report(str(output))
    assert again["thumbnails_made"] == 3 and len(_index(thumbs)) == 3
    assert "a photo of a, again" in (output / "report" / "index.html").read_text()


def test_manifest_columns_named_like_the_reports_own_are_shown_and_grouped_as_any_other(output):
    """A manifest's `_batch`, `_run` or `_thumb_error` is its own column: the report groups by it and shows it."""
    extra = json.dumps({"sku": "sku-9", "_batch": "b1", "_run": "mine", "_thumb_error": "mine too"})
    entry = ledger_row({**_row("g", "", 6), "extra": extra}, "ok", actor="host:1", **_draw(output, "g", (1, 2, 3), "g"))
    _run(output, "20261203T000000-cccccc", [entry], {"ok": 1, "skipped": 5, "failed": 0, "invalid": 0})
    done = build_report(str(output), group_by="_batch")
    page = (output / "report" / "index.html").read_text()
    assert done["missing"] == 1 and "_batch = b1 · 1 row<" in page  # b's PNG is the one missing
    (tile,) = [m for m in re.findall(r"data-p='([^']*)'", page) if "&quot;id&quot;: &quot;g&quot;" in m]
    shown = json.loads(html.unescape(tile))
    assert (shown["_run"], shown["_thumb_error"], shown["run"]) == ("mine", "mine too", "20261203T000000-cccccc")
    assert "<figure class='tile ok'" in page.split("_batch = b1")[1]


def test_invalid_rows_without_an_id_are_listed_in_the_order_they_were_written(output):
    late = ledger_row({**_row("x", "", 9), "id": None}, "invalid", error="m.parquet row 9: LATE")
    early = ledger_row({**_row("y", "", 8), "id": None}, "invalid", error="m.parquet row 8: EARLY")
    early["finished_at"] = "2000-01-01T00:00:00+00:00"
    _run(output, "20261203T000000-cccccc", [late, early], {"ok": 0, "skipped": 6, "failed": 0, "invalid": 2})
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert page.index("EARLY") < page.index("LATE")


def test_control_characters_in_ids_errors_and_prompts_are_written_out_not_into_the_page(output):
    """An invalid row's id `x<NUL>y` and a prompt with a NUL put raw NUL bytes into index.html: HTML parsers flag it,
    and grep took the page for binary."""
    bad = ledger_row({**_row("x\x00y", "", 9)}, "invalid", error="m.parquet row 9 (`x\x00y`): `id` holds a NUL")
    drawn = ledger_row(_row("g", "sku-3", 10), "ok", actor="host:1", seconds=0.5,
                       **_draw(output, "g", (9, 9, 9), "a mug\x00 on\x1b[31m red\x85"))
    _run(output, "20261203T000000-cccccc", [bad, drawn], {"ok": 1, "skipped": 6, "failed": 0, "invalid": 1})
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", page)
    assert "x\\x00y" in page and "a mug\\u0000 on\\u001b[31m red\\u0085" in page  # (the pop-up's JSON says it so)
    tile = html.unescape(re.search(r"id=r\d+ title='g: [^']*' data-p='([^']*)'", page).group(1))
    assert json.loads(tile)["prompt"] == "a mug\x00 on\x1b[31m red\x85"  # what the page's script reads back


def test_rows_that_name_one_thumbnail_make_it_once_and_index_it_once(output):
    """Without a sha256, a thumbnail is named by the row's params_hash: two rows that share it share one."""
    entries = [ledger_row({**_row(i, "sku-9", 6), "params_hash": "same"}, "ok", actor="host:1",
                          **{**_draw(output, i, (1, 2, 3), "twins"), "sha256": None}) for i in ("g", "h")]
    _run(output, "20261203T000000-cccccc", entries, {"ok": 2, "skipped": 5, "failed": 0, "invalid": 0})
    done = build_report(str(output))
    assert (done["thumbnails_made"], done["thumbnails_reused"]) == (4, 1)
    index = pq.read_table(output / "report" / "thumbs" / "index.parquet").column("name").to_pylist()
    assert sorted(index) == sorted(set(index)) and "same.jpg" in index


def test_a_column_two_runs_typed_differently_groups_as_text(output):
    """One night's manifest has `sku` as numbers, another's as text: the ledger's parts disagree, and the report
    groups both as text rather than refusing the output."""
    entry = ledger_row({**_row("g", "", 6), "extra": json.dumps({"sku": 7})}, "ok", actor="host:1",
                       **_draw(output, "g", (1, 2, 3), "g"))
    _run(output, "20261203T000000-cccccc", [entry], {"ok": 1, "skipped": 5, "failed": 0, "invalid": 0})
    build_report(str(output), group_by="sku")
    page = (output / "report" / "index.html").read_text()
    assert "sku = 7 · 1 row<" in page and "sku = sku-3 · 2 rows," in page
    assert changes(open_output(str(output)))["new"] == ["g"]


def test_groups_of_a_numeric_column_come_in_numeric_order():
    """An int column's groups came 0, 1, 10, 11, 2 (sorted as text), and a paged index read "num = 7 ... num = 9"."""
    from jobs.outputs import RunOutput

    def keys(values, kind):
        out = RunOutput(uri="x", fs=None, root="x", summary={}, runs=[], history=pa.table({}),
                        current=pa.table({"n": pa.array(values, kind)}))
        return list(out.groups("n"))

    assert keys([10, 2, None, 1, 2], pa.int64()) == ["1", "2", "10", "(none)"]
    assert keys([2.5, float("nan"), -1.0, 10.0], pa.float64()) == ["-1.0", "2.5", "10.0", "nan"]
    assert keys(["10", "2", "b"], pa.string()) == ["10", "2", "b"]  # text stays text
    # a missing value, empty text, blank text and the text "(none)" were one "(none)" group (blank: no heading)
    assert keys([None, "", "  ", "(none)", "x"], pa.string()) == ['"  "', '""', '"(none)"', "x", "(none)"]
    # lists and structs as JSON, the spelling the ledger gives them where runs typed the column differently
    assert keys([["t0", "z"], None], pa.list_(pa.string())) == ['["t0", "z"]', "(none)"]
    assert keys([{"a": 0, "b": "<i>"}], pa.struct([("a", pa.int64()), ("b", pa.string())])) == ['{"a": 0, "b": "<i>"}']


def test_group_by_adapters_and_an_unknown_column(output):
    build_report(str(output), group_by="adapters")
    page = (output / "report" / "index.html").read_text()
    assert "adapters = style@0.8" in page and "adapters = (none)" in page
    from jobs.outputs import adapters_text  # a blend in another order is one group (one params_hash, one image)

    blend = [{"name": "style-b", "scale": 0.5}, {"name": "style-a", "scale": 1.0}]
    assert adapters_text(blend) == adapters_text(blend[::-1]) == "style-a@1 + style-b@0.5"
    assert adapters_text([{"name": "style-a", "scale": 0.0}]) == adapters_text([]) == ""  # loads nothing
    with pytest.raises(ReportError, match=r"--group-by 'colour'.*group by one of id, seed, model, adapters, .*, sku$"):
        build_report(str(output), group_by="colour")
    # a column the ledger has, but of how each entry was made: it said "the ledger ... has no such column"
    with pytest.raises(ReportError, match=r"--group-by 'status': a column of how each entry was made \(status, uri"):
        build_report(str(output), group_by="status")


@pytest.mark.parametrize("damage, message", [
    ("absent", "does not exist: give the --out of a `sdfleet generate` run"),
    ("no run.json", "has 2 ledger parts but no run.json: its run did not finish"),
    ("half-written run.json", "run.json is not valid JSON"),
    ("empty", "holds no sdfleet run (no run.json, no ledger parts)"),
    ("empty results/", "holds no sdfleet run (no run.json, no ledger parts)"),  # it said "no results/"
    # a run.json edited by hand: each was a traceback (TypeError, ValueError, ArrowNotImplementedError)
    ({"images_per_actor": ["a", 1]}, "run.json cannot be read: field images_per_actor is [\"a\", 1]: input should be"),
    ({"finished_at": 1733500000}, "run.json cannot be read: field finished_at is 1733500000: input should be"),
    ({"finished_at": "yesterday"}, "run.json cannot be read: field finished_at is \"yesterday\": value error"),
    ({"startup": {"ray_connected": "n/a"}}, None),  # a stamp that is not a number is not shown, the rest is
    ({"wall_seconds": "x"}, "run.json cannot be read: field wall_seconds is \"x\": input should be a valid number"),
    ({"run_id": 20261201}, "run.json cannot be read: field run_id is 20261201: input should be a valid string; an "
     "edited file? put back its copy from runs/"),  # (generate refuses such a folder: rerunning it is no fix)
    ({"adapter_swaps": {"per_actor": {"a0": "two"}}}, "field adapter_swaps.per_actor.a0 is \"two\": input should"),
], ids=str)
def test_a_missing_or_half_written_output_is_said_in_one_line(output, tmp_path, capsys, damage, message):
    target = output
    if damage == "absent":
        target = tmp_path / "nowhere"
    elif damage == "no run.json":
        (output / "run.json").unlink()
    elif damage == "half-written run.json":
        (output / "run.json").write_text('{"run_id": "2026')
    elif isinstance(damage, dict):
        (output / "run.json").write_text(json.dumps({**json.loads((output / "run.json").read_text()), **damage}))
    else:
        target = tmp_path / "empty"
        (target / "results").mkdir(parents=True) if damage == "empty results/" else target.mkdir()
    if message is None:
        assert main(["report", str(target)]) == 0
        return
    assert main(["report", str(target)]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (target / "report" / "index.html").exists()


def test_a_ledger_part_lost_since_its_run_is_said_on_the_page_and_by_report_and_sheet(output, capsys):
    """A copy or sync that missed a part showed the rows of the other parts and "Problems: none", exit 0: the
    rows only that part recorded were gone from the review, and nothing said so."""
    assert open_output(str(output)).lost_parts == []
    (part,) = (output / "results").glob("20261202T000000-bbbbbb-*.parquet")
    part.unlink()
    assert main(["report", str(output)]) == 0
    err = capsys.readouterr().err
    said = "run 20261202T000000-bbbbbb wrote 1 ledger part(s) and results/ holds 0 of them"
    assert f"warning: {said}" in err, err
    assert html.escape(said) in (output / "report" / "index.html").read_text()
    assert main(["sheet", str(output), "-o", str(output.parent / "sheet.png")]) == 0
    assert said in capsys.readouterr().err


def test_a_lost_part_of_a_run_a_later_run_finished_after_is_not_said_again_and_again(output):
    """Repaired as the line says (a rerun records again every row its manifests ask for), a nightly report still
    warned of the lost part on every later run: a false alarm for good."""
    (part,) = (output / "results").glob("20261201T000000-aaaaaa-*.parquet")
    part.unlink()
    assert open_output(str(output)).lost_parts == []  # run 2 finished after it


def test_a_first_run_still_going_is_said_to_be_running_not_to_be_rerun(output, capsys):
    """Told to run `generate` again, which the run's lease would refuse: the lease says a run is going."""
    import time

    (output / "run.json").unlink()
    lease = {"run_id": "20261203T000000-cccccc", "host": "node-7", "pid": 4242, "heartbeat": time.time()}
    (output / ".sdfleet-lease.json").write_text(json.dumps(lease))
    assert main(["report", str(output)]) == 1
    err = capsys.readouterr().err
    assert "its first run 20261203T000000-cccccc is still running (host node-7, pid 4242" in err, err
    (output / ".sdfleet-lease.json").write_text(json.dumps({**lease, "heartbeat": time.time() - 3600}))
    assert main(["report", str(output)]) == 1
    assert "run the same `sdfleet generate` again" in capsys.readouterr().err  # a lease gone stale: a killed run


def test_report_on_an_object_store(output, tmp_path):
    """Any fsspec store: the page and thumbnails are written through fsspec (memory:// here; S3 in test_s3)."""
    import fsspec

    mem = fsspec.filesystem("memory")
    for path in output.rglob("*"):
        if path.is_file():
            mem.pipe_file(f"/report-out/{path.relative_to(output)}", path.read_bytes())
    done = build_report("memory://report-out", group_by="sku")
    assert done["path"].startswith("memory://") and done["path"].endswith("/report-out/report/index.html")
    assert done["thumbnails_made"] == 3
    assert "CUDA out of memory" in mem.cat_file("/report-out/report/index.html").decode()


def test_sheet_lays_rows_out_by_group_with_a_tile_for_every_gap(output, tmp_path):
    sheet = contact_sheet(str(output), columns=3, thumb=32, label=10)
    assert sheet.size == (96, 2 * 42)  # a..f in id order, three to a line
    assert sheet.getpixel((16, 16)) == (0, 0, 255)  # a, as redrawn
    assert sheet.getpixel((32 + 1, 1)) == (0xDD,) * 3  # b: missing, a grey tile
    assert sheet.getpixel((64 + 1, 1)) == (0xDD,) * 3  # c: failed
    grouped = contact_sheet(str(output), group_by="sku", columns=3, thumb=32, label=10)
    assert grouped.size == (96, 3 * (20 + 42))  # one band per sku, each a line of tiles
    assert main(["sheet", str(output), "-o", str(tmp_path / "s.png"), "--group-by", "sku", "--thumb", "32"]) == 0
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (6 * 32, 3 * (20 + 32 + 14))


def test_sheet_keeps_each_image_shape_and_shows_a_damaged_one_as_a_tile(output, monkeypatch):
    from jobs.outputs import RunOutput

    out = output
    monkeypatch.setattr(RunOutput, "resized", lambda self, row_id, recorded: None)  # e's new shape, not its size
    (out / "images" / "a.png").write_bytes((out / "images" / "a.png").read_bytes()[:300])  # cut short
    Image.new("RGB", (16, 64), (255, 0, 0)).save(out / "images" / "e.png")  # tall: 1 wide to 4 high
    said = []
    sheet = contact_sheet(str(out), columns=3, thumb=32, label=10, gaps=said.append)
    assert sheet.getpixel((1, 1)) == (0xDD,) * 3  # a: unreadable, a grey tile, and the sheet is drawn
    # ... and said, not only drawn grey (b's PNG was deleted; c failed, its tile expected)
    assert said == [f"2 ok row(s) without their image on the sheet (1 missing, 1 unreadable); `sdfleet report "
                    f"{out}` lists them, and a rerun of `sdfleet generate` draws them again"], said
    e = (32, 42)  # the second tile of the second line
    assert sheet.getpixel((e[0] + 16, e[1] + 16)) == (255, 0, 0)  # its middle
    assert sheet.getpixel((e[0] + 1, e[1] + 16)) == (255, 255, 255)  # beside it: the image is not stretched


def test_sheet_refuses_to_write_over_the_runs_own_files_and_marks_an_image_replaced_since(output, capsys):
    """`sheet -o OUT/images/a.png` wrote the sheet over row a's image; the next sheet then drew that sheet as a's
    tile, with no mark (the report calls such a file replaced: its size is not the ledger's)."""
    image = output / "images" / "a.png"
    before = image.read_bytes()
    for target in (image, output / "results" / "x.png", output / "report" / ".." / "images" / "new.webp",
                   output / "runs" / "sheet.png"):
        assert main(["sheet", str(output), "-o", str(target)]) == 1
        err = capsys.readouterr().err
        assert "write the sheet elsewhere (beside the run: " in err and "Traceback" not in err, err
    assert image.read_bytes() == before
    assert main(["sheet", str(output), "-o", str(output / "report" / "sheet.png"), "--thumb", "32"]) == 0  # a view
    Image.new("RGB", (32, 32), (0, 255, 0)).save(image)  # replaced by hand, with another size than recorded
    sheet = contact_sheet(str(output), columns=3, thumb=32, label=10)
    assert sheet.getpixel((1, 1)) == (0xDD,) * 3  # a grey tile, not the green picture


def test_a_sheet_that_cannot_be_written_leaves_the_one_there(output, tmp_path, monkeypatch, capsys):
    import manifests.ledger

    target = tmp_path / "sheet.png"
    assert main(["sheet", str(output), "-o", str(target), "--thumb", "32"]) == 0
    good = target.read_bytes()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(manifests.ledger.os, "fsync", full_disk)
    assert main(["sheet", str(output), "-o", str(target), "--thumb", "48"]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert target.read_bytes() == good and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    published = tmp_path / "published"
    published.mkdir()
    (tmp_path / "link.png").symlink_to(published / "sheet.png")  # a link to where sheets are shared
    assert main(["sheet", str(output), "-o", str(tmp_path / "link.png"), "--thumb", "32"]) == 0
    assert (tmp_path / "link.png").is_symlink() and (published / "sheet.png").stat().st_size > 0


def test_sheet_captions_cut_short_end_in_dots():
    from jobs.sheet import _caption

    assert _caption("green-triangle-on-white", 21) == "green-triangle-on-w.."
    assert _caption("green-circle", 21) == "green-circle"
    assert _caption("abc", 2) == "ab"  # --thumb 16: no room for dots


def test_comparison_sheet_puts_the_same_rows_of_each_run_one_run_to_a_row(tmp_path):
    from jobs.sheet import comparison_sheet

    def run(root: Path, colours: dict) -> str:
        (root / "images").mkdir(parents=True)
        for row_id, colour in colours.items():
            Image.new("RGB", (64, 64), colour).save(root / "images" / f"{row_id}.png")
        return str(root)

    before = run(tmp_path / "before", {"x-0": (255, 0, 0), "x-1": (0, 255, 0)})
    after = run(tmp_path / "after", {"x-0": (0, 0, 255), "x-1": (255, 255, 0)})
    sheet = comparison_sheet({"base": before, "+ x": after}, ["x-1", "x-0"], thumb=32, label=40)
    assert sheet.size == (40 + 2 * 32, 2 * 32)
    assert sheet.getpixel((40 + 16, 16)) == (0, 255, 0) and sheet.getpixel((40 + 48, 48)) == (0, 0, 255)
    with pytest.raises(ReportError, match="no image for row 'x-2'"):
        comparison_sheet({"base": before}, ["x-2"])


# --- the page in a real browser ---------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not "
                    "installed (.ci/run installs them: apt-get install chromium chromium-driver)")
def test_report_renders_in_chromium_with_every_thumbnail_loaded(output, tmp_path):
    build_report(str(output), group_by="sku")
    driver = _chromium(tmp_path)
    try:
        driver.get((output / "report" / "index.html").as_uri())
        # lazy thumbnails load as they come into view: bring each there, then wait for all
        driver.execute_script("document.querySelectorAll('img').forEach(i => i.scrollIntoView())")
        driver.execute_script("window.scrollTo(0, 0)")
        widths = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            Promise.all([...document.images].map(i => i.decode().catch(() => null)))
              .then(() => done([...document.images].map(i => [i.alt, i.naturalWidth])));""")
        assert len(widths) == 3 and all(w > 0 for _, w in widths), widths
        reasons = {el.find_element("css selector", "figcaption").text: el.find_element("css selector", ".reason").text
                   for el in driver.find_elements("css selector", "figure.tile:not(.ok)")}
        assert reasons.keys() == {"b", "c", "f"}
        assert "CUDA out of memory" in reasons["c"] and "not one of ddim" in reasons["f"]
        assert reasons["b"].startswith("missing") and driver.find_elements("css selector", "figure.missing img") == []
        # a click on a failed tile opens its parameters
        driver.find_element("css selector", "figure.failed").click()
        assert "CUDA out of memory" in driver.find_element("id", "detail").text
        driver.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 10_000
    finally:
        driver.quit()


def _chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1400", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver are not "
                    "installed (.ci/run installs them: apt-get install chromium chromium-driver)")
def test_a_paged_report_leads_from_a_problem_on_the_index_to_its_tile_unfolded_on_its_page(output, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(jobs.report, "PAGE_ROWS", 4)
    monkeypatch.setattr(jobs.report, "OPEN_GROUPS", 0)  # every group folded when a page opens
    build_report(str(output), group_by="sku")
    driver = _chromium(tmp_path)
    try:
        driver.get((output / "report" / "index.html").as_uri())
        assert driver.find_elements("css selector", "figure.tile") == []
        driver.find_element("css selector", "#problems li.failed a").click()  # c, on the first page
        assert driver.current_url.endswith("page-0001.html#r2")
        tile = driver.find_element("id", "r2")
        assert tile.is_displayed() and tile.find_element("css selector", "figcaption").text == "c"
        assert driver.execute_script("return arguments[0].closest('details').open", tile)
        # the other groups stay folded; a click on the tile opens its parameters on this page too
        groups = driver.find_elements("css selector", "details.group")
        assert [d.get_attribute("open") for d in groups] == [None, "true"]
        tile.click()
        assert "CUDA out of memory" in driver.find_element("id", "detail").text
        driver.find_element("css selector", "#detail button").click()
        driver.find_element("link text", "next →").click()
        assert driver.current_url.endswith("page-0002.html")
        captions = driver.find_elements("css selector", "figure.tile figcaption")  # folded: not shown, but there
        assert {el.get_attribute("textContent") for el in captions} == {"e", "f"}
    finally:
        driver.quit()


def test_rows_no_manifest_of_the_run_asked_for_are_listed_as_far_as_run_json_names_them(output):
    """A product dropped from the catalogue keeps its image and ledger entries; run.json counts such rows and
    names the first of them, and the report lists those under what changed, with the count."""
    from jobs.outputs import open_output

    summary = json.loads((output / "run.json").read_text())
    (output / "run.json").write_text(json.dumps({**summary, "not_in_manifests": 3, "not_in_manifests_ids": ["b"]}))
    kinds = changes(open_output(str(output)))
    assert kinds["not asked for"] == ["b"]
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    assert "<summary>3 not asked for by this run&#x27;s manifests (images kept)</summary>" in page
    assert "… and 2 more" in page


def test_bad_rows_dropped_from_the_catalogue_are_no_longer_problems(output):
    """c (failed) and f (invalid) in run 2; run 3's manifests no longer hold them (it would have drawn them again
    otherwise: a run retries every row asked for that is not ok). They stayed in the report's Problems night
    after night, while run.json said 0 failed and 0 invalid; now what changed lists them as dropped."""
    from jobs.outputs import open_output

    run3 = [ledger_row(_row("g", "sku-3", 6), "ok", actor="host:1", seconds=0.5,
                       **_draw(output, "g", (0, 128, 0), "a photo of g"))]
    _run(output, "20261203T000000-cccccc", run3, {"ok": 1, "skipped": 4, "failed": 0, "invalid": 0})
    out = open_output(str(output))
    assert [out.ids[i] for i in out.dropped_problems] == ["c", "f"]
    assert changes(out)["dropped problems"] == ["c", "f"]
    build_report(str(output))
    page = (output / "report" / "index.html").read_text()
    problems = re.search(r"<section id=problems>.*?</section>", page, re.DOTALL).group(0)
    assert "Problems (1)" in problems and ">b</a> <b>missing</b>" in problems, problems  # b's image is still gone
    assert ">c<" not in problems and ">f<" not in problems, problems
    assert "<summary>2 failed or invalid before, and not asked for by this run&#x27;s manifests" in page
    # a run that met a row whose id it could not read cannot tell which rows it was not asked for: none is dropped
    unread = ledger_row({**_row("h", "sku-3", 7), "id": None}, "invalid",
                        error="m.parquet row 7: the id cannot be read")
    _run(output, "20261203T120000-cccccd", [unread], {"ok": 0, "skipped": 5, "failed": 0, "invalid": 1})
    assert open_output(str(output)).dropped_problems == []
    # a row asked for again, still bad, is a problem again: run 4 retries c and it fails
    run4 = [ledger_row(_row("c", "sku-2", 2), "failed", actor="host:1", error="m.parquet row 2 (`c`): still failing")]
    _run(output, "20261204T000000-dddddd", run4, {"ok": 0, "skipped": 5, "failed": 1, "invalid": 0})
    assert [open_output(str(output)).ids[i] for i in open_output(str(output)).dropped_problems] == ["f"]
    # with b drawn again, nothing asked for lacks an image
    run5 = [ledger_row(_row("b", "sku-1", 1), "ok", actor="host:1", seconds=0.5,
                       **_draw(output, "b", COLOURS["b"], "a photo of b"))]
    _run(output, "20261205T000000-eeeeee", run5, {"ok": 1, "skipped": 4, "failed": 0, "invalid": 0})
    build_report(str(output))
    assert "none: every row asked for has its image" in (output / "report" / "index.html").read_text()


def test_a_report_cut_off_while_making_thumbnails_keeps_them_for_the_next(output, monkeypatch):
    """Its index was written at the end only: the next report made every thumbnail again (a store that went
    away mid-report, QA on S3: 2,376 made again, 0 reused)."""
    from jobs.errors import ReportError
    from jobs.report import Thumbnails

    made = Thumbnails._one
    calls = []

    def dies_on_the_third(self, row):
        calls.append(row)
        if len(calls) == 3:
            raise OSError("the store went away")
        return made(self, row)

    monkeypatch.setattr(Thumbnails, "_one", dies_on_the_third)
    with pytest.raises(ReportError, match="the store went away"):
        build_report(str(output), workers=1)
    monkeypatch.setattr(Thumbnails, "_one", made)
    done = build_report(str(output))
    assert done["thumbnails_made"] == 1 and done["thumbnails_reused"] == 2, done


def test_a_large_run_sheet_comes_out_about_square_unless_columns_are_given(tmp_path, capsys):
    """6 to a line suits tens of rows; a catalogue's 2,376 made a sheet 768 px wide and 56,000 tall. Without
    --columns the sheet is about as wide as it is tall, never under 6 to a line; --columns is kept as given."""
    from benchmarks.bench_report import write_run

    out = tmp_path / "big"
    write_run(out, "20261208T000000-aaaaaa", list(range(300)), 10, 1, [np.zeros((16, 16, 3), np.uint8)])
    width, height = contact_sheet(str(out), thumb=32, label=14).size
    assert 0.7 <= width / height <= 1.4, (width, height)
    assert contact_sheet(str(out), columns=6, thumb=32, label=14).size == (6 * 32, 50 * (32 + 14))
    assert contact_sheet(str(out), group_by="sku", thumb=32, label=14).size[0] > 6 * 32  # bands too
    assert main(["sheet", str(out), "-o", str(tmp_path / "s.png"), "--thumb", "32"]) == 0
    assert "to a line" in capsys.readouterr().err  # says how it was laid out: --columns changes it
    from jobs.sheet import square_columns

    assert square_columns([36], 128, 14, 0) == 6  # 7 to a line would make as many lines (6), only wider
