"""LoRA layers on a diffusers UNet through peft, and saving them as an adapter the store can load.

Training (`sdfleet finetune lora`) and the adapter benchmark both make LoRAs this way, so what they write
is exactly what generation actors load: diffusers-format keys, safetensors only.
"""

from __future__ import annotations

from pathlib import Path

import torch

# The attention projections of SD's UNet (self- and cross-attention), as in diffusers' training scripts.
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The UNet layers a LoRA can adapt, by `sdfleet finetune lora --lora-layers` (peft matches a name against
# the end of each module path, so "conv" is the down/upsamplers' convolution, not conv_in):
# - attention: the attention projections, the usual choice and the default;
# - transformer: every linear layer of the transformer blocks, which is what every backend can adapt
#   (actors.backends.ADAPTABLE);
# - all: also the ResNet convolutions and time projections ("LoCon"). Only these reach the UNet's
#   attention-free levels, such as `tiny`'s full-resolution blocks, where edges and corners are drawn;
#   the eager and compile backends run such a LoRA, onnx and tensorrt refuse it by name.
_TRANSFORMER = (*UNET_LORA_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
LORA_LAYER_SETS = {
    "attention": UNET_LORA_TARGETS,
    "transformer": _TRANSFORMER,
    "all": (*_TRANSFORMER, "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"),
}
ADAPTER_NAME = "default"


def add_unet_lora(unet, rank: int, alpha: float | None = None, targets=UNET_LORA_TARGETS) -> int:
    """Wrap the UNet's `targets` layers (default: the attention projections) in trainable rank-`rank` LoRA
    layers; returns their parameter count.

    The base weights are frozen; only the LoRA A/B matrices train. peft initialises B to zero, so the
    wrapped UNet starts out equal to the base.
    """
    return _add_lora(unet, rank, alpha, targets)


def _add_lora(model, rank: int, alpha: float | None, targets) -> int:
    """Freeze `model`, wrap its `targets` layers in trainable LoRA layers; returns their parameter count."""
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                                 init_lora_weights="gaussian", target_modules=list(targets)),
                      adapter_name=ADAPTER_NAME)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """A UNet's or text encoder's LoRA weights in diffusers spelling, `alpha / rank` folded into each B.

    Folding the scale in makes the file mean the same thing to every loader: diffusers, kohya-style
    tools and this project's adapter cache all assume alpha == rank when a file carries no alpha.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config[ADAPTER_NAME]
    scale = config.lora_alpha / config.r
    layers = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    out = {}
    for key, value in layers.items():
        value = value.detach().to("cpu", torch.float32).contiguous()
        out[key] = value * scale if ".lora_B." in key else value
    converted = convert_state_dict_to_diffusers(out)
    # diffusers renames only the attention projections (to_q.lora_A -> to_q.lora.down); with other layers
    # too (--lora-layers transformer/all) that would leave a file of two spellings, which diffusers' loader
    # reads only in part (it dropped every attention layer of a LoCon file). One spelling, peft's, then.
    return converted if not any(".lora_A." in key for key in converted) else out


def save_lora(unet, text_encoder, directory: str | Path) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` (the store's folder layout); returns the file.

    `text_encoder` is None when only the UNet has LoRA layers."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    StableDiffusionPipeline.save_lora_weights(
        directory, unet_lora_layers=lora_state_dict(unet),
        text_encoder_lora_layers=lora_state_dict(text_encoder) if text_encoder is not None else None,
        safe_serialization=True)
    return directory / "pytorch_lora_weights.safetensors"


# The text encoder's attention projections (CLIP), as in diffusers' training scripts.
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_text_encoder_lora(text_encoder, rank: int, alpha: float | None = None) -> int:
    """LoRA on the CLIP text encoder's attention projections; returns their parameter count."""
    return _add_lora(text_encoder, rank, alpha, TEXT_ENCODER_LORA_TARGETS)
