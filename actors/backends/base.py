"""What every backend is: a pipeline ready to draw plus `activate(adapters)`, the layers a fused LoRA may
change, and the adapter files kept as plain matrices for the backends that apply LoRAs themselves."""

from __future__ import annotations

import re
import time

import torch

from actors.adapter_cache import check_embedding_fits, check_embedding_scale, check_lora_fits, load_embedding, normalise
from actors.adapters import AdapterError, AdapterInfo, AdapterStore
from actors.lora_map import Layers

# The layers a LoRA may adapt under onnx and tensorrt: every Linear of the UNet's transformer
# blocks (attention projections, feed-forward, proj_in/out) and of the text encoder's layers. What
# `sdfleet finetune lora`, diffusers and kohya trainers write falls inside this; a LoRA on convolutions
# (LoCon) runs on the eager and compile backends.
ADAPTABLE = {
    "unet": re.compile(r"(\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|\.ff\.net\.(0\.proj|2)|\.proj_(in|out))$"),
    "text_encoder": re.compile(r"\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"),
}


from actors.backends.errors import BackendError  # noqa: E402,F401 - re-exported: the backends import it from here


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
            layers = check_lora_fits(self.pipe, name, state_dict)
            outside = sorted(set(layers) - self.adaptable)
            if outside:
                more = f" (and {len(outside) - 2} more)" if len(outside) > 2 else ""
                raise AdapterError(name, f"adapts {', '.join(outside[:2])}{more}, which this backend cannot change "
                                         "(it adapts the Linear layers of attention blocks and the text encoder); "
                                         "use --backend eager or compile for this adapter")
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
