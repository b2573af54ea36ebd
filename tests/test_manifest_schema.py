"""The manifest row contract (DESIGN.md "Manifest row"): what validate rejects and how it says so, the
defaults a row is resolved with, the stable default seed, `params_hash`, and the 77-token warning.

Plain functions only: no Ray, no model weights.
"""

from __future__ import annotations

import math

import pytest

from manifests.schema import (
    SCHEDULER_NAMES, ManifestRow, default_seed, params_hash, resolve_row, validate_row,
)
from manifests.tokens import prompt_overflow

MODELS = {"default", "tiny", "sd21-random"}
# What resolve_row needs to know about a model (actors.models.ModelInfo.defaults() has these keys).
TINY = {"fingerprint": "preset:tiny:0123456789abcdef", "width": 256, "height": 256, "steps": 20, "scheduler": "ddim"}


def row(**fields) -> dict:
    return {"id": "sku-88", "prompt": "a red mug on a white background", **fields}


def errors_of(raw: dict, *, position: int = 17, models: set[str] | None = MODELS) -> list:
    parsed, errors, _ = validate_row(raw, source="catalog.parquet", row=position, models=models)
    assert parsed is None, f"{raw!r} should be rejected"
    assert errors, "a rejected row must say why"
    return errors


def only_error(raw: dict, **kw):
    errors = errors_of(raw, **kw)
    assert len(errors) == 1, [str(e) for e in errors]
    return errors[0]


# ---------------------------------------------------------------------------------------------------
# bad rows: every message names the row, the id, the field, the value and what would be valid

BAD_VALUES = [
    # (field, value, what the message must say would be valid)
    ("width", 770, "multiple of 8 in 64..2048"),
    ("width", 4000, "multiple of 8 in 64..2048"),
    ("width", 63, "multiple of 8 in 64..2048"),
    ("height", 2056, "multiple of 8 in 64..2048"),
    ("height", 0, "multiple of 8 in 64..2048"),
    ("guidance_scale", math.nan, "finite number >= 0"),
    ("guidance_scale", math.inf, "finite number >= 0"),
    ("guidance_scale", -math.inf, "finite number >= 0"),
    ("guidance_scale", -0.5, "finite number >= 0"),
    ("steps", -3, "1..500"),
    ("steps", 0, "1..500"),
    ("steps", 501, "1..500"),
    ("seed", -1, "0 <= seed < 2**63"),
    ("seed", 2**63, "0 <= seed < 2**63"),
    ("seed", 2**64 - 1, "0 <= seed < 2**63"),
]


@pytest.mark.parametrize("field,value,valid", BAD_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_VALUES])
def test_bad_value_is_named_with_row_id_field_value_and_rule(field, value, valid):
    err = only_error(row(**{field: value}))
    assert (err.source, err.row, err.id, err.field) == ("catalog.parquet", 17, "sku-88", field)
    assert not err.missing
    text = str(err)
    assert text.startswith("catalog.parquet row 17 (`sku-88`): ")
    assert f"`{field}`" in text
    assert f"got {value!r}" in text
    assert valid in text


def test_the_design_example_message_reads_as_documented():
    err = only_error(row(width=770))
    assert str(err) == "catalog.parquet row 17 (`sku-88`): `width` must be a multiple of 8 in 64..2048, got 770"


@pytest.mark.parametrize("size", [64, 72, 768, 2048])
def test_sizes_on_the_boundaries_are_valid(size):
    parsed, errors, _ = validate_row(row(width=size, height=size), source="m", row=0, models=MODELS)
    assert errors == [] and parsed.width == parsed.height == size


@pytest.mark.parametrize("field,value", [("steps", 1), ("steps", 500), ("seed", 0), ("seed", 2**63 - 1),
                                         ("guidance_scale", 0.0), ("guidance_scale", 30)])
def test_values_on_the_boundaries_are_valid(field, value):
    parsed, errors, _ = validate_row(row(**{field: value}), source="m", row=0, models=MODELS)
    assert errors == [] and getattr(parsed, field) == value


