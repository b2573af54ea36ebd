"""One run per output: a lease on `--out`, an object beside the results that names the run holding it.

The run that holds the lease rewrites its heartbeat every HEARTBEAT_SECONDS. Another run into the same
`--out` refuses, saying who holds it and since when, or with `--wait` waits for it to go. A lease whose
heartbeat is older than STALE_SECONDS belongs to a run that died without letting go (kill -9, a lost
node): the next run takes it over and says so, at once when the holder ran on the same machine and its
process is gone. Two runs that start in the same instant both write the
lease and read it back a moment later (`confirm`, before the run writes anything else): the one that no
longer finds its own run id there steps back."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time

from jobs.console import log
from jobs.errors import OutputTaken, RunFailed, one_line
from manifests.ledger import atomic_write

LEASE_FILE = ".sdfleet-lease.json"
HEARTBEAT_SECONDS = float(os.environ.get("SDFLEET_LEASE_HEARTBEAT_SECONDS", "10"))
STALE_SECONDS = float(os.environ.get("SDFLEET_LEASE_STALE_SECONDS", "60"))
SETTLE_SECONDS = 1.0  # how long a new holder waits before reading its lease back
WAIT_POLL_SECONDS = 5.0
WAIT_SAY_SECONDS = 60.0  # --wait says it still waits this often


def _now() -> float:
    return time.time()


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="seconds")


class Lease:
    """The lease of run `run_id` on the output root `root` of `fs`; use as a context manager."""

    def __init__(self, fs, root: str, run_id: str, wait: bool = False):
        self.fs, self.path, self.run_id, self.wait = fs, f"{root.rstrip('/')}/{LEASE_FILE}", run_id, wait
        self.where = fs.unstrip_protocol(root)
        self.record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": _iso(_now())}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._claimed_at = 0.0  # time.monotonic() of our last claim

    # -- reading and writing the lease object ------------------------------------------------------------

    def holder(self) -> dict | None:
        """The lease as it is in the store, or None when there is none (or it cannot be parsed)."""
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        except Exception as exc:  # any store error: the output cannot be used
            raise RunFailed(f"cannot read the lease {self.fs.unstrip_protocol(self.path)}: {one_line(exc)}") from exc
        try:
            held = json.loads(data)
            if isinstance(held, dict):
                return held
        except ValueError:
            pass
        if not getattr(self, "_said_damaged", False):  # no run wrote this: sdfleet writes its lease whole
            self._said_damaged = True
            log(f"--out {self.where}: the lease file {self.fs.unstrip_protocol(self.path)} is not a lease "
                f"({len(data)} bytes that are not a JSON object); taking it over")
        return None

    def _write(self) -> None:
        data = json.dumps({**self.record, "heartbeat": _now()}).encode()
        try:
            atomic_write(self.fs, self.path, data)
        except Exception as exc:  # the output store refuses a small write: nothing else would work either
            raise RunFailed(f"cannot write the lease {self.fs.unstrip_protocol(self.path)}: {one_line(exc)}") from exc

    # -- taking and giving back --------------------------------------------------------------------------

    def __enter__(self) -> "Lease":
        """Claim the output; call `confirm()` before writing anything else to it."""
        self._claim()
        return self

    def _claim(self) -> None:
        """Refuse (or, with --wait, wait) while a live run holds the lease, then write our claim."""
        waited_for, since, said_at = None, 0.0, 0.0  # the run waited for, since when, when that was last said
        while True:
            held = self.holder()
            if held and held.get("run_id") != self.run_id:
                age = _now() - float(held.get("heartbeat", 0))
                if age <= STALE_SECONDS and not self._holder_gone(held):
                    if not self.wait:
                        raise RunFailed(self._busy(held, age))
                    # said once per run waited for, then a line a minute (every poll was 720 lines an hour)
                    now = time.monotonic()
                    if since == 0.0 or held.get("run_id") != waited_for:
                        log(self._busy(held, age, waiting=True))
                        waited_for, since, said_at = held.get("run_id"), now, now
                    elif now - said_at >= WAIT_SAY_SECONDS:
                        log(f"--out {self.where}: still waiting for run {waited_for} ({now - since:.0f} s so far)")
                        said_at = now
                    time.sleep(WAIT_POLL_SECONDS)
                    continue
                why = "its process is gone" if self._holder_gone(held) else f"no heartbeat for {age:.0f} s"
                log(f"--out {self.where}: taking over the lease of run {held.get('run_id')} (host "
                    f"{held.get('host')}, pid {held.get('pid')}): {why}, so that run has stopped")
            self._write()
            self._claimed_at = time.monotonic()
            return

    def confirm(self) -> None:
        """Make sure the claim held: a run that started in the same instant wrote its claim too, and the
        last writer holds the lease. Waits until SETTLE_SECONDS after our claim (start-up work done in
        between, such as starting Ray, hides the wait), reads the lease back, then keeps it alive."""
        while True:
            time.sleep(max(0.0, SETTLE_SECONDS - (time.monotonic() - self._claimed_at)))
            held = self.holder()
            if held and held.get("run_id") == self.run_id:
                break
            if not self.wait and held:
                raise OutputTaken(self._busy(held, _now() - float(held.get("heartbeat", 0))))
            self._claim()  # with --wait (or the lease vanished): wait for it and claim it again
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="sdfleet-lease", daemon=True)
            self._beat.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=HEARTBEAT_SECONDS + 5)
        try:
            held = self.holder()
            if held and held.get("run_id") == self.run_id:
                self.fs.rm_file(self.path)
        except Exception:  # noqa: BLE001 - a store gone now must not hide why the run ended; a lease
            pass  # left behind goes stale and is taken over by the next run

    def _holder_gone(self, held: dict) -> bool:
        """True when the holder ran on this machine and its process no longer exists (killed, crashed):
        its lease is taken over at once instead of after STALE_SECONDS."""
        if held.get("host") != self.record["host"] or not isinstance(held.get("pid"), int):
            return False
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except OSError:  # it exists, as another user's process
            return False
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                held = self.holder()
                if held and held.get("run_id") != self.run_id:  # taken over while this run went without a beat
                    self._taken_over(held)
                    return
                self._write()
            except RunFailed as exc:  # keep drawing; the next beat may get through
                log(f"warning: {exc}")

    def _taken_over(self, held: dict) -> None:
        """Another run took the lease after this one went STALE_SECONDS without a heartbeat (the process
        suspended, a VM paused, a store that did not answer): writing on would make two runs of one output, and
        rewriting the lease would hide it from the other. This run stops, as on Ctrl-C, and says why."""
        from cluster.connect import stop_main

        stop_main(f"--out {self.where} was taken over by run {held.get('run_id')} (host {held.get('host')}, pid "
                  f"{held.get('pid')}) while this run went without a heartbeat for over {STALE_SECONDS:.0f} s "
                  "(suspended, or the store did not answer): one output takes one run, so this one stops")

    def _busy(self, held: dict, age: float, waiting: bool = False) -> str:
        what = (f"--out {self.where} is in use by run {held.get('run_id')} (host {held.get('host')}, pid "
                f"{held.get('pid')}) since {held.get('since')}, last heartbeat {age:.0f} s ago")
        if waiting:
            return what + "; waiting for it (--wait)"
        return what + ("; wait for it to finish (or pass --wait), or use another --out. A run that died "
                       f"leaves a lease that is taken over after {STALE_SECONDS:.0f} s without a heartbeat")
