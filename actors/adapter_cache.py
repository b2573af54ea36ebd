"""Adapters on one loaded pipeline: each loaded once, switched by activation, least recently used out.

Reloading a pipeline per style wastes most of a GPU; loading a LoRA's few MB once and switching the
active set costs milliseconds. What makes a switch leave no trace (each checked by tests/test_adapters.py):

- No adapter: `pipe.disable_lora()`. peft's LoRA layers then call only their base layer, so the pixels are
  bit-identical to a pipeline that never saw a LoRA. (`pipe.set_adapters([])` raises KeyError in
  diffusers 0.42, so it is not the way back to base.)
- Scale 0: the adapter is left out of the active set, so a row at scale 0 is the base model by
  construction (no `0 * inf = NaN` from an overflowing fp16 LoRA branch).
- A -> B -> A: peft's `set_scale` recomputes each layer's scaling from alpha / rank every time, so no
  drift accumulates; adapters are activated in name order, so a blend sums in one order.
- A file that does not fit (another base model's LoRA) is checked against the model's layers before
  diffusers touches the pipeline: diffusers' own clean-up after a size mismatch leaves peft wrappers and
  an empty `peft_config` behind. If a load still fails, every LoRA is unloaded (`unload_lora_weights`
  puts the original layers back) and the cache forgets them, so the pipeline is the base model again.

Textual Inversion embeddings are loaded once (`load_textual_inversion`) and never deactivated: they add a
new token and only change prompts that contain it. A prompt that uses the token without naming the
embedding in its row (or names it at scale 0) would draw differently on an actor that happens to hold
it, so tokens should be words no prompt uses by accident (`<name>`). Embeddings do not count against the LoRA bounds.
"""

from __future__ import annotations

import re
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

from diffusers.utils import logging as diffusers_logging

from actors.adapters import AdapterError, AdapterInfo, AdapterStore, embedding_scale_problem, word_token_cause
from actors.lora_map import Layers, LoraMapError, lora_layers, lora_state_dict
from actors.tokenizer import known_word
from manifests.schema import LISTED_TWICE, adapter_listed_twice, error_line

GiB = 1024**3


@dataclass
class _Loaded:
    info: AdapterInfo
    peft_name: str  # the name inside diffusers/peft; carries the fingerprint, so a replaced file is a new adapter
    nbytes: int


