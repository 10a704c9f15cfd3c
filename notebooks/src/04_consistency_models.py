# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 4 — Consistency models: distillation and training
#
# **The road:** DDPM → the SDE / probability-flow ODE view → DDIM and DPM-Solver → **consistency models** →
# latent consistency models (LCM) → the same distillation on Stable Diffusion.
#
# Chapter 3 solved the probability-flow ODE (PF-ODE) with fewer, cleverer steps. However clever, a solver still
# *integrates*: at 1 or 2 evaluations even an exact eps-model lands far from the data. A **consistency model**
# (Song et al. 2023, [arXiv 2303.01469](https://arxiv.org/abs/2303.01469)) learns the *answer* of the ODE instead:
# a network $f_\theta(x_t, t)$ that maps any point of a PF-ODE trajectory straight to the trajectory's origin.
# One evaluation is then a sample; a few more, interleaved with fresh noise, refine it.
#
# 1. **The consistency function** and its boundary condition, in two parameterisations (the CM form with
#    $\sigma_\text{data}$, and the discrete LCM form that diffusers' `LCMScheduler` uses).
# 2. **Consistency distillation (CD)**: learn $f$ from a teacher's ODE steps. Our teacher is the 2-D Gaussian
#    mixture's *exact* eps-model, so only learning error is left.
# 3. **Consistency training (CT)**: learn $f$ from data alone, with the improved recipe of Song & Dhariwal 2023
#    ([arXiv 2310.14189](https://arxiv.org/abs/2310.14189), "iCT").
# 4. **One- and multistep sampling** against DDIM at the same number of function evaluations (NFE).
# 5. **CD in pixel space** on CIFAR-10, from the Chapter 1 teacher.
#
# The consistency function, CD and sampling live in `minilcm.consistency`, consistency training (iCT) in `minilcm.ict`;
# the CIFAR recipe in `minilcm.recipes.cifar_cd_student`.
# The work is sized by `MINILCM_PROFILE`: `fast` (CI), `cpu` (a laptop, a few minutes), `gpu`.
#
# **Time:** about 20 minutes to read, 25 more for the five exercises; about 7 minutes to run (cpu profile, measured
# on a 2-core CPU). **Needs:** Chapters 2–3 (the PF-ODE, Heun, DDIM). Symbols, and the three meanings of $s$:
# [the notation sheet](../docs/notation.md). Each exercise's `check` names the mistake it finds; a skipped one falls
# back to the package.

# %%
import copy
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from minilcm.notebook import setup  # first: it silences tqdm's import-time warning
from minilcm.consistency import (CMScalings, ConsistencyDistillation, ConsistencyModel, LCMScalings, cm_sample,
                                 cm_sampling_times, cm_timesteps)
from minilcm.diffusion import TeacherRegression, eps_to_x0
from minilcm.ict import ConsistencyTraining, ict_discretisation, ict_weight, lognormal_index_probs
from minilcm.metrics import noise_floor, sliced_wasserstein
from minilcm.models import MLPDenoiser
from minilcm.preconditioning import EDMPrecond, edm_sigma
from minilcm.profiles import pick
from minilcm.recipes import cifar_cd_student, cifar_teacher
from minilcm.samplers import run_sampler
from minilcm.schedules import Schedule
from minilcm.sde import heun_step, pf_ode
from minilcm.solvers import ddim, spaced_timesteps
from minilcm.toys import GaussianMixture, OracleEps
from minilcm.train import TrainConfig, train
from minilcm.viz import image_grid, scatter_2d
from minilcm.exercises import check

N_THREADS = torch.get_num_threads()
PROFILE = setup(threads=1)  # the 2-D tensors are tiny: one thread is fastest (restored for CIFAR, except in CI)
T0 = time.perf_counter()
sch = Schedule("linear")
mix = GaussianMixture()
oracle = OracleEps(mix, sch)  # the exact eps-model of the mixture: eps(x, t) = -sigma_t * score_t(x)
# sigma_d of the CM form and of EDM's preconditioning is the data's standard deviation (EDM's 0.5 is for images in
# [-1, 1]); for this mixture we measure it, per coordinate, on 100k samples
SIGMA_D = round(mix.sample(100_000, torch.Generator().manual_seed(0))[0].std().item(), 2)
print(f"sigma_d of the 2-D mixture: {SIGMA_D}")

