"""`sdfleet manifest validate` and `sdfleet manifest expand`, called in-process as a user runs them.

No Ray starts here: validate and expand only read and write Parquet (and count prompt tokens).
"""

from __future__ import annotations

import math
import re
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import write_damaged_manifest
from jobs.cli import main
from manifests.schema import default_seed


def write(path, records: list[dict], schema: pa.Schema | None = None):
    """A Parquet manifest from row dicts; columns are the union of the rows' keys, missing ones null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = dict.fromkeys(k for r in records for k in r)
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records], schema=schema), path)
    return path


def validate(capsys, *args: str) -> tuple[int, list[str], str]:
    """Run `sdfleet manifest validate`; returns (exit code, stdout lines, stderr)."""
    code = main(["manifest", "validate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def problems(lines: list[str], kind: str = "error") -> list[str]:
    return [line for line in lines if line.startswith(f"{kind}: ")]


def good(rid: str, **fields) -> dict:
    return {"id": rid, "prompt": f"a red mug on a white background, {rid}", **fields}


# Every kind of bad row, one per row: (row, what the line must name: field, value as shown, what is valid)
BAD_ROWS = [
    (good("null-prompt", prompt=None), "prompt", "it is missing", "is required"),
    (good("empty-prompt", prompt=""), "prompt", "got ''", "must not be empty"),
    (good("zwsp-prompt", prompt="\u200b \ufeff"), "prompt", "got '\\u200b \\ufeff'",
     "must not be empty (it holds only invisible characters"),
    # a control character is drawn as tokens of its own (an ANSI colour code, a NUL from a binary export)
    (good("esc-prompt", prompt="a red\x1b[31m mug"), "prompt", "got 'a red\\x1b[31m mug'",
     "control character U+001B (character 6)"),
    (good("nul-negative", negative_prompt="blurry\x00"), "negative_prompt", "got 'blurry\\x00'",
     "control character U+0000 (character 7)"),
    (good("w770", width=770), "width", "got 770", "multiple of 8 in 64..2048"),
    (good("w4000", width=4000), "width", "got 4000", "multiple of 8 in 64..2048"),
    (good("h63", height=63), "height", "got 63", "multiple of 8 in 64..2048"),
    (good("g-nan", guidance_scale=math.nan), "guidance_scale", "got nan", "finite number >= 0"),
    (good("g-inf", guidance_scale=math.inf), "guidance_scale", "got inf", "finite number >= 0"),
    (good("g-neg", guidance_scale=-1.0), "guidance_scale", "got -1.0", "finite number >= 0"),
    (good("steps-neg", steps=-2), "steps", "got -2", "1..500"),
    (good("steps-501", steps=501), "steps", "got 501", "1..500"),
    (good("seed-neg", seed=-1), "seed", "got -1", "0 <= seed < 2**63"),
    (good("../x"), "id", "got '../x'", "1-128 characters of A-Z a-z 0-9 . _ -"),
    (good("a/b"), "id", "got 'a/b'", "1-128 characters of A-Z a-z 0-9 . _ -"),
    (good("."), "id", "got '.'", "not . or .."),
    (good("x" * 129), "id", f"got '{'x' * 129}'", "1-128 characters"),
    (good("sched", scheduler="warp_drive"), "scheduler", "got 'warp_drive'", "'dpmpp_2m'"),
    (good("model", model="sdxl"), "model", "got 'sdxl'", "--model sdxl=REF"),
    (good("adapter-inf", adapters=[{"name": "brand", "scale": math.inf}]), "adapters.0.scale", "got inf", "finite"),
]


@pytest.fixture
def bad_manifest(tmp_path):
    records = [good("fine-0")] + [r for r, *_ in BAD_ROWS] + [good("fine-1", prompt="un café ☕ 🚀 製品写真")]
    return write(tmp_path / "bad.parquet", records)


def test_validate_names_every_bad_row_one_line_each(capsys, bad_manifest):
    code, lines, _ = validate(capsys, bad_manifest)
    assert code == 1
    errors = problems(lines)
    assert len(errors) == len(BAD_ROWS), "\n".join(lines)
    by_row = {}
    for line in errors:
        match = re.match(rf"error: {re.escape(str(bad_manifest))} row (\d+) ", line)
        assert match, line
        by_row[int(match.group(1))] = line
    assert sorted(by_row) == list(range(1, len(BAD_ROWS) + 1))  # 0 and the last row are fine
    for position, (raw, field, shown, valid) in enumerate(BAD_ROWS, start=1):
        line = by_row[position]
        assert f"(`{raw['id']}`)" in line, line
        assert f"`{field}`" in line, line
        assert shown in line, line
        assert valid in line, line
    assert lines[-1].startswith(f"{len(BAD_ROWS) + 2} rows in 1 manifest(s): {len(BAD_ROWS)} error(s), 0 warning(s)")


def test_manifests_without_rows_fail_validate_as_they_fail_generate(capsys, tmp_path):
    """An empty export passed validate (exit 0), and the nightly run gated on it then refused it."""
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string())}), empty)
    code, lines, _ = validate(capsys, empty)
    assert code == 1 and problems(lines) == [
        f"error: the manifests hold no rows ({empty}): `sdfleet generate` refuses them; check what wrote them"]
    code, lines, _ = validate(capsys, empty, write(tmp_path / "one.parquet", [good("a")]))
    assert code == 0 and lines[-1] == "1 rows in 2 manifest(s): 0 error(s), 0 warning(s)"


def test_clean_manifest_exits_0(capsys, tmp_path):
    path = write(tmp_path / "ok.parquet", [
        good("mug-1"),
        good("mug-2", seed=2**63 - 1, steps=500, width=2048, height=256, guidance_scale=0.0, scheduler="euler_a",
             negative_prompt="blurry", adapters=[{"name": "brand", "scale": -0.5}]),
        good("unicode", prompt="un café ☕ 🚀 製品写真", negative_prompt="模糊, flou"),
        good("emoji", prompt="🍵🫖 on a 🧱 wall, 👨‍👩‍👧"),
        good("lines", prompt="a red mug,\r\n\ton a white background", negative_prompt="blurry,\nflou"),
    ])
    code, lines, err = validate(capsys, path)
    assert code == 0, lines
    assert lines == ["5 rows in 1 manifest(s): 0 error(s), 0 warning(s); 1 adapter(s) named, not checked (give "
                     "--adapters URI)"]
    assert err == ""


def test_seed_at_2_to_the_63_from_a_uint64_column_is_rejected(capsys, tmp_path):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.uint64())])
    path = write(tmp_path / "seeds.parquet", [good("max", seed=2**63 - 1), good("over", seed=2**63),
                                              good("top", seed=2**64 - 1)], schema=schema)
    code, lines, _ = validate(capsys, path)
    assert code == 1
    errors = problems(lines)
    assert len(errors) == 2
    assert "row 1 (`over`): `seed`" in errors[0] and "got 9223372036854775808" in errors[0]
    assert "row 2 (`top`): `seed`" in errors[1] and "got 18446744073709551615" in errors[1]
    assert all("0 <= seed < 2**63" in e for e in errors)


def test_a_missing_required_column_is_said_once_for_its_file_and_a_null_value_for_its_row(capsys, tmp_path):
    """A file without the column gave one error per row: 200,000 lines for a 200k-row export."""
    path = write(tmp_path / "no-prompt.parquet", [{"id": "a", "text": "a red mug"}, {"id": "b", "text": "a vase"}])
    code, lines, _ = validate(capsys, path)
    assert code == 1
    assert problems(lines) == [f"error: {path}: no `prompt` column, which every manifest needs: none of its rows "
                               "can be drawn"]
    assert lines[-1] == "2 rows in 1 manifest(s): 1 error(s), 0 warning(s)"
    nulls = write(tmp_path / "null-prompt.parquet", [good("a"), {"id": "b", "prompt": None}])
    code, lines, _ = validate(capsys, nulls)
    assert code == 1 and len(problems(lines)) == 1
    assert "row 1 (`b`): `prompt` is required, it is missing" in problems(lines)[0]


def test_duplicate_id_across_two_manifests_reports_both_rows(capsys, tmp_path):
    first = write(tmp_path / "a.parquet", [good("mug-1"), good("mug-2")])
    second = write(tmp_path / "b.parquet", [good("vase-1"), good("mug-2")])
    code, lines, _ = validate(capsys, first, second)
    assert code == 1
    errors = problems(lines)
    assert len(errors) == 2, lines
    assert errors[0].startswith(f"error: {first} row 1 (`mug-2`): `id` appears in 2 rows")
    assert errors[0].startswith(f"error: {first} row 1 (`mug-2`): `id` appears in 2 rows; ")
    assert errors[1].startswith(f"error: {second} row 1 (`mug-2`): `id` appears in 2 rows (the first: {first} row 1)")
    assert all("unique" in e for e in errors)
    assert lines[-1] == "4 rows in 2 manifest(s): 2 error(s), 0 warning(s)"


def test_a_manifest_named_twice_is_not_a_duplicate_of_itself(capsys, tmp_path):
    path = write(tmp_path / "a.parquet", [good("mug-1"), good("mug-2")])
    code, lines, _ = validate(capsys, path, tmp_path / "*.parquet", tmp_path)
    assert code == 0, lines
    assert lines == ["2 rows in 1 manifest(s): 0 error(s), 0 warning(s)"]


def test_glob_of_several_manifests(capsys, tmp_path):
    write(tmp_path / "m" / "a.parquet", [good("a-1")])
    write(tmp_path / "m" / "b.parquet", [good("b-1"), good("b-2", width=770)])
    code, lines, _ = validate(capsys, tmp_path / "m" / "*.parquet")
    assert code == 1
    assert len(problems(lines)) == 1 and "b.parquet row 1 (`b-2`): `width`" in problems(lines)[0]
    assert lines[-1] == "3 rows in 2 manifest(s): 1 error(s), 0 warning(s)"


def test_long_prompt_is_a_warning_naming_the_cut_off_words(capfd, tmp_path):
    long_prompt = " ".join(["a red mug on a marble table in soft studio lighting"] * 10) + " zebra giraffe"
    path = write(tmp_path / "long.parquet", [good("short"), good("long", prompt=long_prompt)])
    code, lines, err = validate(capfd, path)
    assert "Token indices" not in err, "sdfleet says it in its own words; transformers' warning stays out"
    assert code == 0, lines  # a warning alone does not fail validation
    warnings = problems(lines, "warning")
    assert len(warnings) == 1 and problems(lines) == []
    assert f"{path} row 1 (`long`)" in warnings[0]
    assert "77" in warnings[0] and "cut off" in warnings[0]
    assert "zebra giraffe" in warnings[0]
    assert lines[-1] == "2 rows in 1 manifest(s): 0 error(s), 1 warning(s)"


def test_errors_and_warnings_together_exit_1(capsys, tmp_path):
    path = write(tmp_path / "m.parquet", [good("long", prompt="red " * 100), good("bad", steps=0)])
    code, lines, _ = validate(capsys, path)
    assert code == 1
    assert len(problems(lines)) == 1 and len(problems(lines, "warning")) == 1


def test_unknown_model_becomes_valid_when_given_with_the_model_flag(capsys, tmp_path):
    path = write(tmp_path / "m.parquet", [good("mug-1", model="catalog"), good("mug-2", model="tiny")])
    code, lines, _ = validate(capsys, path)
    assert code == 1 and "--model catalog=REF" in problems(lines)[0]
    code, lines, _ = validate(capsys, path, "--model", "catalog=tiny")
    assert code == 0, lines


def test_missing_manifest_exits_1_naming_it(capsys, tmp_path):
    missing = tmp_path / "typo.parquet"
    code, lines, err = validate(capsys, missing)
    assert code == 1 and lines == []
    assert str(missing) in err and "does not exist" in err
    assert len(err.strip().splitlines()) == 1  # one clear line, no traceback


def test_non_parquet_manifest_exits_1(capsys, tmp_path):
    path = tmp_path / "catalog.parquet"
    path.write_text("id,prompt\nmug-1,a red mug\n")
    code, lines, err = validate(capsys, path)
    assert code == 1 and not err
    assert problems(lines)[0].startswith(f"error: {path} is not a readable Parquet file")
    assert "write it again as Parquet" in lines[0] and "check the manifest paths" not in lines[0]  # the path was right


def test_validate_names_every_unreadable_manifest_and_checks_the_rest(capsys, tmp_path):
    """It stopped at the first file it could not open, saying nothing of the others' rows."""
    empty, csv = tmp_path / "a-empty.parquet", tmp_path / "b-csv.parquet"
    empty.write_bytes(b"")
    csv.write_text("id,prompt\nmug-1,a red mug\n")
    twice = tmp_path / "c-twice.parquet"
    pq.write_table(pa.table([pa.array(["x"]), pa.array(["a mug"]), pa.array(["a vase"])], names=["id", "prompt", "prompt"]),
                   twice)
    rows = write(tmp_path / "d-rows.parquet", [good("fine"), good("wide", width=770)])
    code, lines, err = validate(capsys, empty, csv, twice, rows)
    assert code == 1 and not err
    said = problems(lines)
    assert len(said) == 4, lines
    assert said[0].startswith(f"error: {empty} is not a readable Parquet file")
    assert said[1].startswith(f"error: {csv} is not a readable Parquet file")
    assert said[2] == f"error: {twice} has more than one column named 'prompt'; a manifest's column names must be unique"
    assert said[3].startswith(f"error: {rows} row 1 (`wide`): `width`")
    assert lines[-1] == "2 rows in 1 manifest(s) (3 more unreadable): 4 error(s), 0 warning(s)"
    # a path that names no manifest is said as well, and the rest still checked (it stopped the whole check)
    code, lines, err = validate(capsys, tmp_path / "typo.parquet", "/dev/null", rows)
    assert code == 1 and not err
    assert problems(lines)[:3] == [f"error: manifest '{tmp_path / 'typo.parquet'}' does not exist",
                                   "error: manifest '/dev/null' is not a regular file or a folder",
                                   f"error: {rows} row 1 (`wide`): `width` must be a multiple of 8 in 64..2048, "
                                   "got 770"]
    assert lines[-1] == "2 rows in 1 manifest(s) (2 path(s) naming none): 3 error(s), 0 warning(s)"


