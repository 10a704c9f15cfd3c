"""Latent consistency models: guided distillation with a w-conditioned student, and the LCM multistep sampler.

Luo et al. 2023, "Latent Consistency Models" (arXiv 2310.04378). Reference implementations this module agrees
with: diffusers' ``LCMScheduler`` (sampling) and ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``
(distillation). Time is VP time: t is the diffusers-style timestep, x_t = alpha_t x_0 + sigma_t eps.
Nothing here knows about latents: the same code distils the 2-D MLP and a Stable-Diffusion UNet.

    guidance_embedding(w, dim)                    the student's w input (diffusers' ``timestep_cond``) (B,) -> (B, dim)
    guided_eps(teacher, x, t, cond, uncond, w)    eps_w = (1 + w) eps(x, t, c) - w eps(x, t, 0), one fused call
    guided_ddim_step(teacher, x, schedule, t, s, cond, uncond, w)   the augmented PF-ODE solver step t -> s
    lcm_student(teacher, schedule, w_dim)         the student: a copy of the teacher with a w input added
    LatentConsistencyDistillation(teacher, student, conditioning, k, w_min, w_max)   the LCD loss (Algorithm 1)
    GuidanceDistillation(teacher, student, conditioning)   Meng et al.'s stage one: the student regresses the guided x0
    lcm_sample(model, x, schedule, timesteps, cond=, w=)   the multistep LCM sampler (Algorithm 3)

**Conditioning and CFG** (``cond``/``uncond`` dicts, the conditioning objects, eps_w = (1 + w) eps_cond
- w eps_uncond) live in ``minilcm.guidance``. The student is called with the teacher's ``cond`` plus
``timestep_cond = guidance_embedding(w)``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .consistency import (ConsistencyModel, LCMScalings, cm_sample, keep_out_of_state_dict, paired_forward,
                          pseudo_huber)
from .diffusion import Sample, model_eps, q_sample
from .guidance import ClassConditioning, guided_ddim_step, guided_eps
from .models.mlp import MLPDenoiser
from .schedules import Schedule, broadcast, whole_number
from .train import ema_update


# ---- the w input ----------------------------------------------------------------------------------
def guidance_embedding(w, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale w (Luo et al. 2023, Sec. 4.2; VDM's timestep embedding).

        u = 1000 w,   f_j = exp(-log(10000) j / (dim/2 - 1)),  j = 0 .. dim/2 - 1
        emb = [sin(u f_0), ..., sin(u f_{dim/2-1}), cos(u f_0), ..., cos(u f_{dim/2-1})]   (zero-padded if dim is odd)

    The function of diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` and of the
    reference LCD script, which the UNet receives as ``timestep_cond`` (``time_cond_proj_dim`` = dim).
    w: (B,) or scalar, in the LCM convention (w = guidance_scale - 1). Returns (B, dim) float32.
    """
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)  # (B,)
    half = dim // 2
    # float32 in diffusers' order of operations: sin(1000 w f) of ~1e4 radians amplifies any rounding difference
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)  # (half,)
    args = (1000.0 * w)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=1)  # (B, 2 half)
    return nn.functional.pad(emb, (0, dim % 2))  # (B, dim)


def guidance_dim(net) -> int | None:
    """The size of a network's guidance-embedding input (``time_cond_proj_dim`` in its ``config``), else None.

    Our MLP and diffusers' models carry it in ``config``; a wrapper exposes its inner network's config."""
    net = net.net if isinstance(net, ConsistencyModel) else net
    cfg = getattr(net, "config", None)
    return cfg.get("time_cond_proj_dim") if cfg is not None else None


