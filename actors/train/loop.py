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
import resource
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch

from actors.train import say
from actors.train.checkpoints import (CheckpointMismatch, gather_state, load_checkpoint, local_copy, publish,
                                     save_checkpoint)
from actors.train.config import TrainConfig
from actors.train.data import batch_tensors, encode_dataset, random_crops, sample_indices, step_generator, token_ids
from actors.train.losses import diffusion_loss, min_snr_weights, prior_weights, training_target, vae_loss, warmup_cosine
from actors.train.model import drawable_pipeline, latent_scale, make_trainable, shard, trainee
from actors.train.stored import RepeatsOnRetry, fatal_error, note_fatal, stored_checkpoints
from actors.train.validation import eval_loss, fixed_eval_batch, validate
from manifests.stores import url_to_fs, without_passwords


class UnloadableCheckpoint(RepeatsOnRetry, RuntimeError):
    """The checkpoint a run resumes from does not load: every retry would pick it again."""


def train_loop(config: dict) -> None:
    """The Ray Train worker function: `config` is {"train": TrainConfig.model_dump(), "base": ModelInfo fields,
    "run": the driver's run (a token)}.
    An error that a retry would meet again is written down for the driver, and a later attempt (Ray Train
    retries --max-failures times) stops on it before loading anything (actors.train.stored.RepeatsOnRetry)."""
    from actors.models import ModelInfo

    cfg = TrainConfig.model_validate(config["train"])
    earlier = fatal_error(cfg.out, config["run"])
    if earlier is not None:
        raise RuntimeError(f"an earlier attempt of this run stopped on an error a retry meets again: {earlier}")
    try:
        _train(cfg, ModelInfo(**config["base"]))
    except RepeatsOnRetry as exc:
        note_fatal(cfg.out, str(exc), config["run"])
        raise


