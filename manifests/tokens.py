"""CLIP's 77-token window: tell users which words of a prompt the model never sees."""

from __future__ import annotations

import re

from manifests.schema import quoted


READ_CHARS = 8_192  # the most of a prompt tokenized to find where the window ends


def prompt_overflow(tokenizer, prompt: str) -> str | None:
    """A warning naming the cut-off words when `prompt` is longer than the tokenizer's window, else None.

    `tokenizer` is any Hugging Face tokenizer; two of the window's tokens are the start and end markers. The
    words are quoted as the prompt writes them, from the first one the window ends in: decoded from tokens they
    read as CLIP splits them (`word16` as 'word 1 6', an emoji cut into bytes).
    """
    room = tokenizer.model_max_length - 2
    # A CLIP token is a few characters: the window ends long before READ_CHARS, and a 10 MB prompt took 16 s
    # and 1.8 GB to tokenize whole.
    read = prompt[:READ_CHARS]
    ids = tokenizer(read, add_special_tokens=False, truncation=False, verbose=False).input_ids  # we say it ourselves
    if len(ids) <= room:
        return None
    cut = prompt[_first_cut_word(tokenizer, read, room):].strip()
    tokens = f"{len(ids) + 2} CLIP tokens"
    size = tokens if len(prompt) <= READ_CHARS else f"{len(prompt):,} characters, over {tokens}"
    return (f"prompt is {size}, over the {tokenizer.model_max_length} the model reads; these words are cut off: "
            f"{quoted(cut)}")


def _first_cut_word(tokenizer, text: str, room: int) -> int:
    """Where in `text` the word starts that the window of `room` tokens ends in (or before). Words, split at
    white space, are tokenized apart as CLIP does (its pre-tokenizer never joins two), in one call: the first
    `room + 1` of them hold the end, since each is at least a token."""
    starts = [m.start() for m in re.finditer(r"\S+", text)][:room + 1]
    words = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    counts = tokenizer(words, add_special_tokens=False, truncation=False, verbose=False).input_ids
    used = 0
    for start, ids in zip(starts, counts):
        used += len(ids)
        if used > room:
            return start
    return starts[-1] if starts else 0  # (a tokenizer that joins words: the last one read)