def test_decimal_columns_are_numbers_and_whole_decimals_are_integers():
    """A database's export stores numbers as decimals: `decimal(10, 0)` steps are whole numbers, a decimal
    guidance scale a number; a decimal with a fraction is refused in an integer field, as a float is."""
    from decimal import Decimal

    parsed, errors, _ = validate_row(row(steps=Decimal("25"), guidance_scale=Decimal("7.50"), seed=Decimal("42")),
                                     source="m", row=0, models=MODELS)
    assert errors == [] and (parsed.steps, parsed.guidance_scale, parsed.seed) == (25, 7.5, 42)
    assert type(parsed.steps) is int and type(parsed.guidance_scale) is float
    for bad in (Decimal("25.0"), Decimal("25.5"), Decimal("NaN")):
        assert only_error(row(steps=bad)).field == "steps"
    assert only_error(row(guidance_scale=Decimal("NaN"))).field == "guidance_scale"
    # 5.00 of a decimal(10, 2) column is whole: the reason is the column's scale, not the value
    assert "a decimal one with no digits after the point (scale 0); this one keeps 2" in only_error(
        row(seed=Decimal("5.00"))).reason


def test_wrong_shapes_are_said_in_the_manifests_terms_not_the_codes():
    """`adapters` as a list of names said "should be a valid dictionary or instance of AdapterRef" (a class of
    ours); an id column of numbers did not say to store it as text."""
    adapters = only_error(row(adapters=["brand"]))
    assert adapters.field == "adapters.0" and "AdapterRef" not in adapters.reason
    assert adapters.reason.startswith("should be a struct of `name` (text) and `scale` (a number)")
    assert only_error(row(id=1.0)).reason == "should be a valid string (store the `id` column as text)"


BAD_IDS = ["../x", "a/b", "a\\b", ".", "..", "x" * 129, "", "sku 1", "sku-1\n", "produit-café"]


@pytest.mark.parametrize("bad_id", BAD_IDS, ids=repr)
def test_unsafe_or_overlong_ids_are_rejected(bad_id):
    err = only_error(row(id=bad_id))
    assert err.field == "id" and err.value == bad_id
    text = str(err)
    assert f"got {bad_id!r}" in text
    assert "1-128 characters of A-Z a-z 0-9 . _ -" in text and "not . or .." in text


def test_a_row_with_a_newline_in_its_id_is_named_on_one_line():
    parsed, errors, _ = validate_row(row(id="sku-1\nsku-2", steps=0), source="m", row=0, models=MODELS)  # 2 errors
    assert len(errors) == 2 and all("\n" not in str(e) for e in errors), [str(e) for e in errors]
    assert all(str(e).startswith("m row 0 (`sku-1\\nsku-2`)") for e in errors)
    # only what would forge or hide a line is written out: accents stay as the user wrote them (the terminal's rule)
    _, errors, _ = validate_row(row(id="caf\u00e9\u202e-1\u2029x", steps=0), source="m", row=0, models=MODELS)
    assert all(str(e).startswith("m row 0 (`caf\u00e9\\u202e-1\\u2029x`)") for e in errors), [str(e) for e in errors]
    assert all(len(str(e).splitlines()) == 1 for e in errors)  # U+2029 splits a line for str.splitlines


@pytest.mark.parametrize("good_id", ["x" * 128, "a", "SKU_88.v2-final", "..a", "a.."])
def test_safe_ids_are_valid(good_id):
    parsed, errors, _ = validate_row(row(id=good_id), source="m", row=0, models=MODELS)
    assert errors == [] and parsed.id == good_id


def test_missing_prompt_column_is_named():
    err = only_error({"id": "sku-88"})
    assert err.field == "prompt" and err.missing
    assert str(err) == ("catalog.parquet row 17 (`sku-88`): `prompt` is required (a column every manifest needs), "
                        "it is missing")


def test_null_prompt_is_missing():
    err = only_error(row(prompt=None))
    assert err.field == "prompt" and err.missing
    assert str(err) == "catalog.parquet row 17 (`sku-88`): `prompt` is required, it is missing"


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt_is_rejected(prompt):
    err = only_error(row(prompt=prompt))
    assert err.field == "prompt" and not err.missing
    assert f"must not be empty, got {prompt!r}" in str(err)


def test_missing_and_null_id_are_named_without_an_id():
    for raw in ({"prompt": "p"}, {"id": None, "prompt": "p"}):
        err = only_error(raw)
        assert err.field == "id" and err.missing and err.id is None
        assert str(err).startswith("catalog.parquet row 17: `id` is required")


