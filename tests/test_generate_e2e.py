"""End to end on local Ray: the CLI a user runs, on the `tiny` preset, on 2 CPU cores.

One 64-row run with 2 actors is shared by several tests (it is the expensive part); each later run
writes into its own folder or, for the incremental tests, into a copy of that run's output.

The shared run is drawn without the watermark. The mark quantizes DCT coefficients, so a 1/255 float
difference between a batch of 8 and a batch of 1 can flip one coefficient's bin and change one 4x4
block by ~30/255: the pixel-equality promise is about generation, checked before the mark. The mark
itself is checked on the bad-input run, which uses the default payload.
"""

from __future__ import annotations

import collections
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import (
    FAST, assert_same_pixels, free_port, ledger, pixels, png_parameters, rows, run_summary, sdfleet, write_damaged_manifest,
    write_manifest,
)



@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    """64 rows, 2 actors, batch 8; a few rows use other schedulers (ancestral noise included)."""
    base = tmp_path_factory.mktemp("run64")
    records = rows(64)
    for i, name in ((3, "euler_a"), (4, "euler_a"), (5, "dpmpp_2m"), (6, "euler")):
        records[i]["scheduler"] = name
    manifest = write_manifest(base / "m.parquet", records)
    out = base / "out"
    proc = sdfleet("generate", str(manifest), "--out", str(out), "--actors", "2", "--batch-size", "8", "--no-watermark")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"base": base, "manifest": manifest, "records": records, "out": out, "proc": proc}


def test_64_rows_two_actors_draw_every_row_once(run64):
    out = run64["out"]
    entries = ledger(out)
    ids = [e["id"] for e in entries]
    assert len(ids) == 64 and len(set(ids)) == 64, "one ledger row per input row"
    assert {e["status"] for e in entries} == {"ok"}
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(r["id"] for r in run64["records"])
    actors = collections.Counter(e["actor"] for e in entries)
    assert len(actors) == 2, f"both actors should draw: {actors}"
    summary = run_summary(out)
    assert (summary["rows"], summary["ok"], summary["skipped"], summary["failed"], summary["invalid"]) == (64, 64, 0, 0, 0)
    assert summary["actors"] == 2 and summary["images_per_second"] > 0
    assert set(summary["adapter_swaps"]) >= {"total", "per_actor"}
    from jobs.outputs import summary_problem  # the report reads what generate writes, as it writes it

    assert summary_problem(summary) is None


def test_images_carry_their_parameters(run64):
    out = run64["out"]
    by_id = {e["id"]: e for e in ledger(out)}
    record = run64["records"][3]
    params = png_parameters(out / "images" / f"{record['id']}.png")
    assert params["prompt"] == record["prompt"] and params["scheduler"] == "euler_a"
    assert params["params_hash"] == by_id[record["id"]]["params_hash"]
    assert params["seed"] == by_id[record["id"]]["seed"] and params["steps"] == 2
    assert params["watermark"] is None and by_id[record["id"]]["watermark"] is None
    # without a mark, verify must say so (exit 1), not find one
    proc = sdfleet("watermark", "verify", str(out / "images" / f"{record['id']}.png"), "--payload", "sdfleet")
    assert proc.returncode == 1 and "MISSING" in proc.stdout, proc.stdout


def test_same_row_same_pixels_with_batch_1_and_1_actor(run64, tmp_path):
    subset = run64["records"][:12]  # includes the ancestral (euler_a) rows, whose step noise is per row too
    manifest = write_manifest(tmp_path / "m.parquet", subset)
    out = tmp_path / "out"
    proc = sdfleet("generate", str(manifest), "--out", str(out), "--actors", "1", "--batch-size", "1", "--no-watermark")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for record in subset:
        name = f"{record['id']}.png"
        assert_same_pixels(pixels(out / "images" / name), pixels(run64["out"] / "images" / name), record["id"])


