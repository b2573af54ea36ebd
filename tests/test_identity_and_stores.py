"""Identities that hold and stores every process can reach (issue 31, items 2, 3 and 8).

- an id is the same id whatever the Arrow type of its column, so a binary duplicate cannot slip past the check;
- numeric columns take numbers only: text, true/false and floats for integers are refused, naming row and field;
- `--out memory://...` and a local `--out` on a multi-node cluster are refused before anything is drawn;
- adapter names resolve inside the store only, and a huge prompt never becomes a huge line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pytest

from helpers import FAST, REPO, ledger, rows, run_summary, sdfleet, write_manifest
from manifests.schema import coerced_id, quoted, validate_row


# -- identity and types ---------------------------------------------------------------------------------

def test_ids_are_counted_as_the_schema_reads_them_whatever_the_column_type(tmp_path):
    from manifests.reader import count_ids

    binary = tmp_path / "binary.parquet"
    write_manifest(binary, [{"id": b"dup", "prompt": "a"}, {"id": b"dup", "prompt": "b"}, {"id": b"solo", "prompt": "c"}],
                   schema=pa.schema([("id", pa.binary()), ("prompt", pa.string())]))
    text = write_manifest(tmp_path / "text.parquet", [{"id": "solo", "prompt": "d"}])
    total, counts = count_ids([str(binary), str(text)])
    assert total == 4 and counts["dup"] == 2 and counts["solo"] == 2
    assert coerced_id(b"sku-1") == "sku-1" and coerced_id("sku-1") == "sku-1"
    assert coerced_id(17) is None and coerced_id(b"\xff") is None  # the schema refuses these: not counted


@pytest.mark.parametrize("field,value", [
    ("seed", "123"), ("seed", True), ("seed", 12.0), ("steps", True), ("steps", 2.0), ("steps", 2.5),
    ("width", "256"), ("guidance_scale", "7.5"), ("guidance_scale", False),
])
def test_numeric_fields_take_numbers_only(field, value):
    parsed, errors, _ = validate_row({"id": "r1", "prompt": "a mug", field: value}, source="m.parquet", row=4)
    assert parsed is None and len(errors) == 1, errors
    message = str(errors[0])
    assert message.startswith("m.parquet row 4 (`r1`): `" + field + "` must be a"), message
    assert repr(value) in message


def test_numbers_of_any_integer_or_float_type_still_pass():
    import numpy as np

    parsed, errors, _ = validate_row({"id": "r1", "prompt": "a mug", "seed": np.int64(7), "steps": 3,
                                      "guidance_scale": 4, "adapters": [{"name": "a", "scale": np.float32(0.5)}]},
                                     source="m", row=0)
    assert not errors and parsed.seed == 7 and parsed.guidance_scale == 4.0 and parsed.adapters[0].scale == 0.5
    _, errors, _ = validate_row({"id": "r1", "prompt": "a mug", "adapters": [{"name": "a", "scale": "1"}]},
                                source="m", row=0)
    assert [e.field for e in errors] == ["adapters.0.scale"]


def test_a_huge_value_is_quoted_not_copied():
    _, errors, _ = validate_row({"id": "x" * 100_000, "prompt": "a mug"}, source="m", row=0)
    message = str(errors[0])
    assert len(message) < 600 and "more characters" in message
    assert quoted("short") == "'short'"


# -- stores every process can reach ------------------------------------------------------------------------

def test_a_memory_store_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    import jobs.generate
    from jobs.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(jobs.generate, "connect", no_ray)
    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    for flags in (["--out", "memory://runs/x"], ["--out", str(tmp_path / "o"), "--adapters", "memory://adapters"]):
        assert main(["generate", str(manifest), *flags]) == 1
        err = capsys.readouterr().err
        assert "memory of one process" in err and "s3://" in err and len(err.strip().splitlines()) == 1, err
    assert main(["finetune", "lora", "--data", str(tmp_path), "--base", "tiny", "--out", "memory://tuned"]) == 1
    assert "--out memory://tuned is the memory of one process" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["generate", "{m}", "--out", "foo://runs/x"], "--out foo://runs/x: "),
    (["generate", "{m}", "--out", "{tmp}/o", "--adapters", "foo://a"], "--adapters foo://a: "),
    (["generate", "{m}", "--out", "{tmp}/o", "--model", "default=foo://m"], "--model foo://m: "),
    (["generate", "foo://m.parquet", "--out", "{tmp}/o"], "a manifest foo://m.parquet: "),
    (["finetune", "lora", "--data", "foo://d", "--base", "tiny", "--out", "{tmp}/t"], "--data foo://d: "),
    (["finetune", "lora", "--data", "{tmp}", "--base", "foo://m", "--out", "{tmp}/t"], "--base foo://m: "),
    (["manifest", "validate", "foo://m.parquet"], ""),
    (["report", "foo://runs/x"], ""),
    (["sheet", "foo://runs/x", "-o", "{tmp}/s.png"], ""),
    (["dataset", "build", "foo://imgs", "--out", "{tmp}/ds"], ""),
])
def test_a_uri_of_a_store_fsspec_does_not_know_is_one_line_naming_it(tmp_path, capsys, monkeypatch, argv, flag):
    """`foo://x` (a typo of a protocol) ended in fsspec's traceback "ValueError: Protocol not known: foo", or in
    "flags: Protocol not known: foo", which named neither the flag nor what would do."""
    import jobs.generate
    from jobs.cli import main

    monkeypatch.setattr(jobs.generate, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    assert main([a.format(m=manifest, tmp=tmp_path) for a in argv]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"error: {flag}foo:// is not a store fsspec knows (s3://, gs://" in err, err


def test_a_protocol_in_capitals_is_said_to_be_lower_case(tmp_path, capsys):
    from jobs.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    assert main(["generate", str(manifest), "--out", "S3://bucket/run"]) == 1
    assert "--out S3://bucket/run: S3:// is not a store fsspec knows: protocols are lower case (s3://)" in (
        capsys.readouterr().err)
    # watermark verify goes on to the next image, saying why this one could not be checked
    main(["watermark", "verify", "foo://x.png"])
    assert "foo://x.png: cannot be read (foo:// is not a store fsspec knows" in capsys.readouterr().out


def test_a_local_out_on_a_multi_node_cluster_is_refused_unless_shared(tmp_path, monkeypatch):
    import jobs.generate as generate

    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    monkeypatch.setattr(generate, "alive_nodes", lambda: 3)
    monkeypatch.setattr(generate, "connect", lambda *a, **k: {"CPU": 2.0})
    monkeypatch.setattr(generate, "disconnect", lambda: None)
    cfg = generate.GenerateConfig(manifests=[str(manifest)], out=str(tmp_path / "out"))
    with pytest.raises(generate.RunFailed, match=r"is a local path, and the cluster has 3 nodes.*--shared-out"):
        generate.run_generate(cfg)

    class Reached(Exception):
        pass

    def size_actors(*args):  # the run got past the check
        raise Reached

    monkeypatch.setattr(generate, "size_actors", size_actors)
    with pytest.raises(Reached):
        generate.run_generate(cfg.model_copy(update={"shared_out": True}))


# -- bounded text and adapters inside their store --------------------------------------------------------

def test_adapter_links_out_of_the_store_are_refused(tmp_path):
    from actors.adapters import AdapterError, AdapterStore

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"not read")
    store = tmp_path / "store"
    (store / "styles").mkdir(parents=True)
    os.symlink(outside / "secret.safetensors", store / "leak.safetensors")
    os.symlink(outside, store / "styles" / "linked")
    for name in ("leak", "styles/linked/secret"):
        with pytest.raises(AdapterError, match="outside the adapter store"):
            AdapterStore(str(store)).resolve(name)


def test_a_long_prompt_gives_a_bounded_warning_and_no_diffusers_notice(caplog):
    from actors.generate import draw
    from actors.presets import TOKENIZER_DIR, build_preset
    from actors.tokenizer import load_tokenizer
    from manifests.tokens import prompt_overflow

    prompt = "a red star on a gray background " + "with many more words " * 5000
    warning = prompt_overflow(load_tokenizer(TOKENIZER_DIR), prompt)
    assert warning is not None and len(warning) < 500 and "more characters" in warning

    pipe = build_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    row = {"id": "r", "prompt": prompt, "negative_prompt": "", "seed": 1, "steps": 1, "guidance_scale": 7.5,
           "width": 256, "height": 256, "scheduler": "ddim", "model": "default", "adapters": []}
    with caplog.at_level(logging.WARNING):
        draw(pipe, [row])
    assert not [r for r in caplog.records if "truncated because CLIP" in r.getMessage()]


# -- failures that read as one line ---------------------------------------------------------------------

def test_a_ledger_the_store_refuses_ends_in_one_line_and_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    import jobs.recorder as recorder
    from jobs.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", rows(3))
    real_write_part, calls = recorder.write_part, []

    def write_part(*args):
        calls.append(args)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_write_part(*args)

    monkeypatch.setattr(recorder, "write_part", write_part)
    monkeypatch.setattr(recorder, "LEDGER_FLUSH_ROWS", 1)
    out = tmp_path / "out"
    code = main(["generate", str(manifest), "--out", str(out), "--batch-size", "1", "--no-watermark"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("sdfleet: error:")]
    assert code == 1 and len(errors) == 1, err[-3000:]
    assert f"cannot write the ledger to {out}/results" in errors[0] or "cannot write the ledger to file://" in errors[0]
    assert "No space left on device" in errors[0] and "Traceback" not in err
    kept = ledger(out)
    assert len(kept) == 1 and kept[0]["status"] == "ok"  # the first part stands, its image too
    assert (out / "images" / f"{kept[0]['id']}.png").exists()



def test_a_process_that_exits_right_after_reading_a_parquet_file_exits_cleanly(tmp_path):
    """Every Parquet file read whole goes through `read_parquet`, which leaves no Arrow work running after it
    returns. With pyarrow's defaults, 26 of 30 such exits aborted here (SIGABRT at interpreter shutdown,
    apache/arrow#50482); a rerun with nothing to draw ended that way in CI."""
    import pyarrow.parquet as pq

    path = tmp_path / "wide.parquet"  # many row groups and columns: many reads in flight
    pq.write_table(pa.table({f"c{j}": [str(i) for i in range(20_000)] for j in range(8)}), path, row_group_size=500)
    script = ("import fsspec; from manifests.stores import read_parquet; "
              f"assert read_parquet(fsspec.filesystem('file'), {str(path)!r}).num_rows == 20000")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(6):
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"exit {attempt}: {proc.returncode}\n{proc.stderr[-2000:]}"




