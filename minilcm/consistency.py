"""Consistency models: the consistency function, distillation (CD), training (CT) and CM sampling.

Song et al. 2023, "Consistency Models" (arXiv 2303.01469); Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models" (iCT, arXiv 2310.14189). Everything lives in VP time: t is the
diffusers-style float timestep, x_t = alpha_t x_0 + sigma_t eps.

The consistency function maps every point of one PF-ODE trajectory to the trajectory's origin,

    f(x_t, t) = c_skip(t) x_t + c_out(t) F(x_t, t),      f(x, t_min) = x   (the boundary condition)

where F is built from ANY eps-model ``net(x, t, **cond) -> eps`` (the one convention), so a student starts as a
deepcopy of its teacher. Two scalings (c_skip, c_out), see :class:`CMScalings` and :class:`LCMScalings`.

    ConsistencyModel(net, schedule, scaling)      f(x, t, **cond) -> x0-estimate           (B, ...) -> (B, ...)
    ConsistencyDistillation(teacher, student)     CD loss for minilcm.train (Algorithm 2)
    (consistency training without a teacher, iCT, is ``minilcm.ict``)
    cm_sample(model, x, schedule, timesteps)      one-step and multistep sampling (Algorithm 1)

The CD / CT discretisation grid is N+1 increasing times t_min = t_0 < ... < t_N = T-1 (``cm_timesteps``):
by default Karras et al. 2022 (Eq. 5, rho = 7) spaced in the EDM noise level sigma_t / alpha_t, as both papers
use, mapped back to VP time through the log-SNR (sigma_t / alpha_t = exp(-lambda_t)); "lambda" spaces it
uniformly in lambda instead (DPM-Solver's grid).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .checkpoints import model_config
from .diffusion import Sample, check_timesteps, eps_to_x0, model_eps, q_sample, split_batch
from .errors import InputError
from .preconditioning import edm_sigma
from .schedules import Schedule, broadcast
from .solvers import ddim_step
from .train import ema_update


def keep_out_of_state_dict(module: nn.Module, name: str) -> None:
    """Leave the submodule ``name`` (a frozen teacher) out of ``module.state_dict()``, and do not expect it on load:
    checkpoints of a distillation loss then hold the target network only."""
    def drop(mod, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix + name + ".")]:
            del state_dict[key]

    def not_missing(mod, incompatible_keys):
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if f".{name}." not in "." + k]

    # torch < 2.5 has only the private name of the state_dict post-hook
    (getattr(module, "register_state_dict_post_hook", None) or module._register_state_dict_hook)(drop)
    module.register_load_state_dict_post_hook(not_missing)


# ---- the boundary-condition scalings -------------------------------------------------------------
@dataclass(frozen=True)
class CMScalings:
    """The consistency-model scalings (Song et al. 2023, Appendix C), in VP variables.

    With s = sigma_t / alpha_t the EDM noise level of t and s_min that of t_min:

        c_skip(t) = sigma_data^2 / ((s - s_min)^2 + sigma_data^2)
        c_out(t)  = sigma_data (s - s_min) / sqrt(sigma_data^2 + s^2)

    so c_skip(t_min) = 1 and c_out(t_min) = 0 exactly. c_out multiplies the EDM network output F (Karras et al.
    2022, Eq. 7 and Table 1): F is what a denoiser D = c_skip^EDM x + c_out^EDM F with c_skip^EDM = sigma_data^2 /
    (s^2 + sigma_data^2), c_out^EDM = s sigma_data / sqrt(s^2 + sigma_data^2) would need to output to be the eps-net's
    x0-estimate x0_hat = (x_t - sigma_t eps) / alpha_t:

        F(x_t, t) = (x0_hat - c_skip^EDM(t) x_t) / c_out^EDM(t)

    F's input is the eps-net's own (x_t, t): VP's x_t = x_edm / sqrt(s^2 + 1) is EDM's c_in with sigma_data = 1.
    Away from t_min (s >> s_min) the CM scalings equal EDM's, so f = x0_hat: a student copied from its teacher
    starts as the teacher's one-step denoiser. The skip acts on x_t itself (not x_t / alpha_t, as the EDM
    variable would): the boundary then returns x_{t_min} unchanged, as LCM does, and the two differ by
    1 / alpha_t - 1 ~ sigma_t^2 / 2 only where c_skip is not negligible.
    """

    sigma_data: float = 0.5

    def __call__(self, schedule: Schedule, t: torch.Tensor, t_min: float) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.as_tensor(t, dtype=torch.float64)
        s = edm_sigma(schedule, t)
        ds = torch.where(t == t_min, 0.0, s - edm_sigma(schedule, float(t_min)))  # exactly 0 at t_min
        sd2 = self.sigma_data ** 2
        return sd2 / (ds ** 2 + sd2), self.sigma_data * ds / (sd2 + s ** 2).sqrt()

    def output(self, schedule: Schedule, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """F(x_t, t): the EDM network output that the eps-net stands for (see the class docstring)."""
        s, sd2 = edm_sigma(schedule, t), self.sigma_data ** 2
        c_skip_edm, c_out_edm = sd2 / (s ** 2 + sd2), s * self.sigma_data / (s ** 2 + sd2).sqrt()
        return (eps_to_x0(schedule, x, t, eps) - broadcast(c_skip_edm, x) * x) / broadcast(c_out_edm, x)


@dataclass(frozen=True)
class LCMScalings:
    """The discrete LCM scalings: diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.

        c_skip(t) = sigma_data^2 / ((t k)^2 + sigma_data^2),   c_out(t) = t k / sqrt((t k)^2 + sigma_data^2)

    with k = ``timestep_scaling`` (10) and sigma_data = 0.5, multiplying F = x0_hat = (x_t - sigma_t eps) / alpha_t
    (Luo et al. 2023, arXiv 2310.04378, Sec. 4.2 and its code; LCMScheduler.step, steps 3-6). The boundary is at t = 0
    whatever t_min is: c_skip = 1, c_out = 0 exactly only at t = 0, and already at t = 1 c_skip = 0.0025,
    c_out = 0.9988. So f(x, t_min) = x holds exactly only for t_min = 0; on LCM's own grid (smallest
    timestep 19 with k = 20 skipping) it holds only approximately (c_skip(19) ~ 7e-6): LCM is an x0-prediction
    with a boundary condition in the limit. The course uses it for LCM (Chapters 5-6) and CMScalings for CD/CT.
    """

    sigma_data: float = 0.5
    timestep_scaling: float = 10.0

    def __call__(self, schedule: Schedule, t: torch.Tensor, t_min: float) -> tuple[torch.Tensor, torch.Tensor]:
        tk = torch.as_tensor(t, dtype=torch.float64) * self.timestep_scaling
        sd2 = self.sigma_data ** 2
        return sd2 / (tk ** 2 + sd2), tk / (tk ** 2 + sd2).sqrt()

    def output(self, schedule: Schedule, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return eps_to_x0(schedule, x, t, eps)


# ---- the consistency function ---------------------------------------------------------------------
class ConsistencyModel(nn.Module):
    """f_theta(x_t, t, **cond) = c_skip(t) x_t + c_out(t) F_theta(x_t, t) (Song et al. 2023, Eq. 5), an x0-estimate.

    ``net`` is any eps-model; its parameters are the only ones. x: (B, ...), t: (B,) or scalar timesteps >= t_min.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, scaling: CMScalings | LCMScalings | None = None,
                 t_min: float = 0.0):
        super().__init__()
        self.net, self.schedule, self.t_min = net, schedule, float(t_min)
        self.scaling = scaling if scaling is not None else CMScalings()
        self.config = {"net": model_config(net), "scaling": {"class": type(self.scaling).__name__,
                                                             **dataclasses.asdict(self.scaling)},
                       "schedule": schedule.kind, "t_min": self.t_min}

    @property
    def null_class(self):
        return getattr(self.net, "null_class", None)

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        eps = model_eps(self.net, x, t, cond)  # (B, ...)
        t64 = torch.as_tensor(t).detach().double().cpu()
        t64 = t64.expand(x.shape[0]) if t64.ndim == 0 else t64  # (B,) float64: the schedule lives on the CPU
        if torch.any(t64 < self.t_min):
            raise ValueError(f"a consistency model is defined for t >= t_min = {self.t_min}, got {t64.min().item()}")
        c_skip, c_out = self.scaling(self.schedule, t64, self.t_min)
        F = self.scaling.output(self.schedule, x, t64, eps)
        return broadcast(c_skip, x) * x + broadcast(c_out, x) * F


