"""`manifest expand`: template x products x scenes x variants -> manifest rows with stable ids and seeds.

Library level (`load_list`, `expand`, `write_manifest`); the CLI is in test_manifest_cli.py.
"""

from __future__ import annotations

import collections
import decimal

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from manifests.expand import ExpandError, expand, load_list, slug, write_manifest
from manifests.schema import default_seed, validate_row
from manifests.stores import read_parquet

PRODUCTS_CSV = """\
sku,product,category
mug-001,a red ceramic mug,kitchen
bottle-002,"a green glass bottle, frosted",kitchen
sneaker-003,a white sneaker,apparel
"""

SCENES_CSV = """\
scene_id,scene
studio,on a white background in soft studio lighting
marble,on a marble table with soft shadows
"""

SCENES_TXT = """\
# one scene per line; comments and blank lines are skipped
on a beach at golden hour

in a snowy forest
on a city street at night
"""

TEMPLATE = "a product photo of {product}, {scene}, high quality"


@pytest.fixture
def lists(tmp_path):
    (tmp_path / "products.csv").write_text(PRODUCTS_CSV, encoding="utf-8")
    (tmp_path / "scenes.csv").write_text(SCENES_CSV, encoding="utf-8")
    (tmp_path / "scenes.txt").write_text(SCENES_TXT, encoding="utf-8")
    return tmp_path


def products(lists) -> list[dict]:
    return load_list(str(lists / "products.csv"), "product")


def by_id(table) -> dict[str, dict]:
    return {r["id"]: r for r in table.to_pylist()}


# ---------------------------------------------------------------------------------------------------
# the product of the lists

def test_products_x_scenes_x_variants(lists):
    scenes = load_list(str(lists / "scenes.csv"), "scene")
    table = expand(TEMPLATE, products(lists), scenes, variants=3)
    assert table.num_rows == 3 * 2 * 3
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    rows = by_id(table)
    row = rows["mug-001--studio--v2"]
    assert row["prompt"] == "a product photo of a red ceramic mug, on a white background in soft studio lighting, high quality"
    assert row["variant"] == 2
    assert row["seed"] == default_seed("mug-001--studio--v2")
    # every (product, scene) pair appears once per variant
    pairs = collections.Counter((r["sku"], r["scene_id"]) for r in rows.values())
    assert len(pairs) == 6 and set(pairs.values()) == {3}
    # a quoted comma in the CSV stays in the prompt
    assert rows["bottle-002--marble--v0"]["prompt"].startswith("a product photo of a green glass bottle, frosted, on a marble")


def test_variants_differ_only_in_seed(lists):
    table = expand("a photo of {product}", products(lists), variants=4)
    rows = [r for r in table.to_pylist() if r["sku"] == "mug-001"]
    assert [r["id"] for r in rows] == [f"mug-001--v{v}" for v in range(4)]
    assert len({r["prompt"] for r in rows}) == 1
    assert len({r["seed"] for r in rows}) == 4


def test_plain_text_scene_list_gives_slugged_ids(lists):
    scenes = load_list(str(lists / "scenes.txt"), "scene")
    assert [s["scene"] for s in scenes] == ["on a beach at golden hour", "in a snowy forest", "on a city street at night"]
    table = expand(TEMPLATE, products(lists), scenes, variants=2)
    assert table.num_rows == 3 * 3 * 2
    rows = by_id(table)
    assert "sneaker-003--on-a-beach-at-golden-hour--v1" in rows
    assert rows["mug-001--in-a-snowy-forest--v0"]["prompt"] == (
        "a product photo of a red ceramic mug, in a snowy forest, high quality")


def test_ids_come_from_a_slug_when_there_is_no_sku():
    # Exact values on purpose: a changed slug rule renames (and redraws) every sku-less catalogue row.
    table = expand("a photo of {product}", [{"product": "A Red Mug!"}, {"product": "Café Crème — 250 ml"}])
    assert table.column("id").to_pylist() == ["a-red-mug--v0", "caf-cr-me-250-ml--v0"]


