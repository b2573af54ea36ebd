"""Fine-tuning on Ray Train: dataset build, the loss maths, checkpoints, and full and LoRA runs end to end.

End-to-end runs use 2 gloo workers on the `tiny` preset at 128 px with a few steps: enough to show the
loss falling and the outputs changing what `generate` draws, small enough for 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import re
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from helpers import REPO, ledger, pixels, sdfleet, sdfleet_side_by_side, write_manifest
from jobs.dataset import build_dataset
from jobs.synthetic import write_images

RES = "128"
CLASS_PROMPT = "a blue square on a gray background"
CLASS_PROMPT_2 = "a red square on a white background"
TRAIN = ["--workers", "2", "--batch-size", "2", "--resolution", RES, "--log-every", "2", "--seed", "3"]


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def metrics(out: Path) -> list[dict]:
    return [r for r in train_log(out) if "loss" in r]


# -- the maths ----------------------------------------------------------------------------------------

def schedulers():
    from diffusers import DDPMScheduler

    from actors.presets import SD21_SCHEDULER

    v = DDPMScheduler.from_config(SD21_SCHEDULER)
    eps = DDPMScheduler.from_config({**SD21_SCHEDULER, "prediction_type": "epsilon"})
    return eps, v


def test_training_targets_follow_the_prediction_type():
    from actors.train.losses import training_target

    eps, v = schedulers()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t = torch.tensor([10, 500, 990])
    assert torch.equal(training_target(eps, x0, noise, t), noise)
    ac = v.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ac.sqrt() * noise - (1 - ac).sqrt() * x0  # v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0
    torch.testing.assert_close(training_target(v, x0, noise, t), expected)


def test_min_snr_weights_differ_for_v_prediction():
    from actors.train.losses import min_snr_weights

    eps, v = schedulers()
    t = torch.tensor([5, 300, 900])
    ac = eps.alphas_cumprod[t]
    snr = ac / (1 - ac)
    torch.testing.assert_close(min_snr_weights(eps, t, 5.0), torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(min_snr_weights(v, t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    assert min_snr_weights(eps, t, 5.0)[0] < 1.0 and min_snr_weights(eps, t, 5.0)[2] == pytest.approx(1.0)


def test_prior_weights_give_dreambooth_loss():
    """DreamBooth's loss is mean(instance) + w * mean(class); the weights make diffusion_loss's one mean of
    the mixed batch equal that, whatever the split."""
    from actors.train.losses import diffusion_loss, prior_weights

    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(5, 4, 2, 2, generator=g), torch.randn(5, 4, 2, 2, generator=g)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    loss = diffusion_loss(pred, target, prior_weights(2, 3, 0.5))
    torch.testing.assert_close(loss, per_sample[:2].mean() + 0.5 * per_sample[2:].mean())
    assert prior_weights(4, 0, 1.0) is None  # no class data: plain mean


def test_warmup_then_cosine():
    from actors.train.losses import warmup_cosine

    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


def test_vae_crops_with_candidates_keep_the_object_and_one_candidate_keeps_the_old_draws():
    from actors.train.data import random_crops

    pixels = torch.full((6, 3, 64, 64), 0.5)
    pixels[:, :, 44:60, 4:20] = -1.0  # a small dark object in one corner, the rest plain background
    plain = random_crops(pixels, 16, torch.Generator().manual_seed(3))
    busy = random_crops(pixels, 16, torch.Generator().manual_seed(3), candidates=16)
    spread = [float(c.std()) for c in busy]
    assert all(s > 0 for s in spread), spread  # every kept crop shows some of the object
    assert sum(float(c.std()) > 0 for c in plain) < len(plain)  # plain random crops miss it (seed 3)
    # one candidate draws exactly what random_crops drew before candidates existed: same recipe, same weights
    g = torch.Generator().manual_seed(3)
    tops, lefts = torch.randint(0, 49, (6,), generator=g).tolist(), torch.randint(0, 49, (6,), generator=g).tolist()
    assert torch.equal(plain, torch.stack([pixels[i, :, t:t + 16, l:l + 16] for i, (t, l) in enumerate(zip(tops, lefts))]))


def test_vae_crops_spanning_up_to_the_whole_image_are_resized_to_the_crop_size():
    from actors.train.data import random_crops

    # left half red-ish (+1 in channel 0), right half -1: a whole image shows both halves, a 16 px crop mostly one
    pixels = torch.full((64, 3, 64, 64), -1.0)
    pixels[:, 0, :, :32] = 1.0
    spanning = random_crops(pixels, 16, torch.Generator().manual_seed(0), span=64)
    assert spanning.shape == (64, 3, 16, 16) and spanning.min() >= -1 and spanning.max() <= 1
    # the widest crops see both halves: a column at each edge of one crop has each half's value
    both = [c for c in spanning if c[0, :, 0].mean() > 0.9 and c[0, :, -1].mean() < -0.9]
    assert both, "no crop spanned the whole image"
    # and the draws differ from plain crops' (so that span 0 keeps the recipe's crops, bit for bit)
    plain = random_crops(pixels, 16, torch.Generator().manual_seed(0))
    assert not torch.equal(plain, spanning)
    assert torch.equal(plain, random_crops(pixels, 16, torch.Generator().manual_seed(0), span=0))
    assert torch.equal(plain, random_crops(pixels, 16, torch.Generator().manual_seed(0), span=16))


def test_crop_span_needs_a_smaller_crop():
    from actors.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"--crop-span 96 needs a --crop below it \(got --crop 128\)"):
        TrainConfig(method="vae", data="d", base="tiny", out="o", crop=128, crop_span=96)
    with pytest.raises(ValueError, match="--crop-span 96 needs a --crop below it"):
        TrainConfig(method="vae", data="d", base="tiny", out="o", crop_span=96)
    assert TrainConfig(method="vae", data="d", base="tiny", out="o", crop=96, crop_span=256).crop_span == 256


def test_gpu_training_on_a_local_ray_wants_a_gpu_per_worker(monkeypatch):
    """`--gpu --workers N` on a local Ray short of GPUs is one line naming the flags, not workers that wait."""
    from actors.train.config import TrainConfig
    from cluster.connect import ClusterError
    from jobs.finetune import _scaling

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = TrainConfig(method="lora", data="d", base="tiny", out="o", gpu=True, workers=2)
    with pytest.raises(ClusterError, match=r"^--gpu: this machine has no GPU Ray can use .*leave --gpu out"):
        _scaling(cfg, {"CPU": 2}, cfg)
    with pytest.raises(ClusterError, match=r"^--gpu: --workers 2 needs 2 GPUs \(one each\); this machine has 1: "
                                           r"give --workers 1"):
        _scaling(cfg, {"CPU": 8, "GPU": 1}, cfg)
    assert _scaling(cfg, {"CPU": 8, "GPU": 2}, cfg)[1].num_workers == 2
    on_cluster = cfg.model_copy(update={"address": "ray://head:10001"})  # an autoscaler may add them: it waits
    assert _scaling(on_cluster, {"CPU": 8}, on_cluster)[1].use_gpu


def test_vae_pixel_loss_l1_is_the_mean_absolute_error():
    from actors.train.losses import vae_loss

    pixels, recon, kl = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.1), torch.zeros(2)
    assert vae_loss(recon, pixels, kl, 0.0, "l1").item() == pytest.approx(0.1)
    assert vae_loss(recon, pixels, kl, 0.0).item() == pytest.approx(0.01)  # MSE stays the default


def test_workers_see_disjoint_samples_and_every_sample_once_per_epoch():
    from actors.train.data import sample_indices

    n, world, bs = 12, 2, 3
    steps = [[sample_indices(n, 7, s, 0, 1, world, r, bs) for r in range(world)] for s in range(2)]
    seen = [i for step in steps for per_rank in step for i in per_rank]
    assert sorted(seen) == list(range(n))  # 2 steps x 2 workers x 3 = one epoch, no repeats
    assert sample_indices(n, 7, 1, 0, 1, world, 1, bs) == steps[1][1]  # a function of the step: resumable


def test_lora_parameter_count_on_the_real_sd21_unet():
    from diffusers import UNet2DConditionModel

    from actors.lora_io import add_unet_lora
    from actors.presets import PRESETS

    with torch.device("meta"):  # the real shapes without allocating 3.5 GB
        unet = UNet2DConditionModel.from_config(PRESETS["sd21-random"]["unet"])
    assert add_unet_lora(unet, rank=4) == 829_952


def test_resume_takes_the_newest_whole_checkpoint_on_the_store_and_skips_one_that_does_not_load(tmp_path,
                                                                                               monkeypatch):
    """Ray's record of checkpoints lagged the store at a Ctrl-C: the rerun resumed --checkpoint-every steps back
    and the newest folder was never pruned. A folder cut short, or damaged since, falls back to the one before."""
    from actors.train.checkpoints import gather_state, save_checkpoint
    from actors.train.stored import stored_checkpoints
    from actors.train.config import TrainConfig
    from actors.train.loop import UnloadableCheckpoint, resume_from
    from safetensors.torch import save_file

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    folders = tmp_path / "tune" / "checkpoints"
    for step, name in ((4, "checkpoint_2026-12-06_10-00-00"), (8, "checkpoint_2026-12-06_10-01-00"),
                       (12, "checkpoint_2026-12-06_10-02-00")):
        (folders / name).mkdir(parents=True)
        with torch.no_grad():
            net.weight.fill_(step)
        save_checkpoint(str(folders / name), step, *gather_state(net, opt, fsdp=False), sched, scaler, None)
    (folders / "checkpoint_tmp_upload").mkdir()  # no files yet: not a checkpoint
    (folders / "checkpoint_manager_snapshot.json").write_text("{}")
    cfg = TrainConfig(method="lora", data="d", base="tiny", out=str(tmp_path / "tune"))
    assert [step for step, _ in stored_checkpoints(cfg.out)] == [12, 8, 4]
    state = (net, opt, sched, scaler, None)
    assert resume_from(cfg, None, state) == 12 and net.weight[0, 0].item() == 12
    weights = folders / "checkpoint_2026-12-06_10-02-00" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # an upload cut short: passed over, by its size alone
    passed_over = []  # ... and said (QA: a rerun trained 10 steps again with no word why)
    assert resume_from(cfg, None, state, passed_over) == 8 and net.weight[0, 0].item() == 8
    assert passed_over == [("checkpoint_2026-12-06_10-02-00", "trainable.safetensors cut short (or longer than its "
                                                              "header says)")]
    meta = folders / "checkpoint_2026-12-06_10-01-00" / "state.json"  # an EMA checkpoint without its EMA file
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "ema": {"decay": 0.9}}))
    passed_over = []
    assert [step for step, _ in stored_checkpoints(cfg.out, passed_over)] == [4]
    assert sorted(passed_over) == [("checkpoint_2026-12-06_10-01-00", "ema.safetensors missing"),
                                   ("checkpoint_2026-12-06_10-02-00", "trainable.safetensors cut short (or longer "
                                                                      "than its header says)")]  # (tmp_upload: unsaid)
    # a header that is not one, an empty file (a crash before the header was out: it stopped every resume), a
    # state.json that does not parse: each passed over, for its own reason
    newest = folders / "checkpoint_2026-12-06_10-01-00"  # (its trainable and optimizer files are whole)
    for name, data, said in (("optimizer.safetensors", (10).to_bytes(8, "little") + b"\xff" * 56,
                              "optimizer.safetensors damaged (its header"),
                             ("trainable.safetensors", b"", "trainable.safetensors cut short"),
                             ("state.json", b"{\"step\": 1", "state.json does not read (JSONDecodeError)")):
        saved = (newest / name).read_bytes()
        (newest / name).write_bytes(data)
        passed_over = []
        stored_checkpoints(cfg.out, passed_over)
        assert [why for folder, why in passed_over if folder == newest.name][0].startswith(said), passed_over
        (newest / name).write_bytes(saved)
    other = folders / "checkpoint_2026-12-06_10-00-00" / "trainable.safetensors"  # whole, but of another model
    save_file({"nope": torch.zeros(2)}, str(other))
    with pytest.raises(UnloadableCheckpoint, match=r"checkpoint_2026-12-06_10-00-00 does not load .*move it aside"):
        resume_from(cfg, None, state)  # said, not passed over: a worker alone would resume elsewhere
    # ... and noted as an error every retry meets; one on the way to the files (the store, the network, memory)
    # is Ray Train's to retry, and says nothing of the checkpoint (it was called one to move aside)
    import actors.train.loop as loop

    for lost in (ConnectionResetError(104, "Connection reset by peer"),  # the store
                 RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"),  # FSDP's collective load
                 torch.OutOfMemoryError("CUDA out of memory")):
        def drops(directory, *args, **kwargs):
            raise lost

        monkeypatch.setattr(loop, "load_checkpoint", drops)
        with pytest.raises(RuntimeError, match=rf"could not be read \({type(lost).__name__}") as raised:
            resume_from(cfg, None, state)
        assert not isinstance(raised.value, UnloadableCheckpoint) and "move it aside" not in str(raised.value)
    monkeypatch.undo()
    assert resume_from(TrainConfig(method="lora", data="d", base="tiny", out=str(tmp_path / "none")), None,
                       state) is None


def test_a_finished_run_removes_the_checkpoint_folders_ray_does_not_keep(tmp_path):
    """A folder uploaded just before a stop, never in Ray's record, was never pruned (gigabytes for a full model)."""
    import types

    import fsspec

    from jobs.finetune import _remove_unkept_checkpoints

    folders = tmp_path / "checkpoints"
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_c", "checkpoint_d"):
        (folders / name).mkdir(parents=True)
        (folders / name / "state.json").write_text("{}")
    (folders / "checkpoint_manager_snapshot.json").write_text("{}")
    kept = [types.SimpleNamespace(path=str(folders / n)) for n in ("checkpoint_c", "checkpoint_d")]
    result = types.SimpleNamespace(best_checkpoints=[(c, {}) for c in kept], checkpoint=kept[-1])
    fs, root = fsspec.core.url_to_fs(str(tmp_path))
    _remove_unkept_checkpoints(fs, root, result)
    assert sorted(p.name for p in folders.iterdir()) == ["checkpoint_c", "checkpoint_d",
                                                         "checkpoint_manager_snapshot.json"]
    _remove_unkept_checkpoints(fs, root, types.SimpleNamespace(best_checkpoints=None, checkpoint=None))
    assert len(list(folders.iterdir())) == 3, "with nothing kept by Ray, nothing is told stale"


