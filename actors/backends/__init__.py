"""How an actor runs its pipeline: eager PyTorch, torch.compile, ONNX Runtime or TensorRT, adapters kept swappable.

One small interface, `Backend`: made once per loaded pipeline (`make_backend`), then
`activate(adapters)` before each batch makes the pipeline draw with exactly those adapters
(`[]`: the base model). Acceleration and adapter swapping pull against each other, and each backend
settles that its own way:

- `eager`: peft adapters loaded once and switched by activation (`actors.adapter_cache.AdapterCache`).
- `compile`: the UNet under `torch.compile`. It holds one LoRA slot of a fixed rank on every adaptable
  layer (diffusers' `enable_lora_hotswap`); an adapter set (a blend too, concatenated into one LoRA) is
  hotswapped into that slot in place, so a swap never recompiles.
- `onnx`: UNet, text encoder and VAE decoder exported once per (model, size) and run by ONNX Runtime. The
  adaptable layers' weights are inputs of the graphs; a swap writes `W0 + s * B @ A` into them for the
  union of layers the old and the new set touch (`actors.lora_map.switch_updates`).
- `tensorrt`: a refittable engine built from the same ONNX, the same union of layers refitted with
  `trt.Refitter` (NVIDIA GPUs only).

`check_backend` says before any actor starts whether a backend can run here, and what is missing if not.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import time

import torch

from actors.adapter_cache import (
    AdapterCache,
    check_embedding_fits,
    check_embedding_scale,
    check_lora_fits,
    load_embedding,
    normalise,
)
from actors.adapters import AdapterError, AdapterInfo, AdapterStore
from actors.lora_map import Layers, LoraMapError, lora_layers

BACKENDS = ("eager", "compile", "onnx", "tensorrt")

# The layers a LoRA may adapt under compile, onnx and tensorrt: every Linear of the UNet's transformer
# blocks (attention projections, feed-forward, proj_in/out) and of the text encoder's layers. What
# `sdfleet finetune lora`, diffusers and kohya trainers write falls inside this; a LoRA on convolutions
# (LoCon) runs on the eager backend only.
ADAPTABLE = {
    "unet": re.compile(r"(\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|\.ff\.net\.(0\.proj|2)|\.proj_(in|out))$"),
    "text_encoder": re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"),
}


class BackendError(RuntimeError):
    """A backend that cannot run here, or cannot do what a row asks; the message says what would."""


def check_backend(name: str, device: str) -> None:
    """Raise BackendError unless backend `name` can run actors on `device` ("cpu" or "cuda")."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
    if name == "compile" and device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise BackendError("--backend compile on CPU needs a C++ compiler (g++) for TorchInductor; install one "
                           "or use --backend eager/onnx")
    if name == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise BackendError("--backend onnx needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu on GPUs)")
    if name == "tensorrt":
        missing = []
        if device != "cuda":
            missing.append("an NVIDIA GPU (the cluster has none, or --device cpu was given)")
        if importlib.util.find_spec("tensorrt") is None:
            missing.append("the tensorrt package (pip install '.[tensorrt]')")
        if missing:
            raise BackendError(f"--backend tensorrt needs {' and '.join(missing)}; use --backend compile or onnx")


def make_backend(name: str, pipe, store: AdapterStore | None, *, cache_uri: str | None = None,
                 fingerprint: str = "", max_batch: int = 8, max_lora_rank: int = 64) -> "Backend":
    """The backend `name` around a freshly loaded `pipe` (which it may change: compile it, export it)."""
    if name == "eager":
        return EagerBackend(pipe, store)
    if name == "compile":
        return CompileBackend(pipe, store, max_lora_rank=max_lora_rank)
    if name == "onnx":
        from actors.backends.onnx import OnnxBackend

        return OnnxBackend(pipe, store, cache_uri=cache_uri, fingerprint=fingerprint, max_batch=max_batch)
    if name == "tensorrt":
        from actors.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(pipe, store, cache_uri=cache_uri, fingerprint=fingerprint, max_batch=max_batch)
    raise BackendError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")


