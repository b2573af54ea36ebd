"""`sdfleet manifest expand`: a prompt template x products x scenes x variants -> a manifest.

The seed article's two use cases: product shots (one template, a catalogue of products, a negative
prompt, several seeds each) and scene variations of one character (one "product", many scenes).
Ids are built from the products' `sku` (or a slug of the name), the scene and the variant number, so
they are stable: re-expanding an edited catalogue keeps every unchanged row's id, seed and hash.
"""

from __future__ import annotations

import codecs
import decimal
import functools
import hashlib
import io
import math
import posixpath
import re
import string
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from manifests.csv_text import CsvProblem, csv_records
from manifests.schema import (FIELDS, ID_PATTERN, control_character, default_seed, error_line, quoted,
                              too_small_for_the_mark, validate_row)
from manifests.ledger import atomic_write, extra_array
from manifests.stores import gone_at_exit_reason, missing, process_local, read_parquet, require_bucket, url_to_fs


class ExpandError(ValueError):
    """The template or a list cannot make a valid manifest; the message says what to change."""


def slug(text: str, limit: int = 40) -> str:
    """A lowercase id fragment: runs of anything but a-z, 0-9 become one '-'. Text with none of those (a name in
    another script) is `x-` and a hash of it: two such products made the same `x` and were refused."""
    made = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return made or "x-" + hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:10]


# What a products or scenes list is read as, by its file name's suffix (any case); no suffix is plain text.
LIST_TYPES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "text", "": "text"}


class ListRows(list):
    """The rows of a products or scenes list (dicts), with where each is in its file (`line 6`, `row 3`), as
    messages name it: a spreadsheet's line numbers, not positions among the rows that were kept."""

    def __init__(self, rows: list[dict[str, Any]], where: list[str]):
        super().__init__(rows)
        self.where = where


def _where(rows: list[dict[str, Any]], i: int) -> str:
    """Where row `i` is in its file; its position for rows made in code (or a ListRows changed since)."""
    return rows.where[i] if isinstance(rows, ListRows) and len(rows.where) == len(rows) else f"row {i}"


def load_list(uri: str, column: str) -> ListRows:
    """Rows of a CSV, TSV, Parquet or plain-text list (one `column` value per line; lines starting with `# `
    are comments). Text is UTF-8 (with or without a byte-order mark) or UTF-16 with one."""
    fs, path = url_to_fs(uri)
    suffix = posixpath.splitext(posixpath.basename(path))[1].lower()
    kind = LIST_TYPES.get(suffix)
    try:
        if missing(fs, path):
            raise ExpandError(f"--{column}s {uri} does not exist")
        if fs.isdir(path):
            raise ExpandError(f"{uri} is a folder; give the list's file")
        if kind is None:
            raise ExpandError(f"{uri}: a list is read from .csv, .tsv, .parquet or plain text (.txt, or no suffix: "
                              f"one `{column}` per line), not {suffix} (a spreadsheet saves CSV as 'CSV UTF-8')")
        if kind == "parquet":
            try:
                table = read_parquet(fs, path)
            except pa.ArrowException as exc:  # ArrowInvalid: not Parquet, or cut short
                raise ExpandError(f"{uri} is not a readable Parquet file ({error_line(exc)}); write it again as "
                                  "Parquet, or give the list as CSV") from exc
        else:
            data = fs.cat_file(path)
    except ExpandError:
        raise
    except Exception as exc:  # noqa: BLE001 - credentials refused, a store that does not answer
        raise ExpandError(f"--{column}s {uri} cannot be read ({error_line(exc)})") from exc
    if kind == "parquet":
        # text read as bytes and decoded by _decoded, so a value that is not UTF-8 is named, not a traceback
        table = pa.table([column.cast(_AS_BYTES[column.type]) if column.type in _AS_BYTES else column
                          for column in table.columns], names=table.column_names)
        rows = ListRows([{k: _decoded(v, uri, f"row {i}", k) for k, v in row.items()}
                         for i, row in enumerate(table.to_pylist())], [f"row {i}" for i in range(table.num_rows)])
    else:
        text = _text(data, uri)
        rows = _read_text_table(text, uri, kind) if kind != "text" else _read_lines(text, column, uri)
    if not rows:
        raise ExpandError(f"{uri} holds no rows")
    _name_own_columns(rows, column, uri)
    if column not in rows[0]:
        raise ExpandError(f"{uri} has no `{column}` column (columns: {', '.join(rows[0])})")
    for i, row in enumerate(rows):
        if not str(row.get(column) or "").strip():
            raise ExpandError(f"{uri} {_where(rows, i)}: `{column}` is empty")
    return rows