def test_unknown_scheduler_lists_the_supported_ones():
    err = only_error(row(scheduler="karras_magic"))
    assert err.field == "scheduler" and err.value == "karras_magic"
    text = str(err)
    assert "got 'karras_magic'" in text
    for name in ("ddim", "euler", "euler_a", "dpmpp_2m", "pndm"):
        assert f"'{name}'" in text


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_supported_scheduler_is_valid(name):
    parsed, errors, _ = validate_row(row(scheduler=name), source="m", row=0, models=MODELS)
    assert errors == [] and parsed.scheduler == name


def test_unknown_model_suggests_the_model_flag():
    err = only_error(row(model="sdxl"))
    assert err.field == "model" and err.value == "sdxl"
    text = str(err)
    assert "--model sdxl=REF" in text
    assert "default" in text and "tiny" in text  # the names that would be valid


def test_a_model_given_with_the_flag_is_known():
    parsed, errors, _ = validate_row(row(model="sdxl"), source="m", row=0, models=MODELS | {"sdxl"})
    assert errors == [] and parsed.model == "sdxl"


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_adapter_scale_must_be_finite(scale):
    err = only_error(row(adapters=[{"name": "style", "scale": 0.8}, {"name": "brand", "scale": scale}]))
    assert err.field == "adapters.1.scale"
    assert f"got {scale!r}" in str(err) and "finite" in str(err)


@pytest.mark.parametrize("model", ["", "  "])
def test_an_empty_model_is_told_to_be_null_not_given_a_flag_that_cannot_be(model):
    err = only_error(row(model=model))  # it said "add --model =REF", which the CLI refuses
    assert err.field == "model" and "is empty: name a model, or leave the cell null for `default`" in str(err)


@pytest.mark.parametrize("field, value, said", [
    ("adapters", "style", "`adapters` should be a list of {name, scale} structs"),  # "should be a valid list"
    ("adapters", [{"name": "a", "weight": 1.0}], "`adapters.0.weight` is not a field of an adapter: an entry has "
     "`name` and `scale` only"),  # "Extra inputs are not permitted"
    ("adapters", [{"name": "", "scale": 1.0}], "`adapters.0.name` is empty: name an adapter of the --adapters store"),
    ("id", b"\xffbad", "`id` is not UTF-8 text: write the manifest's ids as UTF-8 text"),  # "unable to parse raw data"
])
def test_a_wrong_shape_says_what_would_be_valid_in_our_words(field, value, said):
    _, errors, _ = validate_row(row(**{field: value}), source="m", row=0, models=MODELS)
    assert len(errors) == 1 and said in str(errors[0]), errors


def test_a_null_adapter_scale_is_the_default_as_a_missing_one_is():
    """A struct column built from dicts where some entries have no scale holds nulls there: the row was invalid,
    told its float64 column was "not numeric"."""
    for entry in ({"name": "style", "scale": None}, {"name": "style"}):
        parsed, errors, _ = validate_row(row(adapters=[entry]), source="m", row=0, models=MODELS)
        assert errors == [] and [(a.name, a.scale) for a in parsed.adapters] == [("style", 1.0)], errors


@pytest.mark.parametrize("name", ["../outside/escape", "/tmp/elsewhere", "brand/../../x", ".hidden", "a//b", ""])
def test_an_adapter_name_that_would_leave_the_store_is_invalid_where_validate_sees_it(name):
    err = only_error(row(adapters=[{"name": "brand/style-v2", "scale": 0.8}, {"name": name, "scale": 1.0}]))
    assert err.field == "adapters.1.name" and f"got {name!r}" in str(err)


def test_an_adapter_listed_twice_in_a_row_is_invalid_where_validate_sees_it():
    """It passed validate and the plan, and the actor then recorded the row `failed`."""
    err = only_error(row(adapters=[{"name": "style", "scale": 1.0}, {"name": "brand"}, {"name": "style", "scale": 0.5}]))
    assert err.field == "adapters" and "adapter 'style' is listed twice in one row; list it once, with the summed scale" in str(err)


def test_every_problem_of_a_row_is_reported_not_only_the_first():
    errors = errors_of(row(width=770, steps=501, seed=-1, scheduler="nope"))
    assert sorted(e.field for e in errors) == ["scheduler", "seed", "steps", "width"]
    assert all(e.row == 17 and e.id == "sku-88" for e in errors)


