"""The onnx backend: UNet, text encoder and VAE decoder run by ONNX Runtime, LoRAs written into weight inputs.

Each component is exported once per (model fingerprint, size, dtype, opset, torch version) with
`torch.export` + `torch.onnx.export` and cached in `onnx/` of the backend cache (`--backend-cache`, default
`$SDFLEET_CACHE`; an fsspec URI shares exports across a cluster). Batch size is dynamic; the image
size is fixed per export, so a new size exports once more.

The weights of the adaptable layers (`actors.backends.base.ADAPTABLE`) are graph inputs, not constants, and
so is the text encoder's token table (Textual Inversion grows it). An adapter swap computes
`W0 + s * B @ A` for the union of layers the old and the new set touch (`lora_map.switch_updates`) and
feeds those tensors from then on: no re-export, no new session, and A -> B -> A is exactly A. Tensors are
bound by pointer (`io_binding`), so feeding them costs no copy.

The torch modules stay in the pipeline for their configs and for W0; their forwards are replaced by
ONNX Runtime calls.
"""

from __future__ import annotations

from pathlib import Path

import torch

from actors.backends.base import BackendError, FixedAdapters, adaptable_layers
from actors.backends.export import (NP_DTYPES, ExportCache, GraphBackend, drop_old_sizes, export_component, export_key,
                                    run_in_chunks, use)
from actors.lora_map import Layers, switch_updates
from manifests.schema import error_line


def on_the_device(session, device: str):
    """`session`, if it runs where the tensors bound to it live. When the CUDA provider fails to start (its CUDA
    or cuDNN libraries missing, or of another version than onnxruntime-gpu was built for), ONNX Runtime only
    prints a warning and builds a CPU session; CUDA tensors bound to that fail every row with a data-transfer
    error that does not say why."""
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise BackendError("ONNX Runtime could not start its CUDA provider on this node (the CUDA and cuDNN "
                           "libraries onnxruntime-gpu was built for are missing or of another version; its log "
                           "says which), so it would run on the CPU; fix the libraries, or use --backend compile")
    return session


class OnnxBackend(GraphBackend):
    """ONNX Runtime sessions in place of the UNet, text encoder and VAE decoder; LoRAs as weight inputs."""

    name = "onnx"

    def __init__(self, pipe, store, cache_uri: str | None = None, fingerprint: str = "", max_batch: int = 8):
        import onnxruntime as ort

        super().__init__(pipe, store)
        self.ort = ort
        self.cache = ExportCache(cache_uri)
        self.fingerprint = fingerprint or "unnamed"
        self.device = pipe.unet.device
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            # ONNX Runtime would only warn and run on the CPU, with CUDA tensors bound to it
            raise BackendError("--backend onnx on a GPU needs onnxruntime-gpu (this node's onnxruntime offers "
                               f"{', '.join(ort.get_available_providers())}); install it, or use --backend compile")
        self.layers = adaptable_layers(pipe)
        self.base = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        # what each graph's weight inputs are fed, by component and layer path: W0, or W0 + s * B @ A
        self.weights: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "text_encoder": {}}
        for name, weight in self.base.items():
            part, _, path = name.partition(".")
            self.weights[part][path] = weight
        self.adapters = FixedAdapters(pipe, store, set(self.layers)) if store is not None else None
        self._set: list[tuple[Layers, float]] = []
        self._active: tuple | None = ()
        self.sessions: dict[tuple, "ort.InferenceSession"] = {}  # least recently used first
        self.exports = 0
        self.sessions_dropped = 0
        pipe.unet.forward = self._unet
        pipe.text_encoder.forward = self._text_encoder
        pipe.vae.decode = self._decode

    # -- adapters -------------------------------------------------------------------------------------

    def _switch(self, adapters) -> bool:
        loras, key, loaded_embedding = self.adapters.request(adapters) if self.adapters else ([], (), False)
        if key == self._active:
            return loaded_embedding
        self._active = None
        for name, weight in switch_updates(self.base, self._set, loras).items():
            part, _, path = name.partition(".")
            self.weights[part][path] = weight
        self._set, self._active = loras, key
        return True

    # -- sessions ---------------------------------------------------------------------------------------

    def session(self, component: str, size: tuple[int, int] | None):
        key = (component, size)
        if key in self.sessions:
            return use(self.sessions, key)
        cache_key = export_key(self.fingerprint, component, size, self.pipe.unet.dtype)

        def build(path: Path) -> None:
            self.exports += 1
            export_component(self.pipe, component, path, size)

        path = self.cache.get(cache_key, build)
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads() if self.device.type == "cpu" else 0
        options.log_severity_level = 3
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda"
                     else ["CPUExecutionProvider"])
        try:
            session = self.ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a broken cache entry or a provider that is missing
            raise BackendError(f"ONNX Runtime cannot load {path} ({error_line(exc)}); delete that "
                               "folder to export again") from exc
        self.sessions[key] = on_the_device(session, self.device.type)
        self.sessions_dropped += drop_old_sizes(self.sessions)
        return self.sessions[key]

    def _graph(self, component: str, size, batched: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        session = self.session(component, size)
        fixed = self.weights["unet"] if component == "unet" else {}
        return run_in_chunks(batched, out, lambda chunk, target: self._run(session, {**chunk, **fixed}, target))

    def _run(self, session, feeds: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Run with every tensor bound by pointer: no copies in or out."""
        binding = session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        keep = []
        for name, tensor in feeds.items():
            tensor = tensor.contiguous()
            keep.append(tensor)
            binding.bind_input(name, kind, index, NP_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("out", kind, index, NP_DTYPES[out.dtype], tuple(out.shape), out.data_ptr())
        if kind == "cuda":  # ONNX Runtime runs on a CUDA stream of its own: torch's writes of the inputs must be done
            torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        return out

    # -- the replaced text encoder (the UNet and decoder are GraphBackend's) ----------------------------------

    def _text_encoder(self, input_ids, attention_mask=None, **kwargs):
        if attention_mask is not None or kwargs.get("output_hidden_states"):
            raise BackendError("the onnx backend's text encoder takes no attention mask or hidden-state output")
        te = self.pipe.text_encoder
        input_ids = input_ids.to(device=self.device, dtype=torch.int64)
        out = torch.empty(*input_ids.shape, te.config.hidden_size, device=self.device, dtype=te.dtype)
        table = te.get_input_embeddings().weight.detach()
        session = self.session("text_encoder", None)
        fixed = {"token_table": table, **self.weights["text_encoder"]}
        run_in_chunks({"input_ids": input_ids}, out, lambda chunk, target: self._run(session, {**chunk, **fixed}, target))
        return (out,)

    def stats(self) -> dict:
        return {**super().stats(), "exports": self.exports, "sessions": len(self.sessions),
                "sessions_dropped": self.sessions_dropped, "cache_entries_damaged": self.cache.damaged,
                "staging_removed": self.cache.swept}
