"""Reading manifests (paths, globs, directories, fsspec URIs; parts and row positions) and the results
ledger that a rerun reads back (round trip, newest `ok` per id, pass-through columns, atomic writes).
"""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.ledger import (
    LEDGER_COLUMNS, atomic_write, newest_ok_entries, read_latest_ok, read_ledger, to_table, write_part,
)
from manifests.reader import (
    LEDGER_PART, BadManifestFile, ManifestError, ManifestPart, count_ids, expand_manifest_paths, iter_rows, plan_parts,
    read_part, survey,
)
from manifests.schema import validate_row
from manifests.stores import UnreadableFile


def records(n: int, prefix: str = "row", **extra) -> list[dict]:
    return [{"id": f"{prefix}-{i:03d}", "prompt": f"a red mug, shot {i}", **extra} for i in range(n)]


def parquet_bytes(rows: list[dict], **write_options) -> bytes:
    buf = io.BytesIO()
    columns = dict.fromkeys(k for r in rows for k in r)  # from_pylist alone keeps only the first row's keys
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), buf, **write_options)
    return buf.getvalue()


def write_local(path, rows: list[dict], **write_options):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(parquet_bytes(rows, **write_options))
    return path


@pytest.fixture
def memfs():
    """fsspec's in-memory store under a folder of this test's own; returns (fs, "memory://folder")."""
    fs = fsspec.filesystem("memory")
    folder = f"/t-{uuid.uuid4().hex[:10]}"
    yield fs, f"memory://{folder}"
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


def ids_of(uris: list[str]) -> list[str]:
    return [raw["id"] for _, _, raw in iter_rows(uris)]


# ---------------------------------------------------------------------------------------------------
# finding manifests

