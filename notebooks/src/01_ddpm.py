# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 1 — DDPM from scratch
#
# **The road:** **DDPM** → the SDE / probability-flow ODE view → DDIM and DPM-Solver → consistency models → latent consistency models (LCM) → the same distillation on Stable Diffusion.
#
# This first chapter builds the thing every later chapter accelerates: a *denoising diffusion probabilistic model*
# (Ho et al. 2020, [arXiv 2006.11239](https://arxiv.org/abs/2006.11239)). You will
#
# 1. watch the **forward process** destroy real CIFAR-10 images, and compare three noise schedules by their signal-to-noise ratio;
# 2. derive the **training objective** — "predict the noise" — in a few lines;
# 3. train a small network on a 2-D Gaussian mixture **in seconds on a CPU**, sample it with the 1000-step
#    ancestral sampler, and *measure* that the samples match the data;
# 4. run the very same training loop on a CIFAR-10 UNet.
#
# Everything here calls the `minilcm` package; when the notebook derives something itself, it checks its
# version against the package's.
#
# The work is sized by one knob, the environment variable `MINILCM_PROFILE`: `fast` (CI, seconds),
# `cpu` (a laptop, minutes; the default without a GPU) or `gpu`.
#
# **Time:** about 15 minutes to read, 20 more for the five exercises; about 1.5 minutes to run (cpu profile,
# measured on a 2-core CPU). **Needs:** Python and PyTorch basics; no earlier chapter. The symbols are on one page,
# [the notation sheet](../docs/notation.md).
#
# **Exercises.** Where the chapter needs a formula you write it: a function with its solution hidden in the student
# edition (`make student`), and a `check(...)` after it that compares yours with the package's on cases chosen to
# catch the usual mistakes, and says which one it found. If you skip one, the chapter goes on with the package's
# function and says so. (\*) is a line or two, (\*\*\*) a page of thought.

# %%
import time

import matplotlib.pyplot as plt
import torch

from minilcm.notebook import setup  # first: it silences tqdm's import-time warning
from minilcm.datasets import cifar10
from minilcm.diffusion import DenoisingLoss, ddpm, q_sample
from minilcm.metrics import sliced_wasserstein
from minilcm.models import MLPDenoiser
from minilcm.profiles import pick
from minilcm.schedules import Schedule
from minilcm.toys import GaussianMixture
from minilcm.train import TrainConfig, train
from minilcm.viz import loss_curve, scatter_2d, show_images, trajectories

PROFILE = setup()  # threads, warning filters, seed 0, compact figures; returns the profile
T0 = time.perf_counter()

# %% [markdown]
# ## 1. The forward process
#
# DDPM fixes a Markov chain that adds a little Gaussian noise at each of $T = 1000$ steps,
#
# $$q(x_t \mid x_{t-1}) = \mathcal N\big(x_t;\ \sqrt{1-\beta_t}\,x_{t-1},\ \beta_t I\big),$$
#
# with a small, increasing variance schedule $\beta_t$ (DDPM: linear from $10^{-4}$ to $0.02$). Products of
# Gaussians are Gaussian, so any $x_t$ can be drawn from $x_0$ in one shot (DDPM Eq. 4):
#
# $$q(x_t \mid x_0) = \mathcal N\big(x_t;\ \alpha_t x_0,\ \sigma_t^2 I\big),\qquad
#   \bar\alpha_t = \prod_{s \le t} (1-\beta_s),\quad \alpha_t = \sqrt{\bar\alpha_t},\quad \sigma_t = \sqrt{1-\bar\alpha_t}.$$
#
# Because $\alpha_t^2 + \sigma_t^2 = 1$ this is called *variance preserving* (VP): data with unit variance stays at unit variance.
# A warning on notation: the DDPM paper writes $\alpha_t = 1 - \beta_t$ for the per-step factor, so its $\bar\alpha_t$ is
# the product of those. Here, as in DPM-Solver and the rest of this course, $\alpha_t$ is the *signal scale*
# $\sqrt{\bar\alpha_t}$; $\bar\alpha_t$ means the same thing in both.
# Let us check the one-shot formula against the chain itself, by running the chain step by step on many copies of one point:

