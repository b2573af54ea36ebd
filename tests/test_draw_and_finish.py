"""The two halves of generation without Ray: drawing (a row draws the same whatever came before) and
finishing (mark read back and recorded, PNG with its parameters, a failed write fails its row alone)."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pytest
from PIL import Image

from actors import watermark as wm
from actors.finish import finish_rows, pixels_of
from actors.generate import draw, draw_rows
from actors.png import PNG_KEY, png_bytes, read_png_parameters
from actors.presets import PRESETS, build_preset
from helpers import assert_same_pixels
from manifests.schema import ManifestRow, resolve_row


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


def work_rows(n: int, watermark: str | None = "sdfleet", **fields) -> list[dict]:
    model = {**PRESETS["tiny"]["defaults"], "fingerprint": "test"}
    fields = {"steps": 3, **fields}
    return [resolve_row(ManifestRow(id=f"r{i}", prompt=f"a red circle on a white background {i}", **fields), model,
                        watermark=watermark) for i in range(n)]


def test_each_scheduler_draws_the_same_after_a_karras_group_as_alone(tiny):
    """A group's scheduler is built from the model's config, not from the one the previous group left."""
    karras = work_rows(2, scheduler="dpmpp_2m_karras")
    draw(tiny, karras)
    after = {name: draw(tiny, work_rows(2, scheduler=name)) for name in ("euler", "heun", "unipc", "dpmpp_2m", "ddim")}
    for name, images in after.items():
        fresh = build_preset("tiny")  # a pipeline that never drew a Karras group
        assert np.array_equal(images, draw(fresh, work_rows(2, scheduler=name))), name


def test_png_keeps_pixels_and_parameters_and_pillow_reads_the_chunk():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    params = {"prompt": "un café ☕ on white", "seed": 7, "adapters": [{"name": "a", "scale": 0.5}]}
    data = png_bytes(rgb, params)
    with Image.open(io.BytesIO(data)) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), rgb)
        assert image.text[PNG_KEY].startswith("{")
    assert read_png_parameters(data) == params


def test_finishing_records_what_the_mark_read_back(tiny):
    fs, root = fsspec.filesystem("memory"), "/finish-ok"
    rows = work_rows(2, steps=20)
    drawn = [{**r, "actor": "a1"} for r in draw_rows(lambda row: tiny, rows, max_batch=8)]
    results = finish_rows(drawn, fs=fs, out_root=root)
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert [r["watermark_bits"] for r in results] == [1.0, 1.0]
    assert [r["png_bytes"] for r in results] == [fs.size(f"{root}/images/{row['id']}.png") for row in rows]
    for row in rows:
        with Image.open(io.BytesIO(fs.cat_file(f"{root}/images/{row['id']}.png"))) as image:
            written = np.asarray(image.convert("RGB"))
        assert wm.read_bits(written, len(b"sdfleet")) == b"sdfleet"  # the library's decoder, on the file
    unmarked = finish_rows([{**d, "watermark": None} for d in drawn], fs=fs, out_root="/finish-none")
    assert [r["watermark_bits"] for r in unmarked] == [None, None]
    with Image.open(io.BytesIO(fs.cat_file(f"/finish-none/images/{rows[0]['id']}.png"))) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels_of(drawn[0]))


def test_a_mark_that_does_not_read_back_is_written_and_flagged(tiny, monkeypatch):
    fs, root = fsspec.filesystem("memory"), "/finish-flag"
    drawn = [{**r, "actor": "a1"} for r in draw_rows(lambda row: tiny, work_rows(1), max_batch=8)]
    monkeypatch.setattr(wm, "embed_checked", lambda rgb, payload: (rgb, 0.875, 16))
    (result,) = finish_rows(drawn, fs=fs, out_root=root)
    assert result["status"] == "ok" and result["watermark_bits"] == 0.875
    assert "watermark reads back only 87.5%" in result["warning"]
    assert fs.exists(f"{root}/images/r0.png")


def test_a_failed_draw_or_write_fails_that_row_alone(tiny, monkeypatch):
    import actors.finish

    fs, root = fsspec.filesystem("memory"), "/finish-fail"
    drawn = [{**r, "actor": "a1"} for r in draw_rows(lambda row: tiny, work_rows(3), max_batch=8)]
    drawn[0] = {**drawn[0], "status": "failed", "error": "RuntimeError: CUDA out of memory", "pixels": None}
    real_write = actors.finish.atomic_write

    def write(fs, path, data):
        if path.endswith("/r1.png"):
            raise OSError(28, "No space left on device")
        real_write(fs, path, data)

    monkeypatch.setattr(actors.finish, "atomic_write", write)
    results = {r["id"]: r for r in finish_rows(drawn, fs=fs, out_root=root)}
    assert len(results) == 3
    assert results["r0"]["status"] == "failed" and "out of memory" in results["r0"]["error"]
    assert results["r1"]["status"] == "failed" and "No space left" in results["r1"]["error"]
    assert results["r2"]["status"] == "ok" and fs.exists(f"{root}/images/r2.png")


def test_an_image_of_nan_fails_its_row_and_is_never_written_as_black(tiny):
    """A LoRA at a huge scale (or fp16 overflow) makes NaN, which 8-bit conversion would turn into a black
    image recorded `ok`. The row fails, naming why; the other rows of its batch are drawn."""

    class Overflowing:  # the tiny pipeline, except that rows whose prompt says "overflow" come out NaN
        def __init__(self, pipe):
            object.__setattr__(self, "pipe", pipe)

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def __setattr__(self, name, value):
            setattr(self.pipe, name, value)

        def __call__(self, prompt, **kwargs):
            out = self.pipe(prompt=prompt, **kwargs)
            for i, text in enumerate(prompt):
                if "overflow" in text:
                    out.images[i, :4] = np.nan
            return out

    rows = work_rows(3)
    rows[1] = {**rows[1], "prompt": "a red circle, overflow"}
    drawn = {r["id"]: r for r in draw_rows(lambda row: Overflowing(tiny), rows, max_batch=8)}
    assert drawn["r1"]["status"] == "failed" and drawn["r1"]["pixels"] is None
    assert "1 of 1 image(s) came out as NaN or infinite values (a model that overflows" in drawn["r1"]["error"]
    rows[1]["adapters"] = [{"name": "style", "scale": 1e300, "fingerprint": ""}]  # named, with its scale (QA)
    with pytest.raises(ValueError, match=r"\(with adapter\(s\) 'style' at scale 1e\+300: a scale too large"):
        draw(Overflowing(tiny), [rows[1]])
    alone = draw(tiny, [rows[0]])[0]
    assert drawn["r0"]["status"] is None and drawn["r0"]["pixels"] == alone.tobytes()
    assert drawn["r2"]["status"] is None and drawn["r2"]["pixels"] is not None


def test_a_batch_out_of_device_memory_is_drawn_in_halves_after_its_memory_is_freed(tiny, monkeypatch):
    """A batch too big for the device is drawn in halves (not row by row), with the failed batch's tensors
    freed first (the retry used to run inside the `except`, its traceback holding them), and its rows say so;
    the size that fit is remembered for the next block. Another error still fails its row alone."""
    import weakref

    import torch

    import actors.generate as generate

    real_draw, calls, held = generate.draw, [], []

    def draw_on_a_small_device(pipe, rows):
        calls.append(len(rows))
        assert all(ref() is None for ref in held), "a retry runs while the failed batch's tensors are alive"
        if len(rows) > 2:
            activations = torch.zeros(len(rows), 4)  # what a real forward pass holds when it runs out
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {activations.numel()} bytes")
        if any("broken" in row["prompt"] for row in rows):
            raise ValueError("a broken row")
        return real_draw(pipe, rows)

    monkeypatch.setattr(generate, "draw", draw_on_a_small_device)
    rows, fits = work_rows(6), {}
    drawn = draw_rows(lambda row: tiny, rows, max_batch=8, fits=fits)
    assert calls == [6, 3, 2, 1, 3, 2, 1], calls  # halves of halves, never row by row
    assert [r["status"] for r in drawn] == [None] * 6
    assert all("drawn in a batch of" in r["warning"] and "a batch of 6 ran out of device memory" in r["warning"]
               for r in drawn), [r["warning"] for r in drawn]
    for row, out in zip(rows, drawn):  # each row's own generator: the same pixels in any batch (up to float noise)
        alone = real_draw(tiny, [row])[0]
        assert_same_pixels(np.frombuffer(out["pixels"], np.uint8).reshape(alone.shape), alone, row["id"])
    assert fits == {generate.memory_key(rows[0]): 2}

    calls.clear()  # the next block starts at the size that fit, and an error that is not memory is row by row
    later = work_rows(4)
    later[3] = {**later[3], "prompt": "broken"}
    drawn = draw_rows(lambda row: tiny, later, max_batch=8, fits=fits)
    assert calls == [2, 2, 1, 1], calls
    assert [r["status"] for r in drawn] == [None, None, None, "failed"]
    assert drawn[3]["error"] == "ValueError: a broken row" and drawn[0]["warning"] is None


def test_a_model_directory_is_hashed_once_until_a_file_changes(tmp_path, monkeypatch):
    """The fingerprint of a multi-GB model folder is cached by size, mtime and inode, not rehashed each run."""
    import os

    import actors.models as models

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    models.export_preset("tiny", str(tmp_path / "m"))
    hashed = []
    real = models.file_digest
    monkeypatch.setattr(models, "file_digest", lambda path: hashed.append(path.name) or real(path))
    first = models.describe_model("m", str(tmp_path / "m")).fingerprint
    assert len(hashed) >= 4  # weights and configs of every component
    hashed.clear()
    assert models.describe_model("m", str(tmp_path / "m")).fingerprint == first and hashed == []
    weights = tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size; a new mtime
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert models.describe_model("m", str(tmp_path / "m")).fingerprint != first
    assert hashed == [weights.name], "only the changed file is hashed again"
