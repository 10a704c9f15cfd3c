"""Recipes: the configs that train the course's models, kept in one place so every chapter shares them.

``cifar_teacher()`` returns the pixel-space CIFAR-10 DDPM teacher of Chapters 1-4: the shipped checkpoint
``ddpm-cifar10`` when it exists, else a model trained here for as many steps as the profile allows
(resuming from ``runs/cifar-ddpm-<size>-<steps>`` when an earlier run of the same recipe left one there).
``cifar_cd_student()`` distils it into the Chapter 4 consistency model (``cd-cifar10`` once shipped).
Their sizes per profile are rows of ``profiles.SIZES``: the dataclass defaults are the full (gpu) stage rows,
the fallbacks trained here when nothing is shipped are the rows "cifar_teacher" and "cifar_cd_student".
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from .checkpoints import available, resolve
from .consistency import CMScalings, ConsistencyDistillation, ConsistencyModel, ddim_solver, l2, pseudo_huber
from .datasets import cifar10
from .diffusion import DenoisingLoss
from .models import cifar_unet
from .preconditioning import EDMPrecond
from .profiles import SIZES, sizes
from .schedules import Schedule
from .sde import heun_step
from .budget import run_tag
from .train import TrainConfig, train
from .zoo import load_model_folder

TEACHER_NAME = "ddpm-cifar10"
_DDPM, _CD = SIZES["ddpm"]["gpu"], SIZES["cd"]["gpu"]  # the full recipe: the defaults below


@dataclass
class CifarTeacherRecipe:
    size: str = _DDPM["size"]   # UNet size (see minilcm.models.UNET_SIZES)
    num_classes: int = 10       # class-conditional, label 10 = null class for classifier-free guidance
    cond_drop: float = 0.1
    steps: int = _DDPM["steps"]
    batch_size: int = _DDPM["batch_size"]
    lr: float = _DDPM["lr"]
    warmup_steps: int = _DDPM["warmup_steps"]
    ema_decay: float = _DDPM["ema_decay"]
    schedule: str = "linear"
    lr_decay: str = _DDPM["lr_decay"]  # "none" or "cosine" (TrainConfig.lr_decay)
    amp: bool = True            # bf16 autocast on CUDA, and on CPU too (AMX: the tiny UNet trains 1.6x faster)
    # EDM preconditioning (preconditioning.EDMPrecond) trained with the SNR+1 (= v-prediction) weighting. A plain
    # eps-UNet's x0-estimate multiplies its error by sigma_t / alpha_t (156 at t = 999): a briefly trained one
    # drifts to saturated colour fields under every sampler (measured: x0-estimate error std 6.9 at t = 999 after
    # 2,100 CPU steps); the preconditioned net's x0-estimate has unit scale at every t.
    precond: str = "edm"        # "edm" or "none" (a bare eps-UNet)
    sigma_data: float = 0.5
    weighting: str = "snr+1"    # DenoisingLoss.weighting
    minutes: float | None = None  # a wall-clock budget: the steps that fit replace ``steps`` (minilcm.budget)


def cifar_teacher(recipe: CifarTeacherRecipe | None = None, *, use_shipped: bool = True,
                  ckpt_dir: str | None = None, device=None, progress: bool = True):
    """(model, info): the EMA teacher in eval mode, and where it came from (shipped or trained here)."""
    if use_shipped and TEACHER_NAME in available():
        return _load_shipped(TEACHER_NAME, device)
    recipe = recipe or CifarTeacherRecipe(**sizes("cifar_teacher"))
    ckpt_dir = ckpt_dir or f"runs/cifar-ddpm-{recipe.size}-{recipe.steps}{run_tag(recipe.minutes)}"  # the same recipe
    model = cifar_unet(recipe.size, num_classes=recipe.num_classes)
    if recipe.precond == "edm":
        model = EDMPrecond(model, Schedule(recipe.schedule), recipe.sigma_data)
    elif recipe.precond != "none":
        raise ValueError(f"precond must be 'edm' or 'none', got {recipe.precond!r}")
    loss = DenoisingLoss(Schedule(recipe.schedule), cond_drop=recipe.cond_drop, null_class=recipe.num_classes,
                         hflip=True, weighting=recipe.weighting)
    res = train(model, loss, cifar10("train"), TrainConfig(
        steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
        ema_decay=recipe.ema_decay, lr_decay=recipe.lr_decay, amp=recipe.amp, amp_cpu=recipe.amp, ckpt_dir=ckpt_dir,
        ckpt_every=max(recipe.steps // 10, 50), device=device, progress=progress, desc="CIFAR-10 DDPM teacher",
        minutes=recipe.minutes))
    return res.ema.float().eval(), {"source": "trained here", "steps": res.step, "size": recipe.size,
                                    "seconds": res.seconds, "losses": res.losses, "recipe": recipe,
                                    "budget": res.budget}


def _load_shipped(name: str, device):
    """(model, info) of a shipped pixel checkpoint, whatever its wrapper (EpsUNet, EDMPrecond, ConsistencyModel)."""
    m = load_model_folder(name, device=device or "cpu")
    path = resolve(name)
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    return m.model.eval(), {"source": "shipped", **meta}


# ---- Chapter 4: consistency distillation of the CIFAR-10 teacher --------------------------------------
CD_NAME = "cd-cifar10"  # the shipped student (`minilcm train cd`)


@dataclass
class CifarCDRecipe:
    """Pixel-space consistency distillation of ``cifar_teacher()`` (Song et al. 2023, Sec. 6.1 / App. C: CD on
    CIFAR-10 with N = 18, mu = 0.95, the Heun solver; we use iCT's pseudo-Huber instead of LPIPS, no network
    needed). The student is the teacher's eps-UNet copied, wrapped with CMScalings(sigma_data)."""

    N: int = 18
    mu: float = 0.95
    solver: str = "heun"             # "heun" (sde.heun_step, 2 NFE) or "ddim" (consistency.ddim_solver, 1 NFE)
    distance: str = "pseudo_huber"   # or "l2"
    sigma_data: float = 0.5
    steps: int = 100_000             # longer than any profile: the stage and the notebook pass their row's steps
    batch_size: int = _CD["batch_size"]
    lr: float = _CD["lr"]
    warmup_steps: int = _CD["warmup_steps"]  # linear warm-up: without it lr 4e-4 spikes the loss at step 2
    ema_decay: float = _CD["ema_decay"]
    amp: bool = False  # no bf16: x0 = (x - sigma eps) / alpha multiplies eps's rounding by 158 at t = 999
    minutes: float | None = None  # a wall-clock budget: the steps that fit replace ``steps`` (minilcm.budget)