class AdapterCache:
    """The adapters loaded into one pipeline, bounded by count and bytes, least recently used evicted first.

    `pipe` must hold no LoRA when handed over. `max_bytes` counts LoRA matrices in the UNet's dtype (half
    the file size in fp16 for an fp32 file); embeddings are not counted (a few KB each, never evicted).
    """

    def __init__(self, pipe, store: AdapterStore, max_adapters: int = 8, max_bytes: int = 2 * GiB):
        if max_adapters < 1 or max_bytes < 1:
            raise ValueError("max_adapters and max_bytes must be at least 1")
        self.pipe = pipe
        self.store = store
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self._loras: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._embeddings: dict[str, tuple[AdapterInfo, list[str]]] = {}  # name -> (info, tokens added)
        # (peft_name, scale) now applied; () is the base model (the pipeline is handed over without LoRAs);
        # None when diffusers changed it behind our back (a load activates its adapter) and it must be set again
        self._active: tuple[tuple[str, float], ...] | None = ()
        self._enabled: bool | None = None  # LoRA layers switched on; None: unknown (after a load or eviction)
        self.swaps = 0  # activate() calls that changed the pipeline
        self.swap_seconds = 0.0  # time those calls took, loads included
        self.loads = 0
        self.evictions = 0

    def activate(self, adapters) -> bool:
        """Make the pipeline draw with exactly `adapters` (`[{"name", "scale", "fingerprint"?}]`, [] for base).

        Returns True if the pipeline changed. A `fingerprint` (as rows carry it) must match the store's file,
        so a file replaced mid-run fails its rows instead of drawing them with other weights. Raises
        AdapterError naming the adapter and the cause. A file that is missing, unreadable or does not fit
        leaves the pipeline as it was; a failure inside diffusers unloads every LoRA (the base model).
        """
        started = time.perf_counter()
        changed = False
        # 1. check the request; scale 0 is the base model, so it is left out
        wanted = normalise(adapters)
        # 2. resolve and read what is not loaded yet, and check it fits, before touching the pipeline
        loras, embeddings, staged = [], [], {}
        for name, scale, fingerprint in wanted:
            entry = self._loras.get(name)
            if entry is not None and fingerprint in (None, entry.info.fingerprint):
                loras.append((name, scale))
                continue
            known = self._embeddings.get(name)
            if known is not None and fingerprint in (None, known[0].fingerprint):
                embeddings.append((name, scale))
                continue
            info, state_dict = self.store.load_planned(name, fingerprint)
            if info.kind == "lora":
                state_dict = check_lora_fits(self.pipe, name, state_dict)  # the layers, as every backend reads them
                loras.append((name, scale))
            else:
                owned = known[1] if known is not None else []  # a replaced file may reuse its own tokens
                check_embedding_fits(self.pipe, info, state_dict, owned=owned)
                embeddings.append((name, scale))
            staged[name] = (info, state_dict)
        for name, scale in embeddings:
            check_embedding_scale(name, scale)
        # 3. load embeddings once; they only act where a prompt uses their token
        for name, _ in embeddings:
            if name in staged:
                self._load_embedding(*staged[name])
                changed = True
        # 4. load missing LoRAs, making room by evicting those this request does not use
        needed = {name for name, _ in loras}
        for name, _ in loras:
            if name in staged:
                info, layers = staged.pop(name)
                nbytes = _lora_bytes(self.pipe, layers)
                self._make_room(nbytes, keep=needed)
                self._load_lora(info, layers, nbytes)
                changed = True
            self._loras.move_to_end(name)
        # 5. switch: the exact base model, or the wanted blend
        target = tuple((self._loras[name].peft_name, scale) for name, scale in loras)
        if target != self._active:
            self._apply(target)
            changed = True
        if changed:
            self.swaps += 1
            self.swap_seconds += time.perf_counter() - started
        return changed

    def stats(self) -> dict:
        """Counters for run.json: swaps, swap_seconds, loads, evictions, and what is loaded now."""
        return {
            "swaps": self.swaps, "swap_seconds": self.swap_seconds, "loads": self.loads,
            "evictions": self.evictions, "loaded": list(self._loras), "embeddings": list(self._embeddings),
            "loaded_bytes": sum(e.nbytes for e in self._loras.values()),
        }

    # -- the pipeline side ----------------------------------------------------------------------------

    def _apply(self, target: tuple[tuple[str, float], ...]) -> None:
        self._active = None  # until diffusers has finished
        # enable/disable walk every module: half the cost of a switch, so only when the state changes
        if not target:
            if self._enabled is not False:
                self.pipe.disable_lora()  # exact: peft layers call only their base layer
            self._enabled = False
        else:
            if self._enabled is not True:
                self.pipe.enable_lora()
            self._enabled = True
            self.pipe.set_adapters([n for n, _ in target], adapter_weights=[s for _, s in target])
        self._active = target

    def _load_lora(self, info: AdapterInfo, layers: Layers, nbytes: int) -> None:
        # peft keeps adapters in ModuleDicts: no dots in names
        peft_name = f"{re.sub(r'[^A-Za-z0-9_]', '_', info.name)}__{info.fingerprint}"
        while any(e.peft_name == peft_name for e in self._loras.values() if e.info.name != info.name):
            peft_name += "_"  # "a-b" and "a_b" holding the same bytes
        old = self._loras.pop(info.name, None)
        if old is not None:  # the file was replaced: the old weights go
            self.pipe.delete_adapters(old.peft_name)
        verbosity = diffusers_logging.get_verbosity()
        try:
            with warnings.catch_warnings():
                # peft warns on every second adapter in a model; several adapters are the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # diffusers logs a warning per UNet-only LoRA ("No LoRA keys associated to CLIPTextModel")
                diffusers_logging.set_verbosity_error()
                # the matrices as lora_layers reads them, each layer's alpha / rank in its B: diffusers would give
                # a kohya file's attention layers one alpha for all (its alpha_pattern misses their keys)
                self.pipe.load_lora_weights(lora_state_dict(layers), adapter_name=peft_name)
        except Exception as exc:
            self._reset_loras()
            raise AdapterError(info.name, f"did not load ({error_line(exc)}); "
                                          "all LoRAs were unloaded, the pipeline is the base model") from exc
        finally:
            diffusers_logging.set_verbosity(verbosity)
        self._loras[info.name] = _Loaded(info, peft_name, nbytes)
        self.loads += 1
        self._active = self._enabled = None  # load_lora_weights made the new adapter the only active one

    def _make_room(self, nbytes: int, keep: set[str]) -> None:
        """Evict least recently used LoRAs not in `keep` until one more of `nbytes` fits the bounds.

        The adapters one row needs are never evicted, so a single blend may exceed the bounds.
        """
        def over() -> bool:
            used = sum(e.nbytes for e in self._loras.values())
            return len(self._loras) + 1 > self.max_adapters or used + nbytes > self.max_bytes

        for name in [n for n in self._loras if n not in keep]:
            if not over():
                break
            entry = self._loras.pop(name)
            self.pipe.delete_adapters(entry.peft_name)
            self.evictions += 1
            self._enabled = None
            if any(peft_name == entry.peft_name for peft_name, _ in self._active or ()):
                self._active = None  # what was active is gone

    def _reset_loras(self) -> None:
        """Back to the base model's own layers after a failed load: unwrap every LoRA layer."""
        self.pipe.unload_lora_weights()
        self._loras.clear()
        self._active, self._enabled = (), None

    def _load_embedding(self, info: AdapterInfo, state_dict) -> None:
        old = self._embeddings.pop(info.name, None)
        if old is not None:  # the file was replaced: drop the old vectors first
            self.pipe.unload_textual_inversion(old[1])
        tokens = load_embedding(self.pipe, info, state_dict)
        self._embeddings[info.name] = (info, tokens)
        self.loads += 1


