"""The generation path: resolved rows in, watermarked PNGs and ledger rows out. No Ray here.

A row's pixels depend on the row alone: each row gets its own `torch.Generator` seeded from the row, so
the same row draws the same image in a batch of 1 or 8, on any actor. Rows are drawn together only when
they can share a forward pass (same model, adapters, size, steps, scheduler and guidance).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from actors import watermark as wm
from actors.schedulers import make_scheduler
from manifests.ledger import atomic_write, ledger_row
from manifests.schema import group_key
from manifests.tokens import prompt_overflow

PNG_KEY = "parameters"


def plan_groups(rows: list[dict], max_batch: int) -> list[list[dict]]:
    """Split rows into batches of at most `max_batch` rows that share a group key, keeping first-seen order."""
    order = {}
    for row in rows:
        order.setdefault(group_key(row), len(order))
    batches = []
    for _, same in groupby(sorted(rows, key=lambda r: order[group_key(r)]), key=group_key):
        same = list(same)
        batches += [same[i:i + max_batch] for i in range(0, len(same), max_batch)]
    return batches


@torch.inference_mode()
def draw(pipe, rows: list[dict]) -> np.ndarray:
    """Denoise one group of rows; returns uint8 RGB images, shape (N, H, W, 3)."""
    # 1. check inputs: one group shares everything but prompt, negative prompt and seed
    first = rows[0]
    assert all(group_key(r) == group_key(first) for r in rows), "draw() got rows of different groups"
    # 2. one generator per row, on the CPU so a seed gives the same noise on any device
    generators = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows]
    # 3. a fresh scheduler of the row's kind, built on the model's own schedule (v-prediction stays v)
    pipe.scheduler = make_scheduler(first["scheduler"], pipe.scheduler.config)
    # 4. encode prompts, 5. draw initial latents per generator, 6. denoise, 7. decode: diffusers' pipeline
    out = pipe(
        prompt=[r["prompt"] for r in rows],
        negative_prompt=[r["negative_prompt"] or "" for r in rows],
        height=first["height"],
        width=first["width"],
        num_inference_steps=first["steps"],
        guidance_scale=first["guidance_scale"],
        generator=generators,
        output_type="np",
    )
    # 8. to 8-bit pixels
    return (np.clip(out.images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def png_bytes(rgb: np.ndarray, parameters: dict[str, Any]) -> bytes:
    """Encode an image as PNG with its generation parameters as UTF-8 JSON in an iTXt chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(PNG_KEY, json.dumps(parameters, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_png_parameters(data: bytes) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by `png_bytes`."""
    return json.loads(Image.open(io.BytesIO(data)).text[PNG_KEY])


def image_parameters(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale",
            "scheduler", "model", "model_fingerprint", "adapters", "params_hash", "watermark")
    return {k: row.get(k) for k in keys}


def generate_rows(
    get_pipe: Callable[[str], Any],
    rows: list[dict[str, Any]],
    *,
    fs,
    out_root: str,
    actor: str,
    max_batch: int,
) -> list[dict[str, Any]]:
    """Draw every row, write its image, and return one ledger row per input row.

    `get_pipe(row)` returns the pipeline ready to draw the row's group: its model loaded, its adapters
    active (the actor's job; tests pass a plain function). A batch that fails is retried row by row, so one
    bad row fails alone; the error is recorded and the other rows are drawn. Finishing a batch (watermark,
    PNG, write) runs on a helper thread while the next batch denoises: on a GPU those CPU seconds would
    otherwise leave the device idle.
    """
    results: list[dict] = []
    finishing = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as pool:
        for batch in plan_groups(rows, max_batch):
            for drawn, outcome, seconds, tokenizer in _draw_or_split(get_pipe, batch):
                if isinstance(outcome, Exception):
                    error = f"{type(outcome).__name__}: {outcome}"
                    results += [ledger_row(row, "failed", actor=actor, error=error) for row in drawn]
                else:
                    finishing.append(pool.submit(_finish, drawn, outcome, seconds, tokenizer,
                                                 fs=fs, out_root=out_root, actor=actor))
        for future in finishing:
            results += future.result()
    return results


def _draw_or_split(get_pipe, batch: list[dict]) -> list[tuple[list[dict], Any, float, Any]]:
    """[(rows, images or the exception, seconds per row, tokenizer)]: the batch, or its rows one by one."""
    started = time.perf_counter()
    try:
        pipe = get_pipe(batch[0])
        images = draw(pipe, batch)
        return [(batch, images, (time.perf_counter() - started) / len(batch), pipe.tokenizer)]
    except Exception as exc:  # noqa: BLE001 - recorded per row
        if len(batch) == 1:
            return [(batch, exc, 0.0, None)]
        return [item for row in batch for item in _draw_or_split(get_pipe, [row])]


def _finish(batch: list[dict], images: np.ndarray, draw_seconds: float, tokenizer, *, fs, out_root: str,
            actor: str) -> list[dict]:
    """Watermark, encode and write each drawn image; a row whose write fails is `failed`, alone."""
    results = []
    for row, rgb in zip(batch, images):
        started = time.perf_counter()
        try:
            if row["watermark"]:
                rgb = wm.embed(rgb, row["watermark"])
            data = png_bytes(rgb, image_parameters(row))
            path = f"{out_root.rstrip('/')}/images/{row['id']}.png"
            atomic_write(fs, path, data)
        except Exception as exc:  # noqa: BLE001 - a full disk or a lost store fails this row only
            results.append(ledger_row(row, "failed", actor=actor, error=f"{type(exc).__name__}: {exc}"))
            continue
        results.append(ledger_row(
            row, "ok", uri=fs.unstrip_protocol(path), sha256=hashlib.sha256(data).hexdigest(), actor=actor,
            warning=prompt_overflow(tokenizer, row["prompt"]),
            seconds=draw_seconds + time.perf_counter() - started,
        ))
    return results