def test_many_parquet_files_are_fetched_a_chunk_at_a_time_in_order_and_a_bad_one_is_named(monkeypatch):
    """A ledger of thousands of parts on an object store is fetched FETCH_CHUNK files a request batch
    (concurrent on async stores), never opened one by one (benchmarks/bench_store_reads.py measures it)."""
    import io

    import pyarrow.parquet as pq

    from manifests import stores

    fs = fsspec.filesystem("memory")
    paths = [f"/chunk-test/p{i:03d}.parquet" for i in range(7)]
    for i, path in enumerate(paths):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": [f"r{i}a", f"r{i}b"], "n": [i, i]}), buf)
        fs.pipe_file(path, buf.getvalue())
    batches = []
    monkeypatch.setattr(stores, "FETCH_CHUNK", 3)
    real = type(fs).cat_ranges
    try:
        with monkeypatch.context() as spy:
            spy.setattr(type(fs), "open", lambda *a, **k: pytest.fail("a file was opened on its own"))
            spy.setattr(type(fs), "cat_ranges", lambda self, p, *a, **k: batches.append(len(p)) or real(self, p, *a, **k))
            got = list(stores.read_parquet_files(fs, paths, columns=["id"]))
            assert [p for p, _ in got] == paths and batches == [3, 3, 1]
            batches.clear()  # big files: a fetch holds no more than FETCH_BYTES (one file at least)
            monkeypatch.setattr(stores, "FETCH_BYTES", 250)
            sizes = {p: 100 for p in paths} | {paths[2]: 400}
            assert [p for p, _ in stores.read_parquet_files(fs, paths, sizes=sizes)] == paths
            assert batches == [2, 1, 2, 2]
        assert [t.column_names for _, t in got] == [["id"]] * 7
        assert [t.column("id").to_pylist() for _, t in got][4] == ["r4a", "r4b"]

        fs.pipe_file(paths[5], b"PAR1 cut short")
        fs.rm(paths[6])
        with pytest.raises(stores.UnreadableFile) as bad:
            list(stores.read_parquet_files(fs, paths))
        assert bad.value.path == f"memory://{paths[5]}" and bad.value.damaged  # named as the user would move it
        with pytest.raises(stores.UnreadableFile) as gone:
            list(stores.read_parquet_files(fs, paths[6:]))
        assert gone.value.path == f"memory://{paths[6]}" and isinstance(gone.value.cause, FileNotFoundError)
        assert not gone.value.damaged  # not there: not a part to move aside
    finally:
        fs.rm("/chunk-test", recursive=True)