# The columns expand reads itself in a products or scenes list: the values, and the id fragments
OWN_COLUMNS = {"product": ("product", "sku"), "scene": ("scene", "scene_id")}


def _name_own_columns(rows: ListRows, column: str, uri: str) -> None:
    """Name the columns expand reads (`product` and `sku`, or `scene` and `scene_id`) as it reads them, whatever
    their case and surrounding spaces, and a byte-order mark left on the first (a file saved twice): `SKU` was
    passed through as another column and the ids made from the product's text, which change when it is edited.
    Other columns keep their names (a template names them)."""
    names = list(rows[0])
    renamed = {}
    for name in names:
        clean = name.lstrip("\ufeff").strip()
        renamed[name] = clean.casefold() if clean.casefold() in OWN_COLUMNS[column] else clean
    final = list(renamed.values())
    if twice := [name for name in names if final.count(renamed[name]) > 1]:
        raise ExpandError(f"{uri}: the header names {' and '.join(f'`{n}`' for n in twice)}, one column under two "
                          "names (expand reads them without telling case apart); keep one")
    if final != names:
        rows[:] = [{renamed[k]: v for k, v in row.items()} for row in rows]


def _text(data: bytes, uri: str) -> str:
    """A list file's text: UTF-16 where it starts with its byte-order mark, else UTF-8 (a BOM is dropped)."""
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        if (head := data[:4096]) and head.count(b"\x00") * 4 > len(head):  # a NUL in over a quarter of the bytes
            # UTF-16 without its byte-order mark decodes as UTF-8 full of NULs: "has no `\x00p\x00r...`"
            raise ExpandError(f"{uri} looks like UTF-16 text without its byte-order mark (a NUL byte beside every "
                              "letter); save the file as UTF-8 (a spreadsheet's 'CSV UTF-8')")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ExpandError(f"{uri} line {line} is not UTF-8 (byte {data[exc.start]:#04x}); save the file as UTF-8 "
                          "(a spreadsheet's 'CSV UTF-8')") from exc


_AS_BYTES = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}


def _decoded(value: Any, uri: str, where: str, column: str) -> Any:
    """A Parquet cell as a prompt would hold it: binary as its UTF-8 text."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ExpandError(f"{uri} {where}: `{column}` is not UTF-8 text (bytes {value[:40]!r}); write the list's "
                          "text as UTF-8") from exc


def _read_text_table(text: str, uri: str, kind: str) -> ListRows:
    """The rows of a CSV or TSV: the first line names the columns; blank lines are skipped."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if kind == "csv" and ";" in first and "," not in first:  # read as one column, or cut at a comma in a value
        raise ExpandError(f"{uri}: its header line is separated by semicolons ({quoted(first, 80)}), as a "
                          "spreadsheet writes CSV in many locales; save it as 'CSV UTF-8' (comma-separated), or "
                          "tab-separated as a .tsv")
    try:
        header, records = csv_records(text, delimiter="\t" if kind == "tsv" else ",")
    except CsvProblem as exc:
        hint = ", which a list may not hold (remove it from the cell, or drop the column)" if exc.runs_on else ""
        raise ExpandError(f"{uri} {exc}{hint}") from exc
    lines = [f"line {n}" for n, _ in records]
    values = [fields for _, fields in records]
    for fields, line in zip(values, lines):
        if len(fields) < len(header):
            raise ExpandError(f"{uri} {line} has {len(fields)} field(s) where the header names {len(header)}; "
                              f"it has no {', '.join(f'`{h}`' for h in header[len(fields):])}")
    keep = []
    for index, name in enumerate(header):
        if name.strip():
            keep.append(index)
        elif any(row[index].strip() for row in values):  # an empty header over empty cells: a spreadsheet's margin
            raise ExpandError(f"{uri}: column {index + 1} has values but no name in the header line; name it")
    names = [header[i].strip() for i in keep]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ExpandError(f"{uri}: the header names {', '.join(f'`{n}`' for n in twice)} more than once; a column's "
                          "values would be lost")
    return ListRows([{name: row[i] for name, i in zip(names, keep)} for row in values], lines)


