"""The VP-SDE, its reverse-time SDE and its probability-flow ODE, in the schedule's continuous time.

Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
(arXiv 2011.13456). Time ``t`` is the diffusers-style float timestep in [0, T-1], and
beta(t) = -d log alpha_bar / dt is ``Schedule.beta`` (a C^2 spline, so alpha_bar is exact at every integer):

    forward SDE (Eq. 11)   dx = f(t) x dt + g(t) dw,          f(t) = -1/2 beta(t),  g(t) = sqrt(beta(t))
    reverse SDE (Eq. 6)    dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dw_bar      (t runs backwards)
    PF-ODE      (Eq. 13)   dx/dt = f(t) x - 1/2 g(t)^2 score(x, t) = -1/2 beta(t) (x - eps(x, t) / sigma_t)

with score = -eps / sigma_t (``diffusion.eps_to_score``). The forward SDE's moments obey
dm/dt = f m and dv/dt = 2 f v + g^2, solved by m_t = alpha_t m_0 and v_t = alpha_bar_t v_0 + (1 - alpha_bar_t):
exactly the discrete q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) at every integer t (tests/test_sde.py checks it).

One-step functions (stable API; Chapter 4 imports them):

    euler_step(model, x, schedule, t, s, cond=None) -> x_s        1 model evaluation
    heun_step(model, x, schedule, t, s, cond=None)  -> x_s        2 model evaluations

take one PF-ODE step from time t to time s, both floats in [0, T-1] (or (B,) tensors, one time per sample);
s < t decodes (towards data), s > t encodes (towards noise). Samplers follow the one signature of ``minilcm.diffusion``:

    reverse_sde(model, x, schedule, timesteps, *, cond=None, generator=None, return_trajectory=False) -> Sample
    pf_ode(model, x, schedule, timesteps, *, method="heun", cond=None, ...) -> Sample
    pf_ode_encode(model, x0, schedule, timesteps, *, method="heun", cond=None, ...) -> Sample
    pf_ode_rk4(model, x, schedule, timesteps, *, cond=None, ...) -> Sample     classical RK4 (``rk4_step``, NFE 4
                                                                                per step): reference solutions

Time grid convention: these solvers integrate *between* the given times, so ``timesteps`` of length n
makes n - 1 steps, from ``timesteps[0]`` to ``timesteps[-1]`` (pass a list that ends at 0 to reach data,
e.g. ``schedule.timesteps(n + 1, "lambda")`` for n steps). At t = 0, sigma_0 = sqrt(1 - alpha_bar_0) ~ 0.01
(linear schedule), so the velocity is finite there and every Heun step, the last included, is a full
two-evaluation step: NFE = n - 1 for Euler, 2 (n - 1) for Heun, n - 1 for the reverse SDE.
"""
from __future__ import annotations

from typing import Callable

import torch

from .diffusion import Sample, check_timesteps, model_eps
from .schedules import Schedule, broadcast

METHODS = ("euler", "heun")


# ---- the forward VP-SDE --------------------------------------------------------------------------
def drift_coef(schedule: Schedule, t) -> torch.Tensor:
    """f(t) = -1/2 beta(t): the VP-SDE drift is f(t) x (Song et al. 2021, Eq. 11). float64."""
    return -0.5 * schedule.beta(t)


def diffusion_coef(schedule: Schedule, t) -> torch.Tensor:
    """g(t) = sqrt(beta(t)): the VP-SDE diffusion coefficient (Song et al. 2021, Eq. 11). float64."""
    return schedule.beta(t).sqrt()


@torch.no_grad()
def forward_sde(x0: torch.Tensor, schedule: Schedule, timesteps, *, generator: torch.Generator | None = None,
                return_trajectory: bool = False) -> Sample:
    """Simulate the forward VP-SDE dx = f x dt + g dw with Euler-Maruyama over *increasing* ``timesteps``.

    x_{t+h} = x_t + f(t) x_t h + g(t) sqrt(h) z  (Kloeden & Platen 1992, Sec. 9.1). No model is called (nfe = 0).
    Its marginals approach q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) as the steps shrink.
    """
    ts = check_timesteps(schedule, torch.as_tensor(timesteps, dtype=torch.float64).flip(0))[::-1]
    x = x0
    traj = [x] if return_trajectory else None
    for t, s in zip(ts, ts[1:]):
        h = s - t
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x + broadcast(drift_coef(schedule, t) * h, x) * x + broadcast(diffusion_coef(schedule, t) * h ** 0.5, x) * z
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=0, trajectory=traj)


