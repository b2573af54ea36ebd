"""The plan's verdict on single rows (jobs/plan.py), without Ray: what a work row says before any actor."""

from __future__ import annotations

import json

import pytest

from actors.models import describe_model
from helpers import write_damaged_manifest
from jobs.plan import PlanState, plan_part, plan_row
from manifests.reader import DamagedManifest, survey


def state(**fields) -> PlanState:
    return PlanState(models={"default": describe_model("default", "tiny").defaults()}, watermark="sdfleet", **fields)


def test_an_invalid_row_keeps_the_adapters_it_lists_where_they_read():
    """Rows invalid for their adapters (one listed twice) or another field were recorded with no adapters:
    `report --group-by adapters` put them under (none)."""
    twice = [{"name": "style", "scale": 1.0}, {"name": "style", "scale": 0.5}]
    work = plan_row({"id": "r", "prompt": "a mug", "adapters": twice}, source="m.parquet", row=0, state=state())
    assert work["status"] == "invalid" and [(a["name"], a["scale"]) for a in work["adapters"]] == [
        ("style", 1.0), ("style", 0.5)]
    work = plan_row({"id": "r", "prompt": "a mug", "steps": 0, "adapters": twice[:1]}, source="m.parquet", row=0,
                    state=state())
    assert work["status"] == "invalid" and [a["name"] for a in work["adapters"]] == ["style"]
    work = plan_row({"id": "r", "prompt": "a mug", "adapters": '[{"name": "style"}]'}, source="m.parquet", row=0,
                    state=state())  # JSON text, not a list: none read
    assert work["status"] == "invalid" and work["adapters"] is None


def test_a_row_with_several_bad_fields_says_where_it_is_once():
    """Each field's error led with the file, row and id: a 300-character id was said twice over."""
    work = plan_row({"id": "mug", "prompt": "a mug", "steps": 0, "guidance_scale": -1.0}, source="m.parquet", row=4,
                    state=state())
    assert work["status"] == "invalid" and work["error"].startswith("m.parquet row 4 (`mug`): `steps` ")
    assert work["error"].count("m.parquet") == 1 and "; `guidance_scale` " in work["error"], work["error"]


def test_a_row_naming_an_adapter_twice_is_invalid_broken_or_not():
    """Listed twice, a working adapter's row was `failed` by the actor; a broken one's said its reason twice."""
    raw = {"id": "mug", "prompt": "a red mug", "adapters": [{"name": "x", "scale": 1.0}, {"name": "x", "scale": 0.5}]}
    for broken in ({"x": "adapter 'x': not in the store"}, {}):
        work = plan_row(raw, source="m.parquet", row=3, state=state(adapter_errors=broken))
        assert work["status"] == "invalid" and "adapter 'x' is listed twice in one row" in work["error"], work
        assert "not in the store" not in work["error"]


def test_a_row_too_small_for_the_mark_is_invalid_naming_where_it_is_and_the_way_out():
    work = plan_row({"id": "small", "prompt": "a mug", "width": 128}, source="m.parquet", row=0, state=state())
    assert work["status"] == "invalid"
    assert work["error"].startswith("m.parquet row 0 (`small`): 128x256 is too small") and "--no-watermark" in work["error"]


def test_a_damaged_row_group_makes_its_rows_invalid_and_the_others_are_planned(tmp_path):
    """A bad copy of a manifest: the rows of the row group that cannot be decoded are invalid, named by their
    ids (the id column alone still reads) and by where they are; the other row groups plan as usual."""
    path = write_damaged_manifest(tmp_path / "m.parquet", groups=3, per_group=4, damaged_group=1)
    found = survey([str(path)])  # the survey reads only ids and adapters: the run starts
    assert found.total == 12 and len(found.parts) == 1  # small row groups: one part, read on past the damage
    rows = [r for part in found.parts for r in plan_part(part, state())]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(12)]
    assert [r["row"] for r in rows] == list(range(12))
    bad = [r for r in rows if r["status"] == "invalid"]
    assert [r["id"] for r in bad] == ["r4", "r5", "r6", "r7"]
    assert bad[0]["error"].startswith(f"{path} rows 4-7 (row group 1) cannot be read (ArrowInvalid: ")
    assert bad[0]["error"].endswith("write it again from its source")
    assert all(r["status"] is None for r in rows if r not in bad)  # to draw