def not_utf8(values: list[bytes]) -> pa.Array:
    """A Parquet `string` column holding bytes that are not UTF-8, as tools that do not check write it (Arrow's own
    writers refuse them)."""
    raw = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())


def test_text_that_is_not_utf8_is_an_error_naming_its_row_and_field(capsys, tmp_path):
    """It was a UnicodeDecodeError traceback, in `generate`'s survey and plan too (tests/test_plan.py)."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": not_utf8([b"fine", b"bad-prompt", b"\xff\xfe", b"bad-sku"]),
                             "prompt": not_utf8([b"a mug", b"a \xffmug", b"a vase", b"a lamp"]),
                             "sku": not_utf8([b"1", b"2", b"3", b"\xc3("])}), path)
    code, lines, err = validate(capsys, path, write(tmp_path / "other.parquet", [good("other")]))
    assert code == 1 and not err
    fix = "write the manifest's text as UTF-8 (the tool that wrote it did not check)"
    assert problems(lines) == [
        f"error: {path} row 1 (`bad-prompt`): `prompt` is not UTF-8 text (bytes b'a \\xffmug'); {fix}",
        f"error: {path} row 2: `id` is not UTF-8 text (bytes b'\\xff\\xfe'); {fix}",
        f"error: {path} row 3 (`bad-sku`): `sku` is not UTF-8 text (bytes b'\\xc3('); {fix}"]
    assert lines[-1] == "5 rows in 2 manifest(s): 3 error(s), 0 warning(s)"
    # two fields of one row: a line each (they were one line, which a script counting problems miscounts)
    pq.write_table(pa.table({"id": ["r0"], "prompt": not_utf8([b"a \xffmug"]), "sku": not_utf8([b"\xc3("])}), path)
    code, lines, _ = validate(capsys, path)
    assert problems(lines) == [f"error: {path} row 0 (`r0`): `prompt` is not UTF-8 text (bytes b'a \\xffmug'); {fix}",
                               f"error: {path} row 0 (`r0`): `sku` is not UTF-8 text (bytes b'\\xc3('); {fix}"], lines


def test_a_date_or_time_python_cannot_hold_is_an_error_naming_its_row_and_field(capsys, tmp_path):
    """Postgres' `infinity` exported as the largest int64 in a pass-through timestamp column (or a date past year
    9999) stopped the whole run with "OverflowError: date value out of range", and validate with a traceback."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["fine", "forever", "far"], "prompt": ["a mug", "a vase", "a lamp"],
                             "valid_until": pa.array([0, 2**63 - 1, 0], pa.timestamp("us")),
                             "launch": pa.array([0, 0, 2**31 - 1], pa.date32())}), path)
    code, lines, err = validate(capsys, path)
    assert code == 1 and not err
    fix = "write such values as null or as text (dates and times within years 1-9999)"
    assert problems(lines) == [
        f"error: {path} row 1 (`forever`): `valid_until` holds a timestamp[us] value that cannot be read "
        f"(OverflowError: date value out of range, stored as 9223372036854775807); {fix}",
        f"error: {path} row 2 (`far`): `launch` holds a date32[day] value that cannot be read (OverflowError: "
        f"days=2147483647; must have magnitude <= 999999999, stored as 2147483647); {fix}"]
    assert lines[-1] == "3 rows in 1 manifest(s): 2 error(s), 0 warning(s)"