# %%
schedule = Schedule("linear")
x0 = torch.tensor([[1.5, -0.5]], dtype=torch.float64).repeat(20_000, 1)
x = x0.clone()
g = torch.Generator().manual_seed(0)
t_check = 300
for t in range(t_check + 1):  # the Markov chain, step by step
    beta = schedule.betas[t].double()
    x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)

alpha, sigma = schedule.alpha(t_check), schedule.sigma(t_check)
print(f"chain after {t_check + 1} steps: mean {x.mean(0).tolist()}, std {x.std(0).tolist()}")
print(f"closed form:            mean {(alpha * x0[0]).tolist()}, std {sigma.item():.4f}")
assert torch.allclose(x.mean(0), alpha * x0[0], atol=0.02) and torch.allclose(x.std(0), sigma.expand(2), atol=0.01)

# %% [markdown]
# ### Exercise 1.1 (*): sample $q(x_t \mid x_0)$ in one shot
#
# Write `forward_sample(schedule, x0, t, eps)`, which returns $x_t = \alpha_t x_0 + \sigma_t \epsilon$ for a batch `x0`
# of any shape and per-row times `t` of shape `(B,)`. *Hint:* `schedule.alpha(t)` and `schedule.sigma(t)` return
# `(B,)` float64 tensors; `minilcm.schedules.broadcast(v, x)` reshapes one to `(B, 1, 1, ...)`; keep `x0`'s dtype.
# The package's version is `minilcm.diffusion.q_sample`; the check compares yours with it.

# %%
from minilcm.exercises import check
from minilcm.schedules import broadcast


def forward_sample(schedule, x0, t, eps):
    # BEGIN SOLUTION
    alpha, sigma = broadcast(schedule.alpha(t), x0).to(x0), broadcast(schedule.sigma(t), x0).to(x0)
    return alpha * x0 + sigma * eps
    # END SOLUTION


forward_sample = check("forward_sample", forward_sample)

# %% [markdown]
# **Predict, then run.** The next cell noises six test images at eight timesteps. By which $t$ will you no longer be
# able to tell what the image shows, and how much of it is left at $t = 999$?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* The linear schedule keeps $\alpha_t \ge 0.5$ up to $t \approx 350$, and by then the noise
# ($\sigma_t \approx 0.85$) already hides the object; at $t = 999$, $\alpha_{999} \approx 0.006$: nothing is left.
# The figure below and the printed $\alpha_t$ show it.

# %%
test_set = cifar10("test")
imgs, labels = test_set[torch.arange(6) * 7]  # six CIFAR-10 test images in [-1, 1], (6, 3, 32, 32)
ts = torch.tensor([0, 50, 100, 200, 350, 500, 750, 999])
eps = torch.randn(1, 3, 32, 32).expand(6, 3, 32, 32)
rows = []
for t in ts:
    tt = t.repeat(6)
    mine = forward_sample(schedule, imgs, tt, eps)
    assert torch.allclose(mine, q_sample(schedule, imgs, tt, eps), atol=1e-6)
    rows.append(mine)
grid = torch.stack(rows, 1).reshape(-1, 3, 32, 32)  # image-major: one row per image, one column per t
ax = show_images(grid, nrow=len(ts), title="x_t = alpha_t x_0 + sigma_t eps   at t = " + ", ".join(map(str, ts.tolist())))
plt.show()
print("alpha_t:", {int(t): round(schedule.alpha(float(t)).item(), 3) for t in ts},
      "| sigma_350:", round(schedule.sigma(350.0).item(), 3))

# %% [markdown]
# Each row is one image, each column a timestep. By $t = 350$ the class is hard to tell; by $t = 999$ nothing of the image is left
# ($\alpha_{999} \approx 0.006$). Generation will run this film backwards.
#
# ### Three schedules, compared by their signal-to-noise ratio
#
# What matters is not $\beta_t$ itself but how fast the **signal-to-noise ratio** $\mathrm{SNR}(t) = \alpha_t^2/\sigma_t^2$ falls.
# We plot the half log-SNR $\lambda_t = \log(\alpha_t/\sigma_t)$ used by DPM-Solver (Chapter 3):
# `linear` is DDPM's, `scaled_linear` is Stable Diffusion's (the one LCM distils), `cosine` is Nichol & Dhariwal's (2021).

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
tt = torch.linspace(0, 999, 1000)
for kind in ["linear", "scaled_linear", "cosine"]:
    s = Schedule(kind)
    axes[0].plot(tt, s.alpha_bar(tt), label=kind)
    axes[1].plot(tt, s.lam(tt), label=kind)
