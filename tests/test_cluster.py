"""Joining Ray and leaving it (cluster/connect.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

# In a process of its own: ray.init changes its process's environment (RAY_AUTH_MODE=token, for one),
# which every later test's subprocess would inherit.
LEAVE = """
import json, ray
from cluster.connect import connect, disconnect
connect(num_cpus=1, quiet=True)
node = ray._private.worker._global_node
processes = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
running = sorted(kind for kind, ps in processes.items() if any(p.poll() is None for p in ps))
disconnect()
left = sorted(kind for kind, ps in processes.items() if any(p.poll() is None for p in ps))
print(json.dumps({"running": running, "left": left, "initialized": ray.is_initialized()}))
"""


def test_leaving_a_local_ray_stops_every_process_it_started():
    proc = subprocess.run([sys.executable, "-c", LEAVE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {"raylet", "gcs_server", "monitor"} <= set(found["running"]), found  # disconnect() stops "monitor" first
    assert found["left"] == [] and not found["initialized"], found