def test_checkpoint_round_trip_restores_weights_optimizer_and_schedule(tmp_path):
    from actors.presets import build_preset
    from actors.train.checkpoints import gather_state, load_checkpoint, save_checkpoint
    from actors.train.config import TrainConfig
    from actors.train.losses import warmup_cosine
    from actors.train.model import Denoiser, make_trainable

    def setup():
        torch.manual_seed(0)
        pipe = build_preset("tiny")
        make_trainable(TrainConfig(method="lora", data="d", base="tiny", out="o"), pipe)
        model = Denoiser(pipe.unet, pipe.text_encoder)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 10))
        return model, params, opt, sched, torch.amp.GradScaler("cpu", enabled=False)

    model, params, opt, sched, scaler = setup()
    for _ in range(3):
        sum((p ** 2).sum() for p in params).backward()
        opt.step(), opt.zero_grad(), sched.step()
    save_checkpoint(str(tmp_path), 3, *gather_state(model, opt, fsdp=False), sched, scaler, None)
    assert sorted(os.listdir(tmp_path)) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]

    model2, params2, opt2, sched2, scaler2 = setup()
    assert load_checkpoint(str(tmp_path), model2, opt2, sched2, scaler2, None) == 3
    for a, b in zip(params, params2):
        assert torch.equal(a, b)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for p, q in zip(params, params2):  # the next step moves both the same way: the Adam moments came back
        for prm, o in ((p, opt), (q, opt2)):
            (prm ** 2).sum().backward()
            o.step()
        assert torch.equal(p, q)


def test_train_log_holds_no_password_of_the_uris_in_the_config(tmp_path):
    """The `started` line records the whole config: a --base or --data URI with a password in it was written in
    clear into train_log.jsonl, which travels with the model (finetune.json and the terminal had it masked)."""
    from actors.train.config import TrainConfig
    from actors.train.loop import TrainLog

    cfg = TrainConfig(method="lora", data="s3://alice:s3cret@bucket/ds", out=str(tmp_path),
                      base="http://bob:hunter2@models.example/tiny/")
    TrainLog(str(tmp_path), rank=0).line({"event": "started", "config": cfg.model_dump()})
    text = (tmp_path / "train_log.jsonl").read_text()
    assert "s3cret" not in text and "hunter2" not in text, text
    (line,) = train_log(tmp_path)
    assert line["config"]["base"] == "http://bob:***@models.example/tiny"  # the config drops the trailing /
    assert line["config"]["data"] == "s3://alice:***@bucket/ds"


def test_train_log_appends_on_disk_and_rewrites_an_object_store_only_when_a_line_must_last(tmp_path, monkeypatch):
    """A resumed run's lines follow the first run's; on a store that cannot append, progress lines are
    batched (one rewrite per REWRITE_SECONDS) while events and checkpoint metrics are written at once."""
    import fsspec

    from actors.train.loop import TrainLog

    TrainLog(str(tmp_path), rank=0).line({"event": "started"})
    TrainLog(str(tmp_path), rank=1).line({"step": 1, "loss": 1.0})  # only rank 0 writes
    resumed = TrainLog(str(tmp_path), rank=0)
    resumed.line({"event": "resumed", "step": 3})
    resumed.line({"step": 4, "loss": 0.5}, durable=False)
    assert train_log(tmp_path) == [{"event": "started"}, {"event": "resumed", "step": 3}, {"step": 4, "loss": 0.5}]

    clock = [100.0]
    monkeypatch.setattr("actors.train.loop.time.monotonic", lambda: clock[0])
    store = fsspec.filesystem("memory")
    path = f"/train-log-{os.getpid()}/train_log.jsonl"
    url = f"memory://{path.rsplit('/', 1)[0]}"

    def stored() -> list[dict]:
        return [json.loads(line) for line in store.cat_file(path).decode().splitlines()]

    log = TrainLog(url, rank=0)
    log.line({"event": "started"})
    assert stored() == [{"event": "started"}]
    log.line({"step": 1, "loss": 1.0}, durable=False)
    clock[0] += TrainLog.REWRITE_SECONDS / 2
    log.line({"step": 2, "loss": 0.9}, durable=False)
    assert stored() == [{"event": "started"}], "progress lines wait for the next rewrite"
    clock[0] += TrainLog.REWRITE_SECONDS / 2
    log.line({"step": 3, "loss": 0.8}, durable=False)
    assert [r.get("step") for r in stored()] == [None, 1, 2, 3]
    log.line({"step": 4, "loss": 0.7}, durable=False)
    log.line({"step": 5, "loss": 0.6})  # a checkpoint's metrics
    assert [r.get("step") for r in stored()] == [None, 1, 2, 3, 4, 5]
    assert TrainLog(url, rank=0).text == store.cat_file(path).decode(), "a resumed run rewrites what is there"


# -- dataset build ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("dataset")
    images = base / "images"
    write_images(images, 8, size=160, seed=1)
    (images / "corrupt.png").write_bytes(b"not a png at all")
    (images / "corrupt.txt").write_text("a red circle on a white background")
    write_images(base / "nocap", 1, size=160)
    (base / "nocap" / "00000.png").rename(images / "uncaptioned.png")
    small = base / "small"
    write_images(small, 1, size=64)
    (small / "00000.png").rename(images / "tiny.png")
    (small / "00000.txt").rename(images / "tiny.txt")
    proc = sdfleet("dataset", "build", str(images), "-o", str(base / "data"), "--resolution", RES)
    return {"dir": base / "data", "proc": proc, "base": base}