@pytest.mark.parametrize("prompt", [
    "un café ☕ 🚀 製品写真",
    "Ürün fotoğrafı: kırmızı kupa",
    "фото красной кружки",
    "a mug 🍵🫖 with a flag 🇯🇵 and a family 👨‍👩‍👧",
])
def test_unicode_and_emoji_prompts_are_valid_and_kept_as_written(prompt):
    parsed, errors, _ = validate_row(row(prompt=prompt, negative_prompt="flou, 模糊"), source="m", row=0,
                                     models=MODELS)
    assert errors == []
    assert parsed.prompt == prompt and parsed.negative_prompt == "flou, 模糊"


def test_nulls_in_optional_columns_mean_defaults_and_extras_pass_through():
    raw = row(seed=None, steps=None, width=None, scheduler=None, negative_prompt=None, sku="88", price=12.5,
              tags=["new", "sale"])
    parsed, errors, extras = validate_row(raw, source="m", row=0, models=MODELS)
    assert errors == []
    assert parsed.seed is None and parsed.steps is None and parsed.width is None and parsed.scheduler is None
    assert parsed.negative_prompt == "" and parsed.guidance_scale == 7.5 and parsed.model == "default"
    assert extras == {"sku": "88", "price": 12.5, "tags": ["new", "sale"]}


def test_extras_are_returned_for_invalid_rows_too():
    _, errors, extras = validate_row(row(width=770, sku="88"), source="m", row=0, models=MODELS)
    assert errors and extras == {"sku": "88"}


# ---------------------------------------------------------------------------------------------------
# default seed

def test_default_seed_is_stable_across_runs_and_machines():
    # Golden values: if these change, every catalog row without a seed is drawn differently.
    assert default_seed("mug-001") == 2126450720743204422
    assert default_seed("mug-001--studio--v0") == 8414793804544698927
    assert default_seed("sku-88") == default_seed("sku-88")


def test_default_seeds_differ_between_ids_and_stay_in_range():
    seeds = [default_seed(f"sku-{i}") for i in range(2000)] + [default_seed("x" * 128), default_seed("é")]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------------
# resolve_row and params_hash

def resolved(*, model: dict = TINY, watermark: str | None = "sdfleet", fingerprints: dict | None = None,
             **fields) -> dict:
    raw = row(**fields)
    parsed, errors, _ = validate_row(raw, source="m", row=0, models=MODELS | {raw.get("model", "default")})
    assert errors == [], [str(e) for e in errors]
    return resolve_row(parsed, model, watermark=watermark, adapter_fingerprints=fingerprints)


def test_resolve_fills_defaults_from_the_model():
    r = resolved()
    assert (r["width"], r["height"], r["steps"], r["scheduler"]) == (256, 256, 20, "ddim")
    assert r["model_fingerprint"] == TINY["fingerprint"]
    assert r["seed"] == default_seed("sku-88")
    assert r["guidance_scale"] == 7.5 and r["negative_prompt"] == "" and r["adapters"] == []
    assert r["model"] == "default" and r["watermark"] == "sdfleet"

    sd21 = {"fingerprint": "dir:abc", "width": 768, "height": 768, "steps": 30, "scheduler": "euler"}
    r = resolved(model=sd21)
    assert (r["width"], r["height"], r["steps"], r["scheduler"]) == (768, 768, 30, "euler")


def test_resolve_keeps_the_rows_own_values():
    r = resolved(seed=7, steps=4, width=320, height=192, scheduler="euler_a", guidance_scale=3,
                 negative_prompt="blurry", adapters=[{"name": "brand", "scale": 0.5}],
                 fingerprints={"brand": "sha:1"})
    assert (r["seed"], r["steps"], r["width"], r["height"], r["scheduler"]) == (7, 4, 320, 192, "euler_a")
    assert r["guidance_scale"] == 3.0 and isinstance(r["guidance_scale"], float)
    assert r["negative_prompt"] == "blurry"
    assert r["adapters"] == [{"name": "brand", "scale": 0.5, "fingerprint": "sha:1"}]
    assert r["params_hash"] == params_hash(r)


def test_params_hash_is_deterministic_and_short_hex():
    a, b = resolved(), resolved()
    assert a["params_hash"] == b["params_hash"]
    assert len(a["params_hash"]) == 32 and int(a["params_hash"], 16) >= 0


