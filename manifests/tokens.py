"""CLIP's 77-token window: tell users which words of a prompt the model never sees."""

from __future__ import annotations

from manifests.schema import quoted


READ_CHARS = 8_192  # the most of a prompt tokenized to find where the window ends


def prompt_overflow(tokenizer, prompt: str) -> str | None:
    """A warning naming the cut-off words when `prompt` is longer than the tokenizer's window, else None.

    `tokenizer` is any Hugging Face tokenizer; two of the window's tokens are the start and end markers.
    """
    room = tokenizer.model_max_length - 2
    # A CLIP token is a few characters: the window ends long before READ_CHARS, and a 10 MB prompt took 16 s
    # and 1.8 GB to tokenize whole.
    read = prompt[:READ_CHARS]
    ids = tokenizer(read, add_special_tokens=False, truncation=False, verbose=False).input_ids  # we say it ourselves
    if len(ids) <= room:
        return None
    start = room
    while start > 0 and tokenizer.decode(ids[start:]).startswith("\ufffd"):  # the cut fell inside a character
        start -= 1  # (an emoji is several byte tokens): name the whole character, as far as it is cut
    cut = tokenizer.decode(ids[start:]).strip()
    tokens = f"{len(ids) + 2} CLIP tokens"
    size = tokens if len(prompt) <= READ_CHARS else f"{len(prompt):,} characters, over {tokens}"
    return (f"prompt is {size}, over the {tokenizer.model_max_length} the model reads; these words are cut off: "
            f"{quoted(cut)}")
