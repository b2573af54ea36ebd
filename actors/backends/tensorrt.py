"""The tensorrt backend: a refittable TensorRT engine for the UNet and one for the VAE decoder (NVIDIA GPUs).

Engines are built from the onnx backend's exports, with one change: the adaptable layers' weights,
graph inputs there, become initializers named after their layers, so the ONNX parser names the engine's
weights after them (`setWeightsName`) and `trt.Refitter` can address them. An adapter swap refits the
union of layers the old and the new set touch (`lora_map.switch_updates`, shared with the onnx backend):
refitting only the new set's layers would leave blends of old and new (NVIDIA/TensorRT#3628).

The text encoder (one call per batch, against 2 x steps UNet calls) stays in PyTorch, its LoRA layers
written in place the same way. Engines are cached by (model fingerprint, size, dtype, TensorRT version,
GPU architecture): an engine only runs on the GPU generation that built it.

Nothing here runs on the CPU development machines: tests/test_backends.py's GPU test exercises it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from actors.backends.base import BackendError, FixedAdapters, adaptable_layers
from actors.backends.export import (MAX_BATCH, ExportCache, GraphBackend, drop_old_sizes, export_component, export_key,
                                    run_in_chunks, use)
from actors.lora_map import Layers, switch_updates

NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def _with_weights_as_initializers(source: Path, target: Path, weights: dict[str, torch.Tensor]) -> None:
    """Copy an exported ONNX model, turning the named weight inputs into initializers holding `weights`."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source), load_external_data=True)
    graph = model.graph
    keep = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(keep)
    for name, tensor in weights.items():
        graph.initializer.append(numpy_helper.from_array(tensor.detach().cpu().numpy(), name=name))
    onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data")


