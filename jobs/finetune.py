"""`sdfleet finetune {full,lora,dreambooth,vae,textual-inversion}`: check everything, then hand the loop to Ray Train.

    --data (a `dataset build` folder)  --base (preset, directory or URI)  --out (any fsspec store)
      -> checks before any worker starts: workers, dataset columns and rows, base model, --out, resources
      -> TorchTrainer(actors.train.train_loop, ScalingConfig(num_workers=--workers, use_gpu=--gpu))
         checkpoints in --out/checkpoints through ray.train.report; a rerun into the same --out resumes
      -> --out: a diffusers model (full, dreambooth, vae), pytorch_lora_weights.safetensors (lora) or
         learned_embeds.safetensors (textual-inversion); validation/step-N/*.png, train_log.jsonl, finetune.json

Prior preservation (dreambooth; lora too): before training, the base model draws --class-images images of
--class-prompt (repeatable: the images take the prompts in turn) through `sdfleet generate` into
--out/class-images (a rerun draws only what is missing), `dataset build` turns them into --out/class-data,
and every step trains on as many class samples as instance samples, their loss weighted by
--prior-loss-weight.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import asdict
from typing import Literal

import fsspec
from pydantic import BaseModel, Field, model_validator

from actors.models import describe_model
from cluster.connect import ClusterError, connect
from jobs.errors import root_cause
from jobs.generate import log
from manifests.dataset import check_dataset

# What must match for a rerun into the same --out to continue the run rather than clash with it.
RESUME_KEYS = ("method", "base_fingerprint", "data", "rank", "lora_layers", "token", "vectors", "train_text_encoder",
               "class_data", "class_prompts", "prior_loss_weight", "workers", "batch_size", "grad_accum", "fsdp")
DEFAULT_LR = {"full": 1e-5, "dreambooth": 5e-6, "lora": 1e-4, "vae": 1e-4, "textual-inversion": 5e-3}
PRIOR_METHODS = ("dreambooth", "lora")  # the methods that can train with prior preservation


class FinetuneError(Exception):
    """The fine-tune cannot start or did not finish (exit 1)."""


class FinetuneConfig(BaseModel):
    """The flags of `sdfleet finetune`, checked before Ray starts."""

    method: Literal["full", "lora", "dreambooth", "vae", "textual-inversion"]
    data: str = Field(description="training dataset URI (from `sdfleet dataset build`)")
    base: str = Field(description="base model: preset (tiny, sd21-random), diffusers directory or URI")
    out: str = Field(description="output URI: the model or LoRA, checkpoints, validation images, logs")
    workers: int = Field(default=1, ge=1, description="Ray Train workers (one GPU each with --gpu)")
    gpu: bool = Field(default=False, description="one GPU per worker, NCCL, mixed precision")
    cpus_per_worker: int | None = Field(default=None, ge=1, description="CPU workers: cores (torch threads) each "
                                        "(default: the cluster's CPUs shared out)")
    steps: int = Field(default=1000, ge=1, description="optimizer steps")
    lr: float | None = Field(default=None, gt=0, description="peak learning rate (default: 1e-5 full, 5e-6 "
                             "dreambooth, 1e-4 lora and vae, 5e-3 textual-inversion)")
    batch_size: int = Field(default=4, ge=1, description="samples per worker per micro-step")
    grad_accum: int = Field(default=1, ge=1, description="micro-steps per optimizer step")
    resolution: int | None = Field(default=None, description="training size in px (default: the base model's)")
    seed: int = Field(default=0, description="seed for the data order, noise and timesteps")
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps before the cosine decay")
    checkpoint_every: int = Field(default=100, ge=1, description="steps between checkpoints")
    log_every: int = Field(default=10, ge=1, description="steps between progress lines")
    validate_every: int = Field(default=0, ge=0, description="steps between validation images (0: at the end only)")
    validation_prompts: list[str] = Field(default_factory=list, description="prompts drawn as validation images")
    min_snr_gamma: float | None = Field(default=None, gt=0, description="Min-SNR loss weighting (5 is usual)")
    noise_offset: float = Field(default=0.0, ge=0, description="noise offset (0.05-0.1 helps very dark/bright images)")
    caption_dropout: float = Field(default=0.0, ge=0, lt=1, description="share of samples trained on the empty "
                                   "prompt, which classifier-free guidance needs in a model trained from scratch")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="keep an EMA of the weights (0.9999 is usual)")
    gradient_checkpointing: bool = Field(default=False, description="trade compute for activation memory")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(default="auto", description="auto: bf16 on GPU, no on CPU")
    rank: int = Field(default=4, ge=1, description="LoRA rank")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha (default: the rank)")
    lora_layers: Literal["attention", "transformer", "all"] | None = Field(
        default=None, description="lora: the UNet layers it adapts. attention (default): the attention projections; "
        "transformer: every linear layer of the transformer blocks (what every backend can adapt); all: also the "
        "ResNet convolutions (LoCon: more capacity, eager backend only)")
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
    class_images: int = Field(default=100, ge=1, description="dreambooth, lora: how many class images the base "
                              "model draws for --class-prompt (kept in --out/class-images; a rerun reuses them)")
    class_data: str | None = Field(default=None, description="dreambooth, lora: a `dataset build` dataset of class "
                                   "images to use instead of drawing them with --class-prompt")
    prior_loss_weight: float = Field(default=1.0, gt=0, description="dreambooth, lora: weight of the class "
                                     "samples' loss against the instance samples'")
    train_text_encoder: bool = Field(default=False, description="train the text encoder too (LoRA on it for lora)")
    fsdp: bool = Field(default=False, description="full only: shard weights, gradients and optimizer state across "
                                                  "workers (FSDP2) instead of a DDP copy on each")
    kl_weight: float = Field(default=1e-6, ge=0, description="vae: weight of the KL term")
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
                                "every image once before training, not at every step (128 KB per image at 256 "
                                "px, 295 KB at 768)")
    max_failures: int = Field(default=2, ge=0, description="worker failures Ray Train recovers from a checkpoint")
    address: str | None = Field(default=None, description="Ray address; default RAY_ADDRESS, else local Ray")

    @property
    def prior(self) -> bool:
        """Prior preservation: class images train beside the instances (--class-prompt or --class-data)."""
        return bool(self.class_prompts) or self.class_data is not None

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneConfig":
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 8):
            raise ValueError(f"--resolution must be a multiple of 8 and at least 64, got {self.resolution}")
        if self.crop and (self.crop % 8 or self.method != "vae"):
            raise ValueError(f"--crop is for vae and must be a multiple of 8; got {self.crop} with {self.method}")
        if self.crop_candidates > 1 and not self.crop:
            raise ValueError(f"--crop-candidates {self.crop_candidates} needs --crop: it picks among random crops")
        if self.crop_span and not 0 < self.crop < self.crop_span:
            raise ValueError(f"--crop-span {self.crop_span} needs a --crop below it (got --crop {self.crop}): it "
                             "is the largest square a crop may span before it is resized to --crop px")
        if self.pixel_loss != "mse" and self.method != "vae":
            raise ValueError(f"--pixel-loss is for vae; {self.method} trains on the diffusion loss")
        if self.calibrate_scale and self.method != "vae":
            raise ValueError("--calibrate-scale is for vae: it sets the scale of the VAE's own latents")
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
        if self.fsdp and self.method not in ("full", "dreambooth"):
            raise ValueError("--fsdp shards full-parameter training (full, dreambooth); a LoRA's few weights train "
                             "fine with DDP")
        if self.fsdp and self.ema_decay:
            raise ValueError("--ema-decay does not work with --fsdp yet (the average would need sharding too)")
        if self.mixed_precision in ("fp16", "bf16") and not self.gpu:
            raise ValueError(f"--mixed-precision {self.mixed_precision} needs --gpu (CPU training runs in fp32)")
        return self


# Ray Train's background watchers, off on a local Ray: a one-machine run has no node to be preempted and
# no metrics backend, and on a 2-core box their polling takes CPU from the workers. A cluster keeps them.
# Set either variable yourself to override.
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Check, train, and return the summary written to --out/finetune.json."""
    from actors.train import TrainConfig

    started = time.time()
    # 1. inputs, before Ray: the dataset (footers only), the base model (configs only), the output store
    rows = check_dataset(cfg.data)
    base = describe_model("base", cfg.base)
    try:
        fs, root = fsspec.core.url_to_fs(cfg.out)
        fs.makedirs(root, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - any backend error means the same thing here
        raise FinetuneError(f"cannot write to --out {cfg.out}: {exc}") from exc
    resolution = cfg.resolution or base.width
    if cfg.token:
        _check_captions_use(cfg.data, cfg.token, rows)
        _check_token(cfg)
    class_data = cfg.class_data or (fs.unstrip_protocol(f"{root}/class-data") if cfg.prior else None)
    if cfg.class_data:
        check_dataset(cfg.class_data, "--class-data")
    if cfg.batch_size * cfg.workers > rows:
        log(f"note: a global batch of {cfg.batch_size * cfg.workers} is larger than the dataset ({rows} rows); "
            "samples repeat within a step")
    train = TrainConfig(
        method=cfg.method, data=cfg.data, base=asdict(base), out=cfg.out, steps=cfg.steps,
        lr=cfg.lr or DEFAULT_LR[cfg.method], batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        resolution=resolution, seed=cfg.seed, warmup_steps=cfg.warmup_steps, checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every, validate_every=cfg.validate_every,
        validation_prompts=cfg.validation_prompts or _default_validation_prompts(cfg),
        min_snr_gamma=cfg.min_snr_gamma, noise_offset=cfg.noise_offset, caption_dropout=cfg.caption_dropout,
        ema_decay=cfg.ema_decay,
        gradient_checkpointing=cfg.gradient_checkpointing,
        mixed_precision=("bf16" if cfg.gpu else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision,
        rank=cfg.rank, alpha=cfg.alpha, lora_layers=cfg.lora_layers or "attention",
        token=cfg.token, init_word=cfg.init_word, vectors=cfg.vectors or 1,
        train_text_encoder=cfg.train_text_encoder, class_data=class_data, prior_loss_weight=cfg.prior_loss_weight,
        fsdp=cfg.fsdp, kl_weight=cfg.kl_weight, crop=cfg.crop,
        crop_candidates=cfg.crop_candidates, crop_span=cfg.crop_span, pixel_loss=cfg.pixel_loss,
        calibrate_scale=cfg.calibrate_scale, cache_latents=cfg.cache_latents,
    )
    # 2. a rerun into the same --out continues that run; a different run there is refused, not mixed in
    record = run_record(cfg, base.fingerprint, class_data)
    _check_same_run(fs, root, record)
    if cfg.class_prompts:  # before this run's Ray: generation starts and stops its own
        class_rows = draw_class_images(cfg, fs, root, resolution)
        log(f"prior preservation: {class_rows} class images of {_quoted(cfg.class_prompts)} in {class_data}")

    # 3. Ray, and workers sized to it
    if not (cfg.address or os.environ.get("RAY_ADDRESS")):
        for key, value in LOCAL_TRAIN_ENV.items():
            os.environ.setdefault(key, value)
    resources = connect(cfg.address)
    try:
        scaling = _scaling(cfg, resources, train)
        log(f"{cfg.method} fine-tune of {cfg.base} on {rows} samples: {cfg.workers} worker(s) on "
            f"{'GPU' if cfg.gpu else 'CPU'}, {cfg.steps} steps, global batch "
            f"{cfg.batch_size * cfg.workers * cfg.grad_accum}, {resolution} px; out: {cfg.out}")
        _write_json(fs, f"{root}/finetune.json", {**record, "status": "running", "config": cfg.model_dump()})
        result = _fit(cfg, train, scaling, fs, root)
    finally:
        import ray

        ray.shutdown()

    # 4. the summary
    summary = {**record, "status": "finished", "steps": cfg.steps, "rows": rows, "resolution": resolution,
               "final_metrics": result, "wall_seconds": round(time.time() - started, 3),
               "output": fs.unstrip_protocol(root), "config": cfg.model_dump(),
               "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _write_json(fs, f"{root}/finetune.json", summary)
    return summary


def _scaling(cfg: FinetuneConfig, resources: dict, train) -> "object":
    from ray.train import ScalingConfig

    if cfg.gpu:
        gpus = resources.get("GPU", 0)
        if gpus < cfg.workers:
            if not (cfg.address or os.environ.get("RAY_ADDRESS")):  # a local Ray never gains GPUs
                raise ClusterError(f"--workers {cfg.workers} --gpu needs {cfg.workers} GPUs; this machine has {gpus:g}")
            # an autoscaling cluster adds GPU nodes once the workers ask for them
            log(f"the cluster shows {gpus:g} GPU(s) for {cfg.workers} worker(s): waiting for the autoscaler")
        return ScalingConfig(num_workers=cfg.workers, use_gpu=True)
    cpus = resources.get("CPU", 0)
    share = cfg.cpus_per_worker or cpus // cfg.workers
    if share < 1 or share * cfg.workers > cpus:
        raise ClusterError(f"--workers {cfg.workers} needs {max(1, share):g} CPU(s) each; the cluster has {cpus:g}")
    train.torch_threads = int(share)
    return ScalingConfig(num_workers=cfg.workers, use_gpu=False, resources_per_worker={"CPU": share})


def _fit(cfg: FinetuneConfig, train, scaling, fs, root: str) -> dict:
    import pyarrow.fs as pafs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from actors.train import train_loop

    LocalTorchTrainer = _local_trainer_class()
    # Ray Train writes checkpoints through pyarrow; any fsspec store (s3, gs, memory) goes through an adapter.
    if "file" in fs.protocol or "local" in fs.protocol:
        storage = dict(storage_path=root)
    else:
        storage = dict(storage_path=root, storage_filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
    run_config = RunConfig(
        name="checkpoints", **storage,  # --out/checkpoints: the same --out finds the same run again
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        failure_config=FailureConfig(max_failures=cfg.max_failures),
        worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(train.torch_threads),
                                         "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")}},
    )
    local = not (cfg.address or os.environ.get("RAY_ADDRESS"))
    trainer = (LocalTorchTrainer if local else TorchTrainer)(
        train_loop, train_loop_config=asdict(train), scaling_config=scaling, run_config=run_config)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise FinetuneError(f"training stopped: {root_cause(exc)}; checkpoints are in {cfg.out}/checkpoints, "
                            "rerun the same command to resume") from exc
    return dict(result.metrics or {})


def _local_trainer_class():
    from ray.train.torch import TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        """TorchTrainer without Ray Train's placement-group cleaner, for a local Ray.

        The cleaner asks the State API once a second whether the controller is alive. The State API is
        served by the dashboard, which `ray[data,train]` runs in minimal mode without it, so on a local
        Ray every query fails and is retried, forever: the answer never comes and the polling takes CPU
        from the workers (7% of a core, measured). On a local Ray the placement group dies with the
        Ray instance anyway. Ray 2.60 has no switch for it; `_create_default_callbacks` is where it adds it.
        """

        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if type(c).__name__ != "PlacementGroupCleanerCallback"]

    return LocalTorchTrainer