def test_an_out_whose_store_refuses_writes_is_named(dataset, capsys, monkeypatch):
    """Read-only credentials on --out (S3 answering PutObject with AccessDenied) said only "a store refused or did
    not answer", which with --data on the same store named neither flag nor URI."""
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry

    from jobs.cli import main

    class ReadOnly(MemoryFileSystem):  # these credentials may list and read, not write
        protocol = "qa-readonly"

        def pipe_file(self, path, *args, **kwargs):
            raise PermissionError("Access Denied")

        def _open(self, path, mode="rb", *args, **kwargs):
            if "r" not in mode:
                raise PermissionError("Access Denied")
            return super()._open(path, mode, *args, **kwargs)

    monkeypatch.setitem(_registry, "qa-readonly", ReadOnly)
    MemoryFileSystem.store.pop("/qa-bucket", None)
    MemoryFileSystem.pseudo_dirs.append("/qa-bucket")
    assert main(["finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--steps", "2",
                 "--resolution", RES, "--out", "qa-readonly://qa-bucket/adapters/mine"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sdfleet: error: cannot write to --out qa-readonly://qa-bucket/adapters/mine: "
                          "PermissionError: Access Denied"), err


def test_an_out_inside_the_dataset_is_refused(dataset, capsys, tmp_path):
    """It trained and wrote the LoRA into the dataset's folder, which as an --adapters store then listed it."""
    from jobs.cli import main

    (tmp_path / "linked").symlink_to(dataset["dir"])
    before = sorted(p.name for p in dataset["dir"].iterdir())
    for out in (dataset["dir"] / "inside", tmp_path / "linked" / "inside"):
        assert main(["finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--steps", "2",
                     "--resolution", RES, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"sdfleet: error: --out {out} is inside --data {dataset['dir']}: the dataset's folder "
                              "would hold"), err
    assert sorted(p.name for p in dataset["dir"].iterdir()) == before


def test_dataset_build_reports_every_skipped_file_and_keeps_the_rest(dataset):
    proc = dataset["proc"]
    assert proc.returncode == 2, proc.stderr[-2000:]  # written, with files skipped
    summary = json.loads((dataset["dir"] / "_dataset.json").read_text())
    reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
    assert reasons.keys() == {"corrupt.png", "uncaptioned.png", "tiny.png"}
    assert reasons["corrupt.png"] == "not an image Pillow reads (PNG, JPEG, WebP, ...)"  # not <_io.BytesIO ...>
    assert reasons["uncaptioned.png"].startswith("no caption")
    assert reasons["tiny.png"].startswith("too small (64x64")
    for name in reasons:
        assert name in proc.stderr
    table = pq.read_table(dataset["dir"])
    assert table.num_rows == 8 and summary["rows"] == 8
    assert set(table.column("caption").to_pylist()) <= {f"a {c} {s} on a {b} background" for c in
                                                       ["red", "green", "blue", "yellow", "orange", "purple"]
                                                       for s in ["circle", "square", "triangle", "star"]
                                                       for b in ["white", "gray", "black"]}
    from PIL import Image
    import io

    with Image.open(io.BytesIO(table.column("image")[0].as_py())) as im:
        assert im.size == (128, 128) and im.mode == "RGB"


def test_dataset_build_reads_captions_from_a_csv(tmp_path):
    images = tmp_path / "images"
    write_images(images, 3, size=128)
    for txt in images.glob("*.txt"):
        txt.unlink()
    (tmp_path / "captions.csv").write_text("file,caption\n00000.png,a red mug\n00001.png,a blue vase\n")
    proc = sdfleet("dataset", "build", str(images), "--captions", str(tmp_path / "captions.csv"),
                   "-o", str(tmp_path / "data"), "--resolution", "128")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "00002.png: no caption" in proc.stderr
    assert sorted(pq.read_table(tmp_path / "data").column("caption").to_pylist()) == ["a blue vase", "a red mug"]


@pytest.mark.parametrize("name, text, said", [
    # a stray quote took in every line after it as one caption: three images left uncaptioned without a word
    ("captions.csv", 'file,caption\n00000.png,"a red mug\n00001.png,a blue vase\n00002.png,a lamp\n',
     "line 2: unexpected end of data: a stray or unclosed double quote"),
    ("captions.csv", 'file,caption\n00000.png,a mug\n00001.png,"a blue\n00002.png,a" vase\n',
     "line 3: ',' expected after '\"': a stray or unclosed double quote"),
    ("captions.csv", 'file,caption\n00000.png,"a red mug\n00001.png,a blue vase"\n00002.png,a lamp\n',
     "line 2: a value runs on over 2 lines ('a red mug\\n00001.png,a blue vase'); an opening quote is not closed, or "
     "a value holds a line break"),
    # an unquoted comma cut the caption: trained on as 'a red mug' without a word
    ("captions.csv", 'file,caption\n00000.png,a red mug, ceramic\n00001.png,a vase\n',
     "line 2 has more fields than the header, [' ceramic'] left over; quote values that contain commas"),
    # str() of an object was trained on as the caption
    ("captions.jsonl", '{"file": "00000.png", "caption": "a mug"}\n{"file": "00001.png", "caption": {"en": "a vase"}}\n',
     "line 2: `caption` must be text, got dict {'en': 'a vase'}"),
])
def test_dataset_build_refuses_a_captions_file_that_would_lose_or_garble_captions(tmp_path, capsys, name, text, said):
    from jobs.cli import main

    images = tmp_path / "images"
    write_images(images, 3, size=128)
    for txt in images.glob("*.txt"):
        txt.unlink()
    (tmp_path / name).write_text(text)
    assert main(["dataset", "build", str(images), "--captions", str(tmp_path / name), "-o", str(tmp_path / "data"),
                 "--resolution", "128"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"sdfleet: error: --captions {tmp_path / name} {said}" + (
        " (keep each caption on one line)" if "runs on" in said else
        " (quote a whole value, and double each quote inside one)" if "stray or unclosed" in said else ""), err
    assert not (tmp_path / "data").exists()


def test_dataset_build_into_memory_or_from_a_store_that_refuses_is_one_line(tmp_path, capsys, monkeypatch):
    """`-o memory://ds` said it wrote the dataset, which was gone when the command ended; a store that refuses
    (no credentials) or does not answer was a botocore or aiohttp traceback."""
    from botocore.exceptions import NoCredentialsError
    from fsspec.implementations.memory import MemoryFileSystem
    from fsspec.registry import _registry

    from jobs.cli import main

    class Refusing(MemoryFileSystem):  # a bucket these credentials cannot read
        protocol = "refusing"

        def _refuse(self, *args, **kwargs):
            raise NoCredentialsError()

        ls = info = exists = isdir = isfile = cat_file = find = _refuse

    monkeypatch.setitem(_registry, "refusing", Refusing)
    images = tmp_path / "images"
    write_images(images, 1, size=128)
    cases = {("-o", "memory://ds"): "-o memory://ds: memory:// lives in this process only, and the dataset would "
                                    "be gone when it ends",
             ("images", "refusing://bucket/images"): "IMAGES_DIR refusing://bucket/images cannot be read "
                                                     "(NoCredentialsError: Unable to locate credentials)",
             ("-o", "refusing://bucket/data"): "-o refusing://bucket/data cannot be read (NoCredentialsError: "
                                               "Unable to locate credentials)",
             ("--captions", "refusing://bucket/captions.csv"): "--captions refusing://bucket/captions.csv cannot be "
                                                               "read (NoCredentialsError: Unable to locate credentials)"}
    for (what, uri), said in cases.items():
        source, out = (uri, str(tmp_path / "data")) if what == "images" else (str(images), uri)
        if what == "--captions":
            source, out = str(images), str(tmp_path / "data")
        extra = ["--captions", uri] if what == "--captions" else []
        assert main(["dataset", "build", source, "-o", out, "--resolution", "128", *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"sdfleet: error: {said}") and len(err.strip().splitlines()) == 1, err


def test_dataset_build_searches_linked_folders_once_each(tmp_path):
    shoot = tmp_path / "shoot-2"  # kept elsewhere, linked into the folder given
    write_images(shoot, 2, size=128)
    images = tmp_path / "images"
    write_images(images, 1, size=128)
    (images / "shoot-2").symlink_to(shoot, target_is_directory=True)
    (shoot / "back-up").symlink_to(images, target_is_directory=True)  # a loop: searched once, not forever
    summary = build_dataset(str(images), str(tmp_path / "data"), resolution=128, log=lambda line: None)
    assert summary["skipped"] == [] and summary["rows"] == 3
    files = sorted(pq.read_table(tmp_path / "data").column("file").to_pylist())
    assert files == ["00000.png", "shoot-2/00000.png", "shoot-2/00001.png"]


def test_dataset_build_with_nothing_usable_is_an_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"junk")
    (images / "a.txt").write_text("a red mug")
    proc = sdfleet("dataset", "build", str(images), "-o", str(tmp_path / "data"))
    assert proc.returncode == 1
    assert "no usable images" in proc.stderr and "a.png: not an image Pillow reads" in proc.stderr


# -- bad input: clear errors before any worker starts ---------------------------------------------------

def refused_before_ray(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in this process (these checks need no Ray: a subprocess would only add its start-up) and
    fail the test if Ray is started; returns the exit code and what was said on stderr."""
    import ray

    from jobs.cli import main

    def started(*args, **kwargs):
        raise AssertionError("Ray was started: the bad input should have been refused before")

    monkeypatch.setattr(ray, "init", started)
    code = main(list(argv))
    return code, capsys.readouterr().err

def test_a_fine_tunes_folder_and_a_generate_run_are_kept_apart(dataset, tmp_path, monkeypatch, capsys):
    """generate wrote its images and ledger into a stopped fine-tune's --out, which then refused to resume there
    ("holds a generate run's output"); a LoRA trained into store/style beside store/style.safetensors made
    generate fail every row naming `style` (two adapters of one name)."""
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "finetune.json").write_text("{}")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a red star"}])
    code, stderr = refused_before_ray(monkeypatch, capsys, "generate", str(manifest), "--out", str(tuned))
    assert code == 1 and f"--out {tuned} is a fine-tune's output (finetune.json); give the run a folder of its own" \
        in stderr, stderr
    assert sorted(p.name for p in tuned.iterdir()) == ["finetune.json"]
    # another tool's output with a run.json of its own: its run.json and images were written over, exit 0
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    (other / "run.json").write_text('{"status": "done", "images": 1}')
    (other / "images" / "a.png").write_bytes(b"theirs")
    code, stderr = refused_before_ray(monkeypatch, capsys, "generate", str(manifest), "--out", str(other))
    assert code == 1 and f"--out {other} holds a run.json that sdfleet did not write (it has no run_id)" in stderr, \
        stderr
    assert (other / "images" / "a.png").read_bytes() == b"theirs"
    store = tmp_path / "store"
    store.mkdir()
    (store / "style.safetensors").write_bytes(b"")
    code, stderr = refused_before_ray(monkeypatch, capsys, "finetune", "lora", "--data", str(dataset["dir"]),
                                      "--base", "tiny", "--out", str(store / "style"))
    assert code == 1 and "already holds style.safetensors, an adapter named 'style'" in stderr, stderr
    assert sorted(p.name for p in store.iterdir()) == ["style.safetensors"]


def _parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("case", ["empty", "no-caption-column", "missing-base", "zero-workers", "missing-data",
                                  "crop-for-full", "calibrate-for-full", "lora-layers-for-full",
                                  "pixel-loss-for-full", "crop-candidates-without-crop", "infinite-lr", "pickle-base",
                                  "out-of-other-files", "number-captions", "text-images", "seed-past-torch",
                                  "huge-resolution", "crop-past-resolution", "null-caption", "out-is-a-file",
                                  "unreachable-data"])
def test_bad_input_fails_before_any_worker_starts(case, dataset, tmp_path, monkeypatch, capsys):
    data, base, extra, method = str(dataset["dir"]), "tiny", [], "full"
    if case == "empty":
        data = str(_parquet(tmp_path / "empty.parquet", pa.table({"caption": pa.array([], pa.string()),
                                                                   "image": pa.array([], pa.binary())})))
        expected = "is empty: 0 rows"
    elif case == "no-caption-column":
        data = str(_parquet(tmp_path / "nocap.parquet", pa.table({"image": [b"x"], "text": ["a mug"]})))
        expected = "has no 'caption' column"
    elif case == "missing-base":
        base, expected = str(tmp_path / "no-such-model"), "no-such-model"
    elif case == "zero-workers":
        extra, expected = ["--workers", "0"], "--workers: must be at least 1"
    elif case == "crop-for-full":
        extra, expected = ["--crop", "64"], "--crop is for vae and must be a multiple of 8; got 64 with full"
    elif case == "calibrate-for-full":
        extra, expected = ["--calibrate-scale"], "--calibrate-scale is for vae"
    elif case == "pixel-loss-for-full":
        extra, expected = ["--pixel-loss", "l1"], "--pixel-loss is for vae; full trains on the diffusion loss"
    elif case == "crop-candidates-without-crop":
        extra, expected = ["--crop-candidates", "4"], "--crop-candidates 4 needs --crop"
    elif case == "lora-layers-for-full":
        extra, expected = ["--lora-layers", "all"], "--lora-layers is for lora; full trains whole weights"
    elif case == "infinite-lr":  # the loss would go NaN and NaN checkpoints be written
        extra, expected = ["--lr", "inf"], "--lr: must be a finite number"
    elif case in ("number-captions", "text-images"):  # each failed in every worker, after Ray's start-up
        table = (pa.table({"caption": [1, 2], "image": [b"x", b"y"]}) if case == "number-captions" else
                 pa.table({"caption": ["a mug"], "image": ["not bytes"]}))
        data = str(_parquet(tmp_path / "typed.parquet", table))
        expected = ("`caption` column is int64, not text" if case == "number-captions" else
                    "`image` column is string, not encoded image bytes (binary)")
    elif case == "unreachable-data":  # the message named no flag
        data = "http://127.0.0.1:9/ds/"
        expected = "--data http://127.0.0.1:9/ds: the store refused or did not answer (ClientConnectorError"
    elif case == "out-is-a-file":  # said as "[Errno 17] File exists"
        (tmp_path / "out").write_bytes(b"")
        expected = "is a file; give a folder: a new or empty one, or an earlier fine-tune's --out to resume it"
    elif case == "null-caption":  # failed in every worker, retried, with tokenizer's words and no row named
        table = pa.table({"caption": pa.array(["a mug", None, None], pa.string()), "image": [b"x", b"y", b"z"]})
        data = str(_parquet(tmp_path / "nulls.parquet", table))
        expected = "nulls.parquet has 2 row(s) whose `caption` is null; every row needs one"
    elif case == "seed-past-torch":
        extra, expected = ["--seed", str(2**63)], "--seed: must be less than 9223372036854775808"
    elif case == "huge-resolution":
        extra, expected = ["--resolution", "1000000"], "--resolution must be a multiple of 8 in 64..2048"
    elif case == "crop-past-resolution":  # trained on whole images without a word
        method, extra = "vae", ["--crop", "512", "--resolution", "256"]
        expected = "--crop 512 is not below the training size, 256 px; give a smaller --crop"
    elif case == "pickle-base":  # refused here, not by every worker after Ray started
        model = tmp_path / "pickled"
        (model / "unet").mkdir(parents=True)
        (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", '
                                                '"UNet2DConditionModel"]}')
        (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
        base, expected = str(model), "unet/diffusion_pytorch_model.bin is a pickle checkpoint"
    elif case == "out-of-other-files":  # photos, or the base model itself: never written into
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "holiday.jpg").write_bytes(b"jpeg")
        expected = "holds files (holiday.jpg) and is not a fine-tune's output (no finetune.json)"
    else:
        data, expected = str(tmp_path / "nowhere"), "does not exist"
    out = tmp_path / "out"
    code, stderr = refused_before_ray(monkeypatch, capsys, "finetune", method, "--data", data, "--base", base,
                                      "--out", str(out), *extra)
    assert code == 1 and expected in stderr, stderr[-2000:]
    assert not (out / "checkpoints").exists()
    assert case in ("out-of-other-files", "out-is-a-file") or not out.exists(), "a refused run left its --out"


@pytest.mark.parametrize("method, extra, expected", [
    ("dreambooth", [], "dreambooth needs --class-prompt"),
    ("full", ["--class-prompt", "a star"], "--class-prompt and --class-data are for dreambooth and lora"),
    ("dreambooth", ["--class-prompt", "a star", "--class-data", "x"], "not both"),
    ("lora", ["--class-data", "/no/such/class-data"], "--class-data /no/such/class-data does not exist"),
    ("dreambooth", ["--class-prompt", "a star", "--prior-loss-weight", "0"], "--prior-loss-weight"),
    ("dreambooth", ["--class-prompt", "a star", "--class-prompt", " "], "--class-prompt must not be empty (number 2"),
    ("dreambooth", ["--class-prompt", "a star", "--class-prompt", "a star"], "--class-prompt 'a star' is given twice"),
    ("lora", ["--class-prompt", "a", "--class-prompt", "b", "--class-prompt", "c", "--class-images", "2"],
     "--class-images 2 is fewer than the 3 --class-prompt given, so 'c' would never be drawn"),
    ("dreambooth", ["--class-prompt", "a star", "--class-images", "1000000000"],  # built in memory before a word
     "--class-images: must be at most 100000"),
    ("textual-inversion", [], "textual-inversion needs --token"),
    ("textual-inversion", ["--token", "<gem>"], "no caption in"),  # these captions never use <gem>
    ("textual-inversion", ["--token", "<gem>", "--train-text-encoder"], "drop --train-text-encoder"),
    ("textual-inversion", ["--token", "circle"], "'circle' is already a word of this model's tokenizer"),
    ("full", ["--token", "<gem>"], "--token is for textual-inversion"),
    # another method's flags were ignored without a word on full (and refused elsewhere)
    ("full", ["--rank", "8"], "--rank and --alpha are for lora; full trains whole weights"),
    ("textual-inversion", ["--token", "<gem>", "--alpha", "3"], "--rank and --alpha are for lora; textual-inversion "
                                                                 "trains the token vectors"),
    ("full", ["--kl-weight", "0.1"], "--kl-weight is for vae"),
    # ... even at their default value: given, it was ignored without a word (a 1000-step full run with --rank 4)
    ("full", ["--rank", "4"], "--rank and --alpha are for lora; full trains whole weights"),
    ("full", ["--kl-weight", "1e-6"], "--kl-weight is for vae"),
    ("full", ["--prior-loss-weight", "1"], "--prior-loss-weight weighs the class images' loss: it needs"),
    ("lora", ["--class-images", "100"], "--class-images is how many class images --class-prompt draws"),
    ("full", ["--crop", "0"], "--crop is for vae and must be a multiple of 8; got 0 with full"),
    ("lora", ["--crop-span", "0"], "--crop-span is for vae (with --crop); got it with lora"),
    ("full", ["--pixel-loss", "mse"], "--pixel-loss is for vae; full trains on the diffusion loss"),
    # the diffusion methods' flags ran vae with exit 0 and changed nothing (finetune.json said the text encoder trained)
    ("vae", ["--train-text-encoder", "--noise-offset", "0.1"], "--train-text-encoder, --noise-offset are for full, "
                                                                "lora, dreambooth and textual-inversion: vae trains"),
    ("vae", ["--min-snr-gamma", "5"], "--min-snr-gamma is for full, lora"),
    ("vae", ["--caption-dropout", "0"], "--caption-dropout is for full, lora"),
    ("vae", ["--validation-prompt", "a red star"], "--validation-prompt is for full, lora"),
    ("vae", ["--validation-guidance", "3"], "--validation-guidance is for full, lora"),
    ("textual-inversion", ["--token", "<gem>", "--fsdp"], "textual-inversion trains few enough weights for DDP"),
    ("full", ["--prior-loss-weight", "2"], "--prior-loss-weight weighs the class images' loss: it needs"),
    ("lora", ["--class-images", "5"], "--class-images is how many class images --class-prompt draws"),
    ("dreambooth", ["--class-data", "{data}", "--class-images", "5"],  # was ignored without a word
     "--class-images is how many class images --class-prompt draws: give --class-prompt (dreambooth, lora); every "
     "image of --class-data is used"),
    # values past any plan: each trained on for good or failed minutes later
    ("lora", ["--steps", str(10**20)], "--steps: must be at most 10000000"),
    ("lora", ["--rank", "100000"], "--rank: must be at most 1024"),
    ("lora", ["--batch-size", "1000000"], "--batch-size: must be at most 256"),
    ("lora", ["--grad-accum", "100000"], "--grad-accum: must be at most 1024"),
    ("lora", ["--out-name", "mug style"], "'mug style' will be the adapter's name in `generate --adapters`"),
    ("lora", ["--out-name", "-neg"], "'-neg' will be the adapter's name in `generate --adapters`, which takes "
                                     "letters, digits, '.', '_' and '-', starting with a letter, digit or '_'; "),
])
def test_method_flags_are_checked_before_any_worker_starts(method, extra, expected, dataset, tmp_path, monkeypatch,
                                                            capsys):
    name = extra[extra.index("--out-name") + 1] if "--out-name" in extra else "out"  # (not a flag: the folder)
    extra = [a for a in extra if a not in ("--out-name", name)] if "--out-name" in extra else extra
    extra = [a.format(data=dataset["dir"]) for a in extra]
    out = tmp_path / name
    code, stderr = refused_before_ray(monkeypatch, capsys, "finetune", method, "--data", str(dataset["dir"]),
                                      "--base", "tiny", "--out", str(out), *extra)
    assert code == 1 and expected in stderr, stderr[-2000:]
    assert not out.exists(), "a refused run left its --out behind (an empty folder in the adapter store)"


def test_a_rerun_that_would_train_the_rest_differently_is_refused_naming_each_flag(tmp_path):
    """Resuming with another --steps, --lr or --alpha trained the rest on the checkpoint's schedule with the new
    scaling, and recorded the new flags: a model of two runs. Where and how it runs may change."""
    import fsspec

    from actors.train.config import TrainConfig
    from jobs.errors import FinetuneError
    from jobs.finetune import _starts_afresh, _write_json, run_record

    fs, root = fsspec.core.url_to_fs(str(tmp_path / "lora"))
    fs.makedirs(root)
    first = TrainConfig(method="lora", data="d", base="tiny", out=root, steps=2)
    _write_json(fs, f"{root}/finetune.json", {**run_record(first, "fp", None), "config": first.model_dump()})
    again = first.model_copy(update={"steps": 4, "lr": 1e-2, "alpha": 64.0})
    with pytest.raises(FinetuneError, match=r"other settings \(--steps 2 there, 4 now; --lr 0.0001 there, 0.01 now; "
                                            r"--alpha 4 there, 64.0 now\); resuming it would train"):
        _starts_afresh(fs, root, run_record(again, "fp", None), again)
    # the defaults spelled out are the same run: they were refused as training "differently"
    spelled = first.model_copy(update={"lr": 1e-4, "alpha": 4.0, "lora_layers": "attention"})
    assert _starts_afresh(fs, root, run_record(spelled, "fp", None), spelled) is False
    # another method is said as such, not with what follows from it ("rank: 4 there, None now; lora_layers: ...")
    full = TrainConfig(method="full", data="d", base="tiny", out=root, steps=2)
    with pytest.raises(FinetuneError, match=r"holds another fine-tune \(the method 'lora' there, 'full' now\); use"):
        _starts_afresh(fs, root, run_record(full, "fp", None), full)
    moved = first.model_copy(update={"gradient_checkpointing": True, "checkpoint_every": 1, "max_failures": 0,
                                     "validation_prompts": ["a red star"]})
    assert _starts_afresh(fs, root, run_record(moved, "fp", None), moved) is False  # resumes it


def test_a_rerun_on_a_dataset_built_again_from_other_images_is_refused(tmp_path):
    """The dataset was compared by its path only: rebuilt in place from 64 other images between a Ctrl-C and the
    rerun, it resumed the first 120 steps' model on the new data. The same images built again still resume."""

    import fsspec

    from actors.train.config import TrainConfig
    from jobs.errors import FinetuneError
    from jobs.finetune import _starts_afresh, _write_json, run_record
    from manifests.dataset import dataset_fingerprint

    data = tmp_path / "data"
    write_images(tmp_path / "mine", 3, size=160, seed=4)
    build_dataset(str(tmp_path / "mine"), str(data), resolution=int(RES))
    fs, root = fsspec.core.url_to_fs(str(tmp_path / "lora"))
    fs.makedirs(root)
    cfg = TrainConfig(method="lora", data=str(data), base="tiny", out=root, steps=2)

    def record():
        return run_record(cfg, "fp", None, data_fingerprints=(dataset_fingerprint(str(data)), None))

    _write_json(fs, f"{root}/finetune.json", {**record(), "config": cfg.model_dump()})
    before = sorted(p.name for p in data.glob("*.parquet"))
    build_dataset(str(tmp_path / "mine"), str(data), resolution=int(RES))  # the same images built again
    assert sorted(p.name for p in data.glob("*.parquet")) != before  # parts are named by when they were written
    assert _starts_afresh(fs, root, record(), cfg) is False
    # the same images, two of their captions swapped: told by the bytes of its parts (their sizes, which were
    # compared, may well be the same: a QA run resumed on captions changed so)
    first, second = sorted((tmp_path / "mine").glob("*.txt"))[:2]
    texts = first.read_text(), second.read_text()
    assert texts[0] != texts[1]
    first.write_text(texts[1]), second.write_text(texts[0])
    recaptioned = tmp_path / "recaptioned"
    build_dataset(str(tmp_path / "mine"), str(recaptioned), resolution=int(RES))
    summary = json.loads((recaptioned / "_dataset.json").read_text())
    assert dataset_fingerprint(str(recaptioned)) == "content:" + summary["content_sha256"][:16]
    by_size = {k: v for k, v in summary.items() if k != "content_sha256"}  # a build from before the digest
    (tmp_path / "older").mkdir()
    for part in recaptioned.glob("*.parquet"):
        (tmp_path / "older" / part.name).write_bytes(part.read_bytes())
    (tmp_path / "older" / "_dataset.json").write_text(json.dumps(by_size))
    assert re.fullmatch(r"[0-9a-f]{16}", dataset_fingerprint(str(tmp_path / "older")))  # its parts' sizes, as before
    build_dataset(str(tmp_path / "mine"), str(data), resolution=int(RES))
    with pytest.raises(FinetuneError, match=r"the dataset at --data was built again since, from other images or capt"):
        _starts_afresh(fs, root, record(), cfg)
    write_images(tmp_path / "other", 3, size=160, seed=5)
    build_dataset(str(tmp_path / "other"), str(data), resolution=int(RES))
    with pytest.raises(FinetuneError, match=r"the dataset at --data was built again since, from other images"):
        _starts_afresh(fs, root, record(), cfg)
    # another dataset named: said as the path, not as a rebuild that never happened
    elsewhere = cfg.model_copy(update={"data": str(recaptioned)})
    with pytest.raises(FinetuneError) as said:
        _starts_afresh(fs, root, run_record(elsewhere, "fp", None, data_fingerprints=(
            dataset_fingerprint(str(recaptioned)), None)), elsewhere)
    assert f"--data {str(data)!r} there, {str(recaptioned)!r} now" in str(said.value)
    assert "built again" not in str(said.value), said.value
    legacy = {k: v for k, v in record().items() if k != "data_fingerprint"}  # a record from before: not compared
    _write_json(fs, f"{root}/finetune.json", {**legacy, "config": cfg.model_dump()})
    assert _starts_afresh(fs, root, record(), cfg) is False


def test_null_captions_are_counted_in_the_caption_column_itself(tmp_path):
    """The footer's statistics are per leaf column: a struct column before `caption` shifted the index, and a
    null in it was said to be a null caption."""
    from manifests.dataset import DatasetError, check_dataset

    meta = pa.array([{"a": 1, "b": None}, {"a": 2, "b": 3}], pa.struct([("a", pa.int64()), ("b", pa.int64())]))
    table = pa.table({"meta": meta, "caption": ["a mug", "a cup"], "image": [b"x", b"y"]})
    assert check_dataset(str(_parquet(tmp_path / "nested.parquet", table))) == 2
    nulls = table.set_column(1, "caption", pa.array(["a mug", None], pa.string()))
    with pytest.raises(DatasetError, match=r"has 1 row\(s\) whose `caption` is null"):
        check_dataset(str(_parquet(tmp_path / "nested-null.parquet", nulls)))
    # a writer that kept no statistics: the caption column is read (it passed, then failed every worker thrice)
    bare = tmp_path / "bare.parquet"
    pq.write_table(nulls, bare, write_statistics=False, row_group_size=1)
    assert pq.ParquetFile(bare).metadata.row_group(1).column(1).statistics is None
    with pytest.raises(DatasetError, match=r"has 1 row\(s\) whose `caption` is null"):
        check_dataset(str(bare))


def test_a_dataset_folder_served_over_http_is_read_part_by_part(http_folder):
    """Over HTTP a folder's listing page answers like a file: `--data http://host/ds/` was read as one Parquet
    file and refused as unreadable. A Spark-style folder named `.parquet` is a folder on a disk."""
    from manifests.dataset import check_dataset, dataset_fingerprint, read_dataset

    folder, url = http_folder
    table = pa.table({"caption": ["a mug", "a cup"], "image": [b"x", b"y"]})
    (folder / "ds").mkdir()
    _parquet(folder / "ds" / "part-0.parquet", table)
    _parquet(folder / "ds" / "part-1.parquet", table.slice(1))
    for uri in (f"{url}/ds/", f"{url}/ds", str(folder / "ds")):
        assert check_dataset(uri) == 3, uri
        assert read_dataset(uri)["caption"].to_pylist() == ["a mug", "a cup", "a cup"]
    assert dataset_fingerprint(f"{url}/ds/") == dataset_fingerprint(str(folder / "ds"))
    assert check_dataset(f"{url}/ds/part-1.parquet") == 1
    (folder / "ds").rename(folder / "ds.parquet")
    assert check_dataset(str(folder / "ds.parquet")) == 3


def test_a_training_row_whose_image_does_not_decode_is_named():
    """A hand-made dataset with one bad image failed in the worker with 'cannot identify image file
    <_io.BytesIO object at 0x...>', naming no row."""
    from actors.train.data import batch_tensors

    good = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(good, format="PNG")
    table = pa.table({"caption": ["a", "b"], "image": [good.getvalue(), b"garbage"]})
    assert batch_tensors(table, [0], None, 16, captions=False)[0].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match=r"dataset row 1 \(from 0, over the parts in order.*its image does not decode "
                                         r"\(not an image Pillow reads \(PNG, JPEG, WebP, \.\.\.\)\); rebuild"):
        batch_tensors(table, [0, 1], None, 16, captions=False)


def test_a_very_long_image_is_cropped_before_it_is_resized(monkeypatch):
    """square_crop resized a whole 2 x 6000 px image to 256 x 768,000 (0.9 GB) before cutting its centre out."""
    from manifests.dataset import square_crop

    made, resize = [], Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda im, size, *a, **k: made.append(size) or resize(im, size, *a, **k))
    tall = Image.new("RGB", (2, 6000), (0, 0, 0))
    tall.paste((250, 250, 250), (0, 2990, 2, 3010))  # a white band at the centre: all the crop shows
    square = square_crop(tall, 256)
    assert square.size == (256, 256) and np.asarray(square).min() > 200 and made == [(256, 256)]
    wide = Image.new("RGB", (300, 100), (0, 0, 0))
    wide.paste((255, 0, 0), (100, 0, 200, 100))
    assert np.asarray(square_crop(wide, 64))[8:-8, 8:-8].tolist() == [[[255, 0, 0]] * 48] * 48


def test_a_hand_made_datasets_images_are_read_as_dataset_build_reads_them():
    """Training read a dataset's images with a plain convert("RGB"): a cut-out's transparent background trained as
    black, 16-bit grey clipped to white, and a phone's sideways portrait stayed sideways."""
    from actors.train.data import batch_tensors

    def png(im, **save) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG", **save)
        return buf.getvalue()

    cut_out = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    cut_out.paste((200, 10, 10, 255), (4, 4, 12, 12))
    grey = Image.fromarray(np.full((16, 16), 20000, np.uint16))  # I;16: 20000/65535 is ~78/255
    sideways = Image.new("RGB", (16, 8), (0, 0, 0))
    sideways.paste((255, 255, 255), (0, 0, 8, 8))  # white on the left; turned upright (EXIF 6): white on top
    exif = sideways.getexif()
    exif[0x0112] = 6
    jpeg = io.BytesIO()
    sideways.save(jpeg, format="JPEG", exif=exif, quality=100)
    table = pa.table({"caption": ["a", "b", "c"], "image": [png(cut_out), png(grey), jpeg.getvalue()]})
    pixels, _ = batch_tensors(table, [0, 1, 2], None, 16, captions=False)
    rgb = ((pixels.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round()
    assert (rgb[0, 0, 0] == 255).all() and (rgb[0, 8, 8] == [200, 10, 10]).all()  # white around, not black
    assert abs(rgb[1, 8, 8, 0] - 78) <= 1  # not clipped to 255
    top, bottom = rgb[2, :4].mean(), rgb[2, -4:].mean()
    assert top > 200 and bottom < 60, (top, bottom)  # upright: the white half on top
    # 32-bit integers of 0..255 (no scale to go by; the build skips them) are named, not trained on as black
    dark = io.BytesIO()
    Image.fromarray(np.full((16, 16), 200, np.int32)).save(dark, format="TIFF")
    with pytest.raises(ValueError, match=r"dataset row 0 .*: its image is 32-bit integer pixels from 200 to 200: not "
                                         r"16-bit data"):
        batch_tensors(pa.table({"caption": ["d"], "image": [dark.getvalue()]}), [0], None, 16, captions=False)


def test_an_error_in_the_inputs_is_not_retried_by_loading_the_model_again(tmp_path):
    """Ray Train retries a failed run --max-failures times from its newest checkpoint; an image that does not
    decode failed each attempt the same way, after loading the model and starting the workers again (minutes
    per attempt on SD 2.1), and the terminal said Ray's last words. The first attempt writes the error down,
    the retries stop before loading anything, and the driver says the row."""
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, format="PNG")
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"caption": ["a red square"] * 4, "image": [good.getvalue(), b"garbage"] * 2}),
                   data / "part-0.parquet")
    out = tmp_path / "out"
    proc = sdfleet("finetune", "lora", "--data", str(data), "--base", "tiny", "--out", str(out), "--steps", "2",
                   "--workers", "1", "--batch-size", "2", "--resolution", "64", "--cache-latents",
                   "--max-failures", "2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "training stopped: dataset row 1 (from 0" in last and "its image does not decode" in last, last
    assert "resume" not in last  # a rerun would meet it again: the message says what to mend instead
    log = next((out / "logs").glob("finetune-*.log")).read_text()
    assert log.count("trainable parameters") == 1  # the model loaded once, by the first attempt
    assert log.count("RuntimeError: an earlier attempt of this run stopped on an error a retry meets again") >= 2
    assert not (out / "checkpoints" / "fatal_error.json").exists()  # a rerun, once mended, starts afresh


def test_a_finished_fine_tune_is_trained_again_only_where_its_rerun_would_change_something(tmp_path):
    """The same command after a finished run trains nothing; but new --validation-prompts (drawn at the end of a
    rerun) or a published file cut short since (published again by a rerun) are still a rerun's to do."""
    import fsspec
    from safetensors.torch import save_file

    from actors.train.config import TrainConfig
    from jobs.finetune import _as_recorded, _finished

    out = tmp_path / "mug-style"
    out.mkdir()
    cfg = TrainConfig(method="lora", data=str(tmp_path / "d"), base="tiny", out=str(out))
    record = {"status": "finished", "steps": cfg.steps, "config": _as_recorded(cfg.model_dump())}
    (out / "finetune.json").write_text(json.dumps(record))
    fs = fsspec.filesystem("file")
    assert _finished(fs, str(out), cfg) is None  # nothing published
    save_file({"a": torch.zeros(4, 4)}, str(out / "pytorch_lora_weights.safetensors"))
    assert _finished(fs, str(out), cfg) == record
    assert _finished(fs, str(out), cfg.model_copy(update={"validation_prompts": ["a mug"]})) is None
    assert _finished(fs, str(out), cfg.model_copy(update={"validation_guidance": 3.0})) is None
    # a record written before a flag existed (--validation-guidance: 7.5, its default) is still this fine-tune
    older = {**record, "config": {k: v for k, v in record["config"].items() if k != "validation_guidance"}}
    (out / "finetune.json").write_text(json.dumps(older))
    assert _finished(fs, str(out), cfg) == older
    assert _finished(fs, str(out), cfg.model_copy(update={"validation_guidance": 3.0})) is None  # drew at 7.5
    (out / "finetune.json").write_text(json.dumps(record))
    weights = out / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert _finished(fs, str(out), cfg) is None
    full = cfg.model_copy(update={"method": "full"})  # a model: each component's weights are checked
    (out / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"],
                                                      "safety_checker": [None, None]}))
    (out / "unet").mkdir()
    save_file({"w": torch.zeros(8)}, str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    (out / "finetune.json").write_text(json.dumps({**record, "config": _as_recorded(full.model_dump())}))
    assert _finished(fs, str(out), full) is not None
    unet = out / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-1])
    assert _finished(fs, str(out), full) is None


