"""LoRA files as plain per-layer matrices, and the weight updates that switch one adapter set for another.

Every accelerated backend needs the same two things from a LoRA file, whatever its spelling (diffusers,
kohya, old diffusers):

- `lora_layers`: `{"unet.<module path>": (A, B)}` (and `text_encoder.<module path>`), with A the down
  matrix (rank x in) and B the up matrix (out x rank), the file's alpha / rank already folded into B. A
  layer's LoRA output at scale s is then `s * B @ A @ x`, for any spelling.
- `switch_updates`: given the adapter set now in the weights and the next one, the new weight of every
  layer either set touches: `W0 + sum(s * B @ A)` for layers the next set touches, `W0` for layers only
  the old set touched. Writing only the layers the *next* set touches would leave the old adapter in the
  others: A -> B -> A would blend A and B (NVIDIA/TensorRT#3628). Every update is computed from W0, never
  from the weights now in place, so no rounding drift builds up over many switches.

The ONNX backend writes these updates into its weight inputs, the TensorRT backend through `trt.Refitter`,
the compile backend into the model's own weights in place (`InPlaceLoras`).
"""

from __future__ import annotations

import re

import torch

from actors.lora_keys import UNET_ROOTS, no_part_for, not_applied
from manifests.schema import error_line

LORA_MATRIX = re.compile(r"^(?P<path>.+)\.lora_(?P<role>[AB])\.weight$")

Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "unet.<path>" -> (A, B), alpha / rank folded into B


class LoraTensors(dict):
    """A LoRA file's tensors with the adapter settings diffusers and peft save beside them: the `__metadata__`
    entry `lora_adapter_metadata` (`unet.r`, `unet.lora_alpha`, `unet.alpha_pattern`, `unet.use_rslora`, ...),
    which is where such a file keeps its alphas."""

    def __init__(self, tensors: dict, lora_metadata: dict):
        super().__init__(tensors)
        self.lora_metadata = lora_metadata


class LoraMapError(ValueError):
    """A LoRA file diffusers cannot read, or one that names layers this model does not have."""