def test_slug_is_a_safe_id_fragment():
    assert slug("  Hello, World!  ") == "hello-world"
    # nothing left: a hash of the text rather than an empty id (or one `x` for every such product)
    assert slug("製品写真").startswith("x-") and slug("製品写真") == slug(" 製品写真") != slug("陶器のマグ")
    long = slug("word " * 40)
    assert len(long) <= 40 and not long.endswith("-")


def test_every_row_is_a_valid_manifest_row(lists):
    scenes = load_list(str(lists / "scenes.txt"), "scene")
    table = expand(TEMPLATE, products(lists), scenes, variants=2, negative_prompt="blurry, lowres",
                   fixed={"steps": 4, "width": 256, "height": 256, "scheduler": "euler"})
    for i, raw in enumerate(table.to_pylist()):
        parsed, errors, extras = validate_row(raw, source="expanded", row=i, models={"default"})
        assert errors == [], [str(e) for e in errors]
        assert set(extras) == {"sku", "product", "category", "scene", "variant"}


def test_negative_prompt_and_fixed_columns_are_on_every_row(lists):
    table = expand("a photo of {product}", products(lists), variants=2, negative_prompt="blurry, watermark",
                   fixed={"steps": 4, "width": 320, "guidance_scale": 5.5, "model": "catalog"})
    assert set(table.column("negative_prompt").to_pylist()) == {"blurry, watermark"}
    assert set(table.column("steps").to_pylist()) == {4}
    assert set(table.column("width").to_pylist()) == {320}
    assert set(table.column("guidance_scale").to_pylist()) == {5.5}
    assert set(table.column("model").to_pylist()) == {"catalog"}
    assert "height" not in table.column_names  # unset: the model's default applies


def test_product_and_scene_columns_pass_through(lists):
    scenes = load_list(str(lists / "scenes.csv"), "scene")
    row = by_id(expand(TEMPLATE, products(lists), scenes))["sneaker-003--marble--v0"]
    assert (row["sku"], row["product"], row["category"]) == ("sneaker-003", "a white sneaker", "apparel")
    assert (row["scene_id"], row["scene"]) == ("marble", "on a marble table with soft shadows")


def test_other_product_columns_can_be_placeholders(lists):
    table = expand("{product} for the {category} page", products(lists))
    assert by_id(table)["mug-001--v0"]["prompt"] == "a red ceramic mug for the kitchen page"


# ---------------------------------------------------------------------------------------------------
# stability: re-expanding an edited catalogue keeps every unchanged row

def test_adding_a_product_keeps_existing_ids_and_seeds(lists):
    scenes = load_list(str(lists / "scenes.csv"), "scene")
    before = by_id(expand(TEMPLATE, products(lists), scenes, variants=2))
    grown = products(lists)
    grown.insert(1, {"sku": "lamp-009", "product": "a brass desk lamp", "category": "home"})  # in the middle
    after = by_id(expand(TEMPLATE, grown, scenes, variants=2))
    assert set(before) < set(after)
    assert set(after) - set(before) == {f"lamp-009--{s}--v{v}" for s in ("studio", "marble") for v in (0, 1)}
    for rid, row in before.items():
        assert after[rid] == row


def test_slugged_ids_survive_reordering():
    items = [{"product": "a red mug"}, {"product": "a blue vase"}]
    first = by_id(expand("{product}", items, variants=2))
    second = by_id(expand("{product}", items[::-1], variants=2))
    assert first == second


# ---------------------------------------------------------------------------------------------------
# errors say what to change

def test_unknown_placeholder_lists_the_available_ones(lists):
    with pytest.raises(ExpandError) as exc:
        expand("a photo of {product} in {colour}", products(lists))
    message = str(exc.value)
    assert "{colour}" in message
    for name in ("{product}", "{sku}", "{category}"):
        assert name in message