def cifar_cd_student(recipe: CifarCDRecipe | None = None, *, teacher=None, use_shipped: bool = True,
                     ckpt_dir: str | None = None, device=None, progress: bool = True):
    """(student, info): a ConsistencyModel f(x, t) -> x0 for CIFAR-10 (EMA weights, eval mode), sampled with
    ``consistency.cm_sample``. The shipped checkpoint ``cd-cifar10`` when it exists, else distilled here from
    ``teacher`` (default ``cifar_teacher()``) for as many steps as the profile allows, through ``minilcm.train``.
    Checkpoints go to ``ckpt_dir``, by default ``runs/cifar-cd-<teacher>-<steps>`` when the teacher is
    ``cifar_teacher()``'s (a run resumes only the same recipe from the same teacher); a teacher passed in is
    distilled without checkpoints unless ``ckpt_dir`` is given.
    """
    schedule = Schedule(CifarTeacherRecipe().schedule)
    if use_shipped and CD_NAME in available():
        return _load_shipped(CD_NAME, device)
    recipe = recipe or CifarCDRecipe(**sizes("cifar_cd_student"))
    if teacher is None:
        teacher, t_info = cifar_teacher(device=device, progress=progress)
        tag = "shipped" if t_info["source"] == "shipped" else f"{t_info['size']}-{t_info['steps']}"
        ckpt_dir = ckpt_dir or f"runs/cifar-cd-{tag}-{recipe.steps}{run_tag(recipe.minutes)}"
    student = ConsistencyModel(copy.deepcopy(teacher).requires_grad_(True), schedule, CMScalings(recipe.sigma_data))
    loss = ConsistencyDistillation(
        teacher, student, N=recipe.N, mu=recipe.mu, solver={"heun": heun_step, "ddim": ddim_solver}[recipe.solver],
        distance={"pseudo_huber": pseudo_huber, "l2": l2}[recipe.distance])
    res = train(student, loss, cifar10("train"), TrainConfig(
        steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
        ema_decay=recipe.ema_decay, amp=recipe.amp, ckpt_dir=ckpt_dir,
        ckpt_every=max(recipe.steps // 10, 50), device=device, progress=progress, desc="CIFAR-10 CD student",
        minutes=recipe.minutes))
    return res.ema.eval(), {"source": "trained here", "steps": res.step, "recipe": recipe,
                            "seconds": res.seconds, "losses": res.losses, "budget": res.budget}