axes[0].set(title=r"$\bar\alpha_t$ (signal variance)", xlabel="t")
axes[1].set(title=r"$\lambda_t = \log(\alpha_t/\sigma_t)$", xlabel="t")
for a in axes:
    a.legend(); a.grid(alpha=0.3)
plt.tight_layout(); plt.show()

for kind in ["linear", "scaled_linear", "cosine"]:
    s = Schedule(kind)
    print(f"{kind:14s} lambda from {s.lam(0.).item():6.2f} (t=0) to {s.lam(999.).item():6.2f} (t=999);"
          f"  t where SNR = 1: {s.t_of_lam(0.0).item():6.1f}")
assert all((Schedule(k).lam(tt)[1:] < Schedule(k).lam(tt)[:-1]).all() for k in ["linear", "scaled_linear", "cosine"])

# %% [markdown]
# The linear schedule spends its last ~230 steps in near-pure noise (λ < −3 beyond t ≈ 770); the cosine schedule
# spreads the SNR more evenly until it plunges at the very end. Stable Diffusion's `scaled_linear` never reaches pure
# noise (λ₉₉₉ ≈ −2.7, so $\alpha_{999} \approx 0.07$ of the image survives) — a detail that matters when the LCM paper
# samples from $t = 999$ in one step.
#
# ## 2. The objective, briefly
#
# We want $p_\theta(x_{t-1}\mid x_t)$ that undoes one step. Training maximises the evidence lower bound, which splits into
# one KL term per step, $\mathrm{KL}\big(q(x_{t-1}\mid x_t, x_0)\,\|\,p_\theta(x_{t-1}\mid x_t)\big)$. Two facts make that easy:
#
# * the **posterior** of the forward process is Gaussian in closed form (DDPM Eq. 7):
#   $$q(x_{t-1}\mid x_t, x_0) = \mathcal N\Big(\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t}x_0 + \frac{\sqrt{1-\beta_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t}x_t,\ \ \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t\Big);$$
# * with $p_\theta$ Gaussian with the same variance, each KL is a squared distance between means. Writing
#   $x_0 = (x_t - \sigma_t\epsilon)/\alpha_t$ and letting the network predict the noise, $\epsilon_\theta(x_t, t)$, the mean
#   error becomes a weighted $\lVert \epsilon - \epsilon_\theta(x_t,t)\rVert^2$. With the reverse variance $\sigma^2_{p,t}$ of
#   $p_\theta$ the weight is (DDPM Eq. 12, in the paper's own notation $\alpha^\text{DDPM}_t = 1 - \beta_t$)
#   $$L_{t-1} - C = \mathbb E_{x_0, \epsilon}\Big[\frac{\beta_t^2}{2\sigma^2_{p,t}\,(1 - \beta_t)(1-\bar\alpha_t)}\,
#     \big\lVert \epsilon - \epsilon_\theta(x_t, t)\big\rVert^2\Big],$$
#   large at small $t$ and small at large $t$.
#
# Ho et al. drop that weight (every $t$ counts the same) and get the **simple loss** (Eq. 14). It is no longer the
# ELBO, but it trains better samplers: it shifts effort away from the nearly clean steps that the weight favours.
#
# $$L_\text{simple} = \mathbb E_{x_0,\ t\sim\mathcal U\{0..T-1\},\ \epsilon\sim\mathcal N(0,I)}\ \big\lVert \epsilon - \epsilon_\theta(\alpha_t x_0 + \sigma_t\epsilon,\ t)\big\rVert^2 .$$
#
# That is `minilcm.diffusion.DenoisingLoss` (which can also target $x_0$ or $v = \alpha_t\epsilon - \sigma_t x_0$).
# Two of its pieces are yours to write.
#
# ### Exercise 1.2 (*): $\hat x_0$ from the predicted noise
#
# Write `predict_x0(schedule, x_t, t, eps)`: invert $x_t = \alpha_t x_0 + \sigma_t\epsilon$ for $x_0$. Every sampler in
# the course forms this estimate (`minilcm.diffusion.eps_to_x0`).
#
# ### Exercise 1.3 (**): the posterior mean $\tilde\mu_t$
#
# Write `posterior_mean(schedule, x0, x_t, t)`, DDPM Eq. 7 above, for a Python int $t \ge 0$. *Hint:* mind the
# notation (the sheet's first table): DDPM's $1 - \beta_t$ is $\bar\alpha_t / \bar\alpha_{t-1}$, not the course's
# $\alpha_t$; `schedule.alpha_bar(t)` takes a float or a tensor in $[0, 999]$, so handle $t = 0$ yourself
# ($\bar\alpha_{-1} = 1$: the mean is then $x_0$).
# By Tweedie's formula the optimum is $\epsilon^*(x_t,t) = -\sigma_t \nabla_x \log p_t(x_t)$: **a noise predictor is a score model**,
# which Chapter 2 builds on.