def test_template_without_product_is_an_error(lists):
    scenes = load_list(str(lists / "scenes.csv"), "scene")
    with pytest.raises(ExpandError, match=r"\{product\}"):
        expand("a photo, {scene}", products(lists), scenes)


def test_scenes_without_a_scene_placeholder_is_an_error(lists):
    scenes = load_list(str(lists / "scenes.csv"), "scene")
    with pytest.raises(ExpandError, match=r"\{scene\}"):
        expand("a photo of {product}", products(lists), scenes)


def test_two_products_with_the_same_slug_are_an_error():
    with pytest.raises(ExpandError) as exc:
        expand("{product}", [{"product": "Red Mug"}, {"product": "a blue vase"}, {"product": "red  mug!"}])
    message = str(exc.value)
    assert "row 0 and row 2" in message and "'red-mug'" in message and "sku" in message


def test_two_products_with_the_same_sku_are_an_error():
    with pytest.raises(ExpandError, match="'mug-1'"):
        expand("{product}", [{"sku": "mug-1", "product": "a red mug"}, {"sku": "mug-1", "product": "a blue mug"}])


def test_sku_that_cannot_name_a_file_is_an_error():
    with pytest.raises(ExpandError, match=r"'mug/1'"):
        expand("{product}", [{"sku": "mug/1", "product": "a red mug"}])


@pytest.mark.parametrize("content", ["", "sku,product,category\n"])
def test_empty_products_csv_is_an_error(tmp_path, content):
    path = tmp_path / "products.csv"
    path.write_text(content)
    with pytest.raises(ExpandError, match="holds no rows") as exc:
        load_list(str(path), "product")
    assert str(path) in str(exc.value)


def test_empty_plain_text_list_is_an_error(tmp_path):
    path = tmp_path / "scenes.txt"
    path.write_text("# only a comment\n\n")
    with pytest.raises(ExpandError, match="holds no rows"):
        load_list(str(path), "scene")


def test_missing_products_file_is_an_error(tmp_path):
    with pytest.raises(ExpandError, match=r"^--products \S+nope.csv does not exist$"):
        load_list(str(tmp_path / "nope.csv"), "product")
    # fsspec's HTTP store says a host that does not answer holds no such file: it was "does not exist"
    with pytest.raises(ExpandError, match=r"^--scenes http://127.0.0.1:9/s.csv cannot be read \(\w*Connect"):
        load_list("http://127.0.0.1:9/s.csv", "scene")  # nothing listens on port 9


