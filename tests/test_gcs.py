"""Generation on Google Cloud Storage: gcp-storage-emulator's JSON API on loopback, spoken to by gcsfs over HTTP.

gcsfs finds the emulator through STORAGE_EMULATOR_HOST, in the driver, its actors and its tasks alike; no
credentials are set, so gcsfs falls back to anonymous access as it would after finding none on a real
cluster. gcsfs's extended filesystem first asks the storage control API (gRPC, which the emulator does not
speak) for a bucket's layout; the fixture turns that off (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false), so the
plain GCSFileSystem, the one the extended one falls back to for an ordinary bucket, is what is tested.
"""

from __future__ import annotations

import json

import pytest

from helpers import count_reads, free_port, lora_bytes, rows, sdfleet, write_manifest
from manifests.stores import read_parquet

BUCKET = "sdfleet-gcs"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """An in-memory GCS emulator with one bucket; yields a gcsfs filesystem on it."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    # a client that hangs up before a reply is read (gcsfs closing a pooled connection) is no error of the
    # test's; the emulator's HTTP server would print its traceback on this process's stderr
    server._api._httpd.handle_error = lambda request, client_address: None
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "SDFLEET_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with pytest.MonkeyPatch.context() as patch:  # the environment as it was, once the module's tests are done
        for key, value in env.items():
            patch.setenv(key, value)
        import sys

        import gcsfs.core

        # gcsfs picks its extended filesystem when it is first imported: imported by an earlier test of this
        # process, `gs://` here would be that one, whose gRPC call hangs with no real GCS to answer (the suite
        # waited for it for good). The plain one is registered for this module's tests, as the subprocesses get.
        registered = sys.modules["fsspec.registry"]._registry  # (fsspec.registry is a read-only view of it)
        for protocol in ("gs", "gcs"):
            patch.setitem(registered, protocol, gcsfs.core.GCSFileSystem)
        yield gcsfs.core.GCSFileSystem(token="anon")
    server.stop()


def _entries(fs, out: str) -> list[dict]:
    fs.invalidate_cache()
    return [e for p in fs.find(f"{out}/results") if p.endswith(".parquet") for e in read_parquet(fs, p).to_pylist()]


def test_a_lora_fine_tuned_into_gcs_is_drawn_from_there_and_a_rerun_draws_only_new_rows(gcs, tmp_path):
    """The card's loop on GCS alone: a dataset and a base model in the bucket, a LoRA fine-tuned into the
    adapter store there, a run that draws with it from a manifest there and writes its output there; then
    the nightly case, a rerun that draws only the rows of a new manifest."""
    from actors.models import export_preset
    from jobs.synthetic import write_images

    fs = gcs
    export_preset("tiny", str(tmp_path / "tiny"))
    fs.put(str(tmp_path / "tiny"), f"{BUCKET}/models/tiny", recursive=True)
    write_images(tmp_path / "images", 4, size=72, seed=2)
    build = sdfleet("dataset", "build", str(tmp_path / "images"), "-o", f"gs://{BUCKET}/data", "--resolution", "64")
    assert build.returncode == 0, build.stderr[-3000:]
    tune = sdfleet("finetune", "lora", "--data", f"gs://{BUCKET}/data", "--base", f"gs://{BUCKET}/models/tiny",
                   "--out", f"gs://{BUCKET}/adapters/style", "--steps", "4", "--checkpoint-every", "2",
                   "--batch-size", "2", "--resolution", "64", "--lr", "1e-3")
    assert tune.returncode == 0, tune.stderr[-3000:]
    assert fs.exists(f"{BUCKET}/adapters/style/pytorch_lora_weights.safetensors")
    records = rows(3) + rows(1, prefix="styled", adapters=[{"name": "style", "scale": 0.8}])
    fs.put(str(write_manifest(tmp_path / "m.parquet", records)), f"{BUCKET}/manifests/m.parquet")

    out = f"{BUCKET}/runs/a"
    argv = ["generate", f"gs://{BUCKET}/manifests", "--out", f"gs://{out}", "--model",
            f"default=gs://{BUCKET}/models/tiny", "--adapters", f"gs://{BUCKET}/adapters", "--batch-size", "2"]
    first = sdfleet(*argv)
    assert first.returncode == 0, first.stderr[-3000:]
    fs.invalidate_cache()
    images = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{out}/images"))
    assert images == sorted(f"{r['id']}.png" for r in records)
    entries = _entries(fs, out)
    assert sorted(e["id"] for e in entries if e["status"] == "ok") == sorted(r["id"] for r in records)
    assert all(e["uri"].startswith(f"gs://{out}/images/") for e in entries if e["status"] == "ok")
    assert not fs.exists(f"{out}/.sdfleet-lease.json")  # the lease went with the run
    summary = json.loads(fs.cat_file(f"{out}/run.json"))
    assert summary["ok"] == 4 and summary["failed"] == 0, summary
    assert any(p.rsplit("/", 1)[-1].endswith(".log") for p in fs.find(f"{out}/logs")), "the log is kept there"

    # the nightly case: a second manifest arrives; the rerun reads the ledger back from the bucket and draws
    # only the new rows (given with trailing slashes, which gcsfs keeps: the same output and model)
    added = rows(2, prefix="added")
    fs.put(str(write_manifest(tmp_path / "m2.parquet", added)), f"{BUCKET}/manifests/m2.parquet")
    second = sdfleet(*[a + "/" if a in (f"gs://{out}", f"default=gs://{BUCKET}/models/tiny") else a for a in argv])
    assert second.returncode == 0, second.stderr[-3000:]
    entries = _entries(fs, out)
    ok = [e["id"] for e in entries if e["status"] == "ok"]
    assert sorted(ok) == sorted(r["id"] for r in records + added), "every row ok exactly once"
    summary = json.loads(fs.cat_file(f"{out}/run.json"))
    assert (summary["ok"], summary["skipped"]) == (2, 4), "the first run's rows are not drawn again"


def test_the_driver_reads_a_gcs_adapter_again_only_when_it_changes(gcs, tmp_path, monkeypatch):
    """An adapter whose GCS version tag is the one this machine already hashed is not downloaded again."""
    import fsspec

    from jobs.generate import resolve_adapters

    fs = gcs
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))

    fs.pipe(f"{BUCKET}/nightly-adapters/style.safetensors", lora_bytes(1))
    reads = count_reads(monkeypatch, fsspec.get_filesystem_class("gs"))  # (the class gs:// opens here: see `gcs`)
    store = f"gs://{BUCKET}/nightly-adapters"
    first, bad = resolve_adapters(store, {"style"})
    assert reads == ["style.safetensors"] and not bad
    reads.clear()
    again, _ = resolve_adapters(store, {"style"})
    assert again == first and reads == [], "known version: not read again"
    fs.pipe(f"{BUCKET}/nightly-adapters/style.safetensors", lora_bytes(2))  # replaced: a new generation
    replaced, _ = resolve_adapters(store, {"style"})
    assert reads == ["style.safetensors"] and replaced["style"] != first["style"]


def test_dataset_build_into_a_bucket_folder_made_in_the_console_and_a_rebuild_there(gcs, tmp_path, capsys):
    """A folder made in the cloud console is a zero-byte `name/` object: an empty folder, not a file in it."""
    from jobs.cli import main
    from jobs.synthetic import write_images
    from manifests.dataset import read_dataset

    fs = gcs
    fs.pipe(f"{BUCKET}/datasets/shapes/", b"")
    uri = f"gs://{BUCKET}/datasets/shapes"
    images = tmp_path / "images"
    write_images(images, 3, size=72, seed=1)
    assert main(["dataset", "build", str(images), "-o", uri, "--resolution", "64"]) == 0, capsys.readouterr()
    first = read_dataset(uri).column("caption").to_pylist()
    assert len(first) == 3
    (images / sorted(p.name for p in images.glob("*.png"))[0]).unlink()
    assert main(["dataset", "build", str(images), "-o", uri, "--resolution", "64"]) == 0, capsys.readouterr()
    fs.invalidate_cache()
    parts = [p for p in fs.ls(f"{BUCKET}/datasets/shapes", detail=False) if p.endswith(".parquet")]
    assert len(parts) == 1, parts  # the first build's part is gone
    assert read_dataset(uri).column("caption").to_pylist() == first[1:]


def test_a_report_group_by_column_the_ledger_will_not_have_is_said_on_a_new_bucket_output(gcs, tmp_path, capsys,
                                                                                         monkeypatch):
    """On an object store a new output has no results/ folder at all (folders are only key prefixes)."""
    from jobs.cli import main
    from jobs.errors import RunFailed

    def stop(*args, **kwargs):
        raise RunFailed("stopped where Ray would start")

    monkeypatch.setattr("jobs.generate._run_on_ray", stop)
    gcs.put(str(write_manifest(tmp_path / "m.parquet", rows(2, sku="A1"))), f"{BUCKET}/manifests-b/m.parquet")
    main(["generate", f"gs://{BUCKET}/manifests-b/m.parquet", "--out", f"gs://{BUCKET}/runs/never",
          "--report", "--report-group-by", "skU"])
    err = capsys.readouterr().err
    assert "warning: --report-group-by 'skU': this run's ledger will have no such column;" in err
    assert ", scheduler, sku; the run goes on, its report will not be grouped" in err