# %% [markdown]
# ## 1. The consistency function
#
# *A note on the letter $s$, which the papers use three ways and this chapter follows them:* (1) an earlier time of a
# step, $t \to s$ (as in Chapters 2–3 and in $f(x_t, t) = f(x_s, s)$ below); (2) the EDM noise level
# $s = \sigma_t/\alpha_t$ of a VP time $t$ (Section 2 on; $s \approx 157$ at $t = 999$); (3) iCT's curriculum constants
# $s_0$, $s_1$ (Section 3), which count grid intervals. The subscripts and the context tell them apart.
#
# The PF-ODE $\frac{dx}{dt} = -\tfrac12\beta(t)\big(x - \epsilon(x, t)/\sigma_t\big)$ (Chapter 2) carries every
# noisy point $x_t$ along one deterministic trajectory to a point $x_{t_\min}$ near the data. The **consistency
# function** is the map "where does this trajectory end?":
#
# $$f(x_t, t) = x_{t_\min}\quad\text{for every } (x_t, t) \text{ on the trajectory}\qquad
#   \Longrightarrow\qquad f(x_t, t) = f(x_s, s)\ \ \text{(self-consistency)},\qquad f(x, t_\min) = x.$$
#
# The last equation is the **boundary condition**. A network satisfies it *exactly* through its parameterisation
# (Song et al. 2023, Eq. 5):
#
# $$f_\theta(x_t, t) = c_\text{skip}(t)\, x_t + c_\text{out}(t)\, F_\theta(x_t, t),\qquad
#   c_\text{skip}(t_\min) = 1,\ c_\text{out}(t_\min) = 0 .$$
#
# `minilcm` keeps one convention for networks, $\epsilon_\theta(x_t, t)$ (docs/architecture.md), so $F_\theta$ is
# built from an eps-model and **a student can start as a copy of its teacher**. Two choices of
# $(c_\text{skip}, c_\text{out})$:
#
# * **CM form** (Song et al. 2023, App. C), written with the EDM noise level $s = \sigma_t/\alpha_t$ of VP time $t$
#   (Chapter 3's $\sigma/\alpha$): $c_\text{skip} = \frac{\sigma_d^2}{(s - s_\min)^2 + \sigma_d^2}$,
#   $c_\text{out} = \frac{\sigma_d (s - s_\min)}{\sqrt{\sigma_d^2 + s^2}}$, where $\sigma_d$ is the data's standard
#   deviation (the value printed above for the mixture; EDM's 0.5 for images in $[-1, 1]$). Away from $t_\min$
#   these are EDM's preconditioning (Karras et al. 2022), so $f_\theta$ *is* the teacher's one-step denoiser
#   $\hat x_0 = (x_t - \sigma_t \epsilon)/\alpha_t$ there; near $t_\min$ it bends smoothly to $x$.
# * **LCM form**, diffusers' `LCMScheduler.get_scalings_for_boundary_condition_discrete`, in the *timestep*:
#   $c_\text{skip} = \frac{\sigma_d^2}{(10t)^2 + \sigma_d^2}$, $c_\text{out} = \frac{10t}{\sqrt{(10t)^2 + \sigma_d^2}}$
#   with $\sigma_d = 0.5$, multiplying $F = \hat x_0$. It switches within one timestep: already at $t = 1$,
#   $c_\text{skip} = 0.0025$. The boundary condition is exact only at $t = 0$; on LCM's own grid (smallest
#   timestep 19) it holds only approximately — LCM is essentially $\hat x_0$-prediction. Chapter 5 uses it;
#   this chapter uses the CM form.
#
# ### Exercise 4.1 (**): the CM scalings
#
# Write `cm_scalings(s, s_min, sigma_d)` returning `(c_skip, c_out)` of the CM form for a float64 tensor of noise
# levels `s`. Check the boundary yourself: at `s = s_min` you must get exactly 1 and 0.

# %%
def cm_scalings(s, s_min, sigma_d):
    # BEGIN SOLUTION
    ds = s - s_min
    return sigma_d ** 2 / (ds ** 2 + sigma_d ** 2), sigma_d * ds / (sigma_d ** 2 + s ** 2).sqrt()
    # END SOLUTION


cm_scalings = check("cm_scalings", cm_scalings)

# %%
t = torch.linspace(0, 999, 2000, dtype=torch.float64)
fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
for scaling, name, ls in [(CMScalings(SIGMA_D), rf"CM form, $\sigma_d = {SIGMA_D}$", "-"),
                          (LCMScalings(), "LCM form", "--")]:
    c_skip, c_out = scaling(sch, t, 0.0)
    ax[0].plot(t + 1, c_skip, ls, label=name)
    ax[1].plot(t + 1, c_out, ls, label=name)
for a, title in zip(ax, [r"$c_\mathrm{skip}(t)$", r"$c_\mathrm{out}(t)$"]):
    a.set_xscale("log"); a.set_xlabel("timestep t + 1 (log scale)"); a.set_title(title); a.legend(fontsize=8)
plt.tight_layout()
plt.show()

net0 = MLPDenoiser(hidden=32, depth=1)
torch.nn.init.normal_(net0.out[-1].weight)  # a random eps-net with a non-zero output
x = torch.randn(512, 2)
for scaling in (CMScalings(SIGMA_D), LCMScalings()):
    f0 = ConsistencyModel(net0, sch, scaling)
    assert torch.equal(f0(x, torch.zeros(512)), x), "the boundary condition holds exactly at t_min = 0"
print("f(x, t_min) == x exactly, for both forms; c_skip(1) of the LCM form:",
      LCMScalings()(sch, torch.tensor(1.0), 0)[0].item())

# %% [markdown]
# ### Self-consistency, pictured
#
# With the exact oracle we can *compute* the consistency function: solve the PF-ODE from $(x_t, t)$ down to
# $t = 0$. Below, grey lines are PF-ODE trajectories from noise; on each we mark points at five times and map every
# point to (a) its ODE end point $f^\ast(x_t, t)$, with a separate accurate solve from that point, and (b) the
# one-step denoiser $D(x_t, t) = \hat x_0 = \mathbb{E}[x_0 \mid x_t]$ (one DDIM step to 0). The end points of one
# trajectory coincide; the denoiser's guesses do not — they start near the mixture's mean and only reach the
# trajectory's end as $t \to 0$. A consistency model must learn $f^\ast$, not $D$.
#
# **Predict, then run.** Take the five marked points of one trajectory, at $t$ from about 640 down to 20. How far
# apart will their five ODE end points be, and their five denoiser guesses?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* The ODE end points coincide up to the solver's error (the largest spread, printed below the figure, is
# under 0.02), because they lie on one trajectory. The denoiser's guesses spread by more than 0.5: at large $t$ it
# guesses near the mixture's mean, and only near $t = 0$ does its guess reach the trajectory's end.