# ---- the discretisation grid and the one-step teacher solvers --------------------------------------
def cm_timesteps(schedule: Schedule, N: int, t_min: float = 0.0, spacing: str = "karras",
                 rho: float = 7.0) -> torch.Tensor:
    """N+1 increasing times t_min = t_0 < ... < t_N = T-1 (float64): the CD/CT discretisation.

    karras   s_i = (s_min^(1/rho) + i/N (s_max^(1/rho) - s_min^(1/rho)))^rho in the EDM noise level s = sigma/alpha
             (Karras et al. 2022, Eq. 5; Song et al. 2023, Sec. 5 and iCT use it with rho = 7)
    lambda   uniform in the half log-SNR lambda = -log s
    The times are continuous; t_i = t_of_lam(-log s_i).
    """
    if N < 1:
        raise ValueError(f"N (the number of discretisation intervals) must be >= 1, got {N}")
    T = schedule.T - 1
    lam_lo, lam_hi = schedule.lam(torch.tensor(float(T))).item(), schedule.lam(torch.tensor(float(t_min))).item()
    i = torch.arange(N + 1, dtype=torch.float64) / N
    if spacing == "karras":
        s_min, s_max = math.exp(-lam_hi), math.exp(-lam_lo)
        lams = -rho * torch.log(s_min ** (1 / rho) + i * (s_max ** (1 / rho) - s_min ** (1 / rho)))
    elif spacing == "lambda":
        lams = lam_hi + i * (lam_lo - lam_hi)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose karras or lambda")
    ts = schedule.t_of_lam(lams.clamp(lam_lo, lam_hi))
    ts[0], ts[-1] = float(t_min), float(T)
    return ts


