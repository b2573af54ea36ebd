"""Joining Ray and leaving it (cluster/connect.py), in this process."""

from __future__ import annotations

import ray

from cluster.connect import connect, disconnect


def test_leaving_a_local_ray_stops_every_process_it_started():
    assert not ray.is_initialized()
    connect(num_cpus=1, quiet=True)
    node = ray._private.worker._global_node
    processes = [info.process for infos in node.all_processes.values() for info in infos]
    assert len(processes) >= 3 and all(p.poll() is None for p in processes)  # raylet, GCS, monitor, ...
    assert "monitor" in node.all_processes, "the autoscaler monitor disconnect() stops first is gone: recheck it"

    disconnect()
    assert not ray.is_initialized()
    left = [p.args[0] if isinstance(p.args, list) else p.args for p in processes if p.poll() is None]
    assert not left, f"still running after disconnect(): {left}"
