"""The driver's record of a run (jobs/recorder.py): what its progress lines say while rows come back."""

from __future__ import annotations

import fsspec
import pytest

import jobs.recorder as recorder


def drawn(start: int, n: int, when: str = "2026-12-05T12:00:00+00:00") -> list[dict]:
    return [{"source": "m.parquet", "row": i, "status": "ok", "actor": "a1", "finished_at": when, "warning": None,
             "error": None, "planned_at": None, "adapter_swaps": 0, "adapter_swap_seconds": 0.0,
             "backend_stats": None} for i in range(start, start + n)]


@pytest.fixture
def clock(monkeypatch):
    """A settable clock for the recorder, whose ledger parts go to a memory store emptied afterwards."""
    now = [0.0]
    monkeypatch.setattr(recorder.time, "time", lambda: now[0])
    monkeypatch.setattr(recorder, "log", lambda line: None)
    yield now
    fs = fsspec.filesystem("memory")
    if fs.exists("/recorder-test"):
        fs.rm("/recorder-test", recursive=True)


def make_recorder(total: int, started: float) -> recorder.Recorder:
    return recorder.Recorder(fsspec.filesystem("memory"), "/recorder-test", "run1", total=total, started=started)


def test_the_estimate_of_time_left_counts_from_the_first_images_not_from_the_start(clock):
    rec = make_recorder(total=96, started=0.0)
    clock[0] = 15.0  # 15 s of start-up (Ray, the model) before the first batch of 8 comes back
    rec.record(drawn(0, 8))
    first = rec.progress(clock[0])
    assert first.startswith("8/96 rows (8 ok,") and "left" not in first  # one batch says nothing of the rate

    for k in range(1, 4):  # then a batch of 8 every 2 s: 4 img/s
        clock[0] = 15.0 + 2 * k
        rec.record(drawn(8 * k, 8))
    line = rec.progress(clock[0])
    assert "32/96 rows (32 ok," in line and "4.00 img/s, ~16 s left" in line  # 64 rows at 4 img/s


@pytest.mark.parametrize("status", ["skipped", "invalid"])
def test_rows_the_plan_settles_count_as_done_but_not_toward_the_drawing_rate(clock, status):
    clock[0] = 10.0
    rec = make_recorder(total=20, started=0.0)
    settled = [{**r, "status": status, "actor": None, "error": "bad" if status == "invalid" else None}
               for r in drawn(0, 10)]
    rec.record(settled)  # the plan settles these at once: no actor has drawn anything yet
    assert "left" not in rec.progress(clock[0])
    rec.record(drawn(10, 5))
    clock[0] = 15.0
    rec.record(drawn(15, 5))
    assert "20/20 rows (10 ok" in rec.progress(clock[0])
    assert "1.00 img/s" in rec.progress(clock[0])  # 5 drawn rows in the 5 s after the first ones came back


def test_rows_an_earlier_run_drew_are_counted_recovered_or_restored_and_not_drawn(clock, monkeypatch):
    """A restored row (failed since its last ok entry, mended) was counted as `recovered`, which the docs keep for
    a killed run's unrecorded images and the report lists apart; run.json, the summary line and the report's
    `drawn` figure take both out of what this run drew."""
    from jobs.plan import RESTORED

    rec = make_recorder(total=6, started=0.0)
    settled = drawn(0, 3)
    for row, warning in zip(settled, ["recovered: an earlier run drew this image", RESTORED, RESTORED]):
        row.update(actor=None, warning=warning)
    said = []
    monkeypatch.setattr(recorder, "log", said.append)
    rec.record(settled + drawn(3, 3))
    assert (rec.counts["ok"], rec.recovered, rec.restored, rec.drawn()) == (6, 1, 2, 3)
    assert said == []  # counted in the summary line, not a line each (a rerun after a kill said one per image)


def test_a_relabelled_row_is_written_to_the_ledger_but_counted_skipped_not_drawn(clock, monkeypatch):
    """A done row recorded again because its manifest columns changed drew nothing: run.json counts it skipped
    (and relabelled), the ledger gets its entry, and no line is said for it."""
    from jobs.outputs import recorded_again
    from jobs.plan import RELABELLED

    rec = make_recorder(total=3, started=0.0)
    relabelled, drawn_row, _ = drawn(0, 3)
    relabelled.update(actor=None, warning=recorded_again(RELABELLED, "prompt is 90 CLIP tokens"))
    said = []
    monkeypatch.setattr(recorder, "log", said.append)
    rec.record([relabelled, drawn_row])
    assert (rec.counts["ok"], rec.counts["skipped"], rec.relabelled, rec.drawn()) == (1, 1, 1, 1)
    assert [r["row"] for r in rec.pending] == [0, 1] and said == []