PIXEL_CHANGES = {
    "prompt": dict(prompt="a blue mug on a white background"),
    "negative_prompt": dict(negative_prompt="blurry"),
    "seed": dict(seed=1),
    "width": dict(width=320),
    "height": dict(height=320),
    "steps": dict(steps=21),
    "guidance_scale": dict(guidance_scale=7.0),
    "scheduler": dict(scheduler="euler"),
    "model fingerprint": dict(model={**TINY, "fingerprint": "preset:tiny:fedcba9876543210"}),
    "adapter scale": dict(adapters=[{"name": "brand", "scale": 0.9}]),
    "adapter added": dict(adapters=[{"name": "brand", "scale": 0.8}, {"name": "style", "scale": 0.8}]),
    "adapter fingerprint": dict(fingerprints={"brand": "sha:2"}),
    "watermark": dict(watermark="acme"),
    "no watermark": dict(watermark=None),
}


@pytest.mark.parametrize("change", list(PIXEL_CHANGES))
def test_params_hash_changes_with_everything_that_changes_pixels(change):
    base = dict(adapters=[{"name": "brand", "scale": 0.8}], fingerprints={"brand": "sha:1"})
    before = resolved(**base)["params_hash"]
    after = resolved(**{**base, **PIXEL_CHANGES[change]})["params_hash"]
    assert after != before


def test_params_hash_ignores_pass_through_columns_and_the_model_name():
    base = resolved()["params_hash"]
    assert resolved(sku="88", campaign="spring", status="draft")["params_hash"] == base
    # The same model under another --model name draws the same pixels.
    parsed, _, _ = validate_row(row(model="catalog"), source="m", row=0, models={"catalog"})
    renamed = resolve_row(parsed, TINY, watermark="sdfleet")
    assert renamed["model"] == "catalog" and renamed["params_hash"] == base


def test_params_hash_depends_on_values_not_on_how_they_were_written():
    base = resolved()
    # Spelling out the defaults, or an int guidance column, draws the same pixels: same hash.
    explicit = resolved(seed=default_seed("sku-88"), steps=20, width=256, height=256, scheduler="ddim",
                        guidance_scale=7.5)
    assert explicit["params_hash"] == base["params_hash"]
    assert resolved(guidance_scale=8)["params_hash"] == resolved(guidance_scale=8.0)["params_hash"]
    # adapters as the actors apply them: in any order, and scale 0 (which loads nothing) as if unlisted
    fingerprints = {"brand": "sha:1", "style": "sha:2"}
    one = resolved(adapters=[{"name": "brand", "scale": 0.8}], fingerprints=fingerprints)["params_hash"]
    both = resolved(adapters=[{"name": "brand", "scale": 0.8}, {"name": "style", "scale": 0.5}],
                    fingerprints=fingerprints)["params_hash"]
    assert resolved(adapters=[{"name": "style", "scale": 0.5}, {"name": "brand", "scale": 0.8}],
                    fingerprints=fingerprints)["params_hash"] == both
    assert resolved(adapters=[{"name": "brand", "scale": 0.8}, {"name": "style", "scale": 0}],
                    fingerprints=fingerprints)["params_hash"] == one
    assert resolved(adapters=[{"name": "style", "scale": 0.0}])["params_hash"] == base["params_hash"]


def test_manifest_row_fields_are_documented():
    # `--help` and the docs come from these descriptions (STYLE.md 1).
    assert all(f.description for f in ManifestRow.model_fields.values())


# ---------------------------------------------------------------------------------------------------
# the 77-token window

@pytest.fixture(scope="module")
def tokenizer():
    from actors.presets import TOKENIZER_DIR
    from actors.tokenizer import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


def test_short_prompt_gives_no_warning(tokenizer):
    assert prompt_overflow(tokenizer, "a red mug on a white background") is None
    assert prompt_overflow(tokenizer, "un café ☕ 🚀 製品写真") is None


def test_long_prompt_warning_names_the_cut_off_words(tokenizer):
    prompt = " ".join(["a red mug on a marble table"] * 15) + " zebra giraffe"
    warning = prompt_overflow(tokenizer, prompt)
    assert warning is not None
    assert "77" in warning
    assert "zebra giraffe" in warning  # the last words are the ones the model never reads
    assert warning.count("marble") < 15  # only the cut-off part is quoted, not the whole prompt


