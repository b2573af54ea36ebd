"""The finishing stage: drawn pixels in; watermarked PNGs written and ledger rows out. CPU only, no Ray here.

In a run this is its own Ray Data stage on CPU workers (`finish_table`), so the accelerator draws the next
batch while this one is marked, encoded and written. Each image's mark is read back before it is
written; what was read goes into the ledger's `watermark_bits`, and an image whose mark does not read
back whole is still written, with a warning that says so.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from actors import metrics
from actors import opencv
from actors import watermark as wm
from actors.png import png_bytes
from manifests.ledger import atomic_write, ledger_row, settled_row
from manifests.rows import PASS_THROUGH, RESULT_SCHEMA, SETTLED, to_table
from manifests.stores import url_to_fs

# Test-only: the path of a marker file. The first finishing call that finds it missing creates it and
# kills its own worker process, so tests can check that a dead finishing worker loses no row.
CRASH_ONCE_ENV = "SDFLEET_TEST_CRASH_FINISH_ONCE"


def image_parameters(row: dict[str, Any]) -> dict[str, Any]:
    """What a PNG's parameters chunk records about the row that drew it."""
    keys = ("id", "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance_scale",
            "scheduler", "model", "model_fingerprint", "adapters", "params_hash", "watermark")
    return {k: row.get(k) for k in keys}


def pixels_of(row: dict[str, Any]) -> np.ndarray:
    """A drawn row's image as HxWx3 uint8 RGB."""
    return np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], 3)


def finish_rows(rows: list[dict[str, Any]], *, fs: fsspec.AbstractFileSystem, out_root: str) -> list[dict[str, Any]]:
    """One ledger row per drawn row (manifests.rows.DRAWN_SCHEMA): mark, read back, encode, write.

    A row the draw stage failed stays failed, a row the plan settled keeps its status; a row whose write
    fails is `failed` alone.
    """
    results = []
    for row in rows:
        counters = {k: row.get(k) for k in PASS_THROUGH}
        if row.get("status") in SETTLED:
            results.append({**settled_row(row, actor=row.get("actor")), **counters})
            continue
        started = time.perf_counter()
        warning, bits = row.get("warning"), None
        try:
            rgb = pixels_of(row)
            if row["watermark"]:
                rgb, bits, _ = wm.embed_checked(rgb, row["watermark"])
                if bits < 1.0:
                    lost = (f"the watermark reads back only {bits:.1%} of its bits after every headroom tried; "
                            f"the image is written but its mark may not be recognised")
                    warning = f"{warning}; {lost}" if warning else lost
            data = png_bytes(rgb, image_parameters(row))
            path = f"{out_root.rstrip('/')}/images/{row['id']}.png"
            atomic_write(fs, path, data)
        except Exception as exc:  # noqa: BLE001 - a full disk or a lost store fails this row only
            error = f"{type(exc).__name__}: {exc}"
            results.append({**ledger_row(row, "failed", actor=row.get("actor"), error=error), **counters})
            metrics.row_failures("write")
            continue
        metrics.images_written(1)
        results.append({**ledger_row(
            row, "ok", uri=fs.unstrip_protocol(path), sha256=hashlib.sha256(data).hexdigest(), png_bytes=len(data),
            actor=row.get("actor"),
            warning=warning, watermark_bits=bits, seconds=(row.get("seconds") or 0.0) + time.perf_counter() - started,
        ), **counters})
    return results


def finish_table(batch: pa.Table, out_uri: str) -> pa.Table:
    """Ray Data entry point of the finishing stage: a table of drawn rows in, ledger rows (RESULT_SCHEMA) out."""
    opencv.load()  # first: a worker without OpenCV's system libraries says so once, not per image
    _crash_once_if_asked()
    fs, root = url_to_fs(out_uri)
    return to_table(finish_rows(batch.to_pylist(), fs=fs, out_root=root), RESULT_SCHEMA)


def _crash_once_if_asked() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)
