"""The generation side without Ray: presets, model loading, schedulers, drawing, watermark, sizing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from actors import watermark as wm
from actors.generate import draw, generate_rows
from actors.png import read_png_parameters
from actors.models import ModelError, describe_model, export_preset, load_pipeline
from actors.presets import PRESETS, TOKENIZER_DIR, build_preset
from actors.schedulers import SCHEDULERS, make_scheduler, scheduler_name_for
from actors.tokenizer import WORDS, build_vocab_and_merges, load_tokenizer
from cluster.connect import READ_CPU_RESERVE, ClusterError, size_actors
from manifests.schema import SCHEDULER_NAMES, ManifestRow, resolve_row


@pytest.fixture(scope="module")
def tiny():
    return build_preset("tiny")


def resolved_rows(n: int, **fields) -> list[dict]:
    model = {**PRESETS["tiny"]["defaults"], "fingerprint": "test"}
    out = []
    for i in range(n):
        row = ManifestRow(id=f"r{i}", prompt=f"a red circle on a white background {i}", steps=2, **fields)
        out.append(resolve_row(row, model, watermark=None))
    return out


def test_committed_tokenizer_is_what_the_builder_makes(tmp_path):
    vocab, merges = build_vocab_and_merges()
    assert json.loads((TOKENIZER_DIR / "vocab.json").read_text()) == vocab
    assert (TOKENIZER_DIR / "merges.txt").read_text().splitlines()[1:] == merges
    tok = load_tokenizer(TOKENIZER_DIR)
    assert tok.model_max_length == 77 and tok.pad_token_id == 0  # SD 2.x pads with "!" (id 0)
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in WORDS)
    emoji = tok("un café ☕ 🚀", add_special_tokens=False).input_ids
    assert tok.decode(emoji) == "un café ☕ 🚀"


def test_scheduler_names_match_the_manifest_contract():
    assert set(SCHEDULERS) == set(SCHEDULER_NAMES)
    base = build_preset("tiny").scheduler.config
    for name in SCHEDULER_NAMES:
        scheduler = make_scheduler(name, base)
        assert scheduler.config.prediction_type == "v_prediction", name  # v stays v whatever the sampler
    assert scheduler_name_for({"_class_name": "EulerAncestralDiscreteScheduler"}) == "euler_a"
    assert scheduler_name_for({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}) == "dpmpp_2m_karras"


def test_installed_tiny_weights_load_with_their_scale_and_tiny_random_stays_random(tiny, tmp_path, monkeypatch):
    """`tiny` loads what train_tiny installs (weights, and the trained VAE's scaling_factor); `tiny-random`,
    what training starts from, never does, so retraining cannot start from the weights it installed."""
    from safetensors.torch import save_file

    import actors.presets as presets

    unet = {k: v + 0.01 for k, v in tiny.unet.state_dict().items()}
    (tmp_path / "tiny" / "unet").mkdir(parents=True)
    save_file(unet, tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "tiny" / "vae").mkdir()
    save_file(tiny.vae.state_dict(), tmp_path / "tiny" / "vae" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "tiny" / "vae" / "config.json").write_text(json.dumps({**dict(tiny.vae.config), "scaling_factor": 0.5}))
    digest = lambda name: presets.preset_fingerprint(name).rsplit(":", 1)[1]  # noqa: E731
    random_print, reference = digest("tiny-random"), build_preset("tiny-random")
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    trained, fresh = build_preset("tiny"), build_preset("tiny-random")
    assert trained.vae.config.scaling_factor == 0.5 and fresh.vae.config.scaling_factor == 0.18215
    name, weight = next(iter(trained.unet.state_dict().items()))
    assert torch.equal(weight, unet[name]) and torch.equal(fresh.unet.state_dict()[name], reference.unet.state_dict()[name])
    assert digest("tiny") != random_print == digest("tiny-random")


def test_installed_weights_of_another_architecture_are_refused_by_name(tiny, tmp_path, monkeypatch):
    """A VAE trained with other GroupNorm groups loads into the preset's without a torch error (the weights
    have the same shapes) and draws garbage; the installed config says so, and the preset refuses it."""
    from safetensors.torch import save_file

    import actors.presets as presets

    (tmp_path / "tiny" / "vae").mkdir(parents=True)
    save_file(tiny.vae.state_dict(), tmp_path / "tiny" / "vae" / "diffusion_pytorch_model.safetensors")
    groups = 1 if tiny.vae.config.norm_num_groups != 1 else 2
    (tmp_path / "tiny" / "vae" / "config.json").write_text(json.dumps({**dict(tiny.vae.config), "norm_num_groups": groups}))
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    with pytest.raises(ValueError, match=f"vae was trained with another architecture.*norm_num_groups: weights {groups}"):
        build_preset("tiny")


def test_presets_are_deterministic_and_sd21_has_the_real_shapes(tiny):
    again = build_preset("tiny")
    for (name, a), b in zip(tiny.unet.state_dict().items(), again.unet.state_dict().values()):
        assert torch.equal(a, b), name
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # shapes only: no 3.5 GB of random weights on a CI box
        unet = UNet2DConditionModel(**PRESETS["sd21-random"]["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert unet.config.upcast_attention and unet.config.cross_attention_dim == 1024
    assert PRESETS["sd21-random"]["scheduler"]["prediction_type"] == "v_prediction"
    assert PRESETS["sd21-random"]["defaults"]["width"] == 768
    assert tiny.vae_scale_factor == 8 and tiny.unet.config.sample_size * 8 == 256


def test_model_export_never_writes_over_a_folder_that_holds_something(tmp_path, capfd):
    """A fine-tune's output exported over would lose the training: refused, the folder untouched; so are a
    file and an empty name. The CLI says each in one line, and a good export only in sdfleet's own line."""
    from jobs.cli import main

    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "model_index.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    for target, needle in ((tuned, "is not empty"), (tmp_path / "afile", "is a file"),
                           ("", "no folder to export into was given (DIR is blank)")):
        assert main(["model", "export", "tiny", str(target)]) == 1
        err = capfd.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert [p.name for p in tuned.iterdir()] == ["model_index.json"] and (tuned / "model_index.json").read_text() == "{}"
    assert main(["model", "export", "tiny", str(tmp_path / "new")]) == 0
    out, err = capfd.readouterr()
    assert (out + err).strip().splitlines() == [f"[sdfleet] wrote preset tiny to {tmp_path / 'new'}"], out + err


