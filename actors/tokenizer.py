"""A CLIP byte-level BPE tokenizer built offline, for the built-in presets.

No tokenizer can be downloaded on the dev machines, so the presets carry one this module builds: CLIP's
byte alphabet (every UTF-8 byte has a token, so any prompt, emoji included, tokenizes), plus one merge
chain per word of a small English vocabulary so common words are single tokens. The format is CLIP's own
(vocab.json + merges.txt), so `CLIPTokenizer` loads it like Stable Diffusion's.

Rebuild the committed files with `python -m actors.tokenizer actors/presets/tiny/tokenizer`.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# SD 2.x pads with "!" (id 0), SD 1.x with EOS; the presets follow SD 2.x.
PAD = "!"
MAX_LENGTH = 77

# Words that become single tokens (every other word still tokenizes, byte by byte). The first group is the synthetic product-shot world the `tiny` model
# is trained on; the rest covers the example manifests and everyday prompt vocabulary.
WORDS = """
a an the on of in with and at by for to from over under
red green blue yellow orange purple white gray grey black pink brown gold silver
circle square triangle star background
photo photograph product shot studio lighting soft light shadow shadows detailed high quality
sharp focus professional catalog render minimal clean plain bokeh
bottle mug sneaker sneakers watch lamp chair backpack headphones perfume vase
kitchen beach forest desk marble table street night city snow garden cafe
portrait character knight robot cat dog woman man girl boy wearing holding standing sitting
blurry lowres low ugly deformed watermark text cropped noise
style painting oil watercolor sketch cinematic realistic
""".split()


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """Map every byte to a printable unicode character, as CLIP's BPE does.

    Printable latin-1 bytes map to themselves; the others (control characters, space) are shifted past
    255 so that no token contains whitespace or an unprintable character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping  # insertion order (printable first) is CLIP's vocabulary order


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """BPE as the tokenizer runs it: merge the adjacent pair with the lowest rank until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_vocab_and_merges(words: list[str] = WORDS) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) in CLIP's format, with every word of `words` a single token.

    Each word is first tokenized with the merges so far; whatever pieces remain are joined left to right
    by new merges appended at the end. Later merges rank after earlier ones and every earlier word is
    already one token, so adding a word never changes how an earlier word tokenizes. Deterministic.
    """
    to_char = byte_alphabet()
    alphabet = list(to_char.values())
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):  # keep order, drop repeats
        symbols = [to_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        pieces = _apply_merges(symbols, ranks)
        current = pieces[0]
        for nxt in pieces[1:]:
            ranks[(current, nxt)] = len(ranks)
            current += nxt
    merges = [f"{a} {b}" for a, b in ranks]
    # CLIP's layout: the byte alphabet, the alphabet as word ends, one token per merge, then specials.
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + [a + b for a, b in ranks] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def write_tokenizer_files(directory: str | Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer config into `directory`."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,  # must be explicit when built from raw files (transformers 5)
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": PAD,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_tokenizer(directory: str | Path):
    """Load a CLIP tokenizer from a folder holding vocab.json and merges.txt."""
    from transformers import CLIPTokenizer

    directory = Path(directory)
    return CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
    )


def known_word(tokenizer, token: str) -> bool:
    """Whether `token` is already a word of the tokenizer: in its vocabulary, or read as one known token (CLIP
    spells "star" as "star</w>", so the vocabulary alone misses it). Adding such a word as a new token would
    change every prompt that uses it, and split longer words ("tired" -> "t i red"). No torch: the generate
    driver asks it too."""
    return token in tokenizer.get_vocab() or len(tokenizer(token, add_special_tokens=False).input_ids) == 1


if __name__ == "__main__":
    write_tokenizer_files(sys.argv[1])
