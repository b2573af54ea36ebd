"""`sdfleet manifest validate`: every problem of every row, streamed, without drawing anything."""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Iterator

from manifests.reader import Unreadable, column_names, count_ids, iter_rows
from manifests.tokens import prompt_overflow
from manifests.schema import (REQUIRED, ManifestRow, coerced_id, look_alike_columns, look_alike_warning, row_location,
                              too_small_for_the_mark, validate_row)


def check_manifests(
    uris: list[str], models: set[str], tokenizer_for: Callable[[str], object] | None = None,
    watermark_sizes: dict[str, tuple[int, int]] | None = None, checked: list[int] | None = None,
    row_checks: Callable[[ManifestRow, str], Iterable[tuple[str, str]]] | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield ("error" | "warning", message) for every problem, in manifest order.

    Errors make a row invalid (generate will not draw it); warnings (a prompt over CLIP's window) do not.
    `tokenizer_for(model_name)` returns the tokenizer used to count a row's prompt tokens, or None where the
    model's own cannot be had (its prompts are then not counted, said once). With
    `watermark_sizes` (model name -> its native width, height) a row too small to carry the watermark is an
    error, as `generate` finds it when the mark is on. `checked[0]` counts the rows checked so far (for a
    caller's progress line). `row_checks(row, where)` yields more problems of each row whose own fields are
    valid and whose id is its own (the caller's: what `generate` would find in its adapters).
    """
    absent: dict[str, set[str]] = {}  # uri -> the required columns it lacks: said once, not once per row
    for uri, columns in column_names(uris).items():
        for column, field in look_alike_columns(columns).items():
            yield "warning", look_alike_warning(uri, column, field, columns)
        if lacks := [field for field in REQUIRED if field not in columns]:
            absent[uri] = set(lacks)
            yield "error", (f"{uri}: no {' or '.join(f'`{f}` column' for f in lacks)}, which every manifest needs: "
                            "none of its rows can be drawn")
    _, id_counts = count_ids(uris, skip_damaged=True)  # a damaged row group is said below, as its rows are read
    said = None

    @functools.lru_cache(maxsize=65536)  # an expanded catalogue repeats each prompt once per variant
    def overflow(model: str, prompt: str) -> str | None:
        return prompt_overflow(tokenizer_for(model), prompt)

    uncounted: set[str] = set()
    first_of: dict[str, tuple[str, int]] = {}  # a repeated id -> where its first row is (named in the others')

    for uri, position, raw in iter_rows(uris):
        if checked is not None:
            checked[0] += 1
        if isinstance(raw, Unreadable):  # a damaged row group: one error for its rows, then the next
            if raw.error != said:
                for problem in raw.problems or (raw.error,):  # (a row's fields that cannot be read: a line each)
                    yield "error", problem
            said = raw.error
            continue
        parsed, errors, _ = validate_row(raw, source=uri, row=position, models=models)
        for err in errors:
            if not (err.missing and err.field in absent.get(uri, ())):  # (said for the file above)
                yield "error", str(err)
        if parsed is None:  # its id is still one of a duplicate pair: said now, not in a second round of fixes
            row_id = coerced_id(raw.get("id"))
            if row_id is not None and id_counts[row_id] > 1:
                yield "error", duplicate_id(row_location(uri, position, row_id), id_counts[row_id],
                                            _first(first_of, row_id, uri, position))
            continue
        where = row_location(uri, position, parsed.id)
        if watermark_sizes is not None and parsed.model in watermark_sizes:
            native_width, native_height = watermark_sizes[parsed.model]
            too_small = too_small_for_the_mark(parsed.width or native_width, parsed.height or native_height)
            if too_small:
                yield "error", f"{where}: {too_small}"
        if id_counts[parsed.id] > 1:
            yield "error", duplicate_id(where, id_counts[parsed.id], _first(first_of, parsed.id, uri, position))
        if tokenizer_for is not None and tokenizer_for(parsed.model) is None:
            if parsed.model not in uncounted:
                uncounted.add(parsed.model)
                yield "warning", (f"model {parsed.model!r}: its tokenizer could not be fetched, so its rows' prompts "
                                  "are not checked against CLIP's 77-token window (generate still warns in the ledger)")
        elif tokenizer_for is not None:
            warning = (overflow(parsed.model, parsed.prompt) if len(parsed.prompt) <= 1024 else  # the cache keeps
                       prompt_overflow(tokenizer_for(parsed.model), parsed.prompt))  # what it is given
            if warning:
                yield "warning", f"{where}: {warning}"
        if row_checks is not None and id_counts[parsed.id] <= 1:  # (a repeated id: not drawn, whatever else)
            yield from row_checks(parsed, where)


def duplicate_id(where: str, count: int, first: tuple[str, int] | None = None) -> str:
    """The error for a row whose id `count` rows have; `first`: where the first of them is (file, row), for
    the others' messages, so the two can be found in an export of millions of rows."""
    also = f" (the first: {first[0]} row {first[1]})" if first else ""
    return f"{where}: `id` appears in {count} rows{also}; ids must be unique across the run's manifests"


def _first(first_of: dict[str, tuple[str, int]], row_id: str, uri: str, position: int) -> tuple[str, int] | None:
    """Where the first row of `row_id` is, noted at that row (None there: it is that row)."""
    first = first_of.setdefault(row_id, (uri, position))
    return None if first == (uri, position) else first
