"""The fine-tune worker loop: one function that every Ray Train worker runs, the same on 1 or N workers.

    config -> model (full UNet, or LoRA on its attention, or the VAE) -> resume from the latest checkpoint
      (dreambooth, or lora with class data: each batch adds as many class samples, their loss weighted)
      -> loop: batch -> VAE latents -> noise at random timesteps -> UNet -> loss against the scheduler's
         target (epsilon or v) -> step; checkpoint every N steps, validation images every M
         (vae: batch -> random crops -> encode, sample, decode -> pixel loss + KL)
      -> rank 0 writes what `generate` loads: a diffusers model, or pytorch_lora_weights.safetensors

Data parallel: Ray Train wraps the model in DDP (gloo on CPU, NCCL on GPU), or with `fsdp` each UNet
block is sharded across the workers with FSDP2 (`fully_shard`). Every random choice (which
samples, which noise, which timesteps) is drawn from a generator seeded by (seed, step, rank), so a run
resumed from a checkpoint at step s continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

# -- config --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything a worker needs; the driver (jobs.finetune) checks it and fills the defaults."""

    method: Literal["full", "lora", "dreambooth", "vae", "textual-inversion"]
    data: str  # dataset URI (manifests.dataset layout)
    base: dict[str, Any]  # actors.models.ModelInfo fields of the base model
    out: str  # output URI: the model or LoRA lands at its root
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4  # per worker, per micro-step
    grad_accum: int = 1
    resolution: int = 256
    seed: int = 0
    warmup_steps: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    validate_every: int = 0  # 0: validation images only at the end
    validation_prompts: list[str] = field(default_factory=list)
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    caption_dropout: float = 0.0  # share of samples trained on the empty prompt (classifier-free guidance)
    ema_decay: float | None = None  # None: no EMA
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    rank: int = 4  # LoRA
    alpha: float | None = None  # LoRA; None: alpha = rank (scale 1)
    lora_layers: Literal["attention", "transformer", "all"] = "attention"  # LoRA: actors.lora_io.LORA_LAYER_SETS
    token: str | None = None  # textual-inversion: the new word (actors.textual_inversion)
    init_word: str | None = None  # textual-inversion: the word its vectors start from (None: the table's mean)
    vectors: int = 1  # textual-inversion: embedding vectors behind the token
    train_text_encoder: bool = False
    class_data: str | None = None  # prior preservation: a dataset of class images (dreambooth, lora)
    prior_loss_weight: float = 1.0  # prior preservation: weight of the class samples' loss
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP copies
    kl_weight: float = 1e-6  # vae: weight of the KL term against the pixel reconstruction loss
    crop: int = 0  # vae: train on random square crops of this size (0: whole images)
    crop_candidates: int = 1  # vae: random crops drawn per image; the busiest (largest pixel spread) trains
    crop_span: int = 0  # vae: a crop spans a random square of crop..crop_span px, resized to crop (0: crop px, no resize)
    pixel_loss: Literal["mse", "l1"] = "mse"  # vae: the reconstruction loss
    calibrate_scale: bool = False  # vae: set scaling_factor to 1 / std of the latents (a VAE trained from scratch)
    cache_latents: bool = False  # full/lora: encode every image once, not at every step
    torch_threads: int = 1  # CPU workers only


