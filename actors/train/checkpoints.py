"""Checkpoints (safetensors and JSON, never pickles) that let a run continue exactly where it stopped, and
the result written where `generate` finds it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator

import torch

from actors.models import ModelInfo
from actors.train.config import TrainConfig
from manifests.ledger import atomic_put_file
from manifests.stores import is_local_fs, url_to_fs, without_passwords


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


@contextlib.contextmanager
def local_copy(folder: str) -> Iterator[str]:
    """`folder` (a path or URI) as a local directory: itself on a disk, a temporary copy otherwise."""
    fs, path = url_to_fs(folder)
    if is_local_fs(fs):
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        for remote in fs.find(path):
            local = os.path.join(tmp, os.path.relpath(remote, path))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(remote, local)
        yield tmp


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


class CheckpointMismatch(RuntimeError):
    """A checkpoint whose tensors are not this model's trainable ones (another --method or --rank)."""


def load_checkpoint(directory: str, model, optimizer, lr_scheduler, scaler, ema, fsdp: bool = False) -> int:
    """Restore what save_checkpoint wrote into the model and optimizer; returns the step it was taken at.
    Under FSDP every worker reads the files and keeps its own shard."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, "state.json")) as f:
        meta = json.load(f)
    weights = load_file(os.path.join(directory, "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise CheckpointMismatch(f"checkpoint {directory} does not fit this model: {len(set(weights) ^ expected)} "
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
        shadow = load_file(os.path.join(directory, "ema.safetensors"))  # on the CPU, as files load
        # each average where the weight it follows lives: diffusers keeps what it is given, and the next
        # ema.step would mix a CPU average with a GPU weight
        ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[str(i)].to(now.device)
                                                              for i, now in enumerate(ema.shadow_params)]})
    return int(meta["step"])


def publish(cfg: TrainConfig, base: ModelInfo, pipe) -> None:
    """Write the result where `generate` finds it: a diffusers model at the root of --out (full),
    --out/pytorch_lora_weights.safetensors (lora) or --out/learned_embeds.safetensors (textual-inversion).
    A trained VAE goes out as a whole model, like full."""

    from actors.lora_io import save_lora
    from actors.textual_inversion import save_embedding

    fs, root = url_to_fs(cfg.out)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.method == "lora":
            save_lora(pipe.unet, pipe.text_encoder if cfg.train_text_encoder else None, tmp)
        elif cfg.method == "textual-inversion":
            save_embedding(pipe.text_encoder, cfg.token, tmp)
        else:
            pipe.save_pretrained(tmp, safe_serialization=True)
            with open(os.path.join(tmp, "sdfleet.json"), "w") as f:
                json.dump({"base": without_passwords(base.ref), "width": base.width, "height": base.height,
                           "steps": base.steps, "scheduler": base.scheduler}, f, indent=2)
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                local = os.path.join(dirpath, name)
                fs.makedirs(f"{root}/{os.path.relpath(dirpath, tmp)}".rstrip("/."), exist_ok=True)
                # atomically: a rerun publishes over a good output, and a kill then would leave it cut short
                atomic_put_file(fs, local, f"{root}/{os.path.relpath(local, tmp)}")
