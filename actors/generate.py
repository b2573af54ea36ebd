"""The draw stage's work: resolved rows in, pixels out (and, for callers that want it whole, ledger rows). No Ray here.

A row's pixels depend on the row alone: each row gets its own `torch.Generator` seeded from the row, so
the same row draws the same image in a batch of 1 or 8, on any actor, after any other group. Rows are
drawn together only when they can share a forward pass (same model, adapters, size, steps, scheduler and
guidance). Marking, encoding and writing the images is `actors.finish`.
"""

from __future__ import annotations

import logging
import re
import time
from itertools import groupby
from typing import Any, Callable

import numpy as np
import torch

from actors.adapters import AdapterError
from actors.finish import finish_rows
from actors.schedulers import make_scheduler
from manifests.schema import group_key, is_guided
from manifests.tokens import prompt_overflow


class _NoTruncationNotice(logging.Filter):
    """diffusers logs the words CLIP cut off, whole, at every batch; the row's own `warning` says it once,
    bounded (manifests.tokens.prompt_overflow), so a 100 KB prompt is not also a 100 KB line on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("The following part of your input was truncated")


_PIPELINE_LOGGER = logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
if not any(isinstance(f, _NoTruncationNotice) for f in _PIPELINE_LOGGER.filters):
    _PIPELINE_LOGGER.addFilter(_NoTruncationNotice())


def plan_groups(rows: list[dict], max_batch: int | Callable[[dict], int]) -> list[list[dict]]:
    """Split rows into batches of at most `max_batch` rows (or `max_batch(first row)` for each group) that
    share a group key, keeping first-seen order."""
    order = {}
    for row in rows:
        order.setdefault(group_key(row), len(order))
    batches = []
    for _, same in groupby(sorted(rows, key=lambda r: order[group_key(r)]), key=group_key):
        same = list(same)
        limit = max_batch(same[0]) if callable(max_batch) else max_batch
        batches += [same[i:i + limit] for i in range(0, len(same), limit)]
    return batches


def spelled_as_loaded(pipe, prompt: str) -> str:
    """`prompt` with each multi-vector embedding's token written as it was loaded (lower case). CLIP's tokenizer
    matches added tokens in any case, but diffusers spells a token out into `tok tok_1 ...` only where the
    prompt writes it exactly: written otherwise, it drew with the embedding's first vector alone."""
    added = getattr(getattr(pipe, "tokenizer", None), "added_tokens_encoder", {})
    for token in added:
        if f"{token}_1" in added and token.lower() in prompt.lower():
            prompt = re.sub(re.escape(token), lambda _: token, prompt, flags=re.IGNORECASE)
    return prompt