# -- the maths ------------------------------------------------------------------------------------------


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon models) or the velocity (v-prediction, SD 2.1 768).

    Following the scheduler's own `prediction_type` matters: training a v model on epsilon targets
    silently teaches it the wrong task.
    """
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported for training (epsilon, v_prediction)")


def snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon,
    min(snr, gamma) / (snr + 1) for v-prediction, whose loss already carries a factor snr + 1."""
    s = snr(noise_scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted, averaged over the batch (in fp32)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def prior_weights(instances: int, classes: int, weight: float) -> torch.Tensor | None:
    """Per-sample loss weights for a batch of `instances` then `classes` samples, such that
    `diffusion_loss`'s mean over the batch is DreamBooth's loss: mean(instance) + weight * mean(class)."""
    if not classes:
        return None
    total = instances + classes
    return torch.cat([torch.full((instances,), total / instances), torch.full((classes,), weight * total / classes)])


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def sample_indices(n: int, seed: int, step: int, micro: int, grad_accum: int, world: int, rank: int,
                   batch_size: int) -> list[int]:
    """The dataset rows this worker trains on at (step, micro-step): epochs of seeded permutations,
    cut into consecutive global batches, each worker taking its own slice. A function of the step only,
    so a resumed run sees exactly the samples it would have seen."""
    start = ((step * grad_accum + micro) * world + rank) * batch_size
    orders: dict[int, torch.Tensor] = {}  # one permutation per epoch the batch touches (at most two)
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(orders[epoch][offset]))
    return indices


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator for one micro-step's noise and timesteps on one worker."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank)


# -- the model ------------------------------------------------------------------------------------------


class Denoiser(torch.nn.Module):
    """Text encoder + UNet as one module, so DDP wraps one forward whether or not the encoder trains."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy_latents, timesteps, input_ids):
        encoder_hidden_states = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample


class Autoencoder(torch.nn.Module):
    """The VAE's round trip as one module (for DDP): pixels -> posterior sample -> pixels, and the KL."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, pixels, eps=None):
        posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.mean if eps is None else posterior.mean + posterior.std * eps
        return self.vae.decode(latents).sample, posterior.kl()


def vae_loss(recon: torch.Tensor, pixels: torch.Tensor, kl: torch.Tensor, kl_weight: float,
             pixel_loss: str = "mse") -> torch.Tensor:
    """Pixel reconstruction (in [-1, 1]) plus a small KL pull towards N(0, 1), which keeps latents well scaled.

    `pixel_loss` "l1" (the loss of the autoencoders behind Stable Diffusion) keeps pulling on small errors,
    where MSE's gradient fades; whether that settles hues sooner is not measured here (see the README)."""
    distance = F.l1_loss if pixel_loss == "l1" else F.mse_loss
    return distance(recon.float(), pixels.float()) + kl_weight * kl.float().mean() / pixels[0].numel()


def random_crops(pixels: torch.Tensor, size: int, generator: torch.Generator, candidates: int = 1,
                 span: int = 0) -> torch.Tensor:
    """One random square crop of `size` px per image (the VAE is convolutional: crops train it as well).

    With `candidates` > 1, that many crops are drawn per image and the busiest one (largest pixel spread)
    is kept: on product shots a random crop is often plain background, which teaches the VAE nothing
    about the object's colours and edges.

    With `span` > `size`, each crop covers a square of a random side between `size` and `span` px
    (at most the image), resized to `size` px (bilinear, antialiased): small crops keep the image's own
    scale, the largest see the whole image at a lower one. A VAE trained only on crops under 128 px
    reconstructs whole 256 px images worse than tiles of its crops' size; on `tiny`, spanning crops
    closed part of that gap, not all of it (docs/tiny-recipe.md)."""
    if not size or size >= pixels.shape[-1]:
        return pixels
    n, _, h, w = pixels.shape
    if span > size:
        sides = torch.randint(size, min(span, h, w) + 1, (n, candidates), generator=generator)
        tops = (torch.rand((n, candidates), generator=generator) * (h - sides + 1)).long().tolist()
        lefts = (torch.rand((n, candidates), generator=generator) * (w - sides + 1)).long().tolist()
        sides = sides.tolist()
    else:  # the draws of plain crops, unchanged since before spans: the recipe's weights stay bit for bit
        tops = torch.randint(0, h - size + 1, (n, candidates), generator=generator).tolist()
        lefts = torch.randint(0, w - size + 1, (n, candidates), generator=generator).tolist()
        sides = [[size] * candidates] * n
    crops = []
    for i in range(n):
        options = [_crop(pixels[i], t, l, side, size) for side, t, l in zip(sides[i], tops[i], lefts[i])]
        crops.append(max(options, key=lambda crop: float(crop.float().std())))  # one option: that crop
    return torch.stack(crops)