def cm_sampling_times(schedule: Schedule, steps: int, N: int = 18, t_min: float = 0.0) -> list[float]:
    """The times multistep consistency sampling (Algorithm 1) evaluates f at, noisiest first: ``steps`` times read
    evenly from CD's N-interval Karras grid ``cm_timesteps(schedule, N, t_min)``, t_{N - floor(i N / steps)} for
    i = 0 .. steps - 1. One step is T-1 alone; two give T-1 and the grid's middle t_{N/2}.

    Why on the training grid: the student was only trained at those times (a network with a sinusoidal time
    embedding is most accurate there), and why evenly spaced in the index: each re-noise step then covers the same
    number of CD intervals. This is the one rule the package, ``minilcm bench`` and the notebooks use.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= N:
        raise InputError(f"the consistency model takes 1..{N} steps, got {steps}")
    grid = cm_timesteps(schedule, N, t_min).tolist()  # increasing, grid[N] = T - 1
    return [grid[N - (i * N) // steps] for i in range(steps)]


def ddim_solver(model: Callable, x: torch.Tensor, schedule: Schedule, t, s,
                cond: dict | None = None) -> torch.Tensor:
    """One deterministic DDIM step of an eps-model from t to s (``solvers.ddim_step``; the solver LCM distils). NFE 1.

    Same signature as ``sde.euler_step`` / ``sde.heun_step``, so any of the three is a CD solver. t, s: floats, or
    (B,) per-row times in [0, T-1]: the same step written as "re-noise x0 with its own eps", q_sample(x0, s, eps).
    """
    eps = model_eps(model, x, t, cond)
    t, s = torch.as_tensor(t, dtype=torch.float64).cpu(), torch.as_tensor(s, dtype=torch.float64).cpu()
    if t.ndim == 0 and s.ndim == 0:
        return ddim_step(schedule, x, t.item(), s.item(), eps)
    B = x.shape[0]
    return q_sample(schedule, eps_to_x0(schedule, x, t.expand(B), eps), s.expand(B), eps)


# ---- distances and the shared-dropout pair of forwards ---------------------------------------------
def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c per sample, c = 0.00054 sqrt(d) (iCT, Sec. 3.3). (B, ...) -> (B,)."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d) if c is None else c
    return (((a - b).float() ** 2).flatten(1).sum(1) + c ** 2).sqrt() - c


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 per sample, averaged over dimensions (Song et al. 2023's l2 metric). (B, ...) -> (B,)."""
    return ((a - b).float() ** 2).flatten(1).mean(1)


def paired_forward(online: nn.Module, target: nn.Module, x1, t1, x2, t2, cond: dict | None = None):
    """online(x1, t1) with gradients and target(x2, t2) without, both seeing the same dropout masks.

    Both run in the online net's train()/eval() mode, and the target's forward replays the random-number state
    the online forward started from (``torch.random.fork_rng``), so with equal weights and inputs the two outputs
    are identical (iCT, Sec. 3.1: synchronise the dropout RNG of student and teacher).
    """
    cond = cond or {}
    target.train(online.training)
    devices = [x1.device] if x1.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # restores the RNG state on exit
        out_online = online(x1, t1, **cond)
    with torch.no_grad():
        out_target = target(x2, t2, **cond)
    return out_online, out_target


