# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3 — Training-free acceleration: DDIM, DPM-Solver, DPM-Solver++
#
# **The road:** DDPM → the SDE / probability-flow ODE view → **DDIM and DPM-Solver** → consistency models →
# latent consistency models (LCM) → the same distillation on Stable Diffusion.
#
# Chapter 2 turned sampling into solving an ordinary differential equation, the probability-flow ODE (PF-ODE):
# start from noise at $t = 999$, integrate to $t = 0$, and every model evaluation buys one velocity.
# Sampling cost is the **number of function evaluations (NFE)**. This chapter makes that number small
# *without retraining anything*, by solving the same ODE more cleverly:
#
# 1. **DDIM** (Song et al. 2021, [arXiv 2010.02502](https://arxiv.org/abs/2010.02502)) is just an Euler step —
#    of the ODE rewritten in the right variables.
# 2. **DPM-Solver** (Lu et al. 2022, [arXiv 2206.00927](https://arxiv.org/abs/2206.00927)) solves the linear
#    part of the ODE exactly (an *exponential integrator*) and Taylor-expands only the network, in the log-SNR
#    $\lambda$: orders 1, 2, 3.
# 3. **DPM-Solver++(2M)** (Lu et al. 2022b, [arXiv 2211.01095](https://arxiv.org/abs/2211.01095)) does the same
#    with the data prediction $\hat x_0$ and reuses the previous step's evaluation: second order at one NFE per step.
#
# We *measure* everything: convergence orders on a 2-D Gaussian mixture whose exact eps-model we know (so solver
# error is separated from learning error), then quality against NFE on a CIFAR-10 UNet.
# The samplers live in `minilcm.solvers` (one function each, one signature), the measurements in `minilcm.solver_bench`.
#
# The work is sized by `MINILCM_PROFILE`: `fast` (CI, about a minute), `cpu` (a laptop, minutes), `gpu`.
#
# **Time:** about 20 minutes to read, 30 more for the five exercises; about 4 minutes to run (cpu profile, measured
# on a 2-core CPU). **Needs:** Chapter 2 (the PF-ODE, Euler and Heun, orders of convergence). Symbols:
# [the notation sheet](../docs/notation.md). Each exercise's `check` names the mistake it finds; a skipped one falls
# back to the package.

# %%
import itertools
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from minilcm.notebook import setup  # first: it silences tqdm's import-time warning
from minilcm.metrics import noise_floor
from minilcm.profiles import pick
from minilcm.recipes import cifar_teacher
from minilcm.schedules import Schedule
from minilcm.sde import pf_ode
from minilcm.solver_bench import DEFAULT_SOLVERS, FAST_SOLVER, reference_solution, rms, solver_benchmark, table
from minilcm.solvers import alpha_sigma_lam, ddim, ddim_step, dpm_solver, dpm_solver_pp, spaced_timesteps
from minilcm.toys import GaussianMixture, OracleEps
from minilcm.viz import error_vs_nfe, image_grid, scatter_2d
from minilcm.exercises import check

PROFILE = setup()  # one thread in the fast profile (CI's shared cores), warning filters, seed 0, compact figures
T0 = time.perf_counter()
schedule = Schedule("linear")

# %% [markdown]
# ## 1. DDIM is an Euler step — in the right variables
#
# With an eps-model, the PF-ODE of the VP diffusion is (Song et al. 2021, Eq. 13; Chapter 2)
#
# $$\frac{dx}{dt} = f(t)\,x + \frac{g(t)^2}{2\sigma_t}\,\epsilon_\theta(x, t),\qquad
#   f = \frac{d\log\alpha_t}{dt},\quad g^2 = \frac{d\sigma_t^2}{dt} - 2f\sigma_t^2 .$$
#
# It is *semi-linear*: a linear part $f(t)\,x$ known in closed form, plus the network's part. Divide by $\alpha_t$ and
# measure time by the noise-to-signal ratio instead:
#
# $$\bar x = \frac{x}{\alpha_t},\qquad \bar\sigma = \frac{\sigma_t}{\alpha_t} = e^{-\lambda_t}.$$
#
# Then $\frac{d\bar x}{dt} = \frac{1}{\alpha_t}\big(\frac{dx}{dt} - f x\big) = \frac{g^2}{2\sigma_t\alpha_t}\epsilon_\theta$ and
# $\frac{d\bar\sigma}{dt} = \frac{1}{\alpha_t}\big(\frac{d\sigma_t}{dt} - f\sigma_t\big)$. Since
# $\frac{g^2}{2\sigma_t} = \frac{d\sigma_t}{dt} - f\sigma_t$, the two right-hand sides differ only by $\epsilon_\theta$:
#
# $$\boxed{\ \frac{d\bar x}{d\bar\sigma} = \epsilon_\theta\big(\alpha\,\bar x,\ t(\bar\sigma)\big)\ }\qquad\text{(DDIM, Eq. 14).}$$
#
# The linear part is gone. One **Euler step** of this ODE from $t$ to $s < t$,
# $\bar x_s = \bar x_t + (\bar\sigma_s - \bar\sigma_t)\,\epsilon_\theta(x_t, t)$, multiplied back by $\alpha_s$, reads
#
# $$x_s = \alpha_s\underbrace{\frac{x_t - \sigma_t\epsilon_\theta}{\alpha_t}}_{\hat x_0} + \sigma_s\,\epsilon_\theta(x_t, t),$$
#
# which is exactly the deterministic DDIM update (Eq. 12 with $\eta = 0$).
#
# ### Exercise 3.1 (*): the DDIM step
#
# Write `my_ddim_step(schedule, x, t, s, eps)` in the $\hat x_0$ form above, for float times `t` > `s`; `s = -1`
# means clean data ($\alpha = 1$, $\sigma = 0$). *Hint:* `minilcm.diffusion.alpha_bar_at(schedule, s)` returns
# $\bar\alpha_s$ and handles $s = -1$.

