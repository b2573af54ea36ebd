"""What `sdfleet manifest validate --adapters URI` says of the adapters rows name: what `generate`'s plan would
find, before a run. The manifest's own fields are checked by `manifests.validate`; this reads the adapter store
(each named adapter's header and bytes, as the driver does) and checks each valid row against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from jobs.errors import RunFailed
from jobs.plan import adapter_failures, unlisted_embedding, unused_embeddings


@dataclass
class AdapterCheck:
    """The adapters the manifests name, resolved as `generate` resolves them, and the rows that name each bad one.

    `row` yields a row's own problems (a prompt using an embedding's token it does not list: invalid; an
    embedding listed but unused: a warning) and counts the rows each unusable adapter would fail; `failures`
    yields one error per such adapter, with how many rows name it and where the first is, not one per row (a
    missing adapter of a catalogue is thousands of rows, each saying the same). Without a store (`store_uri`
    None) it only counts the adapters rows would load, for the summary to say they went unchecked.
    """

    store_uri: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # adapter name -> why it cannot be used
    tokens: dict[str, str] = field(default_factory=dict)  # token -> the embedding that adds it
    words: dict[str, frozenset[str]] = field(default_factory=dict)  # model -> tokens that are words of its tokenizer
    resolved: set[str] = field(default_factory=set)  # the names the store was asked about
    named_by: dict[str, list] = field(default_factory=dict)  # failure -> [rows, where the first is]
    unchecked: dict[str, list] = field(default_factory=dict)  # a name not asked about yet -> [rows, first]
    widths: dict[str, dict] = field(default_factory=dict)  # adapter name -> the widths it needs of a model
    models: dict[str, dict] = field(default_factory=dict)  # model name -> its ModelInfo fields

    @classmethod
    def resolve(cls, store_uri: str, names: set[str], loaded: set[str], models: dict[str, dict]) -> "AdapterCheck":
        """`names`: those the manifests give (a damaged file's may be missing: asked about at the end); `loaded`:
        those a row lists at a scale other than 0. Raises RunFailed where the store cannot be read at all (as
        `generate` stops there)."""
        from jobs.generate import resolve_adapters, words_of_models

        tokens: dict[str, str] = {}
        widths: dict[str, dict] = {}
        errors = resolve_adapters(store_uri, names, tokens, loaded, widths)[1] if names else {}
        return cls(store_uri, errors, tokens, words_of_models(tokens, models) if tokens else {}, set(names),
                   widths=widths, models=models)

    def row(self, parsed, where: str) -> Iterator[tuple[str, str]]:
        for a in parsed.adapters:  # (at scale 0 an adapter loads nothing: nothing to check)
            if a.scale != 0 and a.name not in self.resolved:
                self.unchecked.setdefault(a.name, [0, where])[0] += 1
        if self.store_uri is None:
            return
        words = self.words.get(parsed.model, frozenset())
        if unlisted := unlisted_embedding(parsed, self.tokens, words):
            yield "error", f"{where}: {unlisted}"
            return
        for failure in adapter_failures(parsed, self.errors, self.tokens, words, self.widths,
                                        self.models.get(parsed.model)):
            self.named_by.setdefault(failure, [0, where])[0] += 1
        if unused := unused_embeddings(parsed, self.tokens):
            yield "warning", f"{where}: {unused}"

    def failures(self) -> Iterator[tuple[str, str]]:
        if self.store_uri is not None and self.unchecked:  # rows whose names the first read missed: asked now
            from jobs.generate import resolve_adapters

            try:
                errors = resolve_adapters(self.store_uri, set(self.unchecked))[1]  # (no widths: those rows are gone)
            except RunFailed:  # the store went away meanwhile: they stay unchecked, and the summary says so
                errors = None
            if errors is not None:
                for name, (rows, first) in self.unchecked.items():
                    if name in errors:
                        self.named_by.setdefault(errors[name], [0, first])[0] += rows
                self.resolved |= set(self.unchecked)
                self.unchecked.clear()
        for failure, (rows, first) in self.named_by.items():
            yield "error", f"{failure} ({rows} row(s) would fail on it; the first: {first})"

    def why_unchecked(self) -> str | None:
        """Why some adapters rows load went unchecked, for the summary line; None if none did."""
        if not self.unchecked:
            return None
        return "give --adapters URI" if self.store_uri is None else "the adapter store could not be read"
