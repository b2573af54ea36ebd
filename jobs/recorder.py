"""The driver's side of a run's results: ledger rows streamed back from the stages are checked for identity
(one row out per row in), written as ledger parts, counted, and shown as progress and row problems."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import time

from actors import metrics
from jobs.console import in_background, log, without_passwords
from jobs.errors import RunFailed, one_line
from jobs.outputs import is_recovered, is_relabelled, is_restored
from manifests.ledger import write_part
from manifests.schema import row_location

# A ledger part is written when this many rows or seconds have gathered: a killed run loses at most
# that much ledger (those rows are drawn again on rerun, never duplicated).
LEDGER_FLUSH_ROWS = 256
LEDGER_FLUSH_SECONDS = float(os.environ.get("SDFLEET_LEDGER_FLUSH_SECONDS", "10"))
PROGRESS_SECONDS = 5.0
HEARTBEAT_SECONDS = 15.0  # a line at least this often while rows are awaited
WARNINGS_SHOWN = 5  # row warnings printed in full; the ledger holds every one
# failed and invalid rows printed in full: a catalogue whose adapter is missing fails every row, and a line
# each buried the progress (and wrote hundreds of MB into a RayJob's driver log); the ledger holds every one
PROBLEMS_SHOWN = 50


class Recorder:
    """Takes every ledger row of one run exactly once, writes them in parts under `root`/results, and keeps
    the tallies that go into run.json."""

    def __init__(self, fs, root: str, run_id: str, total: int, started: float):
        self.fs, self.root, self.run_id = fs, root, run_id
        self.total, self.started = total, started
        self.counts = {"ok": 0, "skipped": 0, "failed": 0, "invalid": 0}
        self.per_actor: dict[str, int] = {}
        self.swaps: dict[str, tuple[int, float]] = {}  # actor -> its running (swaps, seconds), newest seen
        self.backend_stats: dict[str, dict] = {}  # actor -> its backend's counters (compiles, ...), newest seen
        self.seen: set[tuple[str, int]] = set()
        self.pending: list[dict] = []
        self.parts = 0
        self.recovered = 0  # ok rows whose image an earlier, killed run wrote without recording it
        self.flush_rows = LEDGER_FLUSH_ROWS  # rows gathered before a ledger part is written (or the time passes)
        self.restored = 0  # ok rows failed since their last ok entry, which vouches for their image (plan.RESTORED)
        self.relabelled = 0  # done rows recorded again with their changed pass-through columns (counted skipped)
        self.last_flush = self.last_progress = time.time()
        self.warnings_shown = self.problems_shown = 0
        self.first_written: float | None = None  # when the first image was written (wall clock)
        self.first_drawn: tuple[float, int] | None = None  # (when, images drawn) at the first ones back
        self.planned_at = 0.0  # the latest plan task's finish seen on a row (wall clock)
        self.waiting_for: str | None = None  # what the heartbeat says the run waits for, where rows cannot say
        self.first_wait = "actors starting, loading the model"  # before any image: what the actors are doing

    def record(self, rows: list[dict]) -> None:
        before = dict(self.counts)
        for row in rows:
            key = (row["source"], row["row"])
            if key in self.seen:  # Ray retried a batch that had already come back: keep the first
                continue
            self.seen.add(key)
            self.counts["skipped" if is_relabelled(row) else row["status"]] += 1  # (recorded again, not drawn)
            if row["status"] == "invalid" or (row["status"] == "failed" and not row.get("actor")):
                metrics.row_failures("invalid" if row["status"] == "invalid" else "adapter")  # settled by the plan
            self.planned_at = max(self.planned_at, row.get("planned_at") or 0.0)
            if row.get("actor"):
                self._actor_counters(row)
            if row["status"] == "skipped":
                continue
            if row["status"] == "failed" and row.get("error"):  # the ledger's error names the row, as the line
                row = {**row, "error": located(row, row["error"])}  # does (the plan's `invalid` ones do already)
            self.pending.append(row)
            if row["status"] == "ok" and not row.get("actor"):  # the plan settled it: drawn by an earlier run
                if is_restored(row):
                    self.restored += 1
                elif is_relabelled(row):
                    self.relabelled += 1
                else:
                    self.recovered += 1
            elif row["status"] == "ok":
                self.per_actor[row["actor"]] = self.per_actor.get(row["actor"], 0) + 1
                if self.first_written is None:
                    self.first_written = dt.datetime.fromisoformat(row["finished_at"]).timestamp()
            if row["status"] != "ok":
                self.problems_shown += 1
                if self.problems_shown <= PROBLEMS_SHOWN:
                    log(f"{row['status']}: {located(row, row['error'])}")
                elif self.problems_shown == PROBLEMS_SHOWN + 1:  # said once, when there are more than shown
                    log(f"(the first {PROBLEMS_SHOWN} failed or invalid rows are shown; the ledger has every one, "
                        "and `sdfleet report` shows them)")
            # (rows an earlier run drew are counted in the summary line: a killed run's, a line each, said nothing)
            elif row["warning"] and not (is_recovered(row) or is_restored(row) or is_relabelled(row)):
                self.warnings_shown += 1
                if self.warnings_shown <= WARNINGS_SHOWN:
                    log(f"warning: {located(row, row['warning'])}")  # (drawn: a warning is no error)
                elif self.warnings_shown == WARNINGS_SHOWN + 1:
                    log(f"(the first {WARNINGS_SHOWN} warnings are shown; the ledger's `warning` column has every "
                        "one, and `sdfleet report` shows them)")
        metrics.rows_recorded({status: n - before[status] for status, n in self.counts.items()},
                              remaining=self.total - sum(self.counts.values()))
        now = time.time()
        if self.first_drawn is None and self.per_actor:
            self.first_drawn = (now, self.drawn())
        if len(self.pending) >= self.flush_rows or now - self.last_flush >= LEDGER_FLUSH_SECONDS:
            self.flush()
        if now - self.last_progress >= PROGRESS_SECONDS:
            self.last_progress = now
            log(self.progress(now))

    def _actor_counters(self, row: dict) -> None:
        actor = row["actor"]
        self.swaps[actor] = max(self.swaps.get(actor, (0, 0.0)),
                                (row["adapter_swaps"] or 0, row["adapter_swap_seconds"] or 0.0))
        if row.get("backend_stats"):  # the actor's running counters: keep its newest
            stats = json.loads(row["backend_stats"])
            before = self.backend_stats.get(actor, {"calls": -1})
            if stats["calls"] >= before["calls"]:
                self.backend_stats[actor] = stats
                if stats.get("eager_fallbacks", 0) > before.get("eager_fallbacks", 0):  # said once per new one
                    log(f"note: {actor}: torch.compile gave up on {stats['eager_fallbacks']} function(s) after "
                        "rebuilding them for too many image or batch sizes, and draws them eagerly (correct, "
                        "slower); fewer sizes per run, or --backend eager, avoid it")

    def flush(self) -> None:
        """Write what has gathered as one ledger part; a store that refuses it is one RunFailed line."""
        if self.pending:
            try:
                write_part(self.fs, self.root, self.run_id, self.parts, [_without_passwords(r) for r in self.pending])
            except Exception as exc:  # any store error means the same here: the ledger cannot grow
                raise RunFailed(f"cannot write the ledger to {self.fs.unstrip_protocol(self.root)}/results: "
                                f"{one_line(exc)}; the images and ledger parts written before are kept, "
                                "rerun once the store takes writes") from exc
            self.parts += 1
            self.pending = []
        self.last_flush = time.time()

    def keep_what_finished(self) -> None:
        """On the way out of a failed run: write the rows gathered so far if the store still takes them."""
        try:
            self.flush()
        except RunFailed:
            pass  # the run is already failing with its own message; the store's refusal would hide it

    def drawn(self) -> int:
        """Images the actors have drawn in this run (not those recovered from a killed one)."""
        return sum(self.per_actor.values())

    @contextlib.contextmanager
    def heartbeat(self, quiet_seconds: float = HEARTBEAT_SECONDS):
        """While the body runs, a line whenever `quiet_seconds` pass without one: a run whose actors are still
        starting (a minute or more on a cluster: an image pull, a model copy) does not look hung."""

        def beat(stop):
            while not stop.wait(1.0):
                now = time.time()
                if now - self.last_progress >= quiet_seconds:
                    self.last_progress = now
                    done = sum(self.counts.values())
                    what = (self.waiting_for or (f"waiting for the first images ({self.first_wait})"
                                                 if not self.drawn() else "waiting for the next batch"))
                    log(f"{done}/{self.total} rows, {now - self.started:.0f} s in: {what}")

        with in_background(beat, "sdfleet-heartbeat"):
            yield

    def progress(self, now: float) -> str:
        """One progress line. The rate is the actors' since their first rows came back, so start-up (Ray, model
        loading) does not stretch the estimate of what is left; until a second lot is back, there is no estimate."""
        counts, finished = self.counts, sum(self.counts.values())
        elapsed, drawn = now - self.started, self.drawn()
        rate = drawn / elapsed if elapsed > 0 else 0.0
        left, eta = self.total - finished, ""
        if self.first_drawn is not None and drawn > self.first_drawn[1] and now > self.first_drawn[0]:
            rate = (drawn - self.first_drawn[1]) / (now - self.first_drawn[0])
            eta = f", ~{math.ceil(left / rate)} s left" if left else ""
        return (f"{finished}/{self.total} rows ({counts['ok']} ok, {counts['skipped']} skipped, "
                f"{counts['failed']} failed, {counts['invalid']} invalid), {rate:.2f} img/s{eta}")

    def startup_stamps(self, startup: dict) -> dict:
        """`startup` with the actors' own stamps added: first actor started, model loaded, first image written."""
        for key, stamp in (("first_actor_started", "actor_started_at"), ("model_loaded", "model_loaded_at")):
            stamps = [stats[stamp] for stats in self.backend_stats.values() if stamp in stats]
            if stamps:
                startup[key] = round(min(stamps) - self.started, 3)
        if self.first_written is not None:
            startup["first_image_written"] = round(self.first_written - self.started, 3)
        return startup

    def adapter_swaps(self) -> dict:
        return {"total": sum(n for n, _ in self.swaps.values()),
                "per_actor": {actor: n for actor, (n, _) in self.swaps.items()},
                "seconds": round(sum(t for _, t in self.swaps.values()), 3)}


LEDGER_TEXT = ("source", "error", "warning")  # ledger columns whose text may name a URI the user gave


def _without_passwords(row: dict) -> dict:
    """`row` with any URI password in its text columns shown as *** (a damaged manifest's error names the file,
    an adapter's error the store): the ledger travels with the images, secrets stay in the environment."""
    return {**row, **{k: without_passwords(row[k]) for k in LEDGER_TEXT if isinstance(row.get(k), str)}}


def located(row: dict, message: str) -> str:
    """`message` about `row`, led by where the row is (file, 0-based row, id) unless it says so already."""
    where = row_location(row.get("source"), row.get("row"), row.get("id"))
    return message if message.startswith(f"{row.get('source')} row ") else f"{where}: {message}"