class Backend:
    """A pipeline ready to draw, plus the adapters it can switch to. Subclasses implement `_switch`."""

    name = "?"

    def __init__(self, pipe, store: AdapterStore | None):
        self.pipe = pipe
        self.store = store
        self.swaps = 0  # activate() calls that changed the pipeline
        self.swap_seconds = 0.0  # the time those calls took, adapter reads included

    def activate(self, adapters) -> bool:
        """Draw with exactly `adapters` (`[{"name", "scale", "fingerprint"?}]`) from now on; True if it changed."""
        if adapters and self.store is None:
            raise AdapterError(adapters[0]["name"], "is asked for, but the run has no adapter store (--adapters)")
        started = time.perf_counter()
        changed = self._switch(adapters or [])
        if changed:
            self.swaps += 1
            self.swap_seconds += time.perf_counter() - started
        return changed

    def _switch(self, adapters) -> bool:
        raise NotImplementedError

    def stats(self) -> dict:
        return {"backend": self.name, "swaps": self.swaps, "swap_seconds": self.swap_seconds}


class EagerBackend(Backend):
    """Plain PyTorch; adapters through the peft adapter cache."""

    name = "eager"

    def __init__(self, pipe, store):
        super().__init__(pipe, store)
        self.cache = AdapterCache(pipe, store) if store is not None else None

    def _switch(self, adapters) -> bool:
        return self.cache.activate(adapters) if self.cache is not None else False

    def stats(self) -> dict:
        return {**super().stats(), **(self.cache.stats() if self.cache is not None else {})}


class FixedAdapters:
    """Adapter files read once and kept as plain matrices (`actors.lora_map.lora_layers`), for the
    backends that apply LoRAs themselves; Textual Inversion embeddings go into the pipeline once, as on eager.

    `request(adapters)` returns the LoRA set as `[(layers, scale)]` in name order, checked against the
    pipeline's layers and `adaptable` (the layers the backend can change), with clear AdapterErrors.
    """

    def __init__(self, pipe, store: AdapterStore, adaptable: set[str], max_adapters: int = 16):
        self.pipe = pipe
        self.store = store
        self.adaptable = adaptable
        self.max_adapters = max_adapters
        self.loras: dict[str, tuple[AdapterInfo, Layers]] = {}  # insertion order = least recently used first
        self.embeddings: dict[str, AdapterInfo] = {}
        self.loads = 0

    def request(self, adapters) -> tuple[list[tuple[Layers, float]], tuple, bool]:
        """The LoRA set `adapters` asks for, a key naming it (fingerprints and scales), and whether an
        embedding was loaded for it."""
        out, key, loaded_embedding = [], [], False
        for name, scale, fingerprint in normalise(adapters):
            entry = self.loras.get(name)
            if entry is not None and fingerprint in (None, entry[0].fingerprint):
                self.loras[name] = self.loras.pop(name)  # most recently used
                out.append((entry[1], scale))
                key.append((entry[0].fingerprint, scale))
                continue
            known = self.embeddings.get(name)
            if known is not None and fingerprint in (None, known.fingerprint):
                check_embedding_scale(name, scale)
                continue
            info, state_dict = self.store.load_planned(name, fingerprint)
            if info.kind == "embedding":
                check_embedding_scale(name, scale)
                self._load_embedding(info, state_dict)
                loaded_embedding = True
                continue
            check_lora_fits(self.pipe, name, state_dict)
            try:
                layers = lora_layers(self.pipe, state_dict)
            except LoraMapError as exc:
                raise AdapterError(name, str(exc)) from exc
            outside = sorted(set(layers) - self.adaptable)
            if outside:
                more = f" (and {len(outside) - 2} more)" if len(outside) > 2 else ""
                raise AdapterError(name, f"adapts {', '.join(outside[:2])}{more}, which this backend cannot change "
                                         "(it adapts the Linear layers of attention blocks and the text encoder); "
                                         "use --backend eager for this adapter")
            self.loras.pop(name, None)
            while len(self.loras) >= self.max_adapters:
                self.loras.pop(next(iter(self.loras)))
            self.loras[name] = (info, layers)
            self.loads += 1
            out.append((layers, scale))
            key.append((info.fingerprint, scale))
        return out, tuple(key), loaded_embedding

    def _load_embedding(self, info: AdapterInfo, state_dict) -> None:
        if info.name in self.embeddings:
            raise AdapterError(info.name, "was replaced in the store during the run; an embedding cannot be "
                                          "reloaded on this backend (restart the run)")
        check_embedding_fits(self.pipe, info, state_dict)
        load_embedding(self.pipe, info, state_dict)
        self.embeddings[info.name] = info
        self.loads += 1