# ---- the probability-flow ODE -------------------------------------------------------------------
def _time(t) -> torch.Tensor:
    """A time as float64 on the CPU (where the schedule lives): a scalar, or (B,) for one time per sample."""
    return torch.as_tensor(t, dtype=torch.float64).detach().cpu()


def pf_ode_velocity(model: Callable, x: torch.Tensor, schedule: Schedule, t, cond: dict | None = None) -> torch.Tensor:
    """dx/dt of the PF-ODE (Song et al. 2021, Eq. 13) with an eps-model: -1/2 beta(t) (x - eps(x, t) / sigma_t).

    x: (B, ...);  t: a float in [0, T-1], or a (B,) tensor of per-sample times;  returns (B, ...) in x's dtype.
    One model evaluation.
    """
    t = _time(t)
    eps = model_eps(model, x, t, cond)
    half_beta, sigma = 0.5 * schedule.beta(t), schedule.sigma(t)
    return -broadcast(half_beta, x) * (x - eps / broadcast(sigma, x))


def euler_step(model: Callable, x: torch.Tensor, schedule: Schedule, t, s, cond: dict | None = None) -> torch.Tensor:
    """One Euler step of the PF-ODE from time t to time s (either direction): x_s = x_t + (s - t) v(x_t, t).

    t, s: floats in [0, T-1], or (B,) tensors (one step per sample). First order: the global error over
    [0, T-1] falls like 1/N (tests/test_sde.py measures it). NFE = 1.
    """
    h = broadcast(_time(s) - _time(t), x)
    return x + h * pf_ode_velocity(model, x, schedule, t, cond)


def heun_step(model: Callable, x: torch.Tensor, schedule: Schedule, t, s, cond: dict | None = None) -> torch.Tensor:
    """One Heun step (explicit trapezoid, 2nd-order Runge-Kutta) of the PF-ODE from t to s (either direction).

        v_t      = v(x_t, t)
        x_euler  = x_t + (s - t) v_t                        (predictor: an Euler step)
        x_s      = x_t + (s - t) / 2 (v_t + v(x_euler, s))  (corrector: the trapezoidal rule)

    Karras et al. 2022 (EDM), Algorithm 1, written in VP time. t, s: floats in [0, T-1], or (B,) tensors.
    Second order. NFE = 2.
    """
    h = broadcast(_time(s) - _time(t), x)
    v_t = pf_ode_velocity(model, x, schedule, t, cond)
    x_euler = x + h * v_t
    return x + 0.5 * h * (v_t + pf_ode_velocity(model, x_euler, schedule, s, cond))


_STEPS = {"euler": (euler_step, 1), "heun": (heun_step, 2)}


def _integrate(model, x, schedule, ts, method, cond, return_trajectory) -> Sample:
    if method not in _STEPS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    step, nfe_per_step = _STEPS[method]
    traj = [x] if return_trajectory else None
    for t, s in zip(ts, ts[1:]):
        x = step(model, x, schedule, t, s, cond)
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=nfe_per_step * (len(ts) - 1), trajectory=traj)


@torch.no_grad()
def pf_ode(model, x, schedule: Schedule, timesteps, *, method: str = "heun", cond=None, generator=None,
           return_trajectory: bool = False) -> Sample:
    """Sample by integrating the PF-ODE (Song et al. 2021, Eq. 13) from timesteps[0] down to timesteps[-1].

    x: noise at timesteps[0] (for T-1 = 999, x ~ N(0, I) to within alpha_999 ~ 0.006). ``timesteps``: strictly
    decreasing, n entries -> n - 1 steps of ``method`` ("euler": NFE n - 1, "heun": NFE 2 (n - 1)).
    Deterministic: ``generator`` is accepted for the common signature and never used.
    """
    ts = check_timesteps(schedule, timesteps)
    return _integrate(model, x, schedule, ts, method, cond, return_trajectory)