def test_a_damaged_ledger_part_stops_the_run_naming_it_and_the_report_too(tmp_path, capsys):
    from jobs.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    (out / "results" / "20261205T000000-abcdef-00000.parquet").write_bytes(b"PAR1 truncated by a full disk")
    assert main(["generate", str(manifest), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "sdfleet: error: ledger part " in err and "20261205T000000-abcdef-00000.parquet cannot be read" in err
    assert "move it out of results/ and rerun `sdfleet generate` with the run's manifests" in err
    assert "Traceback" not in err
    assert not (out / "images").exists()  # stopped before anything was drawn

    # report, sheet and eval said three other things of the same part (eval: nothing to do)
    (out / "run.json").write_text(json.dumps({"run_id": "20261205T000000-abcdef"}))
    (out / "images").mkdir()  # (eval reads the ledger only where there are images)
    for argv in (["report", str(out)], ["sheet", str(out), "-o", str(tmp_path / "s.png")],
                 ["eval", str(manifest), "--out", str(out)]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "20261205T000000-abcdef-00000.parquet cannot be read" in err and "Traceback" not in err
        assert "move it out of results/ and rerun `sdfleet generate` with the run's manifests" in err, (argv, err)


def test_a_manifest_copied_into_results_is_refused_by_name_not_read_as_a_ledger(tmp_path, capsys):
    """A Parquet file in results/ without the ledger's columns (a manifest put there by mistake, with a `status`
    column of its own) was read by the report as a ledger part: its `status` became the rows' status and its name a
    run that never finished. Every reader of the ledger now refuses it, naming the file and what it lacks."""
    from jobs.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    out = tmp_path / "out"
    (out / "results").mkdir(parents=True)
    stray = out / "results" / "zzz.parquet"
    write_manifest(stray, [{**r, "status": "new"} for r in rows(2)])
    (out / "run.json").write_text(json.dumps({"run_id": "20261205T000000-abcdef"}))
    for argv in (["generate", str(manifest), "--out", str(out)], ["report", str(out)],
                 ["eval", str(manifest), "--out", str(out)]):
        (out / "images").mkdir(exist_ok=True)  # eval looks for the ledger only where there are images
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "zzz.parquet is not a ledger part (it has no column params_hash, finished_at): a Parquet file " \
               "sdfleet did not write, which results/ must not hold; move it out of results/" in err, (argv, err)
        assert "Traceback" not in err
    assert not list((out / "images").iterdir())  # generate stopped before drawing


def test_package_code_reads_parquet_files_whole_only_through_read_parquet():
    callers = [f"{p.relative_to(REPO)}:{n}" for package in ("actors", "cluster", "jobs", "manifests")
               for p in (REPO / package).rglob("*.py") if p.name != "stores.py"
               for n, line in enumerate(p.read_text().splitlines(), 1) if "pq.read_table(" in line]
    assert not callers, f"read these with manifests.stores.read_parquet: {callers}"


@pytest.mark.parametrize("uri, protocol, path", [
    ("/data/run::2", "file", "/data/run::2"),  # a folder's name, not a chain
    ("file:///data/run::2", "file", "/data/run::2"),
    ("memory://bucket/a::b", "memory", "bucket/a::b"),
    ("simplecache::memory://bucket/x", "simplecache", "/bucket/x"),  # every link a protocol: a chain
    ("/data/plain", "file", "/data/plain"),
])
def test_a_double_colon_chains_stores_only_where_every_link_names_one(uri, protocol, path):
    from manifests.stores import fs_protocols, url_to_fs

    fs, got = url_to_fs(uri)
    assert protocol in fs_protocols(fs) and got == path


def test_a_relative_path_with_a_double_colon_is_a_folder_here(tmp_path, monkeypatch):
    from manifests.stores import url_to_fs

    monkeypatch.chdir(tmp_path)
    assert url_to_fs("out::x/y")[1] == f"{tmp_path}/out::x/y"  # fsspec: "Protocol not known: out"


def test_package_code_reads_user_paths_only_through_stores_url_to_fs():
    callers = [f"{p.relative_to(REPO)}:{n}" for package in ("actors", "cluster", "jobs", "manifests")
               for p in (REPO / package).rglob("*.py") if p.name != "stores.py"
               for n, line in enumerate(p.read_text().splitlines(), 1)
               if "fsspec.core.url_to_fs(" in line or "fsspec.open(" in line or "fsspec.open_files(" in line]
    assert not callers, f"open these with manifests.stores.url_to_fs (a `::` in a name): {callers}"


# -- one run per output -------------------------------------------------------------------------------

def _lease(out, run_id: str, heartbeat_age: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / ".sdfleet-lease.json").write_text(json.dumps({
        "run_id": run_id, "host": "other-host", "pid": 4242, "since": "2026-12-04T10:00:00+00:00",
        "heartbeat": time.time() - heartbeat_age}))


def test_a_second_run_into_a_held_output_refuses_naming_the_holder(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", rows(1))
    out = tmp_path / "out"
    _lease(out, "20261204T100000-abc123", heartbeat_age=5)
    proc = sdfleet("generate", str(manifest), "--out", str(out), timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sdfleet: error:")]
    assert len(errors) == 1 and "in use by run 20261204T100000-abc123 (host other-host, pid 4242)" in errors[0]
    assert "since 2026-12-04T10:00:00+00:00" in errors[0] and "--wait" in errors[0]
    assert not (out / "images").exists() and not list((out / "results").glob("*.parquet"))


def test_wait_waits_for_the_holder_to_let_go(tmp_path, monkeypatch, capsys):
    import jobs.lease as lease

    monkeypatch.setattr(lease, "WAIT_POLL_SECONDS", 0.1)
    monkeypatch.setattr(lease, "WAIT_SAY_SECONDS", 0.7)
    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.05)
    out = tmp_path / "out"
    _lease(out, "20261204T100000-abc123", heartbeat_age=1)
    threading.Timer(1.6, (out / ".sdfleet-lease.json").unlink).start()
    fs, root = fsspec.core.url_to_fs(str(out))
    started = time.time()
    with lease.Lease(fs, root, "mine", wait=True) as held:
        waited = time.time() - started
        assert held.holder()["run_id"] == "mine" and waited >= 1.6
    # the holder is named once, then a short line every WAIT_SAY_SECONDS: every poll was a line (720 an hour)
    said = capsys.readouterr().err.splitlines()
    assert len([line for line in said if "waiting for it (--wait)" in line]) == 1, said
    still = len([line for line in said if "still waiting for run 20261204T100000-abc123" in line])
    assert 1 <= still <= waited / 0.7, (still, waited, said)
    assert not (out / ".sdfleet-lease.json").exists()
    _lease(out, "20261204T100000-abc123", heartbeat_age=1)
    with pytest.raises(lease.RunFailed, match="in use by run 20261204T100000-abc123"):
        lease.Lease(fs, root, "mine", wait=False).__enter__()


def test_of_two_runs_claiming_an_output_in_the_same_instant_the_last_writer_keeps_it(tmp_path, monkeypatch):
    """Both claims pass the first check; `confirm` (after the settle time, which the run spends starting
    Ray) reads the lease back, and only the run whose claim is there goes on, keeping it alive."""
    import jobs.lease as lease

    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.3)
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.05)
    out = tmp_path / "out"
    out.mkdir()
    fs, root = fsspec.core.url_to_fs(str(out))
    first, second = lease.Lease(fs, root, "first"), lease.Lease(fs, root, "second")
    claimed = time.monotonic()
    first.__enter__()
    second._write()  # its check ran before the first claim landed
    second._claimed_at = time.monotonic()
    with pytest.raises(lease.OutputTaken, match="in use by run second"):  # (a RunFailed: the CLI says it in a line)
        first.confirm()
    assert time.monotonic() - claimed >= 0.3, "confirm reads back only once the settle time has passed"
    second.confirm()
    beat = json.loads((out / ".sdfleet-lease.json").read_text())["heartbeat"]
    time.sleep(0.3)
    assert json.loads((out / ".sdfleet-lease.json").read_text())["heartbeat"] > beat, "the holder's heartbeat runs"
    second.__exit__(None, None, None)
    assert not (out / ".sdfleet-lease.json").exists()


@pytest.mark.parametrize("store", ["local", "memory"])
def test_a_run_that_loses_its_output_to_a_run_started_in_the_same_instant_leaves_no_log_there(tmp_path, store):
    """The loser finds out only after its log was opened (and Ray started): its log was left in the winner's
    OUT/logs/ (copied there, on an object store). Any other failure keeps the log, as before."""
    from jobs.console import command_log
    from jobs.errors import OutputTaken, RunFailed

    root = str(tmp_path / "out") if store == "local" else f"/lost-race-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("file" if store == "local" else "memory")
    fs.makedirs(root, exist_ok=True)
    kept = f"{root}/logs/sdfleet-kept.log"
    with pytest.raises(OutputTaken):
        with command_log(fs, root, "sdfleet-lost.log", "run") as path:
            Path(path).write_text("Ray started\n")
            raise OutputTaken("--out is in use by run other")
    assert not os.path.exists(path) and not fs.exists(f"{root}/logs/sdfleet-lost.log")
    with pytest.raises(RunFailed):  # any other end of a run keeps its log in OUT/logs/
        with command_log(fs, root, "sdfleet-kept.log", "run") as path:
            Path(path).write_text("Ray started\n")
            raise RunFailed("the run stopped")
    assert fs.cat_file(kept) == b"Ray started\n"


# -- a row that kills its actor -------------------------------------------------------------------------


# -- one run with all of it: a stale lease, binary ids with a duplicate, a huge prompt, a row that kills
#    its actor (one run, not five: each costs half a minute on 2 cores) ------------------------------------

@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    schema = pa.schema([("id", pa.binary()), ("prompt", pa.string()), ("steps", pa.int64()),
                        ("width", pa.int64()), ("height", pa.int64())])
    binary = write_manifest(tmp / "binary.parquet", [
        {"id": i, "prompt": f"a red star on a gray background {n}", **FAST} for n, i in enumerate([b"dup", b"dup", b"solo"])
    ], schema=schema)
    text = rows(5, prefix="t")
    text[1]["prompt"] = "a red star on a gray background " + "and more words " * 7000
    poison = text[3]["id"]
    strings = write_manifest(tmp / "strings.parquet", text)
    out = tmp / "out::2"  # fsspec reads `::` as a chain of URLs: this run wrote to tmp/out, silently
    _lease(out, "20261204T090000-dead00", heartbeat_age=3600)  # a run that died holding it
    proc = sdfleet("generate", str(binary), str(strings), "--out", str(out), "--batch-size", "3", "--no-watermark",
                   "--verbose", env={"SDFLEET_TEST_KILL_ACTOR_ON_ROW": poison})
    return {"proc": proc, "out": out, "binary": binary, "text": text, "poison": poison,
            "entries": {(e["id"], e["row"]): e for e in ledger(out)}}


def test_every_row_of_the_mixed_run_is_recorded_once(mixed_run):
    proc, entries = mixed_run["proc"], mixed_run["entries"]
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = {("dup", 0), ("dup", 1), ("solo", 2), *((r["id"], n) for n, r in enumerate(mixed_run["text"]))}
    assert set(entries) == expected and len(ledger(mixed_run["out"])) == len(expected)


def test_a_binary_id_duplicate_is_invalid_in_generate_and_validate(mixed_run):
    entries = mixed_run["entries"]
    assert [entries[("dup", 0)]["status"], entries[("dup", 1)]["status"]] == ["invalid", "invalid"]
    assert "appears in 2 rows" in entries[("dup", 0)]["error"] and entries[("solo", 2)]["status"] == "ok"
    assert not (mixed_run["out"] / "images" / "dup.png").exists()
    check = sdfleet("manifest", "validate", str(mixed_run["binary"]))
    assert check.returncode == 1, check.stdout + check.stderr
    dup_lines = [line for line in check.stdout.splitlines() if "(`dup`)" in line and "appears in 2 rows" in line]
    assert len(dup_lines) == 2 and " row 0 " in dup_lines[0] and " row 1 " in dup_lines[1], check.stdout


def test_a_huge_prompt_gives_a_bounded_warning_and_line(mixed_run):
    long_row = mixed_run["text"][1]
    entry = mixed_run["entries"][(long_row["id"], 1)]
    assert entry["status"] == "ok" and 0 < len(entry["warning"]) < 500, entry["warning"][:300]
    stderr = mixed_run["proc"].stderr
    assert max(len(line) for line in stderr.splitlines()) < 2000
    assert "truncated because CLIP" not in stderr
    assert "execution finished" in stderr  # --verbose: Ray Data's own lines show here as well as in the log


def test_a_row_that_kills_its_actor_fails_alone_and_the_run_goes_on(mixed_run):
    poison, entries = mixed_run["poison"], mixed_run["entries"]
    failed = entries[(poison, 3)]
    assert failed["status"] == "failed" and "died twice" in failed["error"] and f"(`{poison}`)" in failed["error"]
    others = [e for (i, _), e in entries.items() if i not in (poison, "dup")]
    assert others and all(e["status"] == "ok" for e in others)
    images = sorted(p.stem for p in (mixed_run["out"] / "images").glob("*.png"))
    assert images == sorted(["solo", *(r["id"] for r in mixed_run["text"] if r["id"] != poison)])
    assert "failed: " in mixed_run["proc"].stderr and poison in mixed_run["proc"].stderr


def test_a_stale_lease_is_taken_over_and_said_so_and_the_lease_goes_with_the_run(mixed_run):
    assert "taking over the lease of run 20261204T090000-dead00" in mixed_run["proc"].stderr
    assert run_summary(mixed_run["out"])["rows"] == 8 and not (mixed_run["out"] / ".sdfleet-lease.json").exists()


def test_a_lease_whose_process_is_gone_on_this_machine_is_taken_over_at_once(tmp_path, monkeypatch, capsys):
    import socket
    import subprocess
    import sys

    import jobs.lease as lease

    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.05)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / ".sdfleet-lease.json").write_text(json.dumps({
        "run_id": "killed", "host": socket.gethostname(), "pid": dead.pid, "since": "x", "heartbeat": time.time()}))
    fs, root = fsspec.core.url_to_fs(str(out))
    with lease.Lease(fs, root, "mine") as held:
        assert held.holder()["run_id"] == "mine"
    said = capsys.readouterr().err
    assert "taking over the lease of run killed" in said and "its process is gone" in said, said