@torch.inference_mode()
def draw(pipe, rows: list[dict]) -> np.ndarray:
    """Denoise one group of rows; returns uint8 RGB images, shape (N, H, W, 3)."""
    # 1. check inputs: one group shares everything but prompt, negative prompt and seed
    first = rows[0]
    assert all(group_key(r) == group_key(first) for r in rows), "draw() got rows of different groups"
    # 2. one generator per row, on the CPU so a seed gives the same noise on any device
    generators = [torch.Generator("cpu").manual_seed(int(r["seed"])) for r in rows]
    # 3. a fresh scheduler of the row's kind, built on the model's own schedule (v-prediction stays v), never
    #    on the previous group's: its settings (Karras sigmas, say) would carry into this group
    pipe.scheduler = make_scheduler(first["scheduler"], model_scheduler_config(pipe))
    # 4. encode prompts, 5. draw initial latents per generator, 6. denoise, 7. decode: diffusers' pipeline
    out = pipe(
        prompt=[spelled_as_loaded(pipe, r["prompt"]) for r in rows],
        negative_prompt=[spelled_as_loaded(pipe, r["negative_prompt"] or "") for r in rows],
        height=first["height"],
        width=first["width"],
        num_inference_steps=first["steps"],
        guidance_scale=first["guidance_scale"],
        generator=generators,
        output_type="np",
    )
    # 8. to 8-bit pixels, which would turn NaN into black: such an image is an error, not a picture
    finite = np.isfinite(out.images).all(axis=(1, 2, 3))
    if not finite.all():  # draw_rows then draws the batch row by row, so only the rows it touches fail
        used = ", ".join(f"{a['name']!r} at scale {a['scale']:g}" for a in first.get("adapters") or [] if a["scale"])
        cause = (f"with adapter(s) {used}: a scale too large, or a model that overflows in this precision" if used
                 else "a model that overflows in this precision")
        raise ValueError(f"{(~finite).sum()} of {len(rows)} image(s) came out as NaN or infinite values ({cause}); "
                         "nothing was written")
    return (np.clip(out.images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def model_scheduler_config(pipe) -> Any:
    """The scheduler config the pipeline came with. `draw` is the only place that swaps a pipeline's
    scheduler, so the config it finds at a pipeline's first draw is the model's own; it is kept on the
    pipeline and every later group's scheduler is built from it."""
    if getattr(pipe, "sdfleet_model_scheduler_config", None) is None:
        pipe.sdfleet_model_scheduler_config = pipe.scheduler.config
    return pipe.sdfleet_model_scheduler_config


def draw_rows(get_pipe: Callable[[dict], Any], rows: list[dict[str, Any]], *,
              max_batch: int | Callable[[dict], int], fits: dict[tuple, int] | None = None) -> list[dict[str, Any]]:
    """Draw every row; returns one drawn row (manifests.rows.DRAWN_SCHEMA, without actor fields) per input row.

    `get_pipe(row)` returns the pipeline ready to draw the row's group: its model loaded, its adapters
    active (the actor's job; tests pass a plain function). A batch that fails is retried row by row, so one
    bad row fails alone with its error; the other rows are drawn. A batch that runs out of device memory is
    drawn in halves instead (its rows say so in `warning`), and `fits` (memory_key -> rows, kept by the
    caller across calls) remembers the size that did, so later batches of that model and size start there.
    """
    fits = {} if fits is None else fits

    def limit(row: dict) -> int:
        planned = max_batch(row) if callable(max_batch) else max_batch
        return min(planned, fits.get(memory_key(row), planned))

    drawn = []
    for batch in plan_groups(rows, limit):
        for group, outcome, seconds, tokenizer, note in _draw_or_split(get_pipe, batch, fits):
            if isinstance(outcome, Exception):
                # an adapter's error names it already, and reads as the plan's does (the same file, one wording)
                error = str(outcome) if isinstance(outcome, AdapterError) else f"{type(outcome).__name__}: {outcome}"
                drawn += [{**row, "status": "failed", "error": error, "pixels": None} for row in group]
                continue
            for row, rgb in zip(group, outcome):
                said = [w for w in (row.get("warning"), note, prompt_overflow(tokenizer, row["prompt"])) if w]
                drawn.append({**row, "status": None, "pixels": rgb.tobytes(), "seconds": seconds,
                              "warning": "; ".join(said) or None})
    return drawn


def memory_key(row: dict) -> tuple:
    """What a batch's device memory depends on besides its length: the model, the size, and whether guidance
    draws each row twice."""
    return row["model"], row["width"], row["height"], is_guided(row)


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says the device ran out of memory: torch's own error, or ONNX Runtime's and TensorRT's,
    which are not torch's and say it in words."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(words in text for words in ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation"))


def generate_rows(
    get_pipe: Callable[[dict], Any],
    rows: list[dict[str, Any]],
    *,
    fs,
    out_root: str,
    actor: str,
    max_batch: int,
) -> list[dict[str, Any]]:
    """Draw, mark and write every row in this process; returns one ledger row per input row.

    The whole path without stages: what an actor does with `--finish inline`, and what tests call.
    """
    drawn = [{**row, "actor": actor} for row in draw_rows(get_pipe, rows, max_batch=max_batch)]
    return finish_rows(drawn, fs=fs, out_root=out_root)


def _draw_or_split(get_pipe, batch: list[dict], fits: dict[tuple, int],
                   too_big: int | None = None) -> list[tuple[list[dict], Any, float, Any, str | None]]:
    """[(rows, images or the exception, seconds per row, tokenizer, a note for their warning)]: the batch, or
    its rows one by one, or its halves where it ran out of device memory (`too_big`: the first batch that did)."""
    started = time.perf_counter()
    try:
        pipe = get_pipe(batch[0])
        images = draw(pipe, batch)
        note = f"drawn in a batch of {len(batch)}: a batch of {too_big} ran out of device memory" if too_big else None
        return [(batch, images, (time.perf_counter() - started) / len(batch), pipe.tokenizer, note)]
    except Exception as exc:  # noqa: BLE001 - recorded per row
        if len(batch) == 1:
            return [(batch, exc, 0.0, None, None)]
        short_of_memory = out_of_memory(exc)
    # retried here, after the except: while it ran, the error's traceback held the failed batch's tensors
    if not short_of_memory:
        return [item for row in batch for item in _draw_or_split(get_pipe, [row], fits, too_big)]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = (len(batch) + 1) // 2
    key = memory_key(batch[0])
    fits[key] = min(fits.get(key, half), half)
    return [item for part in (batch[:half], batch[half:])
            for item in _draw_or_split(get_pipe, part, fits, too_big or len(batch))]
