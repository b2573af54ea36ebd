"""How a run shows its progress: validation images drawn through the actors' own `draw` (or the VAE's
round trips), and the loss on one fixed batch, which falls only if the model learns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actors.models import ModelInfo
from actors.train.config import TrainConfig
from actors.train.data import batch_tensors
from actors.train.losses import diffusion_loss, training_target
from manifests.stores import url_to_fs, without_passwords


def validation_images(cfg: TrainConfig, base: ModelInfo, pipe, step: int) -> list[str]:
    """Draw the validation prompts with the weights as they are now, through the actors' own `draw`."""

    from actors.finish import image_parameters
    from actors.generate import draw
    from actors.png import png_bytes
    from manifests.ledger import atomic_write

    rows = [{"id": f"{i:02d}", "prompt": prompt, "negative_prompt": None, "seed": cfg.seed + i,
             "width": cfg.resolution, "height": cfg.resolution, "steps": base.steps,
             "guidance_scale": cfg.validation_guidance,
             "scheduler": base.scheduler, "model": "default", "adapters": [], "watermark": None,
             "model_fingerprint": base.fingerprint, "params_hash": None}
            for i, prompt in enumerate(cfg.validation_prompts)]
    if not rows:
        return []
    training = pipe.unet.training
    pipe.unet.eval()
    pipe.text_encoder.eval()
    images = draw(pipe, rows)  # one group: same size, steps and scheduler
    pipe.unet.train(training)
    pipe.text_encoder.train(training and cfg.train_text_encoder)
    fs, root = url_to_fs(cfg.out)
    folder = f"{root}/validation/step-{step:06d}"
    written = []
    for row, rgb in zip(rows, images):
        path = f"{folder}/{row['id']}.png"
        # drawn by the weights being trained, not by the base model (the row's model) with no adapter
        params = {**image_parameters(row), "model": without_passwords(base.ref),
                  "fine_tune": {"method": cfg.method, "step": step}, "step": step}
        atomic_write(fs, path, png_bytes(rgb, params))
        written.append(path)
    # a rerun with fewer prompts: the images of the prompts it no longer has would sit beside these as if drawn so
    for stale in fs.glob(f"{folder}/[0-9][0-9].png"):
        if stale not in written and fs._strip_protocol(stale) not in written:
            fs.rm_file(stale)
    return written


def roundtrip_images(cfg: TrainConfig, vae, pixels: torch.Tensor, step: int) -> list[str]:
    """vae: each fixed-batch image beside its round trip through the VAE, as one PNG per image."""
    import io

    from PIL import Image

    from manifests.ledger import atomic_write

    training = vae.training
    vae.eval()
    with torch.no_grad():
        recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    vae.train(training)
    fs, root = url_to_fs(cfg.out)
    written = []
    for i, (a, b) in enumerate(zip(pixels, recon)):
        pair = torch.cat([a, b], dim=2).clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(pair).save(buf, format="PNG")
        path = f"{root}/validation/step-{step:06d}/{i:02d}.png"
        atomic_write(fs, path, buf.getvalue())
        written.append(path)
    return written


def validate(cfg: TrainConfig, base: ModelInfo, pipe, fixed: dict, step: int) -> None:
    """The validation images of `step`: round trips of the fixed batch (vae), else the validation prompts."""
    if cfg.method == "vae":
        roundtrip_images(cfg, pipe.vae, fixed["pixels"][:4], step)
    else:
        validation_images(cfg, base, pipe, step)


def fixed_eval_batch(cfg: TrainConfig, table, pipe, noise_scheduler, device) -> dict:
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
def eval_loss(model, fixed: dict) -> float:
    inner = model.module if hasattr(model, "module") else model  # DDP's forward would sync buffers
    if "pixels" in fixed:
        recon, _ = inner(fixed["pixels"])
        return F.mse_loss(recon.float(), fixed["pixels"].float()).item()
    return diffusion_loss(inner(fixed["noisy"], fixed["timesteps"], fixed["ids"]), fixed["target"]).item()
