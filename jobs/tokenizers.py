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

            return CLIPTokenizer.from_pretrained(folder)
        return load_tokenizer(TOKENIZER_DIR)

    return lookup
