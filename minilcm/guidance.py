"""Conditioning and classifier-free guidance: the condition a model is called with, and CFG in the LCM convention.

Used by the Chapter 1 loss (condition dropout), the guided teachers of every sampler, and latent consistency
distillation (``minilcm.lcm``). The model-call convention is ``docs/architecture.md``'s.

**Conditioning.** ``cond`` is the dict of keyword arguments of the teacher, ``model(x, t, **cond)`` (the package's
one convention): ``{"class_labels": (B,)}`` for the 2-D MLP or a class UNet, ``{"encoder_hidden_states": (B, L, D)}``
for a UNet2DConditionModel. ``uncond`` has the same keys holding the unconditional value: the null class, or the
embedding of the empty prompt. A *conditioning* object turns a training batch into these dicts:

    conditioning.split(batch) -> (x0, cond)       conditioning.null(cond) -> uncond

``ClassConditioning(null_class)`` (batch = (x0, labels)) and ``TextConditioning(empty_embedding)`` (batch =
(latents, encoder_hidden_states)) are the two the course uses; any object with these two methods works.

**The CFG convention.** The LCM paper's w (Luo et al. 2023, Sec. 4.2): eps_w = (1 + w) eps_cond - w eps_uncond, so
w = 0 is the conditional model alone. diffusers' ``guidance_scale`` is w + 1 (``LatentConsistencyModelPipeline``
embeds ``guidance_scale - 1``).

    cfg_combine(eps_c, eps_u, w)                 eps_w from the two predictions
    guided_eps(teacher, x, t, cond, uncond, w)    eps_w, one fused call of 2B rows
    guided_ddim_step(teacher, x, schedule, t, s, cond, uncond, w)   the augmented PF-ODE solver step t -> s
    GuidedEps(teacher, conditioning, w)           the guided teacher as a plain eps-model (for any sampler)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .diffusion import eps_to_x0, model_eps, q_sample
from .schedules import Schedule, broadcast
from .solvers import ddim_step


# ---- conditioning: batch -> (x0, cond), cond -> uncond ---------------------------------------------
@dataclass
class ClassConditioning:
    """Class labels as the condition, the null class as the unconditional one. batch = (x0, labels (B,))."""

    null_class: int
    key: str = "class_labels"

    def split(self, batch):
        x0, labels = batch
        return x0, {self.key: labels}

    def null(self, cond: dict) -> dict:
        return {**cond, self.key: torch.full_like(cond[self.key], self.null_class)}


class TextConditioning(nn.Module):
    """Text embeddings as the condition, the empty prompt's embedding as the unconditional one.

    batch = (latents (B, C, H, W), encoder_hidden_states (B, L, D)); ``empty`` is the text encoder's output for ""
    ((L, D) or (1, L, D)), kept as a buffer so that it follows the loss to the training device.
    """

    def __init__(self, empty: torch.Tensor, key: str = "encoder_hidden_states"):
        super().__init__()
        self.key = key
        self.register_buffer("empty", empty.reshape(1, *empty.shape[-2:]).detach().clone())  # (1, L, D)

    def split(self, batch):
        x0, ehs = batch
        return x0, {self.key: ehs}

    def null(self, cond: dict) -> dict:
        ehs = cond[self.key]
        return {**cond, self.key: self.empty.to(ehs).expand_as(ehs)}


# ---- classifier-free guidance inside the solver: the augmented PF-ODE -------------------------------
def _batch_cat(a, b, name: str):
    """Stack the cond and uncond values of one keyword along the batch (an uncond of batch 1 is broadcast)."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        raise TypeError(f"cond[{name!r}] and uncond[{name!r}] must both be tensors with a batch dimension "
                        f"(got {type(a).__name__} and {type(b).__name__}); e.g. pass the null class explicitly")
    if b.shape[0] == 1 and a.shape[0] > 1:
        b = b.expand(a.shape[0], *b.shape[1:])
    if a.shape != b.shape:
        raise ValueError(f"cond[{name!r}] {tuple(a.shape)} and uncond[{name!r}] {tuple(b.shape)} differ in shape")
    return torch.cat([a, b.to(a.dtype)])


