"""The adapter store: LoRA files and Textual Inversion embeddings under one fsspec location.

Adapter `N` is `N.safetensors`, `N/pytorch_lora_weights.safetensors` (what `finetune lora` writes) or
`N/learned_embeds.safetensors` (what `finetune textual-inversion` writes) under the store's root. Only
safetensors are read: a `.bin`, `.pt`, `.ckpt` under that name is refused without being opened, because
unpickling a file runs whatever code it carries.

The driver calls `fingerprints` (one read per file, or none for an object-store file this machine has
hashed at the same version) so that a row's `params_hash` changes when its adapter file is replaced;
actors call `resolve` and `load_state_dict` (see `actors.adapter_cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from typing import Literal

import fsspec
import numpy as np

from manifests.stores import fs_protocols, is_local_fs, url_to_fs, version_tag
from actors.lora_keys import not_applied
from manifests.schema import ADAPTER_NAME_RULE, error_line, first_few, is_adapter_name

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDING_FILE = "learned_embeds.safetensors"  # what actors.textual_inversion.save_embedding writes
FOLDER_FILES = (LORA_FILE, EMBEDDING_FILE)
MAX_NAME_DEPTH = 4  # folders in an adapter's name that a listing of the store looks into
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# diffusers / peft key spellings of a LoRA's two matrices (peft, diffusers attention processors, old diffusers).
DIFFUSERS_LORA = re.compile(r"(\.lora_[AB]\.|\.lora\.(down|up)\.|_lora\.(down|up)\.|\.lora_linear_layer\.)")
# A LoRA's matrices in any spelling (kohya's down/up included), for the dtype check: its alphas may be integers
ANY_LORA_MATRIX_KEY = re.compile(r"\.lora_(down|up)\.|" + DIFFUSERS_LORA.pattern)
# Keys that hold an embedding but do not name its token (kohya/A1111 exports); the file name is the token then.
# (`clip_l` alone: a pivotal-tuning trainer's embedding for the one CLIP text encoder of SD 1.x)
GENERIC_EMBEDDING_KEYS = ("emb_params", "string_to_param.*", "*", "clip_l")
# LyCORIS parts other than LoRA's (LoHa, LoKr, full weight differences, (IA)^3), in kohya's key spelling
LYCORIS_PARTS = re.compile(r"\.(hada_|lokr_|diff(_b)?$|on_input$)")
# The most vectors an embedding can have: a prompt holds 77 tokens, two of them its start and end
MAX_EMBEDDING_VECTORS = 75
FINGERPRINT_CHARS = 16
# How `_detect` reads a file (its kinds, formats, tokens, refusals): raised whenever that changes, so what a
# node's cache says of a stored file it read before (AdapterStore.describe) is read again, not trusted
DETECTION = 4
# The protocols of object stores whose version tag changes whenever a file's bytes do (the fields that hold
# it: manifests.stores.version_tag).
VERSIONED_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "abfss", "az")


def embedding_scale_problem(scale: float) -> str | None:
    """Why a Textual Inversion embedding cannot be used at `scale`, or None: it has no scale (1 uses it, 0
    leaves it out). The plan asks this before any actor does (actors.adapter_cache.check_embedding_scale)."""
    if scale in (0, 1):
        return None
    return f"is a Textual Inversion embedding, which has no scale; got {scale:g} (use 1.0, or 0 to leave it out)"


def word_token_cause(name: str, token: str, word: str) -> str:
    """Why embedding `name`, whose token is `token`, cannot be loaded where `word` (its token, or one of its
    vectors' tokens) is already a word of the model's tokenizer: the actor refuses it (adapter_cache), and the
    plan fails its rows before any actor is asked (jobs.plan)."""
    from_name = token == name.rsplit("/", 1)[-1]  # A1111 files: the file name is the token
    way_out = ("rename the file: its name is the token (a made-up word, such as my-object-v1)" if from_name
               else "save it again under a new token, such as <my-object>")
    return (f"its token {word!r} is already a word of this model's tokenizer (added, it would change every prompt "
            f"using the word on the actor that loaded it); {way_out}")


class AdapterError(ValueError):
    """An adapter that cannot be used; the message names the adapter and the cause."""

    def __init__(self, name: str, cause: str):
        super().__init__(f"adapter {name!r}: {cause}")
        self.adapter = name
        self.cause = cause


@dataclass(frozen=True)
class AdapterInfo:
    """What the store knows about one adapter file."""

    name: str
    uri: str
    fingerprint: str  # sha256 of the file bytes, shortened
    size: int  # bytes in the file
    kind: Literal["lora", "embedding"]
    format: Literal["diffusers", "kohya", "embedding"]
    token: str | None = None  # embeddings: the word prompts use to call it
    # What the file needs of a model (None: it does not say): the text encoder's width (an embedding's vectors, a
    # text-encoder LoRA's layers) and the width of the text features its cross-attention layers take
    text_width: int | None = None
    context_width: int | None = None


class AdapterStore:
    """Adapters under one fsspec location (a local path, `s3://...`, `memory://...` in tests)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = url_to_fs(uri)
        self.root = self.root.rstrip("/")
        # One read serves both resolve() and the load_state_dict() that follows it.
        self._last_read: tuple[str, bytes] | None = None

    def resolve(self, name: str) -> AdapterInfo:
        """Find adapter `name`, hash it and detect its kind and format; raise AdapterError if it is unusable."""
        return self._resolve_at(name, self._find(name))

    def _resolve_at(self, name: str, path: str) -> AdapterInfo:
        data = self._read(name, path)
        header = _header(name, data)
        kind, fmt, token = _detect(name, header)
        if kind == "lora" and (refused := not_applied(header, _lora_metadata(name, data) or {})):
            raise AdapterError(name, refused)  # (the actors refuse it too: here the plan, --plan-only, says so)
        self._last_read = (path, data)
        return AdapterInfo(
            name=name, uri=self.fs.unstrip_protocol(path), fingerprint=_fingerprint(data), size=len(data),
            kind=kind, format=fmt, token=token, **needed_widths(kind, header),
        )

    def fingerprints(self, names) -> dict[str, str]:
        """`{name: fingerprint}` for the driver's `params_hash`; raises AdapterError on the first bad name."""
        out = {}
        for name in dict.fromkeys(names):
            out[name] = self.describe(name).fingerprint
            self._last_read = None  # the driver never loads: do not hold on to the bytes
        return out

    def describe(self, name: str) -> AdapterInfo:
        """`resolve`, without reading a file again that this machine has already checked and hashed at the
        version its object store reports now (a nightly driver would otherwise download every adapter it
        names at every run). Only S3, GCS and Azure files: their version tag changes with every write. Local
        files are always read: that is quick, and their times can be set back."""
        path = self._find(name)
        version = _version(self.fs, path)
        record = _record_path(self.fs.unstrip_protocol(path)) if version else None
        if record is not None:
            try:
                kept = json.loads(record.read_text())
                if kept["version"] == version and kept.get("detection") == DETECTION:
                    return AdapterInfo(**{**kept["info"], "name": name})
            except (OSError, ValueError, KeyError, TypeError):
                pass  # no record yet, or one this version cannot use: read the file
        info = self._resolve_at(name, path)
        if record is not None and _version(self.fs, path) == version:  # not replaced while it was read
            try:
                record.parent.mkdir(parents=True, exist_ok=True)
                temp = record.with_name(f".{record.name}.{os.getpid()}-{threading.get_ident()}.tmp")
                temp.write_text(json.dumps({"version": version, "detection": DETECTION,
                                            "info": dataclasses.asdict(info)}))
                os.replace(temp, record)
            except OSError:
                pass  # a cache that cannot be written costs a read next time, nothing else
        return info

    def load_planned(self, name: str, fingerprint: str | None = None):
        """`(info, tensors)` of adapter `name`; raises AdapterError if the file is no longer the `fingerprint`
        the run was planned with (a file replaced mid-run fails its rows instead of drawing other weights)."""
        info = self.resolve(name)
        if fingerprint is not None and info.fingerprint != fingerprint:
            raise AdapterError(name, f"{info.uri} changed since the run was planned (planned fingerprint "
                                     f"{fingerprint}, the store now has {info.fingerprint})")
        return info, self.load_state_dict(info)

    def load_state_dict(self, info: AdapterInfo):
        """The adapter's tensors (`safetensors.torch.load`), checked against the fingerprint it was resolved with."""
        path = fsspec.core.strip_protocol(info.uri)
        if self._last_read is not None and self._last_read[0] == path:
            data = self._last_read[1]
        else:
            data = self._read(info.name, path)
        self._last_read = None
        if _fingerprint(data) != info.fingerprint:
            raise AdapterError(info.name, f"{info.uri} changed since it was resolved "
                                          f"(fingerprint {info.fingerprint}, now {_fingerprint(data)})")
        return _parse(info.name, data)

    def names(self) -> list[str]:
        """Adapter names in the store, nested ones (`brand/style-v2`) included, sorted (for messages and
        listings), up to MAX_NAME_DEPTH folders deep. One recursive listing: on an object store a paged listing
        of every key (`find` with a depth walks folder by folder, a request each)."""
        try:
            paths = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        root = self.root.rstrip("/") + "/"
        names = []
        for path in paths:
            relative = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
            if relative.count("/") > MAX_NAME_DEPTH or "/checkpoints/checkpoint_" in f"/{relative}":
                continue  # (a fine-tune's checkpoints, in the adapter store it wrote to: weights, not adapters)
            folder, _, base = relative.rpartition("/")
            if base in FOLDER_FILES and folder:
                names.append(folder)
            elif base.endswith(".safetensors") and base not in FOLDER_FILES:
                names.append(relative.removesuffix(".safetensors"))
        return sorted(n for n in set(names) if is_adapter_name(n))

    # -- finding and reading ------------------------------------------------------------------------

    def _find(self, name: str) -> str:
        """The one safetensors path for `name`, or an AdapterError that says what is there instead."""
        # 1. the name must stay inside the store
        if not is_adapter_name(name):
            raise AdapterError(name, f"is not a valid adapter name ({ADAPTER_NAME_RULE})")
        base = f"{self.root}/{name}"
        paths = [f"{base}.safetensors", *(f"{base}/{f}" for f in FOLDER_FILES)]
        candidates = [p for p in paths if self.fs.isfile(p)]
        # 2. exactly one safetensors file, inside the store also once links are followed
        if len(candidates) == 1:
            self._check_inside(name, candidates[0])
            return candidates[0]
        if len(candidates) > 1:
            shown = " and ".join(p[len(self.root) + 1:] for p in candidates)
            raise AdapterError(name, f"both {shown} exist in {self.uri}; keep one so it is clear which is drawn")
        # 3. a pickle under that name is refused, never opened
        pickles = [f"{base}{s}" for s in PICKLE_SUFFIXES]
        if self.fs.isdir(base):
            pickles += [e for e in self.fs.ls(base, detail=False) if e.endswith(PICKLE_SUFFIXES)]
        found = [p for p in pickles if self.fs.isfile(p)]
        if found:
            raise AdapterError(name, f"{self.fs.unstrip_protocol(found[0])} is a pickle file; only .safetensors "
                                     "adapters are loaded, because opening a pickle runs code it carries "
                                     "(convert it to safetensors where you trust it)")
        # 4. unknown: say what the store does hold
        if not self.fs.exists(self.root):
            raise AdapterError(name, f"the adapter store {self.uri} does not exist")
        own = [f for f in FOLDER_FILES if self.fs.isfile(f"{self.root}/{f}")]
        if own:  # --adapters named one adapter's folder, not the store that holds it
            raise AdapterError(name, f"is not in the adapter store {self.uri}, which is itself an adapter's folder "
                                     f"(it holds {own[0]}); pass its parent folder as --adapters, and name the "
                                     "adapter by this folder's name")
        dangling = next((p for p in paths if is_local_fs(self.fs) and os.path.islink(p)), None)
        if dangling is not None:  # listed by the store, so "not in the store ... holds: NAME" contradicted itself
            what = "is not a file" if os.path.exists(dangling) else "does not exist"
            raise AdapterError(name, f"{dangling} is a link to {os.readlink(dangling)}, which {what}")
        if inside := self._folder_without_its_file(name, base):
            raise AdapterError(name, inside)
        held = self.names()
        stem = name.removesuffix(".safetensors")
        if stem != name and stem in held:  # the file's name given, not the adapter's
            raise AdapterError(name, f"is not an adapter's name: the store's file {name} is adapter {stem!r} (name "
                                     "adapters without .safetensors)")
        where = f"holds: {first_few(held, 20)}" if held else "holds no adapters"
        raise AdapterError(name, f"is not in the adapter store {self.uri} (expected {name}.safetensors, "
                                 f"{name}/{LORA_FILE} or {name}/{EMBEDDING_FILE}); the store {where}")

    def _folder_without_its_file(self, name: str, base: str) -> str | None:
        """What a folder of the adapter's name holds instead of its file (a peft `save_pretrained` folder, the
        file a folder too deep, another file name), or None where there is no such folder."""
        if not self.fs.isdir(base):
            return None
        entries = self.fs.ls(base, detail=True)
        files = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")
        if "adapter_model.safetensors" in files:
            return ("its folder holds adapter_model.safetensors, a peft `save_pretrained` adapter whose alphas are in "
                    "its adapter_config.json; save it with diffusers' `StableDiffusionPipeline.save_lora_weights` "
                    f"(which writes {LORA_FILE}) or put it in the store as {name}.safetensors with diffusers' keys")
        weights = [f for f in files if f.endswith(".safetensors")]
        if weights:
            return (f"its folder holds {first_few(weights, 3)}, not {LORA_FILE} or {EMBEDDING_FILE}: rename the "
                    f"file so, or put it in the store as {name}.safetensors")
        deeper = sorted(f"{name}/{e['name'].rstrip('/').rsplit('/', 1)[-1]}" for e in entries
                        if e.get("type") == "directory"
                        and any(self.fs.isfile(f"{e['name'].rstrip('/')}/{f}") for f in FOLDER_FILES))
        if deeper:
            return (f"its folder holds no adapter file itself, but {first_few(deeper, 3)} does: name the adapter "
                    f"`{deeper[0]}` in the rows, or move its file up")
        return None

    def _check_inside(self, name: str, path: str) -> None:
        """On a local store, a symbolic link (of the file or a folder on its way) must not lead out of the
        store's root: the store is what the user named, not whatever its links point at. Object stores
        have no links."""
        if not is_local_fs(self.fs):
            return
        root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise AdapterError(name, f"{path} links to {real}, outside the adapter store {self.uri}; only files "
                                     "inside the store are loaded (copy the adapter into the store)")

    def _read(self, name: str, path: str) -> bytes:
        try:
            return self.fs.cat_file(path)
        except (OSError, ValueError) as exc:
            raise AdapterError(name, f"could not read {self.fs.unstrip_protocol(path)}: {exc}") from exc


def _version(fs, path: str) -> str | None:
    """The object store's version tag of a file as the store gives it now (never from fsspec's listing
    cache), or None where it has none to trust."""
    if not set(fs_protocols(fs)) & set(VERSIONED_PROTOCOLS):
        return None
    try:
        fs.invalidate_cache(path)
        info = fs.info(path)
    except (OSError, ValueError):
        return None
    tag = version_tag(info)
    return f"{tag[0]}={tag[1]}; size={info.get('size')}" if tag else None


def _record_path(uri: str):
    """Where this machine keeps what it learned of the adapter file at `uri` (see `describe`)."""
    from actors.models import cache_root

    return cache_root() / "adapter-fingerprints" / f"{hashlib.sha256(uri.encode()).hexdigest()[:24]}.json"


def _fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:FINGERPRINT_CHARS]