def test_an_export_that_stops_midway_leaves_nothing_and_a_uri_or_home_is_what_it_says(tmp_path, monkeypatch):
    """Ctrl-C while the weights were written left a half folder: the rerun called it not empty, and one without
    its sdfleet.json loaded with SD 2.1's defaults. `s3://b/m` was written to a local `s3:/b/m`, and `~/m` to a
    folder named `~`."""
    import actors.models as models

    built = models.build_preset("tiny")

    class Stops:  # writes the first component, then the user presses Ctrl-C
        def save_pretrained(self, directory, **kwargs):
            built.vae.save_pretrained(Path(directory) / "vae", safe_serialization=True)
            raise KeyboardInterrupt

    monkeypatch.setattr(models, "build_preset", lambda name: Stops())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        export_preset("tiny", "models/tiny")
    assert list((tmp_path / "models").iterdir()) == []  # no folder, no hidden leftover
    monkeypatch.setattr(models, "build_preset", lambda name: built)
    export_preset("tiny", "models/tiny")  # the rerun is not refused
    assert (tmp_path / "models" / "tiny" / "sdfleet.json").exists() and len(list((tmp_path / "models").iterdir())) == 1
    for uri in ("s3://bucket/models/tiny", "simplecache::s3://b/m"):
        with pytest.raises(ModelError, match=r"model export writes a local folder; export into one, then copy it"):
            export_preset("tiny", uri)
    with pytest.raises(ModelError, match=r"^no folder to export into was given \(DIR is blank\)"):
        export_preset("tiny", " ")  # was "must not be empty", which read as the opposite of "DIR is not empty"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    export_preset("tiny", f"file://{tmp_path}/uri")  # a local folder, as every other command takes it
    assert (tmp_path / "uri" / "model_index.json").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    export_preset("tiny", "~/m")
    assert (tmp_path / "home" / "m" / "model_index.json").exists() and not (tmp_path / "~").exists()

    class FullDisk:  # a read-only folder or a full disk was a traceback
        def save_pretrained(self, directory, **kwargs):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "build_preset", lambda name: FullDisk())
    with pytest.raises(ModelError, match=r"^cannot write full/tiny: OSError: \[Errno 28\] No space left on device$"):
        export_preset("tiny", "full/tiny")
    assert list((tmp_path / "full").iterdir()) == []