def test_products_without_a_product_column_are_an_error(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text("sku,name\nmug-1,a red mug\n")
    with pytest.raises(ExpandError, match=r"no `product` column \(columns: sku, name\)"):
        load_list(str(path), "product")


def test_an_empty_product_value_names_its_row(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text("sku,product\nmug-1,a red mug\nmug-2,\n")
    with pytest.raises(ExpandError, match="line 3: `product` is empty"):  # the spreadsheet's line
        load_list(str(path), "product")


def test_an_unquoted_comma_is_an_error_not_a_cut_prompt(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text("sku,product\nmug-1,a red mug, ceramic\n")
    with pytest.raises(ExpandError, match="line 2 has more fields than the header") as exc:
        load_list(str(path), "product")
    assert "ceramic" in str(exc.value)


def test_a_spreadsheet_csv_with_a_byte_order_mark_reads_like_any_other(tmp_path):
    path = tmp_path / "products.csv"
    path.write_bytes("\ufeffsku,product\nmug-1,un café ☕\n".encode("utf-8"))
    rows = load_list(str(path), "product")
    assert rows == [{"sku": "mug-1", "product": "un café ☕"}]
    assert expand("{product}", rows).column("id").to_pylist() == ["mug-1--v0"]


def test_columns_that_would_overwrite_fields_are_an_error():
    with pytest.raises(ExpandError, match="seed"):
        expand("{product}", [{"product": "a red mug", "seed": "7"}])


def test_variants_must_be_at_least_one():
    with pytest.raises(ExpandError, match="--variants"):
        expand("{product}", [{"product": "a red mug"}], variants=0)


def test_an_id_over_128_characters_is_an_error():
    with pytest.raises(ExpandError, match="over 128"):
        expand("{product}", [{"sku": "s" * 126, "product": "a red mug"}])


# ---------------------------------------------------------------------------------------------------
# other list formats and stores

def test_parquet_lists_and_memory_uris_read_and_write(lists):
    fs = fsspec.filesystem("memory")
    write_manifest(pa.Table.from_pylist(products(lists)), "memory://expand-test/in/products.parquet")
    try:
        again = load_list("memory://expand-test/in/products.parquet", "product")
        assert [r["product"] for r in again] == ["a red ceramic mug", "a green glass bottle, frosted", "a white sneaker"]
        write_manifest(expand("{product}", again, variants=2), "memory://expand-test/out/m.parquet")
        assert read_parquet(fs, "/expand-test/out/m.parquet").num_rows == 6
    finally:
        fs.rm("/expand-test", recursive=True)


def test_write_manifest_creates_folders_and_round_trips(lists, tmp_path):
    table = expand("{product}", products(lists), negative_prompt="blurry")
    out = tmp_path / "new" / "folder" / "m.parquet"
    write_manifest(table, str(out))
    assert pq.read_table(out).equals(table)


# -- lists as spreadsheets and exports save them -----------------------------------------------------------

def test_lists_read_as_their_suffix_says_in_any_case_and_unknown_types_are_refused(tmp_path):
    (tmp_path / "p.CSV").write_text("sku,product\nmug-1,a red mug\n")
    (tmp_path / "p.tsv").write_text("sku\tproduct\nmug-1\ta red mug, ceramic\n")
    pq.write_table(pa.table({"sku": ["mug-1"], "product": ["a red mug"]}), tmp_path / "p.PARQUET")
    (tmp_path / "p").write_text("# products for spring\n#1 best-selling red mug\n\n  a blue vase\n")
    assert load_list(str(tmp_path / "p.CSV"), "product") == [{"sku": "mug-1", "product": "a red mug"}]
    assert load_list(str(tmp_path / "p.tsv"), "product") == [{"sku": "mug-1", "product": "a red mug, ceramic"}]
    assert load_list(str(tmp_path / "p.PARQUET"), "product") == [{"sku": "mug-1", "product": "a red mug"}]
    assert load_list(str(tmp_path / "p"), "product") == [{"product": "#1 best-selling red mug"},
                                                         {"product": "a blue vase"}]  # `# ` starts a comment
    (tmp_path / "p.jsonl").write_text('{"product": "a red mug"}\n')
    with pytest.raises(ExpandError, match=r"p.jsonl: a list is read from .csv, .tsv, .parquet or plain text"):
        load_list(str(tmp_path / "p.jsonl"), "product")


def test_csv_encodings_of_spreadsheets_read_or_are_named(tmp_path):
    text = "sku,product\r\nmug-1,a café mug\r\n"
    (tmp_path / "utf16.csv").write_bytes(text.encode("utf-16"))  # Excel's "Unicode text"
    assert load_list(str(tmp_path / "utf16.csv"), "product") == [{"sku": "mug-1", "product": "a café mug"}]
    (tmp_path / "cp1252.csv").write_bytes(text.encode("cp1252"))  # Excel's plain "CSV" on Windows
    with pytest.raises(ExpandError, match=r"cp1252.csv line 2 is not UTF-8 \(byte 0xe9\); save the file as UTF-8"):
        load_list(str(tmp_path / "cp1252.csv"), "product")
    for name, codec in (("le.csv", "utf-16-le"), ("be.csv", "utf-16-be")):  # no byte-order mark: "has no `\x00p..`"
        (tmp_path / name).write_bytes(text.encode(codec))
        with pytest.raises(ExpandError, match=rf"{name} looks like UTF-16 text without its byte-order mark"):
            load_list(str(tmp_path / name), "product")


def test_spreadsheet_margins_short_rows_and_repeated_headers(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("sku,product,category,,\nmug-1,a red mug,kitchen,,\n\nmug-2,a blue mug,kitchen,,\n")
    rows = load_list(str(path), "product")  # the empty columns of the sheet's margin are left out
    assert rows == [{"sku": "mug-1", "product": "a red mug", "category": "kitchen"},
                    {"sku": "mug-2", "product": "a blue mug", "category": "kitchen"}]
    assert rows.where == ["line 2", "line 4"]
    path.write_text("sku,product,category\nmug-1,a red mug\n")
    with pytest.raises(ExpandError, match="line 2 has 2 field\\(s\\) where the header names 3; it has no `category`"):
        load_list(str(path), "product")
    path.write_text("sku,product,sku\nmug-1,a red mug,mug-9\n")
    with pytest.raises(ExpandError, match="the header names `sku` more than once"):
        load_list(str(path), "product")
    path.write_text("sku,product,\nmug-1,a red mug,kitchen\n")
    with pytest.raises(ExpandError, match="column 3 has values but no name"):
        load_list(str(path), "product")


def test_a_gap_in_a_column_the_template_uses_names_its_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("sku,product,colour\nmug-1,a mug,red\nmug-2,a mug,\n")
    with pytest.raises(ExpandError, match="p.csv line 3: `colour` is empty, and the template uses it"):
        expand("a {colour} {product}", load_list(str(path), "product"), products_source=str(path))
    assert expand("a {product}", load_list(str(path), "product")).num_rows == 2  # unused: passes through
    with pytest.raises(ExpandError, match="row 1: `price` is empty"):
        expand("{product} at {price} USD", [{"product": "a", "price": 3}, {"product": "b", "price": None}])
    # NaN (a spreadsheet's empty number cell in Parquet) put "nan" in the prompt: it is a gap too
    for gap in (float("nan"), float("inf"), decimal.Decimal("NaN")):
        with pytest.raises(ExpandError, match="row 1: `price` is empty"):
            expand("{product} at {price} USD", [{"product": "a", "price": 3.5}, {"product": "b", "price": gap}])


def test_product_columns_arrow_reads_back_are_written_whatever_their_values(tmp_path):
    """A uint64 column past int64's range (a hash) ended expand in an OverflowError traceback, even unused."""
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"product": ["a mug", "a vase"], "hash": pa.array([2**64 - 1, 7], pa.uint64()),
                             "tags": [{"k": 1}, {"k": 2}]}), path)
    table = expand("a photo of {product}", load_list(str(path), "product"))
    assert table.column("hash").to_pylist() == [2**64 - 1, 7] and table.column("tags").to_pylist()[0] == {"k": 1}
    assert table.column("seed").type == pa.int64() and table.column("variant").type == pa.int64()


def test_parquet_lists_of_binary_text_and_float_skus_make_the_ids_and_prompts_a_user_expects(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"sku": pa.array([1.0, 2.0]), "product": pa.array([b"a red mug", b"a vase"])}), path)
    table = expand("a photo of {product}", load_list(str(path), "product"))
    assert table.column("id").to_pylist() == ["1--v0", "2--v0"]
    assert table.column("prompt").to_pylist() == ["a photo of a red mug", "a photo of a vase"]