def test_a_file_with_a_column_arrow_cannot_read_is_named_and_the_others_checked(capsys, tmp_path, monkeypatch):
    """polars writes Int128 columns, which Arrow cannot read: its ArrowNotImplementedError was a traceback, and
    validate checked none of the other files. (Arrow writes no such file, so its reader is made to meet one.)"""
    import manifests.reader as reader

    wide, fine = write(tmp_path / "wide.parquet", [good("a")]), write(tmp_path / "fine.parquet", [good("b")])
    opened = reader.pq.ParquetFile

    def parquet_file(source, *args, **kwargs):
        if getattr(source, "path", "").endswith("wide.parquet"):
            raise pa.ArrowNotImplementedError("Integers with more than 64 bits not implemented")
        return opened(source, *args, **kwargs)

    monkeypatch.setattr(reader.pq, "ParquetFile", parquet_file)
    code, lines, err = validate(capsys, wide, fine)
    assert code == 1 and not err
    assert problems(lines) == [f"error: {wide} holds a column of a type Arrow cannot read (Integers with more than 64 "
                               "bits not implemented): write that column as another type (integers of 64 bits or "
                               "fewer, or text)"]
    assert lines[-1] == "1 rows in 1 manifest(s) (1 more unreadable): 1 error(s), 0 warning(s)"