@pytest.mark.parametrize("file, text, said", [("model_index.json", "{not json", "JSONDecodeError"),
                                             ("model_index.json", "[]", "AttributeError"),
                                             ("unet/config.json", "", "JSONDecodeError"),
                                             ("unet/config.json", '{"in_channels": 4}', "KeyError: 'sample_size'")])
def test_a_model_folder_with_a_damaged_config_is_a_model_error(tmp_path, file, text, said):
    """`--model`/`--base` given a folder whose configs are damaged: a JSONDecodeError or AttributeError traceback."""
    export_preset("tiny", str(tmp_path / "m"))
    (tmp_path / "m" / file).write_text(text)
    with pytest.raises(ModelError, match=rf"^model mine=.*/m: its configs cannot be read \({said}.*: a damaged or "
                                         r"half-copied model folder; export or copy it again$"):
        describe_model("mine", str(tmp_path / "m"))


def test_exported_preset_loads_from_a_directory_with_the_same_pixels(tiny, tmp_path):
    export_preset("tiny", str(tmp_path / "tiny"))
    files = {p.suffix for p in (tmp_path / "tiny").rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".ckpt"}
    info = describe_model("mine", str(tmp_path / "tiny"))
    assert (info.kind, info.width, info.height, info.steps, info.scheduler) == ("directory", 256, 256, 20, "ddim")
    loaded = load_pipeline(info)
    rows = resolved_rows(2)
    diff = np.abs(draw(loaded, rows).astype(int) - draw(tiny, rows))  # float noise: attention kernels differ
    assert diff.max() <= 3 and (diff == 0).mean() >= 0.99
    # a replaced weight file changes the fingerprint, so its rows are drawn again
    before = info.fingerprint
    # ... but files the pipeline does not load do not: a note in a component folder, a fine-tune's leftovers
    (tmp_path / "tiny" / "unet" / "README.txt").write_text("trained on the spring catalogue\n")
    (tmp_path / "tiny" / "checkpoints").mkdir()
    (tmp_path / "tiny" / "checkpoints" / "step-100.safetensors").write_bytes(b"x")
    assert describe_model("mine", str(tmp_path / "tiny")).fingerprint == before
    (tmp_path / "tiny" / "sdfleet.json").write_text('{"steps": 20}\n')
    assert describe_model("mine", str(tmp_path / "tiny")).fingerprint != before
    changed = describe_model("mine", str(tmp_path / "tiny")).fingerprint
    (tmp_path / "tiny" / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")  # SD 2.1's tokenizer loads it
    assert describe_model("mine", str(tmp_path / "tiny")).fingerprint != changed


def test_pickle_weights_are_refused(tmp_path):
    export_preset("tiny", str(tmp_path / "m"))
    unet_dir = tmp_path / "m" / "unet"
    weights = next(unet_dir.glob("*.safetensors"))
    torch.save({"x": torch.zeros(1)}, unet_dir / "diffusion_pytorch_model.bin")
    weights.unlink()
    # said from the folder's listing, before a worker starts and fails to load it
    with pytest.raises(ModelError, match=r"unet/diffusion_pytorch_model.bin is a pickle checkpoint and unet/ has no "
                                         r"\.safetensors weights; sdfleet loads safetensors only"):
        describe_model("m", str(tmp_path / "m"))
    (unet_dir / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match="unet/ holds no weights"):
        describe_model("m", str(tmp_path / "m"))


def test_bad_model_references_say_what_is_wrong(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match=r"nothing-here does not exist; not a preset"):  # a path: said missing
        describe_model("x", str(tmp_path / "nothing-here"))
    with pytest.raises(ModelError, match=r"model x=sd15: not a preset"):  # a name, not a path
        describe_model("x", "sd15")
    # a store's folder that is not there was said to lack model_index.json: the user looked inside, not at the name
    with pytest.raises(ModelError, match=r"model x=memory://qa-models/nope: nothing is stored under it \(no such "
                                         r"folder\); check the URI"):
        describe_model("x", "memory://qa-models/nope")
    fsspec.filesystem("memory").pipe_file("/qa-models/a-file", b"x")
    with pytest.raises(ModelError, match=r"model x=memory://qa-models/a-file: a file, not a diffusers directory"):
        describe_model("x", "memory://qa-models/a-file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no model_index.json \(expected a diffusers directory\)"):
        describe_model("x", str(tmp_path / "empty"))
    # a fine-tune's LoRA or embedding folder, or a single-file checkpoint, given as --model: what to do instead
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="holds pytorch_lora_weights.safetensors: an adapter, which rows name in "
                                         "`adapters` from the --adapters store"):
        describe_model("x", str(tmp_path / "lora"))
    (tmp_path / "v2-1_768-ema-pruned.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"a single file, .*from_single_file\(FILE\).save_pretrained\(DIR\)"):
        describe_model("x", str(tmp_path / "v2-1_768-ema-pruned.safetensors"))
    # a relative path to a file has a hub id's shape (`sub/notes`): it was asked of the hub, a network error here
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes").write_text("not a model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"^model x=sub/notes: a file, not a diffusers directory"):
        describe_model("x", "sub/notes")


