"""Train the `tiny` preset from scratch on the synthetic shapes world: the one command behind its weights.

    synthetic images (training combinations only) -> `sdfleet dataset build`
      -> `sdfleet finetune vae --base tiny-random` (random crops)
      -> check: every colour and every shape survives the round trip
      -> `sdfleet finetune full --train-text-encoder --cache-latents` on the new VAE's latents (v-prediction,
         like SD 2.1; caption dropout, so classifier-free guidance works)
      -> `sdfleet generate` + `sdfleet eval` on prompts with unseen seeds, held-out combinations included,
         and the same for the random init (`tiny-random`), for comparison
      -> with --install: copy the weights into actors/presets/tiny/, which the preset then loads

    .venv/bin/python -m benchmarks.train_tiny --out /tmp/tiny-run [--install]

Every stage is the project's own CLI, so this is also an end-to-end exercise of it. Each stage resumes
(rerun the same command after a crash); a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from actors.presets import PRESETS
from benchmarks.common import REPO_ROOT, run_cli

PRESET_WEIGHTS = REPO_ROOT / "actors" / "presets" / "tiny"
COMPONENTS = ("unet", "vae", "text_encoder")


# A colour or shape counts as kept when at least this share of its round trips reads back as itself.
KEPT = 0.75
# Pixels this far inside an object's edge measure its colour; the round trip blurs the edge itself.
EDGE = 4


@dataclass
class VaeCheck:
    """What one image of every colour/shape/background looks like after the VAE's round trip.

    `misreads`: every combination that came back wrong. `lost`: every colour or shape that came back right
    in fewer than KEPT of its images (only these stop training: the eval's colour boundaries, orange next to
    yellow, misread a few faithful round trips too). `color_error`: per colour, the mean distance (0-255 a
    channel, averaged over RGB) between the palette colour and the round trip's mean colour inside the
    object: finer than right-or-wrong, and a VAE that is a little off in colour costs the UNet's colour
    adherence even when nothing reads wrong (docs/tiny-recipe.md)."""

    misreads: list[str]
    lost: list[str]
    color_error: dict[str, float]


def check_vae(model_dir: Path, size: int = 256) -> VaeCheck:
    """Round-trip one image of every colour/shape/background through the VAE in `model_dir`/vae."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from jobs.evaluate import analyse
    from jobs.synthetic import ALL, PALETTE, probe

    vae = AutoencoderKL.from_pretrained(model_dir / "vae", use_safetensors=True).eval()
    misreads, right, errors = [], {}, {}
    for i in range(len(ALL)):
        (color, shape, background), drawn = probe(i, size)
        image = np.asarray(drawn, dtype=np.float32)
        pixels = torch.from_numpy(image / 127.5 - 1.0).permute(2, 0, 1)[None]
        with torch.no_grad():
            recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample[0]
        rgb = recon.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
        seen = analyse(rgb)
        for attribute, value in (("color", color), ("shape", shape), ("background", background)):
            right.setdefault((attribute, value), []).append(seen[attribute] == value)
        if (seen["color"], seen["shape"], seen["background"]) != (color, shape, background):
            misreads.append(f"{color} {shape} on {background} came back as {seen['color']} {seen['shape']} "
                            f"on {seen['background']}")
        # shapes are drawn without anti-aliasing: the object is exactly the pixels of its palette colour
        palette = np.array(PALETTE[color], dtype=np.float32)
        inside = torch.from_numpy((image == palette).all(axis=2).astype(np.float32))[None, None]
        inside = -F.max_pool2d(-inside, 2 * EDGE + 1, stride=1, padding=EDGE)[0, 0].numpy() > 0.5  # erode
        errors.setdefault(color, []).append(float(np.abs(rgb[inside].astype(np.float32).mean(axis=0) - palette).mean()))
    lost = [f"{attribute} {value}: {sum(hits)}/{len(hits)} round trips kept it"
            for (attribute, value), hits in right.items() if sum(hits) < KEPT * len(hits)]
    return VaeCheck(misreads, lost, {color: round(float(np.mean(e)), 1) for color, e in errors.items()})


