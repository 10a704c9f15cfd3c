"""Training-free fast samplers for the probability-flow ODE: DDIM, DPM-Solver, DPM-Solver++.

All follow the one sampler signature of ``minilcm.diffusion``:
    sampler(model, x, schedule, timesteps, *, cond=None, generator=None, ...) -> Sample
"""
from __future__ import annotations

import torch

from .diffusion import alpha_bar_at


def ddim_step(schedule, x: torch.Tensor, t: float, s: float, eps: torch.Tensor, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update from time t to s < t (Song et al. 2021, arXiv 2010.02502, Eq. 12); s = -1 means clean data.

        x0      = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
        sig     = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)
        x_s     = sqrt(ab_s) x0 + sqrt(1 - ab_s - sig^2) eps + sig z

    eta = 0 is deterministic (an exact-in-the-linear-part step of the PF-ODE); eta = 1 matches DDPM's noise.
    """
    ab_t, ab_s = alpha_bar_at(schedule, t), alpha_bar_at(schedule, s)
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    sig = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt() if eta > 0 else torch.tensor(0.0)
    out = ab_s.sqrt() * x0 + (1 - ab_s - sig ** 2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise (a tensor shaped like x)")
        out = out + sig * noise
    return out
