"""What the onnx and tensorrt backends share: each component exported once to ONNX (`torch.export` +
`torch.onnx.export`) with the adaptable layers' weights as graph inputs, the store that caches exports and
engines, and `GraphBackend`, which puts a compiled graph in place of the UNet's forward and the VAE's decode."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from typing import Any
from pathlib import Path

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from actors.backends.base import ADAPTABLE, Backend, BackendError, adaptable_layers
from actors.models import cache_key, file_digest
from manifests.stores import is_local_fs

OPSET = 20
EXPORT_VERSION = 1  # bump when what an export contains changes, so old cache entries are not used
MAX_BATCH = 63
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def export_key(fingerprint: str, component: str, size: tuple[int, int] | None, dtype: torch.dtype) -> str:
    """The cache key of one exported component: everything that changes the exported graph."""
    return cache_key({"model": fingerprint, "component": component, "size": size, "dtype": str(dtype), "opset": OPSET,
                      "torch": torch.__version__.split("+")[0], "adaptable": {k: p.pattern for k, p in ADAPTABLE.items()},
                      "version": EXPORT_VERSION})


# -- the graphs: torch modules whose inputs are what ONNX Runtime will be fed ----------------------------

class _UNetGraph(torch.nn.Module):
    def __init__(self, unet, weights: list[str]):
        super().__init__()
        self.unet, self.weights = unet, weights

    def forward(self, sample, timestep, encoder_hidden_states, *weights):
        params = {f"{path}.weight": w for path, w in zip(self.weights, weights)}
        return torch.func.functional_call(self.unet, params, (sample, timestep),
                                          {"encoder_hidden_states": encoder_hidden_states, "return_dict": False},
                                          strict=False)[0]


class _TextGraph(torch.nn.Module):
    def __init__(self, text_encoder, weights: list[str]):
        super().__init__()
        self.text_encoder, self.weights = text_encoder, weights

    def forward(self, input_ids, token_table, *weights):
        params = {f"{path}.weight": w for path, w in zip(self.weights, weights)}
        params["embeddings.token_embedding.weight"] = token_table
        return torch.func.functional_call(self.text_encoder, params, (input_ids,), strict=False)[0]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


@contextlib.contextmanager
def _own_forward(module, attribute: str):
    """Undo our instance-level override of `module.<attribute>` for a while (to export the real one)."""
    override = module.__dict__.pop(attribute, None)
    try:
        yield
    finally:
        if override is not None:
            setattr(module, attribute, override)


def export_component(pipe, component: str, path: Path, size: tuple[int, int] | None) -> None:
    """Export one component of `pipe` to `path` (+ `path.data`), batch dynamic, at `size` (height, width)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    # diffusers' Upsample2D branches on batch >= 64, so graphs hold for batches of 2..63; callers split and pad
    batch = torch.export.Dim("batch", min=2, max=MAX_BATCH)
    layers = adaptable_layers(pipe)
    if component == "unet":
        names = [n.removeprefix("unet.") for n in layers if n.startswith("unet.")]
        h, w = size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor
        example = (torch.randn(2, pipe.unet.config.in_channels, h, w, device=device, dtype=dtype),
                   torch.tensor([500.0, 500.0], device=device),
                   torch.randn(2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim,
                               device=device, dtype=dtype))
        module, inputs = _UNetGraph(pipe.unet, names), ["sample", "timestep", "encoder_hidden_states"]
        dynamic = ({0: batch}, {0: batch}, {0: batch})
        weights = [layers[f"unet.{n}"].weight.detach() for n in names]
    elif component == "text_encoder":
        names = [n.removeprefix("text_encoder.") for n in layers if n.startswith("text_encoder.")]
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        example = (torch.zeros(2, pipe.tokenizer.model_max_length, dtype=torch.int64, device=device), table)
        module, inputs = _TextGraph(pipe.text_encoder, names), ["input_ids", "token_table"]
        dynamic = ({0: batch}, {0: torch.export.Dim("vocab", min=table.shape[0], max=1 << 20)})  # it only grows
        weights = [layers[f"text_encoder.{n}"].weight.detach() for n in names]
    else:
        h, w = size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor
        example = (torch.randn(2, pipe.vae.config.latent_channels, h, w, device=device, dtype=dtype),)
        module, inputs, dynamic, names, weights = _DecoderGraph(pipe.vae), ["latents"], ({0: batch},), [], []
    attribute = "decode" if component == "vae" else "forward"
    with _own_forward(getattr(pipe, component), attribute), torch.no_grad(), warnings.catch_warnings():
        # torch's exporter warns about its own internals (pytree LeafSpec, jit.script_method), not our model
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.export.export(module, (*example, *weights), dynamic_shapes=(*dynamic, *((tuple([None] * len(weights)),) if weights else ())))
        torch.onnx.export(program, (), str(path), input_names=[*inputs, *names], output_names=["out"],
                          opset_version=OPSET, external_data=True, verbose=False)


