"""Training-free fast samplers for the probability-flow ODE: DDIM, DPM-Solver, DPM-Solver++.

All follow the one sampler signature of ``minilcm.diffusion``:

    sampler(model, x, schedule, timesteps, *, cond=None, generator=None, ...) -> Sample(x, nfe, trajectory)

**Timesteps and the last step.** ``timesteps`` is the decreasing list of times t_0 > t_1 > ... > t_{N-1} at
which the solver stands between steps. With ``denoise_to_zero=True`` (the default, and the convention of
diffusers and of ``minilcm.diffusion.ddpm``) every sampler then takes one more, first-order step from
t_{N-1} to clean data (t = -1, alpha_bar = 1, lambda = +inf): it returns the model's data prediction
x0 = (x - sigma eps) / alpha at t_{N-1}. That is what diffusers' DDIMScheduler (set_alpha_to_one=True) and
DPMSolverMultistepScheduler (final_sigmas_type="zero") do after their last timestep, so the same
timesteps give the same samples. With ``denoise_to_zero=False`` the sampler integrates the ODE from t_0
to t_{N-1} and stops there, as the DPM-Solver paper does (the name is the one of the reference
implementation, ``DPM_Solver.sample(denoise_to_zero=...)``); that is how convergence orders are measured.

NFE: ddim and dpm_solver_pp spend one evaluation per step, dpm_solver ``order`` per step; the step to
clean data costs one.
"""
from __future__ import annotations

import math

import torch

from .diffusion import Sample, alpha_bar_at, check_timesteps, model_eps
from .schedules import Schedule

CLEAN = -1.0  # the time "after" t = 0: alpha_bar = 1, sigma = 0, lambda = +inf


# ---- shared plumbing ---------------------------------------------------------------------------
def _steps(schedule: Schedule, timesteps, denoise_to_zero: bool) -> list[tuple[float, float]]:
    """Consecutive (from, to) pairs of times; with denoise_to_zero a last pair (t_{N-1}, CLEAN)."""
    ts = check_timesteps(schedule, timesteps)
    ends = ts[1:] + ([CLEAN] if denoise_to_zero else [])
    if not ends:
        raise ValueError("with denoise_to_zero=False the timesteps must hold at least two times (start and end)")
    return list(zip(ts, ends))


class _Counted:
    """The eps-model with an NFE counter: ``eps(x, t)`` calls ``model(x, t, **cond)`` once."""

    def __init__(self, model, cond):
        self.model, self.cond, self.nfe = model, cond, 0

    def __call__(self, x, t):
        self.nfe += 1
        return model_eps(self.model, x, t, self.cond)


def _alpha_sigma_lam(schedule: Schedule, t: float) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) as float64 numbers; t = CLEAN gives (1, 0, inf)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    tt = torch.tensor(float(t), dtype=torch.float64)
    return schedule.alpha(tt).item(), schedule.sigma(tt).item(), schedule.lam(tt).item()


def _alpha_sigma_of_lam(lam: float) -> tuple[float, float]:
    """alpha and sigma from lambda alone: alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda)."""
    return (1 / (1 + math.exp(-2 * lam))) ** 0.5, (1 / (1 + math.exp(2 * lam))) ** 0.5


def _x0(x, alpha, sigma, eps):
    """Data prediction x0 = (x - sigma eps) / alpha: the first-order step to clean data (h = +inf)."""
    return (x - sigma * eps) / alpha