# ---- the student -----------------------------------------------------------------------------------
def with_guidance_input(teacher: nn.Module, w_dim: int, w_init: str = "random") -> nn.Module:
    """A copy of ``teacher`` that also takes ``timestep_cond`` = guidance_embedding(w) (B, w_dim).

    The teacher's weights are copied; the new projection (``cond_proj``, as in diffusers' TimestepEmbedding) keeps
    its default random initialisation (``w_init="random"``, as the reference LCD script leaves it), or starts at zero
    (``w_init="zero"``: the copy then computes exactly the teacher's eps for every w until training moves it).
    A teacher that already has a guidance input is deep-copied.
    Works for ``MLPDenoiser`` and for diffusers models with ``time_cond_proj_dim`` (``UNet2DConditionModel``).
    """
    if guidance_dim(teacher) is not None:
        return copy.deepcopy(teacher)
    if isinstance(teacher, MLPDenoiser):
        net = MLPDenoiser(**teacher.config, time_cond_proj_dim=w_dim)
    elif hasattr(type(teacher), "from_config") and "time_cond_proj_dim" in getattr(teacher, "config", {}):
        net = type(teacher).from_config(teacher.config, time_cond_proj_dim=w_dim)
    else:
        raise TypeError(f"cannot add a guidance (w) input to a {type(teacher).__name__}: use an MLPDenoiser or a "
                        "diffusers UNet2DConditionModel, or build the student yourself with a `timestep_cond` input")
    missing, unexpected = net.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or not all("cond_proj" in k for k in missing):
        raise RuntimeError(f"the teacher's weights do not fit the student: missing {missing}, unexpected {unexpected}")
    p, q = next(teacher.parameters(), None), next(net.parameters())
    if p is not None and (p.device, p.dtype) != (q.device, q.dtype):
        net = net.to(device=p.device, dtype=p.dtype)
    if w_init not in ("random", "zero"):
        raise ValueError(f"w_init must be 'random' or 'zero', got {w_init!r}")
    if w_init == "zero":
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name in missing:
                    param.zero_()
    return net


def lcm_student(teacher: nn.Module, schedule: Schedule, w_dim: int = 256,
                scaling: LCMScalings | None = None, w_init: str = "random") -> ConsistencyModel:
    """The LCD student f_theta(x, t, w, c) (Luo et al. 2023, Sec. 4.2): the teacher copied, a w input added
    (``with_guidance_input``), wrapped with the LCM boundary scalings (``consistency.LCMScalings``).

    With ``w_init="zero"``, f_theta(x, t, w, c) = c_skip(t) x + c_out(t) x0_teacher(x, t, c) for every w at
    initialisation; with the default random w projection (the reference script's) w moves it from the start.
    """
    return ConsistencyModel(with_guidance_input(teacher, w_dim, w_init), schedule, scaling or LCMScalings())


