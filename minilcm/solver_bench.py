"""The solver-error benchmark: ODE error against the number of model evaluations (NFE).

Every row compares one solver at one NFE budget with a converged solution *of the same ODE from the same
noise* (the ODE error, free of learning error), optionally with data samples (the 2-D distribution
distance) and with an image metric (any ``image_metric(x)`` callable, e.g. FD-clf on images; else None).

    rows = solver_benchmark(model, schedule, x_T, nfes=[5, 10, 20], solvers=DEFAULT_SOLVERS, reference=x_ref)

The benchmark of the shipped CIFAR-10 models (``minilcm bench``) is ``minilcm.bench``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .metrics import power_law_order, sliced_wasserstein
from .schedules import Schedule
from .samplers import get_sampler, timesteps_for_nfe
from .solvers import dpm_solver_fast_timesteps

# label -> (sampler name, keyword arguments)
DEFAULT_SOLVERS = {
    "DDIM": ("ddim", {}),
    "DPM-Solver-2": ("dpm_solver", {"order": 2}),
    "DPM-Solver-3": ("dpm_solver", {"order": 3}),
    "DPM-Solver++(2M)": ("dpm_solver_pp", {}),
}
# the paper's way to spend a small budget on the singlestep solver (orders 3, 2, 1 allotted to the NFE, Sec. 3.4)
FAST_SOLVER = {"DPM-Solver-fast": ("dpm_solver_fast", {})}


@dataclass
class BenchRow:
    solver: str
    nfe: int                         # model evaluations actually spent (<= the budget)
    err_ref: float                   # RMS distance to the reference solution from the same noise
    dist_data: float | None = None   # distance of the samples to data samples (2-D), if data was given
    image_metric: float | None = None  # an image metric (e.g. FD-clf, minilcm.evaluator); None if not asked
    seconds: float = 0.0             # wall time of the sampler call
    x: torch.Tensor | None = field(default=None, repr=False)  # the samples, with keep_samples=True


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference sqrt(mean((a - b)^2)) over every element."""
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def reference_solution(model, schedule: Schedule, x_T: torch.Tensor, nfe: int = 1000, *, sampler="dpm_solver",
                       spacing: str = "lambda", denoise_to_zero: bool = True, t_min: float = 0.0, cond=None,
                       **kwargs) -> torch.Tensor:
    """The converged PF-ODE solution from x_T: by default DPM-Solver-3 with ``nfe`` evaluations (333 steps for 1000).

    A third-order solver is used rather than 1000 DDIM steps, whose own O(1/1000) error would hide the
    error of the better solvers at 20-50 NFE.
    """
    kwargs = {"order": 3, **kwargs} if sampler == "dpm_solver" else kwargs
    fn = get_sampler(sampler).fn
    ts = timesteps_for_nfe(schedule, nfe, sampler, spacing=spacing, denoise_to_zero=denoise_to_zero, t_min=t_min,
                           **kwargs)
    return fn(model, x_T, schedule, ts, cond=cond, denoise_to_zero=denoise_to_zero, **kwargs).x