class ExportCache:
    """Exported components (and TensorRT engines) in a store (local folder or fsspec URI), fetched to a local folder for ONNX Runtime."""

    def __init__(self, uri: str | None):
        from actors.models import backend_cache_folder, cache_root

        self.fs, self.root = backend_cache_folder(uri, "onnx")
        # ONNX Runtime and TensorRT read files: a remote store's entries are fetched to this machine's cache
        self.local = Path(self.root) if is_local_fs(self.fs) else cache_root() / "onnx"
        self.checked: set[Path] = set()  # entries whose digests this process has checked (or written)
        self.damaged = 0  # entries found damaged, and exported again
        self.swept = sweep_staging(self.local)

    def get(self, key: str, build, filename: str = "model.onnx") -> Path:
        """The local path of entry `key`'s main file; `build(path)` makes it (and files beside it) on a miss, and
        where the entry found is not whole (its files' digests, DIGESTS, do not match: a file flipped or cut
        short on a disk or in a bucket was loaded as it was, or failed every row of every run)."""
        folder = self.local / key
        model = folder / filename
        if model.exists():
            if folder in self.checked or _whole(folder):
                self.checked.add(folder)
                return model
            shutil.rmtree(folder, ignore_errors=True)  # damaged: fetched or exported again below
            self.damaged += 1
        remote = f"{self.root.rstrip('/')}/{key}"
        if not is_local_fs(self.fs) and self.fs.exists(f"{remote}/{filename}"):
            _fetch(self.fs, remote, folder)
            if _whole(folder):
                self.checked.add(folder)
                return model
            shutil.rmtree(folder, ignore_errors=True)  # the bucket's copy is damaged: exported again, written over
            self.damaged += 1
        with staging_folder(self.local, key) as staging:
            build(staging / filename)
            (staging / DIGESTS).write_text(json.dumps(_digests(staging)))
            if not is_local_fs(self.fs):  # data files first, the main file last: its presence marks a whole entry
                for item in sorted(staging.iterdir(), key=lambda p: (p.name == filename, p.name == DIGESTS)):
                    self.fs.put_file(str(item), f"{remote}/{item.name}")
            try:
                staging.rename(folder)
            except OSError as exc:  # another actor finished the same export first: theirs is as good
                if not model.exists():
                    raise BackendError(f"the export cache entry {folder} could not be made ({exc})") from exc
        self.checked.add(folder)
        return model


# Each export cache entry's record of its files: {name: sha256}, written with it and checked before it is used
DIGESTS = "digests.json"


def _digests(folder: Path) -> dict[str, str]:
    """{name: sha256} of the files in `folder` (an entry: the graph and its weights), DIGESTS aside."""
    return {path.name: file_digest(path).hex() for path in sorted(folder.iterdir())
            if path.is_file() and path.name != DIGESTS}


def _whole(folder: Path) -> bool:
    """Whether the entry in `folder` holds the files its DIGESTS names, as they were written (an entry without
    one, from before sdfleet wrote them, is exported again once)."""
    try:
        return json.loads((folder / DIGESTS).read_text()) == _digests(folder)
    except (OSError, ValueError):
        return False


# An entry is built (or fetched) in a hidden staging folder beside it, then renamed. A process killed meanwhile
# (SIGKILL, out of memory, a pod gone) leaves that folder: gigabytes at SD 2.1 size, each kill. While it builds,
# a process holds an exclusive lock on `<folder>.lock` beside it, so the next cache removes a folder whose lock
# is free: its process is gone, whichever node or PID namespace it ran in (the lock is the kernel's, or the
# network filesystem's), and a reused PID changes nothing.
STAGING = ".staging-"
STALE_AFTER = 86400.0  # a staging folder without a lock (an older sdfleet's, a store without locks) this old goes


@contextlib.contextmanager
def staging_folder(parent: Path, key: str):
    """A new hidden folder in `parent` to build entry `key` in, locked while the body runs, then removed (unless
    the body renamed it into place)."""
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING}{key}-", dir=_ensure(parent)))
    staging.chmod(0o755)  # (mkdtemp's 0700: other users' pods on a shared volume could not read the entry)
    lock = _hold(staging)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(f"{staging}.lock")
            lock.close()


def _hold(staging: Path):
    """An exclusive lock on `<staging>.lock`, or None where the filesystem has no locks (then only age says
    that a folder is left over). Taken on a file of another name, then renamed: a sweep never finds the lock
    file before it is held."""
    import fcntl

    temporary = f"{staging}.lock-{os.getpid()}"
    handle = open(temporary, "w")  # noqa: SIM115 - held open (locked) until the staging folder goes
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(temporary, f"{staging}.lock")
        return handle
    except OSError:
        handle.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        return None