# %%
def ode_to_data(x_t, t_start, n=24):
    """f*(x_t, t): the oracle PF-ODE solved from t_start to 0 with n Heun steps on a lambda grid."""
    return pf_ode(oracle, x_t, sch, spaced_timesteps(sch, n + 1, "lambda", t_max=t_start), method="heun").x


n_traj = 10
x_T = torch.randn(n_traj, 2, generator=torch.Generator().manual_seed(3)) * 1.0
grid = spaced_timesteps(sch, 61, "lambda")
path = pf_ode(oracle, x_T, sch, grid, method="heun", return_trajectory=True).trajectory  # 61 x (n_traj, 2)
marks = [10, 25, 35, 45, 52]  # indices into the grid: t from ~640 down to ~20
f_star = torch.stack([ode_to_data(path[i], grid[i].item()) for i in marks])  # (5, n_traj, 2)
den = torch.stack([eps_to_x0(sch, path[i], grid[i], oracle(path[i], grid[i].expand(n_traj))) for i in marks])

fig, ax = plt.subplots(1, 2, figsize=(10, 5))
cols = plt.cm.viridis(np.linspace(0, 0.9, len(marks)))
for a, est, title in [(ax[0], f_star, "ODE end points $f^\\ast(x_t, t)$ (stars):\nthe five of a trajectory coincide"),
                      (ax[1], den, "denoiser $D(x_t, t)$ (stars):\none guess per time")]:
    mix_lp = lambda z: mix.log_prob(z)  # noqa: E731
    scatter_2d(torch.zeros(0, 2), ax=a, log_prob=mix_lp, lim=2.6)
    P = torch.stack(path)  # (61, n_traj, 2), scaled by alpha_t: noisy points sit farther out early on
    for j in range(n_traj):
        a.plot(P[:, j, 0], P[:, j, 1], color="0.6", lw=0.8)
    for k, (i, c) in enumerate(zip(marks, cols)):
        a.scatter(path[i][:, 0], path[i][:, 1], color=c, s=14, zorder=3,
                  label=f"$x_t$, t = {grid[i].item():.0f}")
        a.scatter(est[k][:, 0], est[k][:, 1], color=c, marker="*", s=90, edgecolor="k", lw=0.4, zorder=4)
        for j in range(n_traj):
            a.plot([path[i][j, 0], est[k][j, 0]], [path[i][j, 1], est[k][j, 1]], color=c, lw=0.5, ls=":")
    a.set_title(title)
ax[0].legend(fontsize=7, loc="lower left")
plt.tight_layout()
plt.show()

spread_f = (f_star - f_star.mean(0)).norm(dim=-1).max().item()
spread_d = (den - den.mean(0)).norm(dim=-1).max().item()
print(f"largest distance of an estimate from its trajectory's mean estimate: ODE end point {spread_f:.4f}, "
      f"denoiser {spread_d:.3f}")
assert spread_f < 0.02 and spread_d > 0.5, "points of one trajectory share one end point; the denoiser's differ"

