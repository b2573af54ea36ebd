"""Joining Ray and leaving it (cluster/connect.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO

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


def test_leaving_a_local_ray_stops_every_process_it_started():
    proc = subprocess.run([sys.executable, "-c", LEAVE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"raylet", "gcs_server", "monitor"} <= set(found["running"]), found
    assert found["left"] == [] and not found["initialized"], found
    # the monitor was gone before ray.shutdown() came to it: no second spent on its SIGTERM
    assert "monitor" not in found["reached_alive"] and "raylet" in found["reached_alive"], found


def test_sigterm_while_connected_stops_a_command_as_ctrl_c_does_and_is_remembered(monkeypatch):
    """After ray.init (whose driver handler calls sys.exit(15), skipping every `except KeyboardInterrupt`),
    SIGTERM raises a KeyboardInterrupt, and the process remembers it was SIGTERM: Ray's C++ waits turn the
    handler's exception into a plain KeyboardInterrupt, and the CLI says 'stopped by SIGTERM', exit 143."""
    import signal

    from cluster import connect as connect_module
    from jobs import cli

    before = signal.getsignal(signal.SIGTERM)
    try:
        connect_module._stop_on_sigterm()
        assert not connect_module.stopped_by_sigterm()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode
        assert connect_module.stopped_by_sigterm()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM ends the process at once

        def stopped(args):
            raise KeyboardInterrupt

        monkeypatch.setattr(cli, "cmd_report", stopped)
        assert cli.main(["report", "out"]) == cli.EXIT_TERMINATED == 143
    finally:
        connect_module._SIGTERM_RECEIVED.clear()
        signal.signal(signal.SIGTERM, before)