def test_memory_uri_manifest_is_read(memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/a.parquet", parquet_bytes(records(3)))
    uris = expand_manifest_paths([f"{root}/a.parquet"])
    assert len(uris) == 1 and uris[0].startswith("memory://") and uris[0].endswith("/a.parquet")
    rows = list(iter_rows(uris))
    assert [(uri, pos, raw["id"]) for uri, pos, raw in rows] == [(uris[0], i, f"row-{i:03d}") for i in range(3)]
    assert rows[1][2]["prompt"] == "a red mug, shot 1"


def test_glob_matches_several_files_sorted(memfs):
    fs, root = memfs
    for name in ("b", "a", "c"):
        fs.pipe_file(f"{root}/{name}.parquet", parquet_bytes(records(2, prefix=name)))
    fs.pipe_file(f"{root}/notes.csv", b"id,prompt\nx,y\n")
    uris = expand_manifest_paths([f"{root}/*.parquet"])
    assert [u.rsplit("/", 1)[-1] for u in uris] == ["a.parquet", "b.parquet", "c.parquet"]
    assert ids_of(uris) == ["a-000", "a-001", "b-000", "b-001", "c-000", "c-001"]


def test_local_glob_and_directory(tmp_path):
    write_local(tmp_path / "m" / "2026-01.parquet", records(2, prefix="jan"))
    write_local(tmp_path / "m" / "2026-02.parquet", records(1, prefix="feb"))
    write_local(tmp_path / "m" / "nested" / "extra.parquet", records(1, prefix="nested"))
    (tmp_path / "m" / "README.txt").write_text("not a manifest")

    globbed = expand_manifest_paths([str(tmp_path / "m" / "2026-*.parquet")])
    assert [os.path.basename(u) for u in globbed] == ["2026-01.parquet", "2026-02.parquet"]

    # A directory means every .parquet under it, nested ones included, other files ignored.
    whole = expand_manifest_paths([str(tmp_path / "m")])
    assert sorted(os.path.basename(u) for u in whole) == ["2026-01.parquet", "2026-02.parquet", "extra.parquet"]
    assert sorted(ids_of(whole)) == ["feb-000", "jan-000", "jan-001", "nested-000"]
    assert all(os.path.exists(u) for u in whole)  # local results stay plain, reopenable paths


def test_many_tiny_row_groups_are_read_as_few_parts_each_opening_the_file_once(memfs, monkeypatch):
    """A manifest written one row per row group (a streaming writer's flushes): planned as thousands of parts,
    each a task reading the footer, it took minutes to plan 3,000 rows."""
    import manifests.reader as reader

    monkeypatch.setattr(reader, "PART_ROWS", 1_000)
    fs, root = memfs
    fs.pipe_file(f"{root}/drip.parquet", parquet_bytes(records(2_500), row_group_size=1))
    uri = expand_manifest_paths([f"{root}/drip.parquet"])[0]
    parts = plan_parts([uri])
    assert [(p.row_group, p.row_groups, p.num_rows) for p in parts] == [(0, 1000, 1000), (1000, 1000, 1000),
                                                                        (2000, 500, 500)]
    opened = []
    real_open = reader._open_parquet
    monkeypatch.setattr(reader, "_open_parquet", lambda u: opened.append(u) or real_open(u))
    rows = [(pos, raw["id"]) for part in parts for pos, raw in read_part(part)]
    assert rows == [(i, f"row-{i:03d}") for i in range(2_500)] and len(opened) == 3


def test_a_folder_of_manifests_leaves_out_the_ledgers_of_outputs_inside_it(tmp_path, memfs):
    """`generate folder/ --out folder/out` and a rerun: the output's ledger parts are not manifests (read as such,
    every row was a duplicate of itself and every part a row without a prompt)."""
    write_local(tmp_path / "m" / "shots.parquet", records(2, prefix="shot"))
    fs, root = memfs
    ledger_part = write_part(fs, root, "20261205T220948-a22423", 3, [ledger_row("shot-000", "A", "2026-01-01T00:00")])
    assert LEDGER_PART.search(ledger_part), "write_part's names and the reader's pattern drifted apart"
    (tmp_path / "m" / "out" / "results").mkdir(parents=True)
    (tmp_path / "m" / "out" / "results" / ledger_part.rsplit("/", 1)[-1]).write_bytes(fs.cat_file(ledger_part))
    write_local(tmp_path / "m" / "results" / "day-1.parquet", records(1, prefix="kept"))  # a manifest all the same
    write_local(tmp_path / "m" / "out" / "report" / "thumbs" / "index.parquet", records(1, prefix="thumb"))
    found = expand_manifest_paths([str(tmp_path / "m")])
    assert [os.path.relpath(u, tmp_path / "m") for u in found] == ["results/day-1.parquet", "shots.parquet"]


@pytest.mark.parametrize("slash", ["/", ""])
def test_a_folder_served_over_http_is_listed_not_read_as_one_file(http_folder, slash):
    """Over HTTP a folder's listing page answers like a file: `http://host/m/` was read as one Parquet file
    ("Parquet magic bytes not found")."""
    folder, url = http_folder
    write_local(folder / "m" / "2026-01.parquet", records(2, prefix="jan"))
    write_local(folder / "m" / "nested" / "extra.parquet", records(1, prefix="nested"))
    found = expand_manifest_paths([f"{url}/m{slash}"])
    assert found == [f"{url}/m/2026-01.parquet", f"{url}/m/nested/extra.parquet"]
    assert sorted(ids_of(found)) == ["jan-000", "jan-001", "nested-000"]
    assert expand_manifest_paths([f"{url}/m/2026-01.parquet"]) == [f"{url}/m/2026-01.parquet"]


def test_a_file_reached_through_a_link_is_read_once(tmp_path):
    """A folder holding a.parquet and b.parquet -> a.parquet was read as two manifests: every id a duplicate of
    itself, and nothing drawn. Two names of one file are one manifest (the first named)."""
    a = write_local(tmp_path / "m" / "a.parquet", records(2))
    (tmp_path / "m" / "b.parquet").symlink_to("a.parquet")
    c = write_local(tmp_path / "m" / "c.parquet", records(1, prefix="c"))
    os.link(a, tmp_path / "m" / "d.parquet")  # a hard link: another name of the same file too
    assert expand_manifest_paths([str(tmp_path / "m")]) == [str(a), str(c)]
    assert expand_manifest_paths([str(tmp_path / "m" / "b.parquet"), str(a)]) == [str(tmp_path / "m" / "b.parquet")]


def test_a_path_that_exists_is_taken_as_it_is_glob_characters_and_all(tmp_path):
    path = write_local(tmp_path / "shots[1].parquet", records(1))
    assert expand_manifest_paths([str(path)]) == [str(path)]
    assert expand_manifest_paths([str(tmp_path / "shots*.parquet")]) == [str(path)]  # a glob still globs


def test_memory_directory(memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/day/one.parquet", parquet_bytes(records(1, prefix="one")))
    fs.pipe_file(f"{root}/day/two.parquet", parquet_bytes(records(1, prefix="two")))
    assert ids_of(expand_manifest_paths([f"{root}/day"])) == ["one-000", "two-000"]


def test_the_same_file_named_twice_is_read_once(tmp_path):
    path = write_local(tmp_path / "a.parquet", records(2))
    uris = expand_manifest_paths([str(path), str(tmp_path / "*.parquet"), str(tmp_path)])
    assert len(uris) == 1
    total, counts = count_ids(uris)
    assert total == 2 and max(counts.values()) == 1  # no false duplicate ids


@pytest.mark.parametrize("missing", ["nope.parquet", "no-dir/a.parquet"])
def test_missing_path_is_a_manifest_error_naming_it(tmp_path, missing):
    path = str(tmp_path / missing)
    with pytest.raises(ManifestError) as exc:
        expand_manifest_paths([path])
    assert path in str(exc.value) and "does not exist" in str(exc.value)


def test_missing_memory_path_is_a_manifest_error_naming_it(memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/real.parquet", parquet_bytes(records(1)))
    with pytest.raises(ManifestError, match="typo.parquet"):
        expand_manifest_paths([f"{root}/real.parquet", f"{root}/typo.parquet"])


def test_glob_matching_nothing_and_empty_directory_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"no manifest file matches .*\*\.parquet"):
        expand_manifest_paths([str(tmp_path / "*.parquet")])
    with pytest.raises(ManifestError, match="holds no .parquet manifest"):
        expand_manifest_paths([str(tmp_path / "empty")])


@pytest.mark.parametrize("name,content", [
    ("catalog.csv", b"id,prompt\nsku-1,a red mug\nsku-2,a blue mug\n"),
    ("catalog.parquet", b"id,prompt\nsku-1,a red mug\nsku-2,a blue mug\n"),  # the name does not make it Parquet
    ("tiny.parquet", b"PAR"),
])
def test_non_parquet_file_is_a_manifest_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    uris = expand_manifest_paths([str(path)])
    for read in (plan_parts, count_ids, lambda u: list(iter_rows(u))):
        with pytest.raises(ManifestError) as exc:
            read(uris)
        assert str(path) in str(exc.value) and "not a readable Parquet file" in str(exc.value)


def test_two_columns_of_one_name_are_a_manifest_error_not_a_silent_loss(tmp_path):
    path = tmp_path / "dup.parquet"
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["a red mug"]), pa.array(["x"]), pa.array(["y"])],
                            names=["id", "prompt", "sku", "sku"]), path)
    for read in (plan_parts, count_ids, lambda u: list(iter_rows(u))):
        with pytest.raises(ManifestError, match=r"dup.parquet has more than one column named 'sku'"):
            read([str(path)])


def test_a_folder_finds_manifests_whatever_the_case_of_their_extension(tmp_path):
    pq.write_table(pa.Table.from_pylist(records(1)), tmp_path / "EXPORT.PARQUET")
    assert expand_manifest_paths([str(tmp_path)]) == [str(tmp_path / "EXPORT.PARQUET")]


