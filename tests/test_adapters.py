"""LoRA and Textual Inversion adapters on the tiny preset: the store, the per-actor cache, and no traces.

The adapters are made on the spot (tests/helpers.py): random rank-4 LoRAs on the attention projections,
large enough to change the image visibly, saved with diffusers' own `save_lora_weights` and converted to
kohya format by hand.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save

from actors.adapter_cache import AdapterCache, check_lora_fits
from actors.adapters import AdapterError, AdapterStore
from actors.generate import draw
from actors.presets import build_preset
from helpers import (
    RANK,
    TE_TARGETS,
    UNET_TARGETS,
    assert_same_pixels,
    diffusers_file,
    kohya_mixed,
    make_lora,
    new_store,
    put,
    resolved_row,
    to_kohya,
)


def draw_with(cache: AdapterCache, adapters=()) -> np.ndarray:
    row = resolved_row(cache.store, adapters)
    cache.activate(row["adapters"])
    return draw(cache.pipe, [row])[0]


def peft_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for part in (pipe.unet, pipe.text_encoder) for m in part.modules())


# -- fixtures: one store, and reference images each drawn on a fresh pipeline ---------------------------

@pytest.fixture(scope="module")
def tiny_shape():
    return build_preset("tiny")


@pytest.fixture(scope="module")
def loras(tiny_shape):
    return {
        "A": make_lora(tiny_shape.unet, UNET_TARGETS, seed=1),
        "B": make_lora(tiny_shape.unet, UNET_TARGETS, seed=2),
        "B_te": make_lora(tiny_shape.text_encoder, TE_TARGETS, seed=3, std=0.2),
    }


@pytest.fixture(scope="module")
def store(loras, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    return new_store({
        "A.safetensors": diffusers_file(tmp, loras["A"]),
        "A_kohya.safetensors": save(to_kohya(loras["A"])),
        # alpha = rank / 2 halves the LoRA: the same as B at scale 0.5
        "B_kohya_half.safetensors": save(to_kohya(loras["B"], loras["B_te"], alpha=RANK / 2)),
        # B uses the folder layout and also adapts the text encoder
        "B/pytorch_lora_weights.safetensors": diffusers_file(tmp, loras["B"], loras["B_te"]),
    })


@pytest.fixture(scope="module")
def base_image(store):
    return draw_with(AdapterCache(build_preset("tiny"), store))


@pytest.fixture(scope="module")
def fresh_a(store):
    return draw_with(AdapterCache(build_preset("tiny"), store), [("A", 1.0)])


@pytest.fixture(scope="module")
def fresh_b(store):
    return draw_with(AdapterCache(build_preset("tiny"), store), [("B", 1.0)])


# -- the store ----------------------------------------------------------------------------------------

def test_store_finds_both_layouts_and_detects_formats(store, loras):
    a, b, k = store.resolve("A"), store.resolve("B"), store.resolve("A_kohya")
    assert (a.kind, a.format) == ("lora", "diffusers") and a.uri == f"memory://{store.root}/A.safetensors"
    assert (b.kind, b.format) == ("lora", "diffusers") and b.uri.endswith("/B/pytorch_lora_weights.safetensors")
    assert (k.kind, k.format) == ("lora", "kohya")
    assert a.size == len(store.fs.cat_file(f"{store.root}/A.safetensors"))
    assert store.names() == ["A", "A_kohya", "B", "B_kohya_half"]
    assert store.fingerprints(["A", "B", "A"]) == {"A": a.fingerprint, "B": b.fingerprint}
    tensors = store.load_state_dict(a)
    assert torch.equal(tensors[f"unet.{next(iter(loras['A']))}"], next(iter(loras["A"].values())))


@pytest.mark.parametrize("tensors, message", [
    # a LyCORIS layer beside plain LoRA ones ended in diffusers' raw "keys have not been correctly renamed"
    ({"lora_unet_a_to_q.lora_down.weight": (4, 32), "lora_unet_a_to_q.lora_up.weight": (32, 4),
      "lora_unet_a_to_v.hada_w1_a": (32, 4)}, "is a LyCORIS file ('lora_unet_a_to_v.hada_w1_a'"),
    ({"lora_unet_a_to_out_0.diff": (32, 32)}, "is a LyCORIS file"),  # full: "has no LoRA or embedding keys"
    ({"lora_unet_a_to_k.on_input": (32,)}, "is a LyCORIS file"),  # (IA)^3
    # any one float tensor was an embedding, its key the token: a model layer, a token table
    ({"model.diffusion_model.time_embed.0.bias": (64,)}, "a model layer's: neither a LoRA"),
    ({"cond_stage_model.token_embedding.weight": (899, 32)}, "a model layer's"),
    ({"tokens": (899, 32)}, "holds one tensor of 899 vectors ('tokens'), more than a prompt has room for (75)"),
    ({"<s0>": (1, 32), "<s1>": (1, 32)}, "holds 2 embeddings ('<s0>', '<s1>'); sdfleet loads one embedding per file"),
    ({"clip_l": (1, 32), "clip_l_out": (1, 32)}, "is a OneTrainer embedding (clip_l with clip_l_out)"),
])
def test_files_that_are_no_lora_or_embedding_sdfleet_reads_say_what_they_are(tensors, message):
    from actors.adapters import _detect

    with pytest.raises(AdapterError, match=re.escape(message)):
        _detect("x", {k: ("F32", list(shape)) for k, shape in tensors.items()})


def test_embedding_files_name_their_token_or_take_the_files_name():
    from actors.adapters import _detect

    assert _detect("brand/mug", {"<my-mug>": ("F16", [2, 1024])}) == ("embedding", "embedding", "<my-mug>")
    for generic in ("emb_params", "*", "clip_l"):  # a pivotal-tuning trainer's SD 1.x file: clip_l alone
        assert _detect("brand/mug", {generic: ("F32", [1024])}) == ("embedding", "embedding", "mug")


def test_what_a_node_cached_of_a_stored_adapter_is_read_again_once_files_are_read_another_way(tmp_path,
                                                                                               monkeypatch):
    """A driver keeps what it learned of an object store's adapter file, by the file's version: a file it cached
    before detection changed (a lone `clip_l` read as the token `clip_l`, now the file's name) kept its old reading
    on the driver while the actors read it anew."""
    import json

    import actors.adapters as adapters

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(adapters, "_version", lambda fs, path: "etag=1; size=1")  # as S3 would give one
    s = new_store({"mug.safetensors": save({"clip_l": torch.zeros(1024)})})
    assert s.describe("mug").token == "mug"
    record = adapters._record_path(s.describe("mug").uri)
    kept = json.loads(record.read_text())
    kept["info"]["token"] = "kept"
    record.write_text(json.dumps(kept))
    assert s.describe("mug").token == "kept"  # the cache is what answers ...
    del kept["detection"]
    record.write_text(json.dumps(kept))
    assert s.describe("mug").token == "mug"  # ... unless it was written by another reading of files


def test_fingerprint_changes_when_a_file_is_replaced(loras, tiny_shape):
    s = new_store({"style.safetensors": save({f"unet.{k}": v for k, v in loras["A"].items()})})
    before = s.resolve("style")
    assert s.fingerprints(["style"]) == {"style": before.fingerprint}  # stable while the file is
    put(s, "style.safetensors", save({f"unet.{k}": v for k, v in loras["B"].items()}))
    after = s.resolve("style")
    assert after.fingerprint != before.fingerprint
    with pytest.raises(AdapterError, match="'style'.*changed since it was resolved"):
        s.load_state_dict(before)
    # an actor holding the old file reloads it for rows planned with the new one, and refuses stale rows
    cache = AdapterCache(build_preset("tiny"), s)
    put(s, "style.safetensors", save({f"unet.{k}": v for k, v in loras["A"].items()}))
    assert cache.activate([{"name": "style", "scale": 1.0, "fingerprint": before.fingerprint}])
    put(s, "style.safetensors", save({f"unet.{k}": v for k, v in loras["B"].items()}))
    assert cache.activate([{"name": "style", "scale": 1.0, "fingerprint": after.fingerprint}])
    assert cache.loads == 2 and len(cache.pipe.get_list_adapters()["unet"]) == 1  # the old weights are gone
    with pytest.raises(AdapterError, match="'style'.*changed since the run was planned"):
        cache.activate([{"name": "style", "scale": 1.0, "fingerprint": before.fingerprint}])


def test_unknown_adapter_names_what_the_store_holds(store, tiny_shape):
    held = "holds: A, A_kohya, B, B_kohya_half"
    with pytest.raises(AdapterError, match=rf"'nope'.*not in the adapter store.*{held}") as err:
        store.resolve("nope")
    assert err.value.adapter == "nope" and isinstance(err.value, ValueError)
    with pytest.raises(AdapterError, match="'nope'"):
        AdapterCache(tiny_shape, store).activate([{"name": "nope", "scale": 1.0}])
    with pytest.raises(AdapterError, match=r"'\.\./A'.*not a valid adapter name"):
        store.resolve("../A")
    # the file's name for the adapter's said "expected A.safetensors.safetensors"
    with pytest.raises(AdapterError, match=r"'A\.safetensors': is not an adapter's name: the store's file "
                                           r"A\.safetensors is adapter 'A' \(name adapters without \.safetensors\)"):
        store.resolve("A.safetensors")
    # --adapters naming one adapter's folder said "the store holds no adapters"
    with pytest.raises(AdapterError, match=r"'B'.* is itself an adapter's folder \(it holds pytorch_lora_weights"
                                           r"\.safetensors\); pass its parent folder as --adapters"):
        AdapterStore(f"{store.uri}/B").resolve("B")


def test_a_folder_under_the_adapters_name_without_its_file_says_what_it_holds(tmp_path, loras):
    """A peft `save_pretrained` folder, or the right file one folder too deep, was "not in the adapter store"
    (adapters QA), with the store's listing to search."""
    from actors.adapters import LORA_FILE

    data = save({f"unet.{k}": v for k, v in loras["A"].items()})
    for path in ("peft-sp/adapter_model.safetensors", "peft-sp/adapter_config.json", f"deep/inner/{LORA_FILE}",
                 "other/weights.safetensors"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    store = AdapterStore(str(tmp_path))
    with pytest.raises(AdapterError, match=r"'peft-sp': its folder holds adapter_model\.safetensors, a peft "
                                           r"`save_pretrained` adapter .*save_lora_weights"):
        store.resolve("peft-sp")
    with pytest.raises(AdapterError, match=r"'deep': its folder holds no adapter file itself, but deep/inner does: "
                                           r"name the adapter `deep/inner` in the rows"):
        store.resolve("deep")
    with pytest.raises(AdapterError, match=r"'other': its folder holds weights\.safetensors, not "
                                           r"pytorch_lora_weights\.safetensors or learned_embeds\.safetensors"):
        store.resolve("other")


def test_the_store_lists_nested_adapters_among_what_it_holds(tmp_path, loras):
    """`brand/style-v1` was left out of "the store holds: ...", though rows could name it; a fine-tune's
    checkpoints in the store it wrote to (their optimizer, trainable, ema files) were listed as adapters."""
    from actors.adapters import LORA_FILE

    data = save({f"unet.{k}": v for k, v in loras["A"].items()})
    checkpoint = "top-tune/checkpoints/checkpoint_2026-12-07_01-05-30.604450"
    for path in ("top.safetensors", f"brand/style-v1/{LORA_FILE}", "brand/style-v2.safetensors", "notes/readme.txt",
                 f"{checkpoint}/trainable.safetensors", f"{checkpoint}/optimizer.safetensors"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    store = AdapterStore(str(tmp_path))
    assert store.names() == ["brand/style-v1", "brand/style-v2", "top"]
    with pytest.raises(AdapterError, match=r"holds: brand/style-v1, brand/style-v2, top"):
        store.resolve("brand/style-v3")


def test_corrupt_and_keyless_files_are_refused(loras):
    good = save({f"unet.{k}": v for k, v in loras["A"].items()})
    s = new_store({
        "junk.safetensors": b"this is not a safetensors file",
        "cut.safetensors": good[: len(good) // 2],
        "model.safetensors": save({"conv_in.weight": torch.zeros(4, 4, 3, 3), "conv_in.bias": torch.zeros(4)}),
    })
    for name in ("junk", "cut"):
        with pytest.raises(AdapterError, match=f"'{name}'.*not a readable safetensors file"):
            s.resolve(name)
    with pytest.raises(AdapterError, match="'model'.*no LoRA or embedding keys.*conv_in"):
        s.resolve("model")


def test_pickle_files_are_refused_without_being_opened(tmp_path, monkeypatch, tiny_shape):
    class Trap:  # unpickling this creates a folder: proof that something ran
        def __init__(self, path):
            self.path = path

        def __reduce__(self):
            return os.makedirs, (self.path,)

    pickle.loads(pickle.dumps(Trap(str(tmp_path / "armed"))))
    assert (tmp_path / "armed").is_dir(), "the trap must work, or the test below proves nothing"
    marker = tmp_path / "sprung"
    trap = pickle.dumps(Trap(str(marker)))
    s = new_store({"evil.ckpt": trap, "evil_pt.pt": trap, "evil_dir/pytorch_lora_weights.bin": trap})

    def no_unpickling(*args, **kwargs):
        raise AssertionError("an adapter file was unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    for name, file in (("evil", "evil.ckpt"), ("evil_pt", "evil_pt.pt"), ("evil_dir", "pytorch_lora_weights.bin")):
        with pytest.raises(AdapterError, match=f"'{name}'.*{file} is a pickle file"):
            s.resolve(name)
    with pytest.raises(AdapterError, match="'evil'.*pickle"):
        AdapterCache(tiny_shape, s).activate([{"name": "evil", "scale": 1.0}])
    assert not marker.exists()


# -- exactness -----------------------------------------------------------------------------------------

def test_kohya_and_diffusers_formats_draw_the_same_image(store, fresh_a, base_image):
    assert np.abs(fresh_a.astype(int) - base_image).mean() > 10, "the test LoRA must change the image visibly"
    kohya = draw_with(AdapterCache(build_preset("tiny"), store), [("A_kohya", 1.0)])
    assert_same_pixels(kohya, fresh_a, "kohya vs diffusers")
    # text encoder layers and kohya's alpha / rank scale convert too
    half = draw_with(AdapterCache(build_preset("tiny"), store), [("B", 0.5)])
    kohya_half = draw_with(AdapterCache(build_preset("tiny"), store), [("B_kohya_half", 1.0)])
    assert_same_pixels(kohya_half, half, "kohya alpha = rank / 2 vs diffusers at scale 0.5")


def test_a_kohya_lora_draws_every_layer_at_its_own_alpha(tiny_shape):
    """Each layer's alpha / rank, inside attention and out (proj_in, ff, a LoCon conv), ranks and alphas varying
    by layer: the image equals the base model with `W0 + alpha / rank * B @ A` written into each layer. diffusers
    alone gives every attention layer the file's most common alpha (its alpha_pattern misses their keys)."""
    state, expected = kohya_mixed(tiny_shape.unet)
    s = new_store({"mixed.safetensors": save(state)})
    merged = build_preset("tiny")
    with torch.no_grad():
        for name, update in expected.items():
            merged.unet.get_submodule(name.removeprefix("unet.")).weight += update
    row = resolved_row(s)
    want = draw(merged, [row])[0]
    assert np.abs(want.astype(int) - draw(build_preset("tiny"), [row])[0]).mean() > 4, "the LoRA must show"
    assert_same_pixels(draw_with(AdapterCache(build_preset("tiny"), s), [("mixed", 1.0)]), want, "kohya, eager")


def test_a_kohya_alpha_of_0_is_read_as_no_alpha(tiny_shape, loras):
    """sd-scripts saves alpha 0 for "none" and reads it as the rank: such a LoRA drew at strength 0, `ok`."""
    from actors.lora_map import lora_layers

    zero, rank = lora_layers(tiny_shape, to_kohya(loras["A"], alpha=0)), lora_layers(tiny_shape, to_kohya(loras["A"]))
    assert zero.keys() == rank.keys() and zero
    for name, (a, b) in rank.items():
        torch.testing.assert_close(zero[name][0], a)
        torch.testing.assert_close(zero[name][1], b)
        assert b.abs().max() > 0


@pytest.mark.parametrize("key, message", [
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector", "is a DoRA"),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale", "is a DoRA"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.bias", "a LoRA bias"),
    ("bundle_emb.my-mug.string_to_param.*", "bundles Textual Inversion embeddings"),
    ("lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight", "Tucker decomposition"),
])
def test_lora_parts_sdfleet_does_not_apply_are_refused_not_dropped(tiny_shape, loras, key, message):
    """DoRA magnitudes and LoRA biases change the output: a file with them is refused, naming the key, rather
    than drawn as the plain LoRA it also holds (diffusers drops kohya's dora_scale with a log line)."""
    kohya = key.startswith("lora_unet_")
    state = to_kohya(loras["A"]) if kohya else {f"unet.{k}": v for k, v in loras["A"].items()}
    state[key] = torch.ones(1, 320) if kohya else torch.ones(320)
    with pytest.raises(AdapterError, match=f"^adapter 'x': .*{message}"):
        check_lora_fits(tiny_shape, "x", state)


def test_lora_keys_without_a_part_prefix_name_the_spellings_that_work(tiny_shape, loras):
    with pytest.raises(AdapterError, match=r"^adapter 'x': has peft keys without the part they belong to in front "
                                           r"\(such as 'down_blocks\..*save it with diffusers' `save_lora_weights`"):
        # peft keys as saved from the UNet alone, without the settings unet.save_lora_adapter writes beside them
        check_lora_fits(tiny_shape, "x", dict(loras["A"]))
    with pytest.raises(AdapterError, match=r"^adapter 'x': has keys this model has no part for, such as "
                                           r"'vae\..*`unet.<module>` and `text_encoder.<module>`"):
        check_lora_fits(tiny_shape, "x", {f"vae.{k}": v for k, v in loras["A"].items()})  # a part it has not


def test_swaps_leave_no_trace(store, base_image, fresh_a, fresh_b):
    cache = AdapterCache(build_preset("tiny"), store)
    assert not cache.activate([]) and cache.swaps == 0  # already the base model
    assert np.array_equal(draw_with(cache, [("A", 1.0)]), fresh_a)
    assert np.array_equal(draw_with(cache, [("B", 1.0)]), fresh_b), "B after A"
    assert np.array_equal(draw_with(cache, [("A", 1.0)]), fresh_a), "A -> B -> A"
    assert np.array_equal(draw_with(cache, []), base_image), "none is the exact base model"
    assert np.array_equal(draw_with(cache, [("A", 1.0)]), fresh_a), "A -> none -> A"
    assert not cache.activate([{"name": "A", "scale": 1.0}]), "the same set again is no swap"
    assert (cache.swaps, cache.loads, cache.evictions) == (5, 2, 0) and cache.swap_seconds > 0


def test_a_blend_differs_from_its_parts_and_scale_zero_is_the_base(store, base_image, fresh_a, fresh_b):
    cache = AdapterCache(build_preset("tiny"), store)
    blend = draw_with(cache, [("A", 1.0), ("B", 1.0)])
    for part, image in (("A", fresh_a), ("B", fresh_b)):
        assert np.abs(blend.astype(int) - image).mean() > 5, f"the blend looks like {part} alone"
    assert cache.activate([{"name": "B", "scale": 1.0}, {"name": "A", "scale": 1.0}]) is False  # one order
    assert np.array_equal(draw_with(cache, [("A", 0.0)]), base_image), "scale 0 after a blend"
    with pytest.raises(AdapterError, match="'A'.*listed twice"):
        cache.activate([{"name": "A", "scale": 1.0}, {"name": "A", "scale": 0.5}])


def test_a_lora_for_another_model_fails_and_leaves_the_pipeline_as_it_was(store, fresh_a, tiny_shape):
    # SD 1.x-like cross-attention: to_k/to_v of attn2 take 768-wide text features, this model's take 64
    wrong = make_lora(tiny_shape.unet, UNET_TARGETS, seed=9, in_features={"attn2.to_k": 768, "attn2.to_v": 768})
    # layers this model lacks (a second transformer block per attention, as SDXL has)
    right = make_lora(tiny_shape.unet, UNET_TARGETS, seed=10)
    missing = {k.replace("transformer_blocks.0", "transformer_blocks.1"): v for k, v in right.items()}
    s = new_store({
        "A.safetensors": store.fs.cat_file(f"{store.root}/A.safetensors"),
        "sd15_style.safetensors": save({f"unet.{k}": v for k, v in wrong.items()}),
        "sdxl_style.safetensors": save({f"unet.{k}": v for k, v in missing.items()}),
    })
    # 1. on a pipeline that never held a LoRA: no peft layer may appear
    fresh = AdapterCache(build_preset("tiny"), s)
    with pytest.raises(AdapterError, match=r"'sd15_style'.*does not fit.*attn2\.to_k\.lora_A is \(4, 768\)"):
        fresh.activate([{"name": "sd15_style", "scale": 1.0}])
    assert peft_layers(fresh.pipe) == 0
    # 2. on a pipeline drawing with A: A stays loaded and active, nothing else appears
    cache = AdapterCache(build_preset("tiny"), s)
    cache.activate([{"name": "A", "scale": 1.0}])
    keys, layers = set(cache.pipe.unet.state_dict()), peft_layers(cache.pipe)
    adapters = cache.pipe.get_list_adapters()
    for name, cause in (("sd15_style", "does not fit"), ("sdxl_style", "not a layer of this model")):
        with pytest.raises(AdapterError, match=f"'{name}'.*{cause}"):
            cache.activate([{"name": "A", "scale": 1.0}, {"name": name, "scale": 1.0}])
    assert set(cache.pipe.unet.state_dict()) == keys and peft_layers(cache.pipe) == layers
    assert cache.stats()["loaded"] == ["A"] and cache.pipe.get_list_adapters() == adapters
    assert np.array_equal(draw_with(cache, [("A", 1.0)]), fresh_a)


def test_a_load_that_fails_inside_diffusers_unloads_every_lora(store, monkeypatch):
    cache = AdapterCache(build_preset("tiny"), store)
    cache.activate([{"name": "A", "scale": 1.0}])
    real = cache.pipe.load_lora_weights

    def half_load(state_dict, adapter_name):  # diffusers fails after wrapping layers
        real(state_dict, adapter_name=adapter_name)
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(cache.pipe, "load_lora_weights", half_load)
    with pytest.raises(AdapterError, match="'B'.*did not load.*out of memory.*base model"):
        cache.activate([{"name": "B", "scale": 1.0}])
    assert peft_layers(cache.pipe) == 0 and cache.stats()["loaded"] == []
    assert set(cache.pipe.unet.state_dict()) == set(build_preset("tiny").unet.state_dict())
    assert not cache.activate([]), "the cache knows the pipeline is the base model"


# -- bounds ---------------------------------------------------------------------------------------------

def test_least_recently_used_adapters_are_evicted_within_the_bounds(tiny_shape, fresh_a, store, tmp_path):
    files = {f"L{i}.safetensors": save({f"unet.{k}": v for k, v in
                                         make_lora(tiny_shape.unet, UNET_TARGETS, seed=20 + i).items()})
             for i in range(4)}
    files["A.safetensors"] = store.fs.cat_file(f"{store.root}/A.safetensors")
    s = new_store(files)
    cache = AdapterCache(build_preset("tiny"), s, max_adapters=2)

    def loaded():
        return sorted(cache.stats()["loaded"]), sorted(cache.pipe.get_list_adapters()["unet"])

    for name in ("L0", "L1", "L0", "L2"):  # L0 is touched again, so L1 is the least recently used
        cache.activate([{"name": name, "scale": 1.0}])
    assert loaded()[0] == ["L0", "L2"] and len(loaded()[1]) == 2 and cache.evictions == 1
    # the adapters one row needs are never evicted, even past the bound; the next row shrinks the cache again
    cache.activate([{"name": n, "scale": 1.0} for n in ("L1", "L2", "L3")])
    assert loaded()[0] == ["L1", "L2", "L3"]
    cache.activate([{"name": "A", "scale": 1.0}])
    assert loaded()[0] == ["A", "L3"] and len(loaded()[1]) == 2
    # bytes bound: room for one adapter only
    one = cache.stats()["loaded_bytes"] // 2
    small = AdapterCache(build_preset("tiny"), s, max_bytes=one + one // 2)
    for name in ("A", "L0", "A"):
        small.activate([{"name": name, "scale": 1.0}])
    assert small.stats()["loaded"] == ["A"] and small.evictions == 2 and small.loads == 3
    assert np.array_equal(draw_with(small, [("A", 1.0)]), fresh_a), "evicted and reloaded"


# -- Textual Inversion ------------------------------------------------------------------------------------

def test_embeddings_add_their_token_and_change_only_prompts_that_use_it(tiny_shape):
    width = tiny_shape.text_encoder.get_input_embeddings().embedding_dim
    sparkle = torch.randn(width, generator=torch.Generator().manual_seed(5))
    s = new_store({
        "sparkle.safetensors": save({"<sparkle>": sparkle}),  # diffusers: the key is the token
        "glow.safetensors": save({"emb_params": torch.randn(2, width)}),  # kohya/A1111: the file name is
        "wide.safetensors": save({"emb_params": torch.randn(1, 1024)}),
    })
    info = s.resolve("sparkle")
    assert (info.kind, info.format, info.token) == ("embedding", "embedding", "<sparkle>")
    assert s.resolve("glow").token == "glow"
    pipe = build_preset("tiny")
    plain = "a red mug on a white background"
    before = pipe.encode_prompt(plain, "cpu", 1, False)[0]
    cache = AdapterCache(pipe, s)
    assert cache.activate([{"name": "sparkle", "scale": 1.0}, {"name": "glow", "scale": 1.0}])
    token_id = pipe.tokenizer.convert_tokens_to_ids("<sparkle>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], sparkle)
    assert "glow_1" in pipe.tokenizer.get_vocab()  # two vectors, two tokens
    assert torch.equal(pipe.encode_prompt(plain, "cpu", 1, False)[0], before), "prompts without the token"
    assert not torch.equal(pipe.encode_prompt("a <sparkle> mug", "cpu", 1, False)[0],
                           build_preset("tiny").encode_prompt("a <sparkle> mug", "cpu", 1, False)[0])
    assert not cache.activate([]) and cache.loads == 2  # nothing to switch off
    with pytest.raises(AdapterError, match="'wide'.*1024 wide.*takes 64"):
        cache.activate([{"name": "wide", "scale": 1.0}])
    with pytest.raises(AdapterError, match="'sparkle'.*no scale"):
        cache.activate([{"name": "sparkle", "scale": 0.5}])
    # a word the tokenizer has (`red` is one token: a vocabulary lookup alone misses it), added as a token,
    # would change every prompt with the word on this actor and split longer words
    red = new_store({"red.safetensors": save({"emb_params": torch.randn(1, width)}),
                     "colour.safetensors": save({"red": torch.randn(width)})})
    with pytest.raises(AdapterError, match="'red'.*'red' is already a word.*rename the file: its name is the token"):
        AdapterCache(build_preset("tiny"), red).activate([{"name": "red", "scale": 1.0}])
    with pytest.raises(AdapterError, match="'colour'.*'red' is already a word.*save it again under a new token"):
        AdapterCache(build_preset("tiny"), red).activate([{"name": "colour", "scale": 1.0}])


# -- GPU tier -----------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_swaps_leave_no_trace_on_cuda_in_fp16(store):
    def pipe():
        return build_preset("tiny").to("cuda", torch.float16)

    fresh = draw_with(AdapterCache(pipe(), store), [("A", 1.0)])
    base = draw_with(AdapterCache(pipe(), store))
    cache = AdapterCache(pipe(), store)
    for adapters in ([("A", 1.0)], [("B", 1.0)], [("A", 1.0), ("B", 0.5)]):
        draw_with(cache, adapters)
    assert_same_pixels(draw_with(cache, [("A", 1.0)]), fresh, "A -> B -> blend -> A on cuda")
    assert np.array_equal(draw_with(cache, []), base), "none is the exact base model on cuda"


@pytest.mark.parametrize("layers", ["attention", "transformer", "all"])
def test_what_the_trainer_writes_loads_as_the_same_unet(layers, tmp_path):
    """`finetune lora --lora-layers X` writes through actors.lora_io; loaded back through the store into
    the eager cache, the UNet must compute what the trained UNet computed, convolutions (LoCon) included."""
    from actors.lora_io import ADAPTER_NAME, LORA_LAYER_SETS, add_unet_lora, save_lora

    trained = build_preset("tiny")
    count = add_unet_lora(trained.unet, rank=4, alpha=2.0, targets=LORA_LAYER_SETS[layers])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # peft starts B at zero: give every B a value, so every layer counts
        for name, p in trained.unet.named_parameters():
            if f"lora_B.{ADAPTER_NAME}" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_lora(trained.unet, None, tmp_path / layers)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in trained.unet.named_parameters() if ".lora_A." in n}
    convs = {n for n in wrapped if isinstance(trained.unet.get_submodule(n).base_layer, torch.nn.Conv2d)}
    assert bool(convs) == (layers == "all")  # only `all` reaches the convolutions
    if layers == "all":
        assert "up_blocks.2.resnets.0.conv2" in convs  # the full-resolution level that has no attention

    cache = AdapterCache(build_preset("tiny"), AdapterStore(str(tmp_path)))
    cache.activate([{"name": layers, "scale": 1.0, "fingerprint": None}])
    x = torch.randn(1, 4, 32, 32, generator=g)
    text = torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        want = trained.unet(x, 500, encoder_hidden_states=text).sample
        got = cache.pipe.unet(x, 500, encoder_hidden_states=text).sample
        base = build_preset("tiny").unet(x, 500, encoder_hidden_states=text).sample
    assert count > 0 and not torch.allclose(want, base, atol=1e-3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("saved_by", ["save_lora_weights", "save_lora_adapter"])
def test_a_lora_keeping_its_alphas_in_the_file_metadata_draws_at_the_strength_it_was_trained_at(tmp_path, saved_by):
    """diffusers and peft keep a LoRA's lora_alpha, alpha_pattern and use_rslora in the file's metadata, not in
    its tensors; read without it, a LoRA trained at alpha 8, rank 4 was drawn at half its strength."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from actors.lora_map import delta, lora_layers

    trained = build_preset("tiny")
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k"], init_lora_weights=False,
                                        alpha_pattern={"to_k": 2}))
    if saved_by == "save_lora_weights":
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet),
                                                  unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict())
    else:
        trained.unet.save_lora_adapter(tmp_path)
    store = new_store({"meta.safetensors": (tmp_path / "pytorch_lora_weights.safetensors").read_bytes()})
    _, state_dict = store.load_planned("meta")
    layers = lora_layers(build_preset("tiny"), state_dict)
    wanted = {f"unet.{name}": module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight)
              for name, module in trained.unet.named_modules() if hasattr(module, "lora_A")}
    assert set(layers) == set(wanted) and {m.scaling["default"] for m in trained.unet.modules()
                                           if hasattr(m, "scaling")} == {2.0, 0.5}
    for name, (a, b) in layers.items():
        torch.testing.assert_close(delta(a, b), wanted[name].detach(), msg=name)


def test_a_peft_save_pretrained_adapter_is_refused_naming_where_its_alphas_are():
    tensors = {"base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight":
               torch.zeros(4, 32), "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
               ".lora_B.weight": torch.zeros(32, 4)}
    store = new_store({"peft.safetensors": save(tensors)})
    cache = AdapterCache(build_preset("tiny"), store)
    with pytest.raises(AdapterError, match="peft `save_pretrained` adapter .*adapter_config.json"):
        cache.activate([{"name": "peft", "scale": 1.0}])


@pytest.mark.parametrize("targets", [("self_attn.q_proj", "mlp.fc1"), ("mlp.fc1", "mlp.fc2")])
def test_a_kohya_text_encoder_lora_over_attention_and_mlp_layers_is_read_whole(targets):
    """diffusers gives kohya's text-encoder attention and MLP layers back in two spellings, and its converters
    guess one spelling per dict: the fused backends dropped the attention layers of a mixed file (drawing
    another LoRA, `ok`), and eager refused a file of MLP layers alone."""
    from actors.lora_map import delta, lora_layers

    pipe = build_preset("tiny")
    modules = dict(pipe.text_encoder.named_modules())
    generator = torch.Generator().manual_seed(3)
    state, merged = {}, build_preset("tiny")
    merged_modules = dict(merged.text_encoder.named_modules())
    for layer, target in enumerate(targets):
        path = f"encoder.layers.{layer}.{target}"
        weight = modules[path].weight
        down = torch.randn(4, weight.shape[1], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], 4, generator=generator) * 0.3
        key = "lora_te_text_model_" + path.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
        with torch.no_grad():
            merged_modules[path].weight += 0.5 * up @ down  # alpha 2 / rank 4
    layers = lora_layers(pipe, state)
    assert sorted(layers) == sorted(f"text_encoder.encoder.layers.{i}.{t}" for i, t in enumerate(targets))
    for name, (a, b) in layers.items():
        key = "lora_te_text_model_" + name.removeprefix("text_encoder.").replace(".", "_")
        torch.testing.assert_close(delta(a, b), 0.5 * state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"])
    cache = AdapterCache(pipe, new_store({"te.safetensors": save(state)}))
    cache.activate([{"name": "te", "scale": 1.0}])
    ids = pipe.tokenizer(["a red star"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], merged.text_encoder(ids)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", [1, 5])
def test_a_convolution_lora_of_another_kernel_size_is_refused_naming_the_layer(tiny_shape, kernel):
    """A 1x1 down matrix on a 3x3 layer was written into all nine taps by the compile backend (`ok`, other
    pixels); a 5x5 one failed with a bare broadcasting error."""
    conv = tiny_shape.unet.down_blocks[0].resnets[0].conv1
    state = {"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.zeros(4, conv.in_channels, kernel, kernel),
             "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.zeros(conv.out_channels, 4, 1, 1)}
    with pytest.raises(AdapterError, match=rf"does not fit .*conv1.lora_A is \(4, 32, {kernel}, {kernel}\), the layer "
                                           r"is \(32, 32, 3, 3\)"):
        check_lora_fits(tiny_shape, "x", state)


@pytest.mark.parametrize("layers", ["attention", "all"])
def test_plain_diffusers_reads_the_lora_a_finetune_writes_as_it_was_trained(tmp_path, layers):
    """docs/fine-tuning.md says the file fine-tunes write means the same to every loader. diffusers' own
    load_lora_weights dropped every attention layer of a file that mixed peft's and diffusers' spellings (the
    LoCon set), warning only through peft."""
    from actors.lora_io import LORA_LAYER_SETS, add_text_encoder_lora, add_unet_lora, save_lora

    trained = build_preset("tiny")
    add_unet_lora(trained.unet, 3, 7.0, LORA_LAYER_SETS[layers])  # alpha / rank folds into the file as 7/3
    add_text_encoder_lora(trained.text_encoder, 3, 7.0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in [*trained.unet.named_parameters(), *trained.text_encoder.named_parameters()]:
            if ".lora_" in name:  # B starts at zero: the LoRA must change something to be checked
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    save_lora(trained.unet, trained.text_encoder, tmp_path / "mug")

    loaded = build_preset("tiny")
    loaded.load_lora_weights(str(tmp_path / "mug"))
    latents, enc = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 64, generator=generator)
    ids = trained.tokenizer(["a red mug"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        want_unet, want_text = trained.unet(latents, 500, enc).sample, trained.text_encoder(ids)[0]
        got_unet, got_text = loaded.unet(latents, 500, enc).sample, loaded.text_encoder(ids)[0]
        base_unet = build_preset("tiny").unet(latents, 500, enc).sample
    assert (want_unet - base_unet).abs().max() > 0.05, "the LoRA must show"
    assert torch.allclose(got_unet, want_unet, atol=1e-5), float((got_unet - want_unet).abs().max())
    assert torch.allclose(got_text, want_text, atol=1e-5), float((got_text - want_text).abs().max())


def test_adapter_files_the_actors_would_draw_wrong_are_refused_naming_the_cause(tmp_path):
    """Found only while drawing before: a NaN came out as a NaN image blamed on the scale, an embedding of no
    vectors as a bare IndexError, an int8 LoRA was drawn as if its integers were weights and marked ok, metadata
    nested where diffusers writes flat keys drawn at alpha = rank. The header-only ones, and a DoRA, are now
    refused by the driver (AdapterStore.describe), so --plan-only says the rows would fail."""
    from safetensors.torch import save_file

    a, b = torch.randn(4, 64), torch.randn(64, 4)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    files = {
        "empty-embedding": ({"<tok>": torch.zeros(0, 64)}, None, "holds an empty tensor ('<tok>', shape [0, 64])"),
        "int8": ({f"{key}.lora_A.weight": a.to(torch.int8), f"{key}.lora_B.weight": b.to(torch.int8)}, None,
                 f"holds LoRA matrices of I8 ('{key}.lora_A.weight'"),  # the first key, every time (it varied: QA)
        "dora": ({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b, f"{key}.lora_magnitude_vector": torch.ones(64)},
                 None, "is a DoRA (weight-decomposed LoRA"),
        "nested": ({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b},
                   {"lora_adapter_metadata": json.dumps({"unet": {"r": 4, "lora_alpha": 1}})},
                   "has lora_adapter_metadata in a layout sdfleet does not read ('unet' holds the part's settings"),
    }
    for name, (tensors, metadata, said) in files.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        for _ in range(4):
            with pytest.raises(AdapterError, match=re.escape(f"adapter {name!r}: {said}")):
                AdapterStore(str(tmp_path)).describe(name)
    # NaN and infinite values, in every float type a file may hold: the driver reads each file whole (its hash),
    # so it finds them too (the plan counted such rows as drawn: adapters QA)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2,
                  torch.float8_e4m3fn):
        for value in (float("nan"), float("inf"), float("-inf")):
            if dtype == torch.float8_e4m3fn and math.isinf(value):  # (no infinity in this type)
                continue
            bad = b.clone().to(dtype)
            bad[3, 1] = value
            assert bad.float().isnan().any() or bad.float().isinf().any(), (dtype, value)
            save_file({f"{key}.lora_A.weight": a.to(dtype), f"{key}.lora_B.weight": bad},
                      str(tmp_path / "nan.safetensors"))
            said = re.escape(f"adapter 'nan': holds NaN or infinite values (in '{key}.lora_B.weight'): the file is "
                             "damaged")
            with pytest.raises(AdapterError, match=said):
                AdapterStore(str(tmp_path)).describe("nan")
            with pytest.raises(AdapterError, match=said):  # the actor's own load (a file changed after the plan)
                AdapterStore(str(tmp_path)).load_planned("nan")
            big = b.to(dtype)  # finite extremes pass: the largest value of each type is no infinity
            big[3, 1] = torch.finfo(dtype).max
            save_file({f"{key}.lora_A.weight": a.to(dtype), f"{key}.lora_B.weight": big},
                      str(tmp_path / "big.safetensors"))
            AdapterStore(str(tmp_path)).describe("big")


@pytest.mark.parametrize("drop, said", [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
     "has 'lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight' but no lora_up"),
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
     "has 'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight' but no lora_A"),
    (None, "has 'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.bias', a LoRA bias"),
])
def test_a_lora_layer_cut_in_half_or_with_a_bias_is_refused_by_the_driver(tmp_path, loras, drop, said):
    """Seen only at the actor (so --plan-only counted the rows as drawn), and a kohya layer without its up matrix
    as diffusers' raw KeyError: both are in the file's header, and the driver reads it."""
    from safetensors.torch import save_file

    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    state = to_kohya(loras["A"]) if drop and drop.startswith("lora_unet_") else {
        f"unet.{k}": v for k, v in loras["A"].items()}
    if drop:
        del state[drop]
    else:
        state[f"unet.{key}.lora_B.bias"] = torch.ones(320)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "x.safetensors"))
    with pytest.raises(AdapterError, match=re.escape(f"adapter 'x': {said}")):
        AdapterStore(str(tmp_path)).describe("x")


def test_a_lora_for_sdxl_or_without_part_names_is_refused_by_the_driver_as_the_actor_refuses_it(tmp_path, loras,
                                                                                                tiny_shape):
    """Both show in the header, yet only the actor refused them (adapters QA): a file with a second text encoder's
    layers (SDXL's, as kohya and diffusers spell them) and peft keys without `unet.` and without the settings
    `unet.save_lora_adapter` writes beside them. The same keys with those settings are that method's file: used."""
    from safetensors.torch import save_file

    te2 = "text_model.encoder.layers.0.self_attn.q_proj"
    unet = {f"unet.{k}": v for k, v in loras["A"].items()}
    bare = dict(loras["A"])
    first_bare = sorted(bare)[0]
    files = {
        "sdxl-kohya": ({**to_kohya(loras["A"]), f"lora_te2_{te2.replace('.', '_')}.lora_down.weight": torch.ones(4, 32),
                        f"lora_te2_{te2.replace('.', '_')}.lora_up.weight": torch.ones(32, 4)}, None,
                       "has weights for a second text encoder ('lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
                       ".lora_down.weight'), which Stable Diffusion 2 models do not have: a LoRA for SDXL?"),
        "sdxl": ({**unet, f"text_encoder_2.{te2}.lora_A.weight": torch.ones(4, 32),
                  f"text_encoder_2.{te2}.lora_B.weight": torch.ones(32, 4)}, None,
                 f"has weights for a second text encoder ('text_encoder_2.{te2}.lora_A.weight')"),
        "bare": (bare, None, f"has peft keys without the part they belong to in front (such as {first_bare!r}; "
                             "`unet.` or `text_encoder.`) and without the settings `unet.save_lora_adapter` writes"),
    }
    for name, (tensors, metadata, said) in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(AdapterError, match=re.escape(f"adapter {name!r}: {said}")):
            AdapterStore(str(tmp_path)).describe(name)
        with pytest.raises(AdapterError, match=re.escape(f"adapter {name!r}: {said}")):  # the actor's words too
            check_lora_fits(tiny_shape, name, tensors)
    settings = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4, "target_modules": ["to_q"]})}
    save_file({k: v.contiguous() for k, v in bare.items()}, str(tmp_path / "adapter.safetensors"), metadata=settings)
    assert AdapterStore(str(tmp_path)).describe("adapter").kind == "lora"


@pytest.mark.parametrize("down, up, said", [
    ((4, 320), (320, 8), "of rank 4 but '{key}.lora_B.weight' of rank 8: the two cannot multiply"),
    ((4,), (320, 4), "of shape [4]: a LoRA matrix has two dimensions"),
])
def test_a_lora_layer_whose_matrices_cannot_multiply_is_refused_by_the_driver(tmp_path, tiny_shape, down, up, said):
    """Its header says so, but only the actor found it, as peft's 'rank 256 down but 4 up' (QA)."""
    from safetensors.torch import save_file

    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{key}.lora_A.weight": torch.ones(down), f"{key}.lora_B.weight": torch.ones(up)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    message = re.escape(f"adapter 'x': has '{key}.lora_A.weight' " + said.format(key=key))
    with pytest.raises(AdapterError, match=message):
        AdapterStore(str(tmp_path)).describe("x")
    with pytest.raises(AdapterError, match=message):  # the actor's words too
        check_lora_fits(tiny_shape, "x", tensors)


def test_a_store_given_as_a_file_or_a_link_to_nothing_is_said_as_such(tmp_path):
    """--adapters naming an adapter's file started Ray and failed every row with "'pa' is not in the adapter store
    .../pa.safetensors ...; the store holds: pa"; a link to a file since deleted was said the same way."""
    from safetensors.torch import save_file

    from jobs.errors import RunFailed
    from jobs.generate import resolve_adapters

    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 64), f"{key}.lora_B.weight": torch.randn(64, 4)},
              str(tmp_path / "pa.safetensors"))
    with pytest.raises(RunFailed, match=re.escape(f"--adapters {tmp_path / 'pa.safetensors'} is a file; give the "
                                                  "folder (or URI) that holds the adapters")):
        resolve_adapters(str(tmp_path / "pa.safetensors"), {"pa"})
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "deleted.safetensors")
    fingerprints, errors = resolve_adapters(str(tmp_path), {"pa", "gone"})
    assert set(fingerprints) == {"pa"} and errors == {"gone": (
        f"adapter 'gone': {tmp_path / 'gone.safetensors'} is a link to {tmp_path / 'deleted.safetensors'}, which "
        "does not exist")}


def test_an_adapter_store_that_does_not_answer_is_not_said_to_be_missing():
    """An http:// store whose host does not answer was "--adapters URL does not exist": fsspec's `exists` says
    False for every error; the store is asked again so that its own error is said."""
    from jobs.errors import RunFailed
    from jobs.generate import resolve_adapters

    with pytest.raises(RunFailed, match=r"^--adapters http://127\.0\.0\.1:9/adapters cannot be read \(a store refused "
                                        r"or did not answer: ClientConnectorError"):
        resolve_adapters("http://127.0.0.1:9/adapters", {"x"})