def test_a_huge_prompt_is_read_only_as_far_as_the_window_needs(tokenizer):
    """A 10 MB prompt was tokenized whole (16 s and 1.8 GB in `validate`, per row): the warning needs only its start."""

    class Counting:  # the tokenizer, noting how much text it is given
        model_max_length, seen = tokenizer.model_max_length, []

        def __call__(self, text, **kwargs):
            self.seen.append(len(text))
            return tokenizer(text, **kwargs)

        def decode(self, ids):
            return tokenizer.decode(ids)

    counting = Counting()
    prompt = "a red mug on a marble table, " * 100_000  # 2.9 million characters
    warning = prompt_overflow(counting, prompt)
    assert counting.seen[0] == 8_192 and len(counting.seen) == 2  # then the window's words, one by one
    assert warning.startswith("prompt is 2,900,000 characters, over ") and "CLIP tokens, over the 77 the model" in warning
    assert "more characters)" in warning  # the cut-off words quoted, bounded


def test_the_window_is_77_tokens_with_start_and_end(tokenizer):
    assert len(tokenizer("red", add_special_tokens=False).input_ids) == 1
    assert prompt_overflow(tokenizer, " ".join(["red"] * 75)) is None  # 75 + start + end = 77
    warning = prompt_overflow(tokenizer, " ".join(["red"] * 75) + " lamp")
    assert warning is not None and "78" in warning and "'lamp'" in warning


def test_cut_off_unicode_is_quoted_intact(tokenizer):
    warning = prompt_overflow(tokenizer, " ".join(["red"] * 75) + " café ☕ 🚀 製品写真")
    assert warning is not None and "café ☕ 🚀 製品写真" in warning


def test_cut_off_words_are_quoted_as_the_prompt_writes_them(tokenizer):
    """Decoded from tokens, `word16` read as 'word 1 6' (CLIP makes each digit a word of its own)."""
    warning = prompt_overflow(tokenizer, " ".join(f"word{i}" for i in range(80)))
    assert warning is not None and "cut off: 'word17 word18 word19" in warning, warning


def test_a_cut_inside_an_emoji_names_the_whole_emoji(tokenizer):
    """An emoji is several byte tokens: a window that ends inside one named its rest as a replacement character."""
    prompt = "a red star on a gray background " * 10 + "red star 🚀🚀 rocket launch"
    warning = prompt_overflow(tokenizer, prompt)
    assert warning is not None and "\ufffd" not in warning and "'🚀🚀 rocket launch'" in warning, warning


def test_columns_named_as_other_tools_name_the_fields_are_told_apart_from_pass_through_columns():
    from manifests.schema import look_alike_columns

    found = look_alike_columns(["negative", "NegativePrompt", "cfg_scale", "num_inference_steps", "Sampler",
                                "LoRA", "sku", "scale", "caption", "prompt", "seed"])
    assert found == {"negative": "negative_prompt", "NegativePrompt": "negative_prompt",
                     "cfg_scale": "guidance_scale", "num_inference_steps": "steps", "Sampler": "scheduler",
                     "LoRA": "adapters"}


def test_a_look_alike_column_beside_its_field_is_not_said_to_leave_the_field_missing():
    """A file with both `Seed` and `seed` was told every row reads `seed` as missing."""
    from manifests.schema import look_alike_warning

    alone = look_alike_warning("m.parquet", "Seed", "seed", ["id", "prompt", "Seed"])
    beside = look_alike_warning("m.parquet", "Seed", "seed", ["id", "prompt", "Seed", "seed"])
    assert "every row of it reads `seed` as missing" in alone
    assert "`seed` is read from the file's own `seed` column" in beside and "missing" not in beside


def test_the_control_characters_a_prompt_may_not_hold_are_those_clips_tokenizer_makes_tokens_of():
    """The pattern is written out by hand (a search in C, not a loop per character over millions of prompts); it
    must name exactly the control characters that change what the tokenizer reads (U+001C..U+001F are
    whitespace to Python, not to it), and none of those it folds into a space."""
    import unicodedata

    from transformers import CLIPTokenizer

    from actors.presets import TOKENIZER_DIR
    from manifests.schema import CONTROL_CHARACTER

    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    plain = tokenizer("a red mug").input_ids
    controls = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cc"]
    tokened = {c for c in controls if tokenizer(f"a red{c}mug").input_ids != plain}
    assert {c for c in controls if CONTROL_CHARACTER.fullmatch(c)} == tokened
    assert "\x1b" in tokened and "\t" not in tokened  # (the comparison is not empty on either side)