def run_record(cfg: FinetuneConfig, base_fingerprint: str, class_data: str | None) -> dict:
    """What identifies a fine-tune in its --out (finetune.json): a rerun must match it on RESUME_KEYS."""
    lora = cfg.method == "lora"
    return {"method": cfg.method, "base": cfg.base, "base_fingerprint": base_fingerprint, "data": cfg.data,
            "rank": cfg.rank if lora else None, "lora_layers": (cfg.lora_layers or "attention") if lora else None,
            "token": cfg.token, "vectors": (cfg.vectors or 1) if cfg.token else None,
            "train_text_encoder": cfg.train_text_encoder,
            "class_data": class_data, "class_prompts": cfg.class_prompts or None,
            "prior_loss_weight": cfg.prior_loss_weight if cfg.prior else None,
            "workers": cfg.workers, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "fsdp": cfg.fsdp}


def _check_same_run(fs, root: str, record: dict) -> None:
    path = f"{root}/finetune.json"
    if not fs.exists(path):
        return
    before = json.loads(fs.cat_file(path))
    if "class_prompt" in before:  # written before --class-prompt could repeat: one prompt or none
        legacy = before.pop("class_prompt")
        before["class_prompts"] = [legacy] if legacy else None
    before["class_prompts"] = before.get("class_prompts") or None  # none is recorded as null, never []
    clashes = [f"{k}: {before.get(k)!r} there, {record[k]!r} now" for k in RESUME_KEYS if before.get(k) != record[k]]
    if clashes:
        raise FinetuneError(f"--out {fs.unstrip_protocol(root)} holds another fine-tune ({'; '.join(clashes)}); "
                            "use a new --out, or the same flags to resume that one")


