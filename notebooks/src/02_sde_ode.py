# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2 — The SDE and probability-flow ODE view
#
# **The road:** DDPM → **the SDE / probability-flow ODE view** → DDIM and DPM-Solver → consistency models → latent
# consistency models (LCM) → the same distillation on Stable Diffusion.
#
# Chapter 1 sampled with 1000 small noisy steps. This chapter takes the step size to zero
# (Song et al. 2021, *Score-Based Generative Modeling through Stochastic Differential Equations*,
# [arXiv 2011.13456](https://arxiv.org/abs/2011.13456)). The 1000-step chain becomes a **stochastic differential
# equation**, and next to it stands an **ordinary** differential equation — the *probability-flow ODE* — with the
# same marginals and no randomness at all. That ODE is what every later chapter accelerates: DDIM and DPM-Solver
# solve it in few steps (Chapter 3), consistency models learn to jump to its end point in one (Chapters 4–5).
#
# You will
#
# 1. write DDPM's forward chain as the VP-SDE and check that its moments reproduce $\bar\alpha_t$ exactly;
# 2. run the reverse SDE and the PF-ODE from the same noise — stochastic paths next to deterministic ones;
# 3. look at the PF-ODE's vector field, and *measure* that Euler is a first-order and Heun a second-order solver;
# 4. run the ODE backwards, data → noise, and back again;
# 5. separate **solver error** from **learning error** with an *oracle* model (the exact score of a Gaussian mixture);
# 6. on CIFAR-10: the same noise gives the same image, and noises can be interpolated.
#
# The work is sized by `MINILCM_PROFILE`: `fast` (CI, seconds), `cpu` (a laptop, minutes) or `gpu`.
#
# **Time:** about 20 minutes to read, 20 more for the five exercises; about 1–2 minutes to run (cpu profile, measured
# on a 2-core CPU). **Needs:** Chapter 1 (the forward process, and $\epsilon \leftrightarrow$ score). Symbols:
# [the notation sheet](../docs/notation.md). Each exercise is checked by `minilcm.exercises.check`, which names the
# mistake it finds; a skipped one falls back to the package.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch

from minilcm.notebook import setup  # first: it silences tqdm's import-time warning
from minilcm.diffusion import DenoisingLoss, q_sample
from minilcm.metrics import noise_floor, sliced_wasserstein
from minilcm.models import MLPDenoiser
from minilcm.profiles import pick
from minilcm.schedules import Schedule
from minilcm.sde import (diffusion_coef, drift_coef, euler_step, forward_sde, heun_step, pf_ode, pf_ode_encode,
                         pf_ode_rk4, pf_ode_velocity, reverse_sde)
from minilcm.toys import GaussianMixture, OracleEps
from minilcm.train import TrainConfig, train
from minilcm.viz import density_contours, scatter_2d, show_images, trajectories
from minilcm.exercises import check
from minilcm.schedules import broadcast

# Every tensor here is small (2-D points, a few 32x32 images): one thread avoids the threading overhead, which on a
# busy machine can make such small operations 50x slower.
PROFILE = setup(threads=1)  # also: warning filters, seed 0, compact figures
T0 = time.perf_counter()

# %% [markdown]
# ## 1. From 1000 steps to continuous time: the VP-SDE
#
# One DDPM step is $x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,z$. For small $\beta_t$,
# $\sqrt{1-\beta_t} \approx 1 - \tfrac12\beta_t$, so the *increment* over one unit of time is
#
# $$x_t - x_{t-1} \approx -\tfrac12 \beta_t\, x_{t-1}\cdot 1 + \sqrt{\beta_t}\,\sqrt{1}\,z .$$
#
# Let the step shrink and this is the **variance-preserving SDE** (Song et al. 2021, Eq. 11), with drift $f(t)\,x$ and diffusion $g(t)$:
#
# $$dx = \underbrace{-\tfrac12\beta(t)}_{f(t)}\,x\,dt + \underbrace{\sqrt{\beta(t)}}_{g(t)}\,dw .$$
#
# Song et al. (2021) write this SDE on $t' \in [0, 1]$ with $\beta(t') = \beta_\min + t'(\beta_\max - \beta_\min)$,
# $\beta_\min = 0.1$, $\beta_\max = 20$: that is DDPM's linear schedule with $N = 1000$ steps, since
# $N\beta_1 = 1000 \cdot 10^{-4} = 0.1$ and $N\beta_N = 1000 \cdot 0.02 = 20$, and $t' = t/N$ (so a rate per unit of our
# $t$ is theirs divided by 1000).
# We keep the diffusers-style time $t \in [0, 999]$ and define the continuous rate by $\beta(t) = -\frac{d}{dt}\log\bar\alpha(t)$,
# where $\log\bar\alpha(t)$ is a smooth (cubic-spline) curve through the 1000 discrete values. Then, exactly,
#
# $$\int_{t-1}^{t}\beta(s)\,ds = \log\bar\alpha_{t-1} - \log\bar\alpha_t = -\log(1-\beta_t) \approx \beta_t .$$
#
# $\beta(t)$ is piecewise quadratic (the derivative of a cubic), so Simpson's rule computes that integral exactly — a check
# that the continuous SDE *is* the discrete schedule:

# %%
schedule = Schedule("linear")
t = torch.arange(1, schedule.T, dtype=torch.float64)
simpson = (schedule.beta(t - 1) + 4 * schedule.beta(t - 0.5) + schedule.beta(t)) / 6  # int_{t-1}^{t} beta(s) ds
log_ab = schedule.alphas_cumprod.double().log()
print(f"max relative gap to log alpha_bar_(t-1) - log alpha_bar_t: {((simpson - (log_ab[:-1] - log_ab[1:])) / simpson).abs().max():.1e}")
assert torch.allclose(simpson, log_ab[:-1] - log_ab[1:], rtol=1e-9, atol=0)
assert torch.allclose(drift_coef(schedule, t), -0.5 * schedule.beta(t)) and torch.allclose(diffusion_coef(schedule, t) ** 2, schedule.beta(t))

fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
tc = torch.linspace(0, 999, 2000, dtype=torch.float64)
ax[0].plot(tc, schedule.beta(tc), label=r"continuous $\beta(t)$")
ax[0].plot(torch.arange(0, 1000, 50), schedule.betas[::50], "o", ms=4, label=r"DDPM's $\beta_t$ (every 50th)")
ax[0].set_xlabel("t"); ax[0].set_title("the rate of the VP-SDE"); ax[0].legend()
ax[1].plot(tc, schedule.alpha(tc), label=r"$\alpha_t$ (signal)")
ax[1].plot(tc, schedule.sigma(tc), label=r"$\sigma_t$ (noise)")
ax[1].set_xlabel("t"); ax[1].set_title(r"$\alpha_t^2 + \sigma_t^2 = 1$"); ax[1].legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# ### Exercise 2.1 (*): the VP-SDE's drift
#
# Write `vp_drift(schedule, x, t)` $= f(t)\,x = -\tfrac12\beta(t)\,x$ for per-row times `t` of shape `(B,)`.
# *Hint:* `schedule.beta(t)` is the continuous rate plotted above; broadcast it over `x` and keep `x`'s dtype.

# %%
def vp_drift(schedule, x, t):
    # BEGIN SOLUTION
    return -0.5 * broadcast(schedule.beta(t), x).to(x) * x
    # END SOLUTION


vp_drift = check("vp_drift", vp_drift)

# %% [markdown]
# **The SDE's marginals are DDPM's.** Take the mean $m$ and variance $v$ of $x_t$ given $x_0$. Itô's formula for a
# linear SDE gives $\dot m = f m$ and $\dot v = 2 f v + g^2$ (Särkkä & Solin 2019, Eq. 5.51), so with $f = -\beta/2$, $g^2 = \beta$:
#
# $$m_t = m_0\, e^{-\frac12\int_0^t \beta} = \frac{\alpha_t}{\alpha_0}\, m_0 ,\qquad 1 - v_t = (1 - v_0)\, e^{-\int_0^t\beta} = (1-v_0)\frac{\bar\alpha_t}{\bar\alpha_0}.$$
#
# Starting from $q(x_0 \mid \text{data}) = \mathcal N(\alpha_0 x_{\rm data}, \sigma_0^2 I)$ this is exactly
# $q(x_t\mid x_{\rm data}) = \mathcal N(\alpha_t x_{\rm data}, \sigma_t^2 I)$. Let us *simulate* the SDE with Euler–Maruyama,
# $x_{t+h} = x_t + f(t)\,x_t\,h + g(t)\sqrt h\,z$ (`minilcm.sde.forward_sde`), on the 8-blob Gaussian mixture of Chapter 1, and
# lay the particles over the exact marginal density $p_t$ — which for a mixture is known in closed form at every $t$:

# %%
mixture = GaussianMixture()
n = pick(fast=2000, cpu=4000)
g = torch.Generator().manual_seed(0)
x_data, labels = mixture.sample(n, g)
x_start = q_sample(schedule, x_data.double(), torch.zeros(n), torch.randn(n, 2, generator=g, dtype=torch.float64))
grid = torch.linspace(0, 999, pick(fast=501, cpu=1001), dtype=torch.float64)
fwd = forward_sde(x_start, schedule, grid, generator=g, return_trajectory=True)
floor = noise_floor(mixture, n)  # two independent data draws of this size: the distance "zero" looks like this

def density_lines(ax, t, lim=3.0, n_grid=150):
    """Contour lines of the exact marginal density p_t of the mixture (drawn over the points)."""
    gl = torch.linspace(-lim, lim, n_grid, dtype=torch.float64)
    GX, GY = torch.meshgrid(gl, gl, indexing="xy")
    xy = torch.stack([GX.flatten(), GY.flatten()], 1)
    dens = mixture.log_prob(xy, torch.full((len(xy),), float(t), dtype=torch.float64), schedule).exp()
    ax.contour(GX.numpy(), GY.numpy(), dens.reshape(n_grid, n_grid).numpy(), levels=6, colors="k", linewidths=0.6)


show_t = [0, 50, 100, 200, 400, 999]
fig, axes = plt.subplots(1, len(show_t), figsize=(2.6 * len(show_t), 2.9))
print(f"noise floor of the sliced Wasserstein distance at n = {n}: {floor:.3f}")
for ax, ts in zip(axes, show_t):
    i = int(torch.argmin((grid - ts).abs()))
    tt = torch.full((n,), float(grid[i]), dtype=torch.float64)
    exact = q_sample(schedule, mixture.sample(n, g)[0].double(), tt, torch.randn(n, 2, generator=g, dtype=torch.float64))
    d = sliced_wasserstein(fwd.trajectory[i], exact)
    scatter_2d(fwd.trajectory[i][:800], ax=ax, labels=labels[:800], s=2, title=f"t = {grid[i]:.0f}   SW {d:.3f}")
    density_lines(ax, grid[i])
    assert d < 2 * floor, (ts, d)
plt.suptitle("forward SDE particles (800 shown, coloured by class) and the exact density $p_t$ (lines); "
             "SW = sliced Wasserstein distance to exact samples of $p_t$", y=1.0, fontsize=10)
plt.tight_layout(); plt.show()