def test_batch_of_8_equals_batches_of_1_including_ancestral_noise(tiny):
    rows = resolved_rows(4) + resolved_rows(4, scheduler="euler_a")
    for i, row in enumerate(rows):
        row["id"] = f"r{i}"
    together = np.concatenate([draw(tiny, rows[:4]), draw(tiny, rows[4:])])
    alone = np.stack([draw(tiny, [r])[0] for r in rows])
    diff = np.abs(together.astype(int) - alone)
    assert diff.max() <= 3 and (diff == 0).mean() >= 0.99
    assert not np.array_equal(together[0], together[1]), "different seeds must differ"


def test_generate_rows_writes_pngs_and_fails_only_the_broken_group(tiny):
    fs = fsspec.filesystem("memory")
    root = "/gen-test"
    good = resolved_rows(3)
    broken = resolved_rows(1)
    broken[0].update(id="broken", model="other")

    def get_pipe(row):
        if row["model"] == "other":
            raise RuntimeError("CUDA out of memory (simulated)")
        return tiny

    results = generate_rows(get_pipe, good + broken, fs=fs, out_root=root, actor="a1", max_batch=8)
    by_id = {r["id"]: r for r in results}
    assert len(results) == 4 and {by_id[r["id"]]["status"] for r in good} == {"ok"}
    assert by_id["broken"]["status"] == "failed" and "out of memory" in by_id["broken"]["error"]
    data = fs.cat_file(f"{root}/images/r1.png")
    params = read_png_parameters(data)
    assert params["prompt"] == good[1]["prompt"] and params["params_hash"] == good[1]["params_hash"]
    assert not fs.exists(f"{root}/images/broken.png")