def _read_lines(text: str, column: str, uri: str) -> ListRows:
    """One `column` value per line. A table saved as plain text is refused: its header would be a product, and
    each row one prompt (a spreadsheet's 'Unicode Text' is tab-separated; a CSV may lose its suffix)."""
    rows, lines = [], []
    plain = f"a .txt or suffix-less list is read as one `{column}` per line"
    for number, line in enumerate(text.splitlines(), 1):
        value = line.strip()
        if value and value != "#" and not value.startswith("# "):
            if "\t" in value:
                raise ExpandError(f"{uri} line {number} holds tabs: {plain}, and this is a table (a spreadsheet's "
                                  "'Unicode Text' is tab-separated); name it .tsv")
            cells = [cell.strip().strip('"').strip().casefold() for cell in value.split(",")]
            if not rows and column in cells:  # (alone: a one-column CSV, its header would be a product)
                raise ExpandError(f"{uri} line {number} reads as a CSV header ({quoted(value, 80)}): {plain}; "
                                  "name it .csv")
            rows.append({column: value})
            lines.append(f"line {number}")
    return ListRows(rows, lines)


def template_fields(template: str) -> set[str]:
    """The placeholder names of `template`; ExpandError for a stray brace or a placeholder with a conversion
    or format spec (`{product!r}`, `{product:>20}` would put Python's repr or padding into the prompt)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ExpandError(f"--template {quoted(template)}: {exc}; a placeholder is {{column}}, "
                          "a literal brace is written {{ or }}") from exc
    fields = set()
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if conversion or spec:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ExpandError(f"--template placeholder {shown} has a conversion or format spec, which would put "
                              f"Python's formatting into the prompt; write it as {{{name}}}")
        fields.add(name)
    return fields


# the fixed-value flags of `manifest expand`, by the manifest field each sets
FIXED_FLAGS = {"steps": "--steps", "width": "--width", "height": "--height", "guidance_scale": "--guidance-scale",
               "scheduler": "--scheduler", "model": "--model"}


def check_fixed(fixed: dict[str, Any]) -> None:
    """ExpandError naming every fixed value (set on every row) that the row schema refuses. What depends on the
    run (the watermark, the `--model` names it gives) is for `fixed_warnings` to say."""
    _, errors, _ = validate_row({"id": "x", "prompt": "x", **fixed}, source="--flags", row=0)
    if errors:
        raise ExpandError("; ".join(f"{FIXED_FLAGS.get(e.field, e.field)} {e.reason}, got {quoted(e.value)}"
                                    for e in errors))


def fixed_warnings(fixed: dict[str, Any], presets: list[str]) -> list[str]:
    """What the fixed values ask of the run that draws the manifest: every row would be invalid without it."""
    said = []
    model = fixed.get("model")
    if model is not None and model not in presets and model != "default":
        said.append(f"--model {model!r} is not a preset ({', '.join(presets)}): generate and validate need "
                    f"--model {model}=REF (a diffusers folder or URI), or every row is invalid")
    if fixed.get("width") and fixed.get("height"):
        too_small = too_small_for_the_mark(fixed["width"], fixed["height"])
        if too_small:
            said.append(f"every row: {too_small}")
    return said


def check_output(uri: str, force: bool = False) -> None:
    """ExpandError unless `uri` can take the manifest: a .parquet name, and not an existing file unless `force`."""
    if not uri.lower().endswith(".parquet"):
        raise ExpandError(f"-o {quoted(uri)}: a manifest is written as Parquet; give a path or URI ending in .parquet")
    if process_local(uri):
        raise ExpandError(gone_at_exit_reason("-o", uri, "the manifest"))
    fs, path = url_to_fs(uri)
    try:
        require_bucket(fs, path, "-o", uri, ExpandError)  # s3fs and gcsfs would make a bucket named by a typo
        folder, there = fs.isdir(path), fs.exists(path)
    except ExpandError:
        raise
    except Exception as exc:  # noqa: BLE001 - credentials refused, a store that does not answer
        raise ExpandError(f"-o {uri} cannot be reached ({error_line(exc)})") from exc
    if folder:
        raise ExpandError(f"-o {uri} is a folder; give a .parquet file to write")
    if there and not force:
        raise ExpandError(f"-o {uri} already exists; pass --force to overwrite it, or give another path")


def _keys(rows: list[dict], column: str, id_column: str, source: str) -> list[str]:
    """Id fragments per row: the `id_column` value when present, else a slug of `column`; unique. Where some
    rows have an `id_column` value, all must: a row without one would get an id from its text, which changes
    when the text is edited (and the row is drawn again)."""
    given = [not (r.get(id_column) is None or _not_a_number(r[id_column]) or not str(r[id_column]).strip())
             for r in rows]
    if any(given) and not all(given):
        i = given.index(False)
        raise ExpandError(f"{source} {_where(rows, i)}: `{id_column}` is empty where other rows have one; fill it "
                          f"in (an id made from the row's text would change whenever the text is edited)")
    keys = [_key_text(r[id_column]) if ok else slug(str(r[column])) for r, ok in zip(rows, given)]
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if len(key) > 128:
            raise ExpandError(f"{source} {_where(rows, i)}: `{id_column}` {quoted(key, 40)} is {len(key)} characters; "
                              "an id is at most 128")
        if not ID_PATTERN.match(key):
            raise ExpandError(f"{source} {_where(rows, i)}: `{id_column}` {key!r} may only hold A-Z a-z 0-9 . _ -")
        if key in seen:
            raise ExpandError(f"{source} {_where(rows, seen[key])} and {_where(rows, i)} both make the id fragment "
                              f"{key!r}; give them distinct `{id_column}` values")
        seen[key] = i
    return keys


def _key_text(value: Any) -> str:
    """An `sku`/`scene_id` cell as text: 1.0 as 1 (a spreadsheet column of numbers with gaps is read as floats)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class _ColumnFormatter(string.Formatter):
    """str.format where a placeholder is a whole column name: `{size.cm}` and `{2024}` are columns, not an
    attribute of `size` or the 2025th positional argument."""

    def get_field(self, field_name, args, kwargs):
        return kwargs[field_name], field_name