def test_a_run_whose_lease_was_taken_over_while_it_was_suspended_stops_and_leaves_the_lease_alone(tmp_path, monkeypatch):
    """A run suspended past the stale time (Ctrl-Z, a paused VM) had its output taken over; resumed, it rewrote
    the lease as its own at its next heartbeat and drew on beside the other run."""
    import threading

    import cluster.connect
    import jobs.lease as lease

    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.05)
    monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.05)
    stopped = threading.Event()
    reasons = []
    monkeypatch.setattr(cluster.connect, "stop_main", lambda reason: (reasons.append(reason), stopped.set()))
    out = tmp_path / "out"
    out.mkdir()
    fs, root = fsspec.core.url_to_fs(str(out))
    other = {"run_id": "newer", "host": "node-2", "pid": 7, "since": "x", "heartbeat": time.time()}
    with lease.Lease(fs, root, "mine") as held:
        held.confirm()
        (out / ".sdfleet-lease.json").write_text(json.dumps(other))  # what the other run wrote meanwhile
        assert stopped.wait(5), "the run went on drawing beside the run that took its output over"
        time.sleep(0.2)  # beats that would have come
        assert json.loads((out / ".sdfleet-lease.json").read_text())["run_id"] == "newer"
    assert json.loads((out / ".sdfleet-lease.json").read_text())["run_id"] == "newer", "it let go of the other's lease"
    assert reasons and "was taken over by run newer (host node-2, pid 7)" in reasons[0], reasons


