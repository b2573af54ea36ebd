"""Built-in model presets: Stable Diffusion's own architecture, at two sizes.

- `tiny`: a small SD model (UNet2DConditionModel, an 8x AutoencoderKL, a CLIP text encoder, the offline
  tokenizer) at 256x256, fast on a CPU. Its weights, trained by `python -m benchmarks.train_tiny --install`,
  load from `actors/presets/tiny/<component>/` (safetensors, plus configs for values training sets).
- `tiny-random`: the same architecture, always the fixed random init: what `python -m benchmarks.train_tiny`
  trains from, so rerunning it never starts from the weights it installed.
- `sd21-random`: the real SD 2.1 (768, v-prediction) architecture and scheduler with random weights, for
  benchmarks and export tests. The same code loads the real SD 2.1 from a directory or URI.

Random inits are seeded, so every actor and every run builds bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

PRESET_DIR = Path(__file__).parent / "presets"
TOKENIZER_DIR = PRESET_DIR / "tokenizer"

# SD 2.1's noise schedule (stabilityai/stable-diffusion-2-1 scheduler_config.json): v-prediction.
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
}

PRESETS: dict[str, dict] = {
    "tiny": {
        "defaults": {"width": 256, "height": 256, "steps": 20, "scheduler": "ddim"},
        "unet": {
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 1,
            "block_out_channels": [32, 64, 64],
            # No attention at the full 32x32 latent: there it costs 5x the rest of the UNet on a CPU.
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "cross_attention_dim": 64,
            # diffusers reads this as the number of heads: 2 heads of 32 channels. Eight heads of 8 made the
            # attention score matrices 4x larger and a training step 1.46x slower on a CPU (benchmarks/bench_heads.py).
            "attention_head_dim": 2,
            "norm_num_groups": 8,
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,  # 4 blocks: the usual 8x downsampling
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 16, 32, 32],
            "layers_per_block": 1,
            "latent_channels": 4,
            # One group over all channels. With 8 groups, each 8-channel full-resolution layer normalised every
            # channel on its own, and the VAE lost colour: 7,000 steps reached whole-image loss 0.0086 and
            # 10.9 levels of colour error; one group reaches 0.0026 and 4.3 in 4,000 (docs/tiny-recipe.md).
            "norm_num_groups": 1,
            "sample_size": 256,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 64,
            "vocab_size": None,  # the offline tokenizer's size
            "pad_token_id": 0,
        },
        "scheduler": SD21_SCHEDULER,
    },
    "sd21-random": {
        "defaults": {"width": 768, "height": 768, "steps": 30, "scheduler": "ddim"},
        "unet": {
            "sample_size": 96,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "norm_num_groups": 32,
            "use_linear_projection": True,
            "upcast_attention": True,  # fp16 SD 2.x gives NaN/black images without it
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 768,
            "scaling_factor": 0.18215,
        },
        # OpenCLIP ViT-H/14's text tower, as SD 2.x ships it (the penultimate layer, hence 23 layers).
        "text_encoder": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "max_position_embeddings": 77,
            "hidden_act": "gelu",
            "projection_dim": 512,
            "vocab_size": 49408,
            "pad_token_id": 0,
        },
        "scheduler": SD21_SCHEDULER,
    },
}


PRESETS["tiny-random"] = PRESETS["tiny"]


def preset_name_problem(name: str, ref: str) -> str | None:
    """Why `--model NAME=REF` may not be: NAME is a preset's, for another model (rows naming it would draw REF in
    this run and the preset in every other, under one row name); None where it is fine."""
    if name in PRESETS and ref != name:
        return (f"--model {name}={ref}: {name} is a preset's name (presets: {', '.join(sorted(PRESETS))}); give "
                f"this model a name of its own, such as --model {name}-1={ref}")
    return None
# Config keys an installed component may override: values training sets, never the architecture.
PRESET_OVERRIDABLE = {"scaling_factor"}
# Presets whose trained weights (and component configs) may be installed under PRESET_DIR/<name>/<component>/.
TRAINED = {"tiny"}


def _weights_dir(name: str) -> Path | None:
    folder = PRESET_DIR / name
    return folder if name in TRAINED and folder.is_dir() and any(folder.glob("*/*.safetensors")) else None


def preset_fingerprint(name: str) -> str:
    """Identify a preset's weights: its configs, plus its weight files or the random-init recipe."""
    h = hashlib.sha256(json.dumps(PRESETS[name], sort_keys=True).encode())
    folder = _weights_dir(name)
    if folder is not None:
        for path in sorted(p for p in folder.glob("*/*") if p.suffix in (".safetensors", ".json")):
            h.update(path.relative_to(PRESET_DIR).as_posix().encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    else:
        h.update(b"random-init:seed=0")
    for path in sorted(TOKENIZER_DIR.iterdir()):
        h.update(path.read_bytes())
    return f"preset:{name}:{h.hexdigest()[:16]}"


def _check_architecture(name: str, part: str, spec: dict, saved: dict) -> None:
    """Refuse installed weights trained under another architecture than the preset's. Some such weights load
    without a complaint from torch and then draw garbage: GroupNorm's weights have the same shapes whatever
    its number of groups."""
    differ = {k: (saved[k], v) for k, v in spec.items()
              if k in saved and k not in PRESET_OVERRIDABLE and json.loads(json.dumps(v)) != saved[k]}
    if differ:
        said = ", ".join(f"{k}: weights {w!r}, preset {p!r}" for k, (w, p) in sorted(differ.items()))
        raise ValueError(f"the installed {name!r} {part} was trained with another architecture than the preset "
                         f"({said}); install weights trained for this preset (python -m benchmarks.train_tiny --install) "
                         f"or change PRESETS[{name!r}][{part!r}] with them")


def build_preset(name: str):
    """Build a preset's StableDiffusionPipeline on the CPU in float32."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from actors.tokenizer import load_tokenizer

    spec = PRESETS[name]
    weights_dir = _weights_dir(name)
    if weights_dir is not None:  # a trained component's config wins (training may calibrate e.g. the VAE's scale)
        spec = dict(spec)
        for part in ("unet", "vae"):
            config = weights_dir / part / "config.json"
            if config.is_file():
                saved = json.loads(config.read_text())
                _check_architecture(name, part, spec[part], saved)
                spec[part] = {**spec[part], **{k: v for k, v in saved.items() if k in PRESET_OVERRIDABLE}}
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    te_config = dict(spec["text_encoder"])
    te_config["vocab_size"] = te_config["vocab_size"] or len(tokenizer)
    te_config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**spec["unet"])
        vae = AutoencoderKL(**spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_config))
    for part, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        files = sorted((weights_dir / part).glob("*.safetensors")) if weights_dir is not None else []
        if files:
            state = {}
            for f in files:
                state.update(load_file(f))
            module.load_state_dict(state, strict=True)
    scheduler_config = {k: v for k, v in spec["scheduler"].items() if k != "_class_name"}
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