# %% [markdown]
# The particles forget their class (colours mix) and their blobs, and at $t = 999$ they are a standard normal. At every
# $t$ their distance to exact samples of $p_t$ is at the data-vs-data noise floor.
#
# ## 2. Running time backwards: the reverse SDE and the probability-flow ODE
#
# **Reverse SDE.** Anderson (1982) showed that the forward SDE run backwards is again an SDE, whose drift needs the
# *score* $\nabla_x \log p_t(x)$ (Song et al. 2021, Eq. 6):
#
# $$dx = \big[f(t)\,x - g(t)^2\,\nabla_x\log p_t(x)\big]dt + g(t)\,d\bar w \qquad (t \text{ decreasing}).$$
#
# **Probability-flow ODE.** The density of the forward SDE obeys the Fokker–Planck equation, which can be rewritten as a pure transport equation:
#
# $$\partial_t p_t = -\nabla\!\cdot\!\big(f x\, p_t\big) + \tfrac12 g^2 \Delta p_t
#   = -\nabla\!\cdot\!\Big(\big[f x - \tfrac12 g^2 \nabla\log p_t\big]\, p_t\Big),$$
#
# using $\Delta p = \nabla\!\cdot\!(p\,\nabla\log p)$. The right-hand side is the continuity equation of particles moving
# *deterministically* with velocity $f x - \tfrac12 g^2 \nabla\log p_t$. So the ODE (Song et al. 2021, Eq. 13)
#
# $$\frac{dx}{dt} = f(t)\,x - \tfrac12 g(t)^2\,\nabla_x\log p_t(x) = -\tfrac12\beta(t)\Big(x - \frac{\epsilon(x,t)}{\sigma_t}\Big)$$
#
# has **the same marginals $p_t$** as the SDE. The last form uses Chapter 1's $\nabla\log p_t = -\epsilon/\sigma_t$: any
# eps-model plugs in. Here the model is the **oracle** `OracleEps`: the mixture's exact $\epsilon$, so whatever error
# we see below belongs to the *solver*. First, our own velocity, from the score form, against the package:
#
# ### Exercise 2.2 (**): the PF-ODE's velocity from a predicted noise
#
# Write `velocity(schedule, x, t, eps)` $= -\tfrac12\beta(t)\,(x - \epsilon/\sigma_t)$, the last form above, for
# per-row `t`. *Hint:* the ODE takes *half* of the reverse SDE's score term; the score is $-\epsilon/\sigma_t$.

# %%
oracle = OracleEps(mixture, schedule)


def my_velocity(x, t):
    """Song et al. Eq. 13 with the exact score: f(t) x - 1/2 g(t)^2 grad log p_t(x)."""
    beta = schedule.beta(torch.tensor(t, dtype=torch.float64))
    return -0.5 * beta * x - 0.5 * beta * mixture.score(x, torch.full((len(x),), t, dtype=torch.float64), schedule)


x_probe = torch.randn(256, 2, dtype=torch.float64)
for t_probe in (999.0, 400.5, 20.25, 0.0):
    assert torch.allclose(my_velocity(x_probe, t_probe), pf_ode_velocity(oracle, x_probe, schedule, t_probe), rtol=1e-5, atol=1e-10)
print("pf_ode_velocity == f x - 1/2 g^2 score  at t = 999, 400.5, 20.25, 0")


# %%
def velocity(schedule, x, t, eps):
    # BEGIN SOLUTION
    beta, sigma = broadcast(schedule.beta(t), x).to(x), broadcast(schedule.sigma(t), x).to(x)
    return -0.5 * beta * (x - eps / sigma)
    # END SOLUTION


velocity = check("pf_ode_velocity", velocity)

# %% [markdown]
# **Predict, then run.** The next cell starts the reverse SDE and the PF-ODE from the *same* noise $x_{999}$. Will each
# pair of paths end at the same point? And will the two *sets* of end points look alike?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* Not the same points: the SDE adds fresh noise at every step, so its paths wander into blobs of their own
# choosing (the right panel shows five pairs apart), while the ODE's are smooth. But both sets are samples of the same
# mixture: their sliced Wasserstein distances to the data are both near the noise floor, printed below.

# %% [markdown]
# Now both samplers from **the same starting noise** $x_{999} \sim \mathcal N(0, I)$. The reverse SDE uses Euler–Maruyama;
# the ODE uses Heun's method (next section). Both step uniformly in the log-SNR $\lambda_t = \log(\alpha_t/\sigma_t)$ —
# `schedule.timesteps(n, "lambda")` — which section 4 justifies.

# %%
n_sde, n_ode = pick(fast=200, cpu=500), pick(fast=25, cpu=50)
x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
t0 = time.perf_counter()
sde = reverse_sde(oracle, x_T, schedule, schedule.timesteps(n_sde + 1, "lambda"), generator=torch.Generator().manual_seed(2),
                  return_trajectory=True)
ode = pf_ode(oracle, x_T, schedule, schedule.timesteps(n_ode + 1, "lambda"), method="heun", return_trajectory=True)
print(f"reverse SDE: {n_sde} steps, NFE {sde.nfe};  PF-ODE (Heun): {n_ode} steps, NFE {ode.nfe};  {time.perf_counter() - t0:.1f} s")
d_sde, d_ode = sliced_wasserstein(sde.x, x_data), sliced_wasserstein(ode.x, x_data)
print(f"sliced Wasserstein to the data: reverse SDE {d_sde:.3f}, PF-ODE {d_ode:.3f}, noise floor {floor:.3f}")

