"""The forward process, parameterisation conversions, denoising losses and the DDPM sampler.

Ho et al. 2020 (DDPM, arXiv 2006.11239). Every model follows one convention:

    model(x_t, t, **cond) -> eps          t: (B,) float diffusers-style timesteps

and every sampler has one signature:

    sampler(model, x, schedule, timesteps, *, cond=None, generator=None, ...) -> Sample

where ``timesteps`` is a decreasing list of times to visit and ``Sample`` carries the result, the number
of model evaluations (NFE) and, on request, the trajectory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .schedules import Schedule, broadcast

PREDICTIONS = ("eps", "x0", "v")


# ---- the forward process ---------------------------------------------------------------------
def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) (DDPM Eq. 4): x_t = alpha_t x_0 + sigma_t eps."""
    return broadcast(schedule.alpha(t), x0) * x0 + broadcast(schedule.sigma(t), x0) * eps


# ---- conversions between what a network can predict --------------------------------------------
def eps_to_x0(schedule, x_t, t, eps):
    """x_0 = (x_t - sigma_t eps) / alpha_t."""
    return (x_t - broadcast(schedule.sigma(t), x_t) * eps) / broadcast(schedule.alpha(t), x_t)


def x0_to_eps(schedule, x_t, t, x0):
    """eps = (x_t - alpha_t x_0) / sigma_t."""
    return (x_t - broadcast(schedule.alpha(t), x_t) * x0) / broadcast(schedule.sigma(t), x_t)


def v_to_eps(schedule, x_t, t, v):
    """v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, Sec. 4)  =>  eps = sigma_t x_t + alpha_t v."""
    return broadcast(schedule.sigma(t), x_t) * x_t + broadcast(schedule.alpha(t), x_t) * v


def eps_to_v(schedule, x_t, t, eps):
    """v = alpha_t eps - sigma_t x_0 written with eps only: v = (eps - sigma_t x_t) / alpha_t."""
    return (eps - broadcast(schedule.sigma(t), x_t) * x_t) / broadcast(schedule.alpha(t), x_t)


def eps_to_score(schedule, x_t, t, eps):
    """Tweedie / denoising score matching: grad log p_t(x_t) = -eps / sigma_t."""
    return -eps / broadcast(schedule.sigma(t), x_t)


def score_to_eps(schedule, x_t, t, score):
    """eps = -sigma_t * score."""
    return -broadcast(schedule.sigma(t), x_t) * score


# ---- the training objective -----------------------------------------------------------------
def split_batch(batch):
    """A training batch is ``x0`` or ``(x0, labels)``: returns (x0, labels or None)."""
    return batch if isinstance(batch, (tuple, list)) else (batch, None)