def test_validate_names_a_damaged_row_group_and_goes_on(capsys, tmp_path):
    damaged = write_damaged_manifest(tmp_path / "damaged.parquet", groups=3, per_group=4, damaged_group=1)
    code, lines, err = validate(capsys, damaged, write(tmp_path / "fine.parquet", [good("other")]))
    assert code == 1 and not err
    assert problems(lines) == [f"error: {damaged} rows 4-7 (row group 1) cannot be read (ArrowInvalid: Invalid or "
                               "truncated PLAIN-encoded BYTE_ARRAY data): the file's data cannot be decoded: write "
                               "it again from its source"]
    assert lines[-1].startswith("13 rows in 2 manifest(s): 1 error(s)")


def test_validate_warns_of_columns_that_look_like_fields(capsys, tmp_path):
    """`Seed` or `steps ` pass through as extra columns and the field takes its default in every row: a warning
    naming the file, the column and the field (a `Prompt` column also leaves every row without a prompt)."""
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "Prompt": ["a red star"], "Seed": [7], "steps ": [4], "sku": ["x"]}), path)
    code, lines, _ = validate(capsys, path)
    assert code == 1 and len(problems(lines)) == 1 and "`prompt`" in problems(lines)[0]
    warned = problems(lines, "warning")
    assert warned == [f"warning: {path}: column {c!r} is not the field `{f}` (field names are exact, lower-case): "
                      f"every row of it reads `{f}` as missing, and {c!r} passes through to the ledger"
                      for c, f in (("Prompt", "prompt"), ("Seed", "seed"), ("steps ", "steps"))]


def test_validate_of_a_manifest_whose_ids_cannot_be_read_says_so_and_checks_the_other_files(capsys, tmp_path):
    """One manifest whose `id` column does not decode ended validate at once: the other files' bad rows went
    unnamed and no summary was printed, where the docs say an unreadable file is one error and the rest are
    checked."""
    damaged = write_damaged_manifest(tmp_path / "damaged.parquet", column="id")  # row group 1 of 3: rows 4-7
    other = write(tmp_path / "other.parquet", [good("r0"), {**good("b"), "steps": 0}])  # r0: also in group 0
    code, lines, err = validate(capsys, damaged, other)
    assert code == 1 and "Traceback" not in err and not err.startswith("sdfleet: error"), err
    errors = problems(lines)
    assert errors[0].startswith(f"error: {damaged} row 0 (`r0`): `id` appears in 2 rows")  # its readable groups
    assert errors[1].startswith(f"error: {damaged} rows 4-7 (row group 1) cannot be read (ArrowInvalid: "), errors
    assert errors[2:] == [f"error: {other} row 0 (`r0`): `id` appears in 2 rows (the first: {damaged} row 0); ids "
                          "must be unique across the run's manifests",
                          f"error: {other} row 1 (`b`): `steps` must be in 1..500, got 0"], errors
    assert lines[-1] == "14 rows in 2 manifest(s): 4 error(s), 0 warning(s)", lines