def test_columns_named_with_dots_or_digits_are_placeholders_like_any_other():
    table = expand("{product}, {size.cm} cm, {2024} range", [{"product": "a mug", "size.cm": 9, "2024": "spring"}])
    assert table.column("prompt").to_pylist() == ["a mug, 9 cm, spring range"]


def test_ids_joined_from_fragments_with_dashes_that_meet_are_refused():
    products = [{"sku": "a--b", "product": "a mug"}, {"sku": "a", "product": "a vase"}]
    scenes = [{"scene_id": "c", "scene": "on oak"}, {"scene_id": "b--c", "scene": "on marble"}]
    with pytest.raises(ExpandError, match=r"id 'a--b--c--v0' is made twice: by products row 0 with scenes row 0 "
                                          r"and by products row 1 with scenes row 1"):
        expand("{product} {scene}", products, scenes)


def test_a_long_sku_is_refused_for_its_length():
    with pytest.raises(ExpandError, match="`sku` 'sss.*is 129 characters; an id is at most 128"):
        expand("{product}", [{"sku": "s" * 129, "product": "a red mug"}])


def test_fixed_values_that_need_flags_of_the_run_are_said():
    from manifests.expand import fixed_warnings

    said = fixed_warnings({"width": 128, "height": 128, "model": "sd21"}, ["tiny", "sd21-random"])
    assert said[0].startswith("--model 'sd21' is not a preset (tiny, sd21-random)")
    assert said[1].startswith("every row: 128x128 is too small to carry the watermark") and "--no-watermark" in said[1]
    assert fixed_warnings({"width": 512, "height": 512, "model": "tiny"}, ["tiny"]) == []


