"""`sdfleet eval`: prompt adherence from image statistics, checked on images whose content is known."""

from __future__ import annotations

import itertools
import json

import fsspec
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from helpers import sdfleet, write_manifest
from jobs.evaluate import analyse, intended
from jobs.synthetic import ALL, ALL_SHAPES, BACKGROUNDS, PALETTE, caption, draw_shape, probe
from manifests.ledger import ledger_row, write_part


@pytest.mark.parametrize("color,shape,background",
                         ALL + [(c, "diamond", b) for c, b in itertools.product(PALETTE, BACKGROUNDS)])
def test_every_combination_of_the_world_is_recognised(color, shape, background):
    import random

    for seed in range(3):  # sizes and positions vary
        seen = analyse(np.asarray(draw_shape(color, shape, background, 256, random.Random(seed))))
        assert seen["drawn"], seen
        assert (seen["color"], seen["shape"], seen["background"]) == (color, shape, background), seen


def test_probe_images_are_fixed_and_cycle_through_the_world():
    """VAE checks and benches compare runs on these images: the same index must draw the same pixels."""
    first, image = probe(5)
    assert first == ALL[5]
    assert np.array_equal(np.asarray(image), np.asarray(probe(5)[1]))
    assert probe(5 + len(ALL))[0] == first  # the same combination again, placed elsewhere
    assert not np.array_equal(np.asarray(image), np.asarray(probe(5 + len(ALL))[1]))
    assert analyse(np.asarray(image))["color"] == first[0]


def test_noise_is_not_drawn():
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert not analyse(noise)["drawn"]
    blank = np.full((256, 256, 3), 128, np.uint8)
    assert not analyse(blank)["drawn"]


def test_intent_comes_from_columns_or_the_prompt_grammar():
    assert intended({"prompt": "a red star on a gray background"}) == {"color": "red", "shape": "star", "background": "gray"}
    assert intended({"prompt": "x", "color": "blue", "shape": "circle", "background": "white"})["shape"] == "circle"
    assert intended({"prompt": "a studio photo of a mug"}) is None
    assert intended({"prompt": "a pink star on a gray background"}) is None  # not in the palette
    # columns naming what tiny's world does not hold were scored as misses
    assert intended({"prompt": "x", "color": "magenta", "shape": "circle", "background": "white"}) is None
    assert intended({"prompt": "x", "color": "Red", "shape": "hexagon", "background": "white"}) is None


