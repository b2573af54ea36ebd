"""What the tests share: manifests to write, the real `sdfleet` CLI to run, what a run left behind to read, and
adapters made on the spot (random LoRAs saved by diffusers itself or converted to kohya by hand)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from actors.adapters import AdapterStore
from actors.presets import PRESETS
from manifests.schema import ManifestRow, resolve_row

REPO = Path(__file__).resolve().parents[1]

# Keep tests quick on 2 cores: few steps; 256 px is the smallest size that carries the watermark.
FAST = {"steps": 2, "width": 256, "height": 256}


def rows(n: int, prefix: str = "row", **fields) -> list[dict]:
    """n valid manifest rows with distinct prompts and the FAST settings, unless overridden."""
    subjects = ["mug", "bottle", "sneaker", "watch", "lamp", "chair", "vase", "backpack"]
    colours = ["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
    return [
        {"id": f"{prefix}-{i:03d}", "prompt": f"a {colours[i % 8]} {subjects[(i // 8) % 8]} on a white background",
         "negative_prompt": "blurry", **FAST, **fields}
        for i in range(n)
    ]


def write_manifest(path: Path, records: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = dict.fromkeys(k for r in records for k in r)  # from_pylist alone keeps only the first row's keys
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records], schema=schema), path)
    return path


def write_damaged_manifest(path: Path, groups: int = 3, per_group: int = 4, damaged_group: int = 1,
                           column: str = "prompt", **fields) -> Path:
    """A manifest of `groups` row groups whose footer reads but whose `column` in `damaged_group` does not
    decode (its data page overwritten, as a bad copy leaves it); ids r0, r1, ... in order, `fields` in each."""
    records = [{"id": f"r{i}", "prompt": f"a red star on a gray background, number {i:04d}" * 2, **fields}
               for i in range(groups * per_group)]
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=per_group, compression="none",
                   use_dictionary=False, write_statistics=False)
    chunk = pq.ParquetFile(path).metadata.row_group(damaged_group).column(list(records[0]).index(column))
    data = bytearray(path.read_bytes())
    start = chunk.data_page_offset + 40  # past the page header: the values' length prefixes
    data[start:chunk.data_page_offset + chunk.total_compressed_size - 8] = b"\xab" * (
        chunk.total_compressed_size - 48)
    path.write_bytes(bytes(data))
    return path


def sdfleet(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a fresh process (each run starts and stops its own local Ray).

    (Joining one session-wide `ray start` head instead was tried: runs on it saved no time, since a head's
    prestarted workers belong to no job and every run's workers start cold, while the idle head took CPU
    from every other test.)"""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
    full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
    return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    """An ephemeral port: above Ray's worker port range (10002-19999), so no Ray component takes it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_head(temp_dir: Path, metrics_port: int | None = None) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in its own process group and temp dir (the default one's address file
    would point every later bare ray.init() here); returns the process and the head's address once it
    listens. Stop it with `stop_ray_head`, never `ray stop`, which stops every Ray on the machine."""
    import socket
    import time

    port = free_port()
    argv = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    if metrics_port:
        argv.append(f"--metrics-export-port={metrics_port}")
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    for wanted in [port] + ([metrics_port] if metrics_port else []):
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`ray start` exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", wanted)) == 0:
                    break
            if time.time() > deadline:
                stop_ray_head(proc)
                raise RuntimeError(f"`ray start` did not listen on port {wanted} within 60 s")
            time.sleep(0.3)
    return proc, f"127.0.0.1:{port}"


def stop_ray_head(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGINT)  # `ray start --block` stops what it started on Ctrl-C
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    subprocess.run(["pkill", "-9", "-g", str(proc.pid)], check=False)  # whatever the head left in its group


