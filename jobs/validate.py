"""What `sdfleet manifest validate --adapters URI` says of the adapters rows name: what `generate`'s plan would
find, before a run. The manifest's own fields are checked by `manifests.validate`; this reads the adapter store
(each named adapter's header and bytes, as the driver does) and checks each valid row against it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from jobs.plan import adapter_failures, unlisted_embedding, unused_embeddings


@dataclass
class AdapterCheck:
    """The adapters the manifests name, resolved as `generate` resolves them, and the rows that name each bad one.

    `row` yields a row's own problems (a prompt using an embedding's token it does not list: invalid; an
    embedding listed but unused: a warning) and counts the rows each unusable adapter would fail; `failures`
    yields one error per such adapter, with how many rows name it and where the first is, not one per row (a
    missing adapter of a catalogue is thousands of rows, each saying the same).
    """

    errors: dict[str, str]  # adapter name -> why it cannot be used
    tokens: dict[str, str]  # token -> the embedding that adds it
    words: dict[str, frozenset[str]]  # model name -> the tokens that are words of its tokenizer
    named_by: dict[str, list] = field(default_factory=dict)  # failure -> [rows, where the first is]

    @classmethod
    def resolve(cls, store_uri: str | None, names: set[str], models: dict[str, dict]) -> "AdapterCheck":
        """Raises RunFailed where the store cannot be read at all (as `generate` stops there)."""
        from jobs.generate import resolve_adapters, words_of_models

        tokens: dict[str, str] = {}
        _, errors = resolve_adapters(store_uri, names, tokens)
        return cls(errors, tokens, words_of_models(tokens, models) if tokens else {})

    def row(self, parsed, where: str) -> Iterator[tuple[str, str]]:
        words = self.words.get(parsed.model, frozenset())
        if unlisted := unlisted_embedding(parsed, self.tokens, words):
            yield "error", f"{where}: {unlisted}"
            return
        for failure in adapter_failures(parsed, self.errors, self.tokens, words):
            self.named_by.setdefault(failure, [0, where])[0] += 1
        if unused := unused_embeddings(parsed, self.tokens):
            yield "warning", f"{where}: {unused}"

    def failures(self) -> Iterator[tuple[str, str]]:
        for failure, (rows, first) in self.named_by.items():
            yield "error", f"{failure} ({rows} row(s) would fail on it; the first: {first})"
