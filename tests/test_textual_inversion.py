"""Textual Inversion's pieces (actors.textual_inversion), without Ray: the new token trains alone, and
what the trainer writes means the same thing once the adapter store loads it into a generation pipeline.
The end-to-end `sdfleet finetune textual-inversion` run is in tests/test_finetune.py."""

from __future__ import annotations

import pytest
import torch

from actors.adapter_cache import AdapterCache
from actors.adapters import AdapterStore
from actors.presets import build_preset
from actors.textual_inversion import (NewTokens, TextualInversionError, add_placeholder, expand_placeholders,
                                      save_embedding)


def hidden(pipe, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def test_old_words_are_unchanged_and_only_the_new_vectors_train():
    pipe = build_preset("tiny")
    prompt = "a red star on a white background"
    with torch.no_grad():
        before = hidden(pipe, prompt)
    count = add_placeholder(pipe, "<gem>", "star", vectors=2)
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    assert count == 2 * width
    trainable = [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("token_embedding.extra")
    with torch.no_grad():
        torch.testing.assert_close(hidden(pipe, prompt), before, rtol=0, atol=0)  # old words: untouched
    # both vectors start at the init word's embedding, and the tokens take the ids after the table
    table = pipe.text_encoder.get_input_embeddings()
    star = pipe.tokenizer("star", add_special_tokens=False).input_ids[0]
    assert isinstance(table, NewTokens) and torch.equal(table.extra[1], table.base.weight[star])
    assert pipe.tokenizer.convert_tokens_to_ids(["<gem>", "<gem>_1"]) == [table.base.num_embeddings,
                                                                           table.base.num_embeddings + 1]
    # a caption with the token trains its vectors, and nothing else gets a gradient
    caption = expand_placeholders("a <gem> on a black background", pipe.tokenizer)
    assert caption == "a <gem> <gem>_1 on a black background"
    hidden(pipe, caption).pow(2).mean().backward()
    assert table.extra.grad is not None and table.extra.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in pipe.text_encoder.named_parameters() if not n.endswith(".extra"))


def test_what_the_trainer_writes_loads_from_the_store_and_means_the_same(tmp_path):
    trained = build_preset("tiny")
    add_placeholder(trained, "<gem>", "circle", vectors=2)
    with torch.no_grad():
        noise = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
        trained.text_encoder.get_input_embeddings().extra.add_(noise)
    path = save_embedding(trained.text_encoder, "<gem>", tmp_path / "store" / "gem")
    assert path.name == "learned_embeds.safetensors"

    store = AdapterStore(str(tmp_path / "store"))
    info = store.resolve("gem")
    assert (info.kind, info.token) == ("embedding", "<gem>") and store.names() == ["gem"]
    cache = AdapterCache(build_preset("tiny"), store)
    cache.activate([{"name": "gem", "scale": 1.0, "fingerprint": None}])
    prompt = "a <gem> on a gray background"
    with torch.no_grad():
        # generation expands the token through diffusers' own prompt conversion; training, through ours
        got = cache.pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        want = hidden(trained, expand_placeholders(prompt, trained.tokenizer))
    torch.testing.assert_close(got, want)
    plain = build_preset("tiny")  # and diffusers' own loader reads the file as trained (docs/fine-tuning.md)
    plain.load_textual_inversion(str(path))
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_prompt(prompt, "cpu", 1, False)[0], want)


@pytest.mark.parametrize("token, written", [("<gem>", "<GEM>"), ("<Gem>", "<Gem>"), ("<Gem>", "<gem>")])
def test_a_multi_vector_token_draws_with_all_its_vectors_whatever_its_case(tmp_path, token, written):
    """CLIP's tokenizer reads added tokens in any case, but diffusers spells a multi-vector token out only
    where the prompt writes it as loaded: `<GEM>` for `<gem>`, or a mixed-case token such as A1111's
    `EasyNegative` even written exactly, drew with the first vector alone."""
    from actors.generate import spelled_as_loaded

    trained = build_preset("tiny")
    add_placeholder(trained, token, "circle", vectors=2)
    with torch.no_grad():
        trained.text_encoder.get_input_embeddings().extra.add_(torch.randn(2, 64, generator=torch.Generator()
                                                                           .manual_seed(5)))
    save_embedding(trained.text_encoder, token, tmp_path / "store" / "gem")
    cache = AdapterCache(build_preset("tiny"), AdapterStore(str(tmp_path / "store")))
    cache.activate([{"name": "gem", "scale": 1.0, "fingerprint": None}])
    with torch.no_grad():
        want = hidden(trained, expand_placeholders(f"a {token} on a gray background", trained.tokenizer))
        prompt = spelled_as_loaded(cache.pipe, f"a {written} on a gray background")
        torch.testing.assert_close(cache.pipe.encode_prompt(prompt, "cpu", 1, False)[0], want)


@pytest.mark.parametrize("token", ["<gem>", "<Gem>"])
def test_training_reads_a_multi_vector_token_in_any_case_and_validation_draws_all_its_vectors(token):
    """The trainer's side of the case rule: a caption writing `<gem>` for `--token <Gem>` trained the first
    vector alone (the tokenizer read it, our expansion did not), and the validation images, drawn through
    diffusers' prompt conversion, spelled a capitalised token out nowhere."""
    from actors.generate import spelled_as_loaded

    trained = build_preset("tiny")
    add_placeholder(trained, token, "circle", vectors=2)
    with torch.no_grad():
        trained.text_encoder.get_input_embeddings().extra.add_(torch.randn(2, 64, generator=torch.Generator()
                                                                           .manual_seed(7)))
        all_vectors = hidden(trained, f"a {token.lower()} {token.lower()}_1 on a gray background")
        first_only = hidden(trained, f"a {token.lower()} on a gray background")
        assert not torch.allclose(all_vectors, first_only)
        for written in ("<gem>", "<Gem>", "<GEM>"):
            prompt = f"a {written} on a gray background"
            torch.testing.assert_close(hidden(trained, expand_placeholders(prompt, trained.tokenizer)), all_vectors)
            validation = trained.encode_prompt(spelled_as_loaded(trained, prompt), "cpu", 1, False)[0]
            torch.testing.assert_close(validation, all_vectors)


@pytest.mark.parametrize("token, init_word, message", [
    ("star", None, "'star' is already a word of this model's tokenizer"),
    ("<gem>", "shiny stone", "--init-word 'shiny stone' is"),
])
def test_a_token_that_exists_or_a_long_init_word_is_refused(token, init_word, message):
    pipe = build_preset("tiny")
    with pytest.raises(TextualInversionError, match=message):
        add_placeholder(pipe, token, init_word)
    assert not isinstance(pipe.text_encoder.get_input_embeddings(), NewTokens)  # nothing half-done