def _crop(image: torch.Tensor, top: int, left: int, side: int, size: int) -> torch.Tensor:
    """The `side` px square of `image` at (top, left), resized to `size` px if it is not that already."""
    crop = image[:, top:top + side, left:left + side]
    if side == size:
        return crop
    return F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)[0].clamp(-1, 1).to(image.dtype)


def trainee(cfg: TrainConfig, pipe) -> torch.nn.Module:
    """The module that trains: the VAE's round trip, or text encoder + UNet."""
    return Autoencoder(pipe.vae) if cfg.method == "vae" else Denoiser(pipe.unet, pipe.text_encoder)


def make_trainable(cfg: TrainConfig, pipe) -> int:
    """Freeze what does not train and mark what does; returns the trainable parameter count."""
    from actors.lora_io import LORA_LAYER_SETS, add_text_encoder_lora, add_unet_lora
    from actors.textual_inversion import add_placeholder

    pipe.vae.requires_grad_(cfg.method == "vae")
    pipe.text_encoder.requires_grad_(False)
    if cfg.method == "vae":
        pipe.unet.requires_grad_(False)
    elif cfg.method == "textual-inversion":  # only the new token's vectors train
        pipe.unet.requires_grad_(False)
        add_placeholder(pipe, cfg.token, cfg.init_word, cfg.vectors)
    elif cfg.method == "lora":
        add_unet_lora(pipe.unet, cfg.rank, cfg.alpha, LORA_LAYER_SETS[cfg.lora_layers])
        if cfg.train_text_encoder:
            add_text_encoder_lora(pipe.text_encoder, cfg.rank, cfg.alpha)
    else:
        pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(cfg.train_text_encoder)
    if cfg.gradient_checkpointing:
        (pipe.vae if cfg.method == "vae" else pipe.unet).enable_gradient_checkpointing()
    return sum(p.numel() for p in trainee(cfg, pipe).parameters() if p.requires_grad)


def batch_tensors(table, indices: list[int], tokenizer, resolution: int,
                  captions: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixels in [-1, 1], N x 3 x R x R; token ids, N x 77, or None with captions=False) for the given rows."""
    import io

    from PIL import Image

    from manifests.dataset import square_crop

    images = []
    for i in indices:
        with Image.open(io.BytesIO(table["image"][i].as_py())) as im:
            im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = square_crop(im, resolution)
            images.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return pixels, token_ids(table, indices, tokenizer) if captions else None


def token_ids(table, indices: list[int], tokenizer) -> torch.Tensor:
    """The captions of the given dataset rows as token ids, N x 77."""
    from actors.textual_inversion import expand_placeholders

    captions = [expand_placeholders(table["caption"][i].as_py(), tokenizer) for i in indices]
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_dataset(cfg: TrainConfig, table, vae, device, rank: int, world: int) -> dict[str, torch.Tensor]:
    """Every row's VAE posterior (mean and std, N x C x h x w, on the CPU), encoded once: each worker
    encodes every world-th row and all-gather shares them. Training then draws a fresh latent from the
    posterior at every step, exactly as encoding each batch would, without running the encoder again.
    Costs 2 x 4 x (R/8)^2 floats per image: 128 KB at 256 px, 295 KB at 768 px."""
    mine = list(range(rank, table.num_rows, world))
    means, stds = [], []
    for start in range(0, len(mine), cfg.batch_size):
        pixels, _ = batch_tensors(table, mine[start:start + cfg.batch_size], None, cfg.resolution, captions=False)
        posterior = vae.encode(pixels.to(device)).latent_dist
        means.append(posterior.mean.float().cpu())
        stds.append(posterior.std.float().cpu())
    local = {"rows": mine, "mean": torch.cat(means), "std": torch.cat(stds)}
    parts = [local]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, local)
    cache = {k: torch.empty((table.num_rows, *local["mean"].shape[1:])) for k in ("mean", "std")}
    for part in parts:
        for k in ("mean", "std"):
            cache[k][part["rows"]] = part[k]
    if rank == 0:
        print(f"[finetune] cached the latents of {table.num_rows} images", flush=True)
    return cache


@torch.no_grad()
def latent_scale(vae, pixels: torch.Tensor, batch_size: int = 16) -> float:
    """The scaling factor that gives the VAE's latents unit variance (1 / std of posterior samples), as
    Stable Diffusion chose 0.18215 for its own VAE: the noise schedule assumes unit-variance data, and a
    VAE trained from scratch rarely lands there (the tiny one's latents came out with std ~2.6). Unit
    variance is a starting point, not a law: for `tiny`, SD's 0.18215 (latent std 0.48, a noisier
    schedule) drew shapes better than the calibrated 0.38 in a side-by-side trial (see the README)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for start in range(0, len(pixels), batch_size):
        posterior = vae.encode(pixels[start:start + batch_size]).latent_dist
        samples.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(posterior.mean.device))
    return 1.0 / torch.cat(samples).float().std().item()