lp = lambda x: mixture.log_prob(x)  # noqa: E731
fig, axes = plt.subplots(1, 3, figsize=(14, 4.3))
for ax, run, color, title in ((axes[0], sde, "C0", f"reverse SDE paths ({sde.nfe} NFE)"),
                              (axes[1], ode, "C2", f"PF-ODE paths (Heun, {ode.nfe} NFE)")):
    density_contours(ax, lp)
    trajectories(run.trajectory, ax=ax, n=10, color=color, title=title)
    ax.legend(loc="lower right", fontsize=8)
ts_sde, ts_ode = schedule.timesteps(n_sde + 1, "lambda"), schedule.timesteps(n_ode + 1, "lambda")
for k in range(5):
    axes[2].plot(ts_sde, torch.stack(sde.trajectory)[:, k, 0], color=f"C{k}", lw=0.6, alpha=0.6)
    axes[2].plot(ts_ode, torch.stack(ode.trajectory)[:, k, 0], color=f"C{k}", lw=2)
axes[2].invert_xaxis(); axes[2].set_xlabel("t (runs from 999 down to 0)"); axes[2].set_ylabel("first coordinate")
axes[2].set_title("5 starting points: SDE (thin) vs ODE (thick)")
plt.tight_layout(); plt.show()

# %% [markdown]
# Same start, different journeys: the SDE paths jitter (fresh noise at every step) and end up in blobs of their own
# choosing, while the ODE paths are smooth curves. Yet both *end distributions* are the mixture, which is what the
# asserts below check. The ODE is also **deterministic**: run it twice, get the same bits; run the SDE with another seed,
# get another sample.

# %%
m_true, cov_true = mixture.mean_cov()
for name, x in (("reverse SDE", sde.x), ("PF-ODE", ode.x)):
    print(f"{name:12s} mean {x.mean(0).numpy().round(3)}  cov {torch.cov(x.T).numpy().round(3).tolist()}")
    assert (x.mean(0) - m_true).abs().max() < 0.1 and (torch.cov(x.T) - cov_true).abs().max() < 0.1
assert d_sde < 2 * floor and d_ode < 2 * floor
ts20 = schedule.timesteps(21, "lambda")
assert torch.equal(pf_ode(oracle, x_T[:64], schedule, ts20).x, pf_ode(oracle, x_T[:64], schedule, ts20).x)
sde_a = reverse_sde(oracle, x_T[:64], schedule, ts20, generator=torch.Generator().manual_seed(3)).x
sde_b = reverse_sde(oracle, x_T[:64], schedule, ts20, generator=torch.Generator().manual_seed(4)).x
print(f"two SDE runs from the same noise differ by up to {(sde_a - sde_b).abs().max():.2f}; two ODE runs by 0")
assert (sde_a - sde_b).abs().max() > 0.1

# %% [markdown]
# ## 3. The PF-ODE's vector field
#
# The ODE is a time-dependent vector field. Plotting it per unit of time is misleading ($\beta(t)$ ranges over a factor
# of 200), so the arrows below show $dx/d\lambda$, the displacement per unit of log-SNR: since
# $d\lambda/dt = -\beta(t)/(2\sigma_t^2)$, it is $dx/d\lambda = \sigma_t^2\,(x - \epsilon/\sigma_t)$ — the field that carries $p_t$ towards the data as $\lambda$ grows.
# Shading is the density $p_t$.

# %%
field_t = [999.0, 300.0, 200.0, 120.0, 60.0, 20.0]
gx = torch.linspace(-2.7, 2.7, 19, dtype=torch.float64)
X, Y = torch.meshgrid(gx, gx, indexing="xy")
pts = torch.stack([X.flatten(), Y.flatten()], 1)
fig, axes = plt.subplots(1, len(field_t), figsize=(2.6 * len(field_t), 2.9))
for ax, tf in zip(axes, field_t):
    tt = torch.tensor(tf, dtype=torch.float64)
    dxdt = pf_ode_velocity(oracle, pts, schedule, tf)
    dxdlam = dxdt / (-schedule.beta(tt) / (2 * schedule.sigma(tt) ** 2))  # chain rule: dx/dlam = (dx/dt) / (dlam/dt)
    density_contours(ax, lambda x: mixture.log_prob(x, tt.expand(len(x)), schedule), lim=3.0)
    ax.quiver(pts[:, 0], pts[:, 1], dxdlam[:, 0], dxdlam[:, 1], color="C3", angles="xy", scale_units="xy", scale=1.5, width=0.006)
    ax.set_xlim(-3, 3); ax.set_ylim(-3, 3); ax.set_aspect("equal")
    ax.set_title(f"t = {tf:.0f}  ($\\lambda$ = {schedule.lam_continuous(tt):.1f})", fontsize=10)
plt.suptitle(r"PF-ODE field $dx/d\lambda$ over the density $p_t$ (arrow = displacement over 2/3 of a unit of log-SNR)",
             y=1.0, fontsize=10)
plt.tight_layout(); plt.show()

# %% [markdown]
# At $t = 999$ the field is nearly zero: $p_{999}$ is almost exactly $\mathcal N(0,I)$, and it stays small until structure
# appears (in log-SNR units, little happens for $t \gtrsim 400$). Around $t = 200$ the field pushes the mass out of the
# centre onto a ring; by $t = 120$ it splits the ring into eight blobs; near $t = 0$ it contracts each blob onto itself. Flows never cross: that is why the ODE gives every noise *one* image, and can be inverted (section 5).
#
# ## 4. Euler and Heun, and their orders of convergence
#
# To solve $\dot x = v(x, t)$ from $t$ to $s$ (step $h = s - t$):
#
# * **Euler**: $x_s = x_t + h\,v(x_t, t)$ — one model evaluation (NFE) per step; local error $O(h^2)$, global error $O(h)$.
# * **Heun** (explicit trapezoid, EDM's Algorithm 1): predict $\tilde x = x_t + h\,v(x_t,t)$, then
#   $x_s = x_t + \tfrac h2\,[v(x_t,t) + v(\tilde x, s)]$ — two NFE per step; global error $O(h^2)$.
#
# These one-step functions, `minilcm.sde.euler_step(model, x, schedule, t, s)` and `heun_step(...)`, are what
# Chapter 4's consistency distillation calls.
#
# ### Exercises 2.3 (\*) and 2.4 (\*\*): an Euler step and a Heun step
#
# Write `my_euler_step(model, x, schedule, t, s)` and `my_heun_step(model, x, schedule, t, s)`, one step of the PF-ODE
# from time `t` to time `s` with an eps-model `model`. *Hint:* `pf_ode_velocity(model, x, schedule, t)` (imported
# above) gives $v(x, t)$; the step $h = s - t$ is negative when sampling.