def test_relabelled_rows_go_into_large_ledger_parts_and_a_failed_read_leaves_them_skipped(clock, monkeypatch):
    """A column added to a catalogue relabels every row: in parts of 256 rows a million of them were ~3,900 parts
    that every later run reads; and the extra read of the ledger, failing, stopped the run before it drew."""
    import pyarrow as pa

    import jobs.generate as generate
    from jobs.plan import RELABELLED

    class Rows:  # what _record_relabelled reads of Ray Data's dataset
        def __init__(self, rows):
            self.rows = rows

        def iter_batches(self, **kwargs):
            yield pa.Table.from_pylist(self.rows)

    rows = [{**r, "id": f"r{r['row']}", "status": "skipped", "relabel": True} for r in drawn(0, 600)]
    entry = {"uri": "u", "sha256": "s", "png_bytes": 1, "watermark_bits": 1.0, "warning": None}
    monkeypatch.setattr(generate, "newest_ok_entries", lambda fs, root, ids: {i: entry for i in ids})
    rec = make_recorder(total=1200, started=0.0)
    generate._record_relabelled(Rows(rows), {r["id"] for r in rows}, rec)
    assert rec.parts == 0 and len(rec.pending) == 600 and rec.flush_rows == recorder.LEDGER_FLUSH_ROWS
    assert (rec.counts["skipped"], rec.relabelled) == (600, 600) and rec.pending[0]["warning"] == RELABELLED

    def refused(*args):
        raise OSError("SlowDown: reduce your request rate")

    monkeypatch.setattr(generate, "newest_ok_entries", refused)
    later = [{**r, "row": r["row"] + 600} for r in rows]
    generate._record_relabelled(Rows(later), {r["id"] for r in later}, rec)
    assert (rec.counts["skipped"], rec.relabelled, len(rec.pending)) == (1200, 600, 600)  # skipped, as they were


def test_an_entry_recorded_again_keeps_the_warning_its_image_was_drawn_with_once():
    from jobs.outputs import AS_DRAWN, recorded_again
    from jobs.plan import RELABELLED, RESTORED

    cut = "prompt is 90 CLIP tokens, over the 77 the model reads"
    once = recorded_again(RELABELLED, cut)
    assert once == f"{RELABELLED}{AS_DRAWN}{cut}"
    assert recorded_again(RESTORED, once) == f"{RESTORED}{AS_DRAWN}{cut}"  # not the mark before it, nor twice
    assert recorded_again(RELABELLED, RELABELLED) == RELABELLED and recorded_again(RELABELLED, None) == RELABELLED
    assert recorded_again(RELABELLED, "recovered: an earlier run drew this image") == RELABELLED


def test_a_row_problem_on_the_terminal_names_its_file_row_and_id(clock, monkeypatch):
    said = []
    monkeypatch.setattr(recorder, "log", said.append)
    rec = make_recorder(total=3, started=0.0)
    failed, invalid, warned = drawn(0, 3)
    failed.update(id="mug", status="failed", error="adapter 'x': no adapter store given (pass --adapters URI)")
    invalid.update(id="lamp", status="invalid", error="m.parquet row 1 (`lamp`): `steps` must be >= 1, got 0")
    warned.update(id="vase", warning="prompt is 90 CLIP tokens, over the 77 the model reads")
    rec.record([failed, invalid, warned])
    assert said[:3] == [
        "failed: m.parquet row 0 (`mug`): adapter 'x': no adapter store given (pass --adapters URI)",
        "invalid: m.parquet row 1 (`lamp`): `steps` must be >= 1, got 0",  # said where already: not twice
        "warning: m.parquet row 2 (`vase`): prompt is 90 CLIP tokens, over the 77 the model reads",
    ]
    # the ledger's error names the row as the line does (the report's Problems show it)
    assert [r["error"] for r in rec.pending if r["status"] == "failed"] == [
        "m.parquet row 0 (`mug`): adapter 'x': no adapter store given (pass --adapters URI)"]


