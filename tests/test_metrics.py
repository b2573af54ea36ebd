"""A run on a Ray cluster that outlives it, as a KubeRay job runs: `ray start --head` with a metrics export
port, `sdfleet generate --address ... --report`, then the cluster's Prometheus endpoint read back.

The counters must equal what the run's own run.json says: the images drawn and written, the rows by
status, the failures by kind. The report is written at the end of the run, from the same output.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections import defaultdict

import pytest

from helpers import free_port, run_summary, sdfleet, start_ray_head, stop_ray_head, write_manifest

@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A head of its own with a metrics port: the session's shared head holds other tests' counters too."""
    metrics = free_port()
    proc, address = start_ray_head(tmp_path_factory.mktemp("ray-head"), metrics_port=metrics)
    try:
        yield {"address": address, "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        stop_ray_head(proc)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """sdfleet's series from a Prometheus text page: name -> {(label, value) of our own labels: sum}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    series: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
    for line in text.splitlines():
        found = re.match(r"^(ray_sdfleet_\w+)(?:\{(.*)\})? ([0-9.eE+-]+)$", line)
        if found:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or ""))
            ours = tuple(sorted((k, v) for k, v in labels.items() if k in ("model", "kind", "status", "le")))
            series[found.group(1)][ours] += float(found.group(3))
    return series


def test_a_run_exports_its_counts_to_the_clusters_metrics_and_writes_its_report(ray_head, tmp_path):
    rows = [{"id": f"m{i}", "prompt": "a red circle on a white background", "width": 64, "height": 64, "steps": 2,
             "sku": f"sku-{i % 2}"} for i in range(5)]
    rows.append({"id": "bad", "prompt": "a blue star", "scheduler": "nope", "sku": "sku-9"})
    write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    # paths relative to the driver's folder: the head's workers run elsewhere and must still find them
    proc = sdfleet("generate", "m.parquet", "--out", "out", "--address", ray_head["address"], "--no-watermark",
                   "--report", "--report-group-by", "sku", cwd=tmp_path, env={"RAY_AUTH_MODE": "token"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    summary = run_summary(out)
    assert summary["ok"] == 5 and summary["invalid"] == 1

    expected = {"ray_sdfleet_images_drawn_total": {(("model", "default"),): 5.0},
                "ray_sdfleet_images_written_total": {(): 5.0},
                "ray_sdfleet_rows_total": {(("status", "ok"),): 5.0, (("status", "invalid"),): 1.0},
                "ray_sdfleet_row_failures_total": {(("kind", "invalid"),): 1.0},
                "ray_sdfleet_image_seconds_count": {(("model", "default"),): 5.0}}
    deadline, seen = time.time() + 30, {}
    while time.time() < deadline:  # the agent exports every second; the last actor's counts come in last
        series = scrape(ray_head["metrics"])
        seen = {name: {k: v for k, v in series.get(name, {}).items()} for name in expected}
        if seen == expected:
            break
        time.sleep(1)
    assert seen == expected

    page = (out / "report" / "index.html").read_text()
    assert "report: " in proc.stderr and str(out / "report" / "index.html") in proc.stderr
    assert len(re.findall(r"<figure class='tile ok'", page)) == 5 and "<figure class='tile invalid'" in page
    assert re.findall(r"<summary>sku = (sku-\d)", page) == ["sku-0", "sku-1", "sku-9"]
