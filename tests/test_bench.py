"""The benchmarks' shared arithmetic, and one bench run end to end at its smallest.

The benches report ratios against a baseline measured in the same run, interleaved, because this VM's speed
drifts between minutes; these tests pin down that arithmetic, not any speed.
"""

import json
import re

import pytest

from benchmarks.common import median_ratio, rotated
from helpers import REPO


def test_rotated_puts_every_variant_first_once_and_runs_each_once_a_repeat():
    variants = ["eager", "compile", "foreach"]
    orders = [rotated(variants, repeat) for repeat in range(3)]
    assert [order[0] for order in orders] == variants
    assert all(sorted(order) == sorted(variants) for order in orders)
    assert rotated(variants, 3) == variants  # and it cycles
    assert variants == ["eager", "compile", "foreach"]  # the caller's list is not touched


def test_median_ratio_takes_each_repeats_own_ratio_so_drift_between_repeats_cancels():
    baseline = [1.0, 3.0, 2.0]  # the machine slowed down threefold in repeat 2
    variant = [0.5, 1.5, 2.0]  # twice as fast in the repeats it shared a minute with the baseline, once not
    assert median_ratio(baseline, variant) == 2.0  # a ratio of medians would say 2.0 / 1.5 = 1.33
    with pytest.raises(ValueError, match="one pair a repeat"):
        median_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one pair a repeat"):
        median_ratio([], [])


def test_bench_train_step_reports_each_variant_against_eager(tmp_path):
    import torch

    from benchmarks.bench_train_step import main

    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--variants", "batch-half", "--batch", "2", "--repeats", "2", "--steps", "1", "--warmup", "0",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # the bench runs on one thread, as a train_tiny worker; the suite does not
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["eager", "batch-half"]
    assert results["eager"]["speedup_vs_eager"] == 1.0
    assert results["batch-half"]["batch"] == 1 and results["eager"]["batch"] == 2
    assert all(len(r["all_seconds_per_sample"]) == 2 and min(r["all_seconds_per_sample"]) > 0
               for r in results.values())


class _Stop(Exception):
    pass


@pytest.mark.parametrize("method", ["dreambooth", "dreambooth-lora"])
def test_bench_concept_trains_dreambooth_as_a_model_and_dreambooth_lora_as_an_adapter(tmp_path, monkeypatch, method):
    """The commands `bench_concept` hands the CLI, up to training (the runs themselves take minutes)."""
    import benchmarks.bench_concept as bench

    commands = []

    def fake_run_cli(command, log):
        commands.append(command)
        if command[0] == "finetune":
            raise _Stop
        return 0.0

    monkeypatch.setattr(bench, "run_cli", fake_run_cli)
    with pytest.raises(_Stop):
        bench.main(["--method", method, "--out", str(tmp_path), "--images", "3", "--prompts", "3"])
    train = commands[-1]
    flags = {flag: train[i + 1] for i, flag in enumerate(train[:-1]) if flag.startswith("--")}
    assert train[:2] == ["finetune", "dreambooth" if method == "dreambooth" else "lora"]
    assert train.count("--class-prompt") == 12 and flags["--class-images"] == "96"  # prior preservation both ways
    assert "a purple star on a black background" in train and "a purple star on a gray background" not in train
    if method == "dreambooth":
        assert flags["--out"] == str(tmp_path / "models" / "zwx") and flags["--lr"] == "5e-05"
        assert "--rank" not in flags
    else:  # an adapter in the store generate reads with --adapters, named after the subject
        assert flags["--out"] == str(tmp_path / "adapters" / "zwx") and flags["--lr"] == "0.001"
        assert flags["--rank"] == "8" and flags["--lora-layers"] == "all" and "--train-text-encoder" in train
    captions = sorted(p.read_text() for p in (tmp_path / "images").glob("*.txt"))
    assert captions[0].startswith("a zwx star on a ")


