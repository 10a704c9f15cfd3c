"""EDM preconditioning (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364): the parameterisation the Chapters 1-4 pixel teacher is trained in, in VP time.

    edm_sigma(schedule, t)              s = sigma_t / alpha_t = exp(-lambda_t), EDM's noise level of VP time t
    EDMPrecond(raw, schedule, sd)       an eps-model (the package's one call convention) built from a raw network
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpoints import model_config
from .schedules import Schedule, broadcast


def edm_sigma(schedule: Schedule, t) -> torch.Tensor:
    """The EDM noise level of VP time t: s = sigma_t / alpha_t = exp(-lambda_t); x_t / alpha_t = x_0 + s eps. float64"""
    return torch.exp(-schedule.lam(torch.as_tensor(t, dtype=torch.float64)))


class EDMPrecond(nn.Module):
    """An eps-model made of a raw network with EDM's preconditioning (Karras et al. 2022, Eq. 7 and Table 1).

    With s = sigma_t / alpha_t and x_edm = x_t / alpha_t:

        D(x_t, t) = c_skip(s) x_t + c_out(s) raw(c_in(s) x_edm, t, **cond)
        eps       = (x_t - alpha_t D) / sigma_t                  (the one convention: model(x_t, t) -> eps)

    c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s sigma_data / sqrt(s^2 + sigma_data^2),
    c_in = 1 / sqrt(s^2 + sigma_data^2). Why: a plain eps-net's x0-estimate (x_t - sigma_t eps) / alpha_t
    multiplies its errors by sigma_t / alpha_t (157.4 at t = 999 of the linear schedule), fatal for a one-step
    model trained from scratch; here raw's output has unit scale at every t. The skip acts on x_t, as in
    :class:`CMScalings`, so ``ConsistencyModel(EDMPrecond(raw, schedule, sd), schedule, CMScalings(sd))`` is
    exactly Song et al. 2023's f = c_skip x_t + c_out raw(...) (tests/test_consistency.py checks it).
    """

    def __init__(self, net: nn.Module, schedule: Schedule, sigma_data: float = 0.5):
        super().__init__()
        self.net, self.schedule, self.sigma_data = net, schedule, sigma_data
        self.config = {"raw": model_config(net), "sigma_data": sigma_data, "schedule": schedule.kind}

    @property
    def null_class(self):
        return getattr(self.net, "null_class", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        t64 = torch.as_tensor(t).detach().double().cpu()
        t64 = t64.expand(x.shape[0]) if t64.ndim == 0 else t64
        s, sd2 = edm_sigma(self.schedule, t64), self.sigma_data ** 2
        alpha, sigma = self.schedule.alpha(t64), self.schedule.sigma(t64)
        c_skip, c_out = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1 / (s ** 2 + sd2).sqrt()
        raw = self.net(broadcast(c_in / alpha, x) * x, t, **cond)  # c_in x_edm = c_in x_t / alpha_t
        D = broadcast(c_skip, x) * x + broadcast(c_out, x) * raw
        return (x - broadcast(alpha, x) * D) / broadcast(sigma, x)
