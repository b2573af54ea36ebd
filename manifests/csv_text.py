"""Strict CSV reading, shared by `manifest expand` (products and scenes lists) and `dataset build` (captions).

Python's csv module, left lenient, reads a stray or unclosed double quote as the start of one long value
that swallows the lines after it: products or captions lost without a word. Here that is refused, naming
the line, and so is any value that runs over several lines (a prompt or a caption is one line).
"""

from __future__ import annotations

import csv
import io

from manifests.schema import quoted


class CsvProblem(ValueError):
    """What is wrong with a CSV, starting with the line it is on (`line 3: ...`); the caller names the file.
    `runs_on`: a value ran over several lines (the caller says what its values may not hold)."""

    def __init__(self, message: str, runs_on: bool = False):
        super().__init__(message)
        self.runs_on = runs_on


def csv_records(text: str, delimiter: str = ",") -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header line's fields, and each record after it as (its line number, its fields); blank lines are
    left out. Raises CsvProblem for a quote that is stray or never closed, for a value that runs on over
    several lines, and for a record with more fields than the header (an unquoted comma)."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[tuple[int, list[str]]] = []
    ended = 0  # the line the last record ended on
    try:
        header = next(reader, [])
        ended = reader.line_num
        for fields in reader:
            started, ended = ended + 1, reader.line_num
            if ended > started:  # only a quoted value holds a line break: most often a quote left open
                value = next((f for f in fields if "\n" in f or "\r" in f), "")
                raise CsvProblem(f"line {started}: a value runs on over {ended - started + 1} lines "
                                 f"({quoted(value, 80)}); an opening quote is not closed, or a value holds a line "
                                 "break", runs_on=True)
            if not any(field.strip() for field in fields):
                continue
            if len(fields) > len(header):  # an unquoted comma cut a value: its end would be dropped
                raise CsvProblem(f"line {started} has more fields than the header, {fields[len(header):]!r} left "
                                 "over; quote values that contain commas")
            records.append((started, fields))
    except csv.Error as exc:
        raise CsvProblem(f"line {ended + 1}: {exc}: a stray or unclosed double quote (quote a whole value, and "
                         "double each quote inside one)") from exc
    return header, records