# %% [markdown]
# ## 2. Consistency distillation from the exact teacher
#
# CD (Song et al. 2023, Eq. 7 and Algorithm 2) enforces self-consistency between *neighbouring* times. Take a
# grid $t_\min = t_0 < t_1 < \dots < t_N = 999$ (`cm_timesteps`: Karras et al.'s $\rho = 7$ spacing in
# $s = \sigma/\alpha$, dense near the data). For $x_0 \sim$ data, $n \sim \mathcal U\{0..N-1\}$,
# $z \sim \mathcal N(0, I)$:
#
# $$x_{t_{n+1}} = \alpha_{t_{n+1}} x_0 + \sigma_{t_{n+1}} z,\qquad
#   \hat x_{t_n} = \Phi_\text{teacher}(x_{t_{n+1}},\ t_{n+1} \to t_n),\qquad
#   \mathcal L = \lambda(t_n)\, d\big(f_\theta(x_{t_{n+1}}, t_{n+1}),\ f_{\theta^-}(\hat x_{t_n}, t_n)\big).$$
#
# * $\Phi$ is **one ODE step of the teacher**: any solver with the signature `step(model, x, schedule, t, s)` —
#   `sde.heun_step` (2nd order, Song et al.'s choice) or `consistency.ddim_solver` (LCM's). With $N = 18$, Heun
#   is second order, far more accurate per interval than DDIM, though not exact on 18 coarse intervals; whatever
#   error the teacher's step makes is distilled into the student, and DDIM's first-order error is the larger.
# * $\theta^-$ is a **target network**, an EMA of $\theta$ updated after each optimizer step
#   ($\theta^- \leftarrow \mu\theta^- + (1-\mu)\theta$, $\mu = 0.95$; the loss's `after_step`). It runs in the online
#   network's train/eval mode *and* replays the online forward's random state, so both see the **same dropout
#   masks** (`paired_forward`; iCT Sec. 3.1).
#
# ### Exercises 4.2 (\*) and 4.3 (\*): Karras' grid and the pseudo-Huber distance
#
# Write `karras_levels(s_min, s_max, N, rho=7.0)`, the $N + 1$ increasing noise levels
# $s_i = \big(s_\min^{1/\rho} + \tfrac iN (s_\max^{1/\rho} - s_\min^{1/\rho})\big)^\rho$ (float64), which `cm_timesteps`
# maps to VP times; and `my_pseudo_huber(a, b, c=None)`, iCT's per-sample distance
# $\sqrt{\lVert a - b\rVert^2 + c^2} - c$ with $c = 0.00054\sqrt d$ by default ($d$ = numbers per sample), shape `(B,)`.
# * $d$ is squared L2 or iCT's **pseudo-Huber** $\sqrt{\lVert a - b\rVert^2 + c^2} - c$, $c = 0.00054\sqrt{d}$;
#   $\lambda$ is 1 (Song et al.) or iCT's $1/(s_{n+1} - s_n)$, which leans on the low-noise intervals.
#
# Induction does the rest: $f(\cdot, t_0)$ is exact by the boundary condition, so consistency on $[t_0, t_1]$
# makes $f(\cdot, t_1)$ right, and so on up the grid.
#
# **The student's parameterisation matters.** An eps-network's $\hat x_0 = (x_t - \sigma_t\epsilon)/\alpha_t$
# multiplies its errors by $\sigma_t/\alpha_t$ — that is 157 at $t = 999$. A copy of a well-trained teacher copes (LCM
# distils Stable Diffusion that way), but a small MLP trained from scratch cannot reach one-step accuracy. So the
# 2-D student is an `EDMPrecond` eps-model: a raw MLP wrapped in EDM's preconditioning, which under the CM form is
# *exactly* Song et al.'s $f_\theta = c_\text{skip} x + c_\text{out}\,\mathrm{MLP}(c_\text{in} x/\alpha, t)$.
# The oracle has no weights to copy, so we first fit the student to it as a function (`TeacherRegression`, the DDPM
# loss with the oracle's eps as the target), then distil.