def test_a_pass_through_date_python_cannot_hold_makes_its_row_invalid_not_the_run_stop(tmp_path):
    """One `infinity` timestamp (int64's largest, as Postgres exports it) stopped every plan task of the run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a mug", "a vase"],
                             "valid_until": pa.array([2**63 - 1, 0], pa.timestamp("us"))}), path)
    rows = [r for part in survey([str(path)]).parts for r in plan_part(part, state())]
    assert [(r["id"], r["status"]) for r in rows] == [("a", "invalid"), ("b", None)]
    assert rows[0]["error"].startswith(f"{path} row 0 (`a`): `valid_until` holds a timestamp[us] value that cannot")
    assert json.loads(rows[1]["extra"]) == {"valid_until": "1970-01-01T00:00:00"}


def test_text_that_is_not_utf8_makes_its_row_invalid_and_the_others_are_planned(tmp_path):
    """A `string` column holding bytes that are not UTF-8 (written by a tool that does not check) stopped the
    run's survey and its plan tasks with a UnicodeDecodeError; now the row is invalid, naming the field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def not_utf8(values):
        raw = pa.array(values, pa.binary())
        return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())

    path = tmp_path / "m.parquet"
    adapters = pa.ListArray.from_arrays(  # row 2: [{"name": b"\xffbrand", "scale": 1.0}]; the others null
        pa.array([0, 0, 0, 1, 1], pa.int32()),
        pa.StructArray.from_arrays([not_utf8([b"\xffbrand"]), pa.array([1.0])], names=["name", "scale"]),
        mask=pa.array([True, True, False, True]))
    pq.write_table(pa.table({"id": not_utf8([b"a", b"\xff", b"c", b"d"]),
                             "prompt": not_utf8([b"a mug", b"a vase", b"a lamp", b"a \xfecup"]),
                             "adapters": adapters}), path, row_group_size=2)
    found = survey([str(path)])
    assert found.total == 4 and dict(found.id_counts) == {"a": 1, "c": 1, "d": 1} and found.adapter_names == set()
    rows = [r for part in found.parts for r in plan_part(part, state())]
    assert [(r["row"], r["id"], r["status"]) for r in rows] == [
        (0, "a", None), (1, None, "invalid"), (2, "c", "invalid"), (3, "d", "invalid")]
    assert rows[1]["error"].startswith(f"{path} row 1: `id` is not UTF-8 text (bytes b'\\xff'); write the")
    assert rows[2]["error"].startswith(f"{path} row 2 (`c`): `adapters` is not UTF-8 text; write the")
    assert rows[3]["error"].startswith(f"{path} row 3 (`d`): `prompt` is not UTF-8 text (bytes b'a \\xfecup')")


def test_a_manifest_whose_ids_cannot_be_read_stops_the_run_naming_the_file(tmp_path):
    path = write_damaged_manifest(tmp_path / "m.parquet", damaged_group=2, column="id")
    with pytest.raises(DamagedManifest, match=rf"^{path} cannot be read \(ArrowInvalid: .*write it again"):
        survey([str(path)])


