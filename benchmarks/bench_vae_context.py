"""How well does a VAE reconstruct whole 256 px images, against the same images cut into tiles?

`train_tiny` trains the VAE on random crops, because a 128 px crop costs a quarter of a whole image.
The VAE is convolutional, but not only: its GroupNorm layers and its mid-block attention see the whole
feature map, so what it learned on crops of one size may not carry over to another. This measures it:
each image of the synthetic world (one per colour-shape-background combination, drawn as `check_vae`
draws them) goes through the VAE's round trip

- `whole`: as one 256 px image, the way generation and latent caching use the VAE;
- `tiles{S}`: cut into S px tiles, each encoded and decoded alone, then put back together;
- `decode-tiles{S}`: encoded whole, its latents decoded in S/8 tiles (what tiled decoding could win).

It reports each round trip's pixel MSE (in [-1, 1], as the VAE's eval loss). A VAE that does best on
tiles the size of its training crops has learned its crops' context, not the whole image's.

    .venv/bin/python -m benchmarks.bench_vae_context [VAE ...] [--tiles 128 64] [--count 24] [--config DIR] [--out report.json]

VAE: `tiny` (the committed preset, the default), a folder holding a diffusers VAE (`config.json` and
safetensors, e.g. `DIR/vae/vae` of a `train_tiny` run), or a `finetune vae` checkpoint folder
(`trainable.safetensors`, read with `tiny`'s VAE config, or `--config`'s: a folder with a VAE's `config.json`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_vae(spec: str, config: str | Path | None = None):
    """The VAE named by `spec` (see the module's docstring), in eval mode; `config`: the folder whose VAE
    config a checkpoint's weights are read with (default `tiny`'s)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    from actors.presets import PRESET_DIR

    path = Path(spec)
    if spec == "tiny":
        path = PRESET_DIR / "tiny" / "vae"
    if (path / "config.json").is_file():
        return AutoencoderKL.from_pretrained(path, use_safetensors=True).eval()
    if (path / "trainable.safetensors").is_file():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config or PRESET_DIR / "tiny" / "vae"))
        state = {key.removeprefix("vae."): value for key, value in load_file(path / "trainable.safetensors").items()}
        vae.load_state_dict(state)
        return vae.eval()
    raise SystemExit(f"bench_vae_context: {spec!r} is not a VAE: give 'tiny', a folder with a diffusers VAE "
                     "(config.json and safetensors), or a `finetune vae` checkpoint folder (trainable.safetensors)")


def images(count: int, size: int = 256):
    """`count` synthetic images, one per combination in turn, as a batch of pixels in [-1, 1]."""
    import numpy as np
    import torch

    from jobs.synthetic import probe

    drawn = [np.asarray(probe(i, size)[1], dtype=np.float32) for i in range(count)]
    return torch.from_numpy(np.stack(drawn) / 127.5 - 1.0).permute(0, 3, 1, 2)


def round_trips(vae, pixels, tiles: list[int]) -> dict[str, float]:
    """Pixel MSE of each way through the VAE (see the module's docstring)."""
    import torch
    import torch.nn.functional as F

    def through(x):
        return vae.decode(vae.encode(x).latent_dist.mean).sample

    def tiled(x, size, fn, scale=1):
        """`fn` on each `size` tile of `x`, its outputs (`scale` times the tile's size) put back together."""
        out = torch.empty_like(pixels)
        for top in range(0, x.shape[-2], size):
            for left in range(0, x.shape[-1], size):
                out[..., top * scale:(top + size) * scale, left * scale:(left + size) * scale] = \
                    fn(x[..., top:top + size, left:left + size])
        return out

    results = {}
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean  # encoded once: the whole round trip and the tiled decodes
        results["whole"] = vae.decode(latents).sample
        for size in tiles:
            results[f"tiles{size}"] = tiled(pixels, size, through)
            results[f"decode-tiles{size}"] = tiled(latents, size // 8, lambda z: vae.decode(z).sample, scale=8)
    return {name: round(F.mse_loss(recon, pixels).item(), 5) for name, recon in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vaes", nargs="*", default=["tiny"], metavar="VAE")
    parser.add_argument("--tiles", type=int, nargs="+", default=[128, 64], help="tile sizes in px (divide 256, multiples of 8)")
    parser.add_argument("--count", type=int, default=24, help="images (one per combination in turn; 72 in all)")
    parser.add_argument("--config", help="a folder with the VAE config.json that checkpoints' weights are read with "
                        "(default: tiny's)")
    parser.add_argument("--out", help="write the report here (JSON)")
    args = parser.parse_args(argv)
    bad = [size for size in args.tiles if size <= 0 or size % 8 or 256 % size]
    if bad:
        parser.error(f"--tiles {bad}: a tile must be a multiple of 8 that divides 256 (e.g. 128, 64, 32)")
    if args.count < 1:
        parser.error(f"--count {args.count}: need at least one image")

    pixels = images(args.count)
    report = {"images": args.count, "mse": {}}
    for spec in args.vaes:
        report["mse"][spec] = round_trips(load_vae(spec, args.config), pixels, args.tiles)
        print(spec, json.dumps(report["mse"][spec]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