# %%
from minilcm.diffusion import alpha_bar_at


def my_ddim_step(schedule, x, t, s, eps):
    # BEGIN SOLUTION
    ab_t, ab_s = alpha_bar_at(schedule, t), alpha_bar_at(schedule, s)
    x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    return ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
    # END SOLUTION


my_ddim_step = check("ddim_step", my_ddim_step)

# %% [markdown]
# And the same step as an Euler step of the ODE in $(\bar\sigma, \bar x)$, against yours:

# %%
def euler_in_sigma_bar(x_t, t, s, eps):
    """One Euler step of d(x/alpha) = eps d(sigma/alpha) from t to s (both integer timesteps here)."""
    a_t, sg_t, a_s, sg_s = schedule.alpha(t), schedule.sigma(t), schedule.alpha(s), schedule.sigma(s)
    x_bar = x_t / a_t
    x_bar = x_bar + (sg_s / a_s - sg_t / a_t) * eps
    return a_s * x_bar


x_t = torch.randn(1000, 2, dtype=torch.float64)
eps = torch.randn(1000, 2, dtype=torch.float64)
for t, s in [(999, 899), (500, 300), (40, 0)]:
    mine = euler_in_sigma_bar(x_t, t, s, eps)
    assert torch.allclose(mine, my_ddim_step(schedule, x_t, float(t), float(s), eps), atol=1e-5), (t, s)
print("Euler on d(x/alpha) = eps d(sigma/alpha)  ==  the DDIM step")

# %% [markdown]
# **Why it matters.** If the data were a single point $x^\star$, then $\epsilon_\theta = (\bar x - x^\star)/\bar\sigma$
# and the solution $\bar x(\bar\sigma) = x^\star + \bar\sigma\,\epsilon$ is a *straight line* in $(\bar\sigma, \bar x)$:
# Euler, hence DDIM, is exact in **one** step. In the original variables $(t, x)$ the same path is curved, and Euler
# in $t$ (Chapter 2's `minilcm.sde.pf_ode(method="euler")`) needs many steps. We check it on a mixture with one very
# narrow component (std $10^{-3}$), whose exact eps-model `OracleEps` we have.
#
# **Predict, then run.** How large will one DDIM step's error be on that data set, and how many Euler-in-$t$ steps
# will reach the same accuracy: 1, 10 or 100?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* One DDIM step is exact up to the component's width (error below $10^{-3}$, printed below). Euler in $t$
# is still worse than that after 10 steps; the printed errors at 1, 10 and 100 steps show how slowly it closes in.

# %%
point = GaussianMixture(means=[[1.0, -0.5]], covs=[[[1e-6, 0.0], [0.0, 1e-6]]])
point_eps = OracleEps(point, schedule)
x_T = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
exact = reference_solution(point_eps, schedule, x_T, nfe=300, denoise_to_zero=False)  # many small steps
one_ddim = ddim(point_eps, x_T, schedule, [999, 0], denoise_to_zero=False)
print(f"DDIM, {one_ddim.nfe} step:        error {rms(one_ddim.x, exact):.1e}")
euler_err = {}
for n in (1, 10, 100):
    euler_t = pf_ode(point_eps, x_T, schedule, spaced_timesteps(schedule, n + 1, "lambda"), method="euler")
    euler_err[n] = rms(euler_t.x, exact)
    print(f"Euler in t, {euler_t.nfe:3d} steps: error {euler_err[n]:.1e}")
assert rms(one_ddim.x, exact) < 1e-3 < euler_err[10]

