"""Model references: a preset name, a local diffusers directory, an fsspec URI of one, or a hub id.

The driver calls `describe_model` (cheap: configs and file listings, no weights) to learn each model's
defaults and fingerprint before any actor starts; actors call `load_pipeline`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import posixpath
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from actors.presets import PRESETS, build_preset, preset_fingerprint
from actors.schedulers import scheduler_name_for
from manifests.schema import error_line
from manifests.stores import url_to_fs

DEFAULT_STEPS = 30  # SD 2.1's usual step count, for directories that do not say


class ModelError(Exception):
    """A model reference that does not resolve or load: the run cannot start."""


@dataclass(frozen=True)
class ModelInfo:
    """What the driver knows about a model before loading it."""

    name: str
    ref: str
    kind: str  # preset | directory | uri | hub
    fingerprint: str
    width: int
    height: int
    steps: int
    scheduler: str
    # The widths an adapter must have to fit (None: not known here): the text encoder's (an embedding's vectors, a
    # text-encoder LoRA's layers) and the text features the UNet's cross-attention takes. SD 1.x: 768, 2.x: 1024.
    text_width: int | None = None
    context_width: int | None = None

    def defaults(self) -> dict:
        return asdict(self)


def cache_root() -> Path:
    return Path(os.environ.get("SDFLEET_CACHE", Path.home() / ".cache" / "sdfleet"))


def backend_cache_folder(uri: str | None, folder: str):
    """(filesystem, path) of `folder` in the backend cache: under `uri` (`--backend-cache`, any fsspec URI)
    or, without one, under this machine's cache root. Each user of the cache keeps its own folder:
    `onnx/` (exports and engines), `torch-compile/`, `batch-size/`."""
    fs, root = url_to_fs(uri or str(cache_root()))
    return fs, f"{root.rstrip('/')}/{folder}"


def cache_key(spec: dict) -> str:
    """The key of a backend cache entry: a short hash of everything that changes what the entry holds."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def hardware_name(device) -> str:
    """What a cached graph, engine or batch choice was made for: the GPU's name, or the CPU's architecture."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor()}"


def _is_uri(ref: str) -> bool:
    return "://" in ref and not ref.startswith("file://")


def describe_model(name: str, ref: str) -> ModelInfo:
    """Resolve `ref` and read its defaults and fingerprint; raise ModelError if it is not a model."""
    if ref in PRESETS:
        spec = PRESETS[ref]
        d = spec["defaults"]
        return ModelInfo(name, ref, "preset", preset_fingerprint(ref), d["width"], d["height"], d["steps"],
                         d["scheduler"], spec["text_encoder"]["hidden_size"], spec["unet"].get("cross_attention_dim"))
    if _is_uri(ref):
        fs, root = url_to_fs(ref)  # a store whose package is missing: said by the CLI, with the fix
        try:
            return _describe_uri(name, ref, fs, root.rstrip("/"))
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - credentials refused, a store that does not answer
            raise ModelError(f"model {name}={ref} cannot be read ({error_line(exc)})") from exc
    path = Path(ref.removeprefix("file://")).expanduser()
    if path.is_dir():
        try:
            return _describe_folder(name, ref, path)
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:  # a config that is not JSON,
            # or JSON of another shape (a list, a unet config without sample_size)
            raise ModelError(f"model {name}={ref}: its configs cannot be read ({error_line(exc)}): a damaged or "
                             "half-copied model folder; export or copy it again") from exc
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"model {name}={ref}: a single file, not a diffusers directory; a checkpoint converts once "
                         "with diffusers' StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR) "
                         "(a LoRA or embedding file goes in the --adapters store instead)")
    if path.exists():  # a path that is here is never asked of the hub (`sub/notes` has a hub id's shape)
        raise ModelError(f"model {name}={ref}: a file, not a diffusers directory (a folder with model_index.json); "
                         "give the model's folder")
    if ref.count("/") == 1 and not ref.startswith((".", "/")):
        return _describe_hub(name, ref)
    # a path (it has a slash, or starts with . or ~) that is not there: said so, before what else it could be
    missing = f"{path} does not exist; " if "/" in ref or ref.startswith((".", "~")) else ""
    raise ModelError(
        f"model {name}={ref}: {missing}not a preset ({', '.join(PRESETS)}), a diffusers directory, a URI or a hub id"
    )


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ADAPTER_FILES = ("pytorch_lora_weights.safetensors", "learned_embeds.safetensors")


def _no_model_index(name: str, ref: str, where: str, names) -> ModelError:
    """The error for a folder without model_index.json, saying so when it is an adapter's folder."""
    adapter = next((n for n in names if n in ADAPTER_FILES), None)
    hint = (f"; it holds {adapter}: an adapter, which rows name in `adapters` from the --adapters store (its "
            "parent folder), on a base --model" if adapter else " (expected a diffusers directory)")
    return ModelError(f"model {name}={ref}: {where} has no model_index.json{hint}")


