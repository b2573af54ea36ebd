"""`--batch-size auto`: the probe picks the fastest batch that fits, remembers it in the backend cache, and
never changes a pixel."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from actors import batch_size
from actors.batch_size import BatchSizes, measure
from helpers import (assert_same_pixels, new_store, pixels, resolved_row, run_summary, sdfleet, tiny_work_row,
                     write_manifest)

ROW = {"id": "x", "model": "default", "prompt": "a mug", "width": 64, "height": 64, "steps": 30, "seed": 0,
       "guidance_scale": 7.5}


class FakeDevice:
    """A device whose draw of n rows takes `cost(n)` seconds of a fake clock, and runs out of memory above `fits`."""

    def __init__(self, monkeypatch, cost, fits=64, oom=torch.cuda.OutOfMemoryError("CUDA out of memory")):
        self.now, self.cost, self.fits, self.oom, self.calls = 0.0, cost, fits, oom, []
        monkeypatch.setattr(batch_size.time, "perf_counter", lambda: self.now)

    def draw(self, rows):
        self.calls.append((len(rows), rows[0]["steps"]))
        if len(rows) > self.fits:
            raise self.oom
        self.now += self.cost(len(rows))


def test_the_fastest_batch_that_fits_wins(monkeypatch):
    device = FakeDevice(monkeypatch, cost=lambda n: 1.0 + 0.1 * n, fits=8)  # fixed overhead: bigger is better
    best, measured = measure(device.draw, ROW, torch.device("cpu"), limit=16)
    assert best == 8 and sorted(measured) == [1, 2, 4, 8], "16 ran out of memory, 8 is the fastest that fits"
    assert measured[8] > measured[4] > measured[1]
    assert {steps for _, steps in device.calls} == {batch_size.PROBE_STEPS}, "probes are short"


def test_on_a_gpu_each_batch_is_timed_after_two_untimed_calls(monkeypatch):
    """CUDA-graph trees warm up on a function's first call and record on its second: with one untimed call the
    VAE decoder (called once per draw) was timed while recording its graph."""
    device = FakeDevice(monkeypatch, cost=lambda n: 1.0 + 0.1 * n, fits=64)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    measure(device.draw, ROW, SimpleNamespace(type="cuda"), limit=4)
    assert [n for n, _ in device.calls] == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    device.calls.clear()
    measure(device.draw, ROW, torch.device("cpu"), limit=4)
    assert [n for n, _ in device.calls] == [1, 1, 2, 2, 4, 4]


def test_out_of_memory_from_onnx_runtime_or_tensorrt_ends_the_search_too(monkeypatch):
    # their errors are not torch's OutOfMemoryError: ONNX Runtime's says "Failed to allocate memory"
    oom = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")
    device = FakeDevice(monkeypatch, cost=lambda n: 1.0 + 0.1 * n, fits=4, oom=oom)
    best, measured = measure(device.draw, ROW, torch.device("cpu"), limit=16)
    assert best == 4 and sorted(measured) == [1, 2, 4]


def test_the_search_stops_where_larger_batches_stop_paying(monkeypatch):
    # images/s rises to batch 4, then falls: 8 is tried, found slower, and 16 never tried
    device = FakeDevice(monkeypatch, cost=lambda n: {1: 1.0, 2: 1.2, 4: 1.6, 8: 4.0, 16: 8.0}[n])
    best, measured = measure(device.draw, ROW, torch.device("cpu"), limit=16)
    assert best == 4 and sorted(measured) == [1, 2, 4, 8]


def test_the_choice_is_kept_in_the_backend_cache_and_read_back_without_measuring(monkeypatch, tmp_path):
    device = FakeDevice(monkeypatch, cost=lambda n: 1.0 + 0.1 * n)
    monkeypatch.setattr("actors.generate.draw", lambda pipe, rows: device.draw(rows))
    pipe = SimpleNamespace(unet=SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32))
    first = BatchSizes(str(tmp_path / "cache"), limit=4)
    assert first.get(ROW, "fp-1", "eager", lambda row: pipe) == 4 and first.chosen == {"default 64x64": 4}
    (record,) = (tmp_path / "cache" / "batch-size").iterdir()
    assert json.loads(record.read_text())["batch_size"] == 4
    calls = len(device.calls)
    other_actor = BatchSizes(str(tmp_path / "cache"), limit=4)
    assert other_actor.get(ROW, "fp-1", "eager", lambda row: pipe) == 4 and len(device.calls) == calls
    assert other_actor.probed == {}
    # another size, model or backend is measured on its own
    assert other_actor.get({**ROW, "width": 128}, "fp-1", "eager", lambda row: pipe) == 4 and len(device.calls) > calls
    # and so are rows without guidance: the UNet runs on half the rows of a guided batch
    calls = len(device.calls)
    assert other_actor.get({**ROW, "guidance_scale": 1.0}, "fp-1", "eager", lambda row: pipe) == 4
    assert len(device.calls) > calls and "default 64x64 unguided" in other_actor.chosen
    assert len(list((tmp_path / "cache" / "batch-size").iterdir())) == 3
    # a kept choice outside 1.. (a damaged or hand-edited file) is measured again: its 0 stopped the whole run
    for kept in (0, -3, "4", True, 2.5):
        record.write_text(json.dumps({"batch_size": kept}))
        calls = len(device.calls)
        assert BatchSizes(str(tmp_path / "cache"), limit=4).get(ROW, "fp-1", "eager", lambda row: pipe) == 4
        assert len(device.calls) > calls, kept


def test_a_probe_that_fails_takes_the_whole_block_records_nothing_and_is_not_repeated(monkeypatch, tmp_path):
    def broken(pipe, rows):
        raise RuntimeError("the model cannot draw")

    monkeypatch.setattr("actors.generate.draw", broken)
    pipe = SimpleNamespace(unet=SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32))
    asked = []
    sizes = BatchSizes(str(tmp_path / "cache"), limit=16)
    assert sizes.get({**ROW, "adapters": [{"name": "style", "scale": 1.0}]}, "fp", "eager",
                     lambda row: asked.append(row["adapters"]) or pipe) == 16
    assert asked and all(adapters == [] for adapters in asked), "measured on the base model, not the row's adapters"
    assert not (tmp_path / "cache" / "batch-size").exists(), "nothing recorded: the next run measures again"
    # the next block of the same model and size does not probe again (each probe draws up to 10 batches)
    monkeypatch.setattr("actors.generate.draw", lambda pipe, rows: pytest.fail("probed a second time"))
    assert sizes.get(ROW, "fp", "eager", lambda row: pipe) == 16 and sizes.chosen == {"default 64x64": 16}


def test_auto_draws_the_same_pixels_and_says_what_it_chose(tmp_path):
    """Through the CLI under auto, each image equals the row drawn alone (batch 1, in this process)."""
    from actors.generate import draw
    from actors.presets import build_preset

    records = [{"id": f"r{i}", "prompt": f"a red mug, view {i}", "seed": i, "steps": 2, "width": 64, "height": 64}
               for i in range(5)]
    manifest = write_manifest(tmp_path / "m.parquet", records)
    auto = sdfleet("generate", str(manifest), "--out", str(tmp_path / "auto"), "--batch-size", "auto",
                   "--no-watermark", "--backend-cache", str(tmp_path / "cache"))
    assert auto.returncode == 0, auto.stderr[-3000:]
    summary = run_summary(tmp_path / "auto")
    fingerprint = summary["models"]["default"]["fingerprint"]
    pipe = build_preset("tiny")
    for r in records:
        alone = draw(pipe, [tiny_work_row(r, fingerprint)])[0]
        assert_same_pixels(pixels(tmp_path / "auto" / "images" / f"{r['id']}.png"), alone, f"auto vs alone, {r['id']}")
    (stats,) = summary["backend_stats"].values()
    assert summary["batch_size"] == "auto" and set(stats["auto_batch_size"]) == {"default 64x64"}
    assert stats["auto_batch_size"]["default 64x64"] in batch_size.CANDIDATES
    assert len(list((tmp_path / "cache" / "batch-size").iterdir())) == 1


def test_a_python_caller_gets_one_line_for_a_batch_size_given_as_text():
    """`GenerateConfig(batch_size="300")` got pydantic's two errors, one per member of `int | "auto"`."""
    import pydantic

    from jobs.generate import GenerateConfig

    assert GenerateConfig(manifests=["m"], out="o", batch_size="8").batch_size == 8
    for text, said in (("300", "got 300"), ("big", "got 'big'")):
        with pytest.raises(pydantic.ValidationError) as caught:
            GenerateConfig(manifests=["m"], out="o", batch_size=text)
        assert caught.value.error_count() == 1 and f"must be a whole number in 1..256, or auto; {said}" in str(
            caught.value)


def test_a_batch_size_that_is_neither_a_number_nor_auto_is_refused(tmp_path):
    proc = sdfleet("generate", "m.parquet", "--out", str(tmp_path / "out"), "--batch-size", "big")
    assert proc.returncode == 1 and "--batch-size: invalid int or auto value: 'big'" in proc.stderr


@pytest.mark.gpu
def test_auto_on_a_gpu_picks_a_batch_that_fits(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from actors.presets import build_preset

    pipe = build_preset("tiny").to("cuda", torch.float16)
    row = {**resolved_row(new_store({}), ()), "steps": 2, "width": 256, "height": 256}
    chosen = BatchSizes(str(tmp_path)).get(row, "tiny", "eager", lambda row: pipe)
    assert chosen in batch_size.CANDIDATES