def adaptable_layers(pipe) -> dict[str, torch.nn.Linear]:
    """`{"unet.<path>": layer, "text_encoder.<path>": layer}` for every layer the fused backends can adapt."""
    out = {}
    for part, pattern in ADAPTABLE.items():
        for path, module in getattr(pipe, part).named_modules():
            if isinstance(module, torch.nn.Linear) and pattern.search("." + path):
                out[f"{part}.{path}"] = module
    return out


class CompileBackend(Backend):
    """The UNet under torch.compile; adapters hotswapped into one fixed-rank LoRA slot, so never a recompile.

    A blend is concatenated into one LoRA (`lora_map.concat_layers`) whose rank is the sum of its parts;
    `max_lora_rank` bounds that sum (every slot matrix is padded to it, so a larger rank costs compute).
    `compiles` counts the graphs TorchInductor built: a new batch size builds one, a swap never should.
    """

    name = "compile"
    SLOT = "slot"

    def __init__(self, pipe, store: AdapterStore | None, max_lora_rank: int = 64):
        super().__init__(pipe, store)
        self.rank = max_lora_rank
        self.compiles = 0
        layers = adaptable_layers(pipe) if store is not None else {}
        self.adapters = FixedAdapters(pipe, store, set(layers)) if store is not None else None
        # the UNet's layers get the hotswap slot; the text encoder (not compiled, and diffusers cannot
        # hotswap it) gets the fused weights `W0 + s * B @ A`, written in place like the onnx backend's
        self.layers = {n: m for n, m in layers.items() if n.startswith("unet.")}
        self.text_layers = {n: m for n, m in layers.items() if n.startswith("text_encoder.")}
        self.text_base = {n: m.weight.detach().clone() for n, m in self.text_layers.items()}
        self._text_set: list[tuple[Layers, float]] = []
        self._active: tuple | None = ()
        if store is not None:
            # 1. the slot: a zero LoRA of the full rank on every adaptable layer, before compiling
            pipe.enable_lora_hotswap(target_rank=self.rank)
            self._load_slot({}, hotswap=False)
        # 2. compile the UNet; a counting wrapper around TorchInductor tells recompiles apart
        inductor = torch._dynamo.lookup_backend("inductor")

        def counting(graph, example_inputs):
            self.compiles += 1
            return inductor(graph, example_inputs)

        pipe.unet = torch.compile(pipe.unet, backend=counting)

    def _switch(self, adapters) -> bool:
        loras, key, loaded_embedding = self.adapters.request(adapters) if self.adapters else ([], (), False)
        if key == self._active:
            return loaded_embedding
        from actors.lora_map import concat_layers, switch_updates

        self._active = None
        # 1. the text encoder: fused weights for every layer the old or the new set touches
        text_set = [({n: ab for n, ab in layers.items() if n in self.text_layers}, scale) for layers, scale in loras]
        with torch.no_grad():
            for name, weight in switch_updates(self.text_base, self._text_set, text_set).items():
                self.text_layers[name].weight.copy_(weight)
        self._text_set = text_set
        # 2. the UNet: the whole set as one LoRA, hotswapped into the slot
        combined = concat_layers([({n: ab for n, ab in layers.items() if n in self.layers}, s) for layers, s in loras])
        rank = max((a.shape[0] for a, _ in combined.values()), default=0)
        if rank > self.rank:
            names = ", ".join(a["name"] for a in adapters)
            raise AdapterError(names, f"together have LoRA rank {rank}, above the compile backend's slot rank "
                                      f"{self.rank} (raise --max-lora-rank)")
        self._load_slot(combined, hotswap=True)
        self._active = key
        return True

    def _load_slot(self, combined: Layers, hotswap: bool) -> None:
        """Write `combined` into the slot, zero-padded to the slot's rank; every other slot layer gets zeros."""
        state_dict = {}
        for name, layer in self.layers.items():
            a = torch.zeros(self.rank, layer.in_features)
            b = torch.zeros(layer.out_features, self.rank)
            if name in combined:
                ca, cb = combined[name]
                a[: ca.shape[0]], b[:, : cb.shape[1]] = ca, cb
            dtype = layer.weight.dtype
            state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"] = a.to(dtype), b.to(dtype)
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            self.pipe.load_lora_weights(state_dict, adapter_name=self.SLOT, hotswap=hotswap)
        finally:
            diffusers_logging.set_verbosity(verbosity)

    def stats(self) -> dict:
        return {**super().stats(), "compiles": self.compiles, "slot_rank": self.rank if self.layers else None}
