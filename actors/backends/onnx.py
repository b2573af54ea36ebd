"""The onnx backend: UNet, text encoder and VAE decoder run by ONNX Runtime, LoRAs written into weight inputs.

Each component is exported once per (model fingerprint, size, dtype, opset, torch version) with
`torch.export` + `torch.onnx.export` and cached in a store (`--backend-cache`, default
`$SDFLEET_CACHE/onnx`; an fsspec URI shares exports across a cluster). Batch size is dynamic; the image
size is fixed per export, so a new size exports once more.

The weights of the adaptable layers (`actors.backends.ADAPTABLE`) are graph inputs, not constants, and
so is the text encoder's token table (Textual Inversion grows it). An adapter swap computes
`W0 + s * B @ A` for the union of layers the old and the new set touch (`lora_map.switch_updates`) and
feeds those tensors from then on: no re-export, no new session, and A -> B -> A is exactly A. Tensors are
bound by pointer (`io_binding`), so feeding them costs no copy.

The torch modules stay in the pipeline for their configs and for W0; their forwards are replaced by
ONNX Runtime calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import fsspec
import numpy as np
import torch
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from actors.backends import ADAPTABLE, Backend, BackendError, FixedAdapters, adaptable_layers
from actors.lora_map import Layers, switch_updates

OPSET = 20
EXPORT_VERSION = 1  # bump when what an export contains changes, so old cache entries are not used
MAX_BATCH = 63
NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def export_key(fingerprint: str, component: str, size: tuple[int, int] | None, dtype: torch.dtype) -> str:
    """The cache key of one exported component: everything that changes the exported graph."""
    spec = {"model": fingerprint, "component": component, "size": size, "dtype": str(dtype), "opset": OPSET,
            "torch": torch.__version__.split("+")[0], "adaptable": {k: p.pattern for k, p in ADAPTABLE.items()},
            "version": EXPORT_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


# -- the graphs: torch modules whose inputs are what ONNX Runtime will be fed ----------------------------

class _UNetGraph(torch.nn.Module):
    def __init__(self, unet, weights: list[str]):
        super().__init__()
        self.unet, self.weights = unet, weights

    def forward(self, sample, timestep, encoder_hidden_states, *weights):
        params = {f"{path}.weight": w for path, w in zip(self.weights, weights)}
        return torch.func.functional_call(self.unet, params, (sample, timestep),
                                          {"encoder_hidden_states": encoder_hidden_states, "return_dict": False},
                                          strict=False)[0]


class _TextGraph(torch.nn.Module):
    def __init__(self, text_encoder, weights: list[str]):
        super().__init__()
        self.text_encoder, self.weights = text_encoder, weights

    def forward(self, input_ids, token_table, *weights):
        params = {f"{path}.weight": w for path, w in zip(self.weights, weights)}
        params["embeddings.token_embedding.weight"] = token_table
        return torch.func.functional_call(self.text_encoder, params, (input_ids,), strict=False)[0]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


@contextlib.contextmanager
def _own_forward(module, attribute: str):
    """Undo our instance-level override of `module.<attribute>` for a while (to export the real one)."""
    override = module.__dict__.pop(attribute, None)
    try:
        yield
    finally:
        if override is not None:
            setattr(module, attribute, override)


def export_component(pipe, component: str, path: Path, size: tuple[int, int] | None) -> None:
    """Export one component of `pipe` to `path` (+ `path.data`), batch dynamic, at `size` (height, width)."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    # diffusers' Upsample2D branches on batch >= 64, so graphs hold for batches of 2..63; callers split and pad
    batch = torch.export.Dim("batch", min=2, max=MAX_BATCH)
    layers = adaptable_layers(pipe)
    if component == "unet":
        names = [n.removeprefix("unet.") for n in layers if n.startswith("unet.")]
        h, w = size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor
        example = (torch.randn(2, pipe.unet.config.in_channels, h, w, device=device, dtype=dtype),
                   torch.tensor([500.0, 500.0], device=device),
                   torch.randn(2, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim,
                               device=device, dtype=dtype))
        module, inputs = _UNetGraph(pipe.unet, names), ["sample", "timestep", "encoder_hidden_states"]
        dynamic = ({0: batch}, {0: batch}, {0: batch})
        weights = [layers[f"unet.{n}"].weight.detach() for n in names]
    elif component == "text_encoder":
        names = [n.removeprefix("text_encoder.") for n in layers if n.startswith("text_encoder.")]
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        example = (torch.zeros(2, pipe.tokenizer.model_max_length, dtype=torch.int64, device=device), table)
        module, inputs = _TextGraph(pipe.text_encoder, names), ["input_ids", "token_table"]
        dynamic = ({0: batch}, {0: torch.export.Dim("vocab", min=table.shape[0], max=1 << 20)})  # it only grows
        weights = [layers[f"text_encoder.{n}"].weight.detach() for n in names]
    else:
        h, w = size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor
        example = (torch.randn(2, pipe.vae.config.latent_channels, h, w, device=device, dtype=dtype),)
        module, inputs, dynamic, names, weights = _DecoderGraph(pipe.vae), ["latents"], ({0: batch},), [], []
    attribute = "decode" if component == "vae" else "forward"
    with _own_forward(getattr(pipe, component), attribute), torch.no_grad(), warnings.catch_warnings():
        # torch's exporter warns about its own internals (pytree LeafSpec, jit.script_method), not our model
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.export.export(module, (*example, *weights), dynamic_shapes=(*dynamic, *((tuple([None] * len(weights)),) if weights else ())))
        torch.onnx.export(program, (), str(path), input_names=[*inputs, *names], output_names=["out"],
                          opset_version=OPSET, external_data=True, verbose=False)


