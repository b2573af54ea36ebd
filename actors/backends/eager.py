"""The eager backend: the pipeline as diffusers builds it, adapters through peft (`actors.adapter_cache`)."""

from __future__ import annotations

from actors.adapter_cache import AdapterCache
from actors.backends.base import Backend


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