def test_an_error_note_is_read_only_by_the_run_that_wrote_it(tmp_path, monkeypatch):
    """A note the driver could not clear (on a worker's own disk) stopped every later run into that --out; and a
    store that refused the note's write replaced the error being noted."""
    import manifests.ledger
    from actors.train.stored import clear_fatal, fatal_error, note_fatal

    out = str(tmp_path / "tune")
    note_fatal(out, "dataset row 3: its image does not decode", run="run-1")
    assert fatal_error(out, "run-1") == "dataset row 3: its image does not decode"
    assert fatal_error(out, "run-2") is None  # a later run of the driver: not its error
    clear_fatal(out)
    clear_fatal(out)  # nothing to clear: fine
    assert fatal_error(out, "run-1") is None

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(manifests.ledger, "atomic_write", refused)
    note_fatal(out, "dataset row 3: its image does not decode", run="run-3")  # said by the caller, not this
    assert fatal_error(out, "run-3") is None


def test_a_rerun_may_spell_a_local_folder_as_a_path_or_a_file_uri(tmp_path):
    """--data /x and --data file:///x are one dataset: the rerun was refused as 'another fine-tune (data: ...)',
    also against a finetune.json that recorded the file:// spelling."""
    import json

    import fsspec

    from actors.train.config import TrainConfig
    from jobs.finetune import _starts_afresh, _write_json, run_record

    fs, root = fsspec.core.url_to_fs(str(tmp_path / "lora"))
    fs.makedirs(root)
    data = tmp_path / "data"
    first = TrainConfig(method="lora", data=str(data), base="tiny", out=root, steps=2)
    _write_json(fs, f"{root}/finetune.json", {**run_record(first, "fp", None), "config": first.model_dump()})
    again = TrainConfig(method="lora", data=f"file://{data}/", base="tiny", out=f"file://{root}", steps=2)
    assert (again.data, again.out) == (str(data), root)
    assert _starts_afresh(fs, root, run_record(again, "fp", None), again) is False  # resumes it
    (tmp_path / "lora" / "finetune.json").write_text(json.dumps(
        {**run_record(first, "fp", None), "data": f"file://{data}", "config": first.model_dump()}))
    assert _starts_afresh(fs, root, run_record(first, "fp", None), first) is False
    # the class images a prior-preservation run draws into --out/class-data: recorded, and compared, as either
    for drawn in (f"file://{root}/class-data", f"{root}/class-data"):
        for recorded in (f"file://{root}/class-data", f"{root}/class-data"):
            _write_json(fs, f"{root}/finetune.json", {**run_record(first, "fp", recorded),
                                                      "config": first.model_dump()})
            assert _starts_afresh(fs, root, run_record(first, "fp", drawn), first) is False, (drawn, recorded)