def sweep_staging(folder: Path) -> int:
    """Remove the staging folders in `folder` whose builder is gone (their lock is free), and those without a lock
    that nothing has touched for STALE_AFTER seconds; returns how many. One being built now stays."""
    import fcntl

    removed = 0
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for entry in entries:
        lock_path = f"{entry.path}.lock"
        try:
            with open(lock_path, "r+") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # held: being built now (or a lock we cannot take: left as it is)
                    continue
                shutil.rmtree(entry.path)
                os.unlink(lock_path)
                removed += 1
                continue
        except FileNotFoundError:  # no lock: only its age can say
            pass
        except OSError:
            continue
        try:
            if time.time() - entry.stat().st_mtime > STALE_AFTER:
                shutil.rmtree(entry.path)
                removed += 1
        except OSError:  # gone meanwhile (another actor swept it), or not ours to remove: left as it is
            pass
    return removed


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fetch(fs, remote: str, folder: Path) -> None:
    with staging_folder(folder.parent, folder.name) as staging:
        try:
            for item in fs.ls(remote, detail=False):
                fs.get_file(item, str(staging / item.rsplit("/", 1)[-1]))
            staging.rename(folder)
        except OSError:
            pass


# Image sizes whose sessions or engines a graph backend keeps loaded. Each is built for one size, and each
# UNet one holds its own copy of the weights baked into it (all but the adaptable layers: a UNet's worth on
# SD 2.1), so an actor meeting a catalogue's sizes grew by one copy per size (+900 MB over 7 sizes of tiny
# on onnx, review of 2026-12-06), and tensorrt refits every engine it holds at each swap. Rows come grouped
# by size, so a size let go is rarely wanted again soon; if it is, its export is read back from the cache.
MAX_SIZES = 4


def use(loaded: dict[tuple, Any], key: tuple) -> Any:
    """`loaded[key]`, moved to the end of `loaded`: its entries stay in the order they were last used."""
    loaded[key] = loaded.pop(key)
    return loaded[key]


def drop_old_sizes(loaded: dict[tuple, Any], keep: int = MAX_SIZES) -> int:
    """Let go of every entry of `loaded` ((component, size) -> session or engine, least recently used first)
    whose size is not among the `keep` used last; entries without a size (the text encoder) stay. Returns
    how many went."""
    newest_first = list(dict.fromkeys(size for _, size in reversed(loaded) if size is not None))
    stale = [key for key in loaded if key[1] in newest_first[keep:]]
    for key in stale:
        del loaded[key]
    return len(stale)


def run_in_chunks(batched: dict[str, torch.Tensor], out: torch.Tensor, run, most: int = MAX_BATCH) -> torch.Tensor:
    """Fill `out` by calling `run(chunk, target)` over the batch in the chunks an exported graph takes:
    2..`most` rows (at most MAX_BATCH: diffusers' Upsample2D branches at 64), a single row doubled and cut
    back."""
    total, most = out.shape[0], max(2, min(most, MAX_BATCH))
    for start in range(0, total, most):
        stop = min(start + most, total)
        chunk = {k: v[start:stop] for k, v in batched.items()}
        if stop - start == 1:
            chunk = {k: v.expand(2, *v.shape[1:]) for k, v in chunk.items()}
            two = torch.empty(2, *out.shape[1:], device=out.device, dtype=out.dtype)
            out[start:stop] = run(chunk, two)[:1]
        else:
            run(chunk, out[start:stop])
    return out


class GraphBackend(Backend):
    """What the onnx and tensorrt backends share: the UNet's forward and the VAE's decode replaced by a
    compiled graph per (component, size), which `_graph` runs into a preallocated output."""

    def _graph(self, component: str, size, batched: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unet(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        if args or any(v is not None for k, v in kwargs.items() if k != "cross_attention_kwargs"):
            raise BackendError(f"the {self.name} backend's UNet takes no extra inputs (got {sorted(kwargs)})")
        size = (sample.shape[2] * self.pipe.vae_scale_factor, sample.shape[3] * self.pipe.vae_scale_factor)
        timestep = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(sample.shape[0])
        out = torch.empty_like(sample)
        self._graph("unet", size, {"sample": sample, "timestep": timestep,
                                   "encoder_hidden_states": encoder_hidden_states}, out)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _decode(self, latents, return_dict=True, generator=None):
        size = (latents.shape[2] * self.pipe.vae_scale_factor, latents.shape[3] * self.pipe.vae_scale_factor)
        out = torch.empty(latents.shape[0], self.pipe.vae.config.out_channels, *size, device=latents.device,
                          dtype=latents.dtype)
        self._graph("vae", size, {"latents": latents}, out)
        return DecoderOutput(sample=out) if return_dict else (out,)