# -- checkpoints ----------------------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def gather_state(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(trainable weights, optimizer state), whole. Under FSDP every worker must call this (it gathers the
    shards); rank 0 gets the tensors, the others empty dicts."""
    if not fsdp:
        return trainable_state(model), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    weights, opt = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in weights.items() if k in names}, opt


def save_checkpoint(directory: str, step: int, weights: dict, optimizer_state: dict, lr_scheduler, scaler, ema) -> None:
    """Everything needed to continue at `step`, in safetensors (tensors) and JSON (the rest): no pickles."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(directory, "trainable.safetensors"))
    tensors = {f"{key}::{name}": value.detach().cpu().contiguous() if torch.is_tensor(value) else torch.tensor(value)
               for key, state in optimizer_state["state"].items() for name, value in state.items()}
    save_file(tensors, os.path.join(directory, "optimizer.safetensors"))
    meta = {"step": step, "param_groups": optimizer_state["param_groups"], "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict()}
    if ema is not None:
        ema_state = ema.state_dict()
        save_file({f"{i}": t.detach().cpu().contiguous() for i, t in enumerate(ema_state.pop("shadow_params"))},
                  os.path.join(directory, "ema.safetensors"))
        meta["ema"] = ema_state
    with open(os.path.join(directory, "state.json"), "w") as f:
        json.dump(meta, f, indent=1)


def load_checkpoint(directory: str, model, optimizer, lr_scheduler, scaler, ema, fsdp: bool = False) -> int:
    """Restore what save_checkpoint wrote into the model and optimizer; returns the step it was taken at.
    Under FSDP every worker reads the files and keeps its own shard."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "state.json")) as f:
        meta = json.load(f)
    weights = load_file(os.path.join(directory, "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise RuntimeError(f"checkpoint {directory} does not fit this model: {len(set(weights) ^ expected)} "
                           "trainable tensors differ (was it written by another --method or --rank?)")
    state: dict = {}
    for key, value in load_file(os.path.join(directory, "optimizer.safetensors")).items():
        owner, name = key.rsplit("::", 1)
        state.setdefault(int(owner) if owner.isdigit() else owner, {})[name] = value
    optimizer_state = {"state": state, "param_groups": meta["param_groups"]}
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state,
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(optimizer_state)
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    scaler.load_state_dict(meta["scaler"])
    if ema is not None and "ema" in meta:
        shadow = load_file(os.path.join(directory, "ema.safetensors"))
        ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
    return int(meta["step"])


def shard(denoiser: Denoiser, device, world: int) -> Denoiser:
    """FSDP2: each UNet block is its own shard group and the rest one root group, so parameters,
    gradients and optimizer state are split across workers instead of copied to each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    denoiser.to(device)
    mesh = init_device_mesh(device.type, (world,))
    unet = denoiser.unet
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)
    return denoiser