# ---- DDIM ----------------------------------------------------------------------------------------
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
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM's noise), got {eta}")
    sig = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt() if eta > 0 else torch.tensor(0.0)
    out = ab_s.sqrt() * x0 + (1 - ab_s - sig ** 2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise (a tensor shaped like x)")
        out = out + sig * noise
    return out


@torch.no_grad()
def ddim(model, x, schedule: Schedule, timesteps, *, eta: float = 0.0, cond=None, generator=None,
         denoise_to_zero: bool = True, return_trajectory: bool = False) -> Sample:
    """DDIM (Song et al. 2021, arXiv 2010.02502, Eq. 12) over any decreasing timesteps; one NFE per step.

    eta = 0: deterministic, the Euler step of the PF-ODE written in x/alpha against sigma/alpha (Eq. 14),
    identical to DPM-Solver-1. eta = 1: the DDPM posterior's noise level (equal to ``ddpm`` with the same
    generator). Fresh noise z ~ N(0, I) is drawn only for steps that end at a noisy time.
    This is diffusers' ``DDIMScheduler.step`` (clip_sample=False, set_alpha_to_one=True).
    """
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic DDIM, 1: DDPM's noise), got {eta}")
    traj = [x] if return_trajectory else None
    eps_fn = _Counted(model, cond)
    for t, s in _steps(schedule, timesteps, denoise_to_zero):
        eps = eps_fn(x, t)
        noise = None
        if eta > 0 and s >= 0:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = ddim_step(schedule, x, t, s, eps, eta=eta if s >= 0 else 0.0, noise=noise)
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=eps_fn.nfe, trajectory=traj)


# ---- DPM-Solver (singlestep, noise prediction) ---------------------------------------------------
# Lu et al. 2022, arXiv 2206.00927. In the paper's notation one step goes from s to t < s (s is the
# noisier time), h = lambda_t - lambda_s > 0, and the exact solution of the PF-ODE is (Eq. 3.4)
#     x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps(x_lambda, lambda) dlambda
# DPM-Solver-k Taylor-expands eps in lambda to order k-1 and integrates the exponential weights exactly.

def _dpm_solver_1(eps_fn, schedule, x, s, t, eps_s):
    """DPM-Solver-1, the first-order case: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps_s. Equal to DDIM."""
    a_s, _, l_s = _alpha_sigma_lam(schedule, s)
    a_t, sg_t, l_t = _alpha_sigma_lam(schedule, t)
    return (a_t / a_s) * x - sg_t * math.expm1(l_t - l_s) * eps_s


def _dpm_solver_2(eps_fn, schedule, x, s, t, eps_s, r1=0.5):
    """DPM-Solver-2 (Algorithm 1; Algorithm 4 for general r1): one intermediate point s1 at lambda_s + r1 h."""
    a_s, _, l_s = _alpha_sigma_lam(schedule, s)
    a_t, sg_t, l_t = _alpha_sigma_lam(schedule, t)
    h = l_t - l_s
    l_s1 = l_s + r1 * h
    a_s1, sg_s1 = _alpha_sigma_of_lam(l_s1)
    s1 = schedule.t_of_lam(l_s1).item()
    u = (a_s1 / a_s) * x - sg_s1 * math.expm1(r1 * h) * eps_s
    eps_s1 = eps_fn(u, s1)
    return ((a_t / a_s) * x - sg_t * math.expm1(h) * eps_s
            - sg_t / (2 * r1) * math.expm1(h) * (eps_s1 - eps_s))


def _dpm_solver_3(eps_fn, schedule, x, s, t, eps_s, r1=1 / 3, r2=2 / 3):
    """DPM-Solver-3 (Algorithm 2; Algorithm 5 for general r1, r2): intermediate points at lambda_s + r1 h, + r2 h."""
    a_s, _, l_s = _alpha_sigma_lam(schedule, s)
    a_t, sg_t, l_t = _alpha_sigma_lam(schedule, t)
    h = l_t - l_s
    l_s1, l_s2 = l_s + r1 * h, l_s + r2 * h
    (a_s1, sg_s1), (a_s2, sg_s2) = _alpha_sigma_of_lam(l_s1), _alpha_sigma_of_lam(l_s2)
    s1, s2 = schedule.t_of_lam(torch.tensor([l_s1, l_s2])).tolist()
    u1 = (a_s1 / a_s) * x - sg_s1 * math.expm1(r1 * h) * eps_s
    D1 = eps_fn(u1, s1) - eps_s
    u2 = ((a_s2 / a_s) * x - sg_s2 * math.expm1(r2 * h) * eps_s
          - sg_s2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1) * D1)
    D2 = eps_fn(u2, s2) - eps_s
    return (a_t / a_s) * x - sg_t * math.expm1(h) * eps_s - sg_t / r2 * (math.expm1(h) / h - 1) * D2


