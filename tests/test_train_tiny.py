"""The one command that trains `tiny` from scratch, run end to end at toy size (slow: three Ray runs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO


def _preset_files() -> dict[str, float]:
    weights = REPO / "actors" / "presets" / "tiny"
    return {str(p): p.stat().st_mtime for p in weights.rglob("*")} if weights.exists() else {}


@pytest.mark.slow
def test_train_tiny_runs_every_stage_at_toy_size(tmp_path):
    out = tmp_path / "run"
    before = _preset_files()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_tiny", "--out", str(out), "--images", "8", "--workers", "2",
         "--vae-steps", "2", "--vae-batch", "2", "--vae-crop", "64", "--vae-crop-candidates", "2",
         "--vae-crop-span", "128", "--vae-norm-groups", "2",
         "--unet-steps", "2", "--unet-batch", "2", "--min-snr-gamma", "2",
         "--eval-prompts", "4", "--skip-vae-check"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "VAE round trip:" in proc.stderr  # the check ran (and, untrained, failed: hence --skip-vae-check)
    check = json.loads((out / "vae-check.json").read_text())  # and left its record
    assert check["lost"] and set(check["color_error"]) == {"red", "green", "blue", "yellow", "orange", "purple"}
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert "cached the latents of 8 images" in (out / "model.log").read_text()  # the UNet stage skips the encoder
    vae_started = json.loads((out / "vae" / "train_log.jsonl").read_text().splitlines()[0])
    assert vae_started["config"]["crop_candidates"] == 2  # the VAE flags reach the workers
    assert vae_started["config"]["crop_span"] == 128
    unet_started = json.loads((out / "model" / "train_log.jsonl").read_text().splitlines()[0])
    assert unet_started["config"]["min_snr_gamma"] == 2  # and the UNet's
    vae_config = json.loads((out / "vae" / "vae" / "config.json").read_text())
    assert vae_config["norm_num_groups"] == 2  # the trained VAE keeps the base's architecture
    assert vae_config["scaling_factor"] == 0.18215  # SD's own scale: it drew shapes better than unit variance
    summary = json.loads((out / "eval" / "eval.json").read_text())
    assert summary["scored"] == 4
    assert _preset_files() == before  # nothing installed without --install
    timings = json.loads((out / "timings.json").read_text())  # what the recipe cost, stage by stage
    assert list(timings["minutes"]) == ["data", "vae", "vae check", "unet", "eval", "eval random init"]
    assert all(m >= 0 for m in timings["minutes"].values()) and "; total " in proc.stderr


def test_train_tiny_rejects_a_negative_min_snr_gamma_before_any_stage(tmp_path, capsys):
    from benchmarks.train_tiny import main

    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "run"), "--min-snr-gamma", "-1"])
    assert stopped.value.code == 2
    assert "--min-snr-gamma must be 0 (off) or positive, got -1.0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no stage started


def test_train_tiny_rejects_vae_norm_groups_that_do_not_divide_the_widths(tmp_path, capsys):
    from benchmarks.train_tiny import main

    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "run"), "--vae-norm-groups", "3"])
    assert stopped.value.code == 2
    assert "--vae-norm-groups must divide every VAE width [8, 16, 32, 32]; got 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_vae_base_is_the_random_init_with_other_norm_groups(tmp_path):
    from safetensors.torch import load_file

    from actors.models import export_preset
    from benchmarks.train_tiny import vae_base

    base = vae_base(tmp_path / "base", 8)  # the diffusers-style groups the preset had until 2026-11-28
    export_preset("tiny-random", str(tmp_path / "random"))
    assert json.loads((base / "vae" / "config.json").read_text())["norm_num_groups"] == 8
    assert json.loads((tmp_path / "random" / "vae" / "config.json").read_text())["norm_num_groups"] == 1
    for component in ("vae", "unet", "text_encoder"):  # the same random numbers: only the grouping differs
        ours, theirs = (load_file(next((root / component).glob("*.safetensors")))
                        for root in (base, tmp_path / "random"))
        assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)


def test_check_vae_passes_the_committed_vae_and_stops_a_random_one(tmp_path):
    """The gate between the VAE and UNet stages: the committed VAE keeps every colour and shape, with its
    object colours within a few levels; a random VAE loses colours and shapes, and its colour error says how far."""
    from actors.presets import build_preset
    from jobs.synthetic import COLORS
    from benchmarks.train_tiny import check_vae

    committed = check_vae(REPO / "actors" / "presets" / "tiny")
    assert committed.lost == []
    assert len(committed.misreads) <= 2, committed.misreads
    assert set(committed.color_error) == set(COLORS)
    assert max(committed.color_error.values()) < 15, committed.color_error  # 9-13 levels when measured

    build_preset("tiny-random").vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    random_init = check_vae(tmp_path)
    assert any(line.startswith("color ") for line in random_init.lost), random_init.lost
    assert min(random_init.color_error.values()) > 30, random_init.color_error


def test_install_copies_the_weights_and_drops_the_training_folder_from_configs(tmp_path):
    """`--install`: the preset gets each component's safetensors byte for byte, and configs without the
    training machine's `_name_or_path` (a path that does not exist in a clone), otherwise unchanged."""
    import shutil

    from diffusers import AutoencoderKL

    from benchmarks.train_tiny import COMPONENTS, install

    committed = REPO / "actors" / "presets" / "tiny"
    model = tmp_path / "model"
    shutil.copytree(committed, model)
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    vae_config["_name_or_path"] = "/work/some-training-run/vae"  # as diffusers writes it after a fine-tune
    (model / "vae" / "config.json").write_text(json.dumps(vae_config))
    (model / "vae" / "notes.txt").write_text("not a model file")
    preset = tmp_path / "preset"
    (preset / "vae").mkdir(parents=True)
    (preset / "vae" / "stale.safetensors").write_bytes(b"old")  # a component folder is replaced, not merged

    install(model, preset)

    for component in COMPONENTS:
        for source in (committed / component).glob("*.safetensors"):
            assert (preset / component / source.name).read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (preset / "vae").iterdir()) == ["config.json",
                                                                    "diffusion_pytorch_model.safetensors"]
    installed = json.loads((preset / "vae" / "config.json").read_text())
    assert "_name_or_path" not in installed
    vae_config.pop("_name_or_path")
    assert installed == vae_config
    assert AutoencoderKL.from_pretrained(preset / "vae").config.block_out_channels == [8, 16, 32, 32]


