"""Every store path through a real S3 server: moto's server mode on loopback, spoken to by s3fs over HTTP.

Credentials and the endpoint reach sdfleet, its actors and its tasks through the environment only
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), as on a real cluster; no output may show them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import (REPO, UNET_TARGETS, assert_same_pixels, count_reads, diffusers_file, lora_bytes, make_lora, pixels,
                     rows, run_summary, sdfleet, tiny_work_row, write_manifest)
from jobs.synthetic import write_images
from manifests.stores import read_parquet

SECRET = "sdfleet-test-secret-0451"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cable:
    """A TCP relay between sdfleet and the S3 server that a test can cut: every open connection is closed and
    new ones are refused, as when a store goes away (stopping the server alone leaves keep-alive connections
    served), then plugged in again on the same port."""

    def __init__(self, port: int, upstream: int):
        self.port, self.upstream = port, upstream
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None

    def plug(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            self.listener.close()
            self.listener = None  # a connection accepted from now on is closed, not relayed
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            with self.lock:
                if self.listener is not listener:  # cut while this one was being accepted
                    client.close()
                    return
                server = socket.create_connection(("127.0.0.1", self.upstream))
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.close()
                except OSError:
                    pass


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with one bucket, reached through a Cable; yields an s3fs filesystem
    (which talks to the server directly) and the cable."""
    from moto.server import ThreadedMotoServer

    server_port, port = _free_port(), _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=server_port, verbose=False)
    server.start()
    cable = Cable(port, server_port)
    cable.plug()
    env = {"AWS_ACCESS_KEY_ID": "sdfleet-test-key", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "2",
           "SDFLEET_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with pytest.MonkeyPatch.context() as patch:  # the environment as it was, once the module's tests are done
        for key, value in env.items():
            patch.setenv(key, value)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{server_port}"})
        fs.mkdir("sdfleet")
        yield {"fs": fs, "cable": cable}
    cable.cut()
    server.stop()


def _objects(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return [p for p in fs.find(prefix)]


def test_generate_reads_model_adapters_and_manifests_from_s3_and_writes_there(s3, tmp_path):
    from actors.models import export_preset
    from actors.presets import build_preset

    fs = s3["fs"]
    # the model, an adapter and the manifest, all in the bucket
    export_preset("tiny", str(tmp_path / "tiny"))
    fs.put(str(tmp_path / "tiny"), "sdfleet/models/tiny", recursive=True)
    unet = build_preset("tiny").unet
    fs.pipe("sdfleet/adapters/style.safetensors", diffusers_file(tmp_path, make_lora(unet, UNET_TARGETS, seed=3)))
    records = rows(3) + rows(1, prefix="styled", adapters=[{"name": "style", "scale": 0.8}])
    fs.put(str(write_manifest(tmp_path / "m.parquet", records)), "sdfleet/manifests/m.parquet")

    argv = ["generate", "s3://sdfleet/manifests/m.parquet", "--out", "s3://sdfleet/runs/a", "--model",
            "default=s3://sdfleet/models/tiny", "--adapters", "s3://sdfleet/adapters", "--batch-size", "2"]
    proc = sdfleet(*argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted(p.rsplit("/", 1)[-1] for p in _objects(fs, "sdfleet/runs/a/images"))
    assert images == sorted(f"{r['id']}.png" for r in records)
    entries = [e for p in _objects(fs, "sdfleet/runs/a/results")
               for e in read_parquet(fs, p).to_pylist()]
    assert sorted(e["id"] for e in entries if e["status"] == "ok") == sorted(r["id"] for r in records)
    assert all(e["uri"].startswith("s3://sdfleet/runs/a/images/") for e in entries)
    assert not fs.exists("sdfleet/runs/a/.sdfleet-lease.json")  # the lease went with the run

    # the run's log, a local file while it ran, is kept in the bucket with what it wrote
    (log_key,) = _objects(fs, "sdfleet/runs/a/logs")
    log_text = fs.cat_file(log_key).decode()
    assert "execution finished" in log_text, log_text[-2000:]  # Ray Data's own lines, whole to the end
    assert "(copied to s3://sdfleet/runs/a/logs/ when the run ends)" in proc.stderr
    local = next(line for line in proc.stderr.splitlines() if "Ray's and the libraries' messages: " in line)
    assert not os.path.exists(local.split("messages: ", 1)[1].split(" (copied", 1)[0])  # moved, not left behind
    # credentials never show: not on the terminal, not in the run's log, not in what the run wrote
    written = b"".join(fs.cat_file(p) for p in _objects(fs, "sdfleet/runs/a") if not p.endswith(".png"))
    for text in (proc.stdout, proc.stderr, log_text, written.decode("utf-8", "replace")):
        assert SECRET not in text and "sdfleet-test-key" not in text
    # (a rerun reading this ledger back from the bucket: the outage test's second run)



def test_the_driver_reads_an_s3_adapter_again_only_when_its_etag_changes(s3, tmp_path, monkeypatch):
    """A nightly driver names the same adapters every night: an adapter whose ETag is the one this machine
    already hashed is not downloaded again; a replaced one is, and gets its new fingerprint."""
    import s3fs

    from jobs.generate import resolve_adapters

    fs = s3["fs"]
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))

    fs.pipe("sdfleet/nightly-adapters/style.safetensors", lora_bytes(1))
    fs.pipe("sdfleet/nightly-adapters/broken.safetensors", b"not safetensors")
    reads = count_reads(monkeypatch, s3fs.S3FileSystem)
    store = "s3://sdfleet/nightly-adapters"
    first, bad = resolve_adapters(store, {"style", "broken"})
    assert sorted(reads) == ["broken.safetensors", "style.safetensors"] and list(bad) == ["broken"]
    reads.clear()
    again, bad = resolve_adapters(store, {"style", "broken"})
    assert again == first and reads == ["broken.safetensors"], "only the unusable one is read again"
    assert "is not a readable safetensors file" in bad["broken"]

    from actors.adapters import AdapterStore

    assert AdapterStore(store).names() == ["broken", "style"]  # a listing the driver's s3fs now holds in memory
    fs.pipe("sdfleet/nightly-adapters/style.safetensors", lora_bytes(2))  # replaced: a new ETag
    reads.clear()
    replaced, _ = resolve_adapters(store, {"style"})
    assert reads == ["style.safetensors"] and replaced["style"] != first["style"]


def test_the_store_going_away_mid_run_is_one_line_and_the_rerun_completes(s3, tmp_path):
    fs = s3["fs"]
    # 20 steps, not FAST's 2: each batch then takes seconds, so the cable is cut while rows are still being drawn
    # (at 2 steps the other 8 rows could all be recorded before the first part was seen, and the run ended 0)
    records = rows(10, steps=20)
    fs.put(str(write_manifest(tmp_path / "m.parquet", records)), "sdfleet/manifests/outage.parquet")
    argv = ["generate", "s3://sdfleet/manifests/outage.parquet", "--out", "s3://sdfleet/runs/outage",
            "--batch-size", "2", "--no-watermark"]
    log = open(tmp_path / "run1.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "jobs", *argv], cwd=REPO, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONPATH": str(REPO), "SDFLEET_LEDGER_FLUSH_SECONDS": "0"},
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not _objects(fs, "sdfleet/runs/outage/results"):
        assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
        time.sleep(0.5)
    s3["cable"].cut()  # the store goes away mid-run
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        s3["cable"].plug()
    stderr = (tmp_path / "run1.log").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert code == 1 and len(errors) == 1, stderr[-3000:]
    assert "s3://sdfleet/runs/outage" in errors[0] and "Traceback" not in stderr, errors

    rerun = sdfleet(*argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    entries = [e for p in _objects(fs, "sdfleet/runs/outage/results")
               for e in read_parquet(fs, p).to_pylist()]
    ok_ids = sorted(e["id"] for e in entries if e["status"] == "ok")
    assert ok_ids == sorted(r["id"] for r in records), "every row ok exactly once"


def _train_log(fs, out: str) -> list[dict]:
    fs.invalidate_cache()
    return [json.loads(line) for line in fs.cat_file(f"{out}/train_log.jsonl").decode().splitlines()]


def test_finetune_reads_its_data_from_s3_checkpoints_there_and_a_killed_run_resumes_from_them(s3, tmp_path):
    """`dataset build` into the bucket, a sharded (FSDP) full fine-tune from it with checkpoints in the bucket,
    killed (driver and local Ray) once a checkpoint is there; the rerun goes on from the bucket's checkpoint
    (each worker taking its shard of it) and writes the model there (generate reading a model from the bucket:
    the first test). tests/test_finetune.py checks that FSDP trains as DDP does."""
    fs = s3["fs"]
    write_images(tmp_path / "images", 4, size=96, seed=2)
    build = sdfleet("dataset", "build", str(tmp_path / "images"), "-o", "s3://sdfleet/data/shapes", "--resolution", "64")
    assert build.returncode == 0, build.stderr[-3000:]
    assert any(p.endswith(".parquet") for p in _objects(fs, "sdfleet/data/shapes"))

    out = "sdfleet/tunes/full"
    cmd = [sys.executable, "-m", "jobs", "finetune", "full", "--fsdp", "--data", "s3://sdfleet/data/shapes",
           "--base", "tiny-random", "--lr", "2e-3", "--out", f"s3://{out}", "--workers", "2", "--batch-size", "2",
           "--resolution", "64", "--log-every", "1", "--checkpoint-every", "3", "--steps", "12", "--seed", "5"]
    # a SIGKILL leaves what the run keeps in the temporary folder (its log, Ray Train's checkpoint staging):
    # this test's own, not the machine's /tmp; Ray's session folder stays where Ray would put it
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    ray_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scratch), "RAY_TMPDIR": ray_tmp}
    with open(tmp_path / "run1.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 300
        # Ray Train lists a checkpoint in this snapshot once it is uploaded; a kill before that loses it
        while time.time() < deadline and not fs.exists(f"{out}/checkpoints/checkpoint_manager_snapshot.json"):
            assert proc.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
            time.sleep(0.3)
            fs.invalidate_cache()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert max(r["step"] for r in _train_log(fs, out) if "loss" in r) < 12, "the kill should land mid-run"
    assert list(scratch.glob("finetune-*.log")), "the killed run's log stays in its temporary folder"

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    log = _train_log(fs, out)
    resumed = [r for r in log if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] % 3 == 0 and resumed[0]["step"] > 0
    after = [r["step"] for r in log[log.index(resumed[0]):] if "loss" in r]
    assert after[0] == resumed[0]["step"] + 1 and after[-1] == 12  # on from the checkpoint, not from zero
    assert fs.exists(f"{out}/unet/diffusion_pytorch_model.safetensors") and fs.exists(f"{out}/model_index.json")
    for text in (build.stderr, again.stdout, again.stderr, (tmp_path / "run1.log").read_text()):
        assert SECRET not in text
    logs = _objects(fs, f"{out}/logs")  # each run's log, the killed one's too had it lived; the rerun's is there
    assert logs and all(SECRET not in fs.cat_file(p).decode("utf-8", "replace") for p in logs)


def test_the_onnx_backend_draws_what_eager_draws_keeping_its_exports_in_s3_and_a_second_node_starts_warm(
        s3, tmp_path):
    """`--backend onnx` through the CLI: eager's pixels (within float noise) for every scheduler kind, its
    counters in run.json, and its exports in `--backend-cache s3://...`; a run on a machine whose local cache
    is empty (another node, a fresh pod) fetches them from the bucket instead of exporting again."""
    from actors.backends import make_backend
    from actors.generate import draw
    from actors.presets import build_preset

    fs = s3["fs"]
    records = rows(4, steps=2, width=64, height=64)
    for record, scheduler in zip(records, ("ddim", "euler", "euler_a", "dpmpp_2m")):  # ancestral noise too
        record["scheduler"] = scheduler
    manifest = write_manifest(tmp_path / "m.parquet", records)
    cold = sdfleet("generate", str(manifest), "--backend", "onnx", "--backend-cache", "s3://sdfleet/backend-cache",
                   "--no-watermark", "--out", str(tmp_path / "cold"), env={"SDFLEET_CACHE": str(tmp_path / "node-a")})
    assert cold.returncode == 0, cold.stderr[-3000:]
    summary = run_summary(tmp_path / "cold")
    assert summary["backend"] == "onnx" and summary["ok"] == len(records)
    (stats,) = summary["backend_stats"].values()
    assert stats["backend"] == "onnx" and stats["exports"] == 3 and stats["sessions"] == 3
    entries = {p.rsplit("/", 2)[-2] for p in _objects(fs, "sdfleet/backend-cache") if p.endswith("model.onnx")}
    assert len(entries) == 3, entries
    assert not (tmp_path / "cold" / "cache").exists(), "the exports belong in the backend cache, not in --out"

    fingerprint = summary["models"]["default"]["fingerprint"]
    resolved = [tiny_work_row(record, fingerprint) for record in records]
    eager = build_preset("tiny")
    for record, row in zip(records, resolved):
        assert_same_pixels(pixels(tmp_path / "cold" / "images" / f"{record['id']}.png"), draw(eager, [row])[0],
                           f"onnx vs eager, {record['scheduler']}")

    # another node: an empty local cache, the same bucket; the backend fetches the exports instead of exporting
    saved = os.environ["SDFLEET_CACHE"]
    os.environ["SDFLEET_CACHE"] = str(tmp_path / "node-b")
    try:
        warm = make_backend("onnx", build_preset("tiny"), None, cache_uri="s3://sdfleet/backend-cache",
                            fingerprint=fingerprint)
        image = draw(warm.pipe, [resolved[0]])
    finally:
        os.environ["SDFLEET_CACHE"] = saved
    assert warm.exports == 0 and len(warm.sessions) == 3 and (tmp_path / "node-b" / "onnx").is_dir()
    assert_same_pixels(image[0], pixels(tmp_path / "cold" / "images" / f"{records[0]['id']}.png"),
                       "fetched export vs fresh export")


def test_an_out_in_a_bucket_that_does_not_exist_is_refused_not_created(s3, tmp_path, capsys):
    """s3fs makes a missing bucket when a folder is made in it: a typo in a bucket name made a new bucket."""
    from jobs.cli import main

    from jobs.dataset import build_dataset
    from jobs.synthetic import write_images

    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    write_images(tmp_path / "images", 1, size=64)
    build_dataset(str(tmp_path / "images"), str(tmp_path / "data"), resolution=64, log=lambda line: None)
    from test_report import make_output

    run = make_output(tmp_path / "run")
    commands = ((["generate", str(manifest), "--out", "s3://sdflet/runs/a"], "--out"),
                (["finetune", "lora", "--data", str(tmp_path / "data"), "--base", "tiny", "--out", "s3://sdflet/ft"],
                 "--out"),
                (["dataset", "build", str(tmp_path / "images"), "-o", "s3://sdflet/data"], "-o"),
                (["sheet", str(run), "-o", "s3://sdflet/sheet.png"], "-o"))
    for argv, flag in commands:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"{flag} s3://sdflet/" in err and "bucket 'sdflet' does not exist" in err, err
    s3["fs"].invalidate_cache()
    assert not s3["fs"].exists("sdflet")
    # a store that does not answer was said to have no such bucket ("create it")
    s3["cable"].cut()
    try:
        for argv, flag in commands:
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert f"{flag} s3://sdflet/" in err and "the store does not answer (" in err, err
            assert "does not exist" not in err and len(err.strip().splitlines()) == 1, err
    finally:
        s3["cable"].plug()
    # an --out that is a file in the bucket: every row was drawn under `notes.txt/`, which report then refused
    s3["fs"].pipe("sdfleet/notes.txt", b"not a folder")
    assert main(["generate", str(manifest), "--out", "s3://sdfleet/notes.txt"]) == 1
    err = capsys.readouterr().err
    assert "--out s3://sdfleet/notes.txt is a file; give a folder" in err and len(err.strip().splitlines()) == 1, err
    s3["fs"].invalidate_cache()
    assert [key for key in s3["fs"].find("sdfleet") if key.startswith("sdfleet/notes.txt/")] == []


def test_a_listing_sees_what_another_process_wrote_since_the_last_one(s3):
    """s3fs answers a listing from the one it made before: the report a run writes at its end listed the images
    its actors had just drawn (written by other processes) as missing, since the driver had listed images/ while
    planning. folder_files asks the store each time."""
    import s3fs

    from manifests.stores import folder_files

    fs = s3["fs"]
    fs.pipe("sdfleet/listing/images/a.png", b"a")
    assert list(folder_files(fs, "sdfleet/listing/images")) == ["sdfleet/listing/images/a.png"]
    other = s3fs.S3FileSystem(client_kwargs=fs.client_kwargs, skip_instance_cache=True)  # an actor's own client
    other.pipe("sdfleet/listing/images/b.png", b"b")
    assert sorted(folder_files(fs, "sdfleet/listing/images")) == ["sdfleet/listing/images/a.png",
                                                                  "sdfleet/listing/images/b.png"]
