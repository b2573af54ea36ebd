"""`--batch-size auto`: the batch an actor draws each (model, size) with, found by measuring once per device.

The first time an actor meets a model at an image size, it draws a few short batches of growing size
(`CANDIDATES`, up to the block the driver hands it), each timed after untimed calls (compiles and cuDNN's
algorithm search happen there; on a GPU two, as CUDA-graph trees warm up on a function's first call and record
on its second: the VAE decoder, called once per draw, would be timed recording), and keeps the size with the most
images per second. A batch that
fails (out of GPU memory, from torch, ONNX Runtime or TensorRT) ends the search. The choice is written to the
backend cache, keyed by model, backend, device (and its memory), dtype, size and whether rows are guided
(guidance draws each row twice), so other actors, nodes and later runs read it
instead of measuring.

Images do not depend on the batch a row is drawn in (every row has its own generator), so the choice
changes speed only, never pixels.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from manifests.schema import is_guided

if TYPE_CHECKING:  # torch is imported where a probe runs: the driver reads AUTO_BLOCK without it
    import torch

AUTO_BLOCK = 16  # rows per block the driver hands an actor under auto: the largest batch tried
CANDIDATES = (1, 2, 4, 8, 16)
# denoising steps per probe batch: the UNet's share of a draw near a real one's (at 4 steps the VAE decode and
# text encoder were a quarter of the time at 768 px, against a twentieth at 30 steps, and gain least from a batch)
PROBE_STEPS = 10
FLAT = 0.97  # stop once a larger batch measures below this share of the best: bigger only costs memory
VERSION = 1


def probe_key(fingerprint: str, backend: str, device: torch.device, dtype: torch.dtype, width: int, height: int,
              guided: bool = True) -> str:
    """The cache key of a choice. A GPU is named with its memory (a MIG slice or a smaller card of the same
    name holds fewer rows); `guided`: classifier-free guidance draws each row twice, so the same batch needs
    twice the memory of an unguided one (guidance_scale <= 1)."""
    import torch

    from actors.models import cache_key, hardware_name

    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    return cache_key({"model": fingerprint, "backend": backend, "device": hardware_name(device), "memory": memory,
                      "dtype": str(dtype), "size": [width, height], "guided": guided, "torch": torch.__version__,
                      "candidates": CANDIDATES, "steps": PROBE_STEPS, "version": VERSION})


def measure(draw: Callable[[list[dict]], Any], row: dict, device: torch.device, limit: int) -> tuple[int, dict[int, float]]:
    """(the batch with the most images/s, {batch: images/s}) for rows like `row`, trying CANDIDATES up to `limit`."""
    import torch

    template = {**row, "steps": min(int(row["steps"]), PROBE_STEPS)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    measured: dict[int, float] = {}
    failed = False
    untimed = 2 if device.type == "cuda" else 1  # (CUDA-graph trees record on a function's second call)
    for size in [c for c in CANDIDATES if c <= limit] or [1]:
        rows = [{**template, "id": f"probe-{i}", "seed": i} for i in range(size)]
        try:
            for _ in range(untimed):  # compiles, autotuning, allocator growth, graph recording
                draw(rows)
            sync()
            started = time.perf_counter()
            draw(rows)
            sync()
        except Exception:
            # Out of memory: torch's own error, or ONNX Runtime's and TensorRT's, which are not. A batch
            # that worked before this one says the size is the trouble; a first batch that fails is the
            # caller's to report.
            if not measured:
                raise
            failed = True
            break
        measured[size] = size / (time.perf_counter() - started)
        if measured[size] < FLAT * max(measured.values()):
            break
    if failed and device.type == "cuda":  # outside the except: its traceback held the failed batch's tensors
        torch.cuda.empty_cache()
    return max(measured, key=measured.get), measured


class BatchSizes:
    """The chosen batch per (model, width, height) for one actor: from memory, the backend cache, or a probe."""

    def __init__(self, cache_uri: str | None, limit: int = AUTO_BLOCK):
        from actors.models import backend_cache_folder

        self.fs, self.folder = backend_cache_folder(cache_uri, "batch-size")
        self.limit = limit
        self.chosen: dict[str, int] = {}  # "model WxH" -> batch, what run.json reports
        self.probed: dict[str, dict[int, float]] = {}

    def get(self, row: dict, fingerprint: str, backend: str, pipe_for: Callable[[dict], Any]) -> int:
        guided = is_guided(row)
        label = f"{row['model']} {row['width']}x{row['height']}" + ("" if guided else " unguided")
        if label in self.chosen:
            return self.chosen[label]
        base = {**row, "adapters": []}  # measured on the base model: a row's bad adapter is its own error
        try:
            pipe = pipe_for(base)
        except Exception:  # noqa: BLE001 - the model does not load: drawing the rows will say why, row by row
            return self.limit
        device, dtype = pipe.unet.device, pipe.unet.dtype
        key = probe_key(fingerprint, backend, device, dtype, row["width"], row["height"], guided)
        path = f"{self.folder}/{key}.json"
        try:
            kept = json.loads(self.fs.cat_file(path))["batch_size"]
            if isinstance(kept, int) and not isinstance(kept, bool) and kept >= 1:  # (a damaged file's 0 stopped
                self.chosen[label] = min(kept, self.limit)  # the run: range() with step 0)
                return self.chosen[label]
        except (FileNotFoundError, KeyError, ValueError, TypeError):
            pass
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read costs a probe, not the run
            logging.getLogger(__name__).warning("the batch size kept in %s was not read: %s", path, exc)
        from actors.generate import draw

        try:
            best, measured = measure(lambda rows: draw(pipe_for(base), rows), base, device, self.limit)
        except Exception:  # noqa: BLE001 - not even one row drew: this group takes the block (its rows will say
            self.chosen[label] = self.limit  # why they fail), and the next block does not probe again
            return self.limit
        self.chosen[label], self.probed[label] = best, measured
        record = {"batch_size": best, "images_per_second": {str(k): round(v, 4) for k, v in measured.items()},
                  "model": fingerprint, "backend": backend, "size": [row["width"], row["height"]],
                  "device": str(device), "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        try:  # kept for the next run: one that cannot be written (a store's passing trouble) costs it a probe
            self.fs.makedirs(self.folder, exist_ok=True)
            self.fs.pipe_file(path, json.dumps(record, indent=1).encode())
        except Exception as exc:  # noqa: BLE001 - not the rows' problem: they are drawn at the batch chosen
            logging.getLogger(__name__).warning("the chosen batch size was not kept in %s: %s", path, exc)
        return best
