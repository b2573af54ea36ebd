"""Tokenizers for counting prompt tokens on the driver, one per model, loaded on first use."""

from __future__ import annotations

import functools
from pathlib import Path


def tokenizer_lookup(infos: dict):
    """A function model name -> tokenizer: the model's own for presets and local directories.

    Remote models (URIs, hub ids) are counted with the presets' tokenizer rather than downloaded.
    """
    from actors.presets import TOKENIZER_DIR
    from actors.tokenizer import load_tokenizer

    @functools.cache
    def lookup(name: str):
        info = infos[name]
        folder = Path(info.ref.removeprefix("file://")) / "tokenizer"
        if info.kind == "directory" and folder.is_dir():
            from transformers import CLIPTokenizer

            from actors.models import ModelError
            from manifests.schema import error_line

            try:
                return CLIPTokenizer.from_pretrained(folder)
            except Exception as exc:  # noqa: BLE001 - damaged JSON, a missing vocabulary: many kinds
                raise ModelError(f"model {name}={info.ref}: its tokenizer ({folder}) does not load "
                                 f"({error_line(exc)}); the model would not load either: export or copy it "
                                 "again") from exc
        return load_tokenizer(TOKENIZER_DIR)

    return lookup