def test_rerun_draws_nothing_then_only_the_changed_row(run64, tmp_path):
    out = tmp_path / "out[1]"  # glob characters in the name: the ledger and images are listed, not globbed
    shutil.copytree(run64["out"], out)
    before = len(ledger(out))

    # (a report that cannot be grouped as asked is written ungrouped, with a warning: the run's exit code stands;
    # --report-group-by alone asks for a report)
    proc = sdfleet("generate", str(run64["manifest"]), "--out", str(out), "--actors", "2", "--no-watermark",
                   "--report-group-by", "nope")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: --report-group-by 'nope': the ledger of" in proc.stderr
    assert "the report is not grouped" in proc.stderr and (out / "report" / "index.html").exists()
    summary = run_summary(out)
    assert (summary["ok"], summary["skipped"], summary["not_in_manifests"]) == (0, 64, 0)
    assert summary["actors"] == 0 and "nothing to draw: no actors started" in proc.stderr  # (not --actors' 2)
    assert len(ledger(out)) == before, "a skipped row adds no ledger entry"

    changed = [dict(r) for r in run64["records"]][:-2]  # and the last two rows dropped from the manifest, ...
    changed[10]["prompt"] += ", studio lighting"
    manifest = write_manifest(tmp_path / "changed.parquet", changed)
    (out / "images" / f"{run64['records'][-2]['id']}.png").unlink()  # ... one image deleted since: not kept
    untouched = (out / "images" / f"{changed[11]['id']}.png").stat().st_mtime_ns
    proc = sdfleet("generate", str(manifest), "--out", str(out), "--actors", "1", "--no-watermark", "--report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = run_summary(out)
    assert (summary["ok"], summary["skipped"], summary["not_in_manifests"]) == (1, 61, 1) and summary["actors"] == 1
    assert "1 image(s) in --out are of rows no manifest of this run asks for" in proc.stderr
    assert "62 rows in 1 manifest(s); 62 drawn before (the plan draws" in proc.stderr  # this run's rows only
    assert summary["not_in_manifests_ids"] == [run64["records"][-1]["id"]]
    page = (out / "report" / "index.html").read_text()  # the nightly's page: one row redrawn, 63 images shown
    assert "<summary>1 redrawn</summary>" in page and "<summary>0 new</summary>" in page
    assert "<summary>1 not asked for by this run&#x27;s manifests (images kept)</summary>" in page
    assert page.count("<figure class='tile ok'") == 63  # (the image deleted is shown missing)
    new_entries = ledger(out)[before:]
    assert [e["id"] for e in new_entries] == [changed[10]["id"]]
    assert png_parameters(out / "images" / f"{changed[10]['id']}.png")["prompt"] == changed[10]["prompt"]
    assert (out / "images" / f"{changed[11]['id']}.png").stat().st_mtime_ns == untouched

    # --force plans every row to be drawn again, and so does a new watermark payload (it changes every
    # image); --plan-only counts it without drawing 64 images twice more
    for flags in (["--no-watermark", "--force"], ["--watermark", "acme"]):
        proc = sdfleet("generate", str(manifest), "--out", str(out), "--plan-only", *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "of 62 rows 62 would be drawn, 0 are done" in proc.stderr, (flags, proc.stderr[-2000:])

    # images written after their ledger entry no longer count as done on the entry's word: one replaced by
    # another row's image (a killed run that drew the row another way looks the same), one cut short, one only
    # re-saved (recovered: its own parameters, whole); and one cut short in place with its time put back (a copy
    # cut short that kept the times, a disk error): its size no longer matches the entry's `png_bytes`
    images = out / "images"
    replaced, cut, resaved, damaged = (images / f"{changed[i]['id']}.png" for i in (20, 21, 22, 24))
    replaced.write_bytes((images / f"{changed[23]['id']}.png").read_bytes())
    cut.write_bytes(cut.read_bytes()[:-2000])  # its parameters chunk, before the pixels, is still whole
    resaved.write_bytes(resaved.read_bytes())
    kept = damaged.stat()
    damaged.write_bytes(damaged.read_bytes()[:-2000])
    os.utime(damaged, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert {e["id"]: e["png_bytes"] for e in ledger(out)}[changed[24]["id"]] == kept.st_size
    proc = sdfleet("generate", str(manifest), "--out", str(out), "--plan-only", "--no-watermark")
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = proc.stderr.splitlines()
    notice = [i for i, line in enumerate(said)
              if "4 image(s) written after their ledger entry, or of another size" in line]
    start = [i for i, line in enumerate(said) if " rows in 1 manifest(s); " in line]
    assert notice and start and notice[0] > start[0], proc.stderr[-2000:]  # (the line saying what the run is, first)
    assert "of 62 rows 3 would be drawn, 58 are done, 1 would be recovered" in proc.stderr, proc.stderr[-2000:]


def test_a_done_row_whose_manifest_columns_changed_is_recorded_again_not_drawn(run64, tmp_path):
    """The nightly catalogue renamed a SKU and moved a product to another category: neither changes the image, so
    the row was skipped, and the ledger and the report kept the old values until it was drawn again for another
    reason. Such a row is now recorded again from its entry (same image, same hash), with the columns as they are."""
    out = tmp_path / "out"
    shutil.copytree(run64["out"], out)
    records = [{**r, "sku": f"SKU-{i}", "category": "kitchen"} for i, r in enumerate(run64["records"][:6])]
    images = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    drawn = {e["id"]: e for e in ledger(out)}

    def newest() -> dict[str, dict]:
        return {e["id"]: e for e in sorted(ledger(out), key=lambda e: e["finished_at"])}

    # night 1: the manifest gains the columns; every row was drawn without them
    proc = sdfleet("generate", str(write_manifest(tmp_path / "night1.parquet", records)), "--out", str(out),
                   "--no-watermark")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = run_summary(out)
    assert (summary["ok"], summary["skipped"], summary["relabelled"]) == (0, 6, 6)
    assert "0 drawn, 6 skipped (6 relabelled)" in proc.stderr
    now = newest()
    for record in records:
        entry, kept = now[record["id"]], drawn[record["id"]]
        assert (entry["status"], entry["uri"], entry["sha256"], entry["png_bytes"], entry["params_hash"]) == (
            "ok", kept["uri"], kept["sha256"], kept["png_bytes"], kept["params_hash"])
        assert entry["warning"].startswith("relabelled: ") and entry["sku"] == record["sku"]
    # night 2: a SKU renamed, a product moved, a prompt changed (drawn: its new entry has the new columns), and the
    # columns in another order (not a change)
    records[0]["sku"], records[1]["category"] = "SKU-0-NEW", "home"
    records[2].update(prompt=records[2]["prompt"] + ", studio lighting", sku="SKU-2-NEW")
    night2 = write_manifest(tmp_path / "night2.parquet", [dict(reversed(list(r.items()))) for r in records])
    proc = sdfleet("generate", str(night2), "--out", str(out), "--no-watermark", "--plan-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("of 6 rows 1 would be drawn, 5 are done (2 to be recorded again with their changed manifest columns)"
            in proc.stderr), proc.stderr[-2000:]
    proc = sdfleet("generate", str(night2), "--out", str(out), "--no-watermark", "--report-group-by", "category")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = run_summary(out)
    assert (summary["ok"], summary["skipped"], summary["relabelled"]) == (1, 5, 2)
    now = newest()
    assert (now[records[0]["id"]]["sku"], now[records[1]["id"]]["category"]) == ("SKU-0-NEW", "home")
    assert now[records[2]["id"]]["sku"] == "SKU-2-NEW" and now[records[2]["id"]]["actor"]  # drawn
    assert now[records[0]["id"]]["sha256"] == drawn[records[0]["id"]]["sha256"]
    for record in records[:2] + records[3:]:
        name = f"{record['id']}.png"
        assert (out / "images" / name).stat().st_mtime_ns == images[name], f"{name} was written again"
    page = (out / "report" / "index.html").read_text()
    assert "<summary>2 relabelled: their manifest columns changed" in page and "<summary>1 redrawn</summary>" in page
    assert "category = home · 1 row" in page
    # night 3: nothing changed, nothing recorded
    entries = len(ledger(out))
    proc = sdfleet("generate", str(night2), "--out", str(out), "--no-watermark")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_summary(out)["relabelled"], len(ledger(out))) == (0, entries)


def test_bad_rows_are_invalid_good_rows_drawn_nothing_outside_out(tmp_path):
    # finished images (20 steps): half-denoised 2-step ones read back only part of their bits
    good = [{**row, "steps": 20} for row in rows(3, prefix="good")]
    good.append({"id": "emoji", "prompt": "un café ☕ 🚀 製品写真", **FAST, "steps": 20})
    bad = [
        {"id": "no-prompt", "prompt": None, **FAST},
        {"id": "empty", "prompt": "   ", **FAST},
        {"id": "w770", "prompt": "a mug", **{**FAST, "width": 770}},
        {"id": "g-nan", "prompt": "a mug", "guidance_scale": float("nan"), **FAST},
        {"id": "g-inf", "prompt": "a mug", "guidance_scale": float("inf"), **FAST},
        {"id": "neg-steps", "prompt": "a mug", **{**FAST, "steps": -3}},
        {"id": "neg-seed", "prompt": "a mug", "seed": -1, **FAST},
        {"id": "../x", "prompt": "a mug", **FAST},
        {"id": "a/b", "prompt": "a mug", **FAST},
        {"id": "dup", "prompt": "a mug", **FAST},
        {"id": "dup", "prompt": "a cup", **FAST},
        {"id": "sched", "prompt": "a mug", "scheduler": "warp-speed", **FAST},
        {"id": "model", "prompt": "a mug", "model": "sdxl", **FAST},
        {"id": "small", "prompt": "a mug", **{**FAST, "width": 128}},  # too small for the watermark
    ]
    # `scheduler` as a plain string column (the enum check is the validator's job, not Parquet's)
    work = tmp_path / "work"
    manifest = write_manifest(work / "bad.parquet", good + bad)
    no_prompt_column = write_manifest(work / "no-prompt-column.parquet", [{"id": "lonely", **FAST}])
    # a bad copy: rows r0, r1 (row group 0) cannot be decoded; r2, r3 are drawn
    damaged = write_damaged_manifest(work / "damaged.parquet", groups=2, per_group=2, damaged_group=0, **FAST)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    proc = sdfleet("manifest", "validate", str(manifest), str(no_prompt_column), cwd=work)
    assert proc.returncode == 1
    expected_fields = {
        "no-prompt": "prompt", "empty": "prompt", "w770": "width", "g-nan": "guidance_scale",
        "g-inf": "guidance_scale", "neg-steps": "steps", "neg-seed": "seed", "../x": "id", "a/b": "id",
        "dup": "id", "sched": "scheduler", "model": "model",
    }
    for row_id, field in expected_fields.items():
        lines = [line for line in proc.stdout.splitlines() if f"(`{row_id}`)" in line and f"`{field}`" in line]
        assert lines, f"validate did not name row {row_id!r} field {field!r}:\n{proc.stdout}"
    # a file without the column is said once, for the file (its rows, `lonely`, each lack it)
    assert f"error: {no_prompt_column}: no `prompt` column, which every manifest needs" in proc.stdout, proc.stdout
    assert "`width` must be a multiple of 8" in proc.stdout and "got 770" in proc.stdout

    out = work / "out"
    proc = sdfleet("generate", str(manifest), str(no_prompt_column), str(damaged), "--out", str(out), cwd=work)
    assert proc.returncode == 2, proc.stderr[-3000:]
    by_status = collections.defaultdict(list)
    for entry in ledger(out):
        by_status[entry["status"]].append(entry)
    assert sorted(e["id"] for e in by_status["ok"]) == sorted([r["id"] for r in good] + ["r2", "r3"])
    invalid = {(e["id"], e["row"]): e["error"] for e in by_status["invalid"]}
    unreadable = {key: invalid.pop(key) for key in [("r0", 0), ("r1", 1)]}
    assert set(unreadable.values()) == {f"{damaged} rows 0-1 (row group 0) cannot be read (ArrowInvalid: Invalid "
                                        "or truncated PLAIN-encoded BYTE_ARRAY data): the file's data cannot be "
                                        "decoded: write it again from its source"}
    assert len(invalid) == len(bad) + 1, invalid
    for (row_id, _), error in invalid.items():
        assert error, f"invalid row {row_id} has no reason"
    assert any("`width`" in e and "770" in e for e in invalid.values())
    assert sum("`id` appears in 2 rows" in e for e in invalid.values()) == 2
    assert any("too small to carry the watermark" in e for e in invalid.values())
    summary = run_summary(out)
    assert (summary["ok"], summary["invalid"], summary["rows"]) == (6, len(bad) + 3, len(good) + len(bad) + 5)
    assert png_parameters(out / "images" / "emoji.png")["prompt"] == "un café ☕ 🚀 製品写真"
    assert {e["watermark"] for e in by_status["ok"]} == {"sdfleet"}
    marked = [str(out / "images" / f"{r['id']}.png") for r in good]
    proc = sdfleet("watermark", "verify", *marked)
    assert proc.returncode == 0 and proc.stdout.count("ok ") == len(good), proc.stdout + proc.stderr

    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if not p.is_relative_to(out))
    assert after == before, "generate wrote outside --out"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(f"{i}.png" for i in [*(r["id"] for r in good),
                                                                                            "r2", "r3"])


def test_setup_errors_exit_1_with_one_clear_line(tmp_path, capsys):
    import torch

    from jobs.cli import main

    manifest = write_manifest(tmp_path / "m.parquet", rows(2))
    cases = [  # in this process (each is refused before or just after Ray starts), then the CLI's own process
        (["--model", "default=/nonexistent/model"], "default=/nonexistent/model"),
        (["--actors", "0"], "--actors"),
        (["--watermark", ""], "--watermark"),
        (["--watermark", "x"], "--watermark 'x' is 1 byte(s) of UTF-8; a watermark payload is 4 to 32 bytes"),
        (["--watermark", "\x00\x00\x00\x01"], "is nearly all zero (or all one) bits"),
        (["--out", ""], "--out must not be empty"),  # the working directory would take the run's folders
        (["--adapters", " "], "--adapters must not be empty"),
        # on a machine without a GPU a local Ray never gets one: said at once, not a run that waits forever
        *([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: this machine has no GPU")]),
        # a cluster address nothing answers on: said in seconds, not after Ray's minutes of retries
        (["--address", f"127.0.0.1:{free_port()}"], "nothing answers there"),
    ]
    for flags, needle in cases:
        code = main(["generate", str(manifest), "--out", str(tmp_path / "out"), *flags])
        err = capsys.readouterr().err
        assert code == 1 and needle in err and "Traceback" not in err, (flags, err[-2000:])
        if flags[0] == "--address":  # the flag to check is named, and only that one
            assert "(check --address / RAY_ADDRESS)" in err and "--actors" not in err, err
    proc = sdfleet("generate", str(manifest), "--out", str(tmp_path / "out"), "--backend", "tensorrt", "--device", "cpu")
    assert proc.returncode == 1 and "--backend tensorrt needs an NVIDIA GPU" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert main(["generate", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "out")]) == 1
    assert "missing.parquet" in capsys.readouterr().err


def test_compile_backend_draws_what_eager_drew_and_keeps_its_graphs_in_the_backend_cache(run64, tmp_path):
    """Three rows at tests/test_backends.py's shapes: after that module, torch's local cache holds these
    graphs and this run only loads them (a cold compile takes a minute on 2 cores)."""
    records = run64["records"][:3]
    out = tmp_path / "out"
    proc = sdfleet("generate", str(write_manifest(tmp_path / "m.parquet", records)), "--out", str(out),
                   "--backend", "compile", "--no-watermark", "--backend-cache", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for record in records:
        name = f"{record['id']}.png"
        assert_same_pixels(pixels(out / "images" / name), pixels(run64["out"] / "images" / name), "compile vs eager")
    (stats,) = run_summary(out)["backend_stats"].values()
    assert stats["backend"] == "compile" and stats["mode"] == "default" and stats["compiles"] == 2  # UNet, VAE
    cache = stats["compile_cache"]
    assert cache["graph_hits"] + cache["graph_misses"] == 2
    # what was built, or found in torch's local cache, is kept for the next machine (tests/test_backends.py
    # shows that machine starting warm): one file after each graph
    assert len(list((tmp_path / "cache" / "torch-compile").glob("*/*.bin"))) == cache["files_saved"] == 2


def test_a_row_may_name_a_preset_without_a_model_flag(tmp_path):
    """The `model` column takes a preset name as `manifest validate` does: the run draws it, fingerprinted
    like `--model NAME=PRESET`; a name that is neither a preset nor a --model stays invalid, naming both."""
    records = [*rows(1, model="tiny-random"), *rows(1, prefix="own", model="mine")]
    manifest = write_manifest(tmp_path / "m.parquet", records)
    out = tmp_path / "out"
    proc = sdfleet("generate", str(manifest), "--out", str(out), "--no-watermark")
    assert proc.returncode == 2, proc.stderr[-3000:]
    entries = {e["id"]: e for e in ledger(out)}
    assert entries["row-000"]["status"] == "ok" and entries["row-000"]["model"] == "tiny-random"
    assert entries["own-000"]["status"] == "invalid" and "tiny-random" in entries["own-000"]["error"]
    assert "add --model mine=REF" in entries["own-000"]["error"]
    assert run_summary(out)["models"]["tiny-random"]["fingerprint"].startswith("preset:tiny-random:")


def test_a_manifest_folder_that_holds_the_output_reads_no_ledger_part_as_a_manifest(tmp_path):
    """`generate folder --out folder/out` twice: the second run must not take the first run's ledger parts
    (.parquet files under --out) for manifests, which made its good rows duplicates and the parts invalid; nor
    the report's thumbnail index (report/thumbs/index.parquet), whose rows came out invalid."""
    folder = tmp_path / "catalog"
    manifest = write_manifest(folder / "m.parquet", rows(2))
    out = folder / "out"
    for attempt in range(2):
        proc = sdfleet("generate", str(folder), "--out", str(out), "--no-watermark", *["--report"][:1 - attempt])
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "report" / "thumbs" / "index.parquet").is_file()
    assert "2 rows in 1 manifest(s)" in proc.stderr  # the folder's one manifest, not the ledger part beside it
    summary = run_summary(out)
    assert (summary["rows"], summary["skipped"], summary["invalid"]) == (2, 2, 0), summary
    assert {e["source"] for e in ledger(out)} == {str(manifest)}


def test_a_manifest_without_rows_is_refused_in_its_own_line_before_ray(tmp_path):
    """It was a run that drew nothing and exited 0: an upstream export that wrote an empty file passed as a
    night with nothing to do (tests/test_cli_errors.py has the output with earlier runs)."""
    manifest = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist(rows(1)).slice(0, 0), manifest)
    proc = sdfleet("generate", str(manifest), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("[sdfleet] ")]
    assert said == [f"sdfleet: error: the manifests hold no rows ({manifest}): nothing was drawn; check what wrote "
                    "them"], said
    assert "ray:" not in proc.stderr and not (tmp_path / "out" / "run.json").exists()
