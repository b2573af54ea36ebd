"""Scheduler names of the manifest mapped to diffusers scheduler classes.

The names are the manifest's contract (`manifests.schema.SCHEDULER_NAMES`); a test keeps the two lists
equal. A scheduler is built fresh from the model's own config for every group, so the model's noise
schedule and prediction type (v-prediction for SD 2.1) always carry over.
"""

from __future__ import annotations

# name -> (diffusers class name, extra config). Names, not classes: importing diffusers takes seconds,
# and the driver only needs the names.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, base_config):
    """A new scheduler of kind `name` that keeps the model's schedule (`base_config`)."""
    import diffusers

    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **extra)


def scheduler_name_for(config: dict) -> str:
    """The manifest name of a model's own scheduler config (DDIM where the class has no name here)."""
    class_name = config.get("_class_name", "DDIMScheduler")
    karras = bool(config.get("use_karras_sigmas"))
    for name, (candidate, extra) in SCHEDULERS.items():
        if candidate == class_name and bool(extra.get("use_karras_sigmas")) == karras:
            return name
    return "ddim"