class StageClock:
    """Minutes of wall clock per stage of this run, kept in `path` (JSON) as each stage ends: the recipe's
    cost is part of its result, and this machine's speed varies between days. A stage that a resumed run
    found finished is recorded as skipped, so a total covers only the stages this run did."""

    def __init__(self, path: Path, now=time.perf_counter):
        self.path, self.now, self.minutes = path, now, {}

    @contextmanager
    def stage(self, name: str, done: bool = False):
        """Time the block as stage `name`; with `done`, the caller skips it and it is recorded as skipped."""
        started = self.now()
        yield
        self.minutes[name] = "skipped (found finished)" if done else round((self.now() - started) / 60, 1)
        self.path.write_text(json.dumps({"minutes": self.minutes, "total_minutes": self.total()}, indent=2) + "\n")

    def timed(self) -> dict[str, float]:
        """The stages this run did, with their minutes (skipped ones left out)."""
        return {name: m for name, m in self.minutes.items() if not isinstance(m, str)}

    def total(self) -> float:
        return round(sum(self.timed().values()), 1)

    def summary(self) -> str:
        timed = self.timed()
        skipped = [name for name in self.minutes if name not in timed]
        return (", ".join(f"{name} {m:.1f}" for name, m in timed.items()) + f"; total {self.total():.1f} min"
                + (f" (skipped, found finished: {', '.join(skipped)})" if skipped else ""))


def eval_manifest(path: Path, count: int, seed: int, steps: int, guidance: float = 1.0) -> None:
    """`count` prompts over every combination (held-out ones too), with seeds training never used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.synthetic import ALL, caption

    rows = [{"id": f"eval-{i:04d}", "prompt": caption(*ALL[i % len(ALL)]), "seed": seed + i, "steps": steps,
             "guidance_scale": guidance} for i in range(count)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def install(model: Path, preset: Path) -> None:
    """Copy each component's safetensors and configs from a trained `model` into `preset`.

    diffusers records the folder a model was loaded from as `_name_or_path`; the training machine's path
    means nothing in a clone, so it is dropped (the loaders do not need it)."""
    for component in COMPONENTS:
        target = preset / component
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for path in sorted((model / component).glob("*")):
            if path.suffix == ".safetensors":
                shutil.copy2(path, target / path.name)
            elif path.suffix == ".json":
                config = json.loads(path.read_text())
                if config.pop("_name_or_path", None) is None:
                    shutil.copy2(path, target / path.name)
                else:  # diffusers' own layout: sorted keys, 2 spaces
                    (target / path.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def vae_base(folder: Path, norm_groups: int) -> Path:
    """`tiny-random` written to `folder` with `norm_groups` GroupNorm groups in its VAE: the same random init
    (GroupNorm's weights do not depend on the groups), a VAE that normalises over more channels at once."""
    from actors.models import export_preset

    if not (folder / "model_index.json").exists():
        export_preset("tiny-random", str(folder))
        path = folder / "vae" / "config.json"
        config = json.loads(path.read_text())
        config["norm_num_groups"] = norm_groups
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def compare_weights(model: Path, preset: Path, components=COMPONENTS) -> dict[str, str]:
    """Per component of `model`: "same" when its safetensors files are the `preset`'s byte for byte (the
    recipe reproduced them), "differs", or "missing" where either side has none."""
    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}

    verdicts = {}
    for component in components:
        ours, theirs = digests(model / component), digests(preset / component)
        verdicts[component] = "missing" if not ours or not theirs else "same" if ours == theirs else "differs"
    return verdicts