def test_a_run_that_failed_before_its_first_checkpoint_does_not_hold_the_next_to_its_flags(tmp_path):
    """--gpu on a machine without one failed after finetune.json was written, and the corrected command was then
    refused as 'a fine-tune with other settings (--gpu True there, False now)', with nothing there to resume."""
    import fsspec

    from actors.train.config import TrainConfig
    from jobs.errors import FinetuneError
    from jobs.finetune import _starts_afresh, _write_json, run_record

    fs, root = fsspec.core.url_to_fs(str(tmp_path / "lora"))
    fs.makedirs(root)
    first = TrainConfig(method="lora", data="d", base="tiny", out=root, steps=2, gpu=True)
    _write_json(fs, f"{root}/finetune.json", {**run_record(first, "fp", None), "status": "failed",
                                              "config": first.model_dump()})
    fixed = first.model_copy(update={"gpu": False})
    assert _starts_afresh(fs, root, run_record(fixed, "fp", None), fixed) is True
    fs.makedirs(f"{root}/checkpoints/checkpoint_2026-12-06_10-00-00.000000")  # it had trained: held to its flags
    with pytest.raises(FinetuneError, match=r"other settings \(--gpu True there, False now\)"):
        _starts_afresh(fs, root, run_record(fixed, "fp", None), fixed)
    for damaged in ("{not json", "[]"):  # were a JSONDecodeError and an AttributeError traceback
        (tmp_path / "lora" / "finetune.json").write_text(damaged)
        with pytest.raises(FinetuneError, match=r"holds a finetune.json that is not a fine-tune's record \((JSON|list)"):
            _starts_afresh(fs, root, run_record(fixed, "fp", None), fixed)


def test_a_seed_past_what_torch_takes_is_refused_and_a_large_one_trains():
    """--seed 2147483647 passed the config, then failed in every worker (torch's seed overflowed)."""
    from pydantic import ValidationError

    from actors.train.config import TrainConfig
    from actors.train.data import step_generator

    for bad in (-1, 2**63):
        with pytest.raises(ValidationError, match="seed"):
            TrainConfig(method="lora", data="d", base="tiny", out="o", seed=bad)
    big = TrainConfig(method="lora", data="d", base="tiny", out="o", seed=2**63 - 1).seed
    assert step_generator(big, 5, 0, 1).initial_seed() != step_generator(big, 6, 0, 1).initial_seed()
    assert step_generator(2147483647, 1, 0, 0).initial_seed() == ((2147483647 * 1_000_003 + 1) * 1_009 * 1_013) % 2**64