# %%
def karras_levels(s_min, s_max, N, rho=7.0):
    # BEGIN SOLUTION
    i = torch.arange(N + 1, dtype=torch.float64) / N
    return (s_min ** (1 / rho) + i * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho
    # END SOLUTION


karras_levels = check("karras_levels", karras_levels)
lv = edm_sigma(sch, cm_timesteps(sch, 18))
assert torch.allclose(karras_levels(lv[0].item(), lv[-1].item(), 18), lv, rtol=1e-6), "cm_timesteps is this grid"


# %%
def my_pseudo_huber(a, b, c=None):
    # BEGIN SOLUTION
    c = 0.00054 * a[0].numel() ** 0.5 if c is None else c
    return (((a - b) ** 2).flatten(1).sum(1) + c ** 2).sqrt() - c
    # END SOLUTION


my_pseudo_huber = check("pseudo_huber", my_pseudo_huber)

# %%
CD_PRE, CD_STEPS = pick(fast=300, cpu=1500, gpu=3000), pick(fast=400, cpu=1500, gpu=4000)
c0 = time.process_time()
torch.manual_seed(0)
cd_net = EDMPrecond(MLPDenoiser(hidden=128, depth=3), sch, sigma_data=SIGMA_D)
train(cd_net, TeacherRegression(oracle, sch), mix, TrainConfig(steps=CD_PRE, batch_size=256, lr=2e-3,
                                                               desc="copy the oracle"))
cd_init = ConsistencyModel(copy.deepcopy(cd_net), sch, CMScalings(SIGMA_D)).eval()  # before distillation
cd_student = ConsistencyModel(cd_net, sch, CMScalings(SIGMA_D))
cd_loss = ConsistencyDistillation(oracle, cd_student, N=18, mu=0.95, solver=heun_step, weight=ict_weight)
cd_res = train(cd_student, cd_loss, mix, TrainConfig(steps=CD_STEPS, batch_size=256, lr=1e-3, ema_decay=0.99,
                                                     desc="CD"))
cd = cd_res.ema.eval()
print(f"CD: {CD_PRE} + {CD_STEPS} steps in {time.process_time() - c0:.1f} s of CPU;"
      f" grid t_n = {[round(v) for v in cd_loss.timesteps.tolist()]}")

# %% [markdown]
# Each row of the batch draws its own grid index n, as in the paper's Algorithm 2, and the teacher's one-step
# solvers take per-row times: the Heun step is two batched teacher calls however many grid times the batch holds.
#
# How self-consistent did the student become? Apply it to the marked trajectory points from above.

# %%
with torch.no_grad():
    f_learn = torch.stack([cd(path[i], grid[i].expand(n_traj)) for i in marks])
    f_init = torch.stack([cd_init(path[i], grid[i].expand(n_traj)) for i in marks])
err_learn = (f_learn - f_star).norm(dim=-1).mean().item()
err_init = (f_init - f_star).norm(dim=-1).mean().item()
print(f"mean distance to the true end point: before CD (a copy of the denoiser) {err_init:.3f}, "
      f"after CD {err_learn:.3f}")
assert err_learn < 0.5 * err_init

# %% [markdown]
# ## 3. Consistency training: no teacher
#
# CT replaces the teacher's step by the data itself: with the **same** $z$,
# $x_{t_n} = \alpha_{t_n} x_0 + \sigma_{t_n} z$ is an unbiased one-sample estimate of the ODE step from
# $x_{t_{n+1}} = \alpha_{t_{n+1}} x_0 + \sigma_{t_{n+1}} z$ as the grid refines (Song et al. 2023, Theorem 2).
# iCT's recipe (Song & Dhariwal 2023):
#
# * target = the online network itself under stop-gradient ($\mu = 0$, Sec. 3.2), pseudo-Huber distance (Sec. 3.3),
#   weight $\lambda(t_n) = 1/(s_{n+1} - s_n)$ (Sec. 3.1);
# * a **curriculum** on the grid size (Sec. 3.4, Eq. 8): $N(k) = \min(s_0 2^{\lfloor k/K'\rfloor}, s_1) + 1$ points,
#   $K' = \lfloor K / (\log_2\lfloor s_1/s_0\rfloor + 1)\rfloor$, $s_0 = 10$, $s_1 = 1280$ — coarse grids early
#   (large, biased but low-variance steps), fine grids late;
# * a **lognormal** choice of the interval (Sec. 3.5):
#   $p(n) \propto \operatorname{erf}\frac{\log s_{n+1} - P_\text{mean}}{\sqrt2 P_\text{std}}
#   - \operatorname{erf}\frac{\log s_n - P_\text{mean}}{\sqrt2 P_\text{std}}$,
#   $P_\text{mean} = -1.1$, $P_\text{std} = 2$.
#
# ### Exercises 4.4 (\*\*) and 4.5 (\*): iCT's curriculum and weight
#
# Write `my_ict_curriculum(k, K, s0=10, s1=1280)`, the number of grid *intervals* $N(k) - 1$ at training step `k` of
# `K` (an int; Eq. 8 above), and `my_ict_weight(s_n, s_n1)` $= 1/(s_{n+1} - s_n)$ for tensors of neighbouring levels.
# The plot below draws the curriculum with the package's `ict_discretisation`.

# %%
def my_ict_curriculum(k, K, s0=10, s1=1280):
    # BEGIN SOLUTION
    K_prime = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (k // K_prime), s1)
    # END SOLUTION


my_ict_curriculum = check("ict_curriculum", my_ict_curriculum)


# %%
def my_ict_weight(s_n, s_n1):
    # BEGIN SOLUTION
    return 1 / (s_n1 - s_n)
    # END SOLUTION


my_ict_weight = check("ict_weight", my_ict_weight)

# %% [markdown]
# iCT's $s_1 = 1280$ is tuned for 400,000 iterations. With a few thousand, the last doublings get too few steps each
# (the left plot below shows how few with $s_1 = 320$; with 1280 there would be one more doubling in the same
# budget), so this notebook stops the curriculum at $s_1 = 320$: our choice for a CPU budget, not a measured optimum.
# `tests/test_consistency.py` trains with the defaults.

# %%
CT_STEPS, CT_S1 = pick(fast=600, cpu=2000, gpu=6000), 320
ks = np.arange(CT_STEPS)
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
ax[0].step(ks, [ict_discretisation(k, CT_STEPS, s1=CT_S1) for k in ks])
ax[0].set_yscale("log"); ax[0].set_xlabel("training step k")
ax[0].set_title(f"grid intervals N(k), K = {CT_STEPS}, s1 = {CT_S1}")
sig = edm_sigma(sch, cm_timesteps(sch, 160))
ax[1].semilogx(sig[:-1], lognormal_index_probs(sig))
ax[1].set_xlabel(r"$s_n = \sigma/\alpha$ of the interval"); ax[1].set_title("lognormal p(n), N = 160")
plt.tight_layout()
plt.show()

c0 = time.process_time()
torch.manual_seed(0)
ct_student = ConsistencyModel(EDMPrecond(MLPDenoiser(hidden=128, depth=3), sch, SIGMA_D), sch,
                             CMScalings(SIGMA_D))
ct_untrained = copy.deepcopy(ct_student).eval()
ct_res = train(ct_student, ConsistencyTraining(sch, total_steps=CT_STEPS, s1=CT_S1), mix,
               TrainConfig(steps=CT_STEPS, batch_size=256, lr=5e-4, ema_decay=0.99, desc="CT"))
ct = ct_res.ema.eval()
print(f"CT: {CT_STEPS} steps in {time.process_time() - c0:.1f} s of CPU")

# %% [markdown]
# ## 4. One step, two steps, four: consistency models against DDIM
#
# Sampling (Song et al. 2023, Algorithm 1) is one evaluation, $x_0 = f(x_T, T)$; for more quality, **re-noise**
# to a smaller time and apply $f$ again: $x_\tau = \alpha_\tau x_0 + \sigma_\tau z$, $x_0 \leftarrow f(x_\tau, \tau)$.
# `cm_sample` follows the one sampler signature; its NFE is the number of timesteps. Which times? The package has
# one rule, `minilcm.consistency.cm_sampling_times(schedule, steps)`: `steps` times read evenly (in the index) from
# CD's $N = 18$ Karras grid, noisiest first — on the training grid, because a network with a sinusoidal time
# embedding is most accurate at the times it was trained on, and evenly, so that each re-noising covers the same
# number of CD intervals. It is the rule of the `cm` sampler (`minilcm.samplers.run_sampler("cm", ...)`) and so of
# the cm@k rows of `minilcm bench` (Chapter 7). We compare with DDIM on the **exact** oracle at the same NFE.
# Distances are the sliced Wasserstein distance to fresh data; two independent data sets of the same size sit at the
# noise floor printed below.
#
# **Predict, then run.** With one step, where will DDIM — with the *exact* eps-model — put its 4000 samples?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* On one dot at the origin. One DDIM step from pure noise returns $\hat x_0 = \mathbb E[x_0 \mid x_{999}]$,
# and $x_{999}$ says almost nothing about $x_0$, so that is the mixture's mean for every sample (the figure's
# bottom-left panel). The consistency models, trained to return the trajectory's end, already draw the ring.

# %%
n_eval = pick(fast=2000, cpu=4000)
CM_TIMES = {nfe: cm_sampling_times(sch, nfe) for nfe in (1, 2, 4)}  # on cd_loss.timesteps, the N = 18 grid
assert all(t in cd_loss.timesteps.tolist() for times in CM_TIMES.values() for t in times)
print("sampling times:", {nfe: [round(t) for t in times] for nfe, times in CM_TIMES.items()})
x_T = torch.randn(n_eval, 2, generator=torch.Generator().manual_seed(1))
refs = [mix.sample(n_eval, torch.Generator().manual_seed(s))[0] for s in (2, 3)]


def swd(x):
    return sum(sliced_wasserstein(x, r) for r in refs) / len(refs)


floor = noise_floor(mix, n_eval)
samples, dist = {}, {}
for nfe, times in CM_TIMES.items():
    for name, model in [("CD", cd), ("CT", ct)]:
        s = cm_sample(model, x_T, sch, times, generator=torch.Generator().manual_seed(4))
        assert s.nfe == nfe
        samples[name, nfe], dist[name, nfe] = s.x, swd(s.x)
    s = ddim(oracle, x_T, sch, spaced_timesteps(sch, nfe + 1, "lambda"), denoise_to_zero=False)
    assert s.nfe == nfe
    samples["DDIM (exact teacher)", nfe], dist["DDIM (exact teacher)", nfe] = s.x, swd(s.x)
ode = ddim(oracle, x_T, sch, sch.timesteps(1000)).x
d_ode, d_untrained = swd(ode), swd(cm_sample(ct_untrained, x_T, sch, [999.0]).x)

names = ["CD", "CT", "DDIM (exact teacher)"]
fig, ax = plt.subplots(3, 3, figsize=(10, 10))
for i, name in enumerate(names):
    for j, nfe in enumerate(CM_TIMES):
        scatter_2d(samples[name, nfe][:2000], ax=ax[i, j], lim=2.6, s=1,
                   title=f"{name}, NFE {nfe}: {dist[name, nfe]:.3f}")
plt.tight_layout()
plt.show()
print(f"noise floor (two data sets of {n_eval}): {floor:.3f};  1000-step oracle ODE: {d_ode:.3f};  "
      f"untrained CM: {d_untrained:.3f}")
print("NFE   " + "".join(f"{n:>22}" for n in names))
for nfe in CM_TIMES:
    print(f"{nfe:<6}" + "".join(f"{dist[n, nfe]:>22.3f}" for n in names))

# %% [markdown]
# What the table says, and what the cell below checks:
#
# * At 1 and 2 NFE, DDIM — with the *exact* eps-model — is nowhere: one step returns $\mathbb E[x_0 \mid x_T]$,
#   which for pure noise is the mixture's mean, a dot at the origin. The consistency models already draw the ring.
# * In the committed run (cpu profile), CD is the sharper model. CT, which never saw a teacher, draws the ring but
#   blurs the blobs: its targets are one-sample estimates of the teacher's step, and a few thousand steps do not
#   average them out.
# * A second step — re-noise to the middle of the grid, $t \approx 593$ ($s \approx 5.9$), and apply $f$ again —
#   sharpens CD's blobs (0.049 → 0.044 in the committed run): the fresh noise washes out part of the first step's
#   error. Four steps ($t$ = 999, 864, 593, 190) sharpen them further (0.039), because the last re-noising is to a
#   small noise level from which $f$ only has to finish the job. (iCT's two-step samples re-noise that low at once,
#   to $s = 0.821$; the package's rule spends its steps evenly along the grid instead.)
# * The re-noising noise must be independent of $x_T$. Drawing it from a generator seeded like $x_T$'s re-injects the
#   same $z$: $x_\tau$ is then no sample of $p_\tau$, and the second step starts from the wrong distribution. The cell
#   below measures it: CD's two steps with the re-noising generator seeded as $x_T$'s was score 0.063 in the
#   committed run, against 0.044 with independent noise — worse than one step.

# %%
same_z = cm_sample(cd, x_T, sch, CM_TIMES[2], generator=torch.Generator().manual_seed(1)).x  # x_T's seed: z = x_T
print(f"CD, 2 steps: independent re-noising {dist['CD', 2]:.3f};  re-noising with x_T's own noise {swd(same_z):.3f}")
for nfe in CM_TIMES:
    assert dist["CD", nfe] < dist["DDIM (exact teacher)", nfe], "CD beats exact DDIM at the same NFE"
    assert dist["CT", nfe] < dist["DDIM (exact teacher)", nfe], "CT beats exact DDIM at the same NFE"
assert dist["CD", 1] < 0.5 * dist["DDIM (exact teacher)", 1] and dist["CD", 2] < 0.5 * dist["DDIM (exact teacher)", 2]
assert dist["CT", 1] < 0.5 * d_untrained, "CT trains"
if PROFILE != "fast":  # the fast profile trains a few steps: only that the code runs is checked there
    assert dist["CD", 2] < dist["CD", 1], "two CD steps beat one"
if PROFILE != "fast":  # the claim of tests/test_consistency.py, at the test's training budget
    assert dist["CD", 1] < 2 * d_ode, "one CD step is within 2x of the 1000-step oracle ODE"

# %% [markdown]
# ## 5. Consistency distillation in pixel space: CIFAR-10
#
# The same loss distils the Chapter 1 CIFAR-10 teacher (`minilcm.recipes.cifar_teacher()`, a class-conditional
# eps-UNet; we distil its unconditional, null-class model as Song et al. do). The recipe `cifar_cd_student` copies
# the teacher's UNet into a `ConsistencyModel` with the CM form ($\sigma_d = 0.5$, for pixels in $[-1, 1]$), Heun on
# the $N = 18$ Karras grid, $\mu = 0.95$, pseudo-Huber, and trains it with the one training loop.
#
# **The shipped pair.** `cifar_teacher()` and `cifar_cd_student()` load the shipped checkpoints `ddpm-cifar10` and
# `cd-cifar10` when they are in `data/checkpoints/` (`minilcm train ddpm`, `minilcm train cd`). No GPU was lent to the
# project, so both are the recipe's CPU-sized fallback: a 1.1M-parameter EDM-preconditioned UNet (Chapter 1 says why
# the preconditioning) trained for 6,000 steps, and its student distilled for 1,200 steps of 32 images. Their pictures
# are blurry CIFAR-like scenes. Without the checkpoints, a stand-in teacher and student are trained here for a few
# steps. Either way we first check what holds regardless: the boundary condition on images, that the undistilled copy
# *is* its teacher's one-step denoiser, shapes, NFE and determinism; then we measure the samples.

# %%
if PROFILE != "fast":  # CI keeps one thread: on shared cores, more threads only wait for each other
    torch.set_num_threads(N_THREADS)
teacher, t_info = cifar_teacher(progress=False)
print("teacher:", t_info["source"], {k: t_info[k] for k in ("size", "steps") if k in t_info})
sch_c = Schedule("linear")
x_img = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    copy0 = ConsistencyModel(copy.deepcopy(teacher), sch_c, CMScalings(0.5)).eval()
    assert torch.equal(copy0(x_img, torch.zeros(8)), x_img), "the boundary condition, on images"
    t999 = torch.full((8,), 999.0)
    x0_teacher = eps_to_x0(sch_c, x_img, t999, teacher(x_img, t999))
    torch.testing.assert_close(copy0(x_img, t999), x0_teacher, rtol=1e-3, atol=1e-3)
print("an undistilled copy: f(x, 0) = x exactly, and f(x, 999) = the teacher's x0-estimate")

c0 = time.perf_counter()
student, s_info = cifar_cd_student(teacher=teacher, progress=False)
print(f"student: {s_info['source']}, {s_info.get('steps')} CD steps in {time.perf_counter() - c0:.1f} s")

# %%
n_img = pick(fast=8, cpu=8, gpu=16)
x_T = torch.randn(n_img, 3, 32, 32, generator=torch.Generator().manual_seed(1))
one = run_sampler("cm", student, x_T, sch_c, 1)  # the registry's cm sampler: times from cm_sampling_times
two = run_sampler("cm", student, x_T, sch_c, 2, generator=torch.Generator().manual_seed(2))
two_again = cm_sample(student, x_T, sch_c, cm_sampling_times(sch_c, 2), generator=torch.Generator().manual_seed(2))
ddim_2 = ddim(teacher, x_T, sch_c, spaced_timesteps(sch_c, 3, "lambda"), denoise_to_zero=False)
ddim_50 = ddim(teacher, x_T, sch_c, spaced_timesteps(sch_c, 51, "lambda"), denoise_to_zero=False)
assert one.x.shape == x_T.shape and (one.nfe, two.nfe, ddim_2.nfe, ddim_50.nfe) == (1, 2, 2, 50)
assert torch.equal(two.x, two_again.x), "run_sampler('cm') = cm_sample on cm_sampling_times, given the generator"

fig, ax = plt.subplots(1, 4, figsize=(14, 2.6), dpi=60)  # low resolution: small on disk
for a, (x, title) in zip(ax, [(ddim_50.x, "teacher, DDIM 50 NFE"), (ddim_2.x, "teacher, DDIM 2 NFE"),
                              (one.x, "CD student, 1 NFE"), (two.x, "CD student, 2 NFE")]):
    a.imshow(image_grid(x, nrow=4)); a.set_title(title); a.set_axis_off()
plt.suptitle(f"CIFAR-10, the same noise in every panel (teacher: {t_info['source']}, student: {s_info['source']})",
             fontsize=11)
plt.tight_layout()
plt.show()
print(f"notebook time so far: {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# **Measured, not eyeballed.** Eight pictures prove little. Chapter 7's metric does better: **FD-clf**, the Fréchet
# distance between the features of the course's CIFAR-10 classifier (`evaluator-cifar10`) on our samples and on the
# CIFAR-10 test set (lower is better; a proxy for FID, not on FID's scale). We sample the CD student at 1 and 2 NFE and
# the teacher's DDIM at 2 and 25 NFE from the same noises, all unconditional (the teacher's null class, which is what
# was distilled). The claim of this chapter is that one step of the student beats two steps of the teacher's best
# first-order solver.

# %%
if t_info["source"] == "shipped" and s_info["source"] == "shipped":
    from minilcm.evaluator import Evaluator, sampler_fd

    ev = Evaluator.load()
    n_fd = pick(fast=200, cpu=1000, gpu=2000)
    z = torch.randn(n_fd, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    g_fd = torch.Generator().manual_seed(4)  # the re-noising noise of the two-step runs, drawn batch after batch
    fd_runs = {
        "CD student, 1 NFE": lambda zb: run_sampler("cm", student, zb, sch_c, 1).x,
        "CD student, 2 NFE": lambda zb: run_sampler("cm", student, zb, sch_c, 2, generator=g_fd).x,
        "teacher DDIM, 2 NFE": lambda zb: ddim(teacher, zb, sch_c, spaced_timesteps(sch_c, 3, "lambda"),
                                               denoise_to_zero=False).x,
        "teacher DDIM, 25 NFE": lambda zb: ddim(teacher, zb, sch_c, spaced_timesteps(sch_c, 26, "lambda"),
                                                denoise_to_zero=False).x,
    }
    fd = {}
    for name, fn in fd_runs.items():
        c0 = time.perf_counter()
        fd[name] = sampler_fd(ev, fn, z, batch=250)  # FD-clf of fn's images, 250 noises at a time
        print(f"{name:<22} FD-clf {fd[name]:7.1f}   ({time.perf_counter() - c0:.1f} s for {n_fd} images)")
    assert fd["CD student, 1 NFE"] < fd["teacher DDIM, 2 NFE"], "one CD step should beat two DDIM steps"
else:
    print("FD-clf is measured on the shipped teacher and student; this run trained stand-ins, so it is skipped")
print(f"notebook time so far: {time.perf_counter() - T0:.0f} s")

# %% [markdown]
# ## Summary
#
# * A **consistency model** learns where a PF-ODE trajectory ends: $f(x_t, t) = f(x_s, s)$ along a trajectory, with
#   $f(x, t_\min) = x$ built into the parameterisation $c_\text{skip} x + c_\text{out} F$. The CM form bends to the
#   identity over a range of noise levels; the LCM form of diffusers switches within one timestep and is exact only
#   at $t = 0$.
# * The exact oracle showed the difference between the **ODE end point** (one point per trajectory) and the
#   **denoiser** $\mathbb E[x_0\mid x_t]$ (a different guess at every $t$): one-step diffusion sampling is the latter,
#   a consistency model the former.
# * **CD** distils a teacher's single ODE steps (Heun, $N = 18$) into the whole trajectory map, with an EMA target that
#   sees the online network's dropout masks. **CT** needs no teacher: the same noise at two neighbouring times is an
#   unbiased stand-in for the teacher's step; iCT's curriculum, lognormal intervals and pseudo-Huber make it work.
# * At 1–2 NFE, consistency models draw the mixture while DDIM with the *exact* eps-model returns its mean; more steps
#   of re-noising and re-applying $f$ trade compute for quality.
# * Pixel-space CD uses exactly the same code on a UNet. On the shipped CIFAR-10 pair (committed run, cpu profile,
#   1,000 images each) one student step scored FD-clf 173, two steps 166, against 499 for two DDIM steps of the
#   teacher and 168 for twenty-five: one step bought nearly the teacher's 25-step quality, two steps matched it.
#
# **Next — Chapter 5, latent consistency models:** LCM distils with the teacher's classifier-free guidance
# *inside* the ODE step (the augmented PF-ODE), feeds the guidance scale $w$ to the student, and skips $k$ timesteps
# per step — then does it all in the latent space of an autoencoder.
#
# ## Reading
#
# * Song, Dhariwal, Chen & Sutskever 2023, *Consistency Models* ([arXiv 2303.01469](https://arxiv.org/abs/2303.01469)):
#   Sec. 3 (the consistency function, Eq. 5), Sec. 4 (CD, Eq. 7, Algorithm 2), Sec. 5 (CT, Theorem 2), Algorithm 1
#   (multistep sampling), App. C (the scalings).
# * Song & Dhariwal 2023, *Improved Techniques for Training Consistency Models* ([arXiv 2310.14189](https://arxiv.org/abs/2310.14189)):
#   Sec. 3.1–3.5 (no EMA target, pseudo-Huber, the weight, the curriculum Eq. 8, lognormal intervals).
# * Karras et al. 2022, *EDM* ([arXiv 2206.00364](https://arxiv.org/abs/2206.00364)): Eq. 5 (the $\rho$ grid) and
#   Table 1 (the preconditioning the CM scalings extend).