@pytest.mark.parametrize("content", ['{"run_id": "trunc', "[1, 2]", ""])
def test_a_lease_file_that_is_not_a_lease_is_taken_over_and_said_so(tmp_path, monkeypatch, capsys, content):
    import jobs.lease as lease

    monkeypatch.setattr(lease, "SETTLE_SECONDS", 0.05)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".sdfleet-lease.json").write_text(content)
    fs, root = fsspec.core.url_to_fs(str(out))
    with lease.Lease(fs, root, "mine") as held:
        assert held.holder()["run_id"] == "mine"
    said = capsys.readouterr().err
    assert said.count("is not a lease") == 1 and "taking it over" in said, said


def test_plan_only_names_the_rows_it_would_not_draw(tmp_path):
    """Each of the first 20 rows it would not draw is named by where it is: a bad adapter's reason names no row,
    so its rows read alike ("adapter 'x': ..." twenty times) until the plan said where each was."""
    styled = [{**r, "adapters": [{"name": "style", "scale": 1.0}]} for r in rows(2, prefix="styled")]
    records = rows(1) + styled + [{**r, "steps": 0} for r in rows(24, prefix="bad")]
    manifest = write_manifest(tmp_path / "m.parquet", records)
    proc = sdfleet("generate", str(manifest), "--out", str(tmp_path / "out"), "--plan-only", "--no-watermark")
    assert proc.returncode == 2, proc.stderr[-2000:]
    failing = [line for line in proc.stderr.splitlines() if line.startswith("[sdfleet] would fail: ")]
    assert [line.split(": adapter")[0] for line in failing] == [
        f"[sdfleet] would fail: {manifest} row {n} (`styled-{n - 1:03d}`)" for n in (1, 2)], failing
    named = [line for line in proc.stderr.splitlines() if line.startswith("[sdfleet] invalid: ")]
    assert len(named) == 18 and all("`steps` must be in 1..500, got 0" in line for line in named), named
    # (validate read no adapters, yet was said to list every row problem: it found 1 of 29 in a QA manifest)
    assert "[sdfleet] ... and 6 more: a run names every one in its ledger, and `sdfleet manifest validate` every " \
           "one, without Ray (with --adapters URI, the adapters that fail rows, with their counts)" in proc.stderr