def _fill(template: str, values: dict[str, Any]) -> str:
    return _ColumnFormatter().vformat(template, (), values)


def expand(
    template: str,
    products: list[dict[str, Any]],
    scenes: list[dict[str, Any]] | None = None,
    *,
    variants: int = 1,
    negative_prompt: str = "",
    fixed: dict[str, Any] | None = None,
    products_source: str = "products",
    scenes_source: str = "scenes",
) -> pa.Table:
    """Build the manifest table; `fixed` columns (steps, width, ...) are set on every row."""
    if variants < 1:
        raise ExpandError(f"--variants must be at least 1, got {variants}")
    rows_out = len(products) * len(scenes or [None]) * variants
    if rows_out > MAX_ROWS:  # every row is built in memory before it is written: 10^8 of them took 24 GB and died
        raise ExpandError(f"{len(products)} product(s) x {len(scenes or [None])} scene(s) x {variants} variant(s) "
                          f"would be {rows_out:,} rows, more than one manifest holds here ({MAX_ROWS:,}); split the "
                          "products into several lists and expand each into its own manifest (generate reads them "
                          "together)")
    for flag, text in (("--template", template), ("--negative", negative_prompt)):
        if problem := control_character(text):
            raise ExpandError(f"{flag} {problem}")
    fields = template_fields(template)
    check_fixed(fixed or {})
    available = set(products[0]) | (set(scenes[0]) if scenes else set())
    unknown = sorted(f for f in fields if f not in available)
    if unknown:
        raise ExpandError(f"template placeholder(s) {', '.join('{' + u + '}' for u in unknown)} match no column; "
                          f"available: {', '.join('{' + a + '}' for a in sorted(available))}")
    if "product" not in fields:
        raise ExpandError("the template must use {product}")
    if scenes and "scene" not in fields:
        raise ExpandError("scenes were given but the template has no {scene}")
    clashing = sorted(available & (set(FIELDS) | {"variant"}))  # `variant` is the variant number expand writes
    if clashing:
        raise ExpandError(f"product/scene column(s) {', '.join(clashing)} would overwrite manifest fields; rename them")
    shared = sorted(set(products[0]) & set(scenes[0])) if scenes else []
    if shared:  # the manifest has one column of each name: the scene's values would be lost without a word
        raise ExpandError(f"{products_source} and {scenes_source} both have column(s) {', '.join(shared)}; rename "
                          "them in one of the two (a manifest keeps one column of each name)")
    for rows, source in ((products, products_source), (scenes or [], scenes_source)):
        for i, row in enumerate(rows):  # a gap would leave "None" or a double space in the prompt
            for name in sorted(fields & set(row)):
                if row[name] is None or not str(row[name]).strip() or _not_a_number(row[name]):
                    raise ExpandError(f"{source} {_where(rows, i)}: `{name}` is empty, and the template uses it; "
                                      "fill it in, or leave the placeholder out")
                if not isinstance(row[name], (str, int, float, decimal.Decimal)):  # a list's repr in a prompt
                    raise ExpandError(f"{source} {_where(rows, i)}: `{name}` holds a {type(row[name]).__name__}, "
                                      "and the template puts it in a prompt; give it text or a number")
                if isinstance(row[name], str) and (problem := control_character(row[name])):
                    raise ExpandError(f"{source} {_where(rows, i)}: `{name}` {problem}, and the template puts it in "
                                      "a prompt")
    product_keys = _keys(products, "product", "sku", products_source)
    scene_keys = _keys(scenes, "scene", "scene_id", scenes_source) if scenes else [None]
    rows, made = [], {}
    origin = functools.partial(_origin, products_source, products, scenes_source, scenes)
    for p, (product, pkey) in enumerate(zip(products, product_keys)):
        for s, (scene, skey) in enumerate(zip(scenes or [{}], scene_keys)):
            for v in range(variants):
                row_id = "--".join(k for k in (pkey, skey, f"v{v}") if k)
                if len(row_id) > 128:
                    raise ExpandError(f"{origin(p, s)} make the id {quoted(row_id, 60)}, {len(row_id)} characters: "
                                      "over 128; use shorter `sku`/`scene_id` values")
                if row_id in made:  # `a--b` x `c` and `a` x `b--c`: fragments joined by `--` can meet
                    raise ExpandError(f"id {row_id!r} is made twice: by {origin(*made[row_id])} and by "
                                      f"{origin(p, s)}; give `sku`/`scene_id` values without `--` in them")
                made[row_id] = (p, s)  # named only if another row makes the same id
                values = {**scene, **product}
                rows.append({
                    "id": row_id,
                    "prompt": _fill(template, values),
                    "negative_prompt": negative_prompt,
                    "seed": default_seed(row_id),
                    **(fixed or {}),
                    **values,  # the product's and scene's own columns pass through to the ledger
                    "variant": v,
                })
    # column by column: a uint64 column past int64's range (or values of two types) is kept, not a traceback
    return pa.table({name: extra_array([row.get(name) for row in rows]) for name in dict.fromkeys(rows[0])})


