"""The names of things, importable without torch: the samplers, the recipe's stages and the shipped checkpoints.

The command line builds its help from these (``minilcm --help`` does not import torch); the implementations bind
to them: ``samplers.SAMPLERS`` (one spec per sampler name, checked against ``SAMPLER_FAMILIES`` at import),
``stages.STAGES`` (one runner per stage name) and ``zoo`` (which loads the shipped checkpoints by name).
See ``docs/architecture.md``.
"""
from __future__ import annotations

from dataclasses import dataclass

# sampler name -> family: "teacher" (an eps-model, CFG through the guided eps) or "consistency" (f(x, t) -> x0)
SAMPLER_FAMILIES = {"ddpm": "teacher", "ddim": "teacher", "dpm_solver": "teacher", "dpm_solver_pp": "teacher",
                    "dpm_solver_fast": "teacher", "cm": "consistency", "lcm": "consistency"}
SAMPLER_NAMES = tuple(SAMPLER_FAMILIES)
TEACHER_SAMPLERS = tuple(n for n, f in SAMPLER_FAMILIES.items() if f == "teacher")
CONSISTENCY_SAMPLERS = tuple(n for n, f in SAMPLER_FAMILIES.items() if f == "consistency")

# the recipe's stages, in the order they train (``minilcm train STAGE``)
STAGE_NAMES = ("evaluator", "autoencoder", "minisd", "lcm", "ddpm", "cd")


@dataclass(frozen=True)
class Shipped:
    """One shipped checkpoint: the file that proves it complete, the command that trains it, whether it samples."""

    marker: str
    train: str
    samples: bool = True


# the shipped checkpoints (data/checkpoints, or $MINILCM_CHECKPOINTS), in the order the recipe trains them
SHIPPED = {
    "evaluator-cifar10": Shipped("state.safetensors", "`minilcm train evaluator`", samples=False),
    "minisd-cifar10": Shipped("model_index.json", "`minilcm train autoencoder` then `minilcm train minisd`"),
    "lcm-cifar10": Shipped("unet/config.json", "`minilcm train lcm` (after the mini-SD teacher)"),
    "ddpm-cifar10": Shipped("state.safetensors", "`minilcm train ddpm`"),
    "cd-cifar10": Shipped("state.safetensors", "`minilcm train cd` (after the DDPM teacher)"),
}
SAMPLING_MODELS = tuple(name for name, s in SHIPPED.items() if s.samples)