def test_a_row_with_another_error_is_named_as_a_duplicate_too(capsys, tmp_path):
    """Its duplicate was said only once the other error was fixed: a second round of fixes."""
    path = write(tmp_path / "m.parquet", [good("x"), {**good("x"), "steps": 0}])
    code, lines, _ = validate(capsys, path)
    errors = problems(lines)
    assert code == 1 and len(errors) == 3, errors
    assert errors[1] == f"error: {path} row 1 (`x`): `steps` must be in 1..500, got 0"
    assert sum("`id` appears in 2 rows" in e for e in errors) == 2


def test_a_model_whose_tokenizer_does_not_load_is_one_line(capsys, tmp_path):
    """validate counts prompt tokens with a local model's own tokenizer: a damaged one was a JSONDecodeError
    traceback."""
    from actors.models import export_preset

    export_preset("tiny", str(tmp_path / "mine"))
    (tmp_path / "mine" / "tokenizer" / "tokenizer.json").write_text("{garbage")
    capsys.readouterr()  # the export's own progress bar
    code, lines, err = validate(capsys, write(tmp_path / "m.parquet", [good("a", model="mine")]),
                                "--model", f"mine={tmp_path / 'mine'}")
    assert code == 1 and lines == []
    assert err.startswith(f"sdfleet: error: model mine={tmp_path / 'mine'}: its tokenizer ({tmp_path / 'mine'}"
                          "/tokenizer) does not load (JSONDecodeError: ") and len(err.strip().splitlines()) == 1, err


def test_prompts_are_counted_with_the_tokenizer_of_a_model_in_a_store(capsys, tmp_path, http_folder):
    """A model in a store was counted with the built-in tokenizer, which spells English letter by letter: SD 2.1
    prompts of ~25 words were said cut off. Its own tokenizer/ is fetched (not its weights); a model whose
    tokenizer cannot be had is said once, its prompts not counted."""
    import json

    from actors.models import export_preset
    from manifests.validate import check_manifests

    served, url = http_folder
    export_preset("tiny", str(served / "mine"))
    config = served / "mine" / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 8}))
    capsys.readouterr()
    rows = [good("a", model="mine", prompt="a red star on a gray background"), good("b", prompt="a red star")]
    manifest = write(tmp_path / "m.parquet", rows)
    code, lines, _ = validate(capsys, manifest, "--model", f"mine={url}/mine")
    assert code == 0 and problems(lines, "warning") == [
        f"warning: {manifest} row 0 (`a`): prompt is 9 CLIP tokens, over the 8 the model reads; these words are "
        "cut off: 'background'"], lines
    code, lines, _ = validate(capsys, manifest, "--model", f"mine={served / 'mine'}")  # the same, on this disk
    assert code == 0 and len(problems(lines, "warning")) == 1
    assert list(check_manifests([str(manifest)], {"default", "mine"}, lambda model: None)) == [
        ("warning", "model 'mine': its tokenizer could not be fetched, so its rows' prompts are not checked against "
                    "CLIP's 77-token window (generate still warns in the ledger)"),
        ("warning", "model 'default': its tokenizer could not be fetched, so its rows' prompts are not checked "
                    "against CLIP's 77-token window (generate still warns in the ledger)")]


def test_memory_uri_manifest_validates(capsys):
    fs = fsspec.filesystem("memory")
    folder = f"/cli-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(f"{folder}/m.parquet", "wb") as f:
            pq.write_table(pa.Table.from_pylist([good("mug-1", width=None), good("mug-2", width=770)]), f)
        code, lines, _ = validate(capsys, f"memory://{folder}/m.parquet")
        assert code == 1
        assert re.match(rf"error: memory://{folder}/m.parquet row 1 \(`mug-2`\): `width`", problems(lines)[0])
    finally:
        fs.rm(folder, recursive=True)


# ---------------------------------------------------------------------------------------------------
# expand

@pytest.fixture
def catalogue(tmp_path):
    products = tmp_path / "products.csv"
    products.write_text("sku,product,category\nmug-001,a red ceramic mug,kitchen\n"
                        "vase-002,\"a blue vase, tall\",home\nlamp-003,a brass desk lamp,home\n", encoding="utf-8")
    scenes = tmp_path / "scenes.txt"
    scenes.write_text("on a marble table\nin a sunny kitchen\n", encoding="utf-8")
    return products, scenes


