"""Crash safety: kill the driver and its local Ray mid-run, run again, and nothing is lost or doubled.

Three kill points: at the start (the lease taken, nothing drawn), late (after ledger parts were written),
and inside the ledger's flush window (images written, not one recorded yet). Either way the rerun records each row `ok` exactly once, and an image the
killed run finished is never drawn again: the rerun finds its `params_hash` in the PNG and records it."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, ledger, pixels, rows, run_summary, sdfleet, write_manifest


def _ray_processes_of(driver: int) -> set[int]:
    """The Ray processes the driver started (GCS, raylet, workers), found by descent from it: other Ray runs on
    the machine (a test beside this one, a helper's run) are not counted."""
    parents = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parents[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {driver}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    alive = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.add(pid)
        except OSError:
            continue
    return alive


def _ray_outlives(driver: int, stop, ray_started: bool = True) -> set[int]:
    """Stop the driver with `stop()`, then the processes it had started that are still running 90 s later (the
    raylet's agents, in a session of their own, end within about a minute of the raylet: their last report to a
    GCS that is gone waits 60 s). `ray_started`: the driver is known to have started Ray by now (else the check
    would check nothing)."""
    started = _ray_processes_of(driver)
    if ray_started:
        assert any(b"raylet" in _cmdline(pid) for pid in started), "found no raylet under the driver: nothing checked"
    stop()
    deadline = time.time() + 90
    while _alive(started) and time.time() < deadline:
        time.sleep(0.5)
    return _alive(started)


def _kill_when(tmp_path, manifest, out, flush_seconds: str, ready, ray_started: bool = True) -> None:
    """Start `generate`, wait until `ready(out)`, then kill -9 the driver and everything it started."""
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs", "generate", str(manifest), "--out", str(out), "--batch-size", "4"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "SDFLEET_LEDGER_FLUSH_SECONDS": flush_seconds},
        stdout=log, stderr=log, start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not ready(out):
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        time.sleep(0.2)
    # the driver and everything it started in its session
    assert not _ray_outlives(proc.pid, lambda: (os.killpg(proc.pid, signal.SIGKILL), proc.wait()), ray_started), \
        "local Ray outlived the killed driver"


def _parts(out) -> int:
    return len(list((out / "results").glob("*.parquet")))


def _images(out) -> dict[str, tuple[int, int]]:
    """id -> (inode, mtime in ns) of every image: a redrawn image gets a new file."""
    return {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").glob("*.png")}


@pytest.mark.parametrize("when", ["late", "before-any-ledger-part", "at-start"])
def test_kill_mid_run_then_rerun_records_every_row_once_and_redraws_nothing_finished(tmp_path, when):
    records = rows(24, steps=3)
    manifest = write_manifest(tmp_path / "m.parquet", records)
    out = tmp_path / "out"
    if when == "late":  # a ledger part per batch; killed after two
        _kill_when(tmp_path, manifest, out, "0", lambda o: _parts(o) >= 2)
    elif when == "before-any-ledger-part":  # no part within the run's life: killed once 6 images are written
        _kill_when(tmp_path, manifest, out, "600", lambda o: (o / "images").exists() and len(_images(o)) >= 6)
    else:  # killed as soon as it holds the output's lease: the rerun takes the dead run's lease over
        # (the lease comes before Ray starts)
        _kill_when(tmp_path, manifest, out, "0", lambda o: (o / ".sdfleet-lease.json").exists(), ray_started=False)

    first = ledger(out)
    recorded = {e["id"] for e in first if e["status"] == "ok"}
    written = _images(out)
    assert len(written) < len(records), "the kill should land mid-run"
    assert recorded <= set(written) and (recorded if when == "late" else not recorded)
    for png in (out / "images").glob("*.png"):
        pixels(png)  # every visible image is complete: atomic writes
    leftovers = (out / "images").iterdir() if (out / "images").exists() else ()
    assert not [p for p in leftovers if p.suffix != ".png" and not p.name.startswith(".")]

    proc = sdfleet("generate", str(manifest), "--out", str(out), "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "taking over the lease of run" in proc.stderr, "the killed run's lease was left for the rerun to take"
    summary = run_summary(out)
    assert summary["skipped"] == len(recorded)
    assert summary["recovered"] == len(written) - len(recorded)  # finished but unrecorded: recorded now
    assert summary["ok"] == len(records) - len(recorded)
    drawn = summary["ok"] - summary["recovered"]  # the rate is of what this run drew, not what it found
    assert summary["images_per_second"] == pytest.approx(drawn / summary["wall_seconds"], abs=1e-3)
    after = _images(out)
    assert {i: after[i] for i in written} == written, "an image the killed run finished was drawn again"
    ok_ids = [e["id"] for e in ledger(out) if e["status"] == "ok"]
    assert sorted(ok_ids) == sorted(r["id"] for r in records), "every row ok exactly once"
    recovered = [e for e in ledger(out)[len(first):] if e["id"] in written and e["id"] not in recorded]
    assert all(e["warning"].startswith("recovered") and e["sha256"] for e in recovered)
    assert all(e["png_bytes"] == (out / "images" / f"{e['id']}.png").stat().st_size for e in recovered)
    assert sorted(after) == sorted(r["id"] for r in records)


@pytest.mark.parametrize("signum, code, said_", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "stopped by SIGTERM"),
                                                 (signal.SIGHUP, 129, "stopped by SIGHUP")],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_keeps_what_came_back_in_the_ledger_and_the_rerun_says_what_it_recovered(tmp_path, signum, code, said_):
    """Ctrl-C (SIGINT to the driver): the rows that came back are in the ledger, as the CLI says, even inside
    the ledger's flush window; local Ray goes with the driver; a rerun draws the rest and says how many
    images it recovered rather than counting them as drawn. SIGTERM (Kubernetes, `ray job stop`) the same,
    exit 143: Ray's own handler exited 15 with nothing said and the rows back at the driver unrecorded; its
    rerun is SIGINT's, not repeated. SIGHUP as a closed terminal sends it: to the whole process group, local
    Ray's processes included (they died with the driver, mid-stop), with the terminal gone (every line written to
    it fails): the same stop, exit 129, the lease removed. (48 rows of 10 steps: 24 of 3 steps were all drawn in
    the second the test waits before the signal; 40 rows of 10 steps are ~10 s of drawing on 2 cores.)"""
    records = rows(48, steps=10)
    manifest = write_manifest(tmp_path / "m.parquet", records)
    out = tmp_path / "out"
    log = open(tmp_path / "run1.log", "w")
    hangup = signum == signal.SIGHUP
    terminal, stderr = pty.openpty() if hangup else (None, log)  # (master, the driver's stderr)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs", "generate", str(manifest), "--out", str(out), "--batch-size", "4"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "SDFLEET_LEDGER_FLUSH_SECONDS": "600"},
        stdout=log, stderr=stderr, start_new_session=hangup,
    )
    if hangup:
        os.close(stderr)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "images").exists() and len(_images(out)) >= 8):
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1)  # the first batch's rows are back at the driver by now

    def stop():
        if hangup:  # the terminal goes, and its hang-up reaches every process of the group
            os.close(terminal)
            os.killpg(proc.pid, signal.SIGHUP)
        else:
            proc.send_signal(signum)
        codes.append(proc.wait(timeout=120))

    codes = []
    outlived = _ray_outlives(proc.pid, stop)
    assert codes == [code], (tmp_path / "run1.log").read_text()[-3000:]
    assert not outlived, "local Ray outlived the interrupted driver"
    recorded = {e["id"] for e in ledger(out) if e["status"] == "ok"}
    written = _images(out)
    assert 4 <= len(recorded) and recorded <= set(written) and len(written) < len(records), (recorded, written)
    if hangup:  # (what it said went to the closed terminal)
        assert not (out / ".sdfleet-lease.json").exists(), "the lease was left behind"
        return
    said = (tmp_path / "run1.log").read_text()
    assert f"{said_}; finished rows are in the ledger" in said and "Traceback" not in said, said[-3000:]
    if signum == signal.SIGTERM:
        return

    proc = sdfleet("generate", str(manifest), "--out", str(out), "--batch-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = run_summary(out)
    assert (summary["skipped"], summary["recovered"]) == (len(recorded), len(written) - len(recorded))
    drawn = len(records) - len(written)
    recovered = f", {summary['recovered']} recovered" if summary["recovered"] else ""
    assert f"{drawn} drawn{recovered}, {len(recorded)} skipped" in proc.stderr, proc.stderr[-2000:]
    assert sorted(e["id"] for e in ledger(out) if e["status"] == "ok") == sorted(r["id"] for r in records)