def test_a_quiet_wait_for_rows_still_says_something(monkeypatch):
    """Actors that take long to start (an image pull, a model copy) must not look like a hung run."""
    said = []
    monkeypatch.setattr(recorder, "log", said.append)
    rec = make_recorder(total=24, started=0.0)
    rec.last_progress = 0.0  # the last line was long ago
    with rec.heartbeat(quiet_seconds=0.5):
        deadline = recorder.time.time() + 10
        while not said and recorder.time.time() < deadline:
            recorder.time.sleep(0.1)
    assert said and said[0].startswith("0/24 rows, ") and "waiting for the first images" in said[0], said
    assert said[0].endswith("(actors starting, loading the model)"), said
    count = len(said)
    recorder.time.sleep(1.5)
    assert len(said) == count, "no line once the body is done"

    # under --backend compile it said "loading the model" for five minutes after the model loaded in 13 s
    from jobs.generate import FIRST_WAIT

    rec.first_wait, rec.last_progress = FIRST_WAIT["compile"], 0.0
    with rec.heartbeat(quiet_seconds=0.5):
        deadline = recorder.time.time() + 10
        while len(said) == count and recorder.time.time() < deadline:
            recorder.time.sleep(0.1)
    assert said[-1].endswith("(actors starting, loading the model, then compiling it: minutes where --backend-cache "
                             "holds no graphs for it yet)"), said
    count = len(said)
    recorder.time.sleep(1.5)
    assert len(said) == count, "no line once the body is done"

    rec.waiting_for = "planning (each row against the ledger and the images in --out)"  # no actor yet: not them
    with rec.heartbeat(quiet_seconds=0.5):
        deadline = recorder.time.time() + 10
        while len(said) == count and recorder.time.time() < deadline:
            recorder.time.sleep(0.1)
    assert said[count].endswith("s in: planning (each row against the ledger and the images in --out)"), said


def test_ticking_says_its_line_while_the_body_runs(monkeypatch):
    """--plan-only of a million rows said nothing for 90 s: it says how far the plan is every 15 s."""
    import time

    from jobs import console

    said = []
    monkeypatch.setattr(console, "log", said.append)
    with console.ticking(lambda: f"planning: {len(said)}", seconds=0.2):
        time.sleep(1.0)
    count = len(said)
    time.sleep(0.5)
    assert count >= 2 and said[:2] == ["planning: 0", "planning: 1"] and len(said) == count, said


def test_failed_rows_past_the_first_fifty_are_counted_not_printed(clock, monkeypatch):
    """A missing adapter fails every row of a catalogue: a line each buried the progress (20,000 lines for 20,000
    rows, hundreds of MB in a RayJob's driver log). The first PROBLEMS_SHOWN are said, then one line; the counts
    and the ledger keep every one."""
    said = []
    monkeypatch.setattr(recorder, "log", said.append)
    rec = make_recorder(total=300, started=0.0)
    failed = [{**row, "status": "failed", "actor": None, "error": f"adapter 'x': not in the store (row {row['row']})",
               "id": f"r{row['row']}", "uri": None, "sha256": None} for row in drawn(0, 300)]
    rec.record(failed[:200])
    rec.record(failed[200:])
    problems = [line for line in said if line.startswith("failed: ")]
    assert len(problems) == recorder.PROBLEMS_SHOWN and "(row 0)" in problems[0]
    assert sum("the first 50 failed or invalid rows are shown; the ledger has every one" in line for line in said) == 1
    assert rec.counts["failed"] == 300 and rec.parts == 1 and not rec.pending  # all 300 in the ledger part


@pytest.mark.parametrize("warned", [5, 8])
def test_warnings_past_the_first_five_are_counted_and_said_once(clock, monkeypatch, warned):
    """Eight prompts over CLIP's 77 tokens printed five warnings and then nothing: the docs promise a line saying
    the ledger holds the rest, and only where there is a rest."""
    said = []
    monkeypatch.setattr(recorder, "log", said.append)
    rec = make_recorder(total=10, started=0.0)
    rows = [{**row, "warning": f"prompt cut at 77 tokens (row {row['row']})" if row["row"] < warned else None}
            for row in drawn(0, 10)]
    rec.record(rows)
    assert sum(line.startswith("warning: ") for line in said) == 5
    note = "(the first 5 warnings are shown; the ledger's `warning` column has every one"
    assert sum(note in line for line in said) == (warned > 5), said


def test_a_compile_backend_that_gives_up_on_a_function_is_said_once(clock, monkeypatch):
    """torch.compile drawing a function eagerly after too many sizes was said only in the actor's log file."""
    import json

    said = []
    monkeypatch.setattr(recorder, "log", said.append)
    rec = make_recorder(total=12, started=0.0)
    for start, fallbacks in ((0, 0), (4, 1), (8, 1)):
        stats = json.dumps({"calls": start, "eager_fallbacks": fallbacks})
        rec.record([{**r, "backend_stats": stats} for r in drawn(start, 4)])
    notes = [line for line in said if "gave up" in line]
    assert notes == ["note: a1: torch.compile gave up on 1 function(s) after rebuilding them for too many image or "
                     "batch sizes, and draws them eagerly (correct, slower); fewer sizes per run, or --backend eager, "
                     "avoid it"], said