# %% [markdown]
# ## 2. The exponential integrator behind DPM-Solver
#
# Rather than removing the linear part by a change of variables, DPM-Solver solves it exactly by variation of
# constants. Written with the half log-SNR $\lambda = \log(\alpha/\sigma)$ as the clock, the exact solution from
# $s$ to $t$ (with $h = \lambda_t - \lambda_s > 0$) is (DPM-Solver, Eq. 3.4)
#
# $$x_t = \frac{\alpha_t}{\alpha_s}\,x_s \;-\; \alpha_t\int_{\lambda_s}^{\lambda_t} e^{-\lambda}\,
#   \hat\epsilon_\theta(\hat x_\lambda, \lambda)\,d\lambda .$$
#
# **The hats.** The integral runs over $\lambda$, so everything in it is written as a function of $\lambda$: $t_\lambda(\cdot)$
# is the inverse of $\lambda_t$ (`schedule.t_of_lam`), $\hat x_\lambda = x_{t_\lambda(\lambda)}$ and
# $\hat\epsilon_\theta(\hat x_\lambda, \lambda) = \epsilon_\theta(x_{t_\lambda(\lambda)}, t_\lambda(\lambda))$: the same network, with
# $\lambda$ as its clock (the paper's notation). Below, $\epsilon_s = \epsilon_\theta(x_s, s)$; the $\hat x_0$ of later
# sections is a different hat, the model's estimate of the clean sample.
#
# Only the network's part is left to approximate, and it is weighted by a known exponential. Taylor-expand
# $\hat\epsilon_\theta$ in $\lambda$ around $\lambda_s$ and integrate every term exactly:
#
# * **order 1** ($\hat\epsilon_\theta$ constant): $\alpha_t\int_{\lambda_s}^{\lambda_t} e^{-\lambda}d\lambda = \sigma_t(e^h - 1)$, so
#   $x_t = \frac{\alpha_t}{\alpha_s}x_s - \sigma_t(e^h-1)\,\epsilon_s$ — **DDIM again** (DPM-Solver-1);
# * **order 2** (Algorithm 1): estimate the derivative from one extra evaluation at $s_1 = t_\lambda(\lambda_s + h/2)$:
#   $$u = \frac{\alpha_{s_1}}{\alpha_s}x_s - \sigma_{s_1}\big(e^{h/2} - 1\big)\epsilon_s,\qquad
#     x_t = \frac{\alpha_t}{\alpha_s}x_s - \sigma_t\big(e^h - 1\big)\epsilon_s - \sigma_t\big(e^h - 1\big)\big(\epsilon_\theta(u, s_1) - \epsilon_s\big);$$
# * **order 3** (Algorithm 2): two extra evaluations, at $s_1 = t_\lambda(\lambda_s + h/3)$ and $s_2 = t_\lambda(\lambda_s + 2h/3)$:
#   $$\begin{aligned}
#   u_1 &= \frac{\alpha_{s_1}}{\alpha_s}x_s - \sigma_{s_1}\big(e^{h/3} - 1\big)\epsilon_s, \qquad D_1 = \epsilon_\theta(u_1, s_1) - \epsilon_s,\\
#   u_2 &= \frac{\alpha_{s_2}}{\alpha_s}x_s - \sigma_{s_2}\big(e^{2h/3} - 1\big)\epsilon_s
#          - 2\sigma_{s_2}\Big(\frac{e^{2h/3} - 1}{2h/3} - 1\Big)D_1, \qquad D_2 = \epsilon_\theta(u_2, s_2) - \epsilon_s,\\
#   x_t &= \frac{\alpha_t}{\alpha_s}x_s - \sigma_t\big(e^h - 1\big)\epsilon_s - \frac{3}{2}\,\sigma_t\Big(\frac{e^h - 1}{h} - 1\Big)D_2 .
#   \end{aligned}$$
#
# (`solvers._dpm_solver_2` / `_dpm_solver_3` are these lines, with general fractions $r_1$, $r_2$ of $h$.)
#
# DPM-Solver-$k$ costs $k$ NFE per step and its global error falls like $h^k \propto \text{NFE}^{-k}$.
#
# ### Exercise 3.2 (*): the clock $\lambda_t$
#
# Write `half_log_snr(schedule, t)` $= \lambda_t = \log(\alpha_t / \sigma_t)$ for a float64 tensor `t` (fractional
# times too). It is `schedule.lam`; write it from `schedule.alpha` and `schedule.sigma`.

# %%
def half_log_snr(schedule, t):
    # BEGIN SOLUTION
    return torch.log(schedule.alpha(t) / schedule.sigma(t))
    # END SOLUTION


half_log_snr = check("half_log_snr", half_log_snr)

# %% [markdown]
# First, the closed-form weight against numerical quadrature:

# %%
lam_s, lam_t = schedule.lam(600.0).item(), schedule.lam(400.0).item()
h = lam_t - lam_s
a_t, sg_t = schedule.alpha(400.0).item(), schedule.sigma(400.0).item()
grid = torch.linspace(lam_s, lam_t, 100_001, dtype=torch.float64)
quadrature = a_t * torch.trapezoid(torch.exp(-grid), grid).item()
print(f"alpha_t * int e^-lambda dlambda: quadrature {quadrature:.10f}, "
      f"closed form sigma_t (e^h - 1) {sg_t * math.expm1(h):.10f}")