def test_bench_vae_context_reads_a_finetune_checkpoint_as_the_preset_it_came_from(tmp_path):
    from safetensors.torch import save_file

    from actors.presets import PRESET_DIR
    from benchmarks.bench_vae_context import load_vae, main

    checkpoint = tmp_path / "checkpoint"  # what `finetune vae` writes: the Autoencoder wrapper's state
    checkpoint.mkdir()
    save_file({f"vae.{k}": v.contiguous() for k, v in load_vae("tiny").state_dict().items()},
              checkpoint / "trainable.safetensors")
    out = tmp_path / "report.json"
    config = PRESET_DIR / "tiny" / "vae"  # the default, named: the flag for a checkpoint of another architecture
    assert main(["tiny", str(checkpoint), "--count", "2", "--tiles", "128", "--config", str(config),
                 "--out", str(out)]) == 0
    mse = json.loads(out.read_text())["mse"]
    assert mse["tiny"] == mse[str(checkpoint)]
    assert list(mse["tiny"]) == ["whole", "tiles128", "decode-tiles128"]
    assert 0 < mse["tiny"]["whole"] < 0.05  # the committed VAE keeps the image (noise would be ~0.3 and up)


def test_bench_vae_context_names_what_it_cannot_read(tmp_path, capsys):
    from benchmarks.bench_vae_context import main

    with pytest.raises(SystemExit, match="is not a VAE: give 'tiny'"):
        main([str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--tiles", "96"])
    assert "a tile must be a multiple of 8 that divides 256" in capsys.readouterr().err


def test_bench_report_makes_thumbnails_once_then_only_for_what_a_night_redrew(tmp_path):
    from benchmarks.bench_report import main

    out = tmp_path / "figures.json"
    assert main(["--rows", "200", "--size", "64", "--groups", "7", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    # 200 rows, 10 redrawn by run 2 (2 of them failing, 1 invalid), 5 PNGs deleted (some maybe already failing)
    assert 192 <= figures["cold"]["thumbnails_made"] <= 197 and figures["cold"]["rows"] == 200
    assert figures["warm"]["thumbnails_made"] == 0
    assert figures["nightly"]["thumbnails_made"] == 10  # run 3 redrew 10 rows: 10 new PNGs, nothing else


BENCH_COMMANDS = ["bench_adapters", "bench_backends", "bench_batch_parity", "bench_concept", "bench_finetune", "bench_finish",
                  "bench_first_call", "bench_generate", "bench_heads", "bench_nightly", "bench_overlap", "bench_plan",
                  "bench_ray_ceiling", "bench_ray_stop", "bench_report", "bench_review_store", "bench_store_reads",
                  "bench_train_step",
                  "bench_vae_context", "train_tiny"]


def test_every_benchmark_command_in_the_docs_starts_from_benchmarks(capsys):
    """docs/benchmarks.md tells users `python -m benchmarks.<name>`: each one imports and prints its help."""
    import importlib

    documented = set(re.findall(r"python -m benchmarks\.(\w+)", (REPO / "docs" / "benchmarks.md").read_text()))
    documented |= set(re.findall(r"python -m benchmarks\.(\w+)", (REPO / "docs" / "generation-speed.md").read_text()))
    assert documented <= set(BENCH_COMMANDS), f"documented but not checked here: {documented - set(BENCH_COMMANDS)}"
    for name in BENCH_COMMANDS:
        module = importlib.import_module(f"benchmarks.{name}")
        with pytest.raises(SystemExit) as done:
            module.main(["--help"])
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out, name


def test_bench_overlap_runs_its_stand_in_through_the_real_finishing_stage(tmp_path):
    """The stand-in actor (no model) went out of step with GeneratorActor (run.json's backend_stats read an
    attribute its load never set) and the overlap bench failed unnoticed: it runs here, small."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_overlap", "--images", "16", "--seconds-per-batch",
                           "0.05", "--size", "256", "--finish", "stage", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "bench.json").read_text())["modes"]["stage"]
    assert figures["steady_images_per_second"] > 0 and figures["startup"]["first_image_written"] > 0


def test_bench_backends_compares_every_backend_s_images_with_eager_s(tmp_path):
    """What the GPU script's backends step runs, small on CPU: a fast backend that drew other images (a stale
    graph, a swap that left a trace) shows in vs_eager_pixels, and bench.json is there for every backend."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_backends", "--size", "64", "--steps", "2",
                           "--batch-size", "2", "--batches", "1", "--swaps", "2", "--threads", "1",
                           "--backends", "onnx,eager", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eager, onnx = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert eager["backend"] == "eager" and "vs_eager_pixels" not in eager, "eager runs first, as the baseline"
    assert set(onnx["vs_eager_pixels"]) == {"plain", "lora", "lora_after_swaps"}, onnx
    assert all(d["max"] <= 3 for d in onnx["vs_eager_pixels"].values()), onnx["vs_eager_pixels"]
