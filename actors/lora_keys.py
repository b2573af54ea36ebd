"""What a LoRA file's keys and settings say that sdfleet will not draw, read without torch: the driver asks with a
file's header (actors.adapters, before any actor), an actor again with its tensors (actors.lora_map)."""

from __future__ import annotations


def not_applied(state_dict, metadata: dict) -> str | None:
    """Why sdfleet refuses a file whose parts it would not apply (or whose alphas it cannot know), or None:
    drawn without them, the LoRA would be another, with the row marked `ok`. `state_dict`: the file's tensors
    by key (only the keys are read: the driver asks with the file's header, an actor again with its tensors);
    `metadata`: its lora_adapter_metadata."""
    second = next((k for k in sorted(state_dict) if k.startswith(("text_encoder_2.", "lora_te2_"))), None)
    if second is not None:  # every model sdfleet loads is a Stable Diffusion 2 pipeline: one CLIP text encoder
        return (f"has weights for a second text encoder ({second!r}), which Stable Diffusion 2 models do not have: a "
                "LoRA for SDXL? Train or pick one for this model")
    if not (metadata and all(k.startswith(UNET_ROOTS) for k in state_dict)):  # (else unet.save_lora_adapter's file)
        bare = next((k for k in sorted(state_dict) if k.endswith((".lora_A.weight", ".lora_B.weight"))
                     and not k.startswith(("unet.", "text_encoder.", "base_model.model."))), None)
        if bare is not None and not bare.startswith((*UNET_ROOTS, "text_model.")):  # (vae., ...: another part)
            return no_part_for(bare)
        if bare is not None:  # a UNet's or text encoder's own paths: diffusers reads them only with the part in front
            return (f"has peft keys without the part they belong to in front (such as {bare!r}; `unet.` or "
                    "`text_encoder.`) and without the settings `unet.save_lora_adapter` writes beside them, so "
                    "neither their part nor their alphas are known; save it with diffusers' `save_lora_weights`")
    bias = next((k for k in state_dict if k.endswith(_BIASES)), None)
    if bias is not None:  # part of the layer's output, not droppable
        return f"has {bias!r}, a LoRA bias, which sdfleet does not apply"
    if half := _half_layer(state_dict) or _unmatched_ranks(state_dict):
        return half
    bundled = next((k for k in state_dict if k.startswith("bundle_emb.")), None)
    if bundled is not None:
        return (f"bundles Textual Inversion embeddings with its LoRA ({bundled!r}), which sdfleet does not load from "
                "a LoRA file: save each embedding as a file of its own in the store and name both in the rows' "
                "`adapters`")
    tucker = next((k for k in state_dict if ".lora_mid." in k), None)
    if tucker is not None:
        return (f"is a LyCORIS LoCon with Tucker decomposition ({tucker!r}), which sdfleet does not apply; export "
                "it as a plain LoRA (or merge it into a model)")
    peft_saved = next((k for k in state_dict if k.startswith("base_model.model.")), None)
    if peft_saved is not None:  # its alphas are in adapter_config.json beside it: drawn without, at another strength
        return (f"is a peft `save_pretrained` adapter ({peft_saved!r}), whose alphas are in its adapter_config.json, "
                "not in the file; save it with diffusers' `StableDiffusionPipeline.save_lora_weights` (or "
                "`get_peft_model_state_dict` with the `unet.` prefix and the adapter's metadata)")
    dora = next((k for k in state_dict if "dora_scale" in k or "lora_magnitude_vector" in k), None)
    dora = dora or next((f"{k}: true" for k, v in metadata.items() if k.endswith("use_dora") and v), None)
    if dora is not None:  # diffusers drops kohya's dora_scale with a log line; the pixels would be a plain LoRA's
        return (f"is a DoRA (weight-decomposed LoRA, {dora!r}), which sdfleet does not apply; use a plain LoRA (or "
                "merge the DoRA into a model)")
    nested = next((k for k, v in metadata.items() if k in ("unet", "text_encoder") and isinstance(v, dict)), None)
    if nested is not None:  # its alphas unread, the LoRA was drawn at alpha = rank (4x, one file's) and marked ok
        return (f"has lora_adapter_metadata in a layout sdfleet does not read ({nested!r} holds the part's "
                "settings as a JSON object; diffusers' save_lora_weights writes flat keys, such as "
                "'unet.lora_alpha'): its alphas would go unread and the LoRA be drawn at another strength; save it "
                "with save_lora_weights")
    return None


def no_part_for(example: str) -> str:
    """Why a file whose keys name no part of the pipeline (`unet.`, `text_encoder.`) is refused."""
    return (f"has keys this model has no part for, such as {example!r}; a LoRA names its layers `unet.<module>` and "
            "`text_encoder.<module>` (diffusers, peft) or `lora_unet_...` and `lora_te_...` (kohya)")


# The UNet's top-level modules: the keys `unet.save_lora_adapter` writes start with one (without `unet.`)
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.")

# A LoRA layer's two matrices in each spelling: (down, up) key endings
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
          (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
          (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
_BIASES = tuple(end.replace(".weight", ".bias") for pair in _PAIRS for end in pair)


def _half_layer(state_dict) -> str | None:
    """Why a file whose layer has one of its two matrices is refused (a damaged or partly saved file), or None:
    diffusers' conversions raise a bare KeyError for it, or draw the layer without it."""
    keys = set(state_dict)
    for down, up in _PAIRS:
        for key in sorted(keys):
            for have, want in ((down, up), (up, down)):
                if key.endswith(have) and key[: -len(have)] + want not in keys:
                    return (f"has {key!r} but no {want.removesuffix('.weight').lstrip('._')} matrix for that layer: "
                            "a damaged or partly saved file; save it again")
    return None


def _unmatched_ranks(state_dict) -> str | None:
    """Why a file whose layer's two matrices cannot multiply is refused (a damaged file, one saved by a broken
    tool), or None: the down matrix is [rank, in, ...], the up one [out, rank, ...]. `state_dict`'s values are
    tensors (an actor's) or (dtype, shape) pairs (the driver's header)."""
    def shape(value) -> list[int]:
        return list(value.shape) if hasattr(value, "shape") else list(value[1])

    for down, up in _PAIRS:
        for key in sorted(k for k in state_dict if k.endswith(down)):
            pair = key[: -len(down)] + up
            if pair not in state_dict:
                continue
            a, b = shape(state_dict[key]), shape(state_dict[pair])
            if len(a) < 2 or len(b) < 2:
                flat, dims = (key, a) if len(a) < 2 else (pair, b)
                return (f"has {flat!r} of shape {dims}: a LoRA matrix has two dimensions (four for a convolution); "
                        "a damaged file, save it again")
            if a[0] != b[1]:
                return (f"has {key!r} of rank {a[0]} but {pair!r} of rank {b[1]}: the two cannot multiply; a damaged "
                        "file, save it again")
    return None