def lora_layers(pipe, state_dict) -> Layers:
    """Every LoRA layer in `state_dict` as `{"<component>.<module path>": (A, B)}`, B scaled by each layer's
    own alpha / rank.

    Uses diffusers' own conversions (kohya -> diffusers -> peft), so it reads what `load_lora_weights` reads;
    the eager backend then loads these matrices too (`lora_state_dict`), so every backend draws one mapping.
    Shapes are not checked here (`actors.adapter_cache.check_lora_fits` does that against the model).
    """
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    metadata = getattr(state_dict, "lora_metadata", None) or {}
    if metadata and state_dict and all(k.startswith(UNET_ROOTS) for k in state_dict):
        # `unet.save_lora_adapter` writes the UNet's own module paths, and its settings, without `unet.` (the
        # same keys without settings say nothing of their alphas: refused below, as diffusers ignores them)
        state_dict = {f"unet.{k}": v for k, v in state_dict.items()}
        metadata = {k if k.startswith(("unet.", "text_encoder.")) else f"unet.{k}": v for k, v in metadata.items()}
    refused = not_applied(state_dict, metadata)
    if refused:
        raise LoraMapError(refused)
    # 1. kohya and old diffusers spellings -> "unet.<module>..." / "text_encoder.<module>..."
    try:
        converted, alphas = type(pipe).lora_state_dict(dict(state_dict))  # a copy: the kohya converter pops keys
    except Exception as exc:  # noqa: BLE001 - any failure here means diffusers cannot read it either
        raise LoraMapError(f"diffusers cannot read this LoRA ({error_line(exc)})") from exc
    # kohya's alphas come back keyed by their down matrix ("...to_q_lora.down.weight.alpha", converted below
    # the same way as the matrices) or, for layers outside attention (proj_in, ff, convs), by the module
    # itself ("unet.<module path>.alpha")
    parts: dict[str, tuple[dict, dict, dict]] = {}
    for key, tensor in converted.items():
        part, _, rest = key.partition(".")
        parts.setdefault(part, ({}, {}, {}))[0][rest] = tensor
    for key, value in (alphas or {}).items():
        part, _, rest = key.removesuffix(".alpha").partition(".")
        keyed_by_matrix = rest.endswith(".weight")
        parts.setdefault(part, ({}, {}, {}))[1 if keyed_by_matrix else 2][rest] = torch.tensor(float(value))
    # 2. peft spelling: "<module>.lora_A.weight" (down) and "<module>.lora_B.weight" (up)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for part, (matrices, matrix_alphas, module_alphas) in parts.items():
        if part == "unet":
            convert = convert_unet_state_dict_to_peft
        elif part.startswith("text_encoder"):  # (text_encoder_2, SDXL's, is refused above: not_applied)
            def convert(sd):
                # kohya's text-encoder keys come back from diffusers in two spellings (attention layers as
                # `to_q_lora.down`, MLP layers as `lora_linear_layer.down`); each converter call guesses one
                # spelling for the whole dict, so each spelling is converted on its own
                from diffusers.utils.state_dict_utils import StateDictType

                linear = {k: v for k, v in sd.items() if ".lora_linear_layer." in k}
                rest = {k: v for k, v in sd.items() if k not in linear}
                out = convert_state_dict_to_peft(linear, original_type=StateDictType.DIFFUSERS) if linear else {}
                if any("_lora.down." in k or "_lora.up." in k for k in rest):  # attention, the old spelling
                    rest = convert_state_dict_to_diffusers(rest, original_type=StateDictType.DIFFUSERS_OLD)
                    out.update(convert_state_dict_to_peft(rest, original_type=StateDictType.DIFFUSERS))
                elif rest:
                    out.update(convert_state_dict_to_peft(convert_state_dict_to_diffusers(rest)))
                return out
        else:
            raise LoraMapError(no_part_for(f"{part}.{next(iter(matrices or module_alphas))}"))
        try:
            alpha_by_path = {path: float(alpha) for path, alpha in module_alphas.items()}
            for key, alpha in convert(dict(matrix_alphas)).items() if matrix_alphas else ():
                match = LORA_MATRIX.match(key)
                if match is not None:
                    alpha_by_path[match["path"]] = float(alpha)
            peft = convert(dict(matrices))
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise bare ValueErrors
            raise LoraMapError(f"diffusers cannot convert its `{part}` keys ({error_line(exc)})") from exc
        for key, tensor in peft.items():
            match = LORA_MATRIX.match(key)
            if match is None:
                if ".lora_A." in key or ".lora_B." in key:  # a LoRA bias: part of the output, not droppable
                    raise LoraMapError(f"has {part}.{key}, a LoRA bias, which sdfleet does not apply")
                if "lora" in key.lower() or key.endswith(".alpha"):  # a layer or its alpha the converters left
                    raise LoraMapError(f"has {f'{part}.{key}'!r} left in a spelling diffusers' conversions do not "
                                       "place (kohya text-encoder LoRAs mixing attention and MLP layers, alphas "
                                       "keyed by module in a peft-spelled file); drawn without it, the LoRA "
                                       "would be another: save it in diffusers' spelling (save_lora_weights)")
                continue  # anything else diffusers' converters pass through
            # CLIPTextModel lost its `text_model.` level in recent transformers; old files still have it
            path = match["path"].removeprefix("text_model.") if part == "text_encoder" else match["path"]
            entry = layers.setdefault(f"{part}.{path}", {})
            entry[match["role"]] = tensor
            if match["path"] in alpha_by_path:
                entry["alpha"] = alpha_by_path[match["path"]]
            elif metadata:
                entry["alpha"], entry["rslora"] = saved_alpha(metadata, part, match["path"])
    out: Layers = {}
    for name, entry in sorted(layers.items()):
        if "A" not in entry or "B" not in entry:
            raise LoraMapError(f"{name} has a lora_{'A' if 'A' not in entry else 'B'} matrix missing")
        a, b = entry["A"].float(), entry["B"].float()
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise LoraMapError(f"{name}: rank {rank} down but {b.shape[1]} up")
        alpha = entry.get("alpha")
        # an alpha of 0 is none, as kohya's sd-scripts reads it (alpha = rank), not a layer at strength 0
        scale = 1.0 if not alpha else alpha / (rank ** 0.5 if entry.get("rslora") else rank)
        out[name] = (a, b * scale if scale != 1.0 else b)
    return out


