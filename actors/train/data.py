"""What each worker trains on at each step: seeded row choices and generators (a function of the step
alone, so a resumed run sees exactly what it would have), image batches and their token ids, random crops
for the VAE, and the latent cache."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from actors.train import say
from actors.train.config import TrainConfig
from actors.train.stored import RepeatsOnRetry


class UndecodableImage(RepeatsOnRetry, ValueError):
    """A dataset row whose image does not decode: every retry would meet it at the same step."""


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
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed * 100_003 + epoch)))
        indices.append(int(orders[epoch][offset]))
    return indices


def seed_of(value: int) -> int:
    """`value` as the 64 bits torch seeds with: the value itself wherever torch took it (it keeps a seed's low 64
    bits), and no longer an overflow for a large --seed (2147483647 failed in every worker)."""
    return value % 2**64


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The generator for one micro-step's noise and timesteps on one worker."""
    return torch.Generator().manual_seed(seed_of(((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + rank))


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


def batch_tensors(table, indices: list[int], tokenizer, resolution: int,
                  captions: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixels in [-1, 1], N x 3 x R x R; token ids, N x 77, or None with captions=False) for the given rows."""
    import io

    from PIL import Image

    from manifests.dataset import square_crop, unknown_scale, upright_rgb
    from manifests.text import NOT_AN_IMAGE

    images = []
    for i in indices:
        try:
            with Image.open(io.BytesIO(table["image"][i].as_py())) as im:
                # as `dataset build` reads them: a dataset written by other means is read the same way
                im.load()
                unknown = unknown_scale(im)
                im = upright_rgb(im) if not unknown else im
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            cause = (NOT_AN_IMAGE if isinstance(exc, Image.UnidentifiedImageError)
                     else f"{type(exc).__name__}: {exc}")
            raise UndecodableImage(f"dataset row {i} (from 0, over the parts in order; class images follow --data's "
                                   f"rows): its image does not decode ({cause}); rebuild the dataset with "
                                   "`sdfleet dataset build`, which skips such images (and train into a new --out "
                                   "if this one has checkpoints: they are of this dataset)") from exc
        if unknown:  # its values have no brightness scale: trained on as a black sample, without a word
            raise UndecodableImage(f"dataset row {i} (from 0, over the parts in order; class images follow --data's "
                                   f"rows): its image is {unknown}; `sdfleet dataset build` skips such images")
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
    Costs 2 x 4 x (R/8)^2 float32s per image: 32 KiB at 256 px, 288 KiB at 768 px."""
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
        say(f"cached the latents of {table.num_rows} images")
    return cache