# %%
def my_euler_step(model, x, schedule, t, s):
    # BEGIN SOLUTION
    return x + (s - t) * pf_ode_velocity(model, x, schedule, t)
    # END SOLUTION


my_euler_step = check("euler_step", my_euler_step)


# %%
def my_heun_step(model, x, schedule, t, s):
    # BEGIN SOLUTION
    h = s - t
    v_t = pf_ode_velocity(model, x, schedule, t)
    return x + h / 2 * (v_t + pf_ode_velocity(model, x + h * v_t, schedule, s))
    # END SOLUTION


my_heun_step = check("heun_step", my_heun_step)
x_probe = torch.randn(64, 2, dtype=torch.float64)
assert torch.allclose(my_heun_step(oracle, x_probe, schedule, 500.0, 450.0),
                      heun_step(oracle, x_probe, schedule, 500.0, 450.0), rtol=1e-6, atol=1e-9)
assert torch.allclose(my_euler_step(oracle, x_probe, schedule, 500.0, 450.0),
                      euler_step(oracle, x_probe, schedule, 500.0, 450.0), rtol=1e-6, atol=1e-9)

# %% [markdown]
# **Measuring the order.** Halve the step size repeatedly and watch the error to the exact solution: it should fall
# by $2^1$ per halving for Euler and $2^2$ for Heun, i.e. slopes $-1$ and $-2$ on a log-log plot. The error is the
# root-mean-square distance over 32 paths to the "exact" end points, computed by classical 4th-order Runge–Kutta
# (`minilcm.sde.pf_ode_rk4`) with 400 steps; it agrees with 200 RK4 steps to below $10^{-6}$, far under anything
# measured here. RMS rather than the worst path: a single path that passes close to a saddle between two blobs can
# need more steps before its error settles into the asymptotic rate.
#
# The **spacing** of the steps matters. The linear schedule spends over a third of its log-SNR range in the first 10%
# of $t$ ($\lambda$ falls from 4.6 to 1.1 on $t \in [0, 100]$), where the blobs sharpen. Steps *uniform in $t$* are long
# there; steps *uniform in $\lambda$* put the work where the solution changes. We measure both:
# `schedule.timesteps(N + 1, "lambda")` and `schedule.timesteps(N + 1, "linspace")` are the two N-step grids from
# 999 to 0 (any N: unlike the integer grids, the continuous spacings are not capped at the schedule's 1000 steps).
#
# **Predict, then run.** Each halving of the step size: by what factor will Euler's error fall, and Heun's?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* By 2 for Euler and 4 for Heun: their global errors are $O(h)$ and $O(h^2)$. The printed "order per
# halving" below is $\log_2$ of that factor, and comes out near 1 and 2 with uniform-in-$\lambda$ steps.

# %%
def lambda_grid(n_steps):
    return schedule.timesteps(n_steps + 1, "lambda")  # n_steps + 1 times from 999 to 0, uniform in lambda


x_T32 = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
reference = pf_ode_rk4(oracle, x_T32, schedule, lambda_grid(400)).x  # classical RK4: 4 NFE per step
assert (pf_ode_rk4(oracle, x_T32, schedule, lambda_grid(200)).x - reference).norm(dim=1).max() < 1e-6  # converged

Ns = pick(fast=[25, 50, 100, 200], cpu=[25, 50, 100, 200, 400])
spacings = {"uniform in lambda": lambda_grid, "uniform in t": lambda N: schedule.timesteps(N + 1, "linspace")}
errors, orders = {}, {}
for sp, make in spacings.items():
    for method in ("euler", "heun"):
        errs = [(pf_ode(oracle, x_T32, schedule, make(N), method=method).x - reference).norm(dim=1).pow(2).mean().sqrt().item()
                for N in Ns]
        errors[sp, method] = errs
        orders[sp, method] = [math.log2(errs[i] / errs[i + 1]) for i in range(len(Ns) - 1)]
        print(f"{sp:18s} {method:5s}  RMS error {' '.join(f'{e:.1e}' for e in errs)}   "
              f"order per halving {' '.join(f'{o:.2f}' for o in orders[sp, method])}")

fig, ax = plt.subplots(figsize=(6, 4))
for (sp, method), errs in errors.items():
    nfe = [N * (1 if method == "euler" else 2) for N in Ns]
    ax.loglog(nfe, errs, "o-" if sp.endswith("lambda") else "s--", color="C0" if method == "euler" else "C3",
              label=f"{method}, {sp}")
ax.loglog(Ns, [0.5 * errors["uniform in lambda", "euler"][0] * Ns[0] / N for N in Ns], "k:", lw=1, label="slope -1")
ax.loglog([2 * N for N in Ns], [0.5 * errors["uniform in lambda", "heun"][0] * (Ns[0] / N) ** 2 for N in Ns], "k-.", lw=1,
          label="slope -2")