# ---- consistency distillation ---------------------------------------------------------------------
class ConsistencyDistillation(nn.Module):
    """The CD loss (Song et al. 2023, Eq. 7 and Algorithm 2), a callable for ``minilcm.train``.

    For x0 ~ data, n ~ U{0..N-1} on the grid t_0 < ... < t_N (``cm_timesteps``), z ~ N(0, I):
        1. x_{n+1}   = alpha x0 + sigma z at t_{n+1}                    (q_sample)
        2. x_hat_n   = solver(teacher, x_{n+1}, t_{n+1} -> t_n)          (one PF-ODE step of the teacher)
        3. L         = lambda(t_n) d(f_theta(x_{n+1}, t_{n+1}), f_theta-(x_hat_n, t_n))    (d = l2 or pseudo_huber)
    and after each optimizer step the target theta- <- mu theta- + (1 - mu) theta (``after_step``).

    ``student`` is the online ConsistencyModel to be trained (the target starts as a copy of it); ``solver`` is a
    one-step solver with the signature of ``sde.heun_step`` that takes per-row (B,) times t, s
    (``ddim_solver``, ``sde.euler_step``, ``sde.heun_step``).
    ``weight(s_n, s_{n+1})`` is lambda in EDM noise levels: None for Song et al.'s lambda = 1, or ``ict_weight``.
    n is drawn i.i.d. per row, as in the paper, and the solver takes the (B,) times at once: one batched teacher
    call per step for DDIM and Euler, two for Heun.
    ``use_labels``: pass the batch's class labels to teacher and student (else both are unconditional).
    The teacher is kept in eval mode and out of the loss's state_dict; the target runs in the online net's mode
    with its dropout masks (``paired_forward``).
    """

    def __init__(self, teacher: nn.Module, student: ConsistencyModel, N: int = 18, mu: float = 0.95,
                 solver: Callable = ddim_solver, distance: Callable = l2, spacing: str = "karras",
                 use_labels: bool = False, weight: Callable | None = None):
        super().__init__()
        self.weight = weight
        self.teacher = teacher.eval().requires_grad_(False)
        self.target = copy.deepcopy(student).requires_grad_(False)
        self.schedule, self.N, self.mu = student.schedule, N, mu
        self.solver, self.distance, self.use_labels = solver, distance, use_labels
        self.register_buffer("timesteps", cm_timesteps(self.schedule, N, student.t_min, spacing))  # (N+1,)
        keep_out_of_state_dict(self, "teacher")  # checkpoints hold the target, not the frozen teacher

    def forward(self, model: ConsistencyModel, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, labels = split_batch(batch)
        B, device = x0.shape[0], x0.device
        cond = {"class_labels": labels} if (self.use_labels and labels is not None) else {}
        ts = self.timesteps.cpu()
        n = torch.randint(0, self.N, (B,), generator=generator)  # i.i.d. per row
        t_n, t_n1 = ts[n], ts[n + 1]  # (B,) float64
        z = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        x_n1 = q_sample(self.schedule, x0, t_n1, z)
        self.teacher.eval()
        with torch.no_grad():
            x_hat_n = self.solver(self.teacher, x_n1, self.schedule, t_n1.to(device), t_n.to(device), cond)
        online, target = paired_forward(model, self.target, x_n1, t_n1.to(device), x_hat_n, t_n.to(device), cond)
        d = self.distance(online, target)  # (B,)
        if self.weight is not None:
            d = d * self.weight(edm_sigma(self.schedule, t_n), edm_sigma(self.schedule, t_n1)).to(d)
        return d.mean()

    def after_step(self, model: nn.Module, step: int) -> None:
        """theta- <- stopgrad(mu theta- + (1 - mu) theta) (Algorithm 2, last line)."""
        ema_update(self.target, model, self.mu)


# ---- sampling ---------------------------------------------------------------------------------------
@torch.no_grad()
def cm_sample(model, x, schedule: Schedule, timesteps, *, cond=None, generator=None,
              return_trajectory: bool = False) -> Sample:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1); one step when ``timesteps`` has one entry.

        x0 = f(x, timesteps[0])                                   (x: noise at the first, largest timestep)
        for t in timesteps[1:]:  x_t = alpha_t x0 + sigma_t z,  z ~ N(0, I);  x0 = f(x_t, t)

    ``model`` is a consistency function f(x, t, **cond) -> x0 (a ConsistencyModel). NFE = len(timesteps).
    With LCMScalings and integer timesteps this is diffusers' LCMScheduler loop (tests/test_consistency.py).
    The trajectory holds the successive x0-estimates.
    """
    ts = check_timesteps(schedule, timesteps)
    f = lambda x_t, t: model(x_t, torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device),  # noqa: E731
                             **(cond or {}))
    x0 = f(x, ts[0])
    traj = [x0] if return_trajectory else None
    for t in ts[1:]:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x0 = f(q_sample(schedule, x0, torch.tensor(t), z), t)
        if return_trajectory:
            traj.append(x0)
    return Sample(x0, nfe=len(ts), trajectory=traj)
