"""The training config: the one schema of a fine-tune, shared by the `sdfleet finetune` CLI and the workers."""

from __future__ import annotations

import functools
import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, model_validator

from manifests.schema import MAX_SIDE
from manifests.stores import run_path, store_problem

DEFAULT_LR = {"full": 1e-5, "dreambooth": 5e-6, "lora": 1e-4, "vae": 1e-4, "textual-inversion": 5e-3}
PRIOR_METHODS = ("dreambooth", "lora")  # the methods that can train with prior preservation
# the most class images one run draws: the draw's manifest is built in the driver's memory (a billion ids alone
# would be ~60 GB, and the driver would die without a word), and DreamBooth's prior wants hundreds
MAX_CLASS_IMAGES = 100_000
# Upper bounds past which a value is a typo, not a plan: each took minutes to fail, or trained on for good
# (--steps past 2**63 gave a flat schedule; --rank 100000 on 64-wide layers a 9 GB worker; --batch-size 10**6 an
# out-of-memory kill after a minute, said by Ray in a paragraph).
MAX_STEPS = 10_000_000
MAX_RANK = 1024  # past a layer's width a LoRA's rank adds nothing; SD 2.1's widest is 1280
MAX_BATCH = 256  # samples per worker per micro-step, as `generate`'s --batch-size; more: --grad-accum
MAX_GRAD_ACCUM = 1024


# A field's flag where it is not the field's name with dashes (the lists: one flag given once per item)
FLAG_NAMES = {"validation_prompts": "--validation-prompt", "class_prompts": "--class-prompt"}