def test_a_folder_leaves_out_what_dataset_readers_leave_out(tmp_path, memfs):
    """Spark's `_temporary/` copy of a retried task made every row a duplicate (none drawn), and a macOS `._x.parquet`
    (no Parquet at all) refused the run: names starting with `_` or `.` are left out, as Arrow, Spark and polars do."""
    fs, root = memfs
    for base, write in ((str(tmp_path), lambda p, b: (Path(p).parent.mkdir(parents=True, exist_ok=True),
                                                      Path(p).write_bytes(b))),
                        (root, fs.pipe_file)):
        write(f"{base}/part-0000.snappy.parquet", parquet_bytes(records(2)))
        write(f"{base}/_temporary/0/part-0000.snappy.parquet", parquet_bytes(records(2)))
        write(f"{base}/._part-0000.snappy.parquet", b"\x00\x05\x16\x07 resource fork")
        write(f"{base}/.hidden/old.parquet", parquet_bytes(records(2)))
        write(f"{base}/_SUCCESS", b"")
        assert [u.rsplit("/", 1)[-1] for u in expand_manifest_paths([base])] == ["part-0000.snappy.parquet"]
        # a glob the same (it read the resource fork, which refused the run, and `**` reached _temporary/)
        for pattern in ("*.parquet", "**/*.parquet", "*"):
            found = [u[len(base) + 1:] for u in expand_manifest_paths([f"{base}/{pattern}"])]
            assert found == ["part-0000.snappy.parquet"], (base, pattern, found)
        # unless the pattern names such a folder itself
        hidden = expand_manifest_paths([f"{base}/.hidden/*.parquet"])
        assert [u[len(base) + 1:] for u in hidden] == [".hidden/old.parquet"]
        assert [u[len(base) + 1:] for u in expand_manifest_paths([f"{base}/_temporary/*/*.parquet"])] == [
            "_temporary/0/part-0000.snappy.parquet"]
    # named on their own, such files are read
    assert expand_manifest_paths([f"{tmp_path}/_temporary/0/part-0000.snappy.parquet"])
    (tmp_path / "part-0000.snappy.parquet").unlink()
    with pytest.raises(ManifestError, match="holds no .parquet manifest \\(files and folders whose name starts with _"):
        expand_manifest_paths([str(tmp_path)])


def test_a_folder_partitioned_by_folder_names_is_refused_naming_the_column(tmp_path):
    """`model=tiny-random/part-0.parquet` (polars' partition_by, pyarrow's write_dataset) drew those rows with the
    default model, and `category=mugs/` left every row without its category, without a word."""
    (tmp_path / "model=tiny-random").mkdir()
    (tmp_path / "model=tiny-random" / "part-0.parquet").write_bytes(parquet_bytes(records(2)))
    with pytest.raises(BadManifestFile) as refused:
        expand_manifest_paths([str(tmp_path)])
    assert "is partitioned by folder names (model=tiny-random/part-0.parquet)" in str(refused.value)
    assert "its rows would lose `model` (model=tiny-random/), or draw with its default" in str(refused.value)
    # above the folder given, such a name is only a name
    assert len(expand_manifest_paths([str(tmp_path / "model=tiny-random")])) == 1
    # and where the files hold the column themselves (some writers keep it, or the folders were named by hand),
    # nothing is lost: read as any folder
    (tmp_path / "model=tiny-random" / "part-0.parquet").write_bytes(parquet_bytes(records(2, model="tiny-random")))
    assert len(expand_manifest_paths([str(tmp_path)])) == 1


def test_a_folder_finds_manifests_in_linked_subfolders(tmp_path):
    (tmp_path / "exports" / "monday").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records(1)), tmp_path / "exports" / "monday" / "a.parquet")
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "monday").symlink_to(tmp_path / "exports" / "monday", target_is_directory=True)
    assert expand_manifest_paths([str(tmp_path / "manifests")]) == [str(tmp_path / "manifests" / "monday" / "a.parquet")]


