"""Which block, and which row, an actor was drawing when it died, so a row that kills its actor fails alone.

Ray restarts an actor that dies (a crash in native code, out of memory, a lost node) and hands it the same
block again. The journal, one small Ray actor per run, counts how often each block and row was started:
a block started before was being drawn when an actor died, so its rows are drawn one at a time; a row
started before killed an actor on its own, so it is recorded `failed` instead of being drawn a third time.
The counts live outside the actors because an actor that dies takes its memory with it."""

from __future__ import annotations

import os

JOURNAL_NAME = "sdfleet-crash-journal-{run_id}"
# Test-only: the id of a row whose drawing kills the actor process, to test the above without a real crash.
KILL_ON_ROW_ENV = "SDFLEET_TEST_KILL_ACTOR_ON_ROW"


class CrashJournal:
    """Start counts of blocks and rows that have not finished; `ray.remote` makes it the run's journal."""

    def __init__(self):
        self.started: dict[str, int] = {}

    def begin(self, key: str) -> int:
        """Note that `key` starts; returns how often it had started before without finishing."""
        before = self.started.get(key, 0)
        self.started[key] = before + 1
        return before

    def end(self, key: str) -> None:
        self.started.pop(key, None)


def start_journal(run_id: str):
    """The run's journal actor (driver side); it goes when the run's Ray job ends."""
    import ray

    return ray.remote(num_cpus=0)(CrashJournal).options(name=JOURNAL_NAME.format(run_id=run_id)).remote()


def kill_if_asked(rows: list[dict]) -> None:
    victim = os.environ.get(KILL_ON_ROW_ENV)
    if victim and any(row["id"] == victim for row in rows):
        os._exit(1)