def test_an_adapter_the_actor_cannot_use_reads_as_the_plans_and_plan_warnings_reach_the_ledger(tiny):
    """The same bad file said `adapter 'x': ...` where the driver found it and `AdapterError: adapter 'x': ...`
    where an actor did; and a warning the plan gave a row (an embedding its prompts never call) must not be
    replaced by the actor's own (a prompt cut short)."""
    from actors.adapters import AdapterError

    fs, root = fsspec.filesystem("memory"), "/gen-adapter-test"
    rows = resolved_rows(2)
    rows[0].update(id="bad", model="other")
    rows[1].update(warning="`adapters` lists the embedding 'x', whose token '<x>' neither prompt uses",
                   prompt="a red mug " * 60)  # past CLIP's 77 tokens

    def get_pipe(row):
        if row["model"] == "other":
            raise AdapterError("style", "is a pickle file")
        return tiny

    by_id = {r["id"]: r for r in generate_rows(get_pipe, rows, fs=fs, out_root=root, actor="a1", max_batch=8)}
    assert by_id["bad"]["error"].endswith("adapter 'style': is a pickle file") and "AdapterError" not in (
        by_id["bad"]["error"])
    warning = by_id[rows[1]["id"]]["warning"]
    assert warning.startswith("`adapters` lists the embedding 'x'") and "CLIP" in warning, warning