def test_a_dataset_built_smaller_than_the_training_size_is_said(dataset, capsys):
    from jobs.finetune import _note_upscaling

    _note_upscaling(str(dataset["dir"]), int(RES) * 2)
    assert f"was built at {RES} px and this trains at {int(RES) * 2} px, so every image is upscaled 2x" in \
        capsys.readouterr().err
    _note_upscaling(str(dataset["dir"]), int(RES))
    assert capsys.readouterr().err == ""


# -- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A fine-tune of tiny by every method, then one `generate` run drawing base and each output side by side."""
    base = tmp_path_factory.mktemp("trained")
    full, lora, vae, gem = base / "full", base / "store" / "shapes-lora", base / "vae", base / "store" / "gem"
    dreambooth = base / "dreambooth"
    # textual inversion learns a new word from captions that use it (the dataset is built in this process:
    # `dataset build`'s CLI has tests of its own)
    write_images(base / "gem-images", 8, size=160, seed=2, shapes=["star"])
    for caption in (base / "gem-images").glob("*.txt"):
        caption.write_text("a <gem> on a " + caption.read_text().split(" on a ", 1)[1])
    build_dataset(str(base / "gem-images"), str(base / "gem-data"), resolution=int(RES))
    procs = sdfleet_side_by_side({
        # full trains from the random init: the trained tiny already fits these images, so 8 steps at a
        # high lr are no test of whether the harness learns
        "full": ["finetune", "full", "--data", str(dataset["dir"]), "--base", "tiny-random", "--out", str(full),
                 "--steps", "8", "--lr", "2e-3", "--checkpoint-every", "4", "--cache-latents", *TRAIN],
        # lr 1e-2: the trained tiny already fits these images, and at 3e-2 the eval loss rose (0.034 -> 0.037)
        # relative --data and --out (the runs start in the checkout): Ray's workers start elsewhere, so the
        # driver must make them absolute, or the LoRA lands in Ray's session folder and the data is not found
        "lora": ["finetune", "lora", "--data", os.path.relpath(dataset["dir"], REPO), "--base", "tiny",
                 "--out", os.path.relpath(lora, REPO),
                 "--steps", "8", "--lr", "1e-2", "--rank", "4", "--checkpoint-every", "4", *TRAIN],
        # prior preservation: tiny-random draws 4 class images (noise), trained on beside the instances
        "dreambooth": ["finetune", "dreambooth", "--data", str(dataset["dir"]), "--base", "tiny-random",
                 "--out", str(dreambooth), "--class-prompt", CLASS_PROMPT,
                 "--class-prompt", CLASS_PROMPT_2, "--class-images", "4", "--steps", "8", "--lr", "2e-3",
                 "--checkpoint-every", "4", "--cache-latents", *TRAIN],
        "vae": ["finetune", "vae", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(vae),
                 "--steps", "8", "--lr", "1e-3", "--crop", "64", "--checkpoint-every", "4", "--calibrate-scale",
                 *TRAIN],
        # the word starts as "circle" for images of stars, so there is something to learn: started as "star",
        # which tiny already draws, the eval loss had nowhere to go and rose 1% in 8 steps. lr 2e-2: on the
        # committed tiny, 5e-3 and 1e-2 moved the eval loss under 1% and not at every step
        "textual-inversion": ["finetune", "textual-inversion", "--data", str(base / "gem-data"), "--base", "tiny",
                 "--out", str(gem), "--token", "<gem>", "--init-word", "circle", "--vectors", "2",
                 "--steps", "8", "--lr", "2e-2", "--checkpoint-every", "4", *TRAIN],
    })
    prompt = {"prompt": "a red circle on a white background", "seed": 5, "steps": 4, "width": 256, "height": 256}
    manifest = write_manifest(base / "m.parquet", [
        {"id": "base", **prompt}, {"id": "full", **prompt, "model": "tuned"},
        {"id": "lora", **prompt, "adapters": [{"name": "shapes-lora", "scale": 1.0}]},
        {"id": "vae", **prompt, "model": "newvae"}, {"id": "dreambooth", **prompt, "model": "dreambooth"},
        # the token's two vectors start as "circle" twice: untrained, the two rows would draw the same pixels
        {"id": "gem", **prompt, "prompt": "a <gem> on a white background", "adapters": [{"name": "gem", "scale": 1.0}]},
        {"id": "gem-init", **prompt, "prompt": "a circle circle on a white background"}])
    out = base / "gen"
    gen = sdfleet("generate", str(manifest), "--out", str(out), "--model", f"tuned={full}", "--model", f"newvae={vae}",
                  "--model", f"dreambooth={dreambooth}",
                  "--adapters", str(base / "store"), "--no-watermark")
    return {"full": full, "lora": lora, "vae": vae, "textual-inversion": gem, "dreambooth": dreambooth,
            "procs": procs, "gen": gen, "out": out}


@pytest.mark.parametrize("method", ["full", "lora", "dreambooth", "vae", "textual-inversion"])
def test_training_runs_and_its_loss_falls(trained, method):
    proc, out = trained["procs"][method], trained[method]
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["eval_loss"]) for r in rows)
    # the eval loss uses a fixed batch, noise and timesteps: it falls only if the model learns (frozen, it
    # would repeat to the last digit). Textual Inversion's two vectors of one new word must move it at every
    # step, from the wrong start towards the stars (8 steps took it down 15% on the committed tiny).
    evals = [r["eval_loss"] for r in rows]
    if method == "textual-inversion":
        assert all(b <= a for a, b in zip(evals, evals[1:])), evals
    assert evals[-1] < evals[0] * 0.97, evals
    started = train_log(out)[0]
    assert started["event"] == "started" and started["workers"] == 2
    finished = train_log(out)[-1]
    assert finished["event"] == "finished" and len(finished["peak_rss_mb_per_worker"]) == 2
    validation = sorted((out / "validation" / "step-000008").glob("*.png"))
    if method == "vae":  # round trips: each of the first 4 images beside its reconstruction
        assert len(validation) == 4 and Image.open(validation[0]).size == (2 * int(RES), int(RES))
    else:  # the two default validation prompts, drawn
        assert len(validation) == 2
    assert json.loads((out / "finetune.json").read_text())["status"] == "finished"
    if method == "full":  # trained on cached latents, gathered from both workers
        assert "cached the latents of 8 images" in proc.stdout + proc.stderr


def test_calibrate_scale_gives_the_trained_vae_unit_variance_latents(trained, dataset):
    from diffusers import AutoencoderKL

    from actors.train.data import batch_tensors
    from actors.train.model import latent_scale
    from manifests.dataset import read_dataset

    finished = train_log(trained["vae"])[-1]
    vae = AutoencoderKL.from_pretrained(trained["vae"] / "vae", use_safetensors=True).eval()
    assert vae.config.scaling_factor == pytest.approx(finished["scaling_factor"]) != 0.18215
    table = read_dataset(str(dataset["dir"]))
    pixels, _ = batch_tensors(table, list(range(table.num_rows)), None, int(RES), captions=False)
    assert latent_scale(vae, pixels) == pytest.approx(vae.config.scaling_factor, rel=1e-5)
    with torch.no_grad():  # what training draws: posterior samples, scaled; other noise than the calibration's
        posterior = vae.encode(pixels).latent_dist
        sample = posterior.sample(torch.Generator().manual_seed(11)) * vae.config.scaling_factor
    assert 0.9 < sample.std().item() < 1.1


def test_textual_inversion_writes_only_the_new_vectors(trained):
    from safetensors.torch import load_file

    from actors.presets import build_preset

    out = trained["textual-inversion"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["learned_embeds.safetensors"]
    vectors = load_file(out / "learned_embeds.safetensors")
    pipe = build_preset("tiny")
    circle_id = pipe.tokenizer("circle", add_special_tokens=False).input_ids[0]  # the init word
    circle = pipe.text_encoder.get_input_embeddings().weight[circle_id]
    assert list(vectors) == ["<gem>"] and vectors["<gem>"].shape == (2, circle.shape[0])
    assert all(not torch.allclose(vector, circle) for vector in vectors["<gem>"])  # both moved from the init word
    checkpoint = max(p for p in (out / "checkpoints").glob("checkpoint_*") if p.is_dir())
    trainable = load_file(checkpoint / "trainable.safetensors")  # the new vectors alone, not the whole table
    assert [t.shape for t in trainable.values()] == [(2, circle.shape[0])]
    proc = trained["procs"]["textual-inversion"]
    assert "trainable parameters" in proc.stdout + proc.stderr


def test_full_writes_a_diffusers_model_and_lora_writes_an_adapter(trained):
    full, lora = trained["full"], trained["lora"]
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (full / component).is_dir()
    assert list((full / "unet").glob("*.safetensors")) and not list(full.rglob("*.bin"))
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    from safetensors.torch import load_file

    keys = load_file(lora / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("unet.") for k in keys)
    assert "trainable parameters" in trained["procs"]["lora"].stdout + trained["procs"]["lora"].stderr


def test_a_fine_tune_prints_its_own_progress_and_sends_ray_and_the_workers_to_its_log(trained):
    proc = trained["procs"]["lora"]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("[sdfleet] ")]
    assert [line for line in ours if " step " in line][-1].startswith("[sdfleet] step 8/8 loss ")
    assert "[sdfleet] lora: 28,672 trainable parameters" in ours and ours[-1].startswith("[sdfleet] done in")
    assert ours[-1].endswith(f"lora written to {trained['lora']}"), ours[-1]  # a path, as given (was file:///...)
    assert any(line.startswith("[sdfleet] wrote the LoRA to ") for line in ours)
    terminal = proc.stdout + proc.stderr
    for noise in ("RayTrainWorker", "TrainController", "Reporting training result", "Token authentication"):
        assert noise not in terminal, noise
    assert [line for line in terminal.splitlines() if not line.startswith("[sdfleet] ")] == []
    (log_file,) = (trained["lora"] / "logs").glob("finetune-*.log")
    assert str(log_file) in proc.stderr and "Token authentication" in log_file.read_text()
    # the workers' and Ray Train's own lines (a failed worker's traceback among them) were in no file at all
    said = log_file.read_text()
    assert "Started training worker group" in said and "(RayTrainWorker pid=" in said, said[-3000:]
    # each once: Ray Train's print tees a worker's line to stdout and logs it on stderr, and Ray streams both
    worker_lines = [line.split(") ", 1)[1] for line in said.splitlines() if "(RayTrainWorker pid=" in line]
    assert worker_lines.count("[finetune] lora: 28,672 trainable parameters") == 1, said[-3000:]