_DPM_SOLVER_STEPS = {1: _dpm_solver_1, 2: _dpm_solver_2, 3: _dpm_solver_3}


@torch.no_grad()
def dpm_solver(model, x, schedule: Schedule, timesteps, *, order: int = 2, cond=None, generator=None,
               denoise_to_zero: bool = True, return_trajectory: bool = False) -> Sample:
    """Singlestep DPM-Solver-``order`` (Lu et al. 2022, arXiv 2206.00927, Algorithms 1-2), order 1, 2 or 3.

    Each step from s to t evaluates eps at s and at ``order - 1`` intermediate times found in lambda
    (uniform fractions r1 = 1/2, or r1 = 1/3 and r2 = 2/3, of h = lambda_t - lambda_s; mapped back to
    continuous time by ``schedule.t_of_lam``), so it costs ``order`` NFE and has local error O(h^{order+1}).
    The step to clean data (``denoise_to_zero``) is first order: h is infinite there. Deterministic;
    ``generator`` is accepted for the common signature and unused.
    """
    if order not in _DPM_SOLVER_STEPS:
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}")
    step = _DPM_SOLVER_STEPS[order]
    traj = [x] if return_trajectory else None
    eps_fn = _Counted(model, cond)
    for s, t in _steps(schedule, timesteps, denoise_to_zero):
        eps_s = eps_fn(x, s)
        if t < 0:
            a_s, sg_s, _ = _alpha_sigma_lam(schedule, s)
            x = _x0(x, a_s, sg_s, eps_s)
        else:
            x = step(eps_fn, schedule, x, s, t, eps_s)
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=eps_fn.nfe, trajectory=traj)