def describe_comparison(verdicts: dict[str, str]) -> str:
    return ", ".join(f"{component} {verdict}" for component, verdict in verdicts.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="working folder: images, dataset, models, eval run")
    parser.add_argument("--images", type=int, default=3000, help="synthetic training images (default 3000)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=4, help="per worker")
    parser.add_argument("--vae-crop", type=int, default=128)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-loss", choices=["mse", "l1"], default="mse", help="the VAE's pixel loss")
    parser.add_argument("--vae-crop-candidates", type=int, default=1,
                        help="random crops drawn per image; the busiest trains (see `finetune --crop-candidates`)")
    parser.add_argument("--vae-crop-span", type=int, default=0,
                        help="crops span a random square of --vae-crop to this many px, resized to --vae-crop "
                        "(see `finetune --crop-span`; 0: plain crops)")
    parser.add_argument("--vae-norm-groups", type=int, default=0,
                        help="GroupNorm groups in the VAE (0: the preset's, 1)")
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=8, help="per worker")
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--min-snr-gamma", type=float, default=5.0,
                        help="the UNet's Min-SNR loss weighting (default 5); 0 turns it off")
    parser.add_argument("--caption-dropout", type=float, default=0.1,
                        help="share of UNet samples on the empty prompt, so guidance has an unconditional side")
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--eval-guidance", type=float, default=3.0,
                        help="guidance for the adherence check (1.0: none; needs --caption-dropout above 0)")
    parser.add_argument("--skip-vae-check", action="store_true", help="go on to the UNet even if the VAE loses a "
                        "colour or a shape")
    parser.add_argument("--install", action="store_true", help="copy the weights into actors/presets/tiny/")
    parser.add_argument("--gpu", action="store_true", help="train on one GPU in fp32 with the same global batches "
                        "(--workers x the per-worker batches), for trials of a recipe; the committed weights "
                        "come from the CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    widths = PRESETS["tiny"]["vae"]["block_out_channels"]
    if args.vae_norm_groups < 0 or any(c % (args.vae_norm_groups or 1) for c in widths):
        parser.error(f"--vae-norm-groups must divide every VAE width {widths}; got {args.vae_norm_groups}")
    if args.min_snr_gamma < 0:  # here, not after the VAE stage's hour, where finetune would reject it
        parser.error(f"--min-snr-gamma must be 0 (off) or positive, got {args.min_snr_gamma}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        print(f"[train_tiny] {message}", file=sys.stderr, flush=True)

    clock = StageClock(out / "timings.json")
    # 1. data: training combinations only, so the held-out ones test generalisation
    done = (out / "data" / "_dataset.json").exists()
    with clock.stage("data", done):
        if not done:
            from jobs.synthetic import write_images

            write_images(out / "images", args.images, size=256, seed=1, split="train")
            run_cli(["dataset", "build", str(out / "images"), "-o", str(out / "data"), "--resolution", "256"],
                    out / "data")
    # 2. the VAE, then its check: no UNet can learn a colour its VAE cannot carry
    workers, device = (1, ["--gpu", "--mixed-precision", "no"]) if args.gpu else (args.workers, [])
    if args.gpu:  # one GPU worker carries the whole global batch, in fp32 as on the CPU
        args.vae_batch, args.unet_batch = args.vae_batch * args.workers, args.unet_batch * args.workers
    common = ["--data", str(out / "data"), "--workers", str(workers), "--checkpoint-every", "250",
              "--validate-every", "500", "--warmup-steps", "100", *device]
    done = (out / "vae" / "model_index.json").exists()
    with clock.stage("vae", done):
        if not done:
            base = vae_base(out / "vae-base", args.vae_norm_groups) if args.vae_norm_groups else "tiny-random"
            run_cli(["finetune", "vae", "--base", str(base), "--out", str(out / "vae"),
                     "--steps", str(args.vae_steps), "--batch-size", str(args.vae_batch), "--crop", str(args.vae_crop),
                     "--lr", str(args.vae_lr), "--pixel-loss", args.vae_loss,
                     "--crop-candidates", str(args.vae_crop_candidates), "--crop-span", str(args.vae_crop_span),
                     # the fixed eval batch (whole 256 px images) is ~5% of a VAE step when run every 50: the
                     # checkpoints' every 250 are enough, and it draws no randomness, so the weights are the same
                     "--log-every", "250", *common], out / "vae")
    from jobs.synthetic import ALL

    say("VAE against the committed tiny preset (bit for bit): "
        + describe_comparison(compare_weights(out / "vae", PRESET_WEIGHTS, ["vae"])))
    with clock.stage("vae check"):
        check = check_vae(out / "vae")
    (out / "vae-check.json").write_text(json.dumps(asdict(check), indent=2) + "\n")
    say(f"VAE round trip: {len(ALL) - len(check.misreads)}/{len(ALL)} combinations keep colour, shape and background")
    for failure in check.misreads:
        say(f"  {failure}")
    for line in check.lost:
        say(f"  LOST {line}")
    errors = check.color_error
    say(f"  object colour error, 0-255 a channel: mean {np.mean(list(errors.values())):.1f} ("
        + ", ".join(f"{color} {error}" for color, error in errors.items()) + ") (docs/tiny-recipe.md: what the committed VAE scores)")
    if check.lost and not args.skip_vae_check:
        say("stopping: the VAE loses a colour or shape; train it longer (a new --out) or pass --skip-vae-check")
        say(f"minutes: {clock.summary()} ({clock.path})")
        return 1
    # 3. UNet and text encoder on the new VAE's latents
    done = (out / "model" / "model_index.json").exists()
    with clock.stage("unet", done):
        if not done:
            run_cli(["finetune", "full", "--base", str(out / "vae"), "--out", str(out / "model"),
                     "--train-text-encoder", "--steps", str(args.unet_steps), "--batch-size", str(args.unet_batch),
                     "--lr", str(args.unet_lr),
                     *(["--min-snr-gamma", str(args.min_snr_gamma)] if args.min_snr_gamma else []),
                     "--caption-dropout", str(args.caption_dropout), "--cache-latents",
                     "--validation-prompt", "a red star on a gray background",
                     "--validation-prompt", "a blue square on a white background", "--log-every", "50", *common],
                    out / "model")
    # 4. adherence on unseen seeds
    with clock.stage("eval"):
        eval_manifest(out / "eval.parquet", args.eval_prompts, seed=900_000, steps=20, guidance=args.eval_guidance)
        run_cli(["generate", str(out / "eval.parquet"), "--out", str(out / "eval"), "--model",
                 f"default={out / 'model'}", "--no-watermark"], out / "eval")
        run_cli(["eval", str(out / "eval.parquet"), "--out", str(out / "eval")], out / "eval-score")
    # the same prompts and seeds through the random init: what chance looks like to this measure
    done = (out / "eval-random" / "eval.json").exists()
    with clock.stage("eval random init", done):
        if not done:
            run_cli(["generate", str(out / "eval.parquet"), "--out", str(out / "eval-random"), "--model",
                     "default=tiny-random", "--no-watermark"], out / "eval-random")
            run_cli(["eval", str(out / "eval.parquet"), "--out", str(out / "eval-random")], out / "eval-random-score")
    for name, run in (("random init", "eval-random"), ("trained", "eval")):
        summary = json.loads((out / run / "eval.json").read_text())
        say(f"{name}: adherence over {summary['scored']} images: colour {summary['color']:.0%}, "
            f"shape {summary['shape']:.0%}, drawn {summary['drawn']:.0%}; held-out colour "
            f"{summary['held_out']['color']}, shape {summary['held_out']['shape']}")
    say(f"minutes: {clock.summary()} ({clock.path})")
    say("weights against the committed tiny preset (bit for bit): "
        + describe_comparison(compare_weights(out / "model", PRESET_WEIGHTS)))
    # 5. install into the preset
    if args.install:
        install(out / "model", PRESET_WEIGHTS)
        say(f"installed the weights into {PRESET_WEIGHTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