def test_watermark_round_trip_and_limits(tiny):
    rows = resolved_rows(1)
    rows[0]["steps"] = 20  # a finished image: a half-denoised 2-step one reads back only part of its bits
    rgb = draw(tiny, rows)[0]
    marked = wm.embed(rgb, "acme-2026")
    assert wm.bit_accuracy(wm.read_bits(marked, 9), b"acme-2026") >= wm.MATCH_THRESHOLD
    assert wm.read(marked, b"acme-2026") == (b"acme-2026", 1.0)
    y, x = np.mgrid[0:256, 0:256]
    smooth = np.stack([y, x, (x + y) // 2], axis=-1).astype(np.uint8)  # like a studio backdrop
    mse = ((wm.embed(smooth, "acme").astype(float) - smooth) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) > 38, "the mark must stay invisible (PSNR over 38 dB)"
    assert wm.bit_accuracy(wm.read_bits(rgb, 9), b"acme-2026") < wm.MATCH_THRESHOLD
    with pytest.raises(wm.WatermarkError, match="too small"):
        wm.embed(rgb[:128, :128], "acme")


def test_the_mark_survives_flat_bright_images_and_older_marks_still_verify():
    """tiny draws clean shapes on near-white; the older dwtDct lost the mark there (62-70% of bits)."""
    from imwatermark import WatermarkEncoder

    y, x = np.mgrid[0:256, 0:256]
    image = np.full((256, 256, 3), 245, np.uint8)  # the white background of the shapes world
    image[(y - 128) ** 2 + (x - 128) ** 2 < 70**2] = (40, 170, 60)  # a flat green disc
    assert wm.read(wm.embed(image, "sdfleet"), b"sdfleet")[1] >= wm.MATCH_THRESHOLD
    encoder = WatermarkEncoder()  # an image marked before the switch, with dwtDct, still verifies
    encoder.set_watermark("bytes", b"sdfleet")
    busy = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    older = np.ascontiguousarray(encoder.encode(np.ascontiguousarray(busy[:, :, ::-1]), "dwtDct")[:, :, ::-1])
    assert wm.read(older, b"sdfleet") == (b"sdfleet", 1.0)
    assert wm.read(busy, b"sdfleet")[1] < wm.MATCH_THRESHOLD


def test_actor_sizing_leaves_room_for_ray_data():
    one = size_actors(1, {"CPU": 2})
    two = size_actors(2, {"CPU": 2})
    assert (one.device, one.num_gpus, one.torch_threads) == ("cpu", 0, 2)
    assert two.torch_threads == 1 and 2 * two.num_cpus <= 1.0
    gpu = size_actors(4, {"CPU": 32, "GPU": 4})
    assert (gpu.device, gpu.num_gpus) == ("cuda", 1)
    with pytest.raises(ClusterError, match="needs 5 GPUs"):
        size_actors(5, {"CPU": 32, "GPU": 4})
    assert size_actors(8, {"CPU": 4}, device="cuda").num_gpus == 1  # autoscaling: GPUs appear on demand
    with pytest.raises(ClusterError):
        size_actors(0, {"CPU": 2})
    # too many for the CPUs says how many fit (it named no limit), and the most it names fits
    assert size_actors(20, {"CPU": 2}).num_cpus == 0.05
    with pytest.raises(ClusterError, match=r"^--actors 21 is too many for 2 CPUs \(and no GPU\): at most 20, "):
        size_actors(21, {"CPU": 2})
    with pytest.raises(ClusterError, match=r"^--actors 1: 1 CPUs \(and no GPU\) leave none for an actor"):
        size_actors(1, {"CPU": 1})
    for hundredths in range(105, 1000):  # a joined cluster's free CPUs are often fractional: the most named fits
        cpus = hundredths / 100  # (at 2.3, 1.3 / 26 is 0.04999...: "at most 26", and 26 refused)
        with pytest.raises(ClusterError, match="at most") as said:
            size_actors(10_000, {"CPU": cpus})
        most = int(re.search(r"at most (\d+)", str(said.value)).group(1))
        assert size_actors(most, {"CPU": cpus}).num_cpus > 0, cpus


def test_finishing_is_sized_from_the_cpus_the_actors_leave_or_for_gpu_nodes_still_to_come():
    from cluster.connect import FINISH_PER_GPU_ACTOR, size_finishing

    cpu_only = size_finishing({"CPU": 2}, size_actors(1, {"CPU": 2}), 1)
    assert (cpu_only.num_cpus, cpu_only.workers) == (0, 1)  # the actor holds the cores: one task, reserving none
    scaled = size_finishing({"CPU": 32, "GPU": 4}, size_actors(4, {"CPU": 32, "GPU": 4}), 4)
    assert scaled.num_cpus == 1 and scaled.workers == int(32 - 4 - READ_CPU_RESERVE)
    # scaling from zero: only a 0-CPU head shows, and the GPU nodes' CPUs are still to come
    waiting = size_finishing({"CPU": 0}, size_actors(4, {"CPU": 0}, device="cuda"), 4)
    assert (waiting.num_cpus, waiting.workers) == (1, FINISH_PER_GPU_ACTOR * 4)  # was one task of 0 CPUs, on the head


@pytest.mark.gpu
def test_tiny_on_cuda_draws_what_the_cpu_draws():
    """fp32 on CUDA is the CPU's image, to the last bits of the kernels. fp16, which actors use on GPUs,
    takes another path through denoising (on an H100: 25/255 mean difference at 20 steps, objects moved
    and resized), so it is held to the prompt, not to the CPU's pixels."""
    from jobs.evaluate import analyse

    combos = [("red", "circle", "white"), ("blue", "square", "gray"), ("purple", "star", "black"),
              ("yellow", "triangle", "white"), ("green", "star", "gray"), ("orange", "circle", "black")]
    model = {**PRESETS["tiny"]["defaults"], "fingerprint": "test"}
    rows = [resolve_row(ManifestRow(id=f"r{i}", prompt=f"a {c} {s} on a {b} background", seed=900000 + i,
                                    steps=20, guidance_scale=3.0), model, watermark=None)
            for i, (c, s, b) in enumerate(combos)]
    cpu = draw(build_preset("tiny"), rows).astype(int)
    fp32 = draw(build_preset("tiny").to("cuda"), rows).astype(int)
    assert np.abs(fp32 - cpu).mean() < 1.0, "fp32 on CUDA should draw the CPU's pixels"
    fp16 = draw(build_preset("tiny").to("cuda", torch.float16), rows)
    colours = [analyse(image)["color"] for image in fp16]
    right = sum(read == c for read, (c, _, _) in zip(colours, combos))
    assert right >= 5, f"fp16 on CUDA read {colours} for {[c for c, _, _ in combos]}"


@pytest.mark.slow
def test_sd21_random_draws_at_a_small_size():
    pipe = build_preset("sd21-random")
    rows = resolved_rows(1, width=256, height=256)
    assert draw(pipe, rows).shape == (1, 256, 256, 3)


def test_model_from_an_fsspec_uri_is_cached_once_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    export_preset("tiny", str(tmp_path / "tiny"))
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "tiny"), "/models/tiny", recursive=True)
    info = describe_model("remote", "memory://models/tiny")
    assert info.kind == "uri" and info.fingerprint.startswith("uri:") and info.width == 256
    pipe = load_pipeline(info)
    assert draw(pipe, resolved_rows(1)).shape == (1, 256, 256, 3)
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1 and (cached[0] / "model_index.json").is_file()
    load_pipeline(info)  # the second load reads the cache: still one copy
    assert list((tmp_path / "cache" / "models").iterdir()) == cached

    # new weights at the same URI: a new fingerprint, and a copy of its own (not the old weights under it)
    weights = "/models/tiny/unet/diffusion_pytorch_model.safetensors"
    state = load_file(str(tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors"))
    state = {k: v * 1.5 if k.endswith("conv_out.weight") else v for k, v in state.items()}
    fs.pipe_file(weights, save(state))
    changed = describe_model("remote", "memory://models/tiny")
    assert changed.fingerprint != info.fingerprint
    before, after = draw(pipe, resolved_rows(1)), draw(load_pipeline(changed), resolved_rows(1))
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2
    assert np.abs(after.astype(int) - before).max() > 0, "the new weights must be the ones drawn"


def test_a_model_changed_after_the_plan_is_refused_not_drawn_under_its_old_fingerprint(tmp_path, monkeypatch):
    """The driver fingerprints a model; an actor loads it later (minutes later on a node the autoscaler adds,
    hours later after a crash). Weights replaced in between were drawn and recorded under the old
    fingerprint, so the next run skipped them as done; a stored model's node copy kept the new weights under
    the old version for every later run. Now the load says the model changed, and nothing is cached."""
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    export_preset("tiny", str(tmp_path / "tiny"))
    unet = "unet/diffusion_pytorch_model.safetensors"
    state = load_file(str(tmp_path / "tiny" / unet))
    other = save({k: v * 1.5 if k.endswith("conv_out.weight") else v for k, v in state.items()})

    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "tiny"), "/models/swapped", recursive=True)
    planned = describe_model("remote", "memory://models/swapped")
    fs.rm(f"/models/swapped/{unet}")
    fs.pipe_file(f"/models/swapped/{unet}", other + b"\n")  # another size: memory:// gives no version stamp
    with pytest.raises(ModelError, match=r"model memory://models/swapped changed since this run was planned"):
        load_pipeline(planned)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())

    folder = tmp_path / "tiny"
    planned = describe_model("default", str(folder))
    assert load_pipeline(planned) is not None  # unchanged: loads
    (folder / unet).write_bytes(other)  # the same size, new contents (a fine-tune publishing in place)
    with pytest.raises(ModelError, match=f"model default={folder} changed since this run was planned"):
        load_pipeline(planned)