def test_truncated_parquet_in_memory_is_a_manifest_error(memfs):
    fs, root = memfs
    data = parquet_bytes(records(5))
    fs.pipe_file(f"{root}/cut.parquet", data[: len(data) // 2])
    with pytest.raises(ManifestError, match="cut.parquet"):
        plan_parts(expand_manifest_paths([f"{root}/cut.parquet"]))


# ---------------------------------------------------------------------------------------------------
# parts and row positions

@pytest.mark.parametrize("part_rows, expected", [
    (3, [(0, 1, 0, 3), (1, 1, 3, 3), (2, 1, 6, 3), (3, 1, 9, 1)]),  # row groups as large as a part: one each
    (7, [(0, 2, 0, 6), (2, 2, 6, 4)]),  # small row groups: together, up to PART_ROWS
    (1_000, [(0, 4, 0, 10)]),
])
def test_row_groups_become_parts_with_file_positions(memfs, monkeypatch, part_rows, expected):
    import manifests.reader as reader

    monkeypatch.setattr(reader, "PART_ROWS", part_rows)
    fs, root = memfs
    fs.pipe_file(f"{root}/big.parquet", parquet_bytes(records(10), row_group_size=3))
    uri = expand_manifest_paths([f"{root}/big.parquet"])[0]
    parts = plan_parts([uri])
    assert [(p.row_group, p.row_groups, p.first_row, p.num_rows) for p in parts] == expected
    assert all(p.uri == uri for p in parts)

    # Each part, read alone (as a worker does) and in small batches, knows its rows' positions in the file.
    for part in parts:
        got = list(read_part(part, batch_rows=2))
        assert [pos for pos, _ in got] == list(range(part.first_row, part.first_row + part.num_rows))
        assert [raw["id"] for _, raw in got] == [f"row-{pos:03d}" for pos, _ in got]


@pytest.mark.parametrize("part_rows", [2, 3, 1_000])
def test_empty_row_groups_lose_no_row(memfs, monkeypatch, part_rows):
    """A streaming export that writes an empty batch leaves a row group of 0 rows: each one inside a part pushed
    the part's last group off the end of what was read, so those rows were never planned (the run failed with
    "6 rows went in but 5 came out", night after night, and validate said 0 errors without reading them)."""
    import manifests.reader as reader

    monkeypatch.setattr(reader, "PART_ROWS", part_rows)
    fs, root = memfs
    table = pa.Table.from_pylist(records(6))
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema) as writer:
        for start, length in ((0, 0), (0, 2), (2, 0), (2, 0), (2, 1), (3, 1), (4, 0), (4, 2), (6, 0)):
            writer.write_table(table.slice(start, length))
    fs.pipe_file(f"{root}/gaps.parquet", buf.getvalue())
    uri = expand_manifest_paths([f"{root}/gaps.parquet"])[0]
    assert pq.ParquetFile(io.BytesIO(buf.getvalue())).metadata.num_row_groups == 9
    got = [(pos, raw["id"]) for part in plan_parts([uri]) for pos, raw in read_part(part)]
    assert got == [(i, f"row-{i:03d}") for i in range(6)]
    assert sum(p.num_rows for p in plan_parts([uri])) == 6


def test_positions_are_zero_based_per_file_across_files_and_parts(memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/a.parquet", parquet_bytes(records(5, prefix="a"), row_group_size=2))
    fs.pipe_file(f"{root}/b.parquet", parquet_bytes(records(4, prefix="b"), row_group_size=3))
    uris = expand_manifest_paths([f"{root}/*.parquet"])
    seen = [(uri.rsplit("/", 1)[-1], pos, raw["id"]) for uri, pos, raw in iter_rows(uris)]
    assert seen == [("a.parquet", i, f"a-{i:03d}") for i in range(5)] + [("b.parquet", i, f"b-{i:03d}") for i in range(4)]
    assert len(plan_parts(uris)) == 2  # one part per file: their row groups are small



def test_the_survey_reads_each_manifest_once_and_agrees_with_the_single_reads(memfs, monkeypatch):
    """Many manifest files (a catalogue kept per category) are read MANIFEST_READS at a time, each opened
    once for footers, ids and adapter names; what comes back is in file order whatever finished first."""
    import manifests.reader as reader

    fs, root = memfs
    for k in range(12):
        extra = {"adapters": [{"name": f"style-{k % 3}", "scale": 1.0}]} if k % 2 else {}
        rows = records(3 + k, prefix=f"f{k:02d}", **extra) + (records(1, prefix="f00") if k == 7 else [])
        fs.pipe_file(f"{root}/part-{k:02d}.parquet", parquet_bytes(rows, row_group_size=4))
    uris = expand_manifest_paths([f"{root}/*.parquet"])
    opened = []
    real_open = reader._open_parquet
    monkeypatch.setattr(reader, "_open_parquet", lambda uri: opened.append(uri) or real_open(uri))
    monkeypatch.setattr(reader, "MANIFEST_READS", 4)

    found = reader.survey(uris)
    assert sorted(opened) == uris  # each file once
    assert found.uris == uris and found.parts == plan_parts(uris)
    assert (found.total, found.id_counts) == count_ids(uris)
    assert found.id_counts["f00-000"] == 2 and found.total == sum(3 + k for k in range(12)) + 1
    assert found.adapter_names == reader.adapter_names(uris) == {"style-0", "style-1", "style-2"}


def test_parts_from_plan_travel_as_plain_records(memfs, monkeypatch):
    # generate ships parts to Ray tasks as dicts (vars(part)) and rebuilds them there.
    monkeypatch.setattr("manifests.reader.PART_ROWS", 2)
    fs, root = memfs
    fs.pipe_file(f"{root}/a.parquet", parquet_bytes(records(4), row_group_size=2))
    part = plan_parts(expand_manifest_paths([f"{root}/a.parquet"]))[1]
    again = ManifestPart(**vars(part))
    assert [pos for pos, _ in read_part(again)] == [2, 3]


@pytest.mark.parametrize("store", ["local", "memory"])
def test_a_manifest_rewritten_after_the_survey_is_refused_not_planned_unchecked(memfs, tmp_path, store):
    """The survey counts every manifest's rows and checks their ids across all of them; the plan tasks read the
    files again. A catalogue export that rewrote a file in between (same row count, now with a duplicate id)
    was planned unchecked: two `ok` entries for one id, one image, and a row missing from the ledger."""
    if store == "local":
        path = str(tmp_path / "m.parquet")
        write = lambda data: open(path, "wb").write(data)  # noqa: E731
    else:
        fs, root = memfs
        path = f"memory://{root}/m.parquet"
        write = lambda data: fs.pipe_file(f"{root}/m.parquet", data)  # noqa: E731
    write(parquet_bytes(records(4)))
    (part,) = survey(expand_manifest_paths([path])).parts
    assert part.stamp and [pos for pos, _ in read_part(part)] == [0, 1, 2, 3]
    twice = records(4)
    twice[3]["id"] = twice[2]["id"]
    write(parquet_bytes(twice))  # the same size
    if store == "local":
        os.utime(path, ns=(1, 1))  # another write time, whatever the file system's clock granularity
    with pytest.raises(ManifestError, match=r"m\.parquet changed since this run read it .*rerun once it is written whole"):
        list(read_part(ManifestPart(**vars(part))))


def test_empty_manifest_has_no_parts(tmp_path):
    empty = pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})
    pq.write_table(empty, tmp_path / "empty.parquet")
    uris = expand_manifest_paths([str(tmp_path / "empty.parquet")])
    assert plan_parts(uris) == [] and list(iter_rows(uris)) == []
    assert count_ids(uris)[0] == 0


def test_extra_columns_pass_through_as_extras(memfs):
    fs, root = memfs
    rows = [{"id": "mug-1", "prompt": "a red mug", "sku": "MUG-1", "price": 12.5, "tags": ["new"], "width": 256},
            {"id": "mug-2", "prompt": "a blue mug", "sku": "MUG-2", "price": None, "tags": [], "width": None}]
    fs.pipe_file(f"{root}/m.parquet", parquet_bytes(rows))
    out = []
    for uri, pos, raw in iter_rows(expand_manifest_paths([f"{root}/m.parquet"])):
        parsed, errors, extras = validate_row(raw, source=uri, row=pos, models={"default"})
        assert errors == []
        out.append((parsed.width, extras))
    assert out == [(256, {"sku": "MUG-1", "price": 12.5, "tags": ["new"]}),
                   (None, {"sku": "MUG-2", "price": None, "tags": []})]