def _captions(uri: str):
    """The dataset's captions, file by file (a caller that needs only the first few stops early)."""
    from manifests.dataset import dataset_files

    import pyarrow.parquet as pq

    fs, files = dataset_files(uri)
    for path in files:
        with fs.open(path, "rb") as f:
            yield from pq.read_table(f, columns=["caption"]).column("caption").to_pylist()


def _check_captions_use(uri: str, token: str, rows: int) -> None:
    """textual-inversion: the token must appear in the captions, or no vector would ever get a gradient."""
    using = sum(token in (c or "") for c in _captions(uri))
    if not using:
        raise FinetuneError(f"no caption in {uri} mentions --token {token!r}; textual-inversion learns the token "
                            f"from captions that use it, such as 'a photo of {token}' (dataset build reads the "
                            "captions from the .txt files beside the images)")
    if using < rows:
        log(f"note: {rows - using} of {rows} captions do not mention {token}; they train nothing for it")


def _check_token(cfg: FinetuneConfig) -> None:
    """textual-inversion: a token the tokenizer already has, or a long init word, fails here rather than in
    every worker. Reads the tokenizer of a preset or a local model; a remote base is checked by the workers."""
    from pathlib import Path

    from actors.presets import PRESETS, TOKENIZER_DIR
    from actors.textual_inversion import TextualInversionError, check_placeholder
    from actors.tokenizer import load_tokenizer

    if cfg.base in PRESETS:
        tokenizer = load_tokenizer(TOKENIZER_DIR)
    elif (Path(cfg.base.removeprefix("file://")) / "tokenizer").is_dir():
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(Path(cfg.base.removeprefix("file://")) / "tokenizer")
    else:
        return
    try:
        check_placeholder(tokenizer, cfg.token, cfg.init_word, cfg.vectors or 1)
    except TextualInversionError as exc:
        raise FinetuneError(str(exc)) from exc