# %%
def predict_x0(schedule, x_t, t, eps):
    # BEGIN SOLUTION
    return (x_t - broadcast(schedule.sigma(t), x_t).to(x_t) * eps) / broadcast(schedule.alpha(t), x_t).to(x_t)
    # END SOLUTION


predict_x0 = check("predict_x0", predict_x0)


# %%
def posterior_mean(schedule, x0, x_t, t):
    # BEGIN SOLUTION
    ab_t, ab_prev = schedule.alpha_bar(float(t)), schedule.alpha_bar(float(t - 1)) if t >= 1 else 1.0
    beta = 1 - ab_t / ab_prev
    return (ab_prev ** 0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x_t
    # END SOLUTION


posterior_mean = check("posterior_mean", posterior_mean)

# %% [markdown]
# ## 3. A 2-D DDPM, trained in seconds
#
# Our data: a mixture of 8 Gaussians on a ring, in 4 classes (pairs of neighbouring blobs). Because it is a mixture, its density
# — and the density of every noised marginal $p_t$ — is known exactly; later chapters use it as an *oracle*.
# The model is a small MLP with a sinusoidal time embedding and a class embedding, plus a "null" class: 10% of the
# training labels are replaced by it, so the same network also learns the unconditional model. That is what
# classifier-free guidance needs, $\hat\epsilon_w = (1 + w)\,\epsilon_\theta(x_t, t, c) - w\,\epsilon_\theta(x_t, t, \varnothing)$,
# which sharpens each class at the price of two evaluations per step; Chapter 5 derives it.

# %%
mixture = GaussianMixture()
data_x, data_y = mixture.sample(2000, torch.Generator().manual_seed(1))
model = MLPDenoiser(hidden=128, depth=3, num_classes=mixture.num_classes)
print(f"MLPDenoiser: {sum(p.numel() for p in model.parameters()):,} parameters")

loss_fn = DenoisingLoss(schedule, cond_drop=0.1, null_class=mixture.num_classes)  # 10% label dropout
cfg = TrainConfig(steps=pick(fast=1500, cpu=4000, gpu=8000), batch_size=256, lr=1e-3, warmup_steps=100,
                  ema_decay=0.995, seed=0, device="cpu")
t0 = time.perf_counter()
result = train(model, loss_fn, mixture, cfg)
print(f"trained {cfg.steps} steps in {time.perf_counter() - t0:.1f} s; "
      f"final loss {sum(result.losses[-100:]) / 100:.4f}")
loss_curve(result.losses); plt.show()

# %% [markdown]
# The loss does not go to zero — it cannot: at large $t$ the noise is unpredictable from $x_t$. What matters is the samples.
#
# ### Ancestral sampling
#
# Start from $x_T \sim \mathcal N(0, I)$ and apply the learned reverse step 1000 times: predict $\epsilon$, form $\hat x_0$, take the
# posterior mean $\tilde\mu_t(x_t, \hat x_0)$ and add $\sqrt{\tilde\beta_t}\,z$ (DDPM Algorithm 2).
#
# ### Exercise 1.4 (**): one ancestral step
#
# Write `ancestral_step(schedule, x_t, t, eps, z)`: from the network's `eps` at an integer $t$ and a standard normal
# `z`, return $x_{t-1}$ (`t` a Python int). *Hint:* reuse your `predict_x0` and `posterior_mean`; the variance is
# $\tilde\beta_t = \beta_t (1 - \bar\alpha_{t-1}) / (1 - \bar\alpha_t)$, and the last step ($t = 0$) adds no noise.
# The package's `ddpm` sampler must agree with it: the cell after the check runs both from the same $x$ and $z$.

# %%
def ancestral_step(schedule, x_t, t, eps, z):
    # BEGIN SOLUTION
    x0_hat = predict_x0(schedule, x_t, torch.tensor(float(t)), eps)
    mean = posterior_mean(schedule, x0_hat, x_t, t)
    if t == 0:
        return mean
    ab_t, ab_prev = schedule.alpha_bar(float(t)), schedule.alpha_bar(float(t - 1))
    beta_tilde = (1 - ab_t / ab_prev) * (1 - ab_prev) / (1 - ab_t)
    return mean + beta_tilde ** 0.5 * z
    # END SOLUTION


ancestral_step = check("ancestral_step", ancestral_step)

# %%
ema = result.ema
x = torch.randn(5, 2)
z = torch.randn(5, 2, generator=torch.Generator().manual_seed(9))
ours = ddpm(ema, x, schedule, [500, 499], generator=torch.Generator().manual_seed(9), return_trajectory=True).trajectory[1]
with torch.no_grad():
    eps_500 = ema(x, torch.full((5,), 500.0))
assert torch.allclose(ancestral_step(schedule, x, 500, eps_500, z), ours, atol=1e-5)
print("your step from t = 500 equals the package's ddpm sampler's")

# %% [markdown]
# **Predict, then run.** The next cell samples 2000 points with 1000 such steps and plots them after 0, 700 and 1000
# steps. After 700 steps ($t = 299$), will the points already sit on the eight blobs?

# %% [markdown] tags=["answer"] jupyter={"source_hidden": true}
# *Answer.* Not yet. At $t = 299$ of the linear schedule $\alpha \approx 0.63$ and $\sigma \approx 0.78$ (printed
# below), so a sample there is a data point shrunk by 0.63 plus noise of std 0.78: a blurred cloud over the ring. The
# blobs separate in the last 300 steps, where most of the visible work happens.

# %%
n = 2000
x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(2))
t0 = time.perf_counter()
out = ddpm(ema, x_T, schedule, schedule.timesteps(1000), generator=torch.Generator().manual_seed(3),
           return_trajectory=True)