def test_uint64_seed_column_reads_as_exact_python_int(memfs):
    fs, root = memfs
    table = pa.table({"id": ["a", "b"], "prompt": ["p", "q"],
                      "seed": pa.array([2**63 - 1, 2**63], pa.uint64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(f"{root}/s.parquet", buf.getvalue())
    seeds = [raw["seed"] for _, _, raw in iter_rows(expand_manifest_paths([f"{root}/s.parquet"]))]
    assert seeds == [2**63 - 1, 2**63]


def test_count_ids_counts_rows_and_ids_across_files(memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/a.parquet", parquet_bytes(records(3, prefix="x"), row_group_size=2))
    fs.pipe_file(f"{root}/b.parquet", parquet_bytes(records(2, prefix="x")))  # x-000, x-001 again
    fs.pipe_file(f"{root}/c.parquet", parquet_bytes([{"prompt": "no id column"}]))
    total, counts = count_ids(expand_manifest_paths([f"{root}/*.parquet"]))
    assert total == 6
    assert counts == {"x-000": 2, "x-001": 2, "x-002": 1}


# ---------------------------------------------------------------------------------------------------
# the results ledger

def ledger_row(rid: str, phash: str, finished_at: str, status: str = "ok", **extra) -> dict:
    return {
        "id": rid, "status": status, "uri": f"out/images/{rid}.png", "sha256": "0" * 64, "png_bytes": 1234,
        "params_hash": phash, "seed": 42, "model": "default", "adapters": [{"name": "brand", "scale": 0.5}],
        "width": 256, "height": 256, "steps": 2, "guidance_scale": 7.5, "scheduler": "ddim", "watermark": "sdfleet",
        "watermark_bits": 1.0 if status == "ok" else None,
        "error": None if status == "ok" else "boom", "warning": None, "actor": "actor-0", "seconds": 0.25,
        "finished_at": finished_at, "source": "m.parquet", "row": 0, "passthrough_hash": None,
        "extra": json.dumps(extra, ensure_ascii=False) if extra else None,
    }


def test_a_file_put_over_another_is_whole_or_not_there(tmp_path, monkeypatch):
    """A fine-tune's rerun publishes its weights over the good ones: copied in place (truncated first), a kill in
    the copy left a cut-short UNet where a whole one was."""
    import shutil

    from manifests.ledger import atomic_put_file

    local = fsspec.filesystem("file")
    good, new = tmp_path / "unet.safetensors", tmp_path / "new.safetensors"
    good.write_bytes(b"good" * 1000)
    new.write_bytes(b"new!" * 2000)

    def killed(src, dst):
        with open(dst, "wb") as f:
            f.write(b"ne")
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_put_file(local, str(new), str(good))
    assert good.read_bytes() == b"good" * 1000 and sorted(p.name for p in tmp_path.iterdir()) == [
        "new.safetensors", "unet.safetensors"]  # no temporary file left
    monkeypatch.undo()
    atomic_put_file(local, str(new), str(good))
    assert good.read_bytes() == b"new!" * 2000


def test_write_part_then_read_ledger_round_trips(memfs):
    fs, root = memfs
    rows = [ledger_row("mug-1", "A", "2026-01-01T00:00:01+00:00", sku="MUG-1", note="café ☕"),
            ledger_row("mug-2", "B", "2026-01-01T00:00:02+00:00", status="failed", sku="MUG-2")]
    path = write_part(fs, root, "20260101T000000-abc123", 0, rows)
    assert path.endswith("/results/20260101T000000-abc123-00000.parquet")
    table = read_ledger(fs, root)
    assert table.num_rows == 2
    assert "extra" not in table.column_names
    assert list(table.column_names[: len(LEDGER_COLUMNS) - 1]) == [c for c in LEDGER_COLUMNS if c != "extra"]
    got = table.to_pylist()
    for want, have in zip(rows, got):
        for column in LEDGER_COLUMNS:
            if column != "extra":
                assert have[column] == want[column], column
    assert (got[0]["sku"], got[0]["note"]) == ("MUG-1", "café ☕")
    assert (got[1]["sku"], got[1]["note"]) == ("MUG-2", None)


def test_read_ledger_of_an_empty_store_has_the_ledger_columns(memfs):
    fs, root = memfs
    table = read_ledger(fs, root)
    assert table.num_rows == 0 and "id" in table.column_names and "params_hash" in table.column_names
    assert read_latest_ok(fs, root) == {}


def test_parts_with_different_pass_through_columns_read_as_one_table(memfs):
    fs, root = memfs
    write_part(fs, root, "run1", 0, [ledger_row("a", "A", "2026-01-01T00:00:01", sku="S-A")])
    write_part(fs, root, "run1", 1, [ledger_row("b", "B", "2026-01-01T00:00:02", campaign="spring")])
    rows = {r["id"]: r for r in read_ledger(fs, root).to_pylist()}
    assert (rows["a"]["sku"], rows["a"]["campaign"]) == ("S-A", None)
    assert (rows["b"]["sku"], rows["b"]["campaign"]) == (None, "spring")


def test_latest_ok_reads_parts_written_before_the_png_bytes_column(memfs):
    """A ledger part from before `png_bytes` was a column is read, its sizes unknown (the entry trusted on size)."""
    fs, root = memfs
    old = to_table([ledger_row("mug", "A", "2026-01-01T00:00:00+00:00")]).drop_columns(["png_bytes"])
    with fs.open(f"{root}/results/20260101T000000-aaaaaa-00000.parquet", "wb") as f:
        pq.write_table(old, f)
    write_part(fs, root, "20260102T000000-bbbbbb", 0, [ledger_row("lamp", "L", "2026-01-02T00:00:00+00:00")])
    # a manifest's own `png_bytes` column, passed through before the ledger had one: not a size
    theirs = old.append_column("png_bytes", pa.array(["4 KB"]))
    with fs.open(f"{root}/results/20260101T000001-cccccc-00000.parquet", "wb") as f:
        pq.write_table(theirs.set_column(0, "id", pa.array(["cup"])), f)
    finished: dict = {}
    assert read_latest_ok(fs, root, finished) == {"mug": "A", "lamp": "L", "cup": "A"}
    assert finished == {"mug": ("2026-01-01T00:00:00+00:00", None), "lamp": ("2026-01-02T00:00:00+00:00", 1234),
                        "cup": ("2026-01-01T00:00:00+00:00", None)}
    # only the new column may be missing: a Parquet file of something else in results/ is still a damaged part
    with fs.open(f"{root}/results/20260103T000000-dddddd-00000.parquet", "wb") as f:
        pq.write_table(pa.table({"x": [1]}), f)
    with pytest.raises(UnreadableFile) as caught:
        read_latest_ok(fs, root)
    assert caught.value.damaged and caught.value.path.endswith("dddddd-00000.parquet")


def test_latest_ok_takes_the_newest_entry_per_id(memfs):
    fs, root = memfs
    # Drawn with A, then B, then changed back to A: the image on disk is A's again.
    write_part(fs, root, "20260101T000000-aaaaaa", 0, [ledger_row("mug", "A", "2026-01-01T00:00:00+00:00")])
    write_part(fs, root, "20260102T000000-bbbbbb", 0, [ledger_row("mug", "B", "2026-01-02T00:00:00+00:00"),
                                                       ledger_row("lamp", "L", "2026-01-02T00:00:00+00:00")])
    assert read_latest_ok(fs, root) == {"mug": "B", "lamp": "L"}
    write_part(fs, root, "20260103T000000-cccccc", 0, [ledger_row("mug", "A", "2026-01-03T00:00:00+00:00")])
    assert read_latest_ok(fs, root) == {"mug": "A", "lamp": "L"}


def test_latest_ok_goes_by_finish_time_not_file_name(memfs):
    fs, root = memfs
    write_part(fs, root, "zzz", 0, [ledger_row("mug", "OLD", "2026-01-01T00:00:00+00:00")])
    write_part(fs, root, "aaa", 0, [ledger_row("mug", "NEW", "2026-02-01T00:00:00+00:00")])
    assert read_latest_ok(fs, root) == {"mug": "NEW"}


def test_latest_ok_ignores_failed_and_invalid_entries(memfs):
    fs, root = memfs
    write_part(fs, root, "run1", 0, [ledger_row("mug", "A", "2026-01-01T00:00:00")])
    write_part(fs, root, "run2", 0, [ledger_row("mug", "B", "2026-01-02T00:00:00", status="failed"),
                                     ledger_row("lamp", "L", "2026-01-02T00:00:00", status="failed"),
                                     ledger_row("vase", "V", "2026-01-02T00:00:00", status="invalid")])
    assert read_latest_ok(fs, root) == {"mug": "A"}
    # ... but they are said where a failure came after the ok entry (the rerun records the row ok again)
    write_part(fs, root, "run3", 0, [ledger_row("lamp", "L", "2026-01-03T00:00:00"),
                                     ledger_row("cup", "C", "2026-01-03T00:00:00"),
                                     ledger_row("cup", "C", "2026-01-02T00:00:00", status="failed")])
    superseded: set[str] = set()
    assert read_latest_ok(fs, root, superseded=superseded) == {"mug": "A", "lamp": "L", "cup": "C"}
    assert superseded == {"mug"}
    assert newest_ok_entries(fs, root, superseded) == {"mug": {"uri": "out/images/mug.png", "sha256": "0" * 64,
                                                                "png_bytes": 1234, "watermark_bits": 1.0,
                                                                "warning": None}}


def test_latest_ok_says_which_pass_through_columns_each_done_row_was_recorded_with(memfs):
    """What lets a rerun record a row again whose SKU or category changed (jobs.plan): the newest ok entry's
    `passthrough_hash`; none where a part from before the column recorded it, or a manifest's own column of that
    name, passed through before it was a ledger column, holds something else."""
    fs, root = memfs
    write_part(fs, root, "20260101T000000-aaaaaa", 0, [{**ledger_row("mug", "A", "2026-01-01T00:00:00+00:00"),
                                                        "passthrough_hash": "old"},
                                                       {**ledger_row("cup", "C", "2026-01-01T00:00:00+00:00"),
                                                        "passthrough_hash": "c1"}])
    write_part(fs, root, "20260102T000000-bbbbbb", 0, [{**ledger_row("mug", "A", "2026-01-02T00:00:00+00:00"),
                                                        "passthrough_hash": "new"},
                                                       {**ledger_row("cup", "C", "2026-01-02T00:00:00+00:00",
                                                                     status="failed"), "passthrough_hash": "c2"}])
    old = to_table([ledger_row("vase", "V", "2026-01-01T00:00:00+00:00")]).drop_columns(["passthrough_hash"])
    with fs.open(f"{root}/results/20251201T000000-cccccc-00000.parquet", "wb") as f:
        pq.write_table(old, f)
    theirs = old.append_column("passthrough_hash", pa.array([7])).set_column(0, "id", pa.array(["lamp"]))
    with fs.open(f"{root}/results/20251201T000001-dddddd-00000.parquet", "wb") as f:
        pq.write_table(theirs, f)
    labels: dict = {}
    assert read_latest_ok(fs, root, labels=labels) == {"mug": "A", "cup": "C", "vase": "V", "lamp": "V"}
    assert labels == {"mug": "new", "cup": "c1"}  # the newest ok entry's: a failure since records nothing done


def test_pass_through_columns_named_like_ledger_columns_get_a_prefix(memfs):
    fs, root = memfs
    row = ledger_row("mug", "A", "2026-01-01T00:00:00", status="ok", sku="MUG-1")
    row["extra"] = json.dumps({"status": "draft", "uri": "https://shop/mug", "seed": "catalog-seed", "sku": "MUG-1"})
    write_part(fs, root, "run1", 0, [row])
    got = read_ledger(fs, root).to_pylist()[0]
    assert got["status"] == "ok" and got["uri"] == "out/images/mug.png" and got["seed"] == 42
    assert got["manifest_status"] == "draft"
    assert got["manifest_uri"] == "https://shop/mug"
    assert got["manifest_seed"] == "catalog-seed"
    assert got["sku"] == "MUG-1" and "manifest_sku" not in got
    assert read_latest_ok(fs, root) == {"mug": "A"}  # the manifest's `status` does not confuse resume


def test_pass_through_columns_never_meet_another_column(memfs):
    """A manifest may hold `status` and `manifest_status` both, and names Arrow's dataset reader claims for
    itself (`__filename`): every one gets a column of its own, and the part reads back."""
    from manifests.ledger import extra_columns

    fs, root = memfs
    row = ledger_row("mug", "A", "2026-01-01T00:00:00", status="ok")
    row["extra"] = json.dumps({"status": "draft", "manifest_status": "p", "__filename": "f", "__batch_index": 3})
    write_part(fs, root, "run1", 0, [row])
    got = read_ledger(fs, root).to_pylist()[0]
    assert (got["status"], got["manifest_status"], got["manifest_manifest_status"]) == ("ok", "draft", "p")
    assert (got["manifest___filename"], got["manifest___batch_index"]) == ("f", 3)
    names = list(extra_columns(["status", "manifest_status", "manifest_manifest_status", "manifest_id"]).values())
    assert len(set(names)) == 4 and not set(names) & set(LEDGER_COLUMNS)
    assert extra_columns(["manifest_version", "sku"]) == {"manifest_version": "manifest_version", "sku": "sku"}


def test_a_manifest_column_has_the_same_ledger_column_whatever_else_a_part_holds(memfs):
    """Night 1's manifest had `status` (ledger column `manifest_status`), night 2's `manifest_status`: that took the
    name too (it met no `status` in its part), and one ledger column held two columns of the manifests."""
    fs, root = memfs
    night1 = ledger_row("mug", "A", "2026-01-01T00:00:00")
    night1["extra"] = json.dumps({"status": "draft"})
    night2 = ledger_row("cup", "B", "2026-01-02T00:00:00")
    night2["extra"] = json.dumps({"manifest_status": "approved-by-legal"})
    write_part(fs, root, "run1", 0, [night1])
    write_part(fs, root, "run2", 0, [night2])
    got = {r["id"]: r for r in read_ledger(fs, root).to_pylist()}
    assert (got["mug"]["manifest_status"], got["mug"]["manifest_manifest_status"]) == ("draft", None)
    assert (got["cup"]["manifest_status"], got["cup"]["manifest_manifest_status"]) == (None, "approved-by-legal")


def test_one_part_can_hold_rows_whose_pass_through_types_differ(memfs):
    # Rows of two manifests can land in one part; one types `sku` as a number, the other as text.
    fs, root = memfs
    rows = [ledger_row("a", "A", "2026-01-01T00:00:00", sku=1001), ledger_row("b", "B", "2026-01-01T00:00:00", sku="B-7"),
            ledger_row("c", "C", "2026-01-01T00:00:00")]
    write_part(fs, root, "run1", 0, rows)
    got = {r["id"]: r["sku"] for r in read_ledger(fs, root).to_pylist()}
    assert got == {"a": "1001", "b": "B-7", "c": None}


def test_parts_whose_pass_through_types_differ_read_back_as_text(memfs):
    # Two runs of manifests that type `sku` differently: each part is consistent, the ledger still reads.
    fs, root = memfs
    write_part(fs, root, "run1", 0, [ledger_row("a", "A", "2026-01-01T00:00:00", sku=1001)])
    write_part(fs, root, "run2", 0, [ledger_row("b", "B", "2026-01-02T00:00:00", sku="B-7"),
                                     ledger_row("c", "C", "2026-01-02T00:00:00", sku=None)])
    got = {r["id"]: r["sku"] for r in read_ledger(fs, root).to_pylist()}
    assert got == {"a": "1001", "b": "B-7", "c": None}
    assert read_latest_ok(fs, root) == {"a": "A", "b": "B", "c": "C"}


def test_lists_and_dicts_in_a_column_read_as_text_are_json(memfs):
    # One run's `meta` is a dict, another's text: the dict reads back as JSON a program can parse, as within a part
    fs, root = memfs
    write_part(fs, root, "run1", 0, [ledger_row("a", "A", "2026-01-01T00:00:00", meta={"k": "v"}, tags=[1, 2])])
    write_part(fs, root, "run2", 0, [ledger_row("b", "B", "2026-01-02T00:00:00", meta="plain", tags="t"),
                                     ledger_row("c", "C", "2026-01-02T00:00:00", meta={"k": 2}, tags=True)])
    got = {r["id"]: (r["meta"], r["tags"]) for r in read_ledger(fs, root).to_pylist()}
    assert got == {"a": ('{"k": "v"}', "[1, 2]"), "b": ("plain", "t"), "c": ('{"k": 2}', "True")}


def test_pass_through_integers_past_int64_are_written(memfs):
    # A uint64 hash column of a manifest: past 2**63 Arrow's inference overflows, and the part (the whole
    # ledger of the run, and of every rerun) was lost. Unsigned where every value fits, text where not.
    fs, root = memfs
    big = 2**63 + 5
    write_part(fs, root, "run1", 0, [ledger_row("a", "A", "2026-01-01T00:00:00", content_hash=big),
                                     ledger_row("b", "B", "2026-01-01T00:00:00", content_hash=17)])
    write_part(fs, root, "run2", 0, [ledger_row("c", "C", "2026-01-02T00:00:00", content_hash=3)])
    write_part(fs, root, "run3", 0, [ledger_row("d", "D", "2026-01-03T00:00:00", content_hash=-1),
                                     ledger_row("e", "E", "2026-01-03T00:00:00", content_hash=2**64)])
    assert to_table([ledger_row("a", "A", "2026-01-01T00:00:00", content_hash=big)]).schema.field(
        "content_hash").type == pa.uint64()
    got = {r["id"]: r["content_hash"] for r in read_ledger(fs, root).to_pylist()}
    assert {k: str(v) for k, v in got.items()} == {"a": str(big), "b": "17", "c": "3", "d": "-1", "e": str(2**64)}
    assert read_latest_ok(fs, root) == {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}


def test_to_table_keeps_one_row_per_entry_in_order():
    rows = [ledger_row(f"r{i}", f"h{i}", "2026-01-01T00:00:00") for i in range(5)]
    table = to_table(rows)
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(5)]
    assert table.schema.field("seed").type == pa.int64()


def test_atomic_write_on_local_disk_leaves_no_temporary_file(tmp_path):
    fs = fsspec.filesystem("file")
    target = tmp_path / "out" / "results" / "part.parquet"
    atomic_write(fs, str(target), b"first")
    atomic_write(fs, str(target), b"second, longer")  # replacing is atomic too
    assert target.read_bytes() == b"second, longer"
    assert os.listdir(target.parent) == ["part.parquet"]


def test_atomic_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk fails the write part-way: the part written is removed, not left beside the images (a rerun
    does not clear temp files younger than an hour, and the disk has just run out)."""
    fs = fsspec.filesystem("file")
    target = tmp_path / "out" / "images" / "r1.png"
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(fs, str(target), b"x" * 4096)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert os.listdir(target.parent) == []
    (tmp_path / "out" / "images" / "r2.png").mkdir()  # os.replace onto a folder fails after the whole write
    with pytest.raises(OSError):
        atomic_write(fs, str(target.parent / "r2.png"), b"y")
    assert os.listdir(target.parent) == ["r2.png"]


def test_write_part_on_local_disk_is_complete_and_alone(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "out")
    path = write_part(fs, root, "run1", 7, [ledger_row("mug", "A", "2026-01-01T00:00:00")])
    assert os.listdir(tmp_path / "out" / "results") == ["run1-00007.parquet"]
    assert pq.read_table(path).column("id").to_pylist() == ["mug"]
    assert read_latest_ok(fs, root) == {"mug": "A"}


def test_atomic_write_to_an_object_store_is_one_put(memfs):
    fs, root = memfs
    atomic_write(fs, f"{root}/run.json", b'{"rows": 1}')
    assert fs.cat_file(f"{root}/run.json") == b'{"rows": 1}'
    assert fs.ls(root, detail=False) == [f"{root.removeprefix('memory://')}/run.json"]


def test_stale_temp_files_from_killed_runs_are_removed_fresh_ones_kept(tmp_path):
    import os
    import time

    from manifests.ledger import remove_stale_temp_files

    images = tmp_path / "images"
    images.mkdir()
    stale, fresh, image = images / ".a.png.1234.tmp", images / ".b.png.5678.tmp", images / "a.png"
    for p in (stale, fresh, image):
        p.write_bytes(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(image, (old, old))
    assert remove_stale_temp_files(fsspec.filesystem("file"), str(tmp_path)) == 1
    assert not stale.exists() and fresh.exists() and image.exists()


def test_every_path_that_names_no_manifest_is_said_not_the_first(tmp_path):
    """Two mistyped paths were said one at a time: fix one, rerun, learn of the next."""
    good = tmp_path / "m.parquet"
    write_local(good, records(1))
    with pytest.raises(ManifestError) as exc:
        expand_manifest_paths([str(tmp_path / "a.parquet"), str(good), str(tmp_path / "b*.parquet")])
    said = str(exc.value)
    assert said.startswith("2 manifest paths name no manifest: ") and "a.parquet" in said and "b*.parquet" in said


def test_a_csv_given_as_a_manifest_is_told_how_to_make_one(tmp_path):
    """It was 'Parquet magic bytes not found in footer', with no word of what a manifest is or how to make one."""
    path = tmp_path / "shots.csv"
    path.write_text("id,prompt\nmug-1,a red mug\n")
    with pytest.raises(BadManifestFile, match=r"shots.csv is not a readable Parquet file: .*\(a manifest is "
                                              r"Parquet: make one from CSV lists .* `sdfleet manifest expand`"):
        survey([str(path)])


def test_survey_names_the_models_rows_ask_for(tmp_path):
    """A --model no row names is a typo or a forgotten column (every row then drew with `default`): generate warns
    of it from the survey's model names, a missing or null `model` cell being `default`."""
    from jobs.generate import unused_models
    from manifests.reader import survey

    pq.write_table(pa.table({"id": ["a"], "prompt": ["p"]}), tmp_path / "plain.parquet")
    pq.write_table(pa.table({"id": ["b", "c", "d"], "prompt": ["p"] * 3, "model": ["sd21", None, " sd21"]}),
                   tmp_path / "named.parquet")
    pq.write_table(pa.table({"id": ["e", "f"], "prompt": ["p"] * 2,  # a pandas Categorical: dictionary-encoded
                             "model": pa.array(["sdxl", None]).dictionary_encode()}), tmp_path / "category.parquet")
    assert survey([str(tmp_path / "named.parquet")]).model_names == {"sd21", "default", " sd21"}
    found = survey([str(tmp_path / n) for n in ("plain.parquet", "named.parquet", "category.parquet")])
    assert found.model_names == {"default", "sd21", " sd21", "sdxl"}
    # a column whose rows the plan reads otherwise (binary text) or refuses (numbers): not known, nothing warned
    pq.write_table(pa.table({"id": ["g"], "prompt": ["p"], "model": [b"sdxl"]}), tmp_path / "binary.parquet")
    pq.write_table(pa.table({"id": ["h"], "prompt": ["p"], "model": [7]}), tmp_path / "number.parquet")
    for other in ("binary.parquet", "number.parquet"):
        assert survey([str(tmp_path / "named.parquet"), str(tmp_path / other)]).model_names is None
    assert unused_models({"default": "tiny", "sdxl": "/m/sdxl"}, None) == []

    assert unused_models({"default": "tiny", "sd21": "/m/sd21"}, found.model_names) == []
    (line,) = unused_models({"default": "tiny", "sd21": "/m/sd21", "sdxl": "/m/sdxl"}, {"default", "sd21"})
    assert line == ("--model sdxl=/m/sdxl: no row of these manifests names it in its `model` column (they name: "
                    "default, sd21); a row without one draws with default=tiny"), line
    (line,) = unused_models({"default": "/m/mine"}, {"sd21"})  # default given, and no row without a model
    assert line.startswith("--model default=/m/mine: no row of these manifests names it"), line
    assert unused_models({"default": "tiny"}, {"sd21"}) == []  # the implied default is never warned of
    (line,) = unused_models({"default": "tiny", "sd21": "/m/sd21", "sdxl": "/m/sdxl"}, {"sd21"})
    assert line.endswith("(they name: sd21)"), line  # every row names its model: no word of rows without one