def _not_a_number(value: Any) -> bool:
    """NaN or infinity (a spreadsheet's empty number cell, read from Parquet): "nan" in a prompt is a gap too."""
    if isinstance(value, decimal.Decimal):
        return not value.is_finite()
    return isinstance(value, float) and not math.isfinite(value)


def _origin(products_source: str, products: list, scenes_source: str, scenes: list | None, p: int, s: int) -> str:
    said = f"{products_source} {_where(products, p)}"
    return f"{said} with {scenes_source} {_where(scenes, s)}" if scenes else said


# The most rows one expand writes: its rows are held in memory as they are built (~1 KB each).
MAX_ROWS = 5_000_000

# Rows per row group of a written manifest: a row group is the most a plan task reads, so pyarrow's default (a
# million rows) made a million-row catalogue one task of ~90 s; row groups of this size plan in parallel.
ROW_GROUP_ROWS = 65_536


def write_manifest(table: pa.Table, uri: str) -> None:
    fs, path = url_to_fs(uri)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS)
    try:  # whole or not at all: with --force a failed write would otherwise leave half of a manifest in its place
        fs.makedirs(fs._parent(path), exist_ok=True)
        atomic_write(fs, path, buf.getvalue())
    except Exception as exc:  # noqa: BLE001 - a parent that is a file, a read-only store, refused credentials
        raise ExpandError(f"cannot write -o {uri}: {error_line(exc)}") from exc