@dataclass
class DenoisingLoss:
    """The simple DDPM loss (Ho et al. 2020, Eq. 14) and its x0- and v-prediction variants.

        L = E_{x0, t ~ U{0..T-1}, eps} || target - net(alpha_t x0 + sigma_t eps, t) ||^2

    ``prediction`` says what the network outputs: eps (target eps), x0 (target x0) or v (target
    alpha_t eps - sigma_t x0). ``cond_drop`` replaces the class label by ``null_class`` with that
    probability, for classifier-free guidance (Ho & Salimans 2022).

    ``weighting`` multiplies each sample's squared error by w(t): "none" (w = 1, Ho et al.'s simple loss) or
    "snr+1" (w = 1 / alpha_t^2 on the eps error; Salimans & Ho 2022, arXiv 2202.00512, Sec. 4, name it by the x0
    error it equals, (1 + SNR_t) ||x0 - x0_hat||^2): on an eps-model it is exactly the v-prediction loss,
    ||v - v_hat||^2 = ||eps - eps_hat||^2 / alpha_t^2 = (1 + SNR_t) ||x0 - x0_hat||^2, so it keeps training the
    network at high noise, where the plain eps-loss gives a preconditioned model (``preconditioning.EDMPrecond``)
    almost no signal.

    The training loop calls ``loss(model, batch, generator)``; ``batch`` is ``x0`` or ``(x0, labels)``.
    """

    schedule: Schedule
    prediction: str = "eps"
    cond_drop: float = 0.0
    null_class: int | None = None
    hflip: bool = False  # random horizontal flips: data augmentation for images
    conditioning: object = None  # e.g. guidance.TextConditioning: batch -> (x0, cond), cond -> uncond (dropped rows)
    weighting: str = "none"      # "none" or "snr+1" (the v-loss on an eps-model)

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.weighting not in ("none", "snr+1"):
            raise ValueError(f"weighting must be 'none' or 'snr+1', got {self.weighting!r}")
        if self.cond_drop > 0 and self.null_class is None and self.conditioning is None:
            raise ValueError("cond_drop > 0 needs null_class (the label index that means 'no class')")

    def __call__(self, model, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.conditioning is not None:
            x0, cond = self.conditioning.split(batch)
            labels = None
        else:
            x0, labels = split_batch(batch)
            cond = {}
        device = x0.device
        B = x0.shape[0]
        if self.hflip:
            flip = torch.rand(B, generator=generator) < 0.5
            x0 = torch.where(flip.to(device).reshape(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
        t = torch.randint(0, self.schedule.T, (B,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        x_t = q_sample(self.schedule, x0, t, eps)
        if self.conditioning is not None and self.cond_drop > 0:  # drop whole rows to the unconditional input
            drop = (torch.rand(B, generator=generator) < self.cond_drop).to(device)
            uncond = self.conditioning.null(cond)
            cond = {k: torch.where(drop.view(-1, *[1] * (v.ndim - 1)), uncond[k], v) for k, v in cond.items()}
        if labels is not None:
            if self.cond_drop > 0:
                drop = (torch.rand(B, generator=generator) < self.cond_drop).to(device)
                labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
            cond["class_labels"] = labels
        out = model(x_t, t.to(device=device, dtype=torch.float32), **cond)
        out = out.sample if hasattr(out, "sample") else out  # a diffusers model's output object
        if self.prediction == "eps":
            target = eps
        elif self.prediction == "x0":
            target = x0
        else:
            target = broadcast(self.schedule.alpha(t), x0) * eps - broadcast(self.schedule.sigma(t), x0) * x0
        if self.weighting == "none":
            return F.mse_loss(out.float(), target.float())
        w = 1.0 / self.schedule.alpha(t).double() ** 2  # the v-loss, on the eps error
        per_sample = ((out.float() - target.float()) ** 2).flatten(1).mean(1)
        return (per_sample * w.to(per_sample.device, torch.float32)).mean()


# ---- sampling plumbing shared by every sampler ------------------------------------------------
@dataclass
class Sample:
    """What a sampler returns: the final ``x``, the number of model evaluations, and optionally the path."""

    x: torch.Tensor
    nfe: int
    trajectory: list[torch.Tensor] | None = field(default=None, repr=False)


def model_eps(model: Callable, x: torch.Tensor, t, cond: dict | None = None) -> torch.Tensor:
    """Call ``model(x, t, **cond)`` with t broadcast to a (B,) float tensor on x's device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    out = model(x, t, **(cond or {}))
    if hasattr(out, "sample"):  # a diffusers model returns an output object
        out = out.sample
    if out.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}: an eps-model "
                         "must return a tensor shaped like its input")
    return out


def check_timesteps(schedule: Schedule, timesteps) -> list[float]:
    """Validate a decreasing list of timesteps inside the schedule's range; returns plain floats."""
    ts = [float(t) for t in torch.as_tensor(timesteps, dtype=torch.float64).flatten()]
    if not ts:
        raise ValueError("timesteps is empty: pass at least one timestep, e.g. schedule.timesteps(50)")
    if not all(math.isfinite(t) for t in ts):
        raise ValueError(f"timesteps must be finite numbers, got {ts[:6]}{'...' if len(ts) > 6 else ''}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps must be strictly decreasing (noisiest first), e.g. schedule.timesteps(50)")
    if ts[0] > schedule.T - 1 or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {schedule.T - 1}]")
    return ts


def alpha_bar_at(schedule: Schedule, t: float) -> torch.Tensor:
    """alpha_bar at timestep t as a float32 scalar, with t < 0 meaning 'clean data' (alpha_bar = 1).

    Samplers step past their last timestep to t = -1, as diffusers does with ``set_alpha_to_one``.
    """
    return schedule.alpha_bar(torch.tensor(float(t))).float() if t >= 0 else torch.tensor(1.0)


# ---- the DDPM ancestral sampler -----------------------------------------------------------------
@torch.no_grad()
def ddpm(model, x, schedule: Schedule, timesteps, *, cond=None, generator=None, clip_x0: float | None = None,
         return_trajectory: bool = False) -> Sample:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) over any decreasing subset of timesteps.

    For consecutive timesteps t > s (s = -1 after the last, meaning alpha_bar_s = 1):
        1. eps = model(x_t, t);  x0 = (x_t - sigma_t eps) / alpha_t      (optionally clipped)
        2. beta = 1 - alpha_bar_t / alpha_bar_s
        3. mean = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x0 + sqrt(1 - beta) (1 - alpha_bar_s) / (1 - alpha_bar_t) x_t
           (the posterior q(x_s | x_t, x0), DDPM Eq. 7)
        4. x_s = mean + sqrt(beta (1 - alpha_bar_s) / (1 - alpha_bar_t)) z,  z ~ N(0, I), no noise at the end
    This is diffusers' ``DDPMScheduler.step`` with variance_type="fixed_small".
    """
    ts = check_timesteps(schedule, timesteps)
    traj = [x] if return_trajectory else None
    for i, t in enumerate(ts):
        s = ts[i + 1] if i + 1 < len(ts) else -1.0
        ab_t = alpha_bar_at(schedule, t)
        eps = model_eps(model, x, t, cond)
        x0 = (x - (1 - ab_t) ** 0.5 * eps) / ab_t ** 0.5
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean, var = posterior_mean_var(schedule, x0, x, t, s)
        if s >= 0:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = mean + var ** 0.5 * z
        else:
            x = mean
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=len(ts), trajectory=traj)


def posterior_mean_var(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: float, s: float):
    """The posterior q(x_s | x_t, x_0) of the forward process, s < t (DDPM Eq. 6-7; s = t - 1 there):

        beta = 1 - alpha_bar_t / alpha_bar_s                         (DDPM's beta_t when s = t - 1)
        mean = sqrt(alpha_bar_s) beta / (1 - alpha_bar_t) x0 + sqrt(1 - beta) (1 - alpha_bar_s) / (1 - alpha_bar_t) x_t
        var  = beta (1 - alpha_bar_s) / (1 - alpha_bar_t)             (DDPM's beta-tilde, floored at 1e-20)

    t, s: floats (s = -1: clean data, alpha_bar = 1, var 0). Returns (mean like x_t, var a 0-d float64 tensor).
    """
    ab_t, ab_s = alpha_bar_at(schedule, t), alpha_bar_at(schedule, s)
    beta = 1 - ab_t / ab_s
    mean = (ab_s ** 0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_s) / (1 - ab_t)) * x_t
    return mean, torch.clamp((1 - ab_s) / (1 - ab_t) * beta, min=1e-20)


@dataclass
class TeacherRegression:
    """Fit an eps-model to a teacher as a function: a student copy for a teacher without weights (the oracle).

        L = E_{x0, t ~ U[0, T-1], z} || model(x_t, t) - teacher(x_t, t) ||^2,   x_t = alpha_t x0 + sigma_t z

    the DDPM loss (Ho et al. 2020, Eq. 14) with the teacher's eps as the target instead of the sampled z (its
    conditional mean given x_t: same minimiser, less variance). A callable for ``minilcm.train``.
    """

    teacher: Callable
    schedule: Schedule

    def __call__(self, model, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, _ = split_batch(batch)
        t = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64) * (self.schedule.T - 1)
        z = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        x_t = q_sample(self.schedule, x0, t, z)
        with torch.no_grad():
            target = model_eps(self.teacher, x_t, t.to(x0.device))
        return ((model_eps(model, x_t, t.to(x0.device)) - target) ** 2).mean()