nfes = sorted({N * k for N in Ns for k in (1, 2)})
ax.set_xticks(nfes, [str(v) for v in nfes]); ax.minorticks_off()
ax.set_xlabel("NFE (model evaluations)"); ax.set_ylabel("RMS |x_0 - exact x_0|"); ax.legend(fontsize=8)
ax.set_title("PF-ODE error on the oracle: Euler vs Heun")
plt.tight_layout(); plt.show()

for method, p in (("euler", 1), ("heun", 2)):
    assert all(abs(o - p) < 0.3 for o in orders["uniform in lambda", method]), (method, orders["uniform in lambda", method])

# %% [markdown]
# ### Exercise 2.5 (**): one number for the order
#
# The orders per halving above are local. Write `order(nfe, err)`, the empirical order $p$ in
# $\text{err} \approx C\,\text{NFE}^{-p}$ over all the points: minus the least-squares slope of $\log\text{err}$ against
# $\log\text{NFE}$. Chapter 3 reports every solver's order this way (`minilcm.metrics.power_law_order`).

# %%
def order(nfe, err):
    # BEGIN SOLUTION
    x, y = torch.log(torch.tensor(nfe, dtype=torch.float64)), torch.log(torch.tensor(err, dtype=torch.float64))
    xc = x - x.mean()
    return float(-(xc * (y - y.mean())).sum() / (xc * xc).sum())
    # END SOLUTION


order = check("convergence_order", order)
for method, k in (("euler", 1), ("heun", 2)):
    print(f"{method}: fitted order {order([N * k for N in Ns], errors['uniform in lambda', method]):.2f}")

# %% [markdown]
# Euler's error halves and Heun's quarters with each halving of the step: orders 1 and 2, as the theory says. Per NFE,
# Heun wins by orders of magnitude at any useful accuracy. The spacing matters for Heun: with uniform-in-$t$ steps its
# error is 4.3-5.5x larger at every budget, and its measured orders (1.86, 1.99, 2.14, 2.26) wander around 2 and
# overshoot it, so those step sizes are not yet in the asymptotic regime, while uniform-in-$\lambda$ steps give clean
# orders (2.14, 2.04, 2.01, 2.00). Euler's error is dominated by its own first-order
# term everywhere, so the spacing hardly changes it. This chapter therefore steps uniformly in $\lambda$ throughout.
#
# ## 5. Encoding: data → noise → data
#
# Because the flow is deterministic and smooth, it can be run **forwards** in time too: `pf_ode_encode` integrates from
# $t = 0$ up to $t = 999$ and returns each data point's *latent noise* (Song et al. 2021, Sec. 4.3). Decoding that noise
# with `pf_ode` returns the data point, up to the solver's error.

# %%
n_enc = pick(fast=500, cpu=1000)
x0_enc, lab_enc = mixture.sample(n_enc, torch.Generator().manual_seed(20))
ts_enc = schedule.timesteps(pick(fast=101, cpu=201), "lambda")
z = pf_ode_encode(oracle, x0_enc.double(), schedule, ts_enc, method="heun").x
back = pf_ode(oracle, z, schedule, ts_enc, method="heun").x
err = (back - x0_enc.double()).abs().max().item()
print(f"{len(ts_enc) - 1} Heun steps each way: max round-trip error {err:.1e};  latents: mean {z.mean(0).numpy().round(2)}, "
      f"std {z.std(0).numpy().round(2)}")
assert err < 1e-3
assert z.mean(0).abs().max() < 0.2 and (z.std(0) - 1).abs().max() < 0.15

fig, axes = plt.subplots(1, 3, figsize=(12, 4))
scatter_2d(x0_enc, ax=axes[0], labels=lab_enc, s=3, title="data (coloured by class)")
scatter_2d(z, ax=axes[1], labels=lab_enc, s=3, title="encoded: x_999 = ODE(x_0)")
scatter_2d(back, ax=axes[2], labels=lab_enc, s=3, title=f"decoded back (max error {err:.0e})")
plt.tight_layout(); plt.show()

# %% [markdown]
# The latents look like a standard normal — as they must, since the flow carries $p_0$ onto $p_{999}$ — yet they are not
# scrambled: each class owns a wedge of the noise. The ODE is a smooth, invertible map between the data and the
# noise, and an image's "address" in noise space is meaningful. Section 7 uses this to interpolate.
#
# ## 6. A learned model against the oracle
#
# So far the model was exact, and every error belonged to the solver. A *trained* network adds **learning error**.
# Train a small MLP briefly on the mixture (Chapter 1's loss and loop), then measure how far its $\epsilon$ is from the
# oracle's on samples of $p_t$, across $t$:
#
# $$e(t) = \mathbb E_{x\sim p_t}\,\|\epsilon_\theta(x,t) - \epsilon^*(x,t)\|^2, \qquad \text{score error} = e(t)/\sigma_t^2 .$$

# %%
mlp = MLPDenoiser(hidden=128, depth=3)
res = train(mlp, DenoisingLoss(schedule), lambda n, g: mixture.sample(n, g)[0],  # unconditional: points only
            TrainConfig(steps=pick(fast=2000, cpu=4000, gpu=8000), batch_size=256, lr=1e-3, ema_decay=0.995, seed=0,
                        device="cpu", desc="2-D MLP"))
model = res.ema
print(f"trained {res.step} steps in {res.seconds:.0f} s")