def guided_eps(teacher: Callable, x: torch.Tensor, t, cond: dict, uncond: dict, w) -> torch.Tensor:
    """Classifier-free guidance in the LCM convention (Luo et al. 2023, Sec. 4.2; Ho & Salimans 2022):

        eps_w(x, t; c) = (1 + w) eps(x, t, c) - w eps(x, t, 0)

    The conditional and unconditional evaluations run as ONE batched call of ``teacher`` (x, t and every cond
    value are concatenated along the batch: [cond rows; uncond rows]). x: (B, ...); t, w: scalars or (B,);
    ``cond``/``uncond``: the teacher's keyword arguments (same keys, see the module docstring). -> (B, ...).
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    B = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    t2 = t.expand(B).repeat(2) if t.ndim == 0 else torch.cat([t, t])  # (2B,)
    both = {k: _batch_cat(cond[k], uncond[k], k) for k in cond}
    eps_c, eps_u = model_eps(teacher, torch.cat([x, x]), t2, both).chunk(2)  # (B, ...) each
    return cfg_combine(eps_c, eps_u, w)


def cfg_combine(eps_c: torch.Tensor, eps_u: torch.Tensor, w) -> torch.Tensor:
    """eps_w = (1 + w) eps_c - w eps_u = eps_c + w (eps_c - eps_u): CFG in the LCM convention (w = 0: no guidance;
    diffusers' guidance_scale = w + 1). w: a scalar or (B,), broadcast over eps's trailing dimensions."""
    w = broadcast(torch.as_tensor(w), eps_c)
    return (1 + w) * eps_c - w * eps_u


def guided_ddim_step(teacher: Callable, x: torch.Tensor, schedule: Schedule, t, s, cond: dict, uncond: dict,
                     w) -> torch.Tensor:
    """One step of the augmented PF-ODE solver Psi(x_t, t, s, c; w) (Luo et al. 2023, Sec. 4.2, Algorithm 1):
    the deterministic DDIM step (``solvers.ddim_step``, eta = 0) driven by the guided eps_w of ``guided_eps``,

        x0_w = (x_t - sigma_t eps_w) / alpha_t,      x_s = alpha_s x0_w + sigma_s eps_w

    which is the reference script's ``DDIMSolver.ddim_step(pred_x0, pred_noise)`` on the CFG-combined x0 and eps
    (x0 is linear in eps, so combining either gives the same step). t, s: scalars (s = -1 means clean data), or
    (B,) per-row times in [0, T-1] (as in LCD, where each row sits at its own t_{n+k}): the same step written as
    "re-noise x0_w with its own eps_w", q_sample(x0_w, s, eps_w). One teacher call of batch 2B.
    """
    eps_w = guided_eps(teacher, x, t, cond, uncond, w)  # (B, ...)
    t, s = torch.as_tensor(t, dtype=torch.float64).cpu(), torch.as_tensor(s, dtype=torch.float64).cpu()
    if t.ndim == 0 and s.ndim == 0:
        return ddim_step(schedule, x, t.item(), s.item(), eps_w)
    B = x.shape[0]
    return q_sample(schedule, eps_to_x0(schedule, x, t.expand(B), eps_w), s.expand(B), eps_w)


class GuidedEps(nn.Module):
    """The teacher under CFG as a plain eps-model: ``GuidedEps(teacher, conditioning, w)(x, t, **cond) = eps_w``.

    So every sampler of ``minilcm.solvers`` samples the guided teacher (the augmented PF-ODE); each of its model
    evaluations is one batched call of 2B rows.
    """

    def __init__(self, teacher: nn.Module, conditioning, w: float):
        super().__init__()
        self.teacher, self.conditioning, self.w = teacher, conditioning, w

    def forward(self, x, t, **cond):
        return guided_eps(self.teacher, x, t, cond, self.conditioning.null(cond), self.w)