def normalise(adapters) -> list[tuple[str, float, str | None]]:
    """[(name, scale, fingerprint or None)] in name order, scale-0 entries dropped; a name listed twice is an error."""
    adapters = list(adapters or [])
    twice = adapter_listed_twice(item["name"] for item in adapters)
    if twice:
        raise AdapterError(twice, LISTED_TWICE)
    out = []
    for item in adapters:
        name, scale = item["name"], float(item.get("scale", 1.0))
        if scale != 0.0:
            out.append((name, scale, item.get("fingerprint") or None))
    return sorted(out)


def _lora_bytes(pipe, layers: Layers) -> int:
    """Bytes the adapter takes once loaded: its matrices in the UNet's dtype."""
    itemsize = next(pipe.unet.parameters()).element_size()
    return sum(a.numel() + b.numel() for a, b in layers.values()) * itemsize


def check_embedding_scale(name: str, scale: float) -> None:
    """Raise AdapterError unless an embedding is asked for at scale 1 (it has no scale; 0 leaves it out)."""
    problem = embedding_scale_problem(scale)
    if problem:
        raise AdapterError(name, problem)


def load_embedding(pipe, info: AdapterInfo, state_dict) -> list[str]:
    """Load a Textual Inversion embedding into `pipe`; returns the tokens it added. They are added in lower
    case, as CLIP's tokenizer reads every prompt: diffusers spells a multi-vector token out into its vectors'
    tokens by its exact spelling, so `EasyNegative`, or `<GEM>` written for `<gem>`, drew with the first
    vector alone (see actors.generate.spelled_as_loaded)."""
    tensor = next(iter(state_dict.values()))
    token = info.token.lower()
    try:
        pipe.load_textual_inversion({token: tensor}, token=token)
    except Exception as exc:  # diffusers checks before it changes anything
        raise AdapterError(info.name, f"did not load ({error_line(exc)})") from exc
    return embedding_tokens(token, tensor)


def embedding_tokens(token: str, tensor) -> list[str]:
    """The tokens an embedding adds: `token`, then `token_1`, `token_2`, ... for multi-vector embeddings."""
    n = tensor.shape[0] if tensor.ndim == 2 else 1
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def check_embedding_fits(pipe, info: AdapterInfo, state_dict, owned=()) -> None:
    """Raise AdapterError unless the embedding's width matches the text encoder and its tokens are new words."""
    tensor = next(iter(state_dict.values()))
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    if tensor.shape[-1] != width:
        raise AdapterError(info.name, f"is an embedding {tensor.shape[-1]} wide; this model's text encoder takes "
                                      f"{width} (an embedding for another base model?)")
    clash = [t for t in embedding_tokens(info.token.lower(), tensor)
             if t not in owned and known_word(pipe.tokenizer, t)]
    if clash:
        raise AdapterError(info.name, word_token_cause(info.name, info.token, clash[0]))


def check_lora_fits(pipe, name: str, state_dict) -> Layers:
    """The file's LoRA layers (`lora_layers`); raises AdapterError unless every one lands on a layer of this
    pipeline with matching shapes.

    Reads the file with `actors.lora_map.lora_layers` (diffusers' own conversions, kohya -> diffusers ->
    peft), so it sees the layers the loader will see.
    """
    try:
        layers = lora_layers(pipe, state_dict)
    except LoraMapError as exc:
        raise AdapterError(name, str(exc)) from exc
    if not layers:
        raise AdapterError(name, "has no LoRA layers for this model's UNet or text encoder")
    components = {"unet": pipe.unet, "text_encoder": getattr(pipe, "text_encoder", None)}
    modules: dict[str, dict] = {}
    problems = []
    for key, (a, b) in layers.items():
        part, _, path = key.partition(".")
        if components.get(part) is None:
            raise AdapterError(name, f"has weights for `{part}`, which this model does not have "
                                     "(a LoRA for another base model, such as SDXL?)")
        if part not in modules:
            component = getattr(components[part], "_orig_mod", components[part])  # under torch.compile
            modules[part] = dict(component.named_modules())
        layer = modules[part].get(path)
        layer = getattr(layer, "base_layer", layer)  # already wrapped by an earlier adapter
        weight = getattr(layer, "weight", None)
        if weight is None:
            problems.append(f"{key} is not a layer of this model")
            continue
        # the shapes the loader will copy: A takes the layer's input (a convolution's kernel too), B gives its
        # output (1x1 for a convolution); a 1x1 A on a 3x3 layer would broadcast into all nine taps
        fits = {"A": a.ndim == weight.ndim and a.shape[1:] == weight.shape[1:],
                "B": b.ndim == weight.ndim and b.shape[0] == weight.shape[0] and all(n == 1 for n in b.shape[2:])}
        for role, matrix in (("A", a), ("B", b)):
            if not fits[role]:
                problems.append(f"{key}.lora_{role} is {tuple(matrix.shape)}, the layer is {tuple(weight.shape)}")
    if problems:
        problems.sort()
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterError(name, f"does not fit this model, a LoRA for another base model? "
                                 f"{'; '.join(problems[:3])}{more}")
    return layers