def test_rows_of_a_model_that_does_not_load_fail_after_one_load(tmp_path, monkeypatch):
    """A batch whose model fails to load is drawn again row by row (a row might be the one that broke it): each
    row loaded the model again, so a bad SD 2.1 folder cost a full load per row. Now the actor remembers."""
    import dataclasses

    from actors import actor as actor_module
    from actors.actor import GeneratorActor

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    export_preset("tiny", str(tmp_path / "other"))
    models = {"default": dataclasses.asdict(describe_model("default", "tiny")),
              "other": dataclasses.asdict(describe_model("other", str(tmp_path / "other")))}
    weights = tmp_path / "other" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(save({k: v * 1.5 for k, v in load_file(str(weights)).items()}))  # replaced after the plan
    loads = []
    real = actor_module.load_pipeline
    monkeypatch.setattr(actor_module, "load_pipeline", lambda info, *a: loads.append(info.name) or real(info, *a))
    actor = GeneratorActor(models, str(tmp_path / "out"), 4, torch_threads=1)
    rows = [{**row, "model": "other"} for row in resolved_rows(3)]
    drawn = actor._torch.submit(actor.draw, rows).result()
    assert [row["status"] for row in drawn] == ["failed"] * 3
    assert all("changed since this run was planned" in row["error"] for row in drawn), drawn[0]["error"]
    assert loads == ["default", "other"]


