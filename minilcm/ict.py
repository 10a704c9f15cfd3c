"""Improved consistency training (iCT; Song & Dhariwal 2023, arXiv 2310.14189): a consistency model trained from
data alone, without a teacher. Time is VP time, as in ``minilcm.consistency``, whose consistency function, grid,
distances and paired forward this loss reuses.

    ict_discretisation(k, K)         N(k), the doubling curriculum of grid intervals (Sec. 3.4)
    lognormal_index_probs(sigmas)    p(n) over the grid's intervals (Sec. 3.5)
    ict_weight(s_n, s_n1)            lambda(s_n) = 1 / (s_{n+1} - s_n) (Sec. 3.2)
    ConsistencyTraining(schedule, total_steps)    the iCT loss for ``minilcm.train``
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .consistency import ConsistencyModel, cm_timesteps, paired_forward, pseudo_huber
from .diffusion import q_sample, split_batch
from .preconditioning import edm_sigma
from .schedules import Schedule


def ict_weight(sigma_n: torch.Tensor, sigma_n1: torch.Tensor) -> torch.Tensor:
    """lambda(sigma_n) = 1 / (sigma_{n+1} - sigma_n) (iCT, Sec. 3.1): heavier weight on the small-noise intervals."""
    return 1 / (sigma_n1 - sigma_n)


def ict_discretisation(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """The iCT curriculum (Song & Dhariwal 2023, Sec. 3.4, Eq. 8): N(k) = min(s0 2^floor(k / K'), s1) + 1 points,

    K' = floor(K / (log2 floor(s1 / s0) + 1)): the number of points doubles every K' of the K training steps.
    Returns the number of *intervals* N(k) - 1 of the grid (``cm_timesteps`` takes intervals).
    """
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1)


def lognormal_index_probs(sigmas: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    """p(n) proportional to erf((log s_{n+1} - P_mean) / (sqrt2 P_std)) - erf((log s_n - P_mean) / (sqrt2 P_std)),

    the discretised lognormal of iCT (Sec. 3.5) over the N intervals of an increasing grid of EDM noise levels s.
    """
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = (cdf[1:] - cdf[:-1]).clamp(min=0)
    return p / p.sum()


class ConsistencyTraining(nn.Module):
    """Improved consistency training (iCT, Song & Dhariwal 2023; Song et al. 2023, Algorithm 3): no teacher.

    At training step k, with N = ``ict_discretisation(k, total_steps, s0, s1)`` intervals of ``cm_timesteps``:
        1. n ~ p(n) (lognormal, Sec. 3.5; or uniform), z ~ N(0, I)
        2. x_{n+1} = alpha x0 + sigma z at t_{n+1};  x_n = alpha x0 + sigma z at t_n   (the SAME z: the unbiased
           one-sample estimate of the teacher's ODE step, Song et al. 2023, Theorem 2)
        3. L = lambda(n) d(f_theta(x_{n+1}, t_{n+1}), stopgrad f_theta(x_n, t_n)),  lambda(n) = 1 / (s_{n+1} - s_n)
           (Sec. 3.1, s = EDM noise level), d = pseudo-Huber (Sec. 3.3)
    The target is the online net itself under no_grad (mu = 0, Sec. 3.2), with the same dropout masks. The step
    counter k is a buffer, advanced by ``after_step`` and checkpointed with the loss.
    """

    def __init__(self, schedule: Schedule, total_steps: int, s0: int = 10, s1: int = 1280,
                 index: str = "lognormal", p_mean: float = -1.1, p_std: float = 2.0,
                 distance: Callable = pseudo_huber, t_min: float = 0.0, spacing: str = "karras"):
        super().__init__()
        if index not in ("lognormal", "uniform"):
            raise ValueError(f"index must be 'lognormal' or 'uniform', got {index!r}")
        self.schedule, self.total_steps, self.s0, self.s1 = schedule, total_steps, s0, s1
        self.index, self.p_mean, self.p_std, self.distance = index, p_mean, p_std, distance
        self.t_min, self.spacing = t_min, spacing
        self.register_buffer("k", torch.zeros((), dtype=torch.long))
        self._grids: dict[int, torch.Tensor] = {}

    def grid(self, N: int) -> torch.Tensor:
        if N not in self._grids:
            self._grids[N] = cm_timesteps(self.schedule, N, self.t_min, self.spacing)
        return self._grids[N]

    def forward(self, model: ConsistencyModel, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, _ = split_batch(batch)
        B, device = x0.shape[0], x0.device
        N = ict_discretisation(int(self.k), self.total_steps, self.s0, self.s1)
        ts = self.grid(N)
        sig = edm_sigma(self.schedule, ts)  # (N+1,)
        if self.index == "lognormal":
            n = torch.multinomial(lognormal_index_probs(sig, self.p_mean, self.p_std), B, replacement=True,
                                  generator=generator)
        else:
            n = torch.randint(0, N, (B,), generator=generator)
        z = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        x_n1, x_n = q_sample(self.schedule, x0, ts[n + 1], z), q_sample(self.schedule, x0, ts[n], z)
        online, target = paired_forward(model, model, x_n1, ts[n + 1].to(device), x_n, ts[n].to(device))
        d = self.distance(online, target)  # (B,)
        return (ict_weight(sig[n], sig[n + 1]).to(d) * d).mean()

    def after_step(self, model: nn.Module, step: int) -> None:
        self.k.fill_(step + 1)