def dpm_solver_fast_orders(nfe: int) -> list[int]:
    """DPM-Solver-fast's order allocation for a budget of ``nfe`` evaluations (Lu et al. 2022, Sec. 3.4): as many
    order-3 steps as fit, M = floor(nfe / 3) + 1 steps in all, and the remainder as lower orders:

        nfe = 3k     -> [3] * (k - 1) + [2, 1]       nfe = 3k + 1 -> [3] * k + [1]       nfe = 3k + 2 -> [3] * k + [2]

    (for nfe < 3 one step of order nfe). The orders sum to nfe."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"DPM-Solver-fast needs an integer NFE >= 1, got {nfe!r}")
    if nfe < 3:
        return [nfe]
    k, r = divmod(nfe, 3)
    return [3] * (k - 1) + [2, 1] if r == 0 else [3] * k + [r]


def dpm_solver_fast_timesteps(schedule: Schedule, nfe: int, t_end: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """DPM-Solver-fast's grid for ``nfe`` evaluations (Lu et al. 2022, Sec. 3.4): ``dpm_solver_fast_orders(nfe)``
    steps, uniform in lambda from t = T - 1 down to ``t_end`` (the paper's t = epsilon). Returns (times noisiest
    first, float64, one more than the steps; the orders of the steps)."""
    orders = dpm_solver_fast_orders(nfe)
    lam = torch.linspace(float(schedule.lam(schedule.T - 1)), float(schedule.lam(t_end)), len(orders) + 1,
                         dtype=torch.float64)
    times = schedule.t_of_lam(lam).to(torch.float64)
    times[0], times[-1] = float(schedule.T - 1), float(t_end)
    return times, orders


@torch.no_grad()
def dpm_solver_fast(model, x, schedule: Schedule, timesteps, *, orders, cond=None, generator=None) -> Sample:
    """DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): one singlestep DPM-Solver step of ``orders[i]`` from
    ``timesteps[i]`` to ``timesteps[i + 1]`` (``dpm_solver_fast_timesteps`` makes both for an NFE budget), with no
    extra step to clean data: the run costs exactly sum(orders) evaluations. The fixed-order ``dpm_solver`` at a
    small NFE instead spends them on one or two steps of one order. ``generator`` is unused (deterministic)."""
    times = [float(t) for t in timesteps]
    if len(orders) != len(times) - 1 or any(o not in _DPM_SOLVER_STEPS for o in orders):
        raise ValueError(f"DPM-Solver-fast needs one order (1, 2 or 3) per step: {len(times) - 1} steps, "
                         f"orders {list(orders)}")
    eps_fn = _Counted(model, cond)
    for order, s, t in zip(orders, times[:-1], times[1:]):
        x = _DPM_SOLVER_STEPS[order](eps_fn, schedule, x, s, t, eps_fn(x, s))
    return Sample(x, nfe=eps_fn.nfe)


# ---- DPM-Solver++ (multistep, data prediction) ----------------------------------------------------
@torch.no_grad()
def dpm_solver_pp(model, x, schedule: Schedule, timesteps, *, cond=None, generator=None,
                  denoise_to_zero: bool = True, return_trajectory: bool = False) -> Sample:
    """DPM-Solver++(2M) (Lu et al. 2022b, arXiv 2211.01095, Algorithm 2): multistep, second order, one NFE per step.

    It integrates the ODE written with the data prediction x0_theta = (x - sigma eps) / alpha:
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
    with h_i = lambda_{t_i} - lambda_{t_{i-1}}, r_i = h_{i-1} / h_i, and
        D_1 = x0_0 (the first step is first order: no history yet),
        D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2}   (i >= 2),
    the linear extrapolation of the two latest data predictions to the step's midpoint in lambda.
    The step to clean data (``denoise_to_zero``) has h = +inf and returns the last data prediction,
    as diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2) does.
    Deterministic; ``generator`` is accepted for the common signature and unused.
    """
    traj = [x] if return_trajectory else None
    eps_fn = _Counted(model, cond)
    x0_prev, h_prev = None, None
    for s, t in _steps(schedule, timesteps, denoise_to_zero):
        a_s, sg_s, l_s = _alpha_sigma_lam(schedule, s)
        x0 = _x0(x, a_s, sg_s, eps_fn(x, s))
        if t < 0:
            x = x0
        else:
            a_t, sg_t, l_t = _alpha_sigma_lam(schedule, t)
            h = l_t - l_s
            D = x0
            if x0_prev is not None:
                r = h_prev / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = (sg_t / sg_s) * x - a_t * math.expm1(-h) * D
            x0_prev, h_prev = x0, h
        if return_trajectory:
            traj.append(x)
    return Sample(x, nfe=eps_fn.nfe, trajectory=traj)


# ---- the solver grid ---------------------------------------------------------------------------------
def spaced_timesteps(schedule: Schedule, n: int, spacing: str = "lambda", t_max: float | None = None,
                     t_min: float = 0.0) -> torch.Tensor:
    """``n`` >= 2 decreasing times from t_max (default T-1) to t_min, both included (float64): a solver's grid.

    lambda (the default here: DPM-Solver's recommendation for small images) and linspace are
    ``schedule.timesteps(n, spacing, t_max, t_min)``; leading / trailing are diffusers' integer grids over the whole
    schedule, ``schedule.timesteps(n, spacing)`` (t_max and t_min unused).
    """
    if spacing in ("leading", "trailing"):
        return schedule.timesteps(n, spacing)
    if n < 2:
        raise ValueError(f"a solver grid needs n >= 2 times (start and end), got n={n}")
    if spacing not in ("linspace", "lambda"):
        raise ValueError(f"unknown spacing {spacing!r}; choose lambda, linspace, leading or trailing")
    return schedule.timesteps(n, spacing, t_max=t_max, t_min=t_min)


def alpha_sigma_lam(schedule: Schedule, t) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) at a (possibly continuous) timestep t, as float64 numbers: the coefficients every
    DPM-Solver step reads (lambda_t = log(alpha_t / sigma_t)); t = CLEAN (-1) gives (1, 0, inf)."""
    return _alpha_sigma_lam(schedule, float(t))