t_err = torch.cat([torch.tensor([0.0, 2.0, 5.0, 10.0, 25.0]), torch.linspace(50, 999, 20)]).double()
gq = torch.Generator().manual_seed(30)
eps_err = []
with torch.no_grad():
    for tq in t_err:
        tt = tq.expand(4000)
        xt = q_sample(schedule, mixture.sample(4000, gq)[0].double(), tt, torch.randn(4000, 2, generator=gq, dtype=torch.float64))
        eps_err.append(((model(xt.float(), tt.float()).double() - oracle(xt, tt)) ** 2).sum(1).mean().item())
eps_err = torch.tensor(eps_err)
score_err = eps_err / schedule.sigma(t_err) ** 2

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
axes[0].semilogy(t_err, eps_err, "o-"); axes[0].set_title(r"$\mathbb{E}\,\|\epsilon_\theta - \epsilon^*\|^2$ over $p_t$")
axes[1].loglog(t_err.clamp(min=0.5), score_err, "o-", color="C3")
axes[1].set_title(r"score error $\mathbb{E}\,\|\nabla\log p_\theta - \nabla\log p_t\|^2$ (t=0 drawn at 0.5)")
for ax in axes:
    ax.set_xlabel("t")
plt.tight_layout(); plt.show()
print("eps error at t = 0, 25, 500, 999:", [f"{eps_err[(t_err - v).abs().argmin()]:.4f}" for v in (0, 25, 500, 999)])

# %% [markdown]
# The network's $\epsilon$ is most wrong at small $t$ — worst around $t \approx 50$, where the eight blobs are just
# separating and $\epsilon^*$ changes fastest in $x$ — and almost exact for $t \gtrsim 200$, where $p_t$ is close to a
# Gaussian. Divided by $\sigma_t^2$, the same error becomes a score error up to $1/\sigma_0^2 = 10^4$ times larger as
# $t \to 0$: this is why networks predict $\epsilon$ (bounded) rather than the score, and why the last steps of a
# sampler deserve care.
#
# **Solver error vs learning error.** From the same noise, solve the ODE with the learned model and with the oracle,
# each with a coarse (25-step) and a fine (200-step) Heun solve. The distance between the oracle's coarse and fine
# solutions is the *solver error*; between the learned and oracle fine solutions, the *learning error*:

# %%
x_T_cmp = torch.randn(n, 2, generator=torch.Generator().manual_seed(40))
out = {}
for name, m in (("oracle", oracle), ("learned", model)):
    for steps in (25, 200):
        out[name, steps] = pf_ode(m, x_T_cmp.double() if name == "oracle" else x_T_cmp, schedule,
                                  schedule.timesteps(steps + 1, "lambda")).x.double()
solver_err = (out["oracle", 25] - out["oracle", 200]).norm(dim=1).mean().item()
learning_err = (out["learned", 200] - out["oracle", 200]).norm(dim=1).mean().item()
d_learned = sliced_wasserstein(out["learned", 200], x_data)
print(f"mean distance per sample: solver error (Heun 25 vs 200 steps) {solver_err:.1e};  "
      f"learning error (MLP vs oracle) {learning_err:.1e}")
print(f"sliced Wasserstein to the data: learned model {d_learned:.3f}, oracle {sliced_wasserstein(out['oracle', 200], x_data):.3f}, "
      f"noise floor {floor:.3f}")
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
scatter_2d(out["oracle", 200], ax=axes[0], log_prob=lp, title="oracle, 200 Heun steps")
scatter_2d(out["learned", 200], ax=axes[1], log_prob=lp, title="learned MLP, 200 Heun steps")
plt.tight_layout(); plt.show()
assert learning_err > 10 * solver_err  # at 25 Heun steps the ODE is solved far better than the network was trained
assert d_learned < 4 * floor

# %% [markdown]
# With 25 Heun steps the ODE is already solved far more accurately than the network knows the score: for this model,
# spending more NFE would buy nothing. The later chapters live on this trade-off — fewer solver steps only matter until
# solver error reaches learning error.
#
# ## 7. CIFAR-10: one noise, one image
#
# The same ODE drives an image model. We use the course's CIFAR-10 teacher, `minilcm.recipes.cifar_teacher()`: the
# shipped checkpoint `ddpm-cifar10` (Chapter 1: a 1.1M-parameter UNet trained on the CPU, so its pictures are blurry
# CIFAR-like scenes), or, when it is missing, a tiny UNet trained here briefly. What this section shows does not depend
# on image quality: the ODE maps each noise to *one* image, deterministically, and nearby noises to nearby images.

# %%
from minilcm.recipes import cifar_teacher

t0 = time.perf_counter()
teacher, info = cifar_teacher()
print(f"teacher: {info['source']} ({info.get('steps', '?')} training steps); "
      f"{sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M parameters; ready in {time.perf_counter() - t0:.1f} s")

n_steps_img = pick(fast=4, cpu=12, gpu=25)
ts_img = schedule.timesteps(n_steps_img + 1, "lambda")
noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(50))
t0 = time.perf_counter()
first = pf_ode(teacher, noise, schedule, ts_img, method="heun")
second = pf_ode(teacher, noise.clone(), schedule, ts_img, method="heun")
diff = (first.x - second.x).abs().max().item()
print(f"Heun, {n_steps_img} steps ({first.nfe} NFE), 4 images twice in {time.perf_counter() - t0:.1f} s;  max |first - second| = {diff}")
assert torch.equal(first.x, second.x) and diff == 0.0
assert first.x.shape == (4, 3, 32, 32) and torch.isfinite(first.x).all() and first.nfe == 2 * n_steps_img
fig, axes = plt.subplots(1, 2, figsize=(8, 2.6))
show_images(first.x, nrow=4, ax=axes[0], title="PF-ODE, first run")
show_images(second.x, nrow=4, ax=axes[1], title="same noise, second run")
plt.tight_layout(); plt.show()