print(f"1000-step ancestral sampling of {n} points: {time.perf_counter() - t0:.1f} s, NFE = {out.nfe}")
print(f"at t = 299: alpha {schedule.alpha(299.0).item():.2f}, sigma {schedule.sigma(299.0).item():.2f}")

fresh, _ = mixture.sample(n, torch.Generator().manual_seed(4))
d_samples, d_noise, d_floor = (sliced_wasserstein(a, data_x) for a in (out.x, x_T, fresh))
print(f"sliced W2 to the data: samples {d_samples:.3f} | initial noise {d_noise:.3f} | a fresh draw of real data {d_floor:.3f}")

fig, axes = plt.subplots(1, 4, figsize=(16, 4))
lp = mixture.log_prob
for ax, step, title in zip(axes[:3], [0, 700, 1000], ["x_T (noise)", "after 700 steps (t = 299)", "after 1000 steps"]):
    scatter_2d(out.trajectory[step], ax, log_prob=lp, title=title)
trajectories([p[:12] for p in out.trajectory[700::10]], axes[3], title="12 paths, last 300 steps (every 10th)")
plt.tight_layout(); plt.show()

# %% [markdown]
# The samples gather around the ring of 8 blobs, with some mass left between the blobs: a small MLP trained for a
# minute blurs them. The numbers say the same: the **sliced Wasserstein distance** (the average, over random
# directions, of the 1-D optimal-transport distance between projections) from samples to data, 0.093, is far below
# that of the initial noise (0.301), but above the floor set by two independent draws of real data (0.067).

# %%
assert d_samples < 0.5 * d_noise, "the samples should be much closer to the data than the noise is"
assert d_samples < 3.0 * d_floor, "the samples should be within a small factor of the data-vs-data floor"

