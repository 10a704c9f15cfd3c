"""Chapter 5 (latent consistency models), Chapter 6 (LCM on Stable Diffusion) and Chapter 7 (the benchmark):
the w embedding, the skipping grid, the guided DDIM step, LCM's sampling times and scalings; the LoRA parameter
count, merge and composition, the reference script's huber; the Fréchet distance and the CFG cost model."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ...consistency import LCMScalings
from ...diffusion import q_sample
from ...guidance import cfg_combine
from ...lcm import guidance_embedding, lcm_timesteps, skipping_timesteps
from ...metrics import frechet_distance
from ...schedules import Schedule
from ...sd.student import lora_parameter_count
from ...solvers import ddim_step
from ..core import Case, Exercise, Mistake, register

SD = Schedule("scaled_linear")


def _g(seed):
    return torch.Generator().manual_seed(seed)


# ---- Chapter 5 ----------------------------------------------------------------------------------------
def _emb_wrong(w, dim, scale=1000.0, order="sincos", denom=-1):
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    half = dim // 2
    f = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half + denom)))
    a = (scale * w)[:, None] * f[None]
    e = torch.cat([a.sin(), a.cos()] if order == "sincos" else [a.cos(), a.sin()], 1)
    return nn.functional.pad(e, (0, dim % 2))


def _emb_cases():
    return [Case("w = 0, 0.5, 3 with dim = 16", (torch.tensor([0.0, 0.5, 3.0]), 16)),
            Case("w = 1.5 with dim = 256", (torch.tensor([1.5]), 256))]


register(Exercise(
    "w_embedding", 5, "The student's w input", 2,
    "LCM embeds w like a timestep: u = 1000 w, f_j = exp(-log(10000) j / (dim/2 - 1)) for j = 0 .. dim/2 - 1, "
    "emb = [sin(u f), cos(u f)] (float32, shape (B, dim)).",
    guidance_embedding, _emb_cases, [
        Mistake(lambda w, dim: _emb_wrong(w, dim, scale=1.0),
                "your embedding barely changes with w: LCM scales w by 1000 first (as timesteps 0..999 are)."),
        Mistake(lambda w, dim: _emb_wrong(w, dim, order="cossin"),
                "your halves are swapped: the sines come first, then the cosines (diffusers' order)."),
        Mistake(lambda w, dim: _emb_wrong(w, dim, denom=0),
                "your frequencies are slightly off: the exponent divides by dim/2 - 1, so the last frequency is "
                "exactly 1/10000.")], rtol=1e-4, atol=1e-4))


def _skip_cases():
    return [Case("k = 20 (50 grid times)", (SD, 20)), Case("k = 1", (SD, 1)), Case("k = 100", (SD, 100))]


register(Exercise(
    "skipping_grid", 5, "LCD's skipping-step grid", 1,
    "the times t_{n+k} LCD trains on: k - 1, 2k - 1, ..., N k - 1 with N = T // k, increasing, float64 "
    "(each steps k back to t_n = t_{n+k} - k, the lowest to 0).",
    skipping_timesteps, _skip_cases, [
        Mistake(lambda sc, k: torch.arange(0, sc.T // k, dtype=torch.float64) * k,
                "your grid starts at 0: the top time must be T - 1 = 999, so the grid is k - 1, 2k - 1, ..."),
        Mistake(lambda sc, k: skipping_timesteps(sc, k).flip(0),
                "your grid decreases; return it increasing (the sampler reads it from its noisiest end)."),
        Mistake(lambda sc, k: skipping_timesteps(sc, k)[1:],
                "your grid has N - 1 times; it has N = T // k, from k - 1 to N k - 1.")], rtol=0, atol=0))


def guided_ddim_ref(sc, x, t, s, eps_c, eps_u, w):
    return ddim_step(sc, x, t, s, cfg_combine(eps_c, eps_u, w))


def _gddim_cases():
    g = _g(20)
    x0, eps = torch.randn(512, 4, generator=g), torch.randn(512, 4, generator=g)
    ec, eu = eps + 0.1 * torch.randn(512, 4, generator=g), eps
    return [Case(f"t = {t:g} -> {s:g}, w = {w:g}", (SD, q_sample(SD, x0, torch.tensor(t), eps), t, s, ec, eu, w))
            for t, s, w in ((999.0, 979.0, 3.0), (519.0, 499.0, 1.0), (519.0, 499.0, 0.0))]


def _gddim_x0_only(sc, x, t, s, ec, eu, w):
    ab_t, ab_s = sc.alpha_bar(torch.tensor(t)), sc.alpha_bar(torch.tensor(s))
    x0 = (x - (1 - ab_t).sqrt() * cfg_combine(ec, eu, w)) / ab_t.sqrt()
    return (ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * ec).to(x)


register(Exercise(
    "guided_ddim_step", 5, "One step of the augmented PF-ODE", 2,
    "LCD's teacher step (Luo et al. 2023, Sec. 4.2): DDIM from t to s driven by the guided eps_w = (1 + w) eps_c - "
    "w eps_u; both the x0-estimate and the re-noising use eps_w (minilcm.solvers.ddim_step).",
    guided_ddim_ref, _gddim_cases, [
        Mistake(lambda sc, x, t, s, ec, eu, w: ddim_step(sc, x, t, s, ec),
                "your step ignores w: the teacher's step uses the guided eps_w."),
        Mistake(_gddim_x0_only,
                "you guided the x0-estimate but re-noised with the conditional eps; the DDIM step uses eps_w for "
                "both."),
        Mistake(lambda sc, x, t, s, ec, eu, w: ddim_step(sc, x, t, s, w * ec + (1 - w) * eu),
                "your eps_w uses diffusers' guidance_scale convention; the course's w is guidance_scale - 1.")]))


def _lcmt_cases():
    return [Case(f"n = {n}", (SD, n)) for n in (1, 2, 4, 7)]


register(Exercise(
    "lcm_sampling_times", 5, "LCMScheduler's n sampling times", 2,
    "n indices spaced by floor(i * N / n) over the skipping grid of 50 teacher steps (k = 20, N = 50), read from its "
    "noisiest end: n = 4 gives 999, 759, 499, 259.",
    lambda sc, n: lcm_timesteps(sc, n), _lcmt_cases, [
        Mistake(lambda sc, n: lcm_timesteps(sc, n).flip(0),
                "your times increase; the sampler starts from the noise (999)."),
        Mistake(lambda sc, n: skipping_timesteps(sc, 20)[torch.floor(torch.arange(n, dtype=torch.float64) * 50 / n)
                                                        .long()],
                "your times start at the data end (19); read the grid from its noisiest end, 999 first."),
        Mistake(lambda sc, n: torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1].round(),
                "your times are evenly spaced in t; LCM's lie on the skipping grid (k - 1, 2k - 1, ...).")],
    rtol=0, atol=0))


def _lcms_cases():
    return [Case("t = 0, 1, 19, 259, 999", (torch.tensor([0.0, 1.0, 19.0, 259.0, 999.0], dtype=torch.float64),))]


register(Exercise(
    "lcm_scalings", 5, "LCM's boundary scalings", 1,
    "diffusers' LCMScheduler: with u = 10 t and sigma_d = 0.5, c_skip = sigma_d^2 / (u^2 + sigma_d^2), c_out = u / "
    "sqrt(u^2 + sigma_d^2). Return (c_skip, c_out).",
    lambda t: LCMScalings()(None, t, 0.0), _lcms_cases, [
        Mistake(lambda t: LCMScalings(timestep_scaling=1.0)(None, t, 0.0),
                "your c_skip is {got}: LCM scales the timestep by 10 first, so c_skip(1) = 0.0025."),
        Mistake(lambda t: LCMScalings(sigma_data=1.0)(None, t, 0.0),
                "your scalings use sigma_d = 1; LCMScheduler's is 0.5.")]))


# ---- Chapter 6 ----------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = nn.Linear(32, 32, bias=False), nn.Linear(24, 32, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(32, 16)])
        self.norm = nn.LayerNorm(32)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)


def _lora_cases():
    m = nn.Sequential(_Block(), _Block())
    return [Case("two attention blocks, rank 4, targets to_q, to_k", (m, 4, ("to_q", "to_k"))),
            Case("the same with to_out.0 and conv1, rank 8", (m, 8, ("to_q", "to_k", "to_out.0", "conv1")))]


def _lora_wrong(model, rank, targets, kind):
    n = 0
    for name, mod in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            if isinstance(mod, nn.Linear):
                n += {"full": mod.in_features * mod.out_features, "in": rank * mod.in_features}[kind]
            elif isinstance(mod, nn.Conv2d):
                n += {"full": mod.weight.numel(), "in": rank * mod.in_channels * 9}[kind]
    return n


register(Exercise(
    "lora_parameter_count", 6, "How many parameters LoRA trains", 1,
    "a rank-r adapter on a Linear(d_in, d_out) is B A with A (r x d_in) and B (d_out x r): r (d_in + d_out) "
    "numbers; on a Conv2d(c_in, c_out, k): r c_in k^2 + c_out r. Count every module whose name is a target or "
    "ends with '.' + target.",
    lora_parameter_count, _lora_cases, [
        Mistake(lambda m, r, t: _lora_wrong(m, r, t, "full"),
                "your count ({got}) is the full weight matrices': LoRA trains only the two thin factors, "
                "r (d_in + d_out) per layer."),
        Mistake(lambda m, r, t: _lora_wrong(m, r, t, "in"),
                "your count ({got}, expected {want}) has only A: add B's d_out r per layer.")], rtol=0, atol=0))


def lora_merge_ref(W, A, B, alpha, rank):
    return W + (alpha / rank) * (B @ A)


def _merge_cases():
    g = _g(21)
    W, A, B = torch.randn(16, 12, generator=g), torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g)
    return [Case("W 16x12, rank 4, alpha 4", (W, A, B, 4.0, 4)), Case("the same with alpha 8", (W, A, B, 8.0, 4))]


register(Exercise(
    "lora_merge", 6, "Merge a LoRA into its layer", 1,
    "W' = W + (alpha / r) B A (Hu et al. 2021, Sec. 4.1); B A has W's shape.",
    lora_merge_ref, _merge_cases, [
        Mistake(lambda W, A, B, al, r: W + B @ A,
                "your merge leaves out the scale alpha / r."),
        Mistake(lambda W, A, B, al, r: W + (r / al) * (B @ A), "your scale is r / alpha; it is alpha / r.")]))


def lora_compose_ref(theta, tau_style, tau_lcd, lam_style, lam_lcd):
    return {k: theta[k] + lam_style * tau_style.get(k, 0) + lam_lcd * tau_lcd.get(k, 0) for k in theta}


def _compose_cases():
    g = _g(22)
    th = {"a": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
    t1 = {"a": torch.randn(4, 4, generator=g)}
    t2 = {"a": torch.randn(4, 4, generator=g), "b": torch.randn(4, generator=g)}
    return [Case("lambda_style = 0.8, lambda_lcd = 1", (th, t1, t2, 0.8, 1.0))]


register(Exercise(
    "lora_compose", 6, "Compose a style LoRA with LCM-LoRA", 1,
    "theta' = theta_pre + lambda_1 tau_style + lambda_2 tau_lcd (LCM-LoRA, Luo et al. 2023b, Eq. 2), parameter by "
    "parameter; a parameter a task vector does not touch stays as it is. Return a new dict.",
    lora_compose_ref, _compose_cases, [
        Mistake(lambda th, a, b, l1, l2: {k: th[k] + (l1 * a.get(k, 0) + l2 * b.get(k, 0)) / 2 for k in th},
                "your composition averages the two task vectors; LCM-LoRA adds them, each with its own lambda."),
        Mistake(lambda th, a, b, l1, l2: {k: l1 * a.get(k, 0) + l2 * b.get(k, 0) + 0 * th[k] for k in th},
                "your result lacks theta_pre: the task vectors are added to the pre-trained weights.")]))


def script_huber_ref(a, b, c=0.001):
    return (((a.float() - b.float()) ** 2 + c ** 2).sqrt() - c).mean()


def _sh_cases():
    g = _g(23)
    a = torch.randn(4, 4, 8, 8, generator=g)
    return [Case("a batch of 4 latents 4x8x8", (a, a + 0.01 * torch.randn(4, 4, 8, 8, generator=g))),
            Case("c = 0.1", (a, a + torch.randn(4, 4, 8, 8, generator=g)), {"c": 0.1})]


register(Exercise(
    "script_huber", 6, "The reference LCD script's huber loss", 1,
    "train_lcm_distill_sd_wds.py's loss_type='huber': mean over every element of sqrt((a - b)^2 + c^2) - c, "
    "c = 0.001: elementwise, unlike iCT's per-sample pseudo-Huber. Return a scalar tensor.",
    script_huber_ref, _sh_cases, [
        Mistake(lambda a, b, c=0.001: (((a - b) ** 2).flatten(1).sum(1) + c ** 2).sqrt().sub(c).mean(),
                "your loss takes the norm per sample (iCT's pseudo-Huber); the script's is elementwise."),
        Mistake(lambda a, b, c=0.001: ((a - b) ** 2 + c ** 2).sqrt().mean(),
                "your loss is c too large: subtract c from every element.")]))


# ---- Chapter 7 ----------------------------------------------------------------------------------------
def _fd_cases():
    rng = np.random.default_rng(24)
    A, B = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = A @ A.T + np.eye(5), B @ B.T + 0.5 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    return [Case("two 5-D Gaussians with full covariances", (mu1, s1, mu2, s2)),
            Case("the same Gaussian twice (distance 0)", (mu1, s1, mu1, s1))]


def _fd_wrong(mu1, s1, mu2, s2, two=2.0, elementwise=False):
    if elementwise:
        tr = np.sqrt(np.clip(np.diag(s1) * np.diag(s2), 0, None)).sum()
    else:
        ev, V = np.linalg.eigh(s1)
        r = (V * np.sqrt(ev.clip(min=0))) @ V.T
        tr = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r).clip(min=0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - two * tr)


register(Exercise(
    "frechet_distance", 7, "The Fréchet distance between two Gaussians", 2,
    "d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) (FID, Heusel et al. 2017): the trace of a matrix "
    "square root is the sum of the square roots of its eigenvalues (numpy.linalg.eigvalsh). Return a float.",
    frechet_distance, _fd_cases, [
        Mistake(lambda *a: _fd_wrong(*a, two=1.0), "your distance lacks the factor 2 on the trace of the square root."),
        Mistake(lambda *a: _fd_wrong(*a, elementwise=True),
                "your distance takes the square root elementwise on the diagonals; it needs the matrix square root "
                "(the covariances here are not diagonal).")], rtol=1e-6, atol=1e-8))


def cfg_speedup_ref(teacher_steps, student_steps, teacher_cfg=True):
    return teacher_steps * (2 if teacher_cfg else 1) / student_steps


def _speed_cases():
    return [Case("DPM-Solver++ 25 with CFG against LCM 4", (25, 4)), Case("the same teacher without CFG", (25, 4),
                                                                         {"teacher_cfg": False})]


register(Exercise(
    "cfg_speedup", 7, "The cost model of CFG", 1,
    "cost ~ network rows evaluated: a CFG teacher evaluates 2 rows (cond and uncond) per step, the LCM student one, "
    "because w is its input. Predicted speed-up = teacher steps x rows / (student steps x 1).",
    cfg_speedup_ref, _speed_cases, [
        Mistake(lambda a, b, teacher_cfg=True: a / b,
                "your speed-up ({got}) counts steps only: under CFG each teacher step evaluates two rows."),
        Mistake(lambda a, b, teacher_cfg=True: b / (a * (2 if teacher_cfg else 1)),
                "your ratio is upside down (below 1): divide the teacher's cost by the student's.")],
    rtol=1e-9, atol=0))