def test_dreambooth_draws_its_class_images_and_trains_on_both(trained):
    from actors.png import read_png_parameters

    out, proc = trained["dreambooth"], trained["procs"]["dreambooth"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the class images came from the generation actors (a ledger, no watermark) and became a dataset
    assert sorted(p.name for p in (out / "class-images" / "images").glob("*.png")) == [
        f"class-{i:05d}.png" for i in range(4)]
    assert {e["status"] for e in ledger(out / "class-images")} == {"ok"}
    class_data = json.loads((out / "class-data" / "_dataset.json").read_text())
    assert class_data["rows"] == 4 and not class_data["skipped"]
    assert "prior preservation: 4 class images" in proc.stderr
    # each step trains as many class samples as instance samples: the start line said only the instances
    assert re.search(r"global batch (\d+) \(\+ \1 class samples: prior preservation from .*class-data\)",
                     proc.stderr), proc.stderr[-3000:]
    record = json.loads((out / "finetune.json").read_text())
    assert record["class_prompts"] == [CLASS_PROMPT, CLASS_PROMPT_2] and record["class_data"].endswith("class-data")
    # two class prompts: the images take them in turn, and each image's caption is its own prompt
    captions = [json.loads(line) for line in (out / "class-images" / "captions.jsonl").read_text().splitlines()]
    assert [c["caption"] for c in captions] == [CLASS_PROMPT, CLASS_PROMPT_2] * 2
    for c in captions:  # the caption is what the base was asked to draw in that image
        png = (out / "class-images" / "images" / c["file"]).read_bytes()
        assert read_png_parameters(png)["prompt"] == c["caption"]
    assert record["prior_loss_weight"] == 1.0
    started = train_log(out)[0]  # the workers read the 4 class rows beside the 8 instance rows
    assert started["config"]["class_data"] == record["class_data"] and started["class_rows"] == 4
    # the validation images show the subject and the class
    prompts = [read_png_parameters(p.read_bytes())["prompt"]
               for p in sorted((out / "validation" / "step-000008").glob("*.png"))]
    assert prompts[1] == CLASS_PROMPT and prompts[0] != CLASS_PROMPT
    assert (out / "unet").is_dir() and not list(out.rglob("*.bin"))  # a whole model, like full


def test_generate_loads_both_outputs_and_they_change_the_image(trained):
    gen, out = trained["gen"], trained["out"]
    assert gen.returncode == 0, gen.stderr[-3000:]
    names = ("base", "full", "lora", "vae", "dreambooth", "gem", "gem-init")
    assert {e["id"]: e["status"] for e in ledger(out)} == {name: "ok" for name in names}
    images = {name: pixels(out / "images" / f"{name}.png") for name in names}
    for a, b in (("base", "full"), ("base", "lora"), ("full", "lora"), ("base", "vae"), ("base", "dreambooth"),
                 ("full", "dreambooth"), ("gem", "gem-init")):
        assert np.abs(images[a] - images[b]).mean() > 2, f"{a} and {b} look the same"


def test_a_rerun_with_other_flags_or_into_a_generate_output_is_refused(trained, dataset):
    proc = sdfleet("finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(trained["lora"]),
                   "--rank", "8", "--lora-layers", "all", "--steps", "8", *TRAIN)
    assert proc.returncode == 1
    assert "holds another fine-tune" in proc.stderr and "--rank 4 there, 8 now" in proc.stderr
    assert "--lora-layers 'attention' there, 'all' now" in proc.stderr
    # nor into a generate run's output, where the model's files would mix with the images and the ledger
    proc = sdfleet("finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(trained["out"]),
                   "--steps", "8", *TRAIN)
    assert proc.returncode == 1 and "holds a `generate` run's output" in proc.stderr, proc.stderr[-2000:]
    assert not (trained["out"] / "finetune.json").exists()


@pytest.mark.parametrize("legacy, now, resumes", [
    ({"class_prompt": None}, [], True),                   # a run without prior preservation
    ({"class_prompts": []}, [], True),                    # an empty list, as written for a while
    ({"class_prompt": "a mug"}, ["a mug"], True),         # one class prompt, written as a string then
    ({"class_prompt": "a mug"}, ["a mug", "a cup"], False),
])
def test_a_run_recorded_before_class_prompt_repeated_still_resumes(legacy, now, resumes, tmp_path):
    import fsspec

    from actors.train.config import TrainConfig
    from jobs.finetune import FinetuneError, _starts_afresh, run_record

    cfg = TrainConfig(method="dreambooth" if now else "lora", data=str(tmp_path), base="tiny", out=str(tmp_path),
                      class_prompts=now)
    record = run_record(cfg, "fp", None)
    before = {k: v for k, v in record.items() if k != "class_prompts"} | legacy  # and no "config": not compared
    (tmp_path / "finetune.json").write_text(json.dumps(before))
    fs = fsspec.filesystem("file")
    if resumes:
        _starts_afresh(fs, str(tmp_path), record, cfg)
    else:
        with pytest.raises(FinetuneError, match="--class-prompt \\['a mug'\\] there"):
            _starts_afresh(fs, str(tmp_path), record, cfg)


def test_a_class_image_left_from_another_prompt_is_not_trained_on(tmp_path, capsys):
    """A rerun with other class prompts redraws the images; one whose redraw failed still holds the old
    prompt's picture, and must not be captioned with the new prompt."""
    import fsspec
    import numpy as np

    from actors.png import png_bytes
    from jobs.finetune import current_class_images

    (tmp_path / "images").mkdir()
    for i, prompt in (("class-00000", "a red mug"), ("class-00001", "a blue cup")):
        (tmp_path / "images" / f"{i}.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8), {"prompt": prompt}))
    wanted = {"class-00000": "a red mug", "class-00001": "a blue mug"}
    assert current_class_images(fsspec.filesystem("file"), str(tmp_path), wanted) == {"class-00000": "a red mug"}
    assert "1 class image(s) were drawn from another prompt" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_lora_on_a_gpu(dataset, tmp_path, precision):
    out = tmp_path / "lora"
    proc = sdfleet("finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(out),
                   "--gpu", "--workers", "1", "--mixed-precision", precision, "--steps", "6", "--lr", "1e-2",
                   "--batch-size", "2", "--resolution", RES, "--log-every", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(out)
    assert all(np.isfinite(r["loss"]) for r in rows)
    from safetensors.torch import load_file

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights are what is saved


def test_fsdp_matches_ddp(trained, dataset, tmp_path):
    """Sharded training is the same maths as DDP. (A killed FSDP run resuming from its checkpoint:
    tests/test_s3.py, with the checkpoints in a bucket.)"""
    out = tmp_path / "fsdp"
    proc = sdfleet("finetune", "full", "--data", str(dataset["dir"]), "--base", "tiny-random", "--out", str(out),
                   "--lr", "2e-3", "--checkpoint-every", "4", *TRAIN, "--fsdp", "--steps", "8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp, fsdp = metrics(trained["full"]), metrics(out)
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp]
    for a, b in zip(ddp, fsdp):  # same data, noise and init: sharding changes the float order, not the maths
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-2), (a, b)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_every_training_option_runs_together(dataset, tmp_path):
    """EMA, accumulation, gradient checkpointing, min-SNR, noise offset, caption dropout, warm-up and the text encoder."""
    out = tmp_path / "all"
    proc = sdfleet("finetune", "full", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(out),
                   "--workers", "1", "--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--resolution", RES,
                   "--ema-decay", "0.9", "--gradient-checkpointing", "--min-snr-gamma", "5", "--noise-offset", "0.05",
                   "--caption-dropout", "0.5", "--warmup-steps", "2", "--train-text-encoder", "--log-every", "2", "--checkpoint-every", "2",
                   "--validation-prompt", "a blue star on a black background", "--validate-every", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)
    # the lr each logged step trained at (the next step's was logged: the last line said 0). full's default 1e-5:
    # steps 1, 2 warm up (0.5e-5, 1e-5), step 3 is the cosine's top, step 4 halfway down it (to 0 after it)
    assert rows[0]["lr"] == pytest.approx(1e-5) and rows[1]["lr"] == pytest.approx(0.5e-5)
    config = train_log(out)[0]["config"]
    assert config["grad_accum"] == 2 and config["ema_decay"] == 0.9 and config["train_text_encoder"]
    assert config["caption_dropout"] == 0.5
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002", "step-000004"]
    checkpoint = sorted(p for p in (out / "checkpoints").glob("checkpoint_*") if p.is_dir())[-1]
    assert (checkpoint / "ema.safetensors").is_file()
    from safetensors.torch import load_file

    trained = load_file(checkpoint / "trainable.safetensors")
    assert any(k.startswith("text_encoder.") for k in trained) and any(k.startswith("unet.") for k in trained)


def test_caption_dropout_trains_some_samples_on_the_empty_prompt():
    """With caption dropout, the UNet sees the empty prompt's ids for about that share of samples."""
    from diffusers import DDIMScheduler

    from actors.presets import PRESETS, build_preset
    from actors.train.config import TrainConfig
    from actors.train.loop import _diffusion_step

    pipe = build_preset("tiny")
    scheduler = DDIMScheduler(**{k: v for k, v in PRESETS["tiny"]["scheduler"].items() if k != "_class_name"})
    ids = pipe.tokenizer(["a red star on a gray background"] * 64, padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    empty = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    seen = []

    def model(noisy, timesteps, input_ids):
        seen.append(input_ids)
        return torch.zeros_like(noisy)

    mean, std = torch.zeros(64, 4, 2, 2), torch.ones(64, 4, 2, 2)
    for dropout in (0.0, 0.5):
        cfg = TrainConfig(method="full", data="d", base="tiny", out="o", caption_dropout=dropout)
        _diffusion_step(cfg, pipe, model, scheduler, mean, std, ids, torch.Generator().manual_seed(0))
    dropped = [(batch == empty).all(dim=1).sum().item() for batch in seen]
    assert dropped[0] == 0 and 20 <= dropped[1] <= 44, dropped
    kept = ~(seen[1] == empty).all(dim=1)
    assert torch.equal(seen[1][kept], ids[kept]), "samples not dropped keep their own caption"


def test_cached_latents_train_exactly_like_encoding_every_step(dataset):
    """The cache holds each row's posterior; a step drawn from it is the step that encoding the batch gives."""
    from diffusers import DDPMScheduler

    from actors.train.config import TrainConfig
    from actors.train.data import batch_tensors, encode_dataset
    from actors.train.loop import _diffusion_step
    from actors.train.model import Denoiser
    from manifests.dataset import read_dataset

    pipe = build_tiny()
    table = read_dataset(str(dataset["dir"]))
    cfg = TrainConfig(method="full", data="d", base="tiny", out="o", batch_size=3, resolution=int(RES), cache_latents=True)
    cache = encode_dataset(cfg, table, pipe.vae, torch.device("cpu"), rank=0, world=1)
    assert cache["mean"].shape == (table.num_rows, 4, int(RES) // 8, int(RES) // 8)
    rows = [5, 0, 2, 5]
    pixels, ids = batch_tensors(table, rows, pipe.tokenizer, int(RES))
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    torch.testing.assert_close(cache["mean"][rows], posterior.mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache["std"][rows], posterior.std, rtol=1e-4, atol=1e-5)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    model = Denoiser(pipe.unet, pipe.text_encoder)
    with torch.no_grad():
        losses = [_diffusion_step(cfg, pipe, model, noise_scheduler, mean, std, ids, torch.Generator().manual_seed(7))
                  for mean, std in ((posterior.mean, posterior.std), (cache["mean"][rows], cache["std"][rows]))]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-4)


def build_tiny():
    from actors.presets import build_preset

    return build_preset("tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_fine_tune_that_stops_before_training_says_failed_in_finetune_json(dataset, tmp_path, capsys, monkeypatch):
    """`--gpu` where Ray finds no GPU stops once Ray is up: one line, exit 1, and finetune.json says `failed`
    with that line (it said `starting` for good). (Where sdfleet can count a local Ray's GPUs before starting it,
    the run is refused before --out is made: that count is taken away here.)"""
    import jobs.finetune as finetune
    from jobs.cli import main

    monkeypatch.setattr(finetune, "local_resources", lambda num_cpus=None: None)
    out = tmp_path / "tune"
    code = main(["finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(out), "--gpu"])
    err = capsys.readouterr().err
    assert code == 1 and "--gpu: this machine has no GPU Ray can use" in err and "Traceback" not in err, err[-2000:]
    record = json.loads((out / "finetune.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("--gpu: this machine has no GPU"), record


@pytest.mark.parametrize("flags, local, said", [
    (["--gpu"], {"CPU": 2.0, "GPU": 0.0}, "--gpu: this machine has no GPU Ray can use"),
    (["--gpu", "--workers", "2"], {"CPU": 8.0, "GPU": 1.0}, "--gpu: --workers 2 needs 2 GPUs (one each)"),
    (["--workers", "4"], {"CPU": 2.0, "GPU": 0.0}, "--workers 4 needs 1 CPU(s) each; the cluster has 2: give "
                                                  "--workers 2 or fewer"),
])
@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_workers_a_local_ray_cannot_place_are_refused_before_anything(
        flags, local, said, method, dataset, tmp_path, monkeypatch, capsys):
    """The class images were drawn first (minutes of `generate`, or its error about --device and --actors,
    flags the fine-tune does not have) and only then were --gpu and --workers found to be impossible; and any
    method's --out was made (finetune.json saying failed, a log) in the adapter store, though a refused run leaves
    none."""
    import jobs.finetune as finetune
    from jobs.cli import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(finetune, "local_resources", lambda num_cpus=None: dict(local))
    monkeypatch.setattr(finetune, "draw_class_images", lambda *a, **k: pytest.fail("drew the class images first"))
    out = tmp_path / "tune"
    prior = ["--class-prompt", "a photo of a star"] if method == "dreambooth" else []
    monkeypatch.setattr(finetune, "connect", lambda *a, **k: pytest.fail("Ray was started"))
    code = main(["finetune", method, "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(out), *prior,
                 *flags])
    err = capsys.readouterr().err
    assert code == 1 and said in err and "Traceback" not in err, err[-2000:]
    assert "samples repeat within a step" not in err, "a note on the global batch of workers that cannot be placed"
    assert not out.exists()


def test_local_resources_are_what_a_local_ray_finds(monkeypatch):
    """The count the check above relies on is Ray's own: this machine's CPUs and the GPUs Ray detects."""
    import os

    from cluster.connect import connect, disconnect, local_resources

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    predicted = local_resources()
    assert predicted == {"CPU": float(os.cpu_count()), "GPU": predicted["GPU"]}
    resources = connect(quiet=True)
    try:
        assert predicted == {"CPU": resources["CPU"], "GPU": resources.get("GPU", 0.0)}
    finally:
        disconnect()


def test_ctrl_c_stops_a_fine_tune_with_exit_130_and_the_rerun_resumes(dataset, tmp_path, monkeypatch, capsys):
    """Ctrl-C reaches Ray Train's own handler, which aborts the run and exits 1 with nothing said; sdfleet
    says it was interrupted and how to resume, exits 130, and finetune.json no longer says "running"."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "tune"
    argv = ["finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(out), "--steps", "16",
            "--checkpoint-every", "4", "--batch-size", "2", "--resolution", RES, "--log-every", "1"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs", *argv], cwd=REPO, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "checkpoints" / "checkpoint_manager_snapshot.json").exists():
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, (tmp_path / "run.log").read_text()[-3000:]
    said = (tmp_path / "run.log").read_text()
    assert f"sdfleet: interrupted; checkpoints are in {out}/checkpoints, rerun the same command to resume" in said
    assert json.loads((out / "finetune.json").read_text())["status"] == "interrupted"
    assert "resuming" not in said and "done" not in said, said[-3000:]  # stopped well before its 16 steps
    from actors.train.stored import stored_checkpoints

    newest = stored_checkpoints(str(out))[0][0]  # whether or not Ray's own record had it yet
    again = sdfleet(*argv)  # the same flags: another --steps would train the rest on another schedule (refused)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from the checkpoint at step {newest}\n" in again.stderr, (newest, again.stderr[-3000:])
    kept = [p for p in (out / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    assert len(kept) == 2, kept  # Ray keeps 2; one it never recorded is gone too
    # once finished, the same command trains nothing: it said "resuming", started Ray, drew the validation
    # images and published the same files again
    published = (out / "pytorch_lora_weights.safetensors").stat().st_mtime_ns
    code, stderr = refused_before_ray(monkeypatch, capsys, *argv)  # (fails the test if Ray is started)
    assert code == 0 and "nothing to train: " in stderr and "holds this fine-tune, finished at step 16" in stderr
    assert (out / "pytorch_lora_weights.safetensors").stat().st_mtime_ns == published


@pytest.mark.parametrize("cause", [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)",
    "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory",
    "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory.",
])
def test_a_worker_out_of_memory_is_told_the_flags_that_need_less(cause):
    from actors.train.config import TrainConfig
    from jobs.finetune import memory_hint

    cfg = TrainConfig(method="full", data="d", base="tiny", out="o", workers=4, batch_size=8, grad_accum=2)
    hint = memory_hint(cause, cfg)
    assert hint == (" (out of memory: add --gradient-checkpointing to the same command; or start again in a "
                    "new --out with a lower --batch-size (now 8) with a higher --grad-accum (now 2) for the same "
                    "global batch, or --fsdp, which shards the weights and optimizer state across the workers, or a lower "
                    "--resolution)")
    lora = TrainConfig(method="lora", data="d", base="tiny", out="o", gradient_checkpointing=True)
    assert memory_hint(cause, lora) == (" (out of memory: start again in a new --out with a lower --batch-size "
                                        "(now 4) with a higher --grad-accum (now 1) for the same global batch, or a "
                                        "lower --resolution)")
    assert memory_hint("ValueError: caption column is empty", cfg) == ""
    one = TrainConfig(method="dreambooth", data="d", base="tiny", out="o", workers=2, batch_size=1,
                      class_prompts=["a photo of a mug"])
    assert memory_hint(cause, one) == (" (out of memory: add --gradient-checkpointing to the same command; or "
                                       "start again in a new --out with --fsdp, which shards the weights and optimizer "
                                       "state across the workers, or a lower --resolution)")


def test_a_resumed_ema_follows_its_weights_onto_their_device():
    """Checkpoint files load onto the CPU; on a GPU the weights do not, and the first ema.step after a resume
    mixed the two. The `meta` device stands in for the GPU here: it fails the same device check."""
    import tempfile

    from diffusers.training_utils import EMAModel

    from actors.train.checkpoints import load_checkpoint, save_checkpoint

    def state(device: str):
        net = torch.nn.Linear(4, 4).to(device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        return (net, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                torch.amp.GradScaler("cpu", enabled=False), EMAModel(list(net.parameters()), decay=0.9))

    net, optimizer, scheduler, scaler, ema = state("cpu")
    net(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    ema.step(net.parameters())
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, 1, {n: p.detach() for n, p in net.named_parameters()}, optimizer.state_dict(),
                        scheduler, scaler, ema)
        resumed = state("meta")
        assert load_checkpoint(directory, *resumed) == 1
    net, ema = resumed[0], resumed[-1]
    assert {t.device.type for t in ema.shadow_params} == {"meta"}
    ema.step(list(net.parameters()))  # raised "Tensor on device meta is not on the expected device cpu!"


def test_a_methods_own_flags_at_their_defaults_are_accepted():
    """The rule above refuses another method's flag as given; the method's own, at their defaults, still pass, and
    a config built in code (no flags: the workers' copy) is judged by its values."""
    from actors.train.config import TrainConfig

    vae = {"method": "vae", "data": "/d", "base": "tiny", "out": "/o", "crop": 0, "crop_span": 0, "crop_candidates": 1,
           "kl_weight": 1e-6, "pixel_loss": "mse"}
    TrainConfig.model_validate(vae, context={"given": set(vae)})
    lora = {"method": "lora", "data": "/d", "base": "tiny", "out": "/o", "rank": 4, "alpha": 4.0}
    TrainConfig.model_validate(lora, context={"given": set(lora)})
    dumped = TrainConfig(method="full", data="/d", base="tiny", out="/o").model_dump()  # every field, defaults
    assert TrainConfig.model_validate(dumped).rank == 4


def test_validation_images_of_a_rerun_with_fewer_prompts_leave_none_of_the_old_ones(tmp_path):
    """A rerun that draws other validation prompts left the images of the prompts it no longer has beside the
    new ones in the step's folder, as if drawn for it."""
    from actors.models import describe_model
    from actors.presets import build_preset
    from actors.train.config import TrainConfig
    from actors.train.validation import validation_images

    base, pipe = describe_model("default", "tiny"), build_preset("tiny")
    cfg = TrainConfig(method="lora", data=str(tmp_path / "data"), base="tiny", out=str(tmp_path / "out"), steps=2,
                      resolution=64, validation_prompts=["a red circle", "a blue star"])
    assert len(validation_images(cfg, base, pipe, step=2)) == 2
    again = cfg.model_copy(update={"validation_prompts": ["a green square"]})
    validation_images(again, base, pipe, step=2)
    assert sorted(p.name for p in (tmp_path / "out" / "validation" / "step-000002").iterdir()) == ["00.png"]


def test_validation_images_are_drawn_at_the_guidance_asked_and_say_what_drew_them(tmp_path):
    """They were drawn at guidance 7.5 whatever the rows would use (tiny draws best at 3), and their parameters
    said the base model drew them with no adapter: they now name the fine-tune and the step."""
    from actors.models import describe_model
    from actors.png import read_png_parameters
    from actors.presets import build_preset
    from actors.train.config import TrainConfig
    from actors.train.validation import validation_images

    base, pipe = describe_model("default", "tiny"), build_preset("tiny")
    drawn = {}
    for guidance in (7.5, 3.0):
        cfg = TrainConfig(method="lora", data=str(tmp_path / "data"), base="tiny", out=str(tmp_path / f"g{guidance}"),
                          steps=2, resolution=64, validation_prompts=["a red circle"], validation_guidance=guidance)
        [path] = validation_images(cfg, base, pipe, step=2)
        params = read_png_parameters(Path(path).read_bytes())
        assert params["guidance_scale"] == guidance and params["model"] == "tiny"
        assert params["fine_tune"] == {"method": "lora", "step": 2} and params["step"] == 2
        drawn[guidance] = np.asarray(Image.open(path))
    assert np.abs(drawn[7.5].astype(int) - drawn[3.0]).max() > 10, "the guidance asked is the one drawn at"


def test_progress_says_a_worker_stopped_when_the_workers_start_again(tmp_path):
    """After a worker died the terminal went from "step 6/12" to "resuming from the checkpoint at step 4" with no
    word of why; the first start of a command is said as before."""
    import fsspec

    from actors.train.config import TrainConfig
    from jobs.finetune import TrainProgress

    cfg = TrainConfig(method="lora", data=str(tmp_path / "data"), base="tiny", out=str(tmp_path / "out"), steps=12)
    progress = TrainProgress(fsspec.filesystem("file"), str(tmp_path / "train_log.jsonl"), cfg)
    step = {"step": 6, "loss": 0.1, "lr": 1e-4, "samples_per_second": 2.0}
    said = [progress.describe(r) for r in ({"event": "started", "trainable_parameters": 10}, step,
                                           {"event": "started", "trainable_parameters": 10},
                                           {"event": "resumed", "step": 4})]
    assert said[0] == "lora: 10 trainable parameters" and said[1].startswith("step 6/12 loss 0.1000")
    assert said[2] == ("a training worker stopped (its process died or its node was lost): Ray Train starts the "
                       "workers again, up to --max-failures 2 time(s)")
    assert said[3] == "resuming from the checkpoint at step 4"
    # newer checkpoints that are not whole are named: the rerun trains their steps again (QA: said nothing)
    passed = [{"checkpoint": "checkpoint_b", "why": "trainable.safetensors missing, cut short or damaged"}]
    assert progress.describe({"event": "resumed", "step": 4, "passed_over": passed}) == (
        "resuming from the checkpoint at step 4 (passed over checkpoint_b (trainable.safetensors missing, cut short "
        "or damaged): not whole)")
    assert progress.describe({"event": "started", "trainable_parameters": 10, "passed_over": passed}).startswith(
        "lora: 10 trainable parameters (passed over checkpoint_b")


def test_a_finished_fine_tune_whose_checkpoints_are_gone_is_never_trained_again_from_step_0(dataset, tmp_path,
                                                                                          monkeypatch, capsys):
    """Its rerun with another --verbose or --log-every started it afresh from step 0 (the checkpoint it would
    resume from deleted since, to save space), as did one with new validation prompts: the first now trains
    nothing, the second is refused saying what to do."""
    from safetensors.torch import save_file

    from actors.models import describe_model
    from actors.train.config import TrainConfig
    from jobs.finetune import _as_recorded, run_record
    from manifests.dataset import dataset_fingerprint

    out = tmp_path / "style"
    out.mkdir()
    flags = ["finetune", "lora", "--data", str(dataset["dir"]), "--base", "tiny", "--out", str(out), "--steps", "2"]
    cfg = TrainConfig(method="lora", data=str(dataset["dir"]), base="tiny", out=str(out), steps=2)
    record = run_record(cfg, describe_model("base", "tiny").fingerprint, None,
                        data_fingerprints=(dataset_fingerprint(cfg.data), None))
    (out / "finetune.json").write_text(json.dumps({**record, "status": "finished", "steps": 2,
                                                   "config": _as_recorded(cfg.model_dump())}))
    save_file({"a": torch.zeros(4, 4)}, str(out / "pytorch_lora_weights.safetensors"))
    code, stderr = refused_before_ray(monkeypatch, capsys, *flags, "--log-every", "1", "--max-failures", "0")
    assert code == 0 and "nothing to train" in stderr, stderr[-2000:]
    code, stderr = refused_before_ray(monkeypatch, capsys, *flags, "--validation-prompt", "a blue star")
    assert code == 1 and "holds this fine-tune, finished, but its checkpoints are gone, so validation images of " \
        "other --validation-prompt would mean training it all again from step 0" in stderr, stderr[-2000:]
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"cut")
    code, stderr = refused_before_ray(monkeypatch, capsys, *flags)
    assert code == 1 and "so its LoRA published again (a file of it is missing or cut short) would mean training " \
        "it all again from step 0: put back a whole copy of what it published, or train it again" in stderr
    assert json.loads((out / "finetune.json").read_text())["status"] == "finished", "the record is left as it was"