def _describe_uri(name: str, ref: str, fs, root: str) -> ModelInfo:
    if not fs.exists(f"{root}/model_index.json"):
        if fs.isfile(root):
            raise ModelError(f"model {name}={ref}: a file, not a diffusers directory (a folder with "
                             "model_index.json); give the model's folder")
        if not fs.isdir(root):  # (an object store has no empty folders: a prefix with nothing under it)
            raise ModelError(f"model {name}={ref}: nothing is stored under it (no such folder); check the URI")
        raise _no_model_index(name, ref, "the folder", [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)])
    keep = _model_files(json.loads(fs.cat_file(f"{root}/model_index.json")))
    listing = _store_listing(fs, root, keep)
    _check_weights(name, ref, keep, list(listing))
    configs = {rel: json.loads(fs.cat_file(f"{root}/{rel}")) for rel in _CONFIGS if fs.exists(f"{root}/{rel}")}
    return _from_configs(name, ref, "uri", _listing_fingerprint(listing), configs)


def _listing_fingerprint(listing: dict[str, dict]) -> str:
    """A stored model's fingerprint, from its files' names, sizes and the store's version stamps (object stores
    give an ETag or checksum per object: enough to notice a replaced file, without reading gigabytes)."""
    h = hashlib.sha256()
    for rel, info in listing.items():
        stamp = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime") or info.get("LastModified")
        h.update(f"{rel}|{info.get('size')}|{stamp}\n".encode())
    return f"uri:{h.hexdigest()[:16]}"


def _describe_folder(name: str, ref: str, path: Path) -> ModelInfo:
    if not (path / "model_index.json").is_file():
        raise _no_model_index(name, ref, str(path), [p.name for p in path.iterdir()])
    keep = _model_files(json.loads((path / "model_index.json").read_text()))
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_model_file(p.relative_to(path).as_posix(), keep))
    _check_weights(name, ref, keep, [p.relative_to(path).as_posix() for p in files])
    configs = {rel: json.loads((path / rel).read_text()) for rel in _CONFIGS if (path / rel).is_file()}
    return _from_configs(name, ref, "directory", _folder_fingerprint(path, files), configs)


def _folder_fingerprint(path: Path, files: list[Path] | None = None) -> str:
    """A model directory's fingerprint: the hash of its model files' names and contents (digests cached by size,
    mtime and inode, so an unchanged folder costs a stat per file)."""
    if files is None:
        keep = _model_files(json.loads((path / "model_index.json").read_text()))
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_model_file(p.relative_to(path).as_posix(), keep))
    digests = _cached_digests(path, files)
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path).as_posix().encode())
        h.update(digests[file])
    return f"dir:{h.hexdigest()[:16]}"


def _changed_since_planned(model: str, planned: str, now: str) -> ModelError:
    """A model whose files changed after the driver fingerprinted it (a fine-tune publishing to the same place
    while the nightly runs): drawing it would label the new weights' images with the old fingerprint, and every
    later run would skip them as done."""
    return ModelError(f"model {model} changed since this run was planned (fingerprint {planned} then, {now} now): "
                      "its rows are not drawn with other weights than the ones they were planned with; rerun to draw "
                      "them with what is there now")


# The top-level files of a model directory that describe it; its weights live in the component folders.
_MODEL_TOP_FILES = ("model_index.json", "sdfleet.json")


def _model_files(model_index: dict) -> set[str]:
    """The folders a pipeline loads (its components), plus the top-level files that describe it."""
    return {name for name, value in model_index.items() if isinstance(value, list) and value and value[0] is not None}


def _is_model_file(rel: str, components: set[str]) -> bool:
    """Part of the fingerprint (and of a stored model's copy): what the pipeline loads, which is the configs and
    safetensors weights of its component folders, and a tokenizer's vocabulary files. A fine-tune's checkpoints/,
    validation images and logs beside the model, or a README in a component folder, are not, so they neither
    slow hashing nor change the fingerprint. Pickle weights are listed only for `_check_weights` to name."""
    top, sep, rest = rel.partition("/")
    if not sep:
        return rel in _MODEL_TOP_FILES
    if top not in components:
        return False
    suffix = posixpath.splitext(rest)[1].lower()
    return (suffix in (".json", ".safetensors", *_PICKLE_SUFFIXES)
            or ("tokenizer" in top and suffix in (".txt", ".model")))  # merges.txt, a sentencepiece model


