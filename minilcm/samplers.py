"""The sampler registry: every sampler of the course under one name, one signature and one grid convention.

    run_sampler("dpm_solver_pp", model, x, schedule, steps=25, cond=c, conditioning=cc, w=1.0)   -> Sample
    SAMPLERS["lcm"].grid(schedule, 4)          -> (timesteps, kwargs): noisiest first, as every sampler takes them
    sample_images(loaded, "lcm", 4, labels, None, w, generator)   -> images in [-1, 1] (B, 3, 32, 32)

Seven samplers, two families (``docs/architecture.md``, "The sampler signature"):

    teacher      ddpm, ddim, dpm_solver, dpm_solver_pp,  an eps-model; CFG wraps it in ``guidance.GuidedEps`` (one
                 dpm_solver_fast                         fused call of 2B rows per evaluation)
    consistency  cm, lcm                                 a consistency function f(x, t, **cond) -> x0; lcm takes
                                                         w as the student's input (B rows), cm is unguided

``steps`` is the number of network evaluations (NFE) the caller pays for. Each spec's ``grid(schedule, steps)``
turns it into the decreasing timesteps its function takes (t_0 > t_1 > ...: noisiest first) plus keyword arguments:

    teacher samplers  diffusers' trailing grid, then the final step to clean data (NFE = steps); DPM-Solver-2 costs
                      2 NFE per step, so it gets (steps - 1) // 2 + 1 timesteps (``teacher_timesteps``)
    cm                ``consistency.cm_sampling_times`` (read from CD's N = 18 Karras grid)
    lcm               ``lcm.lcm_timesteps`` (LCMScheduler's, on the skipping grid of 50 teacher steps)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .catalog import CONSISTENCY_SAMPLERS, SAMPLER_FAMILIES, SAMPLER_NAMES, TEACHER_SAMPLERS  # noqa: F401
from .consistency import cm_sample, cm_sampling_times
from .diffusion import Sample, ddpm
from .guidance import ClassConditioning, GuidedEps
from .lcm import lcm_sample, lcm_timesteps
from .schedules import Schedule
from .solvers import ddim, dpm_solver, dpm_solver_fast, dpm_solver_fast_timesteps, dpm_solver_pp, spaced_timesteps


def teacher_timesteps(schedule: Schedule, steps: int, order: int = 1) -> tuple[torch.Tensor, dict]:
    """The grid a teacher sampler runs for ``steps`` network evaluations: diffusers' trailing timesteps plus the
    final step to clean data (NFE = steps); a solver of ``order`` evaluations per step (DPM-Solver-2) gets
    (steps - 1) // order + 1 timesteps."""
    n = max(1, (steps - 1) // order + 1)
    return schedule.timesteps(n, "trailing"), ({"order": order} if order > 1 else {})


def _dpm_fast_grid(schedule: Schedule, steps: int):
    times, orders = dpm_solver_fast_timesteps(schedule, steps)
    return times, {"orders": orders}


def _cm_grid(schedule: Schedule, steps: int, t_min: float = 0.0):
    return torch.tensor(cm_sampling_times(schedule, steps, t_min=t_min), dtype=torch.float64), {}


@dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler: ``fn(model, x, schedule, timesteps, *, cond, generator, **kw) -> Sample``."""

    name: str
    family: str                 # "teacher" (an eps-model) or "consistency" (a consistency function)
    fn: Callable
    grid: Callable              # grid(schedule, steps) -> (timesteps noisiest first, kwargs for fn)
    max_steps: int              # the most NFE the grid allows
    summary: str
    nfe_per_step: Callable = lambda **kw: 1   # network evaluations of one step, given fn's keyword arguments


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in (
    SamplerSpec("ddpm", "teacher", ddpm, lambda sch, n: teacher_timesteps(sch, n), 1000,
                "ancestral DDPM (Ho et al. 2020, Algorithm 2) on a strided grid"),
    SamplerSpec("ddim", "teacher", ddim, lambda sch, n: teacher_timesteps(sch, n), 1000,
                "DDIM (Song et al. 2021), eta = 0: Euler on the PF-ODE in lambda"),
    SamplerSpec("dpm_solver", "teacher", dpm_solver, lambda sch, n: teacher_timesteps(sch, n, order=2), 1000,
                "DPM-Solver-2, singlestep (Lu et al. 2022a, Algorithm 1)", lambda order=2, **kw: order),
    SamplerSpec("dpm_solver_pp", "teacher", dpm_solver_pp, lambda sch, n: teacher_timesteps(sch, n), 1000,
                "DPM-Solver++(2M), multistep, data prediction (Lu et al. 2022b)"),
    SamplerSpec("dpm_solver_fast", "teacher", dpm_solver_fast, _dpm_fast_grid, 1000,
                "DPM-Solver-fast: orders 3, 2, 1 allotted to the NFE budget (Lu et al. 2022a, Sec. 3.4)"),
    SamplerSpec("cm", "consistency", cm_sample, _cm_grid, 18,
                "multistep consistency sampling (Song et al. 2023, Algorithm 1)"),
    SamplerSpec("lcm", "consistency", lcm_sample, lambda sch, n: (lcm_timesteps(sch, n), {}), 50,
                "multistep latent consistency sampling (Luo et al. 2023, Algorithm 3), w as an input"),
)}
assert {n: s.family for n, s in SAMPLERS.items()} == SAMPLER_FAMILIES, "catalog.SAMPLER_FAMILIES names every sampler"


def get_sampler(name: str) -> SamplerSpec:
    """The spec registered under ``name``; a ValueError listing the valid names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLER_NAMES)}")
    return SAMPLERS[name]