def solver_benchmark(model, schedule: Schedule, x_T: torch.Tensor, nfes, solvers: dict | None = None,
                     reference: torch.Tensor | None = None, data: torch.Tensor | None = None, *,
                     spacing: str = "lambda", denoise_to_zero: bool = True, t_min: float = 0.0, cond=None,
                     distance: Callable = sliced_wasserstein, image_metric: Callable | None = None,
                     keep_samples: bool = False, progress: bool = False) -> list[BenchRow]:
    """Run every solver at every NFE budget from the same noise ``x_T`` and measure it.

    solvers   {label: (sampler name, kwargs)}; default ``DEFAULT_SOLVERS`` (add ``FAST_SOLVER`` for
              DPM-Solver-fast). Each run uses the most timesteps (``spacing``, from T-1 to t_min) that fit the
              budget (``run_at_budget``).
    reference the converged solution from x_T (default: ``reference_solution`` with 1000 NFE).
    data      samples of the data distribution: adds ``distance(samples, data)`` (sliced W2 by default).
    image_metric  callable(images) -> float, e.g. ``minilcm.evaluator``'s FD-clf; None leaves the column
              empty (no number is made up).
    keep_samples  store each run's samples in ``row.x`` (for pictures).
    """
    solvers = DEFAULT_SOLVERS if solvers is None else solvers
    common = dict(spacing=spacing, denoise_to_zero=denoise_to_zero, t_min=t_min)
    if reference is None:
        reference = reference_solution(model, schedule, x_T, cond=cond, **common)
    runs = [(label, name, kw, nfe) for label, (name, kw) in solvers.items() for nfe in nfes]
    if progress:
        from tqdm.auto import tqdm
        runs = tqdm(runs, desc="solver benchmark")
    rows = []
    for label, name, kw, nfe in runs:
        start = time.perf_counter()
        out = run_at_budget(model, schedule, x_T, name, kw, nfe, cond=cond, **common)
        seconds = time.perf_counter() - start
        rows.append(BenchRow(label, out.nfe, rms(out.x, reference),
                             distance(out.x, data) if data is not None else None,
                             image_metric(out.x) if image_metric is not None else None, seconds,
                             out.x if keep_samples else None))
    return rows


def run_at_budget(model, schedule: Schedule, x_T: torch.Tensor, name: str, kw: dict, nfe: int, *, cond=None,
                  spacing: str = "lambda", denoise_to_zero: bool = True, t_min: float = 0.0):
    """One run of sampler ``name`` that spends at most ``nfe`` evaluations; returns its ``Sample``.

    Every solver gets the most ``spacing`` timesteps that fit (``timesteps_for_nfe``), except DPM-Solver-fast,
    which brings its own grid and orders (Lu et al. 2022, Sec. 3.4: ``dpm_solver_fast_timesteps``, uniform in
    lambda down to ``t_min`` whatever ``spacing`` says, exactly ``nfe`` evaluations and no final jump to clean data;
    at t_min = 0 that leaves sigma_0 / alpha_0 = 0.01 of noise where the others return their x0 estimate)."""
    fn = get_sampler(name).fn
    if name == "dpm_solver_fast":
        ts, orders = dpm_solver_fast_timesteps(schedule, nfe, t_end=t_min)
        return fn(model, x_T, schedule, ts, cond=cond, orders=orders, **kw)
    ts = timesteps_for_nfe(schedule, nfe, name, spacing=spacing, denoise_to_zero=denoise_to_zero, t_min=t_min, **kw)
    return fn(model, x_T, schedule, ts, cond=cond, denoise_to_zero=denoise_to_zero, **kw)


def convergence_order(rows: list[BenchRow], solver: str, min_nfe: int = 0, key: str = "err_ref") -> float:
    """The empirical order p in err ~ C NFE^-p: minus the least-squares slope of log err against log NFE."""
    pts = [(r.nfe, getattr(r, key)) for r in rows if r.solver == solver and r.nfe >= min_nfe]
    if len(pts) < 2:
        raise ValueError(f"need at least two rows of {solver!r} with nfe >= {min_nfe} to fit a slope")
    return power_law_order(*zip(*pts))


def table(rows: list[BenchRow]) -> str:
    """The rows as a fixed-width text table."""
    fmt = lambda v, f, w: "-".rjust(w) if v is None else format(v, f"{w}{f}")  # noqa: E731
    lines = [f"{'solver':<18}{'NFE':>5}{'err_ref':>11}{'dist_data':>11}{'image':>9}{'seconds':>9}"]
    for r in rows:
        lines.append(f"{r.solver:<18}{r.nfe:>5}{fmt(r.err_ref, '.3e', 11)}{fmt(r.dist_data, '.4f', 11)}"
                     f"{fmt(r.image_metric, '.3f', 9)}{r.seconds:>9.3f}")
    return "\n".join(lines)


# ---- minilcm bench: every sampler at every NFE on the shipped teachers and students ---------------------
