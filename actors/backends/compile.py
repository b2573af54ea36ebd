"""The compile backend: the UNet under torch.compile, adapters hotswapped into one fixed-rank LoRA slot
(diffusers' `enable_lora_hotswap`), so a swap never recompiles; the text encoder's LoRA layers are fused
in place, as on onnx."""

from __future__ import annotations

import torch

from actors.adapters import AdapterError, AdapterStore
from actors.backends.base import Backend, FixedAdapters, adaptable_layers
from actors.lora_map import Layers


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