# The components that hold weights, and the suffixes of pickle checkpoints (never loaded: they can run code).
_WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_weights(name: str, ref: str, components: set[str], rels: list[str]) -> None:
    """Raise ModelError unless each weight-bearing component of a model directory has safetensors weights: one
    with pickle weights only is said before any worker starts, not when a worker fails to load it."""
    for component in sorted(set(_WEIGHT_COMPONENTS) & components):
        inside = [r for r in rels if r.startswith(f"{component}/")]
        if any(r.endswith(".safetensors") for r in inside):
            continue
        pickles = [r for r in inside if r.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise ModelError(f"model {name}={ref}: {pickles[0]} is a pickle checkpoint and {component}/ has no "
                             ".safetensors weights; sdfleet loads safetensors only (save the model again with "
                             "diffusers' save_pretrained, whose default is safetensors)")
        raise ModelError(f"model {name}={ref}: {component}/ holds no weights (expected a .safetensors file)")


_CONFIGS = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "sdfleet.json",
            "text_encoder/config.json")


def _cached_digests(root: Path, files: list[Path]) -> dict[Path, bytes]:
    """SHA-256 of each file, reusing the digests of files whose size, mtime and inode have not changed.

    A SD 2.1 directory is ~5 GB: hashing it at every run costs tens of seconds before anything starts.
    The digests are kept per directory under the cache (`$SDFLEET_CACHE/fingerprints/`); a cache that
    cannot be read or written only means hashing again.
    """
    store = cache_root() / "fingerprints" / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    digests, fresh = {}, {}
    for file in files:
        stat = file.stat()
        key, stamp = file.relative_to(root).as_posix(), [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = known.get(key)
        digest = bytes.fromhex(entry[1]) if entry and entry[0] == stamp else file_digest(file)
        digests[file], fresh[key] = digest, [stamp, digest.hex()]
    if fresh != known:
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f".{store.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, store)
        except OSError:
            pass
    return digests


def file_digest(path: Path) -> bytes:
    """The SHA-256 of the file at `path`, read a MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def _from_configs(name: str, ref: str, kind: str, fingerprint: str, configs: dict) -> ModelInfo:
    unet = configs.get("unet/config.json")
    vae = configs.get("vae/config.json")
    if not unet or not vae:
        raise ModelError(f"model {name}={ref}: missing unet/config.json or vae/config.json")
    sample = unet["sample_size"]
    size = (sample if isinstance(sample, int) else sample[0]) * 2 ** (len(vae["block_out_channels"]) - 1)
    ours = configs.get("sdfleet.json", {})
    scheduler = ours.get("scheduler") or scheduler_name_for(configs.get("scheduler/scheduler_config.json", {}))
    text = configs.get("text_encoder/config.json", {})
    return ModelInfo(name, ref, kind, fingerprint, ours.get("width", size), ours.get("height", size),
                     ours.get("steps", DEFAULT_STEPS), scheduler, _width(text.get("hidden_size")),
                     _width(unet.get("cross_attention_dim")))


def _width(value) -> int | None:
    """A config's width, where it is one number (SDXL-like configs give lists: not checked)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _describe_hub(name: str, ref: str) -> ModelInfo:
    try:
        from huggingface_hub import hf_hub_download, model_info

        sha = model_info(ref).sha
        configs = {rel: json.loads(Path(hf_hub_download(ref, rel, revision=sha)).read_text())
                   for rel in _CONFIGS[:3]}
    except Exception as exc:  # offline, unknown repo, gated: all mean "cannot use it here"
        raise ModelError(f"model {name}={ref}: cannot reach it on the hub ({error_line(exc)})") from exc
    return _from_configs(name, ref, "hub", f"hub:{ref}@{sha}", configs)


def local_copy(ref: str, fingerprint: str) -> str:
    """Download a model URI once per node and version into the cache; return the local directory.

    The copy is kept by the URI and the fingerprint `describe_model` read from the store: new weights at the
    same URI are a new copy, never the old one drawn under the new fingerprint. Files are listed and fetched one
    by one (not a recursive `get` of each folder), so any store that can list and read files serves, an HTTP
    server's index pages included. A copy that fails leaves nothing half-written in the cache."""
    digest = hashlib.sha256(f"{ref}\n{fingerprint}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / digest
    if (target / "model_index.json").is_file():
        return str(target)
    fs, root = url_to_fs(ref)
    root = root.rstrip("/")
    staging = target.with_name(f".{digest}.{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        # only what the pipeline loads: a fine-tune's checkpoints and logs beside the model stay in the store
        keep = _model_files(json.loads(fs.cat_file(f"{root}/model_index.json")))
        # the copy is filed under `fingerprint`: it must be that version, listed so before and after the copy
        # (weights replaced since the plan, or while they were copied, would be drawn under the old fingerprint
        # by every run on this node that asks for that version)
        listing = _store_listing(fs, root, keep)
        now = _listing_fingerprint(listing)
        if now == fingerprint:
            for rel in listing:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(staging / rel))
            now = _listing_fingerprint(_store_listing(fs, root, keep))
    except Exception as exc:  # noqa: BLE001 - a store that stops answering, a file gone since describe_model
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(f"model {ref} could not be copied from its store ({error_line(exc)})") from exc
    if now != fingerprint:
        shutil.rmtree(staging, ignore_errors=True)
        raise _changed_since_planned(ref, fingerprint, now)
    try:
        staging.rename(target)  # another actor on this node may have won the race: theirs is as good
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _store_listing(fs, root: str, components: set[str]) -> dict[str, dict]:
    """{path relative to `root`: the store's details} of a stored model's files that the pipeline loads."""
    prefix = root.rstrip("/") + "/"
    return {path[len(prefix):]: info for path, info in sorted(fs.find(root, detail=True).items())
            if path.startswith(prefix) and _is_model_file(path[len(prefix):], components)}


def load_pipeline(info: ModelInfo, device: str = "cpu", dtype=None):
    """Load the StableDiffusionPipeline a ModelInfo describes, onto `device`.

    Directories must hold safetensors weights (`use_safetensors=True`): a pickle checkpoint is refused.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    dtype = dtype or torch.float32
    if info.kind == "preset":
        pipe = build_preset(info.ref)
    else:
        source = local_copy(info.ref, info.fingerprint) if info.kind == "uri" else info.ref.removeprefix("file://")
        # the hub's revision the run was planned against (its fingerprint is hub:REPO@SHA), not what is newest now
        revision = info.fingerprint.rpartition("@")[2] if info.kind == "hub" else None
        try:
            pipe = StableDiffusionPipeline.from_pretrained(
                source, use_safetensors=True, dtype=dtype, safety_checker=None, requires_safety_checker=False,
                revision=revision,
            )
        except (OSError, ValueError, EnvironmentError) as exc:
            raise ModelError(f"model {info.name}={info.ref} did not load: {exc}") from exc
        pipe.set_progress_bar_config(disable=True)
        if info.kind == "directory":
            # checked after loading: a file replaced before or while it was read has a new inode or mtime, so
            # it is hashed again (an unchanged folder costs a stat per file)
            now = _folder_fingerprint(Path(source).expanduser())
            if now != info.fingerprint:
                raise _changed_since_planned(f"{info.name}={info.ref}", info.fingerprint, now)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def export_preset(name: str, directory: str) -> None:
    """Write a preset as a diffusers directory (safetensors) that `--model NAME=DIR` loads."""
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if not directory.strip():  # (not "must not be empty", which read as the opposite of "DIR is not empty")
        raise ModelError("no folder to export into was given (DIR is blank): give a new folder, e.g. models/tiny")
    if directory.startswith("file://") and "::" not in directory:  # a local folder, as every other command takes it
        directory = directory.removeprefix("file://")
    if "://" in directory or "::" in directory:  # Path() took s3://b/m for a local s3:/b/m and said it was written
        raise ModelError(f"{directory}: model export writes a local folder; export into one, then copy it to the "
                         "store (`aws s3 sync DIR s3://...`, `gcloud storage cp -r DIR gs://...`)")
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise ModelError(f"{directory} is a file; give a new or empty folder to export {name} into")
    if target.is_dir() and any(target.iterdir()):  # a fine-tune's output, say: never overwritten
        raise ModelError(f"{directory} is not empty; export {name} into a new or empty folder (nothing there "
                         "was changed)")
    # Written into a hidden folder beside it, then renamed: a failed or interrupted export leaves no folder that
    # loads as a model (one without its sdfleet.json took SD 2.1's defaults) and none the rerun calls not empty.
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    pipe = build_preset(name)  # (its own files are read here: a failure there is not one of writing)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        d = PRESETS[name]["defaults"]
        (staging / "sdfleet.json").write_text(json.dumps({"preset": name, **d}, indent=2) + "\n")
        if target.is_dir():
            target.rmdir()  # empty, checked above
        staging.rename(target)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a read-only folder, a full disk: one line, not a traceback
            raise ModelError(f"cannot write {directory}: {type(exc).__name__}: {exc}") from exc
        raise
