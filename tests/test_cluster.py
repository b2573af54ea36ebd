"""Joining Ray and leaving it (cluster/connect.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, ledger, rows, start_ray_head, stop_ray_head, write_manifest

# In a process of its own: ray.init changes its process's environment (RAY_AUTH_MODE=token, for one),
# which every later test's subprocess would inherit.
LEAVE = """
import json, ray
import ray._private.node as ray_node
from cluster.connect import connect, disconnect

reached_alive = []  # the process kinds still running when ray.shutdown() came to stop them
stop = ray_node.Node._kill_process_impl
def watched(self, kind, **kwargs):
    if any(info.process.poll() is None for info in self.all_processes.get(kind, [])):
        reached_alive.append(kind)
    return stop(self, kind, **kwargs)
ray_node.Node._kill_process_impl = watched

connect(num_cpus=1, quiet=True)
node = ray._private.worker._global_node
processes = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
running = sorted(kind for kind, ps in processes.items() if any(p.poll() is None for p in ps))
disconnect()
left = sorted(kind for kind, ps in processes.items() if any(p.poll() is None for p in ps))
print(json.dumps({"running": running, "left": left, "initialized": ray.is_initialized(),
                  "reached_alive": reached_alive}))
"""


# A stop signal (argv[1]) in the moment after the driver's core worker is made, before ray.init returns
STOP_IN_INIT = """
import json, os, signal, sys, time
import ray, ray._raylet
from cluster import connect as c

made = ray._raylet.CoreWorker
def core_worker(*args, **kwargs):
    worker = made(*args, **kwargs)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    for _ in range(100):
        time.sleep(0.01)
    return worker
ray._raylet.CoreWorker = core_worker
c.stop_on_sigterm()
try:
    c.connect(num_cpus=1, quiet=True)
    said = "connected"
except KeyboardInterrupt:
    said = "stopped"
print(json.dumps({"said": said, "signal": c.stop_signal(), "initialized": ray.is_initialized()}))
"""


@pytest.mark.parametrize("name, noted", [("SIGTERM", 15), ("SIGINT", None)])
def test_a_stop_just_before_ray_init_returns_stops_the_command_cleanly(name, noted):
    """SIGTERM: Ray's C++ crash handler took it, and the command aborted (SIGABRT, exit 134) without a word, its
    lease left. Ctrl-C: raised between two steps of ray.init, it left a half-made core worker that leaving Ray
    crashed on (SIGSEGV). Either is now acted on as ray.init returns: Ray left, the stop said."""
    proc = subprocess.run([sys.executable, "-c", STOP_IN_INIT, name], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"said": "stopped", "signal": noted, "initialized": False}, found


# Connected to a local Ray, a task in flight, then SIGTERM to the whole process group (`timeout`, `kill -- -PGID`)
GROUP_TERM = """
import json, sys, time
import ray
from cluster import connect as c

c.stop_on_sigterm()
c.connect(num_cpus=1, quiet=True)
node = ray._private.worker._global_node
processes = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
sleeper = ray.remote(lambda: time.sleep(60) or "slept").remote()
print("ready", flush=True)
try:
    ray.get(sleeper, timeout=120)
    said = "not stopped"
except KeyboardInterrupt:
    said = "stopped"