def test_a_manifest_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExpandError, match=r"cannot write -o .*afile/m.parquet: "):
        write_manifest(expand("{product}", [{"product": "a mug"}]), str(tmp_path / "afile" / "m.parquet"))


def test_a_written_manifest_is_cut_into_row_groups_that_plan_in_parallel(tmp_path, monkeypatch):
    """pyarrow's default row group is a million rows: a million-row catalogue was one plan task (~90 s, ~5 GB)."""
    import pyarrow.parquet as pq

    import manifests.expand

    monkeypatch.setattr(manifests.expand, "ROW_GROUP_ROWS", 4)
    table = pa.table({"id": [f"r{i}" for i in range(10)], "prompt": ["a mug"] * 10})
    write_manifest(table, str(tmp_path / "m.parquet"))
    meta = pq.ParquetFile(tmp_path / "m.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [4, 4, 2]


# ---------------------------------------------------------------------------------------------------
# spreadsheet exports as catalogue teams make them (QA, 2026-12-07)

@pytest.mark.parametrize("header", ["SKU,Product", "Sku ,PRODUCT", "\ufeff\ufeffsku,product"])
def test_the_columns_expand_reads_are_found_whatever_their_case_or_a_second_byte_order_mark(tmp_path, header):
    """`SKU` (or a file saved twice, `\\ufeffsku`) was passed through as another column, and the ids were made
    from the product's text: they changed whenever its wording was edited, and every row was drawn again."""
    path = tmp_path / "products.csv"
    path.write_bytes(f"{header},Category\nmug-001,a red mug,kitchen\n".encode("utf-8-sig"))
    rows = load_list(str(path), "product")
    assert rows == [{"sku": "mug-001", "product": "a red mug", "Category": "kitchen"}]
    assert expand("{product} for {Category}", rows).column("id").to_pylist() == ["mug-001--v0"]
    scenes = tmp_path / "scenes.tsv"
    scenes.write_text("Scene_ID\tScene\nstudio\ton white\n")
    assert load_list(str(scenes), "scene") == [{"scene_id": "studio", "scene": "on white"}]


def test_a_column_named_twice_but_for_its_case_is_refused(tmp_path):
    path = tmp_path / "products.csv"
    path.write_text("sku,SKU,product\na,b,a red mug\n")
    with pytest.raises(ExpandError, match=r"products.csv: the header names `sku` and `SKU`"):
        load_list(str(path), "product")


@pytest.mark.parametrize("name, data, said", [
    ("products.txt", "sku\tproduct\r\nmug-001\ta red mug\r\n".encode("utf-16"),
     r"products.txt line 1 holds tabs: a .txt or suffix-less list is read as one `product` per line"),
    ("products", b"sku,product,category\nmug-001,a red mug,kitchen\n",
     r"products line 1 reads as a CSV header \('sku,product,category'\): a .txt or suffix-less list is read as"),
    # a one-column CSV that lost its suffix: its header became a product named "product", drawn every night
    ("products", b"Product\nred star\nblue circle\n", r"products line 1 reads as a CSV header \('Product'\)"),
    ("scenes", b'"scene"\non white\n', r"scenes line 1 reads as a CSV header \('\"scene\"'\)"),
])
def test_a_table_saved_as_plain_text_is_refused_not_read_as_one_product_per_line(tmp_path, name, data, said):
    """Excel's 'Unicode Text' (.txt, tab-separated) or a CSV without its suffix: each line, the header too,
    became a product, and whole tab-joined rows became prompts, exit 0."""
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ExpandError, match=said):
        load_list(str(tmp_path / name), "scene" if name == "scenes" else "product")
    (tmp_path / "fine.txt").write_text("a red mug, ceramic\na product shot\n")  # commas in a product are fine
    assert len(load_list(str(tmp_path / "fine.txt"), "product")) == 2