def saved_alpha(metadata: dict, part: str, path: str) -> tuple[float | None, bool]:
    """(alpha, rsLoRA) of one layer from a file's adapter metadata, as peft's LoraConfig reads it: the layer's
    entry in `alpha_pattern` (a pattern matching the end of its path), else `lora_alpha`; None where the
    metadata says nothing for this part (the layer then draws at scale 1, as diffusers does)."""
    config = {k.removeprefix(f"{part}."): v for k, v in metadata.items() if k.startswith(f"{part}.")}
    if "lora_alpha" not in config and not config.get("alpha_pattern"):
        return None, False
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora"))


def lora_state_dict(layers: Layers) -> dict[str, torch.Tensor]:
    """`layers` as `load_lora_weights` reads them: each layer's alpha / rank is already in its B, and a file
    without alphas is scale 1 per layer to diffusers, whatever its ranks. UNet layers in peft's spelling;
    text-encoder layers in diffusers' `lora_linear_layer` spelling, the one its text-encoder converter always
    recognises (peft-spelled keys of MLP layers alone failed: "Could not automatically infer state dict type")."""
    out = {}
    for name, (a, b) in layers.items():
        down, up = (("lora_linear_layer.down", "lora_linear_layer.up") if name.startswith("text_encoder.")
                    else ("lora_A", "lora_B"))
        out[f"{name}.{down}.weight"], out[f"{name}.{up}.weight"] = a, b
    return out


def delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The weight change of one LoRA layer, `B @ A`, in the layer's weight shape (Linear or Conv2d)."""
    if a.ndim == 2:
        return b @ a
    # Conv2d: A is (rank, in, kh, kw), B is (out, rank, 1, 1)
    return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


def switch_updates(base: dict[str, torch.Tensor], old: list[tuple[Layers, float]],
                   new: list[tuple[Layers, float]]) -> dict[str, torch.Tensor]:
    """The new weight of every layer that `old` or `new` touches, when the weights go from `old` to `new`.

    `base` maps layer names to their original weights W0 (only layers a LoRA may touch need be there);
    `old` and `new` are adapter sets as `[(layers, scale)]`. Layers the new set touches get
    `W0 + sum(scale * B @ A)`, summed in the order given (so a blend is summed the same way every time);
    layers only the old set touched get W0 back. Raises LoraMapError for a layer `base` does not have.
    """
    touched_new: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for layers, scale in new:
        for name, (a, b) in layers.items():
            touched_new.setdefault(name, []).append((a, b, scale))
    touched_old = {name for layers, _ in old for name in layers}
    updates = {}
    for name in sorted(touched_old | set(touched_new)):
        if name not in base:
            raise LoraMapError(f"{name} is not a layer this backend can adapt")
        w0 = base[name]
        if name not in touched_new:
            updates[name] = w0
            continue
        total = torch.zeros(w0.shape, dtype=torch.float32, device=w0.device)
        for a, b, scale in touched_new[name]:
            total += scale * delta(a.to(w0.device), b.to(w0.device))
        updates[name] = (w0.float() + total).to(w0.dtype)
    return updates


class InPlaceLoras:
    """Adapter sets written straight into a model's own weights: `W0 + sum(s * B @ A)`, in place.

    `targets` maps layer names (`"unet.<path>"`) to the weight tensors to write (a parameter, or a view
    into a fused one). A layer's original W0 is copied the first time a set touches it and kept once,
    whatever adapters come after; `switch(new)` writes the union of the layers the old and the new set
    touch (`switch_updates`), always from W0, so any sequence of switches ends on the same bits as
    switching once. The tensors keep their storage, so a compiled graph or CUDA graph that reads them
    needs no recompile and no re-capture.
    """

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.targets = targets
        self.originals: dict[str, torch.Tensor] = {}
        self.active: list[tuple[Layers, float]] = []

    def switch(self, new: list[tuple[Layers, float]]) -> None:
        for layers, _ in new:
            for name in layers:
                if name not in self.originals:
                    if name not in self.targets:
                        raise LoraMapError(f"{name} is not a layer this backend can adapt")
                    self.originals[name] = self.targets[name].detach().clone()
        updates = switch_updates(self.originals, self.active, new)  # raises before anything is written
        with torch.no_grad():
            try:
                for name, weight in updates.items():
                    self.targets[name].copy_(weight)
            except BaseException:  # half written: back to W0 everywhere, so no set is half active
                for name, weight in self.originals.items():
                    self.targets[name].copy_(weight)
                self.active = []
                raise
        self.active = new