def test_plan_only_counts_what_would_be_drawn_and_writes_nothing(mixed_run):
    out = mixed_run["out"]
    before = sorted(p.name for p in out.rglob("*"))
    strings = mixed_run["binary"].with_name("strings.parquet")
    proc = sdfleet("generate", str(strings), "--out", str(out), "--plan-only", "--batch-size", "3", "--no-watermark")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # 5 rows: the one that killed its actor has no ok entry, so it would be drawn; the other 4 are done
    assert "of 5 rows 1 would be drawn, 4 are done, 0 would be recovered" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in out.rglob("*")) == before
    # nor anywhere else: its log in the temporary folder goes when it succeeds (a nightly dry run left one a night)
    (said,) = re.findall(r"Ray's and the libraries' messages: (\S+) \(removed if it succeeds\)", proc.stderr)
    assert not os.path.exists(said), said
    fresh = out.with_name("fresh-out")  # nor makes a folder for an output that does not exist yet
    proc = sdfleet("generate", str(strings), "--out", str(fresh), "--plan-only", "--no-watermark")
    assert proc.returncode == 0 and "of 5 rows 5 would be drawn" in proc.stderr, proc.stderr[-2000:]
    assert not fresh.exists()


def test_a_bucket_asked_without_credentials_says_so_not_that_the_store_does_not_answer():
    """`dataset build ... -o s3://...` with no credentials in the environment was told to check the endpoint and
    the network: the store was never asked."""
    from types import SimpleNamespace

    from botocore.exceptions import NoCredentialsError

    from manifests.stores import require_bucket

    def ls(bucket):
        try:
            raise NoCredentialsError()
        except NoCredentialsError as cause:  # s3fs raises its own error from botocore's
            raise OSError("listing failed") from cause

    fs = SimpleNamespace(protocol=("s3", "s3a"), exists=lambda path: False, ls=ls)
    with pytest.raises(ValueError) as said:
        require_bucket(fs, "bucket/datasets/mugs", "-o", "s3://bucket/datasets/mugs", ValueError)
    assert str(said.value).startswith("-o s3://bucket/datasets/mugs: no credentials for the store"), said.value
    assert "AWS_ACCESS_KEY_ID" in str(said.value) and "network" not in str(said.value)