assert abs(quadrature - sg_t * math.expm1(h)) < 1e-8

# %% [markdown]
# Now one DPM-Solver-2 step written from the formula (Algorithm 1), checked against the package. The midpoint
# $s_1$ lives in $\lambda$; `schedule.t_of_lam` maps it back to a (continuous) timestep for the network.
#
# ### Exercise 3.3 (***): one DPM-Solver-2 step
#
# Write `my_dpm_solver_2_step(model, x, schedule, t, s)`, one step from `t` to `s < t` with an eps-model (here the
# course's time order $t \to s$; the paper's formula above runs $s \to t$). *Hint:*
# `alpha_sigma_lam(schedule, u)` returns $(\alpha_u, \sigma_u, \lambda_u)$ as floats at any timestep; the midpoint's
# timestep is `schedule.t_of_lam(lambda_mid).item()`; call the model as `model(x, torch.full((len(x),), u))`.

# %%
mixture = GaussianMixture()  # 8 Gaussians on a ring, 4 classes
oracle = OracleEps(mixture, schedule)  # the exact eps(x, t) = -sigma_t * score


def my_dpm_solver_2_step(model, x, schedule, t, s):
    # BEGIN SOLUTION
    (a_t, _, lam_t), (a_s, sg_s, lam_s) = alpha_sigma_lam(schedule, t), alpha_sigma_lam(schedule, s)
    h = lam_s - lam_t
    m = schedule.t_of_lam(lam_t + h / 2).item()  # the midpoint in lambda, as a timestep
    a_m, sg_m, _ = alpha_sigma_lam(schedule, m)
    eps_t = model(x, torch.full((len(x),), float(t)))
    u = a_m / a_t * x - sg_m * math.expm1(h / 2) * eps_t
    return a_s / a_t * x - sg_s * math.expm1(h) * model(u, torch.full((len(x),), m))
    # END SOLUTION


my_dpm_solver_2_step = check("dpm_solver_2_step", my_dpm_solver_2_step)

# %%
x = torch.randn(1000, 2, dtype=torch.float64)
mine = my_dpm_solver_2_step(oracle, x, schedule, 700.0, 300.0)
pkg = dpm_solver(oracle, x, schedule, [700, 300], order=2, denoise_to_zero=False)
assert pkg.nfe == 2 and torch.allclose(mine, pkg.x, atol=1e-8)
ddim_x = ddim(oracle, x, schedule, [700, 300], denoise_to_zero=False).x
dpm1_x = dpm_solver(oracle, x, schedule, [700, 300], order=1, denoise_to_zero=False).x
assert torch.allclose(ddim_x, dpm1_x, atol=1e-6)
print("the DPM-Solver-2 step == minilcm.solvers.dpm_solver(order=2);  DDIM == DPM-Solver-1")

# %% [markdown]
# **DPM-Solver++(2M).** Write the same exact solution with the data prediction
# $\hat x_0 = (x - \sigma\hat\epsilon)/\alpha$ instead (DPM-Solver++, Lu et al. 2022b):
#
# $$x_t = \frac{\sigma_t}{\sigma_s}\,x_s + \sigma_t\int_{\lambda_s}^{\lambda_t} e^{\lambda}\,\hat x_0(\hat x_\lambda, \lambda)\,d\lambda,
# \qquad\text{order 1: } x_t = \frac{\sigma_t}{\sigma_s}x_s - \alpha_t(e^{-h}-1)\,\hat x_0 \ \ (\text{DDIM once more}).$$
#
# For second order, a *multistep* method does not spend a new evaluation on a midpoint: it reuses the previous
# step's $\hat x_0$ and extrapolates linearly to the middle of the current step. With $r_i = h_{i-1}/h_i$
# (Algorithm 2),
#
# $$D_i = \Big(1 + \frac{1}{2r_i}\Big)\hat x_0^{(i-1)} - \frac{1}{2r_i}\hat x_0^{(i-2)},\qquad
#   x_{t_i} = \frac{\sigma_{t_i}}{\sigma_{t_{i-1}}}x_{t_{i-1}} - \alpha_{t_i}(e^{-h_i}-1)\,D_i .$$
#
# One NFE per step, second order. Predicting $\hat x_0$, which stays in the data range, is also what keeps large steps
# (and, in Chapter 5, classifier-free guidance) stable. `dpm_solver_pp` agrees with diffusers'
# `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")` to $10^{-5}$ (tests/test_solvers.py).
#
# ### Exercise 3.4 (***): the DPM-Solver++(2M) update
#
# Write `pp_update(schedule, x, t_prev, t_cur, t_next, x0_prev, x0_cur)`: the step from `t_cur` to `t_next` given the
# data predictions at the two latest times (`x0_cur` at `t_cur`, `x0_prev` at `t_prev`). *Hint:* with
# $h = \lambda_\text{next} - \lambda_\text{cur}$ and $r = (\lambda_\text{cur} - \lambda_\text{prev})/h$, the formula above.