def expand_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["manifest", "expand", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_expand_writes_a_manifest_that_validate_accepts(capsys, tmp_path, catalogue):
    products, scenes = catalogue
    out = tmp_path / "out" / "catalog.parquet"
    code, stdout, _ = expand_cli(capsys, "--template", "a photo of {product}, {scene}", "--products", products,
                                 "--scenes", scenes, "--variants", "2", "--negative", "blurry, lowres",
                                 "--steps", "4", "--width", "256", "--height", "256", "-o", out)
    assert code == 0
    assert stdout.strip() == f"wrote 12 rows to {out}"

    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3 * 2 * 2 and len({r["id"] for r in rows}) == 12
    assert {(r["steps"], r["width"], r["height"], r["negative_prompt"]) for r in rows} == {(4, 256, 256, "blurry, lowres")}
    row = next(r for r in rows if r["id"] == "vase-002--in-a-sunny-kitchen--v1")
    assert row["prompt"] == "a photo of a blue vase, tall, in a sunny kitchen"
    assert row["seed"] == default_seed(row["id"]) and row["category"] == "home"

    code, lines, _ = validate(capsys, out)
    assert code == 0, lines
    assert lines == ["12 rows in 1 manifest(s): 0 error(s), 0 warning(s)"]


def test_expand_is_stable_when_a_product_is_added(capsys, tmp_path, catalogue):
    products, scenes = catalogue
    args = ["--template", "a photo of {product}, {scene}", "--scenes", scenes, "--variants", "2"]
    assert expand_cli(capsys, *args, "--products", products, "-o", tmp_path / "before.parquet")[0] == 0
    with open(products, "a", encoding="utf-8") as f:
        f.write("cup-004,a tea cup,kitchen\n")
    assert expand_cli(capsys, *args, "--products", products, "-o", tmp_path / "after.parquet")[0] == 0
    before = {r["id"]: r for r in pq.read_table(tmp_path / "before.parquet").to_pylist()}
    after = {r["id"]: r for r in pq.read_table(tmp_path / "after.parquet").to_pylist()}
    assert len(after) == len(before) + 4
    assert all(after[rid] == row for rid, row in before.items())


def test_expand_for_a_model_of_the_run_says_what_validate_and_generate_need(capsys, tmp_path, catalogue):
    products, _ = catalogue
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", products, "--model", "catalog",
                              "-o", f"memory://expand-cli-{uuid.uuid4().hex[:8]}/m.parquet")
    assert code == 1 and "memory:// lives in this process only" in err  # the manifest would be gone at exit
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", products, "--model", "catalog",
                              "-o", tmp_path / "m.parquet")
    assert code == 0 and "warning: --model 'catalog' is not a preset" in err and "--model catalog=REF" in err
    code, lines, _ = validate(capsys, tmp_path / "m.parquet")
    assert code == 1 and len(problems(lines)) == 3  # every row names the model that was not given
    code, lines, _ = validate(capsys, tmp_path / "m.parquet", "--model", "catalog=tiny")
    assert code == 0, lines


def test_expand_with_an_unknown_placeholder_exits_1_listing_the_available_ones(capsys, tmp_path, catalogue):
    products, _ = catalogue
    out = tmp_path / "m.parquet"
    code, stdout, err = expand_cli(capsys, "--template", "a {colour} {product}", "--products", products, "-o", out)
    assert code == 1 and stdout == ""
    assert err.startswith("sdfleet: error: ") and "{colour}" in err
    assert "{product}" in err and "{sku}" in err and "{category}" in err
    assert not out.exists()


@pytest.mark.parametrize("template,needle", [("a photo, {scene}", "{product}"), ("a photo of {product}", "{scene}")])
def test_expand_template_errors_exit_1(capsys, tmp_path, catalogue, template, needle):
    products, scenes = catalogue
    code, _, err = expand_cli(capsys, "--template", template, "--products", products, "--scenes", scenes,
                              "-o", tmp_path / "m.parquet")
    assert code == 1 and needle in err


def test_expand_with_an_empty_products_file_exits_1(capsys, tmp_path):
    products = tmp_path / "products.csv"
    products.write_text("sku,product\n")
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", products, "-o", tmp_path / "m.parquet")
    assert code == 1 and str(products) in err and "holds no rows" in err


def test_expand_names_a_products_value_that_is_not_utf8_or_not_text(capsys, tmp_path):
    products = tmp_path / "products.parquet"
    pq.write_table(pa.table({"product": not_utf8([b"a mug", b"a \xffvase"])}), products)
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", products, "-o", tmp_path / "m.parquet")
    assert code == 1 and "Traceback" not in err
    assert err.strip() == (f"sdfleet: error: {products} row 1: `product` is not UTF-8 text (bytes b'a \\xffvase'); "
                           "write the list's text as UTF-8")
    # a list or a struct was put in the prompt as its Python repr: "photo of ['red mug', 'blue mug']"
    pq.write_table(pa.table({"product": [["red mug", "blue mug"]]}), products)
    code, _, err = expand_cli(capsys, "--template", "photo of {product}", "--products", products,
                              "-o", tmp_path / "m.parquet")
    assert code == 1 and not (tmp_path / "m.parquet").exists()
    assert err.strip() == (f"sdfleet: error: {products} row 0: `product` holds a list, and the template puts it in a "
                           "prompt; give it text or a number")


def test_expand_force_that_cannot_write_keeps_the_manifest_it_would_replace(tmp_path, catalogue):
    """A write refused part-way (a full disk; here the file-size limit) left half a manifest in place of the old
    one, which --force had been asked to replace."""
    import resource
    import subprocess
    import sys

    from helpers import REPO

    products, scenes = catalogue
    out = tmp_path / "catalog.parquet"
    args = [sys.executable, "-m", "jobs", "manifest", "expand", "--template", "a photo of {product}, {scene}",
            "--products", str(products), "--scenes", str(scenes), "-o", str(out)]
    assert subprocess.run(args, cwd=REPO, capture_output=True).returncode == 0
    before = out.read_bytes()

    def small_files():  # in the child: Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    proc = subprocess.run([*args, "--variants", "300", "--force"], cwd=REPO, capture_output=True, text=True,
                          preexec_fn=small_files)
    assert proc.returncode == 1 and "File too large" in proc.stderr, proc.stderr
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix not in (".csv", ".txt")] == [out.name]  # no temp file left


