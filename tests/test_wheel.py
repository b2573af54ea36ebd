"""The package users install: a wheel built from this tree, installed alone, draws the shipped example.

CI installs the project editable, so imports resolve to the source tree and a file missing from the wheel
goes unnoticed (it happened: actors/backends/ and the tokenizer's merges.txt). Here the wheel goes into a
fresh virtualenv whose only view of the dependencies is a .pth line naming this environment's
site-packages: a .pth line adds a path but does not run the .pth files inside it, so the editable
install's finder stays off and every `actors`, `jobs`, ... import must come from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from helpers import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy of the files git sees: an in-tree build/ left by an earlier build would hide a
    # package the current configuration misses.
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("sdfleet-*.whl")
    return found


def test_wheel_holds_every_package_and_data_file_of_the_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(["git", "ls-files", "actors", "jobs", "manifests", "cluster"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    # every tracked file of the code folders ships: nothing depends on a hand-kept list
    missing = [f for f in tracked if f not in names]
    assert not missing, f"files of the tree missing from the wheel: {missing}"


def test_installed_wheel_draws_the_example_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own (its set-up is seconds of the test); this environment's pip installs into it
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)],
                   check=True, timeout=300, capture_output=True)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import actors, jobs; print(actors.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site), f"actors imported from {where}, not from the installed wheel"

    example = Path(site) / "manifests" / "examples" / "shapes.parquet"
    out = tmp_path / "out"
    proc = subprocess.run([str(venv / "bin" / "sdfleet"), "generate", str(example), "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(example).num_rows
    assert len(list((out / "images").glob("*.png"))) == rows
    assert sum(pq.read_table(p).num_rows for p in (out / "results").glob("*.parquet")) == rows