# %% [markdown]
# **Interpolating between two noises.** Why not the straight line $(1-u)\,z_0 + u\,z_1$? In $d = 3\cdot32\cdot32 = 3072$
# dimensions a standard normal vector has norm $\approx\sqrt d \approx 55.4$ with tiny spread — practically every noise the
# model ever saw lies on that thin shell. The midpoint of two independent noises has norm $\approx\sqrt{d/2} \approx 39$:
# a point the Gaussian essentially never produces, so the ODE starts from an input unlike its training data
# (the decoded images come out washed-out). **Spherical interpolation** (slerp; Shoemake 1985, used for GAN and
# diffusion latents since White 2016),
#
# $$\mathrm{slerp}(z_0, z_1; u) = \frac{\sin((1-u)\,\Omega)}{\sin\Omega}\,z_0 + \frac{\sin(u\,\Omega)}{\sin\Omega}\,z_1,\qquad \cos\Omega = \frac{z_0\cdot z_1}{\|z_0\|\,\|z_1\|},$$
#
# walks along the shell instead.

# %%
def slerp(z0, z1, u):
    """Spherical interpolation between two noises, u in [0, 1] (Shoemake 1985)."""
    omega = torch.acos((z0 * z1).sum() / (z0.norm() * z1.norm()))
    return (torch.sin((1 - u) * omega) * z0 + torch.sin(u * omega) * z1) / torch.sin(omega)


z0, z1 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(60))
us = torch.linspace(0, 1, pick(fast=6, cpu=8))
z_slerp = torch.stack([slerp(z0, z1, u) for u in us])
z_lerp = torch.stack([(1 - u) * z0 + u * z1 for u in us])
d = z0.numel()
print(f"sqrt(d) = {math.sqrt(d):.1f};  norms along slerp: {z_slerp.flatten(1).norm(dim=1).numpy().round(1)}")
print(f"                  norms along lerp:  {z_lerp.flatten(1).norm(dim=1).numpy().round(1)}")
mid = len(us) // 2
assert (z_slerp.flatten(1).norm(dim=1) / math.sqrt(d) - 1).abs().max() < 0.05
assert z_lerp[mid].norm() / math.sqrt(d) < 0.8  # the straight line leaves the shell

t0 = time.perf_counter()
imgs = pf_ode(teacher, torch.cat([z_slerp, z_lerp]), schedule, ts_img, method="heun").x
print(f"{len(imgs)} images in {time.perf_counter() - t0:.1f} s")
assert (imgs[0] - imgs[len(us)]).abs().max() < 1e-4  # both paths start at z0 (up to slerp's rounding)
fig, axes = plt.subplots(2, 1, figsize=(1.4 * len(us), 3.6))
show_images(imgs[:len(us)], nrow=len(us), ax=axes[0], title="slerp: z0 -> z1")
show_images(imgs[len(us):], nrow=len(us), ax=axes[1], title="lerp (straight line): z0 -> z1")
plt.tight_layout(); plt.show()

# %% [markdown]
# Each row starts at the image of $z_0$ and ends at the image of $z_1$ and moves continuously in between: the ODE is a
# smooth map. Along the slerp path every noise is a typical one; along the straight line the middle noises are
# atypically short, and the model is asked about inputs it never saw in training (here its middle images look nothing
# like its end images). With the shipped checkpoint the slerp row morphs between two scenes; with a briefly trained stand-in the pictures
# themselves mean little — the determinism and the continuity are the point.
#
# ## Summary
#
# * DDPM's chain is the **VP-SDE** $dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw$ with $\beta(t) = -\tfrac{d}{dt}\log\bar\alpha_t$;
#   its moments reproduce $\bar\alpha_t$ exactly, and simulated particles match the exact marginals $p_t$.
# * Reversing it needs the score $-\epsilon/\sigma_t$: the **reverse SDE** (stochastic paths) and the **probability-flow ODE**
#   (deterministic paths) start from the same noise and both land on the data distribution.
# * On the oracle, **Euler is order 1 and Heun order 2** (measured by step halving), and steps uniform in log-SNR
#   $\lambda$ give clean orders where uniform-in-$t$ steps do not.
# * The ODE is **invertible**: data → noise → data returns the data to within $10^{-3}$ (about $10^{-4}$ with 200 Heun
#   steps each way), and classes own regions of the noise.
# * A learned model's error is largest at small $t$ (and huge in score units there); with 25 Heun steps the solver error is
#   already far below the learning error.
# * On CIFAR-10 the ODE maps a noise to one image, bit for bit, and spherical interpolation walks between noises.
#
# **Next:** 25 Heun steps is still 50 NFE. Chapter 3 exploits the ODE's structure — its linear part can be solved exactly —
# to get DDIM and DPM-Solver, which need 10–20 NFE.
#
# ## Reading
#
# * Song et al. 2021, *Score-Based Generative Modeling through SDEs* ([arXiv 2011.13456](https://arxiv.org/abs/2011.13456)):
#   Sec. 2–3 (the forward and reverse SDEs, Eq. 5–6; the VP-SDE, Eq. 11), Sec. 4.3 (the probability-flow ODE,
#   Eq. 13, and encoding), App. D (its derivation from Fokker–Planck).
# * Anderson 1982, *Reverse-time diffusion equation models*, Stochastic Processes and their Applications 12: the
#   reverse SDE.
# * Karras et al. 2022, *EDM* ([arXiv 2206.00364](https://arxiv.org/abs/2206.00364)), Sec. 3 and Algorithm 1: Heun's
#   method for the PF-ODE, and why the step spacing matters.
# * Särkkä & Solin 2019, *Applied Stochastic Differential Equations*, Ch. 5: the moments of a linear SDE.

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s (profile {PROFILE})")