def _parse(name: str, data: bytes):
    """Tensors from safetensors bytes; any parse failure is a corrupt file. A LoRA saved by diffusers or peft
    keeps its alphas in the file's metadata, which `safetensors.torch.load` drops: the tensors then come with
    it (`actors.lora_map.LoraTensors`). Their values were checked by `_header` when the file was resolved (these
    are the same bytes: `load_state_dict` checks the fingerprint)."""
    from safetensors.torch import load

    from actors.lora_map import LoraTensors

    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise AdapterError(name, f"is not a readable safetensors file ({error_line(exc)})") from exc
    metadata = _lora_metadata(name, data)
    return LoraTensors(tensors, metadata) if metadata else tensors


def _lora_metadata(name: str, data: bytes) -> dict | None:
    """The `lora_adapter_metadata` entry of a safetensors file's `__metadata__` (diffusers' LoRA settings), if any.
    The header is JSON after its 8-byte little-endian length; `load` has checked it already."""
    size = int.from_bytes(data[:8], "little")
    raw = (json.loads(data[8:8 + size]).get("__metadata__") or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        found = json.loads(raw)
    except ValueError as exc:
        raise AdapterError(name, f"has lora_adapter_metadata that is not JSON ({error_line(exc)})") from exc
    if not isinstance(found, dict):
        raise AdapterError(name, "has lora_adapter_metadata that is not a JSON object")
    return found


def _header(name: str, data: bytes) -> dict[str, tuple[str, list[int]]]:
    """`{key: (dtype, shape)}` of a safetensors file, checked whole (header, offsets, length) by the
    safetensors library itself, without torch: the driver resolves every adapter a run names, and only the
    actors load them."""
    from safetensors import deserialize

    try:
        tensors = sorted(deserialize(data), key=lambda t: t[0])  # (its order varies: messages quote the first)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise AdapterError(name, f"is not a readable safetensors file ({error_line(exc)})") from exc
    broken = next((key for key, meta in tensors if not _finite(meta["dtype"], meta["data"])), None)
    if broken is not None:  # (NaN images, once said as "too large a scale"; the driver reads the whole file for
        raise AdapterError(name, not_finite(broken))  # its fingerprint anyway, so the plan says it, not an actor)
    return {key: (meta["dtype"], list(meta["shape"])) for key, meta in tensors}


# Each float type's exponent bits (of its raw bits as an unsigned integer): all set is NaN or infinity. E4M3 has no
# infinity, and only its all-ones exponent and mantissa is NaN.
_NOT_FINITE_BITS = {"F64": (np.uint64, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000),
                    "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F8_E5M2": (np.uint8, 0x7C),
                    "F8_E4M3": (np.uint8, 0x7F)}


def _finite(dtype: str, data) -> bool:
    """Whether a tensor of safetensors `dtype` (its raw bytes) holds no NaN or infinity: read from the bits, so
    without torch and in types numpy lacks (bfloat16, float8). Types other than floats are finite."""
    if dtype not in _NOT_FINITE_BITS:
        return True
    kind, mask = _NOT_FINITE_BITS[dtype]
    bits = np.frombuffer(data, dtype=kind)
    return not np.any((bits & kind(mask)) == kind(mask))


def not_finite(key: str) -> str:
    return (f"holds NaN or infinite values (in {key!r}): the file is damaged, or was saved from a training run that "
            "diverged")


# A LoRA's down matrices ([rank, in, ...]) whose input width a model fixes: cross-attention's keys and values take
# the text features (SD 1.x: 768, 2.x: 1024); the text encoder's attention projections take its width. In every
# key spelling: peft and diffusers (`attn2.to_k.lora_A`), old diffusers (`attn2.processor.to_k_lora.down`), kohya
# (`attn2_to_k.lora_down`).
CONTEXT_DOWN = re.compile(r"attn2[._](?:processor[._])?to_[kv](?:_lora)?[._].*(?:down|lora_A)\.weight$")
TEXT_DOWN = re.compile(r"^(?:text_encoder\.|lora_te1?_).*self_attn[._][qkv]_proj(?:_lora)?[._].*(?:down|lora_A)"
                       r"\.weight$")


def needed_widths(kind: str, tensors: dict[str, tuple[str, list[int]]]) -> dict[str, int | None]:
    """The widths a file needs of a model (AdapterInfo.text_width, .context_width), read from its header."""
    if kind == "embedding":  # (one tensor: _detect)
        shape = next(iter(tensors.values()))[1]
        return {"text_width": shape[-1] if shape else None, "context_width": None}

    def width(pattern: re.Pattern) -> int | None:
        return next((shape[1] for key, (_, shape) in tensors.items() if len(shape) >= 2 and pattern.search(key)),
                    None)

    return {"text_width": width(TEXT_DOWN), "context_width": width(CONTEXT_DOWN)}


def _detect(name: str, tensors: dict[str, tuple[str, list[int]]]) -> tuple[str, str, str | None]:
    """(kind, format, token) from the keys: kohya LoRA, diffusers/peft LoRA, or a Textual Inversion embedding.
    `tensors` maps each key to its (safetensors dtype, shape)."""
    keys = list(tensors)
    if not keys:
        raise AdapterError(name, "holds no tensors")
    empty = next((k for k, (_, shape) in tensors.items() if 0 in shape), None)
    if empty is not None:  # an embedding of no vectors failed in the actor with a bare IndexError
        raise AdapterError(name, f"holds an empty tensor ({empty!r}, shape {tensors[empty][1]}): the file is damaged "
                                 "or was saved before it held anything")
    whole = next((k for k, (dtype, _) in tensors.items()
                  if ANY_LORA_MATRIX_KEY.search(k) and not dtype.startswith(("F", "BF"))), None)
    if whole is not None:  # an int8 file was drawn as if its integers were the weights, and marked ok
        raise AdapterError(name, f"holds LoRA matrices of {tensors[whole][0]} ({whole!r}), not floating point: a "
                                 "quantized file, which sdfleet does not read; save it in float16 or float32")
    lycoris = next((k for k in keys if k.startswith(KOHYA_PREFIXES) and LYCORIS_PARTS.search(k)), None)
    if lycoris:  # first: beside plain LoRA layers (a LoCon + LoHa file) diffusers' converter failed on them, raw
        raise AdapterError(name, f"is a LyCORIS file ({lycoris!r}: LoHa, LoKr, full or (IA)^3 layers); only LoRA "
                                 "(LoCon included) and Textual Inversion are supported")
    if any(k.startswith(KOHYA_PREFIXES) and (".lora_down." in k or ".lora_up." in k) for k in keys):
        return "lora", "kohya", None
    if any(DIFFUSERS_LORA.search(k) for k in keys):
        return "lora", "diffusers", None
    if set(keys) == {"clip_l", "clip_g"}:
        raise AdapterError(name, "is an SDXL embedding (clip_l + clip_g); Stable Diffusion 2.x has one text encoder")
    if set(keys) >= {"clip_l", "clip_l_out"}:  # one embedding, with vectors for the encoder's output too
        raise AdapterError(name, "is a OneTrainer embedding (clip_l with clip_l_out), which sdfleet does not read: "
                                 "save its `clip_l` tensor alone (the file's name is then its token)")
    vectors = {k: shape for k, (dtype, shape) in tensors.items()
               if dtype.startswith(("F", "BF")) and len(shape) in (1, 2)}  # F16, F32, BF16, F8_E4M3, ...
    if len(keys) == 1 and keys[0] in vectors:
        key, shape = keys[0], vectors[keys[0]]
        if key.endswith((".weight", ".bias")):  # a model's layer, which a prompt's word cannot be
            raise AdapterError(name, f"holds one tensor, {key!r}, a model layer's: neither a LoRA (its down and up "
                                     "matrices) nor a Textual Inversion embedding")
        if len(shape) == 2 and shape[0] > MAX_EMBEDDING_VECTORS:
            raise AdapterError(name, f"holds one tensor of {shape[0]} vectors ({key!r}), more than a prompt has room "
                                     f"for ({MAX_EMBEDDING_VECTORS}): not a Textual Inversion embedding")
        token = name.rsplit("/", 1)[-1] if key in GENERIC_EMBEDDING_KEYS else key
        return "embedding", "embedding", token
    if len(keys) > 1 and len(vectors) == len(keys) and not any(k.endswith((".weight", ".bias")) for k in keys):
        raise AdapterError(name, f"holds {len(keys)} embeddings ({', '.join(repr(k) for k in keys[:4])}"
                                 f"{', ...' if len(keys) > 4 else ''}); sdfleet loads one embedding per file: save "
                                 "each in a file of its own, and list them all in the rows' `adapters`")
    shown = ", ".join(repr(k) for k in keys[:3]) + (", ..." if len(keys) > 3 else "")
    raise AdapterError(name, f"has no LoRA or embedding keys ({len(keys)} tensors: {shown}); "
                             "expected kohya `lora_unet_*.lora_down.weight`, diffusers `unet.*.lora_A.weight`, "
                             "or one embedding tensor")
