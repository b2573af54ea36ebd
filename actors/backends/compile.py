"""The compile backend: the UNet and the VAE decoder under torch.compile, adapters fused into the weights in place.

A swap writes `W0 + sum(s * B @ A)` into the weights of every layer the old or the new adapter set touches
(`actors.lora_map.InPlaceLoras`, the same union mapping the onnx and tensorrt backends use). The compiled
graphs hold no LoRA modules, so there is no rank limit, no LoRA compute per step, LoRAs on convolutions
(LoCon) work, and since the weights keep their storage, no swap recompiles or re-captures a CUDA graph.

What torch.compile builds is kept in the backend cache (`CompileCache`), so another actor, node or run
starts warm instead of compiling again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time

import torch

from actors.adapters import AdapterStore
from actors.backends.base import Backend, FixedAdapters
from actors.lora_map import InPlaceLoras
from actors.models import cache_key, hardware_name

MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CACHE_VERSION = 1  # bump when what the compiled graphs contain changes, so old artefacts are not loaded


@dataclasses.dataclass(frozen=True)
class CompileSettings:
    """How the graphs are built. `for_device` picks the defaults; the benchmark tries the others
    (`benchmarks/bench_backends.py --backends compile/qkv=1/...`), and docs/backends.md records what each is worth."""

    mode: str = "default"  # torch.compile's mode; "reduce-overhead" and "max-autotune" add CUDA graphs on GPUs
    channels_last: bool = False  # UNet and VAE in NHWC: what cuDNN's fastest convolutions want
    fuse_qkv: bool = False  # one projection for q, k and v (k and v in cross-attention) instead of three
    compile_vae: bool = True  # the VAE decoder compiled too, not only the UNet

    @classmethod
    def for_device(cls, device: str, mode: str = "auto") -> "CompileSettings":
        if mode not in MODES:
            raise ValueError(f"unknown compile mode {mode!r}; modes: {', '.join(MODES)}")
        if device == "cuda":  # the anchors' recipe; GPU figures for each part are owed (docs/backends.md)
            return cls(mode="reduce-overhead" if mode == "auto" else mode, channels_last=True, fuse_qkv=True)
        # CUDA graphs are all reduce-overhead adds: on a CPU it is the default mode, and shares its cached graphs
        return cls(mode="default" if mode in ("auto", "reduce-overhead") else mode)


def fuse_qkv(unet) -> None:
    """diffusers' fused projections (`to_qkv`, and `to_kv` in cross-attention), with the old `to_q`,
    `to_k`, `to_v` weights turned into views of the fused one: LoRA layers keep their names, a write into
    `to_k.weight` lands in `to_qkv`, and the model holds each weight once."""
    from diffusers.models.attention_processor import Attention

    unet.fuse_qkv_projections()
    for module in unet.modules():
        if not isinstance(module, Attention) or not getattr(module, "fused_projections", False):
            continue
        fused, parts = (module.to_kv, ("to_k", "to_v")) if module.is_cross_attention else \
            (module.to_qkv, ("to_q", "to_k", "to_v"))
        start = 0
        for part in parts:
            layer = getattr(module, part)
            rows = layer.weight.shape[0]
            layer.weight = torch.nn.Parameter(fused.weight.data[start:start + rows], requires_grad=False)
            if layer.bias is not None and fused.bias is not None:
                layer.bias = torch.nn.Parameter(fused.bias.data[start:start + rows], requires_grad=False)
            start += rows


def adaptable_weights(pipe) -> dict[str, torch.Tensor]:
    """Every Linear and Conv2d weight of the UNet and the text encoder, as `{"unet.<path>": weight}`."""
    out = {}
    for part in ("unet", "text_encoder"):
        for path, module in getattr(pipe, part).named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not path.endswith(("to_qkv", "to_kv")):
                out[f"{part}.{path}"] = module.weight
    return out


# Graphs dynamo may build for one compiled function (the UNet's forward, the decoder's) before it draws that
# function eagerly for good, saying so only in a log line. torch's default of 8 is reached by one actor
# drawing a catalogue's mix: batch 1 and the rest, unguided rows (the UNet's batch halves), a latent side not
# divisible by 4, a decoder guard near 20,480 latent pixels (review of 2026-12-06: 18 shapes hit it on tiny).
RECOMPILE_LIMIT = 64
EAGER_FALLBACK = "recompile limit exceeded"  # dynamo's `unimplemented` counter for a function given up on


def eager_fallbacks() -> int:
    """Functions dynamo has stopped compiling in this process because they hit the recompile limit."""
    from torch._dynamo.utils import counters

    return sum(n for reason, n in counters["unimplemented"].items() if EAGER_FALLBACK in reason.lower())


class CompileCache:
    """torch.compile's artefacts (Inductor's generated code, AOTAutograd graphs, autotuning results) for one
    (model, settings, device, torch) in the backend cache: `<cache>/torch-compile/<key>/<name>.bin`.

    `load()` before the first compile pre-fills torch's local caches from the newest files there; `save()`
    after a compile writes the artefacts the store does not hold yet, whether Inductor built them or found them
    in the node's own torch cache (a node warm from an earlier run, or from another store, still fills this
    one). What the store holds is judged by content: one torch key can hold several graphs, each guarded for
    other sizes. The files hold code torch runs: the store must be as private as the cluster's image (see
    docs/backends.md).
    """

    MAX_FILES = 64  # the newest files loaded; older ones only add graphs built for sizes no longer drawn
    KEEP_FILES = 4 * MAX_FILES  # older files than these are removed after a save: nothing loads them

    def __init__(self, uri: str | None, key: str):
        from actors.models import backend_cache_folder

        self.fs, self.folder = backend_cache_folder(uri, f"torch-compile/{key}")
        self.loaded = 0
        self.saved = 0
        self._held: set[tuple[str, str, str]] = set()  # (kind, key, content digest) the store is known to hold

    def load(self) -> None:
        try:
            files = self._files()
        except FileNotFoundError:
            return
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read: compiled cold, as without one
            logging.getLogger(__name__).warning("the compile cache %s was not read: %s", self.folder, exc)
            return
        from torch.compiler._cache import CacheArtifactManager

        for name in files[-self.MAX_FILES:]:
            try:
                artifacts = CacheArtifactManager.deserialize(self.fs.cat_file(name))  # None: not torch's (damaged)
            except FileNotFoundError:  # removed by another actor's save since the listing (KEEP_FILES)
                continue
            if artifacts:
                CacheArtifactManager.populate_caches(artifacts)
                self.loaded += 1
                self._held |= _contents(artifacts)

    def save(self) -> None:
        """Write what this process compiled or found since its last save, and the store lacks, as one more file
        (named by what it holds: written again, it replaces itself). A process whose graphs all came from the
        store writes nothing.

        torch records an artefact both when Inductor builds it and when its local cache supplies it, so a node
        whose own cache is warm still writes to a store that is empty (another bucket, a wiped cache): other
        nodes start warm from it. torch's saver appends each batch to everything saved before, while its loader
        keeps only the last batch of each kind a file holds: every file is needed, and the tenth was ten times
        the first (91 MB over 10 sizes of tiny). So what was saved is forgotten after each save, written or not
        (a batch whose write failed would be dead bytes in the next file), and each file holds one batch."""
        from torch.compiler._cache import CacheArtifactManager

        if not CacheArtifactManager.need_serialize():  # (after each UNet and decoder call: mostly this)
            return
        saved = torch.compiler.save_cache_artifacts()
        _forget_saved_artifacts()
        artifacts = CacheArtifactManager.deserialize(saved[0]) if saved else None
        held = _contents(artifacts) if artifacts else set()
        if held <= self._held:
            return
        name = hashlib.sha256(json.dumps(sorted(held)).encode()).hexdigest()[:20]
        try:
            self.fs.makedirs(self.folder, exist_ok=True)
            self.fs.pipe_file(f"{self.folder}/{name}.bin", saved[0])
        except Exception as exc:  # noqa: BLE001 - the next run compiles cold; this one draws on
            logging.getLogger(__name__).warning("compiled graphs were not kept in %s: %s", self.folder, exc)
            return
        self.saved += 1
        self._held |= held
        self._prune()

    def _files(self) -> list[str]:
        """The store's files, oldest first."""
        listed = self.fs.ls(self.folder, detail=True)
        listed.sort(key=lambda f: f.get("mtime") or f.get("LastModified") or 0)
        return [f["name"] for f in listed if f["name"].endswith(".bin")]

    def _prune(self) -> None:
        """Remove the files older than the newest KEEP_FILES: no actor loads them any more."""
        try:
            for name in self._files()[:-self.KEEP_FILES]:
                self.fs.rm_file(name)
        except Exception as exc:  # noqa: BLE001 - another actor pruned first, a store that refuses deletes
            logging.getLogger(__name__).debug("the compile cache %s was not pruned: %s", self.folder, exc)