# ---- latent consistency distillation ---------------------------------------------------------------
def skipping_timesteps(schedule: Schedule, k: int) -> torch.Tensor:
    """The LCD grid with skipping step k: t = k - 1, 2k - 1, ..., N k - 1 with N = T // k (float64, increasing).

    The reference script's ``DDIMSolver.ddim_timesteps`` (N = ``num_ddim_timesteps`` = T / k) and the grid
    ``LCMScheduler`` samples from (k = T // original_inference_steps). Each t_{n+k} on it steps to t_n = t_{n+k} - k,
    and the lowest one to t = 0 (clamped, as the script does).
    """
    if not 1 <= k <= schedule.T:
        raise ValueError(f"the skipping step k must be in 1..{schedule.T}, got {k}")
    return torch.arange(1, schedule.T // k + 1, dtype=torch.float64) * k - 1


class LatentConsistencyDistillation(nn.Module):
    """The LCD loss (Luo et al. 2023, Sec. 4.2-4.3, Algorithm 1), a callable for ``minilcm.train``.

    For a batch (x0, c) (``conditioning.split``), per row:
        1. t_{n+k} ~ U(skipping_timesteps(k)),  t_n = max(t_{n+k} - k, 0)   (the skipping step k, Sec. 4.3)
           w ~ U[w_min, w_max],  z ~ N(0, I)        (drawn in this order from ``generator``: index, w, z)
        2. x_{n+k} = alpha x0 + sigma z at t_{n+k}                                  (q_sample)
        3. x_hat_n = guided_ddim_step(teacher, x_{n+k}, t_{n+k} -> t_n, c, 0, w)   (augmented PF-ODE over k steps)
        4. L = d(f_theta(x_{n+k}, t_{n+k}, w, c), f_theta-(x_hat_n, t_n, w, c))      (d = pseudo-Huber or l2)
    and after every optimizer step theta- <- mu theta- + (1 - mu) theta (``after_step``; LCM uses mu = 0.95).

    ``student``: the online ConsistencyModel (``lcm_student`` makes it from the teacher); the target starts as a
    copy of it. The student sees ``timestep_cond = guidance_embedding(w)`` on top of the teacher's ``cond``.
    ``conditioning``: ``ClassConditioning`` / ``TextConditioning`` / any object with ``split`` and ``null``;
    default ``ClassConditioning(teacher.null_class)``. The teacher is frozen, in eval mode, and left OUT of
    ``state_dict`` (checkpoints hold the target and the conditioning's buffers, never the teacher's weights).

    Defaults are the reference script's: k = 20 (50 DDIM timesteps), mu = 0.95, [w_min, w_max] = [5, 15] applied
    as the LCM-convention w above (the script's code does so, though its help text calls them Imagen scales),
    and ``lcm_student``'s w_dim = 256. The distance defaults to ``consistency.pseudo_huber`` (per-sample norm, iCT's
    c); the script's "huber" is the elementwise sqrt((a - b)^2 + c^2) - c with c = 0.001, its default is l2.

    LCM-LoRA (Luo et al. 2023b, arXiv 2311.05556; the reference ``train_lcm_distill_lora_sd_wds.py``) distils at
    ONE guidance scale into LoRA adapters of the teacher's own UNet: ``fixed_w=w`` sets w_min = w_max = w, and the
    student may then lack a w input (it gets ``timestep_cond`` only if it has one); ``share_target=True`` uses
    the online network itself, without gradients, as f_theta- (mu = 0 with no copy: no second UNet in memory).
    """

    def __init__(self, teacher: nn.Module, student: ConsistencyModel, conditioning=None, *, k: int = 20,
                 w_min: float = 5.0, w_max: float = 15.0, mu: float = 0.95, distance: Callable = pseudo_huber,
                 fixed_w: float | None = None, share_target: bool = False):
        super().__init__()
        if conditioning is None:
            if getattr(teacher, "null_class", None) is None:
                raise ValueError("pass a conditioning (ClassConditioning / TextConditioning): the teacher has no "
                                 "null_class to build the unconditional input from")
            conditioning = ClassConditioning(teacher.null_class)
        if fixed_w is not None:
            w_min = w_max = float(fixed_w)
        if not 0 <= w_min <= w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        self.w_dim = guidance_dim(student)
        if self.w_dim is None and fixed_w is None:
            raise ValueError("the student has no guidance input (time_cond_proj_dim): build it with lcm_student, "
                             "or pass fixed_w to distil at one w without a w input (LCM-LoRA)")
        self.teacher = teacher.eval().requires_grad_(False)
        self.share_target = share_target
        self.target = None if share_target else copy.deepcopy(student).requires_grad_(False)
        if share_target:
            mu = 0.0
        self.conditioning, self.schedule = conditioning, student.schedule
        self.k, self.w_min, self.w_max, self.mu, self.distance = k, w_min, w_max, mu, distance
        self.register_buffer("timesteps", skipping_timesteps(self.schedule, k))  # (N,) the t_{n+k}
        keep_out_of_state_dict(self, "teacher")  # checkpoints hold the target, not the frozen teacher

    def sample_w(self, B: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """w ~ U[w_min, w_max], (B,) float32 on the CPU."""
        return self.w_min + (self.w_max - self.w_min) * torch.rand(B, generator=generator)

    def forward(self, model: ConsistencyModel, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, cond = self.conditioning.split(batch)
        uncond = self.conditioning.null(cond)
        B, device = x0.shape[0], x0.device
        ts = self.timesteps.cpu()
        t_nk = ts[torch.randint(0, len(ts), (B,), generator=generator)]  # (B,) float64
        t_n = (t_nk - self.k).clamp(min=0)
        w = self.sample_w(B, generator)  # (B,)
        z = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        x_nk = q_sample(self.schedule, x0, t_nk, z)
        self.teacher.eval()
        with torch.no_grad():
            x_hat_n = guided_ddim_step(self.teacher, x_nk, self.schedule, t_nk, t_n, cond, uncond, w.to(device))
        student_cond = dict(cond)
        if self.w_dim is not None:
            student_cond["timestep_cond"] = guidance_embedding(w, self.w_dim).to(device=device, dtype=x0.dtype)
        target = model if self.share_target else self.target
        online, target = paired_forward(model, target, x_nk, t_nk.to(device), x_hat_n, t_n.to(device),
                                        student_cond)
        return self.distance(online, target).mean()

    def after_step(self, model: nn.Module, step: int) -> None:
        """theta- <- stopgrad(mu theta- + (1 - mu) theta) (Algorithm 1, last line); nothing with share_target."""
        if not self.share_target:
            ema_update(self.target, model, self.mu)


class GuidanceDistillation(nn.Module):
    """Guidance distillation, the first stage of Meng et al. 2023 ("On Distillation of Guided Diffusion Models",
    arXiv 2210.03142, Sec. 4.1, Eq. 6): the w-conditioned student regresses the guided teacher's x0-prediction,

        t ~ U{0, ..., T-1},  w ~ U[w_min, w_max],  x_t = alpha_t x0 + sigma_t z
        eps_w = (1 + w) eps(x_t, t, c) - w eps(x_t, t, 0)                               (guidance.guided_eps)
        L = || x0_theta - x0_w ||^2 = (sigma_t / alpha_t)^2 || eps_theta(x_t, t, c, w) - eps_w ||^2

    x0 space, as Meng et al., because the LCM student's output is an x0 estimate (c_out ~ 1 away from t = 0): the
    weight puts the loss where w moves x0 most, far from the data. ``student``: an ``lcm_student`` (its inner
    network is trained; the consistency scalings play no part). Used as a warm start before LCD: every t gets its w
    signal at once, where the LCD loss alone has to carry it up the skipping grid one k at a time.
    """

    def __init__(self, teacher: nn.Module, student: ConsistencyModel, conditioning, *, w_min: float = 0.0,
                 w_max: float = 4.0):
        super().__init__()
        if not 0 <= w_min <= w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        self.w_dim = guidance_dim(student)
        if self.w_dim is None:
            raise ValueError("the student has no guidance input (time_cond_proj_dim): build it with lcm_student")
        self.teacher = teacher.eval().requires_grad_(False)
        self.conditioning, self.schedule, self.w_min, self.w_max = conditioning, student.schedule, w_min, w_max
        keep_out_of_state_dict(self, "teacher")

    def forward(self, model: ConsistencyModel, batch, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, cond = self.conditioning.split(batch)
        uncond = self.conditioning.null(cond)
        B, device = x0.shape[0], x0.device
        t = torch.randint(0, self.schedule.T, (B,), generator=generator).double()  # (B,)
        w = self.w_min + (self.w_max - self.w_min) * torch.rand(B, generator=generator)  # (B,)
        z = torch.randn(x0.shape, generator=generator).to(device=device, dtype=x0.dtype)
        x_t = q_sample(self.schedule, x0, t, z)
        self.teacher.eval()
        with torch.no_grad():
            target = guided_eps(self.teacher, x_t, t.to(device), cond, uncond, w.to(device))
        student_cond = {**cond, "timestep_cond": guidance_embedding(w, self.w_dim).to(device=device, dtype=x0.dtype)}
        eps = model_eps(model.net, x_t, t.to(device), student_cond)
        snr_inv = broadcast(self.schedule.sigma(t) / self.schedule.alpha(t), x0).pow(2).to(device)  # (B, 1, ...)
        return (snr_inv * (eps.float() - target.float()).pow(2)).mean()


# ---- sampling --------------------------------------------------------------------------------------
def lcm_timesteps(schedule: Schedule, n: int, original_steps: int = 50) -> torch.Tensor:
    """The n timesteps of ``LCMScheduler.set_timesteps(n)`` (float64, decreasing): n indices evenly spaced (floored)
    over the skipping grid with k = T // original_steps, read from its noisiest end (999, ...)."""
    grid = skipping_timesteps(schedule, schedule.T // original_steps).flip(0)  # (N,) decreasing
    n = whole_number(n, "the number of LCM steps")
    if not 1 <= n <= len(grid):
        raise ValueError(f"the LCM student takes 1..{len(grid)} steps (its skipping grid over {original_steps} "
                         f"teacher steps), got {n}")
    return grid[torch.floor(torch.arange(n, dtype=torch.float64) * len(grid) / n).long()]


@torch.no_grad()
def lcm_sample(model, x, schedule: Schedule, timesteps, *, cond=None, w=None, generator=None,
               return_trajectory: bool = False) -> Sample:
    """Multistep latent consistency sampling (Luo et al. 2023, Algorithm 3 = diffusers' ``LCMScheduler.step``):

        x0 = f(x, tau_1, w, c)                                              (x: noise at the first timestep)
        for tau in timesteps[1:]:  x_tau = alpha_tau x0 + sigma_tau z,  z ~ N(0, I);   x0 = f(x_tau, tau, w, c)

    i.e. ``consistency.cm_sample`` with the student's w input. ``model`` is a ConsistencyModel (the LCD student) or
    a raw eps-model, which is wrapped with ``LCMScalings`` as LCMScheduler does. ``w`` (scalar or (B,), LCM
    convention) becomes ``timestep_cond = guidance_embedding(w)``; CFG costs nothing here: NFE = len(timesteps).
    Noise is drawn as ``torch.randn(x.shape, generator=generator)``, the draw LCMScheduler makes on the CPU.
    """
    if not isinstance(model, ConsistencyModel):
        model = ConsistencyModel(model, schedule, LCMScalings())
    cond = dict(cond or {})
    if w is not None:
        dim = guidance_dim(model)
        if dim is None:
            raise ValueError("w was given but the model has no guidance input (time_cond_proj_dim)")
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        cond["timestep_cond"] = guidance_embedding(w, dim).to(device=x.device, dtype=x.dtype)
    return cm_sample(model, x, schedule, timesteps, cond=cond, generator=generator,
                     return_trajectory=return_trajectory)