def drawable_pipeline(pipe, model, fsdp: bool, rank: int):
    """A pipeline that can draw (and be saved) with the current weights, on rank 0; None elsewhere.

    Under DDP that is the training pipeline itself. Under FSDP the weights are shards, so every worker
    gathers them (a collective) and rank 0 loads the whole into plain copies of the UNet and text encoder.
    """
    if not fsdp:
        return pipe if rank == 0 else None
    from diffusers import StableDiffusionPipeline
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    device = pipe.vae.device
    parts = {}
    for name in ("unet", "text_encoder"):
        original = getattr(pipe, name)
        copy = type(original)(original.config) if name == "text_encoder" else type(original).from_config(original.config)
        copy.load_state_dict({k[len(name) + 1:]: v for k, v in full.items() if k.startswith(name + ".")})
        parts[name] = copy.to(device)
    return StableDiffusionPipeline(vae=pipe.vae, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, **parts,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# -- validation images and the final output ---------------------------------------------------------


def validation_images(cfg: TrainConfig, pipe, step: int, device) -> list[str]:
    """Draw the validation prompts with the weights as they are now, through the actors' own `draw`."""
    import fsspec

    from actors.finish import image_parameters
    from actors.generate import draw
    from actors.png import png_bytes
    from manifests.ledger import atomic_write

    rows = [{"id": f"{i:02d}", "prompt": prompt, "negative_prompt": None, "seed": cfg.seed + i,
             "width": cfg.resolution, "height": cfg.resolution, "steps": cfg.base["steps"], "guidance_scale": 7.5,
             "scheduler": cfg.base["scheduler"], "model": "default", "adapters": [], "watermark": None,
             "model_fingerprint": cfg.base["fingerprint"], "params_hash": None}
            for i, prompt in enumerate(cfg.validation_prompts)]
    if not rows:
        return []
    training = pipe.unet.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    images = draw(pipe, rows)  # one group: same size, steps and scheduler
    pipe.unet.train(training)
    pipe.text_encoder.train(training and cfg.train_text_encoder)
    fs, root = fsspec.core.url_to_fs(cfg.out)
    written = []
    for row, rgb in zip(rows, images):
        path = f"{root}/validation/step-{step:06d}/{row['id']}.png"
        atomic_write(fs, path, png_bytes(rgb, {**image_parameters(row), "step": step}))
        written.append(path)
    return written


def roundtrip_images(cfg: TrainConfig, vae, pixels: torch.Tensor, step: int) -> list[str]:
    """vae: each fixed-batch image beside its round trip through the VAE, as one PNG per image."""
    import io

    import fsspec
    from PIL import Image

    from manifests.ledger import atomic_write

    training = vae.training
    vae.eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    vae.train(training)
    fs, root = fsspec.core.url_to_fs(cfg.out)
    written = []
    for i, (a, b) in enumerate(zip(pixels, recon)):
        pair = torch.cat([a, b], dim=2).clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(pair).save(buf, format="PNG")
        path = f"{root}/validation/step-{step:06d}/{i:02d}.png"
        atomic_write(fs, path, buf.getvalue())
        written.append(path)
    return written


def publish(cfg: TrainConfig, pipe) -> None:
    """Write the result where `generate` finds it: a diffusers model at the root of --out (full),
    --out/pytorch_lora_weights.safetensors (lora) or --out/learned_embeds.safetensors (textual-inversion).
    A trained VAE goes out as a whole model, like full."""
    import fsspec

    from actors.lora_io import save_lora
    from actors.textual_inversion import save_embedding

    fs, root = fsspec.core.url_to_fs(cfg.out)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.method == "lora":
            save_lora(pipe.unet, pipe.text_encoder if cfg.train_text_encoder else None, tmp)
        elif cfg.method == "textual-inversion":
            save_embedding(pipe.text_encoder, cfg.token, tmp)
        else:
            pipe.save_pretrained(tmp, safe_serialization=True)
            b = cfg.base
            with open(os.path.join(tmp, "sdfleet.json"), "w") as f:
                json.dump({"base": b["ref"], "width": b["width"], "height": b["height"], "steps": b["steps"],
                           "scheduler": b["scheduler"]}, f, indent=2)
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                local = os.path.join(dirpath, name)
                fs.makedirs(f"{root}/{os.path.relpath(dirpath, tmp)}".rstrip("/."), exist_ok=True)
                fs.put_file(local, f"{root}/{os.path.relpath(local, tmp)}")


# -- the loop -------------------------------------------------------------------------------------------


def train_loop(config: dict) -> None:
    """The Ray Train worker function (`TorchTrainer(train_loop, train_loop_config=asdict(TrainConfig))`)."""
    import fsspec
    import ray.train
    import ray.train.torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from actors.models import ModelInfo, load_pipeline
    from manifests.dataset import read_dataset
    from manifests.ledger import atomic_write

    cfg = TrainConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)  # same LoRA init everywhere (DDP also broadcasts rank 0's weights)

    # 1. the model: everything in fp32 (the master weights); autocast runs the maths in half on a GPU
    pipe = load_pipeline(ModelInfo(**cfg.base), "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    trainable = make_trainable(cfg, pipe)
    if rank == 0:
        print(f"[finetune] {cfg.method}: {trainable:,} trainable parameters", flush=True)
    pipe.vae.to(device)
    net = trainee(cfg, pipe)
    if cfg.fsdp:
        model = shard(net, device, world)
    else:
        # On CPUs, gloo's all-reduce competes with the backward pass for the same cores: one bucket sent
        # after the backward measured 1.35x faster per step than DDP's default 25 MB buckets on 2 workers.
        # On GPUs (NCCL) the default buckets overlap communication with the backward, as intended.
        # No buffer of the UNet or text encoder changes in training, so DDP need not broadcast them each step.
        ddp = {"gradient_as_bucket_view": True, "broadcast_buffers": False,
               **({"bucket_cap_mb": 4096} if device.type == "cpu" else {})}
        model = ray.train.torch.prepare_model(net, parallel_strategy="ddp", parallel_strategy_kwargs=ddp)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16")
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay else None
    # The training noise schedule is the base model's own, so prediction_type (epsilon or v) carries over.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # 2. resume: Ray hands back the latest checkpoint of this run (after a crash, or a rerun into --out)
    step, resumed_from = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            step = resumed_from = load_checkpoint(directory, net, optimizer, lr_scheduler, scaler, ema, cfg.fsdp)
        if rank == 0:
            print(f"[finetune] resuming from the checkpoint at step {step}", flush=True)

    # 3. the data: this worker's rows are chosen per step (see sample_indices); images decode per batch.
    # Class images (prior preservation) follow the instance rows in one table, so one latent cache holds both.
    table = read_dataset(cfg.data)
    n = table.num_rows
    classes = 0
    if cfg.class_data:
        import pyarrow as pa

        columns = ["caption", "image"]
        class_table = read_dataset(cfg.class_data).select(columns)
        classes = class_table.num_rows
        table = pa.concat_tables([table.select(columns), class_table.cast(table.select(columns).schema)])
    # The eval loss and validation images are rank 0's, except under FSDP, where every forward is collective.
    fixed = _fixed_eval_batch(cfg, table, pipe, noise_scheduler, device) if cfg.fsdp or rank == 0 else None
    latent_cache = encode_dataset(cfg, table, pipe.vae, device, rank, world) if cfg.cache_latents else None
    # The log is rewritten whole on each line: object stores (S3, GCS) cannot append to a file.
    log_fs, log_root = fsspec.core.url_to_fs(cfg.out)
    log_path = f"{log_root}/train_log.jsonl"
    log_text = log_fs.cat_file(log_path).decode() if rank == 0 and log_fs.exists(log_path) else ""

    def log_line(record: dict) -> None:
        nonlocal log_text
        if rank == 0:
            log_text += json.dumps(record) + "\n"
            atomic_write(log_fs, log_path, log_text.encode())

    if resumed_from is not None:
        log_line({"event": "resumed", "step": resumed_from})
    elif step == 0 and rank == 0:
        log_line({"event": "started", "trainable_parameters": trainable, "workers": world, "class_rows": classes,
                  "config": asdict(cfg)})

    # 4. the loop
    model.train()
    window_start, window_samples, losses = time.perf_counter(), 0, []
    while step < cfg.steps:
        for micro in range(cfg.grad_accum):
            g = step_generator(cfg.seed, step, micro, rank)
            rows = sample_indices(n, cfg.seed, step, micro, cfg.grad_accum, world, rank, cfg.batch_size)
            if classes:  # as many class samples, in their own seeded order
                rows += [n + i for i in sample_indices(classes, cfg.seed + 1, step, micro, cfg.grad_accum, world,
                                                       rank, cfg.batch_size)]
            if latent_cache is None:
                pixels, ids = batch_tensors(table, rows, pipe.tokenizer, cfg.resolution)
            else:
                ids = token_ids(table, rows, pipe.tokenizer)
            # only the last micro-step of an accumulation syncs gradients across workers
            last = micro == cfg.grad_accum - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()
            with sync, torch.autocast(device.type, dtype=half, enabled=half is not None):
                if cfg.method == "vae":
                    pixels = random_crops(pixels, cfg.crop, g, cfg.crop_candidates, cfg.crop_span).to(device)
                    eps = torch.randn((pixels.shape[0], pipe.vae.config.latent_channels,
                                       pixels.shape[2] // 8, pixels.shape[3] // 8), generator=g).to(device)
                    loss = _vae_step(model, pixels, eps, cfg.kl_weight, cfg.pixel_loss)
                else:
                    if latent_cache is None:
                        with torch.no_grad():
                            posterior = pipe.vae.encode(pixels.to(device)).latent_dist
                        mean, std = posterior.mean, posterior.std
                    else:
                        mean, std = (latent_cache[k][rows].to(device) for k in ("mean", "std"))
                    weights = prior_weights(cfg.batch_size, len(rows) - cfg.batch_size, cfg.prior_loss_weight)
                    loss = _diffusion_step(cfg, pipe, model, noise_scheduler, mean, std, ids.to(device), g, weights)
                scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(loss.item())
            window_samples += ids.shape[0]
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()
        if ema is not None:
            ema.step(params)
        step += 1

        # 5. report, checkpoint, validate: report is collective, so every worker calls it at the same steps
        checkpointing = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if checkpointing or step % cfg.log_every == 0:
            elapsed = time.perf_counter() - window_start
            metrics = {"step": step, "loss": float(np.mean(losses)), "lr": lr_scheduler.get_last_lr()[0],
                       "samples_per_second": window_samples * world / elapsed,
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            eval_loss = _eval_loss(model, fixed) if fixed is not None else None
            if rank == 0:
                metrics["eval_loss"] = eval_loss
                print(f"[finetune] step {step}/{cfg.steps} loss {metrics['loss']:.4f} "
                      f"eval {metrics.get('eval_loss', float('nan')):.4f} lr {metrics['lr']:.2e} "
                      f"{metrics['samples_per_second']:.2f} samples/s", flush=True)
            log_line(metrics)
            if checkpointing:
                weights, optimizer_state = gather_state(net, optimizer, cfg.fsdp)
                with tempfile.TemporaryDirectory() as directory:
                    if rank == 0:  # the weights are the same on every worker (or gathered there): one copy
                        save_checkpoint(directory, step, weights, optimizer_state, lr_scheduler, scaler, ema)
                        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
                    else:
                        ray.train.report(metrics)
            else:
                ray.train.report(metrics)
            window_start, window_samples, losses = time.perf_counter(), 0, []
        if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps:
            drawable = drawable_pipeline(pipe, model, cfg.fsdp, rank)
            if drawable is not None:
                _validate(cfg, drawable, fixed, step, device)

    # 6. the result: validation images of the final weights, then the model or LoRA (rank 0 only)
    peaks = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    else:
        peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    if ema is not None:  # the averaged weights are what is drawn and written
        ema.copy_to(params)
    final = drawable_pipeline(pipe, model, cfg.fsdp, rank)
    if rank == 0:
        _validate(cfg, final, fixed, step, device)
        finished = {"event": "finished", "step": step, "peak_rss_mb_per_worker": peaks}
        if cfg.method == "vae" and cfg.calibrate_scale:
            final.vae.eval()
            pixels, _ = batch_tensors(table, list(range(min(n, 256))), None, cfg.resolution, captions=False)
            finished["scaling_factor"] = latent_scale(final.vae, pixels.to(device))
            final.vae.register_to_config(scaling_factor=finished["scaling_factor"])
            print(f"[finetune] calibrated the VAE's scaling_factor: {finished['scaling_factor']:.5f}", flush=True)
        publish(cfg, final)
        log_line(finished)
        what = {"lora": "LoRA", "textual-inversion": f"embedding of {cfg.token}"}.get(cfg.method, "model")
        print(f"[finetune] wrote the {what} to {cfg.out}", flush=True)


def _validate(cfg: TrainConfig, pipe, fixed: dict, step: int, device) -> None:
    if cfg.method == "vae":
        roundtrip_images(cfg, pipe.vae, fixed["pixels"][:4], step)
    else:
        validation_images(cfg, pipe, step, device)


def _diffusion_step(cfg: TrainConfig, pipe, model, noise_scheduler, mean, std, ids, g,
                    sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-step's diffusion loss: latents drawn from the VAE's posterior (mean, std), noise at
    random timesteps, the UNet against its target; `sample_weights` scale each sample's loss (prior_weights)."""
    device = mean.device
    latents = (mean + std * torch.randn(mean.shape, generator=g).to(device)) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g).to(device)
    if cfg.noise_offset:  # lets the model learn very dark and very bright images
        noise = noise + cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = training_target(noise_scheduler, latents, noise, timesteps)
    weights = min_snr_weights(noise_scheduler, timesteps, cfg.min_snr_gamma) if cfg.min_snr_gamma else None
    if sample_weights is not None:
        sample_weights = sample_weights.to(device)
        weights = sample_weights if weights is None else weights * sample_weights
    if cfg.caption_dropout:  # some samples see the empty prompt: the unconditional half of guidance
        drop = torch.rand(ids.shape[0], generator=g) < cfg.caption_dropout
        if drop.any():
            empty = pipe.tokenizer([""], padding="max_length", max_length=ids.shape[1], truncation=True,
                                   return_tensors="pt").input_ids.to(ids.device)
            ids = torch.where(drop.to(ids.device)[:, None], empty, ids)
    return diffusion_loss(model(noisy, timesteps, ids), target, weights)


def _vae_step(model, pixels, eps, kl_weight: float, pixel_loss: str) -> torch.Tensor:
    recon, kl = model(pixels, eps)
    return vae_loss(recon, pixels, kl, kl_weight, pixel_loss)


def _fixed_eval_batch(cfg: TrainConfig, table, pipe, noise_scheduler, device) -> dict:
    """A batch with fixed noise and timesteps: its loss falls only if the model learns (no sampling noise)."""
    g = torch.Generator().manual_seed(cfg.seed + 999)
    indices = list(range(min(table.num_rows, 8)))
    pixels, ids = batch_tensors(table, indices, pipe.tokenizer, cfg.resolution)
    if cfg.method == "vae":  # the round trip of whole images, through the posterior mean
        return {"pixels": pixels.to(device)}
    with torch.no_grad():
        latents = pipe.vae.encode(pixels.to(device)).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g).to(device)
    timesteps = torch.linspace(50, noise_scheduler.config.num_train_timesteps - 50, len(indices)).long().to(device)
    return {"noisy": noise_scheduler.add_noise(latents, noise, timesteps), "timesteps": timesteps,
            "ids": ids.to(device), "target": training_target(noise_scheduler, latents, noise, timesteps)}


@torch.no_grad()
def _eval_loss(model, fixed: dict) -> float:
    inner = model.module if hasattr(model, "module") else model  # DDP's forward would sync buffers
    if "pixels" in fixed:
        recon, _ = inner(fixed["pixels"])
        return F.mse_loss(recon.float(), fixed["pixels"].float()).item()
    return diffusion_loss(inner(fixed["noisy"], fixed["timesteps"], fixed["ids"]), fixed["target"]).item()