def drawn(image: Image.Image, path, records: list[dict]) -> None:
    """Save `image` as generate would for the newest record: with the parameters chunk naming its prompt."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", json.dumps({"prompt": records[-1]["prompt"]}))
    image.save(path, pnginfo=info)


def test_eval_scores_a_run_and_writes_eval_json(tmp_path):
    import random

    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    records = []
    for i, (color, shape, background) in enumerate(ALL[:12]):
        records.append({"id": f"ok-{i}", "prompt": caption(color, shape, background)})
        drawn(draw_shape(color, shape, background, 256, random.Random(i)), out / "images" / f"ok-{i}.png", records)
    # a wrong colour, noise, an image never drawn, and a row that says nothing about shapes
    records.append({"id": "wrong", "prompt": "a red circle on a white background"})
    drawn(draw_shape("blue", "circle", "white", 256), out / "images" / "wrong.png", records)
    records.append({"id": "noise", "prompt": "a green square on a black background"})
    drawn(Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)),
          out / "images" / "noise.png", records)
    records.append({"id": "gone", "prompt": "a yellow star on a white background"})
    records.append({"id": "mug", "prompt": "a studio photo of a mug"})
    # an image cut short; one drawn for the row's earlier prompt (the row is invalid now); an id generate refuses
    records.append({"id": "cut", "prompt": "a red circle on a white background"})
    draw_shape("red", "circle", "white", 256).save(out / "images" / "cut.png")
    (out / "images" / "cut.png").write_bytes((out / "images" / "cut.png").read_bytes()[:300])
    records.append({"id": "changed", "prompt": "a blue star on a white background"})
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", json.dumps({"prompt": "a red star on a white background"}))
    draw_shape("red", "star", "white", 256).save(out / "images" / "changed.png", pnginfo=info)
    records.append({"id": "../run/images/ok-0", "prompt": caption(*ALL[0])})
    # two rows sharing an id: generate draws neither (one image was scored twice); a colour out of the palette
    records += [{"id": "twice", "prompt": caption(*ALL[1])}, {"id": "twice", "prompt": caption(*ALL[1])}]
    drawn(draw_shape(*ALL[1], 256), out / "images" / "twice.png", records)
    records.append({"id": "magenta", "prompt": "x", "color": "magenta", "shape": "star", "background": "white"})
    drawn(draw_shape("red", "star", "white", 256), out / "images" / "magenta.png", records)
    # a prompt edited and its columns not: the image follows the prompt, and was scored a miss against the columns
    records.append({"id": "edited", "prompt": "a red circle on a gray background", "color": "red", "shape": "circle",
                    "background": "white"})
    drawn(draw_shape("red", "circle", "gray", 256), out / "images" / "edited.png", records)
    # a picture generate did not draw (no parameters): a contact sheet saved over a row's image, say
    records.append({"id": "sheet", "prompt": caption(*ALL[2])})
    draw_shape(*ALL[2], 256).save(out / "images" / "sheet.png")
    # a row drawn, then invalid with the same prompt (steps 0 since): its image is the earlier version's
    records.append({"id": "bad-now", "prompt": caption(*ALL[3])})
    drawn(draw_shape(*ALL[3], 256), out / "images" / "bad-now.png", records)
    ledger = [{**ledger_row({"id": rid, "params_hash": "h"}, status), "finished_at": when}
              for rid, status, when in (("bad-now", "ok", "2026-12-01T00:00:00"), ("bad-now", "invalid", "2026-12-02"),
                                        ("ok-0", "invalid", "2026-12-01T00:00:00"), ("ok-0", "ok", "2026-12-02"))]
    write_part(fsspec.filesystem("file"), str(out), "20261202T000000-aaaaaa", 0, ledger)
    manifest = write_manifest(tmp_path / "m.parquet", records)

    proc = sdfleet("eval", str(manifest), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "eval.json").read_text())
    assert (summary["scored"], summary["not_scored"], summary["missing_images"]) == (14, 6, 2)
    assert (summary["shared_ids"], summary["columns_contradict_prompt"]) == (2, 1)
    assert summary["contradicting_rows"] == [{"id": "edited", "prompt": "a red circle on a gray background",
                                              "columns": {"background": "white"}}]
    assert "1 row(s) whose color/shape/background columns their prompt contradicts (such as 'edited': background " \
        "'white', but its prompt is 'a red circle on a gray background')" in proc.stdout
    assert "2 row(s) whose id another row of these manifests has too" in proc.stdout
    assert summary["images_of_another_prompt"] == 1 and "1 image(s) drawn for another prompt" in proc.stdout
    assert summary["images_without_parameters"] == 1 and "1 image(s) without the parameters" in proc.stdout
    assert summary["not_ok_in_ledger"] == 1 and "1 row(s) failed or invalid in the run's ledger" in proc.stdout
    assert "bad-now" not in {r["id"] for r in summary["rows"]} and "ok-0" in {r["id"] for r in summary["rows"]}
    assert summary["color"] == pytest.approx(12 / 14)  # the wrong colour and the noise miss
    assert summary["drawn"] == pytest.approx(13 / 14)
    assert summary["chance"] == {"color": 1 / len(PALETTE), "shape": 1 / len(ALL_SHAPES), "background": 1 / len(BACKGROUNDS)}
    assert summary["confusion"]["color"]["red"].get("blue") == 1
    assert "14 images scored" in proc.stdout


def test_eval_with_nothing_to_score_is_an_error(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "mug", "prompt": "a mug"}])
    proc = sdfleet("eval", str(manifest), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1 and "has no images/ folder" in proc.stderr
    (tmp_path / "run" / "run.json").parent.mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text("{}")  # a finished run that drew nothing
    proc = sdfleet("eval", str(manifest), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1 and "nothing to score, it has a run.json but no images/" in proc.stderr, proc.stderr
    (tmp_path / "run" / "images").mkdir(parents=True)
    proc = sdfleet("eval", str(manifest), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1 and "nothing to score: 1 row(s) name no colour" in proc.stderr
    assert not (tmp_path / "run" / "eval.json").exists()


def test_eval_on_an_object_store_reads_images_several_at_a_time(tmp_path):
    """On S3 or GCS each image read is a round trip: eval reads `image_workers` of them at once (it read one at a
    time: 148 s for 2,376 images on S3), and scores every row as a read in order would."""
    import threading
    import time

    from fsspec.implementations.memory import MemoryFileSystem

    from jobs.evaluate import evaluate

    class Remote(MemoryFileSystem):  # a store far away: each read waits, and how many wait at once is counted
        protocol = "qa-remote"
        busy = peak = 0
        lock = threading.Lock()

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.removeprefix("qa-remote://"))

        def cat_file(self, path, *args, **kwargs):
            with Remote.lock:
                Remote.busy += 1
                Remote.peak = max(Remote.peak, Remote.busy)
            try:
                time.sleep(0.02)
                return super().cat_file(path, *args, **kwargs)
            finally:
                with Remote.lock:
                    Remote.busy -= 1

    fsspec.register_implementation("qa-remote", Remote, clobber=True)
    fs = fsspec.filesystem("qa-remote")
    records = []
    for i, world in enumerate(ALL[:24]):
        records.append({"id": f"r{i}", "prompt": caption(*world)})
        local = tmp_path / f"r{i}.png"
        drawn(draw_shape(*(ALL[(i + 1) % len(ALL)] if i % 5 == 0 else world), 64), local, records)  # every 5th a miss
        fs.pipe_file(f"/eval-run/images/r{i}.png", local.read_bytes())
    records.append({"id": "never-drawn", "prompt": caption(*ALL[0])})
    manifest = write_manifest(tmp_path / "m.parquet", records)

    summary = evaluate([str(manifest)], "qa-remote://eval-run")
    assert Remote.peak > 1, "eval read the store's images one at a time"
    assert [r["id"] for r in summary["rows"]] == [f"r{i}" for i in range(24)]  # the manifest's order
    assert (summary["scored"], summary["missing_images"]) == (24, 1)
    misses = [r["id"] for r in summary["rows"] if (r["color"], r["shape"], r["background"]) !=
              (r["want_color"], r["want_shape"], r["want_background"])]
    assert misses == [f"r{i}" for i in range(0, 24, 5)], misses
