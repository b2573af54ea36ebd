"""Crash safety: kill the driver and its local Ray mid-run, run again, and nothing is lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from helpers import REPO, ledger, pixels, rows, run_summary, sdfleet, write_manifest


def _ray_processes() -> set[int]:
    found = set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"raylet" in cmd or b"gcs_server" in cmd or b"ray::" in cmd:
            found.add(int(pid))
    return found


def test_kill_mid_run_then_rerun_completes_without_duplicates(tmp_path):
    records = rows(40, steps=3)
    manifest = write_manifest(tmp_path / "m.parquet", records)
    out = tmp_path / "out"
    before = _ray_processes()
    log = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs", "generate", str(manifest), "--out", str(out), "--batch-size", "4"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "SDFLEET_LEDGER_FLUSH_SECONDS": "0"},
        stdout=log, stderr=log, start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / "results").glob("*.parquet"))) < 2:
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started in its session
    proc.wait()
    deadline = time.time() + 60
    while _ray_processes() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - before, "local Ray outlived the killed driver"

    first = ledger(out)
    finished = {e["id"] for e in first if e["status"] == "ok"}
    assert 0 < len(finished) < len(records), "the kill should land mid-run"
    for png in (out / "images").glob("*.png"):
        pixels(png)  # every visible image is complete: atomic writes
    assert not [p for p in (out / "images").iterdir() if p.suffix != ".png" and not p.name.startswith(".")]

    proc2 = sdfleet("generate", str(manifest), "--out", str(out), "--batch-size", "4")
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    summary = run_summary(out)
    assert summary["skipped"] == len(finished)
    assert summary["ok"] == len(records) - len(finished)
    second = ledger(out)[len(first):]
    assert not finished & {e["id"] for e in second}, "finished rows were drawn again"
    ok_ids = [e["id"] for e in ledger(out) if e["status"] == "ok"]
    assert sorted(ok_ids) == sorted(r["id"] for r in records), "every row exactly once"
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(r["id"] for r in records)
