"""Which block, and which row, an actor was drawing when it died, so a row that kills its actor fails alone.

Ray restarts an actor that dies (a crash in native code, out of memory, a lost node) and hands it the same
block again. The journal, one small Ray actor per run, counts how often each block and row was started:
a block started before was being drawn when an actor died, so its rows are drawn one at a time; a row
started before killed an actor on its own, so it is recorded `failed` instead of being drawn a third time.
The counts live outside the actors because an actor that dies takes its memory with it."""

from __future__ import annotations

import os

JOURNAL_NAME = "sdfleet-crash-journal-{run_id}"
# Test-only: the id of a row whose drawing kills the actor process, to test the above without a real crash;
# and, set to anything, kill every actor as it starts.
KILL_ON_ROW_ENV = "SDFLEET_TEST_KILL_ACTOR_ON_ROW"
KILL_AT_START_ENV = "SDFLEET_TEST_KILL_ACTOR_AT_START"
# An actor that dies this many times before its model is loaded stops the run: Ray Data restarts pool actors
# without end, and an actor that runs out of memory loading a model too large for its node dies every time.
START_DEATHS = 3


class ActorStartFailed(RuntimeError):
    """An actor keeps dying before it can draw (raised in its constructor, which stops the run)."""


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


def check_start(journal, actor_id: str, what: str) -> str:
    """Note an actor's start in the journal; returns the key to `end` once it is ready. Raises ActorStartFailed
    when this actor has died START_DEATHS times before getting ready (Ray restarts it under the same id)."""
    import ray

    key = f"start:{actor_id}"
    died = ray.get(journal.begin.remote(key))
    if died >= START_DEATHS:
        raise ActorStartFailed(
            f"a generation actor died {died} times while starting ({what}), before it drew anything: out of memory "
            "(a model too large for the node's memory or its GPU), or a crash in native code; Ray's worker logs say "
            "which (the raylet's logs/ folder of the Ray session, or `ray logs`)")
    if os.environ.get(KILL_AT_START_ENV):
        os._exit(1)
    return key