def test_compare_weights_says_which_components_the_recipe_reproduced_bit_for_bit(tmp_path):
    import shutil

    from benchmarks.train_tiny import compare_weights, describe_comparison

    committed = REPO / "actors" / "presets" / "tiny"
    model = tmp_path / "model"
    shutil.copytree(committed, model)
    assert compare_weights(model, committed) == {"unet": "same", "vae": "same", "text_encoder": "same"}
    unet = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    unet.write_bytes(bytes(data))
    shutil.rmtree(model / "text_encoder")
    verdicts = compare_weights(model, committed)
    assert verdicts == {"unet": "differs", "vae": "same", "text_encoder": "missing"}
    assert describe_comparison(verdicts) == "unet differs, vae same, text_encoder missing"


def test_stage_clock_keeps_minutes_per_stage_and_counts_only_stages_it_ran(tmp_path):
    from benchmarks.train_tiny import StageClock

    now = iter([0.0, 90.0, 100.0, 100.0, 400.0])  # the clock at each start and end (a skipped stage: start only)
    clock = StageClock(tmp_path / "timings.json", now=lambda: next(now))
    with clock.stage("data"):
        pass
    assert json.loads(clock.path.read_text()) == {"minutes": {"data": 1.5}, "total_minutes": 1.5}  # kept as it goes
    with clock.stage("vae", done=True):  # a resumed run found it finished
        pass
    with clock.stage("unet"):
        pass
    assert json.loads(clock.path.read_text()) == {
        "minutes": {"data": 1.5, "vae": "skipped (found finished)", "unet": 5.0}, "total_minutes": 6.5}
    assert clock.summary() == "data 1.5, unet 5.0; total 6.5 min (skipped, found finished: vae)"