@torch.no_grad()
def pf_ode_encode(model, x0, schedule: Schedule, timesteps, *, method: str = "heun", cond=None,
                  return_trajectory: bool = False) -> Sample:
    """Encode data into noise: the PF-ODE run forwards in time, from timesteps[-1] up to timesteps[0].

    Pass the *same decreasing* ``timesteps`` you decode with (e.g. ``schedule.timesteps(n, "lambda")``);
    the grid is walked in reverse, so ``pf_ode(model, pf_ode_encode(model, x0, ...).x, ...)`` returns x0 up to
    the solver's error (Song et al. 2021, Sec. 4.3: exact likelihoods and latent codes via the ODE).
    """
    ts = check_timesteps(schedule, timesteps)[::-1]
    return _integrate(model, x0, schedule, ts, method, cond, return_trajectory)


# ---- the reverse-time SDE -----------------------------------------------------------------------
@torch.no_grad()
def reverse_sde(model, x, schedule: Schedule, timesteps, *, cond=None, generator=None,
                return_trajectory: bool = False) -> Sample:
    """Sample with Euler-Maruyama on the reverse-time VP-SDE (Song et al. 2021, Eq. 6; Anderson 1982).

    For consecutive times t > s, with h = t - s > 0 and z ~ N(0, I):
        1. eps   = model(x_t, t);   score = -eps / sigma_t
        2. drift = f(t) x_t - g(t)^2 score = -1/2 beta(t) x_t + beta(t) eps / sigma_t      (dx/dt, t decreasing)
        3. x_s   = x_t - h * drift + g(t) sqrt(h) z
    Noise is added on every step, the last included: p_0 itself carries sigma_0 ~ 0.01 of noise.
    NFE = len(timesteps) - 1. Stochastic: needs many more steps than the PF-ODE for the same accuracy.
    """
    ts = check_timesteps(schedule, timesteps)
    traj = [x] if return_trajectory else None
    for t, s in zip(ts, ts[1:]):
        h = t - s
        eps = model_eps(model, x, t, cond)
        beta, sigma = schedule.beta(t), schedule.sigma(_time(t))
        drift = -0.5 * broadcast(beta, x) * x + broadcast(beta / sigma, x) * eps
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = x - h * drift + broadcast((beta * h).sqrt(), x) * z
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=len(ts) - 1, trajectory=traj)


# ---- a high-accuracy reference solver -------------------------------------------------------------
def rk4_step(model: Callable, x: torch.Tensor, schedule: Schedule, t, s, cond: dict | None = None) -> torch.Tensor:
    """One classical 4th-order Runge-Kutta step of the PF-ODE from time t to time s (either direction). NFE = 4.

        k1 = v(x, t),  k2 = v(x + h/2 k1, t + h/2),  k3 = v(x + h/2 k2, t + h/2),  k4 = v(x + h k3, s)
        x_s = x + h/6 (k1 + 2 k2 + 2 k3 + k4),  h = s - t

    t, s: floats in [0, T-1]. Fourth order: used for reference solutions against which Euler's and Heun's
    orders are measured (Chapter 2), not as a sampler.
    """
    t, s = float(t), float(s)
    h = s - t
    k1 = pf_ode_velocity(model, x, schedule, t, cond)
    k2 = pf_ode_velocity(model, x + h / 2 * k1, schedule, t + h / 2, cond)
    k3 = pf_ode_velocity(model, x + h / 2 * k2, schedule, t + h / 2, cond)
    k4 = pf_ode_velocity(model, x + h * k3, schedule, s, cond)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@torch.no_grad()
def pf_ode_rk4(model, x, schedule: Schedule, timesteps, *, cond=None, return_trajectory: bool = False) -> Sample:
    """Integrate the PF-ODE with classical RK4 from timesteps[0] down to timesteps[-1] (n entries: n - 1 steps,
    NFE 4 (n - 1)). A reference solver, e.g. 400 steps uniform in lambda:
    ``pf_ode_rk4(oracle, x_T, schedule, schedule.timesteps(401, "lambda"))``."""
    ts = check_timesteps(schedule, timesteps)
    traj = [x] if return_trajectory else None
    for t, s in zip(ts, ts[1:]):
        x = rk4_step(model, x, schedule, t, s, cond)
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=4 * (len(ts) - 1), trajectory=traj)
