"""What a training step minimises: the diffusion target (epsilon or v), Min-SNR and prior-preservation
weights, the VAE's reconstruction loss, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def vae_loss(recon: torch.Tensor, pixels: torch.Tensor, kl: torch.Tensor, kl_weight: float,
             pixel_loss: str = "mse") -> torch.Tensor:
    """Pixel reconstruction (in [-1, 1]) plus a small KL pull towards N(0, 1), which keeps latents well scaled.

    `pixel_loss` "l1" (the loss of the autoencoders behind Stable Diffusion) keeps pulling on small errors,
    where MSE's gradient fades; whether that settles hues sooner is not measured here (docs/tiny-recipe.md)."""
    distance = F.l1_loss if pixel_loss == "l1" else F.mse_loss
    return distance(recon.float(), pixels.float()) + kl_weight * kl.float().mean() / pixels[0].numel()
