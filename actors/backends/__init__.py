"""How an actor runs its pipeline: eager PyTorch, torch.compile, ONNX Runtime or TensorRT, adapters kept swappable.

One small interface, `Backend`: made once per loaded pipeline (`make_backend`), then
`activate(adapters)` before each batch makes the pipeline draw with exactly those adapters
(`[]`: the base model). Acceleration and adapter swapping pull against each other, and each backend
settles that its own way:

- `eager`: peft adapters loaded once and switched by activation (`actors.adapter_cache.AdapterCache`).
- `compile`: the UNet and the VAE decoder under `torch.compile`. A swap writes `W0 + sum(s * B @ A)`
  into the touched weights in place (`actors.lora_map.InPlaceLoras`), so the graphs hold no LoRA
  modules and a swap never recompiles; compiled artefacts are kept in the backend cache.
- `onnx`: UNet, text encoder and VAE decoder exported once per (model, size) and run by ONNX Runtime. The
  adaptable layers' weights are inputs of the graphs; a swap writes `W0 + s * B @ A` into them for the
  union of layers the old and the new set touch (`actors.lora_map.switch_updates`).
- `tensorrt`: a refittable engine built from the same ONNX, the same union of layers refitted with
  `trt.Refitter` (NVIDIA GPUs only).

`check_backend` says before any actor starts whether a backend can run here, and what is missing if not.
One module per backend (eager, compile, onnx, tensorrt) over `base.py`; onnx and tensorrt share the
export and its cache (`export.py`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from typing import TYPE_CHECKING

from actors.backends.errors import BackendError

if TYPE_CHECKING:
    from actors.adapters import AdapterStore
    from actors.backends.base import Backend

__all__ = ["ADAPTABLE", "BACKENDS", "Backend", "BackendError", "adaptable_layers", "check_backend", "make_backend"]

BACKENDS = ("eager", "compile", "onnx", "tensorrt")


def __getattr__(name: str):
    """`Backend`, `ADAPTABLE` and `adaptable_layers` come from base.py, which imports torch: loaded when first
    asked for, so the driver (which only calls `check_backend`) starts without torch."""
    if name in ("ADAPTABLE", "Backend", "adaptable_layers"):
        from actors.backends import base

        return getattr(base, name)
    raise AttributeError(f"module 'actors.backends' has no attribute {name!r}")


def check_backend(name: str, device: str) -> None:
    """Raise BackendError unless backend `name` can run actors on `device` ("cpu" or "cuda")."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
    if name == "compile" and device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        raise BackendError("--backend compile on CPU needs a C++ compiler (g++) for TorchInductor; install one "
                           "or use --backend eager/onnx")
    # Triton builds its CUDA launcher with a C compiler the first time it runs (triton/runtime/build.py)
    if name == "compile" and device == "cuda" and not any(map(shutil.which, (os.environ.get("CC") or "cc",
                                                                            "gcc", "clang"))):
        raise BackendError("--backend compile on a GPU needs a C compiler (gcc; or $CC) for Triton's kernels; "
                           "install one in the image or use --backend eager")
    if name == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        raise BackendError("--backend onnx needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu on GPUs)")
    if name == "tensorrt":
        missing = []
        if device != "cuda":
            missing.append("an NVIDIA GPU (the cluster has none, or --device cpu was given)")
        if importlib.util.find_spec("tensorrt") is None:
            missing.append("the tensorrt package (pip install 'sdfleet[tensorrt]', or '.[tensorrt]' in a checkout)")
        if missing:
            raise BackendError(f"--backend tensorrt needs {' and '.join(missing)}; use --backend compile or onnx")


def make_backend(name: str, pipe, store: "AdapterStore | None", *, cache_uri: str | None = None,
                 fingerprint: str = "", max_batch: int = 8, compile_mode: str = "auto") -> "Backend":
    """The backend `name` around a freshly loaded `pipe` (which it may change: compile it, export it)."""
    if name == "eager":
        from actors.backends.eager import EagerBackend

        return EagerBackend(pipe, store)
    if name == "compile":
        from actors.backends.compile import CompileBackend, CompileSettings

        settings = CompileSettings.for_device(pipe.unet.device.type, compile_mode)
        return CompileBackend(pipe, store, cache_uri=cache_uri, fingerprint=fingerprint, settings=settings)
    if name == "onnx":
        from actors.backends.onnx import OnnxBackend

        return OnnxBackend(pipe, store, cache_uri=cache_uri, fingerprint=fingerprint, max_batch=max_batch)
    if name == "tensorrt":
        from actors.backends.tensorrt import TensorRTBackend

        return TensorRTBackend(pipe, store, cache_uri=cache_uri, fingerprint=fingerprint, max_batch=max_batch)
    raise BackendError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