def nfe_per_step(sampler, **kwargs) -> int:
    """Model evaluations one step of ``sampler`` (a registered name or its function) costs with these kwargs."""
    spec = get_sampler(sampler) if isinstance(sampler, str) else next(s for s in SAMPLERS.values() if s.fn is sampler)
    return spec.nfe_per_step(**kwargs)


def timesteps_for_nfe(schedule: Schedule, nfe: int, sampler="ddim", *, spacing: str = "lambda",
                      denoise_to_zero: bool = True, t_min: float = 0.0, **kwargs) -> torch.Tensor:
    """The most timesteps whose run of ``sampler`` (with ``kwargs``) costs at most ``nfe`` evaluations.

    k = NFE per step; with denoise_to_zero the run costs k (N - 1) + 1 for N timesteps, else k (N - 1).
    """
    k = nfe_per_step(sampler, **kwargs)
    steps = (nfe - 1) // k if denoise_to_zero else nfe // k
    if steps < 1:
        raise ValueError(f"{nfe} NFE is not enough for one step of {k} evaluations plus the final denoising")
    return spaced_timesteps(schedule, steps + 1, spacing, t_min=t_min)


def run_sampler(name: str, model, x: torch.Tensor, schedule: Schedule, steps: int, *, cond: dict | None = None,
                conditioning=None, w: float | None = None, generator: torch.Generator | None = None) -> Sample:
    """The one guided sampling path: ``steps`` NFE of sampler ``name`` from the noise ``x``.

    teacher samplers  ``model`` is an eps-model; with ``conditioning`` (an object with ``null(cond)``, see
                      ``minilcm.guidance``) and ``w`` it is sampled under CFG, eps_w = (1 + w) eps_c - w eps_0
    lcm               ``model`` is the w-conditioned student; ``w`` becomes its ``timestep_cond`` input
    cm                ``model`` is a consistency function; it takes no guidance (``w`` must be None or 0)
    """
    spec = get_sampler(name)
    timesteps, kw = spec.grid(schedule, steps) if name != "cm" else _cm_grid(schedule, steps,
                                                                            getattr(model, "t_min", 0.0))
    if spec.family == "teacher":
        if conditioning is not None and w is not None:
            model = GuidedEps(model, conditioning, w)
    elif name == "lcm":
        kw["w"] = w
    elif w not in (None, 0, 0.0):
        raise ValueError("the consistency model (sampler cm) is unguided: pass w=None")
    return spec.fn(model, x, schedule, timesteps, cond=cond, generator=generator, **kw)


@torch.no_grad()
def sample_images(m, sampler: str, steps: int, labels, prompts, w: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, 32, 32), float32 on the CPU, for one batch of a loaded model (``zoo.LoadedModel``).

    minisd / lcm: the prompts (or the class captions of ``labels``) are encoded, latents sampled and decoded;
    pixel: class labels through the null-class CFG (``ClassConditioning``) for a teacher, unconditional for cm.
    """
    if sampler not in m.samplers:
        raise ValueError(f"{m.path} ({m.kind}) samples with {', '.join(m.samplers)}, not {sampler!r}")
    if m.sd is not None:  # a latent model: the mini-SD teacher or its LCM student
        sd = m.sd
        prompts = list(prompts) if prompts is not None else sd.prompts(labels)
        states = sd.embed(prompts)
        x = torch.randn((len(prompts), *sd.latent_shape), generator=generator).to(sd.device)
        model = m.model if sampler == "lcm" else sd.unet
        z = run_sampler(sampler, model, x, sd.schedule, steps, cond={"encoder_hidden_states": states.to(sd.device)},
                        conditioning=sd.conditioning, w=w, generator=generator).x
        return sd.decode(z)
    x = torch.randn((len(labels), 3, 32, 32), generator=generator).to(m.device)
    if m.conditional == "class":
        cond = {"class_labels": torch.as_tensor(labels, dtype=torch.long, device=m.device)}
        out = run_sampler(sampler, m.model, x, m.schedule, steps, cond=cond,
                          conditioning=ClassConditioning(m.model.null_class), w=w, generator=generator)
    else:
        out = run_sampler(sampler, m.model, x, m.schedule, steps, generator=generator)
    return out.x.float().cpu().clamp(-1, 1)