alive = sorted(kind for kind, ps in processes.items() if any(p.poll() is None for p in ps))
answers = ray.get(ray.remote(lambda: "answered").remote(), timeout=60)
c.disconnect()
print(json.dumps({"said": said, "signal": c.stop_signal(), "alive": alive, "answers": answers}), flush=True)
"""


def test_a_sigterm_to_the_whole_process_group_stops_the_command_not_the_ray_it_started():
    """`timeout -s TERM`, `kill -- -PGID`: Ray's local processes shared the command's group, took the signal
    with it and died first; the driver's core worker then ended the process (exit 1, no word, lease left)."""
    import signal

    import threading

    proc = subprocess.Popen([sys.executable, "-c", GROUP_TERM], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    hung = threading.Timer(300, lambda: os.killpg(proc.pid, signal.SIGKILL))  # a start-up that never comes back
    hung.start()
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        hung.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (proc.returncode, err[-3000:])
    found = json.loads(out.strip().splitlines()[-1])
    assert found["said"] == "stopped" and found["signal"] == 15 and found["answers"] == "answered", found
    assert {"gcs_server", "raylet"} <= set(found["alive"]), found


def test_leaving_a_local_ray_stops_every_process_it_started():
    proc = subprocess.run([sys.executable, "-c", LEAVE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"raylet", "gcs_server", "monitor"} <= set(found["running"]), found
    assert found["left"] == [] and not found["initialized"], found
    # the monitor was gone before ray.shutdown() came to it: no second spent on its SIGTERM
    assert "monitor" not in found["reached_alive"] and "raylet" in found["reached_alive"], found


@pytest.fixture
def stop_handlers_put_back():
    """What a test of the stop handlers changes, put back after it: SIGTERM's and SIGHUP's handlers, and the
    signals cluster.connect noted."""
    import signal

    from cluster import connect as connect_module

    before, hangup_before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    yield
    connect_module._SIGTERM_RECEIVED.clear()
    connect_module._RECEIVED.clear()
    signal.signal(signal.SIGTERM, before)
    signal.signal(signal.SIGHUP, hangup_before)


def test_sigterm_while_connected_stops_a_command_as_ctrl_c_does_and_is_remembered(monkeypatch,
                                                                                   stop_handlers_put_back):
    """After ray.init (whose driver handler calls sys.exit(15), skipping every `except KeyboardInterrupt`),
    SIGTERM raises a KeyboardInterrupt, and the process remembers it was SIGTERM: Ray's C++ waits turn the
    handler's exception into a plain KeyboardInterrupt, and the CLI says 'stopped by SIGTERM', exit 143."""
    import signal

    from cluster import connect as connect_module
    from jobs import cli

    connect_module.stop_on_sigterm()
    assert not connect_module.stopped_by_sigterm()
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode
    assert connect_module.stopped_by_sigterm()
    # a second SIGTERM ends the process at once, unless it is the same one passed on (test below)
    assert signal.getsignal(signal.SIGTERM) is connect_module._on_repeated_stop

    def stopped(args):  # a SIGTERM while a command runs, Ray or not (the CLI sets the handler as it starts)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(cli, "cmd_report", stopped)
    assert cli.main(["report", "out"]) == cli.EXIT_TERMINATED == 143

    def hung_up(args):  # the terminal closed: it ended the process at once, with nothing recorded
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(5)

    monkeypatch.setattr(cli, "cmd_report", hung_up)
    assert cli.main(["report", "out"]) == 129
    assert signal.getsignal(signal.SIGHUP) is connect_module._on_repeated_stop  # a second one ends it at once
    # under nohup (SIGHUP ignored as the command starts) the hang-up is left ignored: the run goes on
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    connect_module.stop_on_sigterm()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


# SIGTERM twice 0.1 s apart (a group's, and `timeout` passing it on), then, in a second process, again after
# REPEAT_GRACE: the first pair is one stop, handled; the later one ends the process at once
TWICE = """
import os, signal, sys, time
from cluster import connect as c

c.REPEAT_GRACE = float(sys.argv[1])
c.stop_on_sigterm()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)
except KeyboardInterrupt:
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the stop is handled (recording what finished, say)
    time.sleep(0.5)
    print("stopped once", flush=True)
"""


def test_the_same_sigterm_delivered_twice_stops_a_command_once():
    """`timeout 900 sdfleet generate ...` stopped by `kill -TERM -- -PGID`: sdfleet got the group's SIGTERM and
    then `timeout`'s copy of it, took the second for a second stop, and ended at once: exit 143 with no word,
    nothing recorded, lease left (QA, 3 of 3)."""
    once = subprocess.run([sys.executable, "-c", TWICE, "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (once.returncode, once.stdout) == (0, "stopped once\n"), once.stderr[-2000:]
    later = subprocess.run([sys.executable, "-c", TWICE, "0.05"], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert later.returncode == -15 and later.stdout == "", (later.returncode, later.stdout)


def test_a_hang_up_while_a_local_ray_starts_stops_the_command_once_started_and_never_reaches_ray(
        monkeypatch, stop_handlers_put_back):
    """The processes a local Ray starts must not get the terminal's SIGHUP (they died mid-stop), so it was
    ignored during ray.init: a hang-up then was lost and the run went on with nobody watching. Now the
    processes started within inherit it blocked, and the command gets it (within ray.init, or as it returns):
    stopped, what Ray started stopped with it, and the CLI's exit says SIGHUP."""
    import signal

    import ray

    from cluster import connect as connect_module

    started, left = [], []

    def init(**kwargs):  # as Ray's start-up does: processes started, and the terminal closes meanwhile
        probe = "import signal; print(signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, []))"
        started.append(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip())
        os.kill(os.getpid(), signal.SIGHUP)  # (noted, whichever thread takes it, and acted on once ray.init
        time.sleep(0.5)  # returns: raised within it, Ray was left half-started)

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(connect_module, "disconnect", lambda: left.append(True))
    connect_module.stop_on_sigterm()
    with pytest.raises(KeyboardInterrupt):
        connect_module.connect(None, num_cpus=1, quiet=True)
    assert started == ["True"]  # what Ray starts never sees a hang-up
    assert left == [True] and connect_module.stop_signal() == signal.SIGHUP
    assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the command's own: unblocked


def test_a_stop_while_ray_starts_waits_only_for_a_local_start_and_is_said_if_the_start_then_fails(
        monkeypatch, stop_handlers_put_back):
    """Starting a local Ray, a SIGTERM is noted and acted on as ray.init returns (raised within it, Ray was left
    half-started), also where the start then fails (it said "cannot start a local Ray", exit 1). Joining a
    cluster can take minutes: there it stops ray.init at once, as before."""
    import signal

    import ray

    from cluster import connect as connect_module

    reached = []

    def init(**kwargs):  # the stop comes, then the start-up fails
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # (a handler that raises does so here)
        reached.append(kwargs["address"])
        raise RuntimeError("Failed to start the GCS")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(connect_module, "disconnect", lambda: None)
    monkeypatch.setattr(connect_module, "_check_reachable", lambda address: None)
    for address, waited in ((None, ["local"]), ("10.0.0.1:6379", [])):
        reached.clear()
        connect_module.stop_on_sigterm()
        with pytest.raises(KeyboardInterrupt):
            connect_module.connect(address, num_cpus=1, quiet=True)
        assert reached == waited and connect_module.stop_signal() == signal.SIGTERM, address
        assert not connect_module._DEFERRED.is_set()


def test_a_lost_cluster_is_said_and_noticed_even_where_the_main_thread_is_held(monkeypatch):
    """The watch says the GCS is gone and interrupts the main thread; a main thread held in a wait that no
    interrupt reaches (as in Ray's C++ calls) is left to `give_up` after the grace time."""
    import socket
    import threading
    import types

    import ray

    from cluster import connect as connect_module

    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(gcs_address=address))
    said, gave_up, held = [], [], threading.Event()
    try:
        with pytest.raises(KeyboardInterrupt):
            with connect_module.watch_cluster(said.append, give_up=lambda why: (gave_up.append(why), held.set()),
                                              seconds=1.0, every=0.2, grace=0.5):
                time.sleep(1.0)
                assert not said and connect_module.cluster_lost() is None  # it answers: nothing said
                server.close()
                held.wait(30)  # a lock wait: interrupt_main does not end it, give_up does
    finally:
        server.close()
    assert said == [f"{connect_module.cluster_lost()}; stopping"] and gave_up == [connect_module.cluster_lost()]
    assert f"lost the Ray cluster: its GCS at {address} has not answered for 1 s" in said[0]
    connect_module._LOST.clear()
    # a GCS Ray is told to wait longer for (KubeRay's GCS fault tolerance restarts it) is waited for too
    assert connect_module.gcs_lost_seconds() == connect_module.GCS_LOST_SECONDS
    monkeypatch.setenv(connect_module.RAY_GCS_WAIT, "600")
    assert connect_module.gcs_lost_seconds() == 590


def test_a_run_whose_cluster_goes_away_keeps_what_came_back_and_says_why(tmp_path):
    """The GCS of a joined cluster killed mid-run: Ray's driver ended the process 60 s later with exit 1 and
    nothing said (its message in the log file only), rows back at the driver unrecorded. Now the run says
    why within seconds, records what came back, exits 1, and the rerun on a local Ray finishes the rest."""
    import shutil
    import signal
    import tempfile

    records = rows(48, steps=3)  # enough that the run is still drawing after the wait below
    manifest = write_manifest(tmp_path / "m.parquet", records)
    out = tmp_path / "out"
    ray_dir = Path(tempfile.mkdtemp(prefix="sdf-"))  # Ray's socket paths under pytest's tmp_path pass 107 bytes
    head, address = start_ray_head(ray_dir)
    try:
        log = open(tmp_path / "run.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "jobs", "generate", str(manifest), "--out", str(out),
                                 "--batch-size", "4", "--address", address], cwd=REPO, stdout=log, stderr=log,
                                env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token"})
        deadline = time.time() + 300
        while time.time() < deadline and len(list((out / "images").glob("*.png"))) < 8:
            assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            time.sleep(0.3)
        # an image is written in the actor before its row reaches the driver: on a loaded machine none had
        # when the GCS went, and nothing was there to record (the rerun recovered them from the images)
        time.sleep(1.5)
        gcs = subprocess.run(["pgrep", "-f", f"gcs_server.*{ray_dir}"], capture_output=True, text=True)
        pids = [int(pid) for pid in gcs.stdout.split()]
        assert len(pids) == 1, gcs
        os.kill(pids[0], signal.SIGKILL)
        killed = time.time()
        code = proc.wait(timeout=120)
        said = (tmp_path / "run.log").read_text()
        assert code == 1 and time.time() - killed < 50, said[-3000:]
        port = address.rpartition(":")[2]  # Ray names the head by the node's address, not the one given
        assert re.search(rf"sdfleet: error: lost the Ray cluster: its GCS at \S+:{port} has not answered", said), said
        recorded = [e["id"] for e in ledger(out)]
        assert len(recorded) >= 4 and len(set(recorded)) == len(recorded), said[-3000:]
    finally:
        stop_ray_head(head)
        shutil.rmtree(ray_dir, ignore_errors=True)
    again = subprocess.run([sys.executable, "-m", "jobs", "generate", str(manifest), "--out", str(out),
                            "--batch-size", "4"], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(e["id"] for e in ledger(out) if e["status"] == "ok") == sorted(r["id"] for r in records)


def test_the_log_file_holds_no_uri_password_from_a_library_line_or_its_traceback(tmp_path):
    """sdfleet's own lines and files leave passwords out; a library logging a URL (or an exception naming one)
    wrote it into OUT/logs/ whole."""
    import logging

    from cluster.connect import library_logs_to
    from jobs.console import without_passwords

    path = tmp_path / "run.log"
    with library_logs_to(str(path), verbose=False, scrub=without_passwords):
        logging.getLogger("fsspec.http").warning("fetching %s", "https://ann:hunter2@h/m.parquet")
        try:
            raise FileNotFoundError("https://ann:hunter2@h/x.parquet")
        except FileNotFoundError:
            logging.getLogger("ray.data").exception("read failed")
    text = path.read_text()
    assert "hunter2" not in text, text
    assert "fetching https://ann:***@h/m.parquet" in text and "FileNotFoundError: https://ann:***@h/x.parquet" in text


def test_leaving_ray_waits_for_ray_data_threads_that_call_into_it_and_no_others(caplog):
    """A Ctrl-C'd run left Ray Data's block-fetching workers running; one that returned into Ray after
    ray.shutdown() ended the process from C++, with no 'interrupted' line and Ray's agents left behind."""
    import logging
    import threading

    from cluster.connect import _let_ray_data_threads_end

    parked = threading.Event()
    fetching = threading.Thread(target=time.sleep, args=(0.5,), name="iter_threaded", daemon=True)
    prefetcher = threading.Thread(target=parked.wait, name="Prefetcher", daemon=True)  # parks, touches nothing
    fetching.start()
    prefetcher.start()
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="sdfleet"):
        _let_ray_data_threads_end(seconds=5.0)
    assert not fetching.is_alive() and time.monotonic() - started < 3.0  # waited for the one, not the other
    assert "Prefetcher (" in caplog.text and "iter_threaded" not in caplog.text.split("other threads:")[1]
    parked.set()


def test_the_workers_output_and_the_raylets_notices_go_to_the_log_not_the_terminal(capsys):
    """A fine-tune's workers' lines (Ray Train's start-up, their tracebacks) reached no file: Ray streams them
    only with log_to_driver, and then printed them here. Routed, each goes to the logger named by its process."""
    import logging

    import ray._private.worker as ray_worker

    from cluster.connect import _route_cluster_notices

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("test.notices")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    original = _route_cluster_notices(logger)
    try:
        ray_worker.print_to_stdstream({"pid": 41, "actor_name": "RayTrainWorker", "is_err": True,
                                       "lines": ["Traceback (most recent call last):", "ValueError: row 3"]}, False)
        ray_worker.print_to_stdstream({"pid": "raylet", "is_err": True, "lines": ["A worker died"]}, False)
        ray_worker.print_to_stdstream({"pid": 42, "task_name": "draw", "is_err": False, "lines": ["hello"]}, False)
    finally:
        ray_worker.print_to_stdstream = original
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "(RayTrainWorker pid=41) Traceback (most recent call last):"),
        ("WARNING", "(RayTrainWorker pid=41) ValueError: row 3"),
        ("WARNING", "(raylet) A worker died"),
        ("INFO", "(draw pid=42) hello")]
    said = capsys.readouterr()
    assert said.out == said.err == ""
    # --verbose: Ray prints them too, as it would, with a URI's password taken out; the log still has them
    from manifests.stores import without_passwords

    records.clear()
    original = _route_cluster_notices(logger, echo=without_passwords)
    try:
        ray_worker.print_to_stdstream({"pid": 43, "actor_name": "RayTrainWorker", "is_err": True,
                                       "lines": ["reading https://ann:hunter2@h/ds"]}, False)
    finally:
        ray_worker.print_to_stdstream = original
    said = capsys.readouterr()
    assert "RayTrainWorker pid=43" in said.err and "reading https://ann:***@h/ds" in said.err
    assert "hunter2" not in said.err
    assert [r.getMessage() for r in records] == ["(RayTrainWorker pid=43) reading https://ann:hunter2@h/ds"]


def test_token_mode_against_a_cluster_without_a_token_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    """Ray 2.60's `ray start` turns token authentication on only where a token exists (~/.ray/auth_token, or
    RAY_AUTH_TOKEN); on a machine where no Ray ran before it is off, and RAY_AUTH_MODE=token, as the guides
    wrote, then finds no token to send: a 30-line AuthenticationError traceback, where a run that cannot
    connect says so in one line."""
    import shutil
    import tempfile

    home = tmp_path / "home"  # no ~/.ray/auth_token: a machine where no Ray ran before
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    ray_dir = Path(tempfile.mkdtemp(prefix="sdf-"))
    head, address = start_ray_head(ray_dir)
    try:
        manifest = write_manifest(tmp_path / "m.parquet", rows(1))
        done = subprocess.run([sys.executable, "-m", "jobs", "generate", str(manifest), "--out", str(tmp_path / "out"),
                               "--address", address], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token"})
    finally:
        stop_ray_head(head)
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"sdfleet: error: cannot connect to {address}: Token authentication is enabled but no "
                           "authentication token was found; give the cluster's token in RAY_AUTH_TOKEN"), line
    assert "unset RAY_AUTH_MODE" in line