# %%
def pp_update(schedule, x, t_prev, t_cur, t_next, x0_prev, x0_cur):
    # BEGIN SOLUTION
    _, sg_c, lam_c = alpha_sigma_lam(schedule, t_cur)
    a_n, sg_n, lam_n = alpha_sigma_lam(schedule, t_next)
    lam_p = alpha_sigma_lam(schedule, t_prev)[2]
    h = lam_n - lam_c
    r = (lam_c - lam_p) / h
    D = (1 + 1 / (2 * r)) * x0_cur - 1 / (2 * r) * x0_prev
    return sg_n / sg_c * x - a_n * math.expm1(-h) * D
    # END SOLUTION


pp_update = check("dpm_solver_pp_update", pp_update)

# %% [markdown]
# ## 3. Convergence orders, measured
#
# On the mixture, the oracle makes the ODE exact, so the distance to a converged solution from the same noise is pure
# solver error. We integrate from $t = 999$ to $t_{\min} = 50$ ($\sigma \approx 0.17$) in steps uniform in $\lambda$,
# without the final jump to clean data, so the measured slopes are those of the ODE solvers alone (`denoise_to_zero=False`).
# The reference is DPM-Solver-3 with many more steps. The four solvers are the benchmark's defaults,
# `minilcm.solver_bench.DEFAULT_SOLVERS`: {label: (sampler name in `minilcm.samplers`, keyword arguments)}.
#
# **Predict, then run.** At the smallest budget, 6 NFE, which is most accurate: DPM-Solver-3 (two steps of 3 NFE)
# or DPM-Solver++(2M) (six steps of 1 NFE)?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* DPM-Solver++(2M): two third-order steps across the whole $\lambda$ range are too long for the Taylor
# expansion to hold. The plot's leftmost points show it; high order pays only once the steps are short.

