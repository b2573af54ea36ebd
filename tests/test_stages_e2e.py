"""The two stages end to end on local Ray: the finishing stage and the in-actor path write the same files,
a finishing worker that dies loses no row, and run.json says where start-up time went."""

from __future__ import annotations

import collections

import pytest

from helpers import ledger, rows, run_summary, sdfleet, sdfleet_side_by_side, write_manifest

STARTUP = ("ray_connected", "plan_done", "first_actor_started", "model_loaded", "first_image_written")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    records = rows(10)
    for record in records[:4]:
        record["scheduler"] = "euler"  # two groups, so batches of 4 come from more than one group
    return write_manifest(tmp_path_factory.mktemp("stages") / "m.parquet", records)


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory):
    """The same rows finished in their own stage and in the actors, side by side. In the stage run the test
    hook kills the first finishing worker (its rows must still all be written once), and neither run says
    --verbose (Ray's lines about the dead worker must reach the log file, not the terminal)."""
    base = tmp_path_factory.mktemp("stages")
    out = {mode: base / mode / "out" for mode in ("stage", "inline")}
    marker = base / "crashed"
    procs = sdfleet_side_by_side({mode: ["generate", str(manifest), "--out", str(target), "--batch-size", "4",
                                         "--finish", mode] for mode, target in out.items()},
                                 envs={"stage": {"SDFLEET_TEST_CRASH_FINISH_ONCE": str(marker)}})
    for proc in procs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "procs": procs, "crashed": marker}


def test_stage_and_inline_write_the_same_images_with_marks_read_back(runs):
    by_mode = {mode: {e["id"]: e for e in ledger(out)} for mode, out in runs["out"].items()}
    assert len(by_mode["stage"]) == 10 and by_mode["stage"].keys() == by_mode["inline"].keys()
    for rid, entry in by_mode["stage"].items():
        assert entry["status"] == "ok" and entry["watermark"] == "sdfleet"
        assert entry["watermark_bits"] == 1.0, rid
        assert entry["sha256"] == by_mode["inline"][rid]["sha256"], f"{rid}: the two paths wrote different files"
    assert run_summary(runs["out"]["stage"])["finish"] == "stage"
    assert run_summary(runs["out"]["inline"])["finish"] == "inline"


def test_run_json_reports_startup_in_order(runs):
    startup = run_summary(runs["out"]["stage"])["startup"]
    assert list(startup) == [k for k in STARTUP if k in startup] and set(startup) == set(STARTUP), startup
    times = [startup[k] for k in STARTUP]
    assert all(0 <= t for t in times) and times[0] <= times[1] and times[3] <= times[4], startup
    assert startup["first_image_written"] <= run_summary(runs["out"]["stage"])["wall_seconds"]


def test_each_actor_draws_on_the_torch_threads_it_was_sized_for(runs):
    """The actor sets its own OpenMP size (no Ray runtime env, so Ray may hand it a prestarted worker, whose
    OMP_NUM_THREADS Ray set to the actor's CPU share); its draws must still run on the threads sized for it."""
    import os

    from cluster.connect import size_actors

    expected = size_actors(1, {"CPU": float(os.cpu_count())}, "cpu").torch_threads
    for mode, out in runs["out"].items():
        (stats,) = run_summary(out)["backend_stats"].values()
        assert stats["torch_threads"] == expected, (mode, stats)


def test_a_finishing_worker_that_dies_loses_no_row(runs):
    out = runs["out"]["stage"]
    assert runs["crashed"].exists(), "the test hook must have killed a finishing worker"
    counts = collections.Counter(e["id"] for e in ledger(out))
    assert len(counts) == 10 and set(counts.values()) == {1}, counts
    assert {e["status"] for e in ledger(out)} == {"ok"}
    assert len(list((out / "images").glob("*.png"))) == 10


@pytest.mark.gpu
def test_on_a_gpu_auto_finishes_in_its_own_stage_and_every_mark_reads_back(manifest, tmp_path):
    out = tmp_path / "out"
    proc = sdfleet("generate", str(manifest), "--out", str(out), "--batch-size", "4", "--device", "cuda")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = run_summary(out)
    assert (summary["device"], summary["finish"], summary["ok"]) == ("cuda", "stage", 10)
    assert {e["watermark_bits"] for e in ledger(out)} == {1.0}


def test_ray_and_library_messages_go_to_the_run_log_unless_verbose(runs):
    quiet = runs["procs"]["stage"]  # a finishing worker died in it: the cluster said so, to the log file
    (log_file,) = (runs["out"]["stage"] / "logs").glob("sdfleet-*.log")
    assert quiet.stderr.count(str(log_file)) == 1, "the run names its log file once"
    logged = log_file.read_text()
    assert "execution finished" in logged and "(raylet)" in logged  # Ray Data's and the cluster's lines, kept
    for noise in ("execution finished", "Progress bars disabled", "Token authentication", "(raylet)"):
        assert noise not in quiet.stderr + quiet.stdout, noise
    assert "[sdfleet] done in" in quiet.stderr
    # nothing else either: Ray's core worker logs from C++ past Python's logging, to the run's log as well
    assert [line for line in (quiet.stdout + quiet.stderr).splitlines() if not line.startswith("[sdfleet] ")] == []
    # with --verbose they show here too: tests/test_identity_and_stores.py checks that on its --verbose run


def test_an_actor_that_dies_every_time_it_starts_stops_the_run_in_one_line(tmp_path):
    """Ray Data restarts a pool actor without end: an actor out of memory loading its model (every time) left the
    run waiting forever, saying only that the actors were starting. After START_DEATHS deaths it stops, exit 1."""
    from actors.crash_journal import KILL_AT_START_ENV, START_DEATHS

    manifest = write_manifest(tmp_path / "m.parquet", rows(4, steps=2))
    proc = sdfleet("generate", str(manifest), "--out", str(tmp_path / "out"), env={KILL_AT_START_ENV: "1"},
                   timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (f"a generation actor died {START_DEATHS} times while starting (loading model default on cpu), before "
            "it drew anything: out of memory") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
