"""What trains: the modules Ray Train wraps (text encoder + UNet, or the VAE's round trip), what is frozen
and what learns for each method, FSDP2 sharding, and a pipeline that can draw with the weights as they are."""

from __future__ import annotations

import torch

from actors.train.config import TrainConfig


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
        add_placeholder(pipe, cfg.token, cfg.init_word, cfg.token_vectors)
    elif cfg.method == "lora":
        add_unet_lora(pipe.unet, cfg.rank, cfg.alpha, LORA_LAYER_SETS[cfg.lora_layer_set])
        if cfg.train_text_encoder:
            add_text_encoder_lora(pipe.text_encoder, cfg.rank, cfg.alpha)
    else:
        pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(cfg.train_text_encoder)
    if cfg.gradient_checkpointing:
        (pipe.vae if cfg.method == "vae" else pipe.unet).enable_gradient_checkpointing()
    return sum(p.numel() for p in trainee(cfg, pipe).parameters() if p.requires_grad)


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


@torch.no_grad()
def latent_scale(vae, pixels: torch.Tensor, batch_size: int = 16) -> float:
    """The scaling factor that gives the VAE's latents unit variance (1 / std of posterior samples), as
    Stable Diffusion chose 0.18215 for its own VAE: the noise schedule assumes unit-variance data, and a
    VAE trained from scratch rarely lands there (the tiny one's latents came out with std ~2.6). Unit
    variance is a starting point, not a law: for `tiny`, SD's 0.18215 (latent std 0.48, a noisier
    schedule) drew shapes better than the calibrated 0.38 in a side-by-side trial (docs/tiny-recipe.md)."""
    g = torch.Generator().manual_seed(0)
    samples = []
    for start in range(0, len(pixels), batch_size):
        posterior = vae.encode(pixels[start:start + batch_size]).latent_dist
        samples.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(posterior.mean.device))
    return 1.0 / torch.cat(samples).float().std().item()