def sdfleet_side_by_side(runs: dict[str, list[str]], at_once: int = 3, timeout: int = 900,
                         envs: dict[str, dict] | None = None) -> dict:
    """Independent CLI runs started side by side, each with its own local Ray, `at_once` at a time: on 2
    cores most of a short run is process start-up and waiting, which overlaps (two 27 s fine-tunes
    took 38 s together). `envs` adds environment variables to the runs it names. Returns
    `{name: CompletedProcess}`."""
    from concurrent.futures import ThreadPoolExecutor

    envs = envs or {}
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {name: pool.submit(sdfleet, *argv, timeout=timeout, env=envs.get(name))
                   for name, argv in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def ledger(out: Path) -> list[dict]:
    parts = sorted((out / "results").glob("*.parquet"))
    return [r for p in parts for r in pq.read_table(p).to_pylist()]


def run_summary(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()  # a truncated file fails here
        return np.asarray(im.convert("RGB")).astype(np.int16)


def assert_same_pixels(a: np.ndarray, b: np.ndarray, label: str = "") -> None:
    """Equal up to float noise: every channel within 3/255 and 99% of values exactly equal."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 3, f"{label}: max difference {diff.max()}/255"
    assert (diff == 0).mean() >= 0.99, f"{label}: only {(diff == 0).mean():.2%} of values equal"


def png_parameters(path: Path) -> dict:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
        return json.loads(im.text["parameters"])


# -- adapters made on the spot --------------------------------------------------------------------------

RANK = 4
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_lora(module, targets, seed: int, std: float = 0.5, in_features: dict | None = None) -> dict:
    """A random rank-4 LoRA in peft spelling (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`).

    `in_features` overrides a layer's input width by name suffix, to make a LoRA for another base model.
    """
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, layer in module.named_modules():
        if path.endswith(targets) and isinstance(layer, torch.nn.Linear):
            n_in = next((n for suffix, n in (in_features or {}).items() if path.endswith(suffix)), layer.in_features)
            layers[f"{path}.lora_A.weight"] = torch.randn(RANK, n_in, generator=g) * std
            layers[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=g) * std
    return layers


def diffusers_file(tmp_path, unet_layers: dict, te_layers: dict | None = None) -> bytes:
    """The bytes of a LoRA saved by diffusers itself (keys `unet.<layer>.lora_A.weight`, ...)."""
    out = tmp_path / uuid.uuid4().hex
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers)
    return (out / "pytorch_lora_weights.safetensors").read_bytes()


def to_kohya(unet_layers: dict, te_layers: dict | None = None, alpha: float = RANK) -> dict:
    """diffusers -> kohya: `lora_unet_<layer path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.

    Text encoder layers become `lora_te_text_model_<path with _>...`. kohya scales by alpha / rank.
    """
    out = {}
    named = [("lora_unet_", k, v) for k, v in unet_layers.items()]
    named += [("lora_te_text_model_", k, v) for k, v in (te_layers or {}).items()]
    for prefix, key, tensor in named:
        path, matrix = key.rsplit(".lora_", 1)
        base = prefix + path.replace(".", "_")
        if matrix.startswith("A"):
            out[f"{base}.lora_down.weight"] = tensor.clone()
            out[f"{base}.alpha"] = torch.tensor(float(alpha))
        else:
            out[f"{base}.lora_up.weight"] = tensor.clone()
    return out


# kohya LoRAs beyond attention (sd-scripts' default targets, LoCon convs), each layer with its own rank and
# alpha as resize_lora's dynamic ranks write them: (module path suffix, rank, alpha)
KOHYA_MIXED = (("attn1.to_q", 2, 1.0), ("attn2.to_v", 8, 8.0), ("proj_in", 4, 1.0), ("ff.net.2", 4, 16.0),
               ("resnets.0.conv1", 4, 2.0))


def kohya_mixed(unet, seed: int = 5, std: float = 0.2) -> tuple[dict, dict]:
    """A kohya LoRA on one layer of each KOHYA_MIXED kind in `down_blocks.1`, and what it must add to each
    layer's weight: `{"unet.<path>": alpha / rank * B @ A}` (the convolution's A is 3x3, its B 1x1)."""
    g = torch.Generator().manual_seed(seed)
    state, expected = {}, {}
    for suffix, rank, alpha in KOHYA_MIXED:
        path, layer = next((p, m) for p, m in unet.named_modules() if p.startswith("down_blocks.1.") and p.endswith(suffix))
        if isinstance(layer, torch.nn.Conv2d):
            a = torch.randn(rank, layer.in_channels, 3, 3, generator=g) * std
            b = torch.randn(layer.out_channels, rank, 1, 1, generator=g) * std
            update = (b.flatten(1) @ a.flatten(1)).reshape(layer.weight.shape)
        else:
            a = torch.randn(rank, layer.in_features, generator=g) * std
            b = torch.randn(layer.out_features, rank, generator=g) * std
            update = b @ a
        base = "lora_unet_" + path.replace(".", "_")
        state.update({f"{base}.lora_down.weight": a, f"{base}.lora_up.weight": b, f"{base}.alpha": torch.tensor(alpha)})
        expected[f"unet.{path}"] = alpha / rank * update
    return state, expected


def new_store(files: dict[str, bytes]) -> AdapterStore:
    uri = f"memory://adapters-{uuid.uuid4().hex[:8]}"
    fs, root = fsspec.core.url_to_fs(uri)
    for rel, data in files.items():
        fs.pipe(f"{root}/{rel}", data)
    return AdapterStore(uri)


def put(store: AdapterStore, rel: str, data: bytes) -> None:
    store.fs.pipe(f"{store.root}/{rel}", data)


def tiny_work_row(record: dict, fingerprint: str = "test", adapter_fingerprints: dict | None = None) -> dict:
    """A manifest record resolved for the `tiny` model as the driver resolves it (no watermark); give the
    run's model fingerprint (run.json) to draw in this process what that run drew."""
    model = {**PRESETS["tiny"]["defaults"], "fingerprint": fingerprint}
    return resolve_row(ManifestRow(**record), model, watermark=None, adapter_fingerprints=adapter_fingerprints)


def resolved_row(store: AdapterStore, adapters=()) -> dict:
    """One resolved row as the driver makes it (see tests/test_actors.py::resolved_rows), with adapters."""
    record = {"id": "r0", "prompt": "a red mug on a white background", "steps": 2,
              "adapters": [{"name": n, "scale": s} for n, s in adapters]}
    return tiny_work_row(record, adapter_fingerprints=store.fingerprints([n for n, _ in adapters]))


def lora_bytes(seed: int) -> bytes:
    """A small LoRA file (one layer, numpy only, no torch): what an adapter store's driver-side checks read."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({"unet.mid.proj_in.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
                 "unet.mid.proj_in.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)})


def count_reads(monkeypatch, fs_class) -> list[str]:
    """The names of the files an async fsspec filesystem class reads whole (`_cat_file`) from now on."""
    reads = []
    real = fs_class._cat_file

    async def counted(self, path, *args, **kwargs):
        reads.append(path.rsplit("/", 1)[-1])
        return await real(self, path, *args, **kwargs)

    monkeypatch.setattr(fs_class, "_cat_file", counted)
    # an instance made before (fsspec caches them by their arguments) bound the unpatched method at its
    # creation: the next ones are made anew
    fs_class.clear_instance_cache()
    return reads