# %% [markdown]
# ### Bonus: asking for a class
#
# The model was trained with labels (and 10% of the time without). Passing a label picks its pair of blobs — plain
# conditioning, no guidance yet (Chapter 5 adds classifier-free guidance). Each class's samples should sit on that class's blobs.
#
# ### Exercise 1.5 (*): the guided noise
#
# Classifier-free guidance mixes the two predictions the network can make, with and without the label. Write
# `cfg(eps_c, eps_u, w)` $= (1 + w)\,\epsilon_c - w\,\epsilon_u$, the course's convention (so $w = 0$ is plain
# conditioning, and diffusers' `guidance_scale` is $w + 1$; see the notation sheet). `w` is a Python float or a `(B,)`
# tensor (one value per row): `torch.as_tensor(w)`, then broadcast it. Chapter 5 derives CFG and uses it;
# `minilcm.guidance.cfg_combine` is the package's.

# %%
def cfg(eps_c, eps_u, w):
    # BEGIN SOLUTION
    w = broadcast(torch.as_tensor(w), eps_c)
    return (1 + w) * eps_c - w * eps_u
    # END SOLUTION


cfg = check("cfg", cfg)

# %%
labels = torch.arange(4).repeat_interleave(250)
cond_out = ddpm(ema, torch.randn(1000, 2), schedule, schedule.timesteps(pick(fast=250, cpu=1000)),
                cond={"class_labels": labels}, generator=torch.Generator().manual_seed(5))
logp_own = mixture.log_prob(cond_out.x, class_labels=labels)
accuracy = (torch.stack([mixture.log_prob(cond_out.x, class_labels=torch.full((1000,), c)) for c in range(4)], 1)
            .argmax(1) == labels).float().mean().item()
print(f"samples whose most likely class is the one asked for: {accuracy:.1%}")
scatter_2d(cond_out.x, labels=labels, log_prob=lp, title="class-conditional samples (colour = requested class)")
plt.show()
assert accuracy > 0.9

# %% [markdown]
# ## 4. The same loop on CIFAR-10
#
# Nothing above was specific to 2-D: the loss takes any eps-model, and the training loop takes any loss. Here it trains a small
# class-conditional diffusers `UNet2DModel` on CIFAR-10 (the recipe lives in `minilcm.recipes.cifar_teacher`).
#
# **The shipped teacher.** A UNet needs hours of GPU time to draw convincing CIFAR images. The course ships the one
# its recipe trained, `ddpm-cifar10` (`minilcm train ddpm`), and the cell below loads it instead of training when it is
# in `data/checkpoints/`. No GPU was lent to the project, so the shipped one is the recipe's **CPU-sized fallback**: a
# 1.1M-parameter UNet trained for 6,000 steps of 64 images (about half an hour on two CPU cores; the cell prints its
# metadata). Expect blurry CIFAR-like scenes: the right colours and layouts (sky over ground, an object against a
# background), rarely a crisp object. Without the checkpoint, the recipe trains the same tiny UNet here for a few hundred
# steps (colour blobs) and you can check that the loss falls.
#
# **One engineering detail that matters.** The teacher is not a bare eps-network. Two terms first:
#
# * **Preconditioning** (EDM, Karras et al. 2022, Sec. 5): the network $F_\theta$ is wrapped so that its input and its
#   target both have unit scale at every noise level, $\hat x_0 = c_\text{skip}(t)\,x_t + c_\text{out}(t)\,F_\theta(c_\text{in}(t)\,x_t, t)$
#   with coefficients set by the data's std $\sigma_\text{data}$ (`minilcm.preconditioning.EDMPrecond`; it still
#   returns an eps, the course's one model convention).
# * **v-prediction** (Salimans & Ho 2022): the target $v = \alpha_t\epsilon - \sigma_t x_0$ instead of $\epsilon$. Since
#   $\hat v - v = (\hat\epsilon - \epsilon)/\alpha_t = -(\hat x_0 - x_0)/\sigma_t$, its squared error is the x0 error weighted
#   by $1/\sigma_t^2 = \mathrm{SNR}(t) + 1$ (the paper's "SNR+1" weighting), or the eps error weighted by $1/\alpha_t^2$.
#   On an eps-model, `DenoisingLoss(weighting="snr+1")` applies that weight: it is the v-prediction loss.
#
# The teacher uses both. Why: the x0-estimate of an eps-model,
# $(x_t - \sigma_t \hat\epsilon)/\alpha_t$, multiplies the network's error by $\sigma_t/\alpha_t$, which is 157 at $t = 999$ of
# the linear schedule. A bare eps-UNet trained for 2,100 CPU steps had an x0-estimate error of standard deviation 6.9 at
# $t = 999$ (the images have 0.5), and every sampler drifted to saturated colour fields. The preconditioned network
# outputs a correction of unit scale at every $t$, so its x0-estimate never explodes. Big models trained for long learn
# to be precise enough without it; small, briefly trained ones need it.