def _train(cfg: TrainConfig, base) -> None:
    """One attempt of the run, on this worker."""
    import ray.train
    import ray.train.torch
    from diffusers import DDPMScheduler

    from actors.models import load_pipeline

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)  # same LoRA init everywhere (DDP also broadcasts rank 0's weights)

    # 1. the model: everything in fp32 (the master weights); autocast runs the maths in half on a GPU
    pipe = load_pipeline(base, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    trainable = make_trainable(cfg, pipe)
    if rank == 0:
        say(f"{cfg.method}: {trainable:,} trainable parameters")
    pipe.vae.to(device)
    net = trainee(cfg, pipe)
    model = shard(net, device, world) if cfg.fsdp else _data_parallel(net, device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = _ema(params, cfg.ema_decay)
    # The training noise schedule is the base model's own, so prediction_type (epsilon or v) carries over.
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # 2. resume: Ray hands back the latest checkpoint of this run (after a crash, or a rerun into --out), or a
    # newer one it had not recorded yet when the run stopped
    state = (net, optimizer, lr_scheduler, scaler, ema)
    passed_over: list[tuple[str, str]] = []  # checkpoints that are not whole: (folder name, why)
    step = resumed_from = resume_from(cfg, ray.train.get_checkpoint(), state, passed_over)
    if passed_over and rank == 0:
        say(passed_over_line(passed_over))
    if resumed_from is not None and rank == 0:
        say(f"resuming from the checkpoint at step {step}")
    step = step or 0

    # 3. the data: this worker's rows are chosen per step (see sample_indices); images decode per batch.
    # Class images (prior preservation) follow the instance rows in one table, so one latent cache holds both.
    table, n, classes = _training_table(cfg)
    # The eval loss and validation images are rank 0's, except under FSDP, where every forward is collective.
    fixed = fixed_eval_batch(cfg, table, pipe, noise_scheduler, device) if cfg.fsdp or rank == 0 else None
    latent_cache = encode_dataset(cfg, table, pipe.vae, device, rank, world) if cfg.cache_latents else None
    log = TrainLog(cfg.out, rank)
    skipped = {"passed_over": [{"checkpoint": name, "why": why} for name, why in passed_over]} if passed_over else {}
    if resumed_from is not None:
        log.line({"event": "resumed", "step": resumed_from, **skipped})
    elif rank == 0:
        log.line({"event": "started", "trainable_parameters": trainable, "workers": world, "class_rows": classes,
                  "config": cfg.model_dump(), **skipped})
    if latent_cache is not None:
        log.line({"event": "cached_latents", "images": table.num_rows})

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
            # only the last micro-step of an accumulation syncs gradients across workers
            last = micro == cfg.grad_accum - 1
            if cfg.fsdp:
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()
            with sync, torch.autocast(device.type, dtype=half, enabled=half is not None):
                loss = _micro_step(cfg, pipe, model, noise_scheduler, table, rows, latent_cache, g, device)
                scaler.scale(loss / cfg.grad_accum).backward()
            losses.append(loss.item())
            window_samples += len(rows)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        used_lr = lr_scheduler.get_last_lr()[0]  # the step's own: after step() it is the next one's (0 at the end)
        lr_scheduler.step()
        if ema is not None:
            ema.step(params)
        step += 1

        # 5. report, checkpoint, validate: report is collective, so every worker calls it at the same steps
        checkpointing = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if checkpointing or step % cfg.log_every == 0:
            metrics = {"step": step, "loss": float(np.mean(losses)), "lr": used_lr,
                       "samples_per_second": window_samples * world / (time.perf_counter() - window_start),
                       "peak_rss_mb": _peak_rss_mb()}
            eval_value = eval_loss(model, fixed) if fixed is not None else None
            if rank == 0:
                metrics["eval_loss"] = eval_value
                say(f"step {step}/{cfg.steps} loss {metrics['loss']:.4f} eval {eval_value:.4f} "
                    f"lr {metrics['lr']:.2e} {metrics['samples_per_second']:.2f} samples/s")
            log.line(metrics, durable=checkpointing)  # a checkpoint's metrics are in the store before it
            state = (net, optimizer, lr_scheduler, scaler, ema) if checkpointing else None
            _report(metrics, state, step, cfg.fsdp, rank)
            window_start, window_samples, losses = time.perf_counter(), 0, []
        if cfg.validate_every and step % cfg.validate_every == 0 and step < cfg.steps:
            drawable = drawable_pipeline(pipe, model, cfg.fsdp, rank)
            if drawable is not None:
                validate(cfg, base, drawable, fixed, step)

    # 6. the result: validation images of the final weights, then the model or LoRA (rank 0 only)
    peaks = [_peak_rss_mb()]
    if world > 1:
        peaks = [None] * world
        torch.distributed.all_gather_object(peaks, _peak_rss_mb())
    if ema is not None:  # the averaged weights are what is drawn and written
        ema.copy_to(params)
    final = drawable_pipeline(pipe, model, cfg.fsdp, rank)
    if rank == 0:
        validate(cfg, base, final, fixed, step)
        finished = {"event": "finished", "step": step, "peak_rss_mb_per_worker": peaks}
        if cfg.method == "vae" and cfg.calibrate_scale:
            finished["scaling_factor"] = _calibrate(cfg, final, table, device)
        publish(cfg, base, final)
        log.line(finished)
        say(f"wrote the {cfg.result_name} to {cfg.out}")


def resume_from(cfg: TrainConfig, checkpoint, state: tuple, passed_over: list | None = None) -> int | None:
    """Load the newest whole checkpoint of --out/checkpoints into `state` (net, optimizer, lr_scheduler, scaler,
    ema); returns its step, or None when there is none. Ray's own `checkpoint` is one of them, but may not be
    the newest, and one cut short in its upload (or damaged since) is passed over (stored_checkpoints), and
    added to `passed_over` as (folder name, why). Which one is told from the
    store's listing and the files' heads, so every worker takes the same; one that then fails to load stops
    the run, naming it (falling back on one worker only would leave the workers at different steps)."""
    import ray.train

    skipped: list[tuple[str, str]] = []
    stored = stored_checkpoints(cfg.out, skipped)
    # every one, older ones too (Ray keeps a few; their folders' names are local times, no order across zones)
    (passed_over if passed_over is not None else []).extend(skipped)
    if not stored and checkpoint is None:
        return None
    if stored:
        folder = stored[0][1]
        name = folder.rstrip("/").rsplit("/", 1)[-1]
        if checkpoint is not None and checkpoint.path.rstrip("/").rsplit("/", 1)[-1] == name:
            chosen = checkpoint  # Ray's own: one download per node, shared by its workers
        elif checkpoint is not None:
            parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
            chosen = ray.train.Checkpoint(path=f"{parent}/{name}", filesystem=checkpoint.filesystem)
        else:
            chosen = None
    else:  # a store that does not list its folders: Ray's record alone
        folder, chosen = checkpoint.path, checkpoint
    try:
        with (chosen.as_directory() if chosen is not None else local_copy(folder)) as directory:
            return load_checkpoint(directory, *state, fsdp=cfg.fsdp)
    except Exception as exc:
        if not _in_the_files(exc):  # the store, the network or memory: Ray Train's retry may well get through
            raise RuntimeError(f"the checkpoint {folder} could not be read ({type(exc).__name__}: {exc})") from exc
        raise UnloadableCheckpoint(f"the checkpoint {folder} does not load ({type(exc).__name__}: {exc}); move it "
                                   "aside to resume from the one before it, or give a new --out") from exc


def passed_over_line(passed_over: list[tuple[str, str]]) -> str:
    """The line for the checkpoints a resume passed over, not being whole."""
    return ("passed over " + "; ".join(f"{name} ({why})" for name, why in passed_over)
            + " (not whole: cut short in its upload, or damaged since)")


def _in_the_files(exc: Exception) -> bool:
    """Whether a checkpoint failed to load because of what its files hold (a header or JSON that does not parse,
    a missing key, tensors of other names or shapes), which every retry meets again, rather than on the way to
    them: an OSError of the store or network, a timeout, memory, or a collective that lost a peer (FSDP's load
    is collective: gloo's "Connection closed by peer" is a RuntimeError too, so only torch's own state-dict
    mismatch counts among those)."""
    from safetensors import SafetensorError

    if isinstance(exc, (SafetensorError, CheckpointMismatch, ValueError, KeyError, TypeError, IndexError)):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith("Error(s) in loading state_dict")


class TrainLog:
    """--out/train_log.jsonl, one JSON record a line, written by rank 0 only.

    On a local disk each line is appended as it comes. Object stores (S3, GCS) cannot append, so there the
    file is rewritten whole, at most every `REWRITE_SECONDS` for progress lines, and at once for a line
    that must not be lost (`durable`: events, and the metrics of a step that checkpoints).
    """

    REWRITE_SECONDS = 10.0

    def __init__(self, out: str, rank: int):

        from manifests.stores import is_local_fs

        self.rank = rank
        self.fs, root = url_to_fs(out)
        self.path = f"{root}/train_log.jsonl"
        self.append = is_local_fs(self.fs)
        if rank == 0 and self.append:
            self.fs.makedirs(root, exist_ok=True)
        self.text = ""  # the whole file, for stores that are rewritten
        if rank == 0 and not self.append and self.fs.exists(self.path):
            self.text = self.fs.cat_file(self.path).decode()
        self.written_at = 0.0  # when the file was last rewritten
        self.unwritten = False  # lines in `text` not in the store yet

    def line(self, record: dict, durable: bool = True) -> None:
        if self.rank != 0:
            return
        text = without_passwords(json.dumps(record)) + "\n"  # the config's URIs: the file travels with the model
        if self.append:
            with self.fs.open(self.path, "a") as f:  # one short write: a kill leaves whole lines
                f.write(text)
            return
        self.text += text
        self.unwritten = True
        if durable or time.monotonic() - self.written_at >= self.REWRITE_SECONDS:
            self.flush()

    def flush(self) -> None:
        from manifests.ledger import atomic_write

        if self.rank == 0 and self.unwritten:
            atomic_write(self.fs, self.path, self.text.encode())
            self.written_at, self.unwritten = time.monotonic(), False


def _data_parallel(net: torch.nn.Module, device) -> torch.nn.Module:
    """`net` under DDP, tuned for where it runs."""
    import ray.train.torch

    # On CPUs, gloo's all-reduce competes with the backward pass for the same cores: one bucket sent
    # after the backward measured 1.35x faster per step than DDP's default 25 MB buckets on 2 workers.
    # On GPUs (NCCL) the default buckets overlap communication with the backward, as intended.
    # No buffer of the UNet or text encoder changes in training, so DDP need not broadcast them each step.
    ddp = {"gradient_as_bucket_view": True, "broadcast_buffers": False,
           **({"bucket_cap_mb": 4096} if device.type == "cpu" else {})}
    return ray.train.torch.prepare_model(net, parallel_strategy="ddp", parallel_strategy_kwargs=ddp)


def _ema(params: list, decay: float | None):
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=decay)


def _training_table(cfg: TrainConfig):
    """(the rows to train on, instance rows, class rows): class rows follow the instances in one table."""
    from manifests.dataset import read_dataset

    table = read_dataset(cfg.data)
    if not cfg.class_data:
        return table, table.num_rows, 0
    import pyarrow as pa

    columns = ["caption", "image"]
    class_table = read_dataset(cfg.class_data).select(columns)
    both = pa.concat_tables([table.select(columns), class_table.cast(table.select(columns).schema)])
    return both, table.num_rows, class_table.num_rows


def _micro_step(cfg: TrainConfig, pipe, model, noise_scheduler, table, rows: list[int], latent_cache, g,
                device) -> torch.Tensor:
    """The loss of one micro-step on `rows` (instance rows first, then class rows)."""
    if cfg.method == "vae":
        pixels, _ = batch_tensors(table, rows, None, cfg.resolution, captions=False)
        pixels = random_crops(pixels, cfg.crop, g, cfg.crop_candidates, cfg.crop_span).to(device)
        eps = torch.randn((pixels.shape[0], pipe.vae.config.latent_channels,
                           pixels.shape[2] // 8, pixels.shape[3] // 8), generator=g).to(device)
        recon, kl = model(pixels, eps)
        return vae_loss(recon, pixels, kl, cfg.kl_weight, cfg.pixel_loss)
    if latent_cache is None:
        pixels, ids = batch_tensors(table, rows, pipe.tokenizer, cfg.resolution)
        with torch.no_grad():
            posterior = pipe.vae.encode(pixels.to(device)).latent_dist
        mean, std = posterior.mean, posterior.std
    else:
        ids = token_ids(table, rows, pipe.tokenizer)
        mean, std = (latent_cache[k][rows].to(device) for k in ("mean", "std"))
    weights = prior_weights(cfg.batch_size, len(rows) - cfg.batch_size, cfg.prior_loss_weight)
    return _diffusion_step(cfg, pipe, model, noise_scheduler, mean, std, ids.to(device), g, weights)


def _report(metrics: dict, state, step: int, fsdp: bool, rank: int) -> None:
    """ray.train.report, with a checkpoint when `state` (net, optimizer, lr_scheduler, scaler, ema) is given.
    Every worker calls it (it is collective); rank 0 writes the one copy of the checkpoint."""
    import ray.train

    if state is None:
        ray.train.report(metrics)
        return
    net, optimizer, lr_scheduler, scaler, ema = state
    weights, optimizer_state = gather_state(net, optimizer, fsdp)
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:  # the weights are the same on every worker (or gathered there): one copy
            save_checkpoint(directory, step, weights, optimizer_state, lr_scheduler, scaler, ema)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)


def _calibrate(cfg: TrainConfig, pipe, table, device) -> float:
    """vae --calibrate-scale: set the trained VAE's scaling_factor from its own latents; returns it."""
    pipe.vae.eval()
    pixels, _ = batch_tensors(table, list(range(min(table.num_rows, 256))), None, cfg.resolution, captions=False)
    factor = latent_scale(pipe.vae, pixels.to(device))
    pipe.vae.register_to_config(scaling_factor=factor)
    say(f"calibrated the VAE's scaling_factor: {factor:.5f}")
    return factor


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