@pytest.mark.parametrize("text", ["sku;product;category\nmug-001;a red mug, large;kitchen\n",
                                  "sku;product\nmug-001;a red mug\n"])
def test_a_semicolon_separated_csv_is_named_as_such(tmp_path, text):
    """A spreadsheet's CSV in many European locales: it was refused as 'quote values that contain commas', or
    as having no `product` column."""
    (tmp_path / "products.csv").write_text(text)
    with pytest.raises(ExpandError, match=r"products.csv: its header line is separated by semicolons"):
        load_list(str(tmp_path / "products.csv"), "product")


def test_a_row_without_the_sku_the_other_rows_have_is_refused_naming_its_line(tmp_path):
    """Its id was made from the product's text without a word: it changed whenever the text was edited."""
    path = tmp_path / "products.csv"
    path.write_text("sku,product\nmug-001,a red mug\n,a green bottle\n")
    rows = load_list(str(path), "product")
    with pytest.raises(ExpandError, match=r"products.csv line 3: `sku` is empty where other rows have one"):
        expand("{product}", rows, products_source=str(path))


def test_an_id_over_128_characters_names_the_rows_that_make_it(tmp_path):
    with pytest.raises(ExpandError, match=r"products row 0 with scenes row 1 make the id .*, 136 characters: over 128"):
        expand("{product} {scene}", [{"sku": "s" * 100, "product": "a red mug"}],
               [{"scene_id": "a", "scene": "x"}, {"scene_id": "b" * 30, "scene": "y"}])


def test_a_control_character_the_template_would_put_in_a_prompt_names_its_line(tmp_path):
    """A product pasted with a terminal's colour code (or a NUL of a binary export) made rows that every run then
    refused as invalid; expand names the line at once. Tabs are whitespace, and pass."""
    path = tmp_path / "p.csv"
    path.write_text("sku,product,note\nmug-1,a red\x1b[31m mug,ok\nmug-2,a blue\tmug,\x07\n")
    with pytest.raises(ExpandError, match=r"p.csv line 2: `product` holds control character U\+001B \(character 6\)"):
        expand("a photo of {product}", load_list(str(path), "product"), products_source=str(path))
    rows = load_list(str(path), "product")[1:]
    assert expand("a photo of {product}", rows).num_rows == 1  # (note's bell, unused: passes through)
    with pytest.raises(ExpandError, match=r"--template holds control character U\+0000"):
        expand("a photo of {product}\x00", rows)
    with pytest.raises(ExpandError, match=r"--negative holds control character U\+0007"):
        expand("a photo of {product}", rows, negative_prompt="blurry\x07")