# %%
from minilcm.recipes import cifar_teacher

t0 = time.perf_counter()
teacher, info = cifar_teacher()
print(f"teacher: {info['source']}; {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M parameters; "
      f"{time.perf_counter() - t0:.1f} s")
if info["source"] == "shipped":
    print({k: info[k] for k in ("steps", "images_seen", "wall_seconds", "hardware", "profile", "git_commit") if k in info})
    print("measured when exported:", info.get("metrics"))
if "losses" in info:
    loss_curve(info["losses"], smooth=10, title="CIFAR-10 UNet loss"); plt.show()
    first, last = sum(info["losses"][:5]) / 5, sum(info["losses"][-5:]) / 5
    print(f"loss: first steps {first:.3f} -> last steps {last:.3f}")
    assert last < first

# %%
n_img = pick(fast=8, cpu=16)
steps = pick(fast=50, cpu=250, gpu=1000)  # DDPM on a subset of the timesteps (Chapter 3 explains why fewer can work)
cls = torch.arange(n_img) % 10
t0 = time.perf_counter()
imgs = ddpm(teacher, torch.randn(n_img, 3, 32, 32), schedule, schedule.timesteps(steps),
            cond={"class_labels": cls}, clip_x0=1.0, generator=torch.Generator().manual_seed(0)).x
print(f"{n_img} images with {steps}-step DDPM: {time.perf_counter() - t0:.1f} s")
show_images(imgs, nrow=8, title=f"CIFAR-10 samples ({info['source']})"); plt.show()
assert imgs.shape == (n_img, 3, 32, 32) and torch.isfinite(imgs).all()

# %% [markdown]
# ## Summary
#
# * The forward process $x_t = \alpha_t x_0 + \sigma_t \epsilon$ — checked against the step-by-step Markov chain — and three
#   schedules that differ in how fast the log-SNR falls.
# * The DDPM objective reduces to *predict the noise*; the optimal noise predictor is a scaled score, $\epsilon^* = -\sigma_t\nabla\log p_t$.
# * A 2-D DDPM trained in seconds; 1000 ancestral steps turn noise into samples whose sliced Wasserstein distance to the data is
#   close to the data-vs-data floor, and labels select classes.
# * The same loop, unchanged, trains a CIFAR-10 UNet.
#
# **The catch:** sampling took **1000 network evaluations**. The rest of the course is about cutting that to 4 or fewer:
# Chapter 2 recasts sampling as an ODE, Chapter 3 solves that ODE in 10–20 steps, and Chapters 4–5 learn to jump along it in one.
#
# ## Reading
#
# * Ho, Jain & Abbeel 2020, *Denoising Diffusion Probabilistic Models* ([arXiv 2006.11239](https://arxiv.org/abs/2006.11239)):
#   Sec. 2 (the forward process, Eq. 4; the posterior, Eq. 6–7), Sec. 3.2 (the reverse step and Eq. 12, the simple
#   loss Eq. 14), Algorithms 1–2.
# * Nichol & Dhariwal 2021, *Improved DDPM* ([arXiv 2102.09672](https://arxiv.org/abs/2102.09672)), Sec. 3.2: the
#   cosine schedule.
# * Ho & Salimans 2022, *Classifier-Free Diffusion Guidance* ([arXiv 2207.12598](https://arxiv.org/abs/2207.12598)),
#   Sec. 3: training with a null label, and the guided eps.
# * Karras et al. 2022, *EDM* ([arXiv 2206.00364](https://arxiv.org/abs/2206.00364)), Sec. 5: preconditioning;
#   Salimans & Ho 2022, *Progressive Distillation* ([arXiv 2202.00512](https://arxiv.org/abs/2202.00512)), Sec. 4:
#   v-prediction and the SNR+1 weighting.

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s (profile {PROFILE})")