# %%
SOLVERS = DEFAULT_SOLVERS
print(SOLVERS)
T_MIN = 50.0
n_points = pick(fast=200, cpu=1000)
x_T = torch.randn(n_points, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
ode = dict(denoise_to_zero=False, t_min=T_MIN, spacing="lambda")
x_ref = reference_solution(oracle, schedule, x_T, nfe=600, **ode)
conv_rows = solver_benchmark(oracle, schedule, x_T, [6, 12, 24, 48, 96, 192], SOLVERS, reference=x_ref, **ode,
                             progress=True)

fig, ax = plt.subplots(figsize=(6.5, 4.5))
orders, _ = error_vs_nfe(conv_rows, ax=ax, fit_min_nfe=48,
                         title="ODE error vs NFE on the exact mixture eps-model (fit: NFE >= 48)")
ax.set_ylabel("RMS distance to the converged solution")
plt.tight_layout()
plt.show()
for name, p in orders.items():
    print(f"{name:18s} measured order {p:.2f}")
expected = {"DDIM": 1, "DPM-Solver-2": 2, "DPM-Solver-3": 3, "DPM-Solver++(2M)": 2}
for name, k in expected.items():
    assert abs(orders[name] - k) < 0.25, (name, orders[name])

# %% [markdown]
# The dashed lines are least-squares fits over NFE ≥ 48, extended to the left; their slopes are the orders 1, 2, 3
# and 2 the theory predicts. (DPM-Solver-3's slope comes out a little under 3 with many points: the RMS error is dominated by the few
# trajectories that pass between two blobs, and those reach the asymptotic regime last; the median error already
# falls like $\text{NFE}^{-3}$.) Two more things to read off the plot:
#
# * **High order is not free at small NFE.** With 6 NFE, DPM-Solver-3 takes only two steps, each spanning half
#   the $\lambda$ range; its Taylor expansion is then poor. DPM-Solver++(2M) takes six steps for the same budget and is
#   the most accurate there.
# * Why stop at $t_{\min} = 50$? Integrating on to $t = 0$ gives the same orders, but the stretch $\lambda \in [1.7, 4.6]$
#   where the blobs sharpen lengthens the pre-asymptotic range at small NFE; stopping earlier gives clean slopes with
#   fewer steps (tests/test_solvers.py measures the orders the same way).
#
# ## 4. Sampling the mixture: error, distance to data, and the choice of timesteps
#
# Now the real use: from noise at $t = 999$ all the way to clean data, with the last step to $\bar\alpha = 1$ that
# diffusers takes (`denoise_to_zero=True`, the default: the sampler returns the model's $\hat x_0$ at its last
# timestep). `solver_benchmark` reports the error to the converged solution and the sliced Wasserstein distance
# to fresh data samples. Where the timesteps sit matters as much as the solver, so we compare three spacings:
# uniform in $\lambda$, uniform in time ("linspace") and diffusers' "trailing" grid.
#
# ### Exercise 3.5 (**): a grid uniform in $\lambda$
#
# Write `my_lambda_grid(schedule, n)`: `n` float64 times from $T - 1 = 999$ down to 0, evenly spaced in $\lambda$
# (`spaced_timesteps(schedule, n, "lambda")` is the package's). *Hint:* `torch.linspace` between $\lambda_{999}$ and
# $\lambda_0$, then `schedule.t_of_lam`; pin the two ends to exactly 999 and 0.

# %%
def my_lambda_grid(schedule, n):
    # BEGIN SOLUTION
    lam = torch.linspace(schedule.lam(999.0).item(), schedule.lam(0.0).item(), n, dtype=torch.float64)
    ts = schedule.t_of_lam(lam).double()
    ts[0], ts[-1] = 999.0, 0.0
    return ts
    # END SOLUTION


my_lambda_grid = check("lambda_grid", my_lambda_grid)

# %%
n_data = pick(fast=300, cpu=2000)
g = torch.Generator().manual_seed(2)
x_T = torch.randn(n_data, 2, generator=g)
data = mixture.sample(n_data, g)[0]
floor = float(np.mean([noise_floor(mixture, n_data, seed=s) for s in range(8)]))  # two data draws, 8 tries
NFES = [5, 10, 20, 50]
bench = {}
for spacing in ("lambda", "linspace", "trailing"):
    ref = reference_solution(oracle, schedule, x_T, nfe=pick(fast=200, cpu=1000), spacing=spacing)
    solvers = {**SOLVERS, **FAST_SOLVER} if spacing == "lambda" else SOLVERS  # fast brings its own lambda grid
    bench[spacing] = solver_benchmark(oracle, schedule, x_T, NFES, solvers, reference=ref, data=data,
                                      spacing=spacing, keep_samples=True)
print(f"uniform-in-lambda timesteps   (sliced W2 noise floor for {n_data} points: {floor:.3f})")
print(table(bench["lambda"]))

# %%
fig, axes = plt.subplots(2, 2, figsize=(11, 8))
for ax, spacing in zip(axes.flat, bench):
    error_vs_nfe(bench[spacing], ax=ax, title=f"error to the converged solution, {spacing} spacing")
    ax.set_ylabel("RMS distance")
error_vs_nfe(bench["lambda"], key="dist_data", ax=axes[1, 1], title="distance to data, lambda spacing")
axes[1, 1].axhline(floor, color="k", ls=":", label=f"noise floor, {n_data} points")
axes[1, 1].set_ylabel("sliced Wasserstein-2")
axes[1, 1].legend(fontsize=8)
plt.tight_layout()
plt.show()

err = {sp: {(r.solver, r.nfe): r.err_ref for r in rows} for sp, rows in bench.items()}
for sp in bench:
    print(f"{sp:9s} at 10 NFE:  DDIM {err[sp]['DDIM', 10]:.3f}   DPM-Solver++(2M) {err[sp]['DPM-Solver++(2M)', 10]:.3f}")
small = {r.solver: r for r in bench["lambda"] if r.nfe <= 5}  # the smallest budget, 5 NFE
print("lambda, budget 5:", "   ".join(f"{k} {r.err_ref:.3f} ({r.nfe} NFE)" for k, r in small.items()))
assert err["lambda"]["DPM-Solver++(2M)", 10] < err["lambda"]["DDIM", 10]
assert small["DPM-Solver-fast"].err_ref < small["DPM-Solver-3"].err_ref  # the order allocation, not the order

# %% [markdown]
# With steps uniform in $\lambda$ — DPM-Solver's recommendation for small images — DPM-Solver++(2M) at 10 NFE is
# clearly closer to the converged solution than DDIM at 10 NFE, and the gap widens with NFE. Diffusers' "trailing"
# grid gives the same ordering with a smaller gap. The spacing is a choice *per solver*: DDIM itself is a little better
# on the time grids (0.109 linspace, 0.097 trailing, against 0.126 in $\lambda$); $\lambda$ spacing is what the
# multistep solver needs. With steps uniform in *time* the picture flips: $\lambda$ moves
# fastest near $t = 0$, so the last time-uniform steps are huge in $\lambda$ while the ones before are small; the
# multistep extrapolation then runs across very unequal steps ($r_i \ll 1$ amplifies the difference of the last two
# $\hat x_0$) and DPM-Solver++(2M) is *worse* than DDIM at every budget shown. The singlestep solvers at 4-5 NFE (one
# or two steps across the whole range) are worse than DDIM in every spacing. DPM-Solver-fast (the $\lambda$ row only: it
# brings its own grid) spends the 5 NFE on an order-3 and an order-2 step: 1.291, against 32.4 for DPM-Solver-3's one
# order-3 step (4 NFE), but still above DDIM's 0.345 and DPM-Solver++(2M)'s 0.151 — two steps are too few here for any
# singlestep solver.
#
# The distance to the *data* (bottom right) saturates quickly: once the error to the converged solution is below the
# spread of the sampled points, the sliced Wasserstein distance flattens out at the level set by sampling noise
# (dotted: the average distance between two independent data draws of the same size; single draws scatter around it
# by about ±40%). What does 10 NFE look like?

# %%
rows10 = {r.solver: r for r in bench["lambda"] if r.nfe in (9, 10)}
fig, axes = plt.subplots(1, 4, figsize=(16, 4))
for ax, name in zip(axes, ["DDIM", "DPM-Solver-2", "DPM-Solver-3", "DPM-Solver++(2M)"]):
    r = rows10[name]
    scatter_2d(r.x[:1000], ax=ax, log_prob=mixture.log_prob, s=3,
               title=f"{name}, {r.nfe} NFE\nsliced W2 {r.dist_data:.3f} (floor {floor:.3f})")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. CIFAR-10: the same solvers on an image model
#
# The teacher is the Chapter 1 recipe, `minilcm.recipes.cifar_teacher()`: the shipped `ddpm-cifar10` (a 1.1M-parameter
# UNet trained on the CPU: blurry CIFAR-like scenes), or a briefly trained stand-in when it is missing. Image quality
# does not matter for this chapter's question: every solver integrates the *same* ODE of *this* network, and we measure
# how close each gets to the converged solution from the same noise. How good the *images* are at each NFE, measured
# with an image metric on 1,000 samples, is Chapter 7's benchmark (`minilcm bench`).

# %%
teacher, info = cifar_teacher(progress=False)  # resumes runs/cifar-ddpm-<size>-<steps> if an earlier run left it
print("teacher:", info["source"], {k: info[k] for k in ("size", "steps") if k in info})
n_img = pick(fast=4, cpu=8)
x_T = torch.randn(n_img, 3, 32, 32, generator=torch.Generator().manual_seed(0))
ref_nfe = pick(fast=150, cpu=1000)
t = time.perf_counter()
x_ref = reference_solution(teacher, schedule, x_T, nfe=ref_nfe)
print(f"reference: DPM-Solver-3 with {ref_nfe} NFE, {time.perf_counter() - t:.1f} s")
CIFAR_NFES = pick(fast=[5, 10, 20], cpu=[5, 10, 20, 50])
CIFAR_SOLVERS = {**SOLVERS, **FAST_SOLVER}  # the four, and the paper's order allocation for a small budget
img_rows = solver_benchmark(teacher, schedule, x_T, CIFAR_NFES, CIFAR_SOLVERS, reference=x_ref, keep_samples=True,
                            image_metric=None, progress=True)
print(table(img_rows))

# %% [markdown]
# The reference is a third-order solver (DPM-Solver-3; 1000 NFE = 333 steps in the cpu profile) rather than 1000
# DDIM steps: DDIM's own $O(1/1000)$ error would be larger than DPM-Solver++'s error at 50 NFE and hide it. Samples,
# one row per solver, one column per NFE budget, the reference on the right (the first four of each batch):

# %%
by = dict(zip(itertools.product(CIFAR_SOLVERS, CIFAR_NFES), img_rows))  # (solver, NFE budget) -> row, in run order
fig, axes = plt.subplots(len(CIFAR_SOLVERS), len(CIFAR_NFES) + 1,
                         figsize=(2.1 * (len(CIFAR_NFES) + 1), 2.3 * len(CIFAR_SOLVERS)),
                         dpi=50)  # a low resolution keeps this figure (five solvers) small on disk
for i, name in enumerate(CIFAR_SOLVERS):
    for j, budget in enumerate(CIFAR_NFES):
        r = by[name, budget]
        axes[i, j].imshow(image_grid(r.x[:4], nrow=2), interpolation="nearest")
        axes[i, j].set_title(f"{r.nfe} NFE, err {r.err_ref:.2f}", fontsize=9)
    axes[i, -1].imshow(image_grid(x_ref[:4], nrow=2), interpolation="nearest")
    axes[i, -1].set_title(f"reference ({ref_nfe} NFE)", fontsize=9)
    axes[i, 0].set_ylabel(name, fontsize=10)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.suptitle(f"CIFAR-10 teacher ({info['source']})", fontsize=11)
plt.tight_layout()
plt.show()

# %%
fig, ax = plt.subplots(figsize=(6, 4.2))
error_vs_nfe(img_rows, ax=ax, title="CIFAR-10 teacher: distance to the converged sample")
ax.set_ylabel("RMS distance per pixel")
plt.tight_layout()
plt.show()

cerr = {(r.solver, r.nfe): r.err_ref for r in img_rows}
print(f"at 10 NFE: DDIM {cerr['DDIM', 10]:.3f}, DPM-Solver++(2M) {cerr['DPM-Solver++(2M)', 10]:.3f}")
at5 = {name: by[name, 5] for name in CIFAR_SOLVERS}
print("budget 5:", "   ".join(f"{k} {r.err_ref:.3f} ({r.nfe} NFE)" for k, r in at5.items()))
assert cerr["DPM-Solver++(2M)", 10] < cerr["DDIM", 10]
assert at5["DPM-Solver-fast"].err_ref < at5["DPM-Solver-3"].err_ref  # a usage error of the fixed order, not the method
assert all(budget - 2 <= r.nfe <= budget for (_, budget), r in by.items())  # each run spends its budget
again = dpm_solver_pp(teacher, x_T, schedule, spaced_timesteps(schedule, 10, "lambda"))
assert again.nfe == 10 and torch.equal(again.x, by["DPM-Solver++(2M)", 10].x)  # deterministic

# %% [markdown]
# On the image model the ordering at 10 NFE and beyond is the one the papers report: DPM-Solver++(2M) is closer to
# the converged sample than DDIM, and at 5 NFE too (0.127 against DDIM's 0.250). The singlestep DPM-Solvers at one
# fixed order are far off at 4-5 NFE, where they take one or two giant steps, and overtake DDIM only with 10-50 NFE.
# That is mostly a usage error: the paper's DPM-Solver-fast row (`minilcm.solvers.dpm_solver_fast`) spends the same
# 5 NFE on an order-3 and an order-2 step and gets 0.635, against 15.7 for DPM-Solver-3's single order-3 step. It
# still trails DDIM (0.250) and DPM-Solver++(2M) (0.127) at this budget: the multistep solver gets five steps out of
# five evaluations. The fixed-order rows stay as that lesson.
#
# Does the reparameterisation itself help on images? Compare DDIM with Euler in the original time (Chapter 2's
# `pf_ode(method="euler")`), both first order, same 10 NFE, integrating to $t = 0$:

# %%
ts10 = spaced_timesteps(schedule, 11, "lambda")
ref0 = reference_solution(teacher, schedule, x_T, nfe=pick(fast=60, cpu=600), denoise_to_zero=False)
e_euler = rms(pf_ode(teacher, x_T, schedule, ts10, method="euler").x, ref0)
e_ddim = rms(ddim(teacher, x_T, schedule, ts10, denoise_to_zero=False).x, ref0)
print(f"10 NFE to t = 0:  Euler in t {e_euler:.3f}   DDIM (Euler in sigma/alpha) {e_ddim:.3f}")
assert e_ddim < e_euler

# %% [markdown]
# Same order, several times smaller error. The reparameterisation is not magic, though: on the 2-D mixture it is the
# other way round — Euler in $t$ is somewhat *more* accurate than DDIM at equal NFE (try it). Presumably because there
# the data prediction $\hat x_0$ changes a lot along each path as points pick their blob; the change of variables
# pays off when $\hat x_0$ moves slowly, as for this image model, and fully when it does not move at all (the single
# point of section 1).

# %%
print(f"notebook time: {time.perf_counter() - T0:.0f} s (profile {PROFILE})")

# %% [markdown]
# ## Summary
#
# * **DDIM is the Euler method** applied to the PF-ODE rewritten as $d(x/\alpha) = \epsilon_\theta\, d(\sigma/\alpha)$; the
#   linear part of the ODE disappears, and for a single data point the path is straight and one step is exact.
# * **DPM-Solver** keeps that exactness (an exponential integrator in $\lambda$) and Taylor-expands only the network:
#   order 1 is DDIM, orders 2 and 3 cost 2 and 3 NFE per step. We measured the orders 1, 2, 3 on the exact
#   mixture ODE, and 2 for **DPM-Solver++(2M)**, which reuses the previous $\hat x_0$ to reach second order at one
#   NFE per step.
# * **At small NFE the multistep solver wins:** DPM-Solver++(2M) at 10 NFE is closer to the converged solution than
#   DDIM at 10 NFE, on the mixture and on the CIFAR-10 teacher. High singlestep orders need enough steps, and
#   timesteps uniform in $\lambda$ beat timesteps uniform in time.
# * All of this is training-free and stops around 10-20 NFE. To go to 1-4 steps we must *train* a model to jump
#   along the ODE: consistency models, Chapter 4.
#
# ## Reading
#
# * Song, Meng & Ermon 2021, *DDIM* ([arXiv 2010.02502](https://arxiv.org/abs/2010.02502)): Sec. 4.1 (Eq. 12, the
#   update) and Sec. 4.3 (Eq. 14, DDIM as an ODE in $\sigma/\alpha$).
# * Lu et al. 2022, *DPM-Solver* ([arXiv 2206.00927](https://arxiv.org/abs/2206.00927)): Sec. 3.1–3.3 (the exact
#   solution, Eq. 3.4; Algorithms 1–2) and Sec. 3.4 / App. D (DPM-Solver-fast's order allocation).
# * Lu et al. 2022b, *DPM-Solver++* ([arXiv 2211.01095](https://arxiv.org/abs/2211.01095)): Sec. 4 (the data-prediction
#   form) and Algorithm 2 (the 2M multistep update).