def _contents(artifacts: dict) -> set[tuple[str, str, str]]:
    """(kind, key, content digest) of each artefact in torch's `{kind: [CacheArtifact]}`."""
    return {(kind, a.key, hashlib.sha256(a.content).hexdigest()) for kind, found in artifacts.items() for a in found}


def _forget_saved_artifacts() -> None:
    """Start torch's next save afresh (its serializer and the summary of what it holds). A torch without
    these private parts keeps appending: larger files, the same graphs."""
    try:
        from torch.compiler._cache import CacheArtifactManager

        CacheArtifactManager._serializer.clear()
        CacheArtifactManager._cache_info.clear()
    except (ImportError, AttributeError):
        pass


def compile_key(fingerprint: str, settings: CompileSettings, device: torch.device, dtype: torch.dtype) -> str:
    """The cache key of one model's compiled graphs: everything that changes the code torch generates."""
    return cache_key({"model": fingerprint, "settings": dataclasses.asdict(settings), "device": hardware_name(device),
                      "dtype": str(dtype), "torch": torch.__version__, "python": sys.version_info[:2],
                      "version": CACHE_VERSION})


class CompileBackend(Backend):
    """UNet and VAE decoder under torch.compile; any adapter set written into the weights in place.

    `compiles` counts the graphs dynamo handed to Inductor since this backend was made: a new batch size
    builds one, a swap never should.
    """

    name = "compile"

    def __init__(self, pipe, store: AdapterStore | None, *, cache_uri: str | None = None, fingerprint: str = "",
                 settings: CompileSettings | None = None):
        super().__init__(pipe, store)
        device = pipe.unet.device
        self.settings = settings or CompileSettings.for_device(device.type)
        if self.settings.fuse_qkv:
            fuse_qkv(pipe.unet)
        if self.settings.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        targets = adaptable_weights(pipe)
        self.loras = InPlaceLoras(targets)
        self.adapters = FixedAdapters(pipe, store, set(targets)) if store is not None else None
        self._active: tuple | None = ()
        self.cache = CompileCache(cache_uri, compile_key(fingerprint or "unnamed", self.settings, device, pipe.unet.dtype))
        started = time.perf_counter()
        self.cache.load()
        self.cache_load_seconds = time.perf_counter() - started
        self._graphs_at_start, self._fallbacks_at_start = self._graphs(), eager_fallbacks()
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        options = dict(mode=None if self.settings.mode == "default" else self.settings.mode)
        pipe.unet = torch.compile(pipe.unet, **options)
        pipe.unet.register_forward_hook(self._after_call)
        # With CUDA graphs a compiled call's output lives in the graph's memory, which the next call
        # overwrites. The pipeline mostly uses a step's output within the step, but without guidance (scale
        # <= 1) the scheduler gets it raw and PNDM keeps it for later steps: each step's output is copied out.
        if device.type == "cuda" and self.settings.mode in ("reduce-overhead", "max-autotune"):
            pipe.unet.register_forward_hook(self._copy_out)
        if self.settings.compile_vae:
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, **options)
            pipe.vae.decoder.register_forward_hook(self._after_call)

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]

    @property
    def compiles(self) -> int:
        return self._graphs() - self._graphs_at_start

    def _after_call(self, module, inputs, output) -> None:
        """After each call: whatever it had to compile goes into the backend cache (`save` writes only then)."""
        self.cache.save()

    @staticmethod
    def _copy_out(module, inputs, output):
        """The UNet's output, out of the CUDA graph's memory (a forward hook's return replaces the output)."""
        if isinstance(output, tuple):
            return (output[0].clone(), *output[1:])
        output.sample = output.sample.clone()
        return output

    def _switch(self, adapters) -> bool:
        loras, key, loaded_embedding = self.adapters.request(adapters) if self.adapters else ([], (), False)
        if key == self._active:
            return loaded_embedding
        self._active = None
        self.loras.switch(loras)
        self._active = key
        return True

    def stats(self) -> dict:
        from torch._dynamo.utils import counters

        return {**super().stats(), "compiles": self.compiles, "mode": self.settings.mode,
                "eager_fallbacks": eager_fallbacks() - self._fallbacks_at_start,
                "compile_cache": {"files_loaded": self.cache.loaded, "files_saved": self.cache.saved,
                                  "load_seconds": round(self.cache_load_seconds, 3),
                                  "graph_hits": counters["inductor"]["fxgraph_cache_hit"],
                                  "graph_misses": counters["inductor"]["fxgraph_cache_miss"]}}