class ExportCache:
    """Exported components (and TensorRT engines) in a store (local folder or fsspec URI), fetched to a local folder for ONNX Runtime."""

    def __init__(self, uri: str | None):
        from actors.models import cache_root

        local = cache_root() / "onnx"
        self.uri = uri or str(local)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.local = Path(self.root) if self.fs.protocol in ("file", ("file", "local")) else local

    def get(self, key: str, build, filename: str = "model.onnx") -> Path:
        """The local path of entry `key`'s main file; `build(path)` makes it (and files beside it) on a miss."""
        folder = self.local / key
        model = folder / filename
        if model.exists():
            return model
        remote = f"{self.root.rstrip('/')}/{key}"
        if not _is_local(self.fs) and self.fs.exists(f"{remote}/{filename}"):
            _fetch(self.fs, remote, folder)
            return model
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_ensure(self.local)))
        try:
            build(staging / filename)
            if not _is_local(self.fs):  # data files first, the main file last: its presence marks a whole entry
                for item in sorted(staging.iterdir(), key=lambda p: p.name == filename):
                    self.fs.put_file(str(item), f"{remote}/{item.name}")
            try:
                staging.rename(folder)
            except OSError:  # another actor finished the same export first: theirs is as good
                pass
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return model


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fetch(fs, remote: str, folder: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=_ensure(folder.parent)))
    try:
        for item in fs.ls(remote, detail=False):
            fs.get_file(item, str(staging / item.rsplit("/", 1)[-1]))
        staging.rename(folder)
    except OSError:
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_in_chunks(batched: dict[str, torch.Tensor], out: torch.Tensor, run) -> torch.Tensor:
    """Fill `out` by calling `run(chunk, target)` over the batch in the chunks an exported graph takes:
    2..MAX_BATCH rows (diffusers' Upsample2D branches at 64), a single row doubled and cut back."""
    total = out.shape[0]
    for start in range(0, total, MAX_BATCH):
        stop = min(start + MAX_BATCH, total)
        chunk = {k: v[start:stop] for k, v in batched.items()}
        if stop - start == 1:
            chunk = {k: v.expand(2, *v.shape[1:]) for k, v in chunk.items()}
            two = torch.empty(2, *out.shape[1:], device=out.device, dtype=out.dtype)
            out[start:stop] = run(chunk, two)[:1]
        else:
            run(chunk, out[start:stop])
    return out


class GraphBackend(Backend):
    """What the onnx and tensorrt backends share: the UNet's forward and the VAE's decode replaced by a
    compiled graph per (component, size), which `_graph` runs into a preallocated output."""

    def _graph(self, component: str, size, batched: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unet(self, sample, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        if args or any(v is not None for k, v in kwargs.items() if k != "cross_attention_kwargs"):
            raise BackendError(f"the {self.name} backend's UNet takes no extra inputs (got {sorted(kwargs)})")
        size = (sample.shape[2] * self.pipe.vae_scale_factor, sample.shape[3] * self.pipe.vae_scale_factor)
        timestep = torch.as_tensor(timestep, device=sample.device).float().reshape(-1).expand(sample.shape[0])
        out = torch.empty_like(sample)
        self._graph("unet", size, {"sample": sample, "timestep": timestep,
                                   "encoder_hidden_states": encoder_hidden_states}, out)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _decode(self, latents, return_dict=True, generator=None):
        size = (latents.shape[2] * self.pipe.vae_scale_factor, latents.shape[3] * self.pipe.vae_scale_factor)
        out = torch.empty(latents.shape[0], self.pipe.vae.config.out_channels, *size, device=latents.device,
                          dtype=latents.dtype)
        self._graph("vae", size, {"latents": latents}, out)
        return DecoderOutput(sample=out) if return_dict else (out,)


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
        self.sessions: dict[tuple, "ort.InferenceSession"] = {}
        self.exports = 0
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
        if key not in self.sessions:
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
                self.sessions[key] = self.ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # noqa: BLE001 - a broken cache entry or a provider that is missing
                raise BackendError(f"ONNX Runtime cannot load {path} ({type(exc).__name__}: {exc}); delete that "
                                   "folder to export again") from exc
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
        return {**super().stats(), "exports": self.exports, "sessions": len(self.sessions)}