@pytest.mark.parametrize("text, said", [
    # the stray quote took in the lines after it: one product with a three-line name, two lost without a word
    ('sku,product\nmug-1,"a 12 inch mug\nbottle-2,a green bottle\nhat-3,a red hat\n',
     "line 2: unexpected end of data: a stray or unclosed double quote (quote a whole value, and double each quote "
     "inside one)"),
    ('sku,product\nmug-1,a mug\nbottle-2,"a green\nhat-3,a red" hat\n',
     "line 3: ',' expected after '\"': a stray or unclosed double quote"),
    ('sku,product\nmug-1,"a 12 inch mug\nbottle-2,a green bottle"\nhat-3,a red hat\n',
     "line 2: a value runs on over 2 lines ('a 12 inch mug\\nbottle-2,a green bottle'); an opening quote is not "
     "closed, or a value holds a line break, which a list may not hold (remove it from the cell, or drop the column)"),
])
def test_expand_refuses_a_products_csv_whose_quotes_would_swallow_lines(capsys, tmp_path, text, said):
    products = tmp_path / "products.csv"
    products.write_text(text)
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", products, "-o", tmp_path / "m.parquet")
    assert code == 1 and err.startswith(f"sdfleet: error: {products} {said}"), err
    assert not (tmp_path / "m.parquet").exists()


def test_expand_from_or_to_a_store_that_refuses_is_one_line(capsys, tmp_path, monkeypatch, catalogue):
    """No credentials for the bucket: a botocore traceback, for --products and for -o."""
    from botocore.exceptions import NoCredentialsError
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry

    class Refusing(MemoryFileSystem):
        protocol = "refusing"

        def _refuse(self, *args, **kwargs):
            raise NoCredentialsError()

        ls = info = exists = isdir = isfile = cat_file = _refuse

    monkeypatch.setitem(_registry, "refusing", Refusing)
    products, _ = catalogue
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", "refusing://b/p.csv",
                              "-o", tmp_path / "m.parquet")
    assert (code, err.strip()) == (1, "sdfleet: error: --products refusing://b/p.csv cannot be read "
                                      "(NoCredentialsError: Unable to locate credentials)")
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", products, "-o", "refusing://b/m.parquet")
    assert (code, err.strip()) == (1, "sdfleet: error: -o refusing://b/m.parquet cannot be reached "
                                      "(NoCredentialsError: Unable to locate credentials)")


def test_expand_past_what_one_manifest_holds_is_refused_before_building_it(capsys, tmp_path, catalogue):
    """--variants 100000000 built every row in memory until the kernel killed it (24 GB, no word said)."""
    products, scenes = catalogue
    code, _, err = expand_cli(capsys, "--template", "{product}, {scene}", "--products", products, "--scenes", scenes,
                              "--variants", "100000000", "-o", tmp_path / "m.parquet")
    assert code == 1 and err.strip() == (
        "sdfleet: error: 3 product(s) x 2 scene(s) x 100000000 variant(s) would be 600,000,000 rows, more than one "
        "manifest holds here (5,000,000); split the products into several lists and expand each into its own "
        "manifest (generate reads them together)")


def test_expand_with_clashing_slugs_exits_1(capsys, tmp_path):
    products = tmp_path / "products.txt"
    products.write_text("Red Mug\nred mug!\n")
    code, _, err = expand_cli(capsys, "--template", "{product}", "--products", products, "-o", tmp_path / "m.parquet")
    assert code == 1 and "'red-mug'" in err and "line 1 and line 2" in err


def test_expand_refuses_columns_it_would_overwrite(capsys, tmp_path):
    """A products column named `variant` (expand's own variant number) or one that products and scenes both
    have would lose its values in the manifest without a word."""
    products, scenes = tmp_path / "products.csv", tmp_path / "scenes.csv"
    products.write_text("sku,product,variant,category\nmug-1,a mug,red,kitchen\n")
    scenes.write_text("scene_id,scene,category\nsun,in the sun,outdoor\n")
    code, _, err = expand_cli(capsys, "--template", "{product} {scene}", "--products", products, "--scenes", scenes,
                              "-o", tmp_path / "m.parquet")
    assert code == 1 and "column(s) variant would overwrite manifest fields" in err
    products.write_text("sku,product,category\nmug-1,a mug,kitchen\n")
    code, _, err = expand_cli(capsys, "--template", "{product} {scene}", "--products", products, "--scenes", scenes,
                              "-o", tmp_path / "m.parquet")
    assert code == 1 and f"{products} and {scenes} both have column(s) category; rename them" in err
    assert not (tmp_path / "m.parquet").exists()


def test_a_row_too_small_for_the_watermark_is_an_error_unless_the_run_draws_without_it(capsys, tmp_path):
    """What `generate` would find invalid, validate says first: 256x200 is under the mark's 256 px."""
    path = write(tmp_path / "m.parquet", [good("native"), good("narrow", width=256, height=200)])
    code, lines, _ = validate(capsys, path)
    assert code == 1 and len(problems(lines)) == 1, lines
    assert f"{path} row 1 (`narrow`): 256x200 is too small to carry the watermark" in problems(lines)[0]
    code, lines, _ = validate(capsys, path, "--no-watermark")
    assert code == 0 and problems(lines) == [], lines


def test_validate_says_how_far_it_is_on_a_long_check(capsys, tmp_path, monkeypatch):
    """Five million rows took 95 s with nothing said until the end: a line on stderr every 15 s says how far."""
    import contextlib

    import jobs.console

    lines = []

    @contextlib.contextmanager
    def at_the_end(line, seconds=15.0):  # the line the ticker would say, as it reads once the check is done
        yield
        lines.append(line())

    monkeypatch.setattr(jobs.console, "ticking", at_the_end)
    path = write(tmp_path / "m.parquet", [good("a"), {**good("b"), "steps": 0}, good("c")])
    code, out, _ = validate(capsys, path)
    assert code == 1 and len(lines) == 1 and lines[0].startswith("validating: 3/3 rows, 1 error(s), "), lines


