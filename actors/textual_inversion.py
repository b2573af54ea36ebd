"""Textual Inversion: new words for the text encoder, learned as embedding vectors, the rest frozen.

`sdfleet finetune textual-inversion --token '<gem>'` adds the token to the tokenizer and trains only its
vectors. The vectors live in their own small parameter (`NewTokens.extra`) beside the frozen embedding
table, not as new rows of it: the optimizer, checkpoints and weight decay then see only what trains,
so a checkpoint of an SD 2.1 run is a few KB, not the 200 MB table.

The result is `--out/learned_embeds.safetensors`, `{token: (vectors, width)}`, the file layout of
diffusers' own textual-inversion script; the adapter store loads it by the folder name, and prompts
call it by its token. With several vectors, the tokens are `token`, `token_1`, `token_2`, ... as
diffusers' `load_textual_inversion` expects, and the prompt names only `token`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from actors.adapters import EMBEDDING_FILE  # the store's folder layout for an embedding
from actors.tokenizer import known_word


class TextualInversionError(ValueError):
    """A token or init word that cannot be used (the message says what would)."""


class NewTokens(torch.nn.Module):
    """The text encoder's token embedding with `extra` rows appended: ids below the table's size read the
    frozen table, the ones after it read `extra` (trainable)."""

    def __init__(self, base: torch.nn.Embedding, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.extra = torch.nn.Parameter(init.detach().clone())

    @property
    def weight(self) -> torch.Tensor:  # what transformers and diffusers read as the embedding table
        return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)])

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.extra.shape[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Looked up apart, not from `weight`: a lookup in the concatenated table would give the whole
        # table a dense gradient at every step (200 MB for SD 2.1's) only to keep the new rows of it.
        size = self.base.num_embeddings
        new = input_ids >= size
        old_rows = self.base(input_ids.clamp(max=size - 1))
        new_rows = F.embedding((input_ids - size).clamp(min=0), self.extra.to(old_rows.dtype))
        return torch.where(new.unsqueeze(-1), new_rows, old_rows)


def placeholder_tokens(token: str, vectors: int) -> list[str]:
    """The tokens of a `vectors`-vector embedding, spelled as diffusers' loader spells them."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def check_placeholder(tokenizer, token: str, init_word: str | None, vectors: int = 1) -> int | None:
    """Raise TextualInversionError unless `token` (and its extra vector tokens) are new words and
    `init_word` is one token; returns the init word's id (None without one). Needs only the tokenizer, so
    `finetune` runs it before any worker starts."""
    clash = [t for t in placeholder_tokens(token, vectors) if known_word(tokenizer, t)]
    if clash:
        raise TextualInversionError(f"--token {token!r}: {clash[0]!r} is already a word of this model's tokenizer; "
                                    "pick a new one, such as <my-object>")
    if init_word is None:
        return None
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise TextualInversionError(f"--init-word {init_word!r} is {len(ids)} tokens for this tokenizer; "
                                    "give a word that is one token (a common noun, say)")
    return ids[0]


def add_placeholder(pipe, token: str, init_word: str | None, vectors: int = 1) -> int:
    """Give `pipe` the new `token` (and its extra vector tokens) with trainable vectors, each starting
    from the embedding of `init_word` (a single token of the vocabulary) or, without one, the mean of
    the table. Freezes everything else. Returns the trainable parameter count. The tokens are added in lower
    case, as the generation actors load embeddings: CLIP's tokenizer reads them in any case, but diffusers spells
    a multi-vector token out into its vectors only where it finds the token as added (validation images drew
    `<Gem>` with its first vector alone)."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    token = token.lower()
    init_id = check_placeholder(tokenizer, token, init_word, vectors)
    table = text_encoder.get_input_embeddings()
    if len(tokenizer) != table.num_embeddings:
        raise TextualInversionError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder "
                                    f"{table.num_embeddings} embeddings; new tokens would not line up")
    init = table.weight.detach().mean(0) if init_id is None else table.weight.detach()[init_id]
    tokens = placeholder_tokens(token, vectors)
    tokenizer.add_tokens(tokens)
    assert tokenizer.convert_tokens_to_ids(tokens) == list(range(table.num_embeddings, table.num_embeddings + vectors))
    text_encoder.requires_grad_(False)
    text_encoder.set_input_embeddings(NewTokens(table, init.expand(vectors, -1)))
    return vectors * table.embedding_dim


def embedding_state_dict(text_encoder, token: str) -> dict[str, torch.Tensor]:
    """The trained vectors as `{token: (vectors, width)}` in fp32."""
    new = text_encoder.get_input_embeddings()
    if not isinstance(new, NewTokens):
        raise TextualInversionError("this text encoder has no trained tokens (add_placeholder was not called)")
    return {token: new.extra.detach().to("cpu", torch.float32).contiguous()}


def save_embedding(text_encoder, token: str, directory: str | Path) -> Path:
    """Write `directory/learned_embeds.safetensors` (the store's folder layout); returns the file."""
    from safetensors.torch import save_file

    path = Path(directory) / EMBEDDING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(embedding_state_dict(text_encoder, token), str(path))
    return path


def expand_placeholders(text: str, tokenizer) -> str:
    """`text` with each multi-vector token spelled out (`<gem>` -> `<gem> <gem>_1 <gem>_2`), as diffusers'
    pipelines do before tokenizing; training captions must be expanded the same way, the token written in any
    case (the tokenizer reads it so). Text without such tokens comes back unchanged."""
    import re

    added = tokenizer.get_added_vocab()
    for token in added:
        if f"{token}_1" not in added or token.lower() not in text.lower():
            continue
        extra = 1
        while f"{token}_{extra + 1}" in added:
            extra += 1
        spelled = " ".join(placeholder_tokens(token, extra + 1))
        text = re.sub(re.escape(token) + r"(?!_\d)", lambda _: spelled, text, flags=re.IGNORECASE)
    return text