def draw_class_images(cfg: FinetuneConfig, fs, root: str, resolution: int) -> int:
    """Prior preservation: the base model draws --class-images of the --class-prompt(s), taking the prompts
    in turn, through `sdfleet generate` (the actors' own code; incremental, so a rerun draws only what is
    missing), and `dataset build` makes them --out/class-data. Returns the number of class images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.dataset import DatasetError, build_dataset
    from jobs.generate import GenerateConfig, RunFailed, run_generate

    folder = f"{root}/class-images"
    fs.makedirs(folder, exist_ok=True)
    ids = [f"class-{i:05d}" for i in range(cfg.class_images)]
    prompts = [cfg.class_prompts[i % len(cfg.class_prompts)] for i in range(len(ids))]
    manifest = pa.table({"id": ids, "prompt": prompts,
                         "seed": [cfg.seed * 1_000_003 + i for i in range(len(ids))],
                         "width": [resolution] * len(ids), "height": [resolution] * len(ids)})
    with fs.open(f"{folder}/manifest.parquet", "wb") as f:
        pq.write_table(manifest, f)
    # Unwatermarked: the model trains on these pixels, and should not learn a watermark's pattern.
    gen = GenerateConfig(manifests=[fs.unstrip_protocol(f"{folder}/manifest.parquet")], out=fs.unstrip_protocol(folder),
                         models={"default": cfg.base}, watermark=None, address=cfg.address,
                         actors=cfg.workers if cfg.gpu else 1, device="cuda" if cfg.gpu else "auto")
    log(f"prior preservation: drawing {len(ids)} class images of {_quoted(cfg.class_prompts)} with {cfg.base}")
    try:
        run_generate(gen)
    except RunFailed as exc:
        raise FinetuneError(f"could not draw the class images: {exc}") from exc
    existing = {p.rsplit("/", 1)[-1][:-4] for p in fs.glob(f"{folder}/images/*.png")}  # one listing, not N stats
    drawn = current_class_images(fs, folder, {i: prompt for i, prompt in zip(ids, prompts) if i in existing})
    if not drawn:
        raise FinetuneError(f"no class image was drawn from {_quoted(cfg.class_prompts)} (see "
                            f"{fs.unstrip_protocol(folder)}/results)")
    if len(drawn) < len(ids):
        log(f"note: {len(ids) - len(drawn)} of {len(ids)} class images failed; training uses the {len(drawn)} drawn")
    captions = "".join(json.dumps({"file": f"{i}.png", "caption": prompt}) + "\n" for i, prompt in drawn.items())
    _write_text(fs, f"{folder}/captions.jsonl", captions)
    try:
        summary = build_dataset(fs.unstrip_protocol(f"{folder}/images"), fs.unstrip_protocol(f"{root}/class-data"),
                                captions=fs.unstrip_protocol(f"{folder}/captions.jsonl"), resolution=resolution,
                                log=lambda line: None)
    except DatasetError as exc:
        raise FinetuneError(f"could not build the class dataset: {exc}") from exc
    return summary["rows"]


def current_class_images(fs, folder: str, wanted: dict[str, str]) -> dict[str, str]:
    """The class images (id -> prompt) that were drawn from the prompt this run wants, read from each PNG's own
    parameters. An image left from an earlier draw with another prompt (its redraw failed) is left out, so it
    is never trained on under a caption it was not drawn from."""
    from actors.png import read_png_parameters

    drawn_from = {i: read_png_parameters(fs.cat_file(f"{folder}/images/{i}.png")).get("prompt") for i in wanted}
    stale = [i for i in wanted if drawn_from[i] != wanted[i]]
    if stale:
        log(f"note: {len(stale)} class image(s) were drawn from another prompt and are left out, such as {stale[0]} "
            f"({drawn_from[stale[0]]!r}, not {wanted[stale[0]]!r})")
    return {i: prompt for i, prompt in wanted.items() if i not in stale}


def _default_validation_prompts(cfg: FinetuneConfig) -> list[str]:
    """The first two captions; with prior preservation, the first caption and the class, so the validation
    images show both the subject and whether the class is still drawn as the base drew it."""
    if cfg.prior:
        return _first_captions(cfg.data, 1) + (
            cfg.class_prompts[:1] if cfg.class_prompts else _first_captions(cfg.class_data, 1))
    return _first_captions(cfg.data, 2)


def _quoted(prompts: list[str]) -> str:
    return repr(prompts[0]) if len(prompts) == 1 else f"{len(prompts)} prompts ({prompts[0]!r}, ...)"


def _first_captions(uri: str, n: int) -> list[str]:
    import itertools

    return list(itertools.islice((c for c in _captions(uri) if c), n))


def _write_json(fs, path: str, data: dict) -> None:
    _write_text(fs, path, json.dumps(data, indent=2, default=str) + "\n")


def _write_text(fs, path: str, text: str) -> None:
    from manifests.ledger import atomic_write

    atomic_write(fs, path, text.encode())