@pytest.fixture
def http_folder(tmp_path):
    """A plain HTTP server (index pages, no object listing API) over tmp_path/served; yields the folder and URL."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # a server that fails part-way: any weights under /broken/ answer 500
            if self.path.startswith("/broken/") and self.path.endswith(".safetensors"):
                self.send_error(500)
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    served = tmp_path / "served"
    served.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_model_over_http_is_copied_file_by_file_and_a_failed_copy_leaves_no_folder(tmp_path, monkeypatch,
                                                                                 http_folder):
    served, url = http_folder
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    export_preset("tiny", str(served / "tiny"))
    (served / "tiny" / "checkpoints").mkdir()  # beside the model, not part of it: never copied
    (served / "tiny" / "checkpoints" / "step-1.safetensors").write_bytes(b"x")
    info = describe_model("web", f"{url}/tiny/")
    assert info.kind == "uri" and info.width == 256
    assert draw(load_pipeline(info), resolved_rows(1)).shape == (1, 256, 256, 3)
    (cached,) = (tmp_path / "cache" / "models").iterdir()
    assert (cached / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (cached / "checkpoints").exists()

    export_preset("tiny", str(served / "broken"))
    info = describe_model("broken", f"{url}/broken")
    with pytest.raises(ModelError, match=f"model {url}/broken could not be copied from its store"):
        load_pipeline(info)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [cached.name]


def test_an_actor_that_switches_models_frees_the_old_one_at_once(tmp_path, monkeypatch):
    """The compile backend and its pipeline refer to each other; without a collection the old model's weights
    (on a GPU: its graphs too) stayed in memory beside the next one until Python's cycle collector ran."""
    import dataclasses
    import gc
    import weakref

    from actors.actor import GeneratorActor
    from actors.models import describe_model

    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    models = {name: dataclasses.asdict(describe_model(name, "tiny")) for name in ("a", "b")}
    actor = GeneratorActor(models, str(tmp_path / "out"), 2, torch_threads=1, backend="compile")
    old = weakref.ref(actor._loaded[1].vae)
    gc.disable()  # as between collections
    try:
        actor._torch.submit(actor.pipeline, "b").result()
        assert old() is None, "model a is still held after the switch to b"
    finally:
        gc.enable()


def test_an_actor_says_in_run_json_which_batch_it_draws_after_running_out_of_memory(tmp_path, monkeypatch):
    """A fixed --batch-size too big for the device: the actor's stats (run.json's backend_stats) name the model,
    size and the batch it draws since, and its rows say so."""
    import dataclasses

    import pyarrow as pa

    import actors.generate as generate
    from actors.actor import GeneratorActor

    real_draw = generate.draw

    def small_device(pipe, rows):
        if len(rows) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_draw(pipe, rows)

    monkeypatch.setattr(generate, "draw", small_device)
    monkeypatch.setenv("SDFLEET_CACHE", str(tmp_path / "cache"))
    info = describe_model("default", "tiny")
    actor = GeneratorActor({"default": dataclasses.asdict(info)}, str(tmp_path / "out"), 4, torch_threads=1)
    rows = [{**row, "source": "m.parquet", "row": i, "status": None, "warning": None}
            for i, row in enumerate(resolved_rows(3, guidance_scale=1.0, width=64, height=64))]
    drawn = actor._torch.submit(actor._call, pa.Table.from_pylist(rows)).result().to_pylist()
    assert [r["status"] for r in drawn] == [None] * 3
    assert all("a batch of 3 ran out of device memory" in r["warning"] for r in drawn), drawn[0]["warning"]
    stats = json.loads(drawn[0]["backend_stats"])
    assert stats["batch_size_after_out_of_memory"] == {"default 64x64 unguided": 1}, stats