class TensorRTBackend(GraphBackend):
    """TensorRT engines in place of the UNet and the VAE decoder; adapters by refit."""

    name = "tensorrt"

    def __init__(self, pipe, store, cache_uri: str | None = None, fingerprint: str = "", max_batch: int = 8):
        import tensorrt as trt

        if pipe.unet.device.type != "cuda":
            raise BackendError("--backend tensorrt needs the pipeline on a CUDA GPU")
        super().__init__(pipe, store)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.cache = ExportCache(cache_uri)
        self.fingerprint = fingerprint or "unnamed"
        # The most rows an engine takes: classifier-free guidance doubles a batch for the UNet. A context
        # holds device memory for its profile's largest shapes, so the profile ends there, not at MAX_BATCH
        # (SD 2.1's VAE decoder at 768 px needs ~1.1 GB per image in fp16: 63 would not fit beside the model);
        # larger calls run in chunks.
        self.opt_batch = max(2, min(2 * max_batch, MAX_BATCH))
        self.layers = adaptable_layers(pipe)
        self.base = {n: m.weight.detach().clone() for n, m in self.layers.items()}
        self.adapters = FixedAdapters(pipe, store, set(self.layers)) if store is not None else None
        self._set: list[tuple[Layers, float]] = []
        self._active: tuple | None = ()
        self.engines: dict[tuple, tuple] = {}  # (component, size) -> (engine, context, refitter or None)
        self.builds = self.refits = self.engines_dropped = 0
        pipe.unet.forward = self._unet
        pipe.vae.decode = self._decode

    # -- engines --------------------------------------------------------------------------------------

    def engine(self, component: str, size: tuple[int, int]):
        key = (component, size)
        if key in self.engines:
            return use(self.engines, key)
        trt = self.trt
        arch = "sm%d%d" % torch.cuda.get_device_capability(self.pipe.unet.device)
        onnx_key = export_key(self.fingerprint, component, size, self.pipe.unet.dtype)
        engine_key = f"trt-{trt.__version__}-{arch}-b{self.opt_batch}-{onnx_key}"
        onnx_path = self.cache.get(onnx_key, lambda path: export_component(self.pipe, component, path, size))
        plan = self.cache.get(engine_key, lambda path: self._build(component, onnx_path, path), "engine.plan")
        runtime = trt.Runtime(self.logger)
        engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT cannot load the cached engine {plan}; delete its folder to rebuild")
        refitter = trt.Refitter(engine, self.logger) if component == "unet" else None
        self.engines[key] = (engine, engine.create_execution_context(), refitter)
        self.engines_dropped += drop_old_sizes(self.engines)  # each holds its weights and activation memory
        if refitter is not None and self._set:  # a new size's engine starts at W0: bring it to the set
            self._refit(refitter, switch_updates(self._unet_base(), [], self._unet_set(self._set)))
        return self.engines[key]

    def _build(self, component: str, onnx_path: Path, plan_path: Path) -> None:
        """Build a refittable engine; fp16 comes from the ONNX types (a strongly typed network)."""
        self.builds += 1
        with tempfile.TemporaryDirectory() as scratch:
            source = onnx_path
            if component == "unet":
                source = Path(scratch) / "with-weights.onnx"
                weights = {n.removeprefix("unet."): w for n, w in self.base.items() if n.startswith("unet.")}
                _with_weights_as_initializers(onnx_path, source, weights)
            self._build_from(component, source, plan_path)

    def _build_from(self, component: str, source: Path, plan_path: Path) -> None:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse {source}: {errors}")
        config = builder.create_builder_config()
        if component == "unet":
            config.set_flag(trt.BuilderFlag.REFIT)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            low, opt, high = ([b] + shape[1:] for b in (2, self.opt_batch, self.opt_batch))
            profile.set_shape(tensor.name, low, opt, high)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"TensorRT could not build an engine from {source} (see the log above)")
        plan_path.write_bytes(bytes(plan))

    # -- adapters -------------------------------------------------------------------------------------------

    def _unet_base(self) -> dict[str, torch.Tensor]:
        return {n: w for n, w in self.base.items() if n.startswith("unet.")}

    @staticmethod
    def _unet_set(loras):
        return [({n: ab for n, ab in layers.items() if n.startswith("unet.")}, s) for layers, s in loras]

    def _refit(self, refitter, updates: dict[str, torch.Tensor]) -> None:
        keep = []
        for name, weight in updates.items():
            array = np.ascontiguousarray(weight.detach().cpu().numpy())
            keep.append(array)
            if not refitter.set_named_weights(name.removeprefix("unet."), self.trt.Weights(array)):
                raise BackendError(f"TensorRT refused new weights for {name}")
        missing = refitter.get_missing_weights()
        if missing or not refitter.refit_cuda_engine():
            raise BackendError(f"TensorRT refit failed (weights missing: {missing[:3]})")
        self.refits += 1

    def _switch(self, adapters) -> bool:
        loras, key, loaded_embedding = self.adapters.request(adapters) if self.adapters else ([], (), False)
        if key == self._active:
            return loaded_embedding
        self._active = None
        updates = switch_updates(self.base, self._set, loras)
        with torch.no_grad():  # the text encoder, in PyTorch: in place
            for name, weight in updates.items():
                if name.startswith("text_encoder."):
                    self.layers[name].weight.copy_(weight)
        unet_updates = {n: w for n, w in updates.items() if n.startswith("unet.")}
        for _, _, refitter in self.engines.values():
            if refitter is not None and unet_updates:
                self._refit(refitter, unet_updates)
        self._set, self._active = loras, key
        return True

    # -- the graphs behind GraphBackend's replaced forwards -------------------------------------------------

    def _graph(self, component: str, size, batched: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        _, context, _ = self.engine(component, size)
        stream = torch.cuda.current_stream(out.device)

        def run(chunk: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
            keep = {name: tensor.contiguous() for name, tensor in chunk.items()}
            for name, tensor in keep.items():
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            context.set_tensor_address("out", target.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise BackendError(f"TensorRT failed to run the {component} engine")
            return target

        return run_in_chunks(batched, out, run, most=self.opt_batch)

    def stats(self) -> dict:
        return {**super().stats(), "builds": self.builds, "refits": self.refits, "engines": len(self.engines),
                "engines_dropped": self.engines_dropped, "cache_entries_damaged": self.cache.damaged,
                "staging_removed": self.cache.swept}
