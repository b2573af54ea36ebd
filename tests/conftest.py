"""Shared helpers: build manifests, run the real `sdfleet` CLI, read what a run left behind."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Keep tests quick on 2 cores: few steps; 256 px is the smallest size that carries the watermark.
FAST = {"steps": 2, "width": 256, "height": 256}


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none found on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rows(n: int, prefix: str = "row", **fields) -> list[dict]:
    """n valid manifest rows with distinct prompts and the FAST settings, unless overridden."""
    subjects = ["mug", "bottle", "sneaker", "watch", "lamp", "chair", "vase", "backpack"]
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
    return [
        {"id": f"{prefix}-{i:03d}", "prompt": f"a {colours[i % 8]} {subjects[(i // 8) % 8]} on a white background",
         "negative_prompt": "blurry", **FAST, **fields}
        for i in range(n)
    ]


def write_manifest(path: Path, records: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = dict.fromkeys(k for r in records for k in r)  # from_pylist alone keeps only the first row's keys
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records], schema=schema), path)
    return path


def sdfleet(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process (each run starts and stops its own local Ray)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def ledger(out: Path) -> list[dict]:
    parts = sorted((out / "results").glob("*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def run_summary(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()  # a truncated file fails here
        return np.asarray(im.convert("RGB")).astype(np.int16)


def assert_same_pixels(a: np.ndarray, b: np.ndarray, label: str = "") -> None:
    """Equal up to float noise: every channel within 3/255 and 99% of values exactly equal."""
    diff = np.abs(a - b)
    assert diff.max() <= 3, f"{label}: max difference {diff.max()}/255"
    assert (diff == 0).mean() >= 0.99, f"{label}: only {(diff == 0).mean():.2%} of values equal"


def png_parameters(path: Path) -> dict:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
        return json.loads(im.text["parameters"])
