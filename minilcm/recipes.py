"""Recipes: the configs that train the course's models, kept in one place so every chapter shares them.

``cifar_teacher()`` returns the pixel-space CIFAR-10 DDPM teacher of Chapters 1-4: the shipped checkpoint
``ddpm-cifar10`` when it exists, else a model trained here for as many steps as the profile allows
(resuming from ``runs/cifar-ddpm-<size>-<steps>`` when an earlier run of the same recipe left one there).
"""
from __future__ import annotations

from dataclasses import dataclass

from .checkpoints import available, load_model
from .datasets import cifar10
from .diffusion import DenoisingLoss
from .models import cifar_unet
from .profiles import pick
from .schedules import Schedule
from .train import TrainConfig, train

TEACHER_NAME = "ddpm-cifar10"


@dataclass
class CifarTeacherRecipe:
    size: str = "base"          # UNet size (see minilcm.models.UNET_SIZES)
    num_classes: int = 10       # class-conditional, label 10 = null class for classifier-free guidance
    cond_drop: float = 0.1
    steps: int = 40_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 1000
    ema_decay: float = 0.9999
    schedule: str = "linear"


def cifar_teacher(recipe: CifarTeacherRecipe | None = None, *, use_shipped: bool = True,
                  ckpt_dir: str | None = None, device=None, progress: bool = True):
    """(model, info): the EMA teacher in eval mode, and where it came from (shipped or trained here)."""
    if use_shipped and TEACHER_NAME in available():
        meta_model = cifar_unet(**_shipped_kwargs())
        meta = load_model(meta_model, TEACHER_NAME)
        return meta_model.eval().to(device or "cpu"), {"source": "shipped", **meta}
    recipe = recipe or CifarTeacherRecipe(
        size=pick(fast="tiny", cpu="tiny", gpu="base"), steps=pick(fast=20, cpu=200, gpu=20_000),
        batch_size=pick(fast=32, cpu=64, gpu=128), lr=pick(fast=1e-3, cpu=1e-3, gpu=2e-4),
        warmup_steps=pick(fast=0, cpu=50, gpu=1000), ema_decay=pick(fast=0.9, cpu=0.995, gpu=0.9999))
    ckpt_dir = ckpt_dir or f"runs/cifar-ddpm-{recipe.size}-{recipe.steps}"  # resumes only the same recipe
    model = cifar_unet(recipe.size, num_classes=recipe.num_classes)
    loss = DenoisingLoss(Schedule(recipe.schedule), cond_drop=recipe.cond_drop, null_class=recipe.num_classes,
                         hflip=True)
    res = train(model, loss, cifar10("train"), TrainConfig(
        steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
        ema_decay=recipe.ema_decay, ckpt_dir=ckpt_dir, ckpt_every=max(recipe.steps // 10, 50), device=device,
        progress=progress, desc="CIFAR-10 DDPM teacher"))
    return res.ema.eval(), {"source": "trained here", "steps": recipe.steps, "size": recipe.size,
                            "seconds": res.seconds, "losses": res.losses}


def _shipped_kwargs():
    from .checkpoints import load_checkpoint, resolve

    _, meta = load_checkpoint(resolve(TEACHER_NAME))
    cfg = meta["model_config"]
    return {"size": cfg["size"], "num_classes": cfg["num_classes"]}