def test_validate_with_the_adapter_store_says_what_generate_would_find_in_the_adapters(capsys, tmp_path, monkeypatch):
    """Without --adapters, validate read no adapters (a QA manifest's 29 failing rows were 1 problem there); with
    it, each unusable adapter is one error with how many rows it fails and where the first is, a prompt using an
    embedding's token it does not list is invalid, an embedding its prompts never call a warning. An adapter at
    scale 0 loads nothing and fails nothing. Without the flag the summary says adapters went unchecked."""
    import numpy as np
    from safetensors.numpy import save_file

    from helpers import lora_bytes

    store = tmp_path / "store"
    store.mkdir()
    (store / "good.safetensors").write_bytes(lora_bytes(1))
    (store / "cut.safetensors").write_bytes(lora_bytes(2)[:100])
    save_file({"<my-mug>": np.zeros((1, 64), np.float32)}, str(store / "mug.safetensors"))  # (tiny's width)
    save_file({"<old>": np.zeros((1, 768), np.float32)}, str(store / "sd15.safetensors"))  # an SD 1.x embedding

    def row(i, *adapters, prompt="a photo of a mug"):
        return {"id": f"r{i}", "prompt": prompt, "adapters": [{"name": n, "scale": s} for n, s in adapters]}

    manifest = write(tmp_path / "m.parquet", [
        row(0, ("good", 1.0)), row(1, ("cut", 0.8)), row(2, ("gone", 1.0), ("good", 0.5)), row(3, ("cut", 1.0)),
        row(4, ("gone", 0.0)),  # loads nothing
        row(5, prompt="a <my-mug> on a table"),  # the embedding's token, unlisted
        row(6, ("mug", 1.0), prompt="a <my-mug> on a table"), row(7, ("mug", 1.0)),  # listed, unused
        row(8, ("sd15", 1.0), prompt="a <old> mug"),  # made for another base model
    ])
    where = f"{manifest} row"
    code, lines, _ = validate(capsys, manifest)
    assert code == 0 and lines[-1].endswith("0 error(s), 0 warning(s); 5 adapter(s) named, not checked (give "
                                            "--adapters URI)"), lines
    code, lines, _ = validate(capsys, manifest, "--adapters", str(store))
    assert code == 1 and lines[-1] == "9 rows in 1 manifest(s): 4 error(s), 1 warning(s)", lines
    said = problems(lines) + problems(lines, "warning")
    said = [line for line in lines if line in said]  # in the order said
    assert said[0].startswith(f"error: {where} 5 (`r5`): the prompt uses '<my-mug>', the token of the embedding "
                              "'mug', which the row's `adapters` do not list"), said
    assert said[1].startswith(f"warning: {where} 7 (`r7`): `adapters` lists the embedding 'mug', whose token "
                              "'<my-mug>' neither prompt uses"), said
    cut, gone, old = said[2:]
    assert old == ("error: adapter 'sd15': is made for a model whose text encoder is 768 wide, and model 'default''s "
                   f"is 64: an adapter for another base model (Stable Diffusion 1.x: 768, 2.x: 1024) (1 row(s) would "
                   f"fail on it; the first: {where} 8 (`r8`))"), old
    assert cut.startswith("error: adapter 'cut': "), cut
    assert cut.endswith(f"(2 row(s) would fail on it; the first: {where} 1 (`r1`))"), cut
    assert gone.startswith("error: adapter 'gone': is not in the adapter store") and "the store holds: cut, good, mug" \
        in gone and gone.endswith(f"(1 row(s) would fail on it; the first: {where} 2 (`r2`))"), gone
    # a store that cannot be read: said, and the rows' own fields still checked
    code, lines, _ = validate(capsys, manifest, "--adapters", str(tmp_path / "nowhere"))
    assert code == 1 and f"error: --adapters {tmp_path / 'nowhere'} does not exist; adapters not checked" in lines
    assert lines[-1].endswith("1 error(s), 0 warning(s); 5 adapter(s) named, not checked (the adapter store could "
                              "not be read)"), lines
    # what generate refuses as a store, refused alike ("" read the working directory as the store: QA, review)
    for given, said in (("", "--adapters must not be empty"), ("memory://adapters", "--adapters memory://adapters")):
        code, lines, err = validate(capsys, manifest, "--adapters", given)
        assert code == 1 and not lines and said in err, (given, lines, err)
    # the store as a run names it (a path relative to here, made whole)
    monkeypatch.chdir(tmp_path)
    code, lines, _ = validate(capsys, manifest, "--adapters", "store")
    assert f"is not in the adapter store {store} (expected" in "\n".join(lines), lines
    # rows the plan makes invalid for a repeated id fail on nothing else; a damaged file's readable rows are checked
    repeated = write(tmp_path / "twice.parquet", [row(1, ("gone", 1.0)), row(1, ("gone", 1.0)), row(2, ("gone", 1.0))])
    code, lines, _ = validate(capsys, repeated, "--adapters", str(store))
    (gone,) = [line for line in lines if line.startswith("error: adapter 'gone'")]
    assert gone.endswith(f"(1 row(s) would fail on it; the first: {repeated} row 2 (`r2`))"), gone
    damaged = write_damaged_manifest(tmp_path / "damaged.parquet", column="adapters",
                                     adapters=[{"name": "gone", "scale": 1.0}])
    code, lines, _ = validate(capsys, damaged, "--adapters", str(store))
    assert any(line.startswith("error: adapter 'gone': is not in the adapter store") for line in lines), lines
