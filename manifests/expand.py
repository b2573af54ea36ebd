"""`sdfleet manifest expand`: a prompt template x products x scenes x variants -> a manifest.

The seed article's two use cases: product shots (one template, a catalogue of products, a negative
prompt, several seeds each) and scene variations of one character (one "product", many scenes).
Ids are built from the products' `sku` (or a slug of the name), the scene and the variant number, so
they are stable: re-expanding an edited catalogue keeps every unchanged row's id, seed and hash.
"""

from __future__ import annotations

import csv
import io
import re
import string
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from manifests.schema import FIELDS, ID_PATTERN, default_seed, quoted, validate_row
from manifests.stores import read_parquet


class ExpandError(ValueError):
    """The template or a list cannot make a valid manifest; the message says what to change."""


def slug(text: str, limit: int = 40) -> str:
    """A lowercase id fragment: runs of anything but a-z, 0-9 become one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "x"


def load_list(uri: str, column: str) -> list[dict[str, Any]]:
    """Rows of a CSV, Parquet or plain-text list (one `column` value per line)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise ExpandError(f"{uri} does not exist")
    if path.endswith(".parquet"):
        rows = read_parquet(fs, path).to_pylist()
    elif path.endswith(".csv"):
        # utf-8-sig: spreadsheets save CSV with a byte-order mark, which would rename the first column.
        with fs.open(path, "r", encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        for i, row in enumerate(rows):
            if None in row:  # csv puts fields beyond the header under None: an unquoted comma cut a value
                raise ExpandError(f"{uri} row {i} has more fields than the header, {row[None]!r} left over; "
                                  f"quote values that contain commas")
    else:
        with fs.open(path, "r", encoding="utf-8-sig") as f:
            rows = [{column: line.strip()} for line in f if line.strip() and not line.startswith("#")]
    if not rows:
        raise ExpandError(f"{uri} holds no rows")
    if column not in rows[0]:
        raise ExpandError(f"{uri} has no `{column}` column (columns: {', '.join(rows[0])})")
    for i, row in enumerate(rows):
        if not str(row.get(column) or "").strip():
            raise ExpandError(f"{uri} row {i}: `{column}` is empty")
    return rows


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
    """ExpandError naming every fixed value (set on every row) that the row schema refuses, so a manifest that
    `manifest validate` would reject on every row is never written."""
    _, errors, _ = validate_row({"id": "x", "prompt": "x", **fixed}, source="--flags", row=0)
    if errors:
        raise ExpandError("; ".join(f"{FIXED_FLAGS.get(e.field, e.field)} {e.reason}, got {quoted(e.value)}"
                                    for e in errors))


def check_output(uri: str, force: bool = False) -> None:
    """ExpandError unless `uri` can take the manifest: a .parquet name, and not an existing file unless `force`."""
    if not uri.lower().endswith(".parquet"):
        raise ExpandError(f"-o {quoted(uri)}: a manifest is written as Parquet; give a path or URI ending in .parquet")
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.isdir(path):
        raise ExpandError(f"-o {uri} is a folder; give a .parquet file to write")
    if fs.exists(path) and not force:
        raise ExpandError(f"-o {uri} already exists; pass --force to overwrite it, or give another path")


def _keys(rows: list[dict], column: str, id_column: str, source: str) -> list[str]:
    """Id fragments per row: the `id_column` value when present, else a slug of `column`; unique."""
    keys = [str(r[id_column]) if r.get(id_column) not in (None, "") else slug(str(r[column])) for r in rows]
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if not ID_PATTERN.match(key):
            raise ExpandError(f"{source} row {i}: `{id_column}` {key!r} may only hold A-Z a-z 0-9 . _ -")
        if key in seen:
            raise ExpandError(f"{source} rows {seen[key]} and {i} both make the id fragment {key!r}; "
                              f"give them distinct `{id_column}` values")
        seen[key] = i
    return keys


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
    product_keys = _keys(products, "product", "sku", products_source)
    scene_keys = _keys(scenes, "scene", "scene_id", scenes_source) if scenes else [None]
    rows = []
    for product, pkey in zip(products, product_keys):
        for scene, skey in zip(scenes or [{}], scene_keys):
            for v in range(variants):
                row_id = "--".join(k for k in (pkey, skey, f"v{v}") if k)
                if len(row_id) > 128:
                    raise ExpandError(f"id {row_id!r} is over 128 characters; use shorter `sku`/`scene_id` values")
                values = {**scene, **product}
                rows.append({
                    "id": row_id,
                    "prompt": template.format(**values),
                    "negative_prompt": negative_prompt,
                    "seed": default_seed(row_id),
                    **(fixed or {}),
                    **values,  # the product's and scene's own columns pass through to the ledger
                    "variant": v,
                })
    return pa.Table.from_pylist(rows)


def write_manifest(table: pa.Table, uri: str) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, buf.getvalue())