def flag_of(field: str) -> str:
    """The `sdfleet finetune` flag of TrainConfig's `field`."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


class TrainConfig(BaseModel):
    """One fine-tune, as `sdfleet finetune` takes it (one flag per field) and as every Ray Train worker reads it.

    The driver (jobs.finetune) checks it before Ray starts and hands the workers a copy with what it
    resolved filled in (resolution, validation prompts, the class dataset, CPUs per worker); the
    properties below give the defaults that depend on other fields."""

    method: Literal["full", "lora", "dreambooth", "vae", "textual-inversion"]
    data: str = Field(description="training dataset URI (from `sdfleet dataset build`)")
    base: str = Field(description="base model: preset (tiny, tiny-random, sd21-random), diffusers directory or URI")
    out: str = Field(description="output URI: the model or LoRA, checkpoints, validation images, logs")
    workers: int = Field(default=1, ge=1, description="Ray Train workers (one GPU each with --gpu)")
    gpu: bool = Field(default=False, description="one GPU per worker, NCCL, mixed precision")
    cpus_per_worker: int | None = Field(default=None, ge=1, description="CPU workers: cores (torch threads) each "
                                        "(default: the cluster's CPUs shared out)")
    steps: int = Field(default=1000, ge=1, le=MAX_STEPS, description="optimizer steps")
    lr: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="peak learning rate (default: 1e-5 full, 5e-6 "
                             "dreambooth, 1e-4 lora and vae, 5e-3 textual-inversion)")
    batch_size: int = Field(default=4, ge=1, le=MAX_BATCH, description="samples per worker per micro-step (at most "
                            f"{MAX_BATCH}; a larger global batch: --grad-accum or --workers)")
    grad_accum: int = Field(default=1, ge=1, le=MAX_GRAD_ACCUM, description="micro-steps per optimizer step")
    resolution: int | None = Field(default=None, description="training size in px (default: the base model's)")
    seed: int = Field(default=0, ge=0, lt=2**63, description="seed for the data order, noise and timesteps "
                      "(0 <= seed < 2**63, as a manifest row's)")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps before the cosine decay")
    checkpoint_every: int = Field(default=100, ge=1, description="steps between checkpoints")
    log_every: int = Field(default=10, ge=1, description="steps between progress lines")
    validate_every: int = Field(default=0, ge=0, description="steps between validation images (0: at the end only)")
    validation_prompts: list[str] = Field(default_factory=list, description="prompts drawn as validation images")
    validation_guidance: float = Field(default=7.5, ge=0, allow_inf_nan=False, description="guidance scale of the "
                                       "validation images: give your rows' guidance_scale (tiny draws best at 3)")
    min_snr_gamma: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Min-SNR loss weighting (5 is usual)")
    noise_offset: float = Field(default=0.0, ge=0, allow_inf_nan=False, description="noise offset (0.05-0.1 helps very dark/bright images)")
    caption_dropout: float = Field(default=0.0, ge=0, lt=1, allow_inf_nan=False, description="share of samples trained on the empty "
                                   "prompt, which classifier-free guidance needs in a model trained from scratch")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, allow_inf_nan=False, description="keep an EMA of the weights (0.9999 is usual)")
    gradient_checkpointing: bool = Field(default=False, description="trade compute for activation memory")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(default="auto", description="auto: bf16 on GPU, no on CPU")
    rank: int = Field(default=4, ge=1, le=MAX_RANK, description="LoRA rank")
    alpha: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="LoRA alpha (default: the rank)")
    lora_layers: Literal["attention", "transformer", "all"] | None = Field(
        default=None, description="lora: the UNet layers it adapts. attention (default): the attention projections; "
        "transformer: every linear layer of the transformer blocks (what every backend can adapt); all: also the "
        "ResNet convolutions (LoCon: more capacity; the eager and compile backends draw it)")
    token: str | None = Field(default=None, min_length=1, description="textual-inversion: the new word it learns, "
                              "as the captions and later prompts spell it (such as <my-mug>)")
    init_word: str | None = Field(default=None, description="textual-inversion: a one-token word whose embedding the "
                                  "new vectors start from (default: the mean embedding)")
    vectors: int | None = Field(default=None, ge=1, le=16, description="textual-inversion: embedding vectors behind "
                                "the token (default 1)")
    class_prompts: list[str] = Field(default_factory=list, description="dreambooth, lora: prior preservation. "
                                     "The subject's class, as a prompt (such as 'a photo of a mug'): the base model "
                                     "draws --class-images of it, and training keeps drawing them as the base did. "
                                     "Repeat it to cover the class's variety (the images take the prompts in turn)")
    class_images: int = Field(default=100, ge=1, le=MAX_CLASS_IMAGES, description="dreambooth, lora: how many class "
                              "images the base model draws for --class-prompt (kept in --out/class-images; a rerun "
                              f"reuses them; at most {MAX_CLASS_IMAGES:,})")
    class_data: str | None = Field(default=None, description="dreambooth, lora: a `dataset build` dataset of class "
                                   "images to use instead of drawing them with --class-prompt")
    prior_loss_weight: float = Field(default=1.0, gt=0, allow_inf_nan=False, description="dreambooth, lora: weight of the class "
                                     "samples' loss against the instance samples'")
    train_text_encoder: bool = Field(default=False, description="train the text encoder too (LoRA on it for lora)")
    fsdp: bool = Field(default=False, description="full, dreambooth: shard weights, gradients and optimizer state "
                                                  "across workers (FSDP2) instead of a DDP copy on each")
    kl_weight: float = Field(default=1e-6, ge=0, allow_inf_nan=False, description="vae: weight of the KL term")
    crop: int = Field(default=0, ge=0, description="vae: train on random square crops of this many px (0: whole images)")
    crop_candidates: int = Field(default=1, ge=1, le=64, description="vae, with --crop: draw this many random crops "
                                 "per image and train on the busiest (largest pixel spread), so plain background "
                                 "does not fill the batch")
    crop_span: int = Field(default=0, ge=0, description="vae, with --crop: each crop covers a random square of "
                           "--crop to this many px of the image, resized to --crop, so crops also see whole "
                           "images at a lower scale (0: crops of --crop px, not resized)")
    pixel_loss: Literal["mse", "l1"] = Field(default="mse", description="vae: the pixel reconstruction loss "
                                             "(l1: the loss of SD's own autoencoders)")
    calibrate_scale: bool = Field(default=False, description="vae: set the VAE's scaling_factor to 1 / std of its "
                                  "latents (for a VAE trained from scratch; keep a base's own when fine-tuning)")
    cache_latents: bool = Field(default=False, description="full, lora, dreambooth, textual-inversion: encode "
                                "every image once before training, not at every step (32 KiB per image at 256 "
                                "px, 288 KiB at 768)")
    max_failures: int = Field(default=2, ge=0, description="worker failures Ray Train recovers from a checkpoint")
    address: str | None = Field(default=None, description="Ray address; default RAY_ADDRESS, else local Ray")
    verbose: bool = Field(default=False, description="also show Ray's and the workers' log lines here (they always go "
                          "to the run's log file)")
    shared_out: bool = Field(default=False, description="--out is a local path every node mounts (NFS, a shared "
                             "volume): allow it on a cluster of more than one node")

    @property
    def result_name(self) -> str:
        """What the run writes, in words: "LoRA", "embedding of <token>" or "model"."""
        return {"lora": "LoRA", "textual-inversion": f"embedding of {self.token}"}.get(self.method, "model")

    @property
    def learning_rate(self) -> float:
        return self.lr or DEFAULT_LR[self.method]

    @property
    def precision(self) -> Literal["no", "fp16", "bf16"]:
        """The autocast dtype's name: --mixed-precision, with auto meaning bf16 on GPUs and fp32 on CPUs."""
        if self.mixed_precision == "auto":
            return "bf16" if self.gpu else "no"
        return self.mixed_precision

    @property
    def lora_layer_set(self) -> Literal["attention", "transformer", "all"]:
        return self.lora_layers or "attention"

    @property
    def token_vectors(self) -> int:
        return self.vectors or 1

    @property
    def torch_threads(self) -> int:
        """CPU workers: torch threads each (the driver sets cpus_per_worker from the cluster's CPUs)."""
        return self.cpus_per_worker or 1

    @property
    def prior(self) -> bool:
        """Prior preservation: class images train beside the instances (--class-prompt or --class-data)."""
        return bool(self.class_prompts) or self.class_data is not None

    def _said(self, name: str, given: set[str] | None) -> bool:
        """Whether the fine-tune was given field `name`: the CLI says which flags it was given (so another
        method's flag is refused even at its default value); elsewhere a value other than the default counts."""
        if given is not None:
            return name in given
        return getattr(self, name) != type(self).model_fields[name].default

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> "TrainConfig":
        given = (info.context or {}).get("given")
        said = functools.partial(self._said, given=set(given) if given is not None else None)
        for field in ("out", "data", "class_data", "base"):
            flag, value = "--" + field.replace("_", "-"), getattr(self, field)
            if value is not None and not value.strip():  # "" would be the working directory
                raise ValueError(f"{flag} must not be empty: give a folder or URI")
            # The workers do not share the driver's working directory (Ray starts them elsewhere): a relative
            # path is made absolute here, before any of them reads it. A base that is not a folder here (a
            # preset's name) stays as given.
            if value and (field != "base" or "://" in value or os.path.isdir(os.path.expanduser(value))):
                setattr(self, field, run_path(flag, value))
        for flag, uri in (("--out", self.out), ("--data", self.data), ("--class-data", self.class_data),
                          ("--base", self.base if "://" in self.base else None)):
            if uri and (problem := store_problem(flag, uri)):  # (the workers run in processes of their own)
                raise ValueError(problem)
        if self.resolution is not None and (not 64 <= self.resolution <= MAX_SIDE or self.resolution % 8):
            raise ValueError(f"--resolution must be a multiple of 8 in 64..{MAX_SIDE}, got {self.resolution}")
        if self.crop % 8 or (said("crop") and self.method != "vae"):
            raise ValueError(f"--crop is for vae and must be a multiple of 8; got {self.crop} with {self.method}")
        if self.crop_candidates > 1 and not self.crop:
            raise ValueError(f"--crop-candidates {self.crop_candidates} needs --crop: it picks among random crops")
        if self.crop_span and not 0 < self.crop < self.crop_span:
            raise ValueError(f"--crop-span {self.crop_span} needs a --crop below it (got --crop {self.crop}): it "
                             "is the largest square a crop may span before it is resized to --crop px")
        for vae_only in ("crop_candidates", "crop_span"):
            if said(vae_only) and self.method != "vae":
                raise ValueError(f"--{vae_only.replace('_', '-')} is for vae (with --crop); got it with {self.method}")
        if said("pixel_loss") and self.method != "vae":
            raise ValueError(f"--pixel-loss is for vae; {self.method} trains on the diffusion loss")
        if self.calibrate_scale and self.method != "vae":
            raise ValueError("--calibrate-scale is for vae: it sets the scale of the VAE's own latents")
        if self.method == "vae":  # what only the diffusion methods read: refused, not ignored without a word
            # (--validation-prompt only where the CLI says it was given: the workers' copy has the defaults filled in)
            unread = [f for f in ("train_text_encoder", "min_snr_gamma", "noise_offset", "caption_dropout",
                                  "validation_guidance") if said(f)]
            unread += ["validation_prompts"] if given is not None and "validation_prompts" in given else []
            if unread:
                flags = ", ".join(flag_of(f) for f in unread)
                raise ValueError(f"{flags} {'is' if len(unread) == 1 else 'are'} for full, lora, dreambooth and "
                                 "textual-inversion: vae trains the autoencoder on images alone (no prompts, no "
                                 "noise), and its validation images are round trips of dataset images")
        if self.cache_latents and self.method == "vae":
            raise ValueError("--cache-latents is for full, lora, dreambooth and textual-inversion: a VAE being "
                             "trained changes its latents")
        inversion = self.method == "textual-inversion"
        if inversion and not self.token:
            raise ValueError("textual-inversion needs --token: the new word the captions use and prompts will call, "
                             "such as <my-mug>")
        if self.token is not None and (not inversion or any(c.isspace() for c in self.token)):
            raise ValueError(f"--token is for textual-inversion and must be one word without spaces; got "
                             f"{self.token!r} with {self.method}")
        if (self.init_word is not None or self.vectors is not None) and not inversion:
            raise ValueError("--init-word and --vectors are for textual-inversion")
        if inversion and self.train_text_encoder:
            raise ValueError("textual-inversion trains only the new token's vectors; drop --train-text-encoder")
        if self.prior and self.method not in PRIOR_METHODS:
            raise ValueError(f"--class-prompt and --class-data are for dreambooth and lora (prior preservation); "
                             f"got {self.method}")
        for i, prompt in enumerate(self.class_prompts, 1):
            if not prompt.strip():
                raise ValueError(f"--class-prompt must not be empty (number {i} is {prompt!r}): give the subject's "
                                 "class, such as 'a photo of a mug'")
            if prompt in self.class_prompts[:i - 1]:
                raise ValueError(f"--class-prompt {prompt!r} is given twice; give each prompt once (the class "
                                 "images take them in turn)")
        if len(self.class_prompts) > self.class_images:
            raise ValueError(f"--class-images {self.class_images} is fewer than the {len(self.class_prompts)} "
                             f"--class-prompt given, so {self.class_prompts[self.class_images]!r} would never be "
                             f"drawn; give --class-images {len(self.class_prompts)} or more")
        if self.class_prompts and self.class_data is not None:
            raise ValueError("give --class-prompt (the base model draws the class images) or --class-data (a "
                             "dataset of class images), not both")
        if self.method == "dreambooth" and not self.prior:
            raise ValueError("dreambooth needs --class-prompt (such as 'a photo of a mug': the class of the subject "
                             "in your captions) or --class-data; without prior preservation, use full")
        if self.lora_layers is not None and self.method != "lora":
            raise ValueError(f"--lora-layers is for lora; {self.method} trains whole weights")
        # flags another method reads: refused, not ignored without a word
        if self.method != "lora" and (said("rank") or said("alpha")):
            raise ValueError(f"--rank and --alpha are for lora; {self.method} trains "
                             f"{'the token vectors' if inversion else 'whole weights'}")
        if self.method != "vae" and said("kl_weight"):
            raise ValueError(f"--kl-weight is for vae: it weighs the autoencoder's KL term; got it with {self.method}")
        if not self.prior and said("prior_loss_weight"):
            raise ValueError("--prior-loss-weight weighs the class images' loss: it needs --class-prompt or "
                             "--class-data (dreambooth, lora)")
        if not self.class_prompts and said("class_images"):
            raise ValueError("--class-images is how many class images --class-prompt draws: give --class-prompt "
                             "(dreambooth, lora)" + ("; every image of --class-data is used" if self.class_data else ""))
        if self.fsdp and self.method not in ("full", "dreambooth"):
            raise ValueError(f"--fsdp shards full-parameter training (full, dreambooth); {self.method} trains few "
                             "enough weights for DDP")
        if self.fsdp and self.ema_decay:
            raise ValueError("--ema-decay does not work with --fsdp yet (the average would need sharding too)")
        if self.mixed_precision in ("fp16", "bf16") and not self.gpu:
            raise ValueError(f"--mixed-precision {self.mixed_precision} needs --gpu (CPU training runs in fp32)")
        return self