@pytest.mark.parametrize("text", ["[1, 2]", '"a prompt"', "[" * 100_000])
def test_an_image_whose_parameters_are_not_an_object_is_drawn_again(tmp_path, text):
    """An image in --out/images whose parameters chunk is JSON of another shape (or nested past Python's stack)
    is not one a row drew: the plan draws the row again instead of stopping the run."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    from jobs.plan import recovered

    (tmp_path / "images").mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", text)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "r1.png", pnginfo=info)
    assert recovered(str(tmp_path), "r1", "any-hash") is None


def test_ids_that_differ_only_in_case_are_invalid_where_the_disk_ignores_case(tmp_path, monkeypatch):
    """`SKU-1.png` and `sku-1.png` are one file on macOS and Windows disks: each row would overwrite the other."""
    import fsspec

    import jobs.generate as generate

    ids = {"SKU-1": 1, "sku-1": 1, "lamp": 1}
    local = fsspec.filesystem("file")
    assert generate.case_clashes(ids, local, str(tmp_path)) == {}  # this disk tells case apart: both are kept
    monkeypatch.setattr(generate, "_ignores_case", lambda root: True)
    clashes = generate.case_clashes(ids, local, str(tmp_path / "out"))
    assert clashes == {"SKU-1": ["sku-1"], "sku-1": ["SKU-1"]}
    assert generate.case_clashes(ids, fsspec.filesystem("memory"), "/out") == {}  # object stores keep both
    work = plan_row({"id": "sku-1", "prompt": "a mug"}, source="m.parquet", row=1, state=state(case_clashes=clashes))
    assert work["status"] == "invalid" and work["error"].startswith(
        "m.parquet row 1 (`sku-1`): `id` differs only in case from 'SKU-1', and --out is on a disk that does not "
        "tell case apart")
    assert plan_row({"id": "lamp", "prompt": "a lamp"}, source="m.parquet", row=2,
                    state=state(case_clashes=clashes))["status"] is None
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # the probe left nothing behind


@pytest.mark.parametrize("raw, listed", [
    ({"prompt": "a <my-mug> on a desk"}, False),
    ({"prompt": "a mug on a desk", "negative_prompt": "<my-mug>, blurry"}, False),
    ({"prompt": "a <my-mug> on a desk", "adapters": [{"name": "mug-v1", "scale": 0.0}]}, False),  # left out
    ({"prompt": "a <my-mug> on a desk", "adapters": [{"name": "mug-v1", "scale": 1.0}]}, True),
    ({"prompt": "a mug on a desk"}, True),
    ({"prompt": "a <my-mug> on a desk", "adapters": [{"name": "mug-v1", "scale": 0.5}]}, False),  # no scale
    ({"prompt": "a <MY-MUG> on a desk"}, False),  # CLIP lower-cases the text: it drew with the embedding
    ({"prompt": "a mug on a desk", "negative_prompt": "<My-Mug>"}, False),
])
def test_a_row_using_an_embeddings_token_without_listing_it_is_invalid(raw, listed):
    """An actor keeps the embeddings it loaded for other rows: unlisted, the token drew with the embedding on
    one actor and without it on another, under one params_hash (the rerun skipped whichever came first)."""
    tokens = {"<my-mug>": "mug-v1"}
    work = plan_row({"id": "r", **raw}, source="m.parquet", row=2,
                    state=state(embedding_tokens=tokens, adapter_fingerprints={"mug-v1": "f" * 16}))
    # an invalid row keeps its adapters in the ledger: `report --group-by adapters` put every one under (none)
    assert [(a["name"], a["scale"]) for a in work.get("adapters", [])] == [
        (a["name"], a["scale"]) for a in raw.get("adapters", [])]
    if listed:
        assert work["status"] is None
    elif raw.get("adapters", [{}])[0].get("scale") == 0.5:  # the actor recorded it `failed`
        assert work["status"] == "invalid"
        assert work["error"] == ("m.parquet row 2 (`r`): `adapters` adapter 'mug-v1' is a Textual Inversion embedding, "
                                 "which has no scale; got 0.5 (use 1.0, or 0 to leave it out)")
    else:
        where = "the negative prompt" if "negative_prompt" in raw else "the prompt"
        how = "lists at scale 0, which loads nothing" if raw.get("adapters") else "do not list"
        assert work["status"] == "invalid"
        assert work["error"] == (f"m.parquet row 2 (`r`): {where} uses '<my-mug>', the token of the embedding "
                                 f"'mug-v1', which the row's `adapters` {how}: add {{\"name\": \"mug-v1\", "
                                 "\"scale\": 1.0} (unlisted, the row would draw with it on an actor that loaded it "
                                 "for another row, and without it elsewhere)")


def test_a_row_listing_an_embedding_its_prompts_never_call_is_drawn_with_a_warning():
    """The embedding of `<cat-toy>` saved as cat-toy.safetensors, and a prompt saying "cat-toy" (as other tools use
    the file's name): the row drew the base model's image, `ok`, without a word."""
    planned = state(embedding_tokens={"<cat-toy>": "cat-toy"}, adapter_fingerprints={"cat-toy": "f" * 16})

    def plan(prompt: str, scale: float = 1.0) -> dict:
        return plan_row({"id": "r", "prompt": prompt, "adapters": [{"name": "cat-toy", "scale": scale}]},
                        source="m.parquet", row=2, state=planned)

    named = plan("a cat-toy on a desk")
    assert named["status"] is None and named["warning"] == (
        "`adapters` lists the embedding 'cat-toy', whose token '<cat-toy>' neither prompt uses: it changes nothing "
        "(the prompt has the file's name: an embedding acts through its token); write '<cat-toy>' where its concept "
        "goes")
    assert plan("a mug on a desk")["warning"].endswith("it changes nothing; write '<cat-toy>' where its concept goes")
    assert plan("a <Cat-Toy> on a desk").get("warning") is None  # (in any case, as CLIP reads it)
    assert plan("a mug", scale=0.0).get("warning") is None  # at scale 0 it is left out anyway


def test_an_embedding_whose_token_is_a_word_of_the_models_tokenizer_invalidates_no_other_row(tmp_path):
    """One A1111 embedding named `red` (refused on the actor: "already a word") made every row saying "red"
    invalid, rows drawn ok the night before among them. Which tokens are words is each model's own: a model
    whose tokenizer lacks the word could load it, so its rows are still checked."""
    from jobs.generate import words_of_models

    tokens = {"red": "redword", "<my-mug>": "mug-v1"}
    models = {"default": describe_model("default", "tiny").defaults()}
    words = words_of_models(tokens, models)
    assert words == {"default": frozenset({"red"})}
    planned = state(embedding_tokens=tokens, word_tokens=words, adapter_fingerprints={"mug-v1": "f" * 16})

    def status(prompt: str, planned: PlanState):
        return plan_row({"id": "r", "prompt": prompt}, source="m.parquet", row=0, state=planned)["status"]

    assert status("a red star", planned) is None and status("a <my-mug>", planned) == "invalid"
    unknown = state(embedding_tokens=tokens, word_tokens={}, adapter_fingerprints={"mug-v1": "f" * 16})
    assert status("a red star", unknown) == "invalid"
    # a row that lists it fails at the plan, as its actor would fail it: --plan-only, the nightly's dry run, said
    # "0 would fail" for a run that then exited 2
    planned.adapter_fingerprints["redword"] = "e" * 16
    work = plan_row({"id": "r", "prompt": "a red star", "adapters": [{"name": "redword", "scale": 1.0}]},
                    source="m.parquet", row=0, state=planned)
    assert work["status"] == "failed" and work["error"] == (
        "adapter 'redword': its token 'red' is already a word of this model's tokenizer (added, it would change "
        "every prompt using the word on the actor that loaded it); save it again under a new token, such as "
        "<my-object>"), work


def test_a_failed_row_whose_image_is_still_its_own_is_recorded_ok_again(monkeypatch):
    """Night 2 failed a row (an adapter upload cut short), night 3 had the file back: the row was skipped as done
    and its newest entry stayed `failed` in the ledger, the report and the sheet for good. Its ok entry is
    recorded again from the ledger, without reading the image back (a night that failed the whole catalogue
    would have every image read the next)."""
    import jobs.plan

    monkeypatch.setattr(jobs.plan, "recovered", lambda *args: pytest.fail("an image was read back"))
    hashes = {rid: plan_row({"id": rid, "prompt": f"a red {rid}"}, source="m.parquet", row=0,
                            state=state())["params_hash"] for rid in ("mug", "cup")}
    entry = {"uri": "/out/images/mug.png", "sha256": "s" * 64, "png_bytes": 1234, "watermark_bits": 1.0,
             "warning": "prompt is 90 CLIP tokens, over the 77 the model reads"}
    planned = state(done=hashes, existing={"mug", "cup"}, restored={"mug": entry}, out="/out")
    mug = plan_row({"id": "mug", "prompt": "a red mug"}, source="m.parquet", row=0, state=planned)
    cup = plan_row({"id": "cup", "prompt": "a red cup"}, source="m.parquet", row=1, state=planned)
    assert (mug["status"], mug["uri"], mug["sha256"], mug["png_bytes"], mug["watermark_bits"]) == (
        "ok", "/out/images/mug.png", "s" * 64, 1234, 1.0)
    # the warning the image was drawn with is kept after the mark: the report's tile still says the prompt was cut
    assert mug["warning"].startswith("restored: ") and mug["warning"].endswith(f"; as drawn: {entry['warning']}")
    assert cup["status"] == "skipped"
    # the row changed since: drawn, as any changed row is
    assert plan_row({"id": "mug", "prompt": "a blue mug"}, source="m.parquet", row=0, state=planned)["status"] is None


def test_a_scale_0_adapter_gone_from_the_store_fails_no_row():
    """A row listing an adapter at scale 0 draws the base model (its hash leaves the entry out), yet failed once
    the adapter was retired from the store, over its good image."""
    planned = state(adapter_errors={"style": "adapter 'style': is not in the adapter store"})
    row = {"id": "r", "prompt": "a red star", "adapters": [{"name": "style", "scale": 0.0}]}
    assert plan_row(row, source="m.parquet", row=0, state=planned)["status"] is None
    row["adapters"] = [{"name": "style", "scale": 0.5}]
    assert plan_row(row, source="m.parquet", row=0, state=planned)["status"] == "failed"


def test_the_driver_learns_each_named_embeddings_token_from_its_file(tmp_path):
    import torch
    from safetensors.torch import save_file

    from jobs.generate import resolve_adapters

    save_file({"<my-mug>": torch.zeros(2, 32)}, str(tmp_path / "mug-v1.safetensors"))
    tokens: dict[str, str] = {}
    found, bad = resolve_adapters(str(tmp_path), {"mug-v1"}, tokens)
    assert set(found) == {"mug-v1"} and not bad and tokens == {"<my-mug>": "mug-v1"}


def test_two_embeddings_of_one_token_named_in_one_run_fail_their_rows_naming_each_other(tmp_path):
    """Two versions of a Textual Inversion trained with the same --token: an actor holds one of them, and
    the other's rows failed or drew with the first, by which one the actor met first."""
    import torch
    from safetensors.torch import save_file

    from jobs.generate import resolve_adapters

    for name in ("mug-v1", "mug-v2"):
        save_file({"<my-mug>": torch.zeros(1, 32)}, str(tmp_path / f"{name}.safetensors"))
    save_file({"<my-cup>": torch.zeros(1, 32)}, str(tmp_path / "cup.safetensors"))
    tokens: dict[str, str] = {}
    found, bad = resolve_adapters(str(tmp_path), {"mug-v1", "mug-v2", "cup"}, tokens)
    assert set(bad) == {"mug-v1", "mug-v2"} and tokens == {"<my-cup>": "cup"}
    assert bad["mug-v1"].startswith("adapter 'mug-v1': its token '<my-mug>' is also the token of 'mug-v2', named")
    save_file({"<MY-CUP>": torch.zeros(1, 32)}, str(tmp_path / "cup-v2.safetensors"))  # one token to CLIP
    tokens = {}
    found, bad = resolve_adapters(str(tmp_path), {"cup", "cup-v2"}, tokens)
    assert set(bad) == {"cup", "cup-v2"} and tokens == {}
    assert bad["cup-v2"].startswith("adapter 'cup-v2': its token '<MY-CUP>' is also the token of 'cup', named")


def test_an_image_its_ledger_entry_vouches_for_is_not_read_back_when_the_row_changed(monkeypatch):
    """A row whose params changed (a new model or mark changes every row's hash) and whose image its newest `ok`
    entry vouches for is drawn again without reading the image back: that read is two requests per row on an
    object store. An image no entry vouches for (a killed run's) is still read, and recovered when it matches."""
    import jobs.plan

    reads = []
    monkeypatch.setattr(jobs.plan, "recovered", lambda out, rid, phash: reads.append(rid) or None)
    planned = state(done={"mug": "an older hash"}, existing={"mug", "cup"}, out="/out")
    mug = plan_row({"id": "mug", "prompt": "a red mug"}, source="m.parquet", row=0, state=planned)
    cup = plan_row({"id": "cup", "prompt": "a red cup"}, source="m.parquet", row=1, state=planned)
    assert mug["status"] is None and cup["status"] is None and reads == ["cup"]


def test_a_worker_reads_the_plan_state_from_the_object_store_once(monkeypatch):
    """Each plan task unpickled the whole state (the done-ledger: ~70 MB for a million rows, ~0.9 s): a manifest
    of a thousand parts did it a thousand times. A worker process keeps the state of the run's ref it last read."""
    import types

    import ray

    import jobs.plan

    gets = []
    monkeypatch.setattr(ray, "get", lambda ref: gets.append(ref.hex()) or state(done={ref.hex(): "h"}))
    monkeypatch.setattr(jobs.plan, "_HELD", {})
    first, second = (types.SimpleNamespace(hex=lambda k=k: k) for k in ("ref-1", "ref-2"))
    assert [jobs.plan._state_from(first).done for _ in range(3)] == [{"ref-1": "h"}] * 3
    assert jobs.plan._state_from(second).done == {"ref-2": "h"} and gets == ["ref-1", "ref-2"]
    assert list(jobs.plan._HELD) == ["ref-2"]  # one run's state at a time


def test_a_plan_task_yields_its_part_in_chunks(tmp_path, monkeypatch):
    """A part is a whole row group however large: its work rows go out PLAN_CHUNK_ROWS at a time, in order,
    not as one table held whole (a million-row row group held ~5 GB in one worker)."""
    import pyarrow as pa

    import jobs.plan
    from helpers import rows, write_manifest

    monkeypatch.setattr(jobs.plan, "PLAN_CHUNK_ROWS", 2)
    path = write_manifest(tmp_path / "m.parquet", rows(5, steps=2))
    (part,) = survey([str(path)]).parts
    tables = list(jobs.plan.plan_batch(pa.Table.from_pylist([vars(part)]), state()))
    assert [t.num_rows for t in tables] == [2, 2, 1]
    assert [i for t in tables for i in t.column("row").to_pylist()] == [0, 1, 2, 3, 4]


def test_manifest_values_json_has_no_type_for_reach_the_ledger_as_readable_text(tmp_path):
    """A binary column reached the ledger as Python's repr (b'\\x00\\x01'), a timestamp with a space for ISO's T."""
    import datetime as dt
    from decimal import Decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from manifests.ledger import to_table

    when = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    manifest = pa.table({"id": ["mug"], "prompt": ["a red mug"], "price": pa.array([Decimal("19.99")], pa.decimal128(10, 2)),
                         "launched": pa.array([when], pa.timestamp("s", tz="UTC")), "day": pa.array([when.date()]),
                         "blob": pa.array([b"\x00\x01"]), "tags": pa.array([["new", "red"]])})
    pq.write_table(manifest, tmp_path / "m.parquet")
    (raw,) = pq.read_table(tmp_path / "m.parquet").to_pylist()
    work = plan_row(raw, source="m.parquet", row=0, state=state())
    (entry,) = to_table([{**work, "status": "ok"}]).to_pylist()
    assert (entry["price"], entry["launched"], entry["day"], entry["blob"], entry["tags"]) == (
        "19.99", "2026-03-01T12:00:00+00:00", "2026-03-01", "0001", ["new", "red"])


def test_a_done_row_whose_manifest_columns_changed_is_marked_to_be_recorded_again():
    """A catalogue renamed a SKU or moved a product to another category: the image is the same (the columns do not
    change what a row draws), but the ledger kept the old values until the row was drawn again for another reason,
    and the report grouped the row under the old category night after night."""
    row = {"id": "mug", "prompt": "a red mug", "sku": "MUG-1", "category": "kitchen"}
    first = plan_row(row, source="m.parquet", row=0, state=state())
    planned = state(done={"mug": first["params_hash"]}, existing={"mug"},
                    labels={"mug": first["passthrough_hash"]}, out="/out")

    def planned_as(**changed):
        return plan_row({**row, **changed}, source="m.parquet", row=0, state=planned)

    same = planned_as()
    assert (same["status"], same["relabel"]) == ("skipped", False)
    reordered = plan_row(dict(reversed(list(row.items()))), source="m.parquet", row=0, state=planned)
    assert reordered["relabel"] is False  # the manifest's column order is not a change
    renamed = planned_as(sku="MUG-1b")
    assert (renamed["status"], renamed["relabel"]) == ("skipped", True)
    assert renamed["params_hash"] == first["params_hash"] and json.loads(renamed["extra"])["sku"] == "MUG-1b"
    assert planned_as(brand="acme")["relabel"] is True  # a column added
    weighed = plan_row({**row, "grams": 7}, source="m.parquet", row=0, state=state())["passthrough_hash"]
    assert plan_row({**row, "grams": 7.0}, source="m.parquet", row=0, state=state())["passthrough_hash"] == weighed
    assert plan_row({**row, "grams": 7.5}, source="m.parquet", row=0, state=state())["passthrough_hash"] != weighed
    assert plan_row({"id": "mug", "prompt": "a red mug"}, source="m.parquet", row=0,
                    state=planned)["relabel"] is True  # every column dropped
    assert planned_as(prompt="a blue mug")["status"] is None  # drawn again: its new entry has the new columns
    # an entry written before the ledger had the column vouches for nothing about the columns: not recorded again
    older = state(done={"mug": first["params_hash"]}, existing={"mug"}, out="/out")
    assert plan_row({**row, "sku": "MUG-1b"}, source="m.parquet", row=0, state=older)["relabel"] is False


def test_an_embedding_named_only_at_scale_0_adds_no_token_to_check(tmp_path):
    """No row loads it, so no actor knows its token: a row using the token without it drew the same everywhere,
    yet was made invalid, and a second embedding of the same token failed as a clash with it (QA)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import save_file

    from jobs.generate import resolve_adapters

    for name, token in (("kept", "<dup-tok>"), ("zeroed", "<dup-tok>"), ("unused", "<my-tok>")):
        save_file({token: torch.zeros(1, 32)}, str(tmp_path / f"{name}.safetensors"))
    rows = [{"id": "a", "prompt": "a <dup-tok>", "adapters": [{"name": "kept", "scale": 1.0}]},
            {"id": "b", "prompt": "a <dup-tok>", "adapters": [{"name": "zeroed", "scale": 0.0}]},
            {"id": "c", "prompt": "a <my-tok>", "adapters": [{"name": "unused", "scale": -0.0}]},
            {"id": "d", "prompt": "a <my-tok>", "adapters": [{"name": "kept", "scale": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    found = survey([str(tmp_path / "m.parquet")])
    assert found.adapter_names == {"kept", "zeroed", "unused"} and found.loaded_adapter_names == {"kept"}
    tokens: dict[str, str] = {}
    fingerprints, errors = resolve_adapters(str(tmp_path), found.adapter_names, tokens, found.loaded_adapter_names)
    assert not errors and set(fingerprints) == found.adapter_names and tokens == {"<dup-tok>": "kept"}
    planned = state(embedding_tokens=tokens, adapter_fingerprints=fingerprints)
    verdicts = [plan_row(r, source="m.parquet", row=i, state=planned)["status"] for i, r in enumerate(rows)]
    assert verdicts == [None, "invalid", None, None], verdicts  # b uses kept's token, listing only zeroed


def test_a_token_inside_a_longer_token_the_row_lists_is_no_use_of_it():
    """`ti_a1111` and `ti_a1111_dir` (A1111 files named by their file names; `mystyle`, `mystyle_v2`): a row listing
    `ti_a1111_dir` and using it was refused as using `ti_a1111` unlisted, though the tokenizer reads the longer token
    whole (QA). The tokenizer itself says which tokens a text holds; the plan must agree with it."""
    from actors.presets import TOKENIZER_DIR
    from actors.tokenizer import load_tokenizer

    tokens = {"ti_a1111": "short", "ti_a1111_dir": "long", "abc": "abc", "bcd": "bcd"}
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    tokenizer.add_tokens(list(tokens))
    planned = state(embedding_tokens=tokens, adapter_fingerprints={n: "f" * 16 for n in tokens.values()})
    for prompt, listed in (("a ti_a1111_dir photo", "long"), ("a ti_a1111 photo", "short"), ("abcd", "abc"),
                           ("xbcd", "bcd"), ("a ti_a1111 and a ti_a1111_dir", "long")):
        read = {t for t in tokenizer.tokenize(prompt) if t in tokens}
        row = {"id": "r", "prompt": prompt, "adapters": [{"name": listed, "scale": 1.0}]}
        work = plan_row(row, source="m.parquet", row=0, state=planned)
        assert (work["status"] == "invalid") == bool(read - {next(t for t, n in tokens.items() if n == listed)}), \
            (prompt, read, work.get("error"))
    # and a row listing both, whose prompt has only the longer, is told the shorter does nothing
    both = [{"name": n, "scale": 1.0} for n in ("short", "long")]
    work = plan_row({"id": "r", "prompt": "a ti_a1111_dir photo", "adapters": both}, source="m.parquet", row=0,
                    state=planned)
    assert work["status"] is None
    assert "the embedding 'short', whose token 'ti_a1111' neither prompt uses" in work["warning"], work


def test_an_adapter_made_for_another_base_model_fails_its_rows_at_the_plan(tmp_path):
    """An SD 1.x LoRA or embedding (text features 768 wide) on an SD 2.x model (1024) failed only at the actor, so
    --plan-only and `manifest validate --adapters` counted its rows as drawn (QA): the header says its widths, and
    each model's configs say its own. Fitting ones, and a model that does not say, pass."""
    import torch
    from safetensors.torch import save_file

    from actors.models import export_preset
    from jobs.generate import resolve_adapters

    attention = "down_blocks_1_attentions_0_transformer_blocks_0"
    files = {
        "fits": {f"lora_unet_{attention}_attn2_to_k.lora_down.weight": torch.zeros(4, 64),
                 f"lora_unet_{attention}_attn2_to_k.lora_up.weight": torch.zeros(64, 4)},
        "sd15-unet": {f"lora_unet_{attention}_attn2_to_k.lora_down.weight": torch.zeros(4, 768),
                      f"lora_unet_{attention}_attn2_to_k.lora_up.weight": torch.zeros(64, 4)},
        "sd15-text": {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 768),
                      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(768, 4)},
        "sd21-embedding": {"<wide>": torch.zeros(1, 1024)},
        "embedding": {"<mine>": torch.zeros(1, 64)},
    }
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
    widths: dict[str, dict] = {}
    fingerprints, errors = resolve_adapters(str(tmp_path), set(files), widths=widths)
    assert not errors and widths["sd15-unet"] == {"text_width": None, "context_width": 768}
    export_preset("tiny", str(tmp_path / "model"))  # a model folder: its widths come from its configs
    folder = describe_model("mine", str(tmp_path / "model"))
    assert (folder.text_width, folder.context_width) == (64, 64)
    models = {"default": describe_model("default", "tiny").defaults(), "mine": folder.defaults(),
              "unsaid": {**folder.defaults(), "text_width": None, "context_width": None}}
    planned = PlanState(models=models, watermark=None, adapter_fingerprints=fingerprints, adapter_widths=widths,
                        embedding_tokens={"<wide>": "sd21-embedding", "<mine>": "embedding"})
    for model in models:
        for name in files:
            row = {"id": "r", "prompt": "a <wide> <mine> mug", "model": model,
                   "adapters": [{"name": n, "scale": 1.0} for n in {name, "sd21-embedding", "embedding"}]}
            work = plan_row(row, source="m.parquet", row=0, state=planned)
            wrong = {"sd15-unet", "sd15-text", "sd21-embedding"} if model != "unsaid" else set()
            said = [n for n in sorted(wrong) if f"adapter {n!r}: is made for a model whose " in (work["error"] or "")]
            assert said == sorted(wrong & {name, "sd21-embedding"}), (model, name, work["error"])
    work = plan_row({"id": "r", "prompt": "a mug", "adapters": [{"name": "sd15-text", "scale": 1.0}]},
                    source="m.parquet", row=0, state=planned)
    assert work["status"] == "failed" and work["error"] == (
        "adapter 'sd15-text': is made for a model whose text encoder is 768 wide, and model 'default''s is 64: an "
        "adapter for another base model (Stable Diffusion 1.x: 768, 2.x: 1024)"), work
