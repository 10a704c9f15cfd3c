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
# # Chapter 5 — Latent consistency models on a mini Stable Diffusion
#
# **The road:** DDPM → the SDE / probability-flow ODE view → DDIM and DPM-Solver → consistency models →
# **latent consistency models (LCM)** → the same distillation on Stable Diffusion.
#
# Chapter 4 distilled a teacher's probability-flow ODE into a consistency function $f_\theta(x_t, t)$ that jumps
# to the ODE's origin in one evaluation. Stable Diffusion adds three things to that picture, and LCM
# (Luo et al. 2023, [arXiv 2310.04378](https://arxiv.org/abs/2310.04378)) answers each:
#
# 1. **Latents.** The diffusion runs on the latents of an autoencoder, not on pixels. LCM distils *in latent
#    space*: nothing in the consistency machinery cares what $x$ is.
# 2. **Text and classifier-free guidance (CFG).** Good samples need CFG,
#    $\hat\epsilon_w = (1 + w)\,\epsilon(x, t, c) - w\,\epsilon(x, t, \varnothing)$, which doubles every teacher
#    evaluation. LCM distils the **augmented PF-ODE** — the ODE driven by $\hat\epsilon_w$ — and gives the student
#    $w$ as an input, so the student is guided at no extra cost.
# 3. **Cost of distillation.** Adjacent ODE steps of a 1000-step grid barely differ; LCM's **skipping step** $k$
#    makes the teacher solve $k$ steps at once.
#
# Our teacher is a real Stable Diffusion *in miniature*, built from the same diffusers parts as SD v1.5 and trained
# on CIFAR-10 (`minilcm.stages`): an `AutoencoderKL` that turns 32×32×3 images into 8×8×4 latents, a CLIP text
# encoder reading the caption "a photo of a cat", and a `UNet2DConditionModel` that denoises latents while
# cross-attending to the caption. It is saved as a `StableDiffusionPipeline` folder. Its LCM student was distilled
# from it with `minilcm.lcm` — the module that Chapter 6 reuses, unchanged, on Stable Diffusion itself.
#
# The work is sized by `MINILCM_PROFILE`: `fast` (CI), `cpu` (a laptop), `gpu`. The trained models are loaded from
# `data/checkpoints/` (`minisd-cifar10`, `lcm-cifar10`, and the evaluator `evaluator-cifar10`).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from minilcm.notebook import setup  # first: it silences tqdm's import-time warning
from minilcm.datasets import CIFAR10_CLASSES, cifar10
from minilcm.evaluator import Evaluator
from minilcm.minisd import MiniSD
from minilcm.profiles import pick
from minilcm.viz import show_images
from minilcm.zoo import load_lcm_student

PROFILE = setup()  # one thread in the fast profile (tiny batches on a busy CI box), seed 0, compact figures

sd = MiniSD.load()               # the teacher: a StableDiffusionPipeline folder, loaded offline
student = load_lcm_student()     # the LCM student: the teacher's UNet + a w input, in LCM's boundary scalings
ev = Evaluator.load()            # the CIFAR-10 classifier behind our image metric (Chapter 7 explains it)
count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
print(f"VAE {count(sd.vae):.2f}M, text encoder {count(sd.text_encoder):.2f}M, UNet {count(sd.unet):.2f}M, "
      f"student UNet {count(student):.2f}M parameters")
print("teacher:", {k: sd.meta.get(k) for k in ("steps", "images_seen", "wall_seconds", "hardware")})

# %% [markdown]
# ## 1. Why latents
#
# A 32×32 RGB image is 3,072 numbers; its latent is 8×8×4 = 256. The autoencoder is trained once (reconstruction
# plus a small KL pull towards $\mathcal N(0, I)$, LDM Sec. 3.1), and the diffusion model then works on 16× fewer
# spatial positions. At Stable Diffusion's scale the same factor turns 512×512×3 into 64×64×4.
#
# The latents are rescaled by a **scaling factor** measured on the data, $1/\mathrm{std}(z)$, so that the diffusion
# sees inputs of the scale its noise schedule assumes (SD v1's is 0.18215). The shipped factor, 0.988, was measured
# on a class-biased subset (the archive is sorted by class); the cell below measures what it gives on random test
# images: a std near 1.1 and a mean far from 0. Per channel the means are about 0.98, -0.05, 0.97 and 1.01, so a
# single shift (SD3's `shift_factor`) cannot centre them; the autoencoder stage now saves per-channel
# `latents_mean` / `latents_std` (diffusers' SDXL-family convention), which the next teacher will be trained on.

# %%
test = cifar10("test").subset(1000)  # a random 1000 (the archive is sorted by class: never take the first n)
x = test.images[:16]
z = sd.encode(x)                    # (16, 4, 8, 8), already multiplied by the scaling factor
rec = sd.decode(z)                  # back to (16, 3, 32, 32) in [-1, 1]
print("image", tuple(x.shape[1:]), "-> latent", tuple(z.shape[1:]),
      f"compression {x[0].numel() / z[0].numel():.0f}x, scaling factor {sd.scaling_factor:.4f}")

fig, axes = plt.subplots(2, 1, figsize=(10, 2.8))
show_images(x.float() / 127.5 - 1, nrow=16, ax=axes[0], title="CIFAR-10 test images")
show_images(rec, nrow=16, ax=axes[1], title="decode(encode(x)): what the latent keeps")
plt.tight_layout()
plt.show()

z_many = sd.encode(test.images)
mse = ((sd.decode(z_many) - (test.images.float() / 127.5 - 1)) ** 2).mean().item()
psnr = 10 * np.log10(4 / mse)
print(f"scaled latents: mean {z_many.mean():.3f}, std {z_many.std():.3f};  reconstruction PSNR {psnr:.1f} dB")
assert z.shape[1:] == (4, 8, 8)
assert 0.8 < z_many.std() < 1.25, "the scaling factor keeps the latents' scale near 1"
assert psnr > 20

# %% [markdown]
# The reconstructions are softer than the originals: 256 numbers cannot hold every edge of a 32×32 photo. The
# decoder was trained in two phases (`minilcm.latents`): first with a pixel loss and the KL term, which makes it
# average what it cannot know; then, with the encoder frozen, with LDM's recipe for sharpness: a perceptual distance
# (in the feature maps of the course's own CIFAR-10 classifier, where LDM uses LPIPS) and a patch discriminator. The
# second phase took the reconstructions' FD-clf on the 10k test set from 93.9 to 29.0 at PSNR 24.1 dB (its
# `meta.json`). One caveat: that classifier is also FD-clf's feature extractor (its pooled last stage, which the
# perceptual distance does not use), so FD-clf flatters this decoder somewhat. As a rule of thumb a latent model is
# not sharper than its decoder's reconstructions, and the benchmark below carries them as a reference row; it is a
# heuristic, not a bound.
#
# ## 2. Text, classifier-free guidance, and the augmented PF-ODE
#
# The caption goes through a tokenizer and a CLIP text encoder, exactly as in Stable Diffusion. Ours is small and
# was *frozen at its random initialisation*: ten captions only need to be told apart, and a fixed encoder keeps the
# teacher's training as simple as SD's, whose CLIP encoder is frozen too. The UNet learns to read it through
# cross-attention. 10% of training captions were replaced by the empty prompt, so the same UNet is also the
# unconditional model that CFG needs.

# %%
tok = sd.tokenizer
ids = tok("a photo of a cat").input_ids
print(tok.convert_ids_to_tokens(ids))
c = sd.embed(["a photo of a cat", "a photo of a dog"])
print("text states:", tuple(c.shape), "  empty prompt:", tuple(sd.empty.shape))

# %% [markdown]
# With CFG the teacher's eps becomes $\hat\epsilon_w = (1 + w)\epsilon_c - w\,\epsilon_\varnothing$ (LCM's
# convention: $w = 0$ is the plain conditional model; diffusers' `guidance_scale` is $w + 1$). `guidance.guided_eps`
# evaluates both terms in **one** batched call of $2B$ rows. The ODE that this guided eps drives is the
# *augmented PF-ODE*; its DDIM step is `guidance.guided_ddim_step`. Let us check the fused call against two separate
# calls, then look at what $w$ does to the teacher's samples.
#
# In equations (LCM, Luo et al. 2023, Eq. 8 and 9; $\alpha_t = \sqrt{\bar\alpha_t}$, $\sigma_t = \sqrt{1-\bar\alpha_t}$
# as in the whole course), the augmented PF-ODE is the PF-ODE of Chapter 2 with the guided eps in place of eps:
#
# $$\frac{dz_t}{dt} = f(t)\,z_t + \frac{g^2(t)}{2\sigma_t}\,\hat\epsilon_w(z_t, c, t), \qquad
#   \hat\epsilon_w = (1 + w)\,\epsilon_\theta(z_t, c, t) - w\,\epsilon_\theta(z_t, \varnothing, t),$$
#
# and one DDIM step of it from $t$ down to $s$ (the solver $\Psi$ of LCD) is
#
# $$\hat z_s = \alpha_s\,\hat x_0 + \sigma_s\,\hat\epsilon_w, \qquad \hat x_0 = \frac{z_t - \sigma_t\,\hat\epsilon_w}{\alpha_t}.$$

# %%
from minilcm.guidance import guided_eps

g = torch.Generator().manual_seed(0)
xt = torch.randn(4, 4, 8, 8, generator=g)
cond = {"encoder_hidden_states": sd.embed(sd.prompts([0, 1, 2, 3]))}
uncond = sd.conditioning.null(cond)
w = 2.0
with torch.no_grad():
    fused = guided_eps(sd.unet, xt, 500, cond, uncond, w)
    e_c = sd.unet(xt, 500, **cond).sample
    e_u = sd.unet(xt, 500, **uncond).sample
assert torch.allclose(fused, (1 + w) * e_c - w * e_u, atol=1e-4)
print("fused CFG call == (1 + w) eps_c - w eps_u:", (fused - ((1 + w) * e_c - w * e_u)).abs().max().item())

# %%
per_class = pick(fast=5, cpu=10, gpu=20)
labels = torch.arange(10).repeat_interleave(per_class)
ws = (0.0, 1.0, 3.0)
teacher_acc, grids = {}, {}
t0 = time.perf_counter()
for w in ws:
    imgs = sd.sample("dpm_solver_pp", 25, labels=labels, w=w, generator=torch.Generator().manual_seed(1))
    teacher_acc[w] = ev.class_accuracy(imgs, labels)
    grids[w] = imgs
print(f"teacher, DPM-Solver++ 25 steps ({time.perf_counter() - t0:.0f} s):",
      {f"w={w:g}": f"{a:.0%}" for w, a in teacher_acc.items()}, "of samples classified as their caption's class")
fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
for ax, w in zip(axes, ws):
    pick_rows = torch.cat([torch.arange(c * per_class, c * per_class + 3) for c in range(10)])
    show_images(grids[w][pick_rows], nrow=3, ax=ax, title=f"teacher, w = {w:g}\nclass acc {teacher_acc[w]:.0%}")
plt.suptitle("One row per class (airplane ... truck): guidance makes the class legible")
plt.tight_layout()
plt.show()
assert teacher_acc[3.0] > teacher_acc[0.0], "guidance should sharpen the classes"

# %% [markdown]
# ## 3. The student's w input
#
# LCM gives $w$ to the student the way diffusers' UNet takes any extra scalar: a sinusoidal embedding (the same
# formula as the timestep's, $\mathrm{emb}(w)_j = \sin(1000w\,\omega_j)$ for the first half of the channels and
# $\cos(1000w\,\omega_j)$ for the second, $\omega_j = 10000^{-j/(d/2-1)}$, $d = 256$) projected and added to the time embedding — `UNet2DConditionModel(time_cond_proj_dim=256)`
# fed with `timestep_cond`. `lcm.lcm_student` copies the teacher and adds that projection. The reference script
# leaves it at its random initialisation, and so does `lcm_student` by default (`w_init="random"`): the fresh student
# already answers differently to different $w$, and training shapes that answer. With `w_init="zero"` the fresh
# student is exactly the teacher's denoiser for every $w$. (The shipped student was distilled with the zero start;
# the next one starts random, as the reference does.)

# %%
from minilcm.lcm import guidance_embedding, lcm_student

emb = guidance_embedding(torch.linspace(0, 4, 81), 256)
fig, ax = plt.subplots(figsize=(8, 2.5))
ax.imshow(emb.T, aspect="auto", cmap="RdBu", extent=[0, 4, 256, 0])
ax.set(xlabel="w", ylabel="embedding channel", title="guidance_embedding(w, 256): what the student sees of w")
plt.show()

t = torch.full((4,), 699.0)
for init in ("zero", "random"):
    torch.manual_seed(0)
    fresh = lcm_student(sd.unet, sd.schedule, w_dim=256, w_init=init).eval()
    with torch.no_grad():
        a = fresh(xt, t, **cond, timestep_cond=guidance_embedding(torch.zeros(4), 256))
        b = fresh(xt, t, **cond, timestep_cond=guidance_embedding(torch.full((4,), 3.0), 256))
    print(f"fresh student, w_init={init!r}: max |f(w=0) - f(w=3)| = {(a - b).abs().max():.3g}")
    assert torch.equal(a, b) == (init == "zero"), "only the zero start ignores w"

# %% [markdown]
# ## 4. Latent consistency distillation
#
# `lcm.LatentConsistencyDistillation` is Algorithm 1 of the paper, as a loss for the course's one training loop.
# For each latent $z_0$ with caption $c$:
#
# 1. draw a grid time $t_{n+k}$ (the skipping step: $k = 20$, so the grid is 19, 39, …, 999), $w \sim U[w_\min,
#    w_\max]$ and noise; form $z_{n+k}$;
# 2. **one guided DDIM step of the teacher** from $t_{n+k}$ to $t_n = t_{n+k} - k$ (one fused call of $2B$ rows);
# 3. ask the student at $(z_{n+k}, t_{n+k})$ and the EMA target at $(\hat z_n, t_n)$ for the same origin, both
#    told $w$; the loss is the pseudo-Huber distance between the two.
#
# As one formula (the paper's Eq. 10 with the skipping step of its Sec. 4.3, and the lowest grid time clamped to 0 as
# the reference script does):
#
# $$\mathcal L_{\mathrm{LCD}}(\theta, \theta^-) = \mathbb E_{z_0, c, w, n}\Big[d\Big(f_\theta(z_{t_{n+k}}, w, c, t_{n+k}),\;
#   f_{\theta^-}\big(\hat z^{\Psi, w}_{t_n}, w, c, t_n\big)\Big)\Big], \qquad t_n = \max(t_{n+k} - k,\, 0),$$
#
# with $f_\theta(z, w, c, t) = c_\mathrm{skip}(t)\,z + c_\mathrm{out}(t)\,\hat x_0^\theta(z, w, c, t)$ (Chapter 4's
# boundary condition, $f_\theta(z, w, c, 0) = z$), $d(a, b) = \sqrt{\lVert a - b\rVert^2 + c^2} - c$ per sample, and
# the target's weights an EMA of the student's, $\theta^- \leftarrow \mu\,\theta^- + (1 - \mu)\,\theta$ with
# $\mu = 0.95$. What ships is $\theta^-$.
#
# Here are a few steps of it on CIFAR-10 latents (a handful in the `fast` profile). The shipped student ran the
# same code for much longer (`minilcm train lcm`); its record is printed below.

# %%
from minilcm.latents import LatentSet
from minilcm.guidance import TextConditioning
from minilcm.lcm import LatentConsistencyDistillation
from minilcm.models.sd import CAPTION_TEMPLATES, class_caption_table
from minilcm.train import TrainConfig, train

n_lat = pick(fast=256, cpu=2000, gpu=20000)
train_set = cifar10("train").subset(n_lat)
latents = sd.encode(train_set.images)
caps = sd.embed(class_caption_table())  # every class x every caption template
caps = caps.reshape(10, len(CAPTION_TEMPLATES), *sd.empty.shape)  # (10 classes, templates, L, D)
data = LatentSet(latents, train_set.labels, caps)

demo_student = lcm_student(sd.unet, sd.schedule, w_dim=256)
lcd = LatentConsistencyDistillation(sd.unet, demo_student, TextConditioning(sd.empty), k=20, w_min=0.0, w_max=4.0)
res = train(demo_student, lcd, data, TrainConfig(steps=pick(fast=4, cpu=60, gpu=500), batch_size=pick(fast=8, cpu=32,
                                                                                                      gpu=128),
                                                 lr=1e-4, warmup_steps=pick(fast=2, cpu=20, gpu=50), device="cpu",
                                                 desc="LCD (demo)"))
k = max(1, len(res.losses) // 5)
print(f"{len(res.losses)} LCD steps in {res.seconds:.1f} s; mean loss of the first / last {k} steps: "
      f"{np.mean(res.losses[:k]):.4f} / {np.mean(res.losses[-k:]):.4f}")
assert all(np.isfinite(res.losses))

print("shipped student:", {k: student.meta.get(k) for k in ("steps", "images_seen", "k", "w_min", "w_max",
                                                            "wall_seconds", "hardware")})

# %% [markdown]
# ## 5. Sampling: 1, 2 and 4 steps
#
# The LCM sampler (`lcm.lcm_sample`, Algorithm 3, equal to diffusers' `LCMScheduler`) jumps from noise to a
# clean estimate, re-noises it to the next, lower timestep, and jumps again. For timesteps $\tau_1 > \tau_2 > \dots >
# \tau_N$ and $z_{\tau_1} \sim \mathcal N(0, I)$:
#
# $$\hat x_0^{(i)} = f_\theta(z_{\tau_i}, w, c, \tau_i), \qquad
#   z_{\tau_{i+1}} = \alpha_{\tau_{i+1}}\,\hat x_0^{(i)} + \sigma_{\tau_{i+1}}\,\epsilon_i, \quad \epsilon_i \sim \mathcal N(0, I),$$
#
# and the sample is $\hat x_0^{(N)}$. CFG is baked in: each step is **one** student evaluation of $B$ rows, where each
# teacher step costs $2B$. Same noise, same captions, side by side:

# %%
labels16 = torch.arange(10)
rows, names = [], []
for name, sampler, steps in [("teacher DDIM, 4 steps", "ddim", 4), ("teacher DPM-Solver++, 25 steps", "dpm_solver_pp", 25),
                             ("LCM, 1 step", "lcm", 1), ("LCM, 2 steps", "lcm", 2), ("LCM, 4 steps", "lcm", 4)]:
    rows.append(sd.sample(sampler, steps, labels=labels16, w=1.0, student=student,
                          generator=torch.Generator().manual_seed(3)))
    names.append(name)
fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.25 * len(rows) + 0.6))
for ax, r, name in zip(axes, rows, names):
    show_images(r, nrow=10, ax=ax, title=name)
plt.suptitle("w = 1; columns: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck")
plt.tight_layout()
plt.show()

# %% [markdown]
# And the student's $w$ knob: the same student, the same noise, three guidance scales — no extra evaluations.
# (On the 2-D mixture, `tests/test_lcm.py` shows a w-conditioned student sharpening its classes as $w$ grows, as the
# teacher does. Here, watch whether the shipped CIFAR student has learned that yet.)

# %%
student_acc = {}
labels_s = torch.arange(10).repeat_interleave(pick(fast=20, cpu=50, gpu=100))  # the student is cheap: more images
for w in ws:
    imgs = sd.sample("lcm", 4, labels=labels_s, w=w, student=student, generator=torch.Generator().manual_seed(1))
    student_acc[w] = ev.class_accuracy(imgs, labels_s)
print("LCM, 4 steps:", {f"w={w:g}": f"{a:.0%}" for w, a in student_acc.items()},
      "  (teacher, 25 steps:", {f"w={w:g}": f"{a:.0%}" for w, a in teacher_acc.items()}, ")")
assert min(student_acc.values()) > 0.2, "the student's samples should be recognisable far above chance (10%)"

# %% [markdown]
# ## 6. The headline: 4 steps instead of 25, at least 5× faster, CFG included
#
# One run measures everything with the same seeds and class-balanced captions (`minilcm.bench.model_benchmark`,
# also `minilcm bench` and Chapter 7): the teacher's DDIM and DPM-Solver++ at 4, 8 and 25 steps, and LCM at 1, 2
# and 4. **FD-clf** is the Fréchet distance between the features of our CIFAR-10 classifier for the samples and
# for the test set — a proxy for FID (lower is better), comparable between rows, not with published FIDs. Time
# per image is wall clock for sampling and decoding on this machine, with the teacher's doubled CFG rows included.

# %%
from IPython.display import Markdown, display

from minilcm.bench import HEADLINE, model_benchmark

plan = {"mini-SD teacher": [("ddim", (4, 8, 25)), ("dpm_solver_pp", (4, 8, 25))], "LCM student": [("lcm", (1, 2, 4))]}
bench = model_benchmark(n=pick(fast=100, cpu=500, gpu=5000), w=1.0, out=None, plan=plan, progress=False)
display(Markdown(bench["table"]))

# %%
rows = {(r["sampler"], r["steps"]): r for r in bench["rows"]}
lcm4, lcm2, ddim4, dpm25 = rows[("lcm", 4)], rows[("lcm", 2)], rows[("ddim", 4)], rows[("dpm_solver_pp", 25)]
speedup = dpm25["sec_per_image"] / lcm4["sec_per_image"]
print(f"LCM@4: FD-clf {lcm4['fd_clf']:.1f} vs teacher DPM-Solver++@25 {dpm25['fd_clf']:.1f} "
      f"(ratio {lcm4['fd_clf'] / dpm25['fd_clf']:.2f}, target <= {HEADLINE['lcm4_fd_ratio_max']:g}), "
      f"{speedup:.1f}x faster (target >= {HEADLINE['lcm4_speedup_min']:g})")
print(f"LCM@2: ratio {lcm2['fd_clf'] / dpm25['fd_clf']:.2f} (target <= {HEADLINE['lcm2_fd_ratio_max']:g});  "
      f"teacher DDIM@4: FD-clf {ddim4['fd_clf']:.1f}")
assert lcm4["fd_clf"] < ddim4["fd_clf"], "at the same 4 steps, the distilled student must beat the teacher's DDIM"
assert speedup >= HEADLINE["lcm4_speedup_min"]

# %% [markdown]
# ## What you just saw
#
# - **Latents** are 12× smaller than the images; a measured scaling factor sets their scale (the shipped one leaves
#   std 1.1 and mean 0.7, see Section 1); the decoder's reconstructions are a rough ceiling on sharpness.
# - **CFG** is one fused teacher call of $2B$ rows per step; guidance makes the classes legible (the class accuracy
#   rises with $w$ for the teacher).
# - **LCD** distils the *augmented* PF-ODE — the guided one — with a skipping step $k = 20$ and a student that takes
#   $w$ as an input, at $B$ rows per step instead of the teacher's $2B$. Whether it *uses* that input is measured
#   above, and the shipped student mostly does not (next bullets).
# - **The headline, measured here:** the table above puts LCM at 4 steps against the teacher's 25-step DPM-Solver++
#   on FD-clf and time per image. In the committed run (cpu profile, 500 images per row, this repository's 2-core
#   CPU) LCM@4 scored FD-clf 181 against 183 (ratio 0.99, target ≤ 1.15) and was 11.4× faster (9.9× in the previous
#   run: the ratio moves with what else shares the 2 cores); LCM@2 had ratio 0.94 (target ≤ 1.3); the teacher's own
#   4-step DDIM scored 271. The cells assert the part that must hold at any
#   sample size: LCM@4 beats DDIM@4, and is at least 5× faster than DPM-Solver++@25.
# - **What a short distillation does not buy:** the student was distilled for 1,000 steps on a CPU, and its $w$
#   input has barely left its zero initialisation: its class accuracy is about the same at every $w$ (44-46% in the
#   committed run, against the teacher's 18% → 57%). It learned the guided ODE averaged over $w \in [0, 4]$, not yet
#   its dependence on $w$ — that takes a longer (GPU) distillation. Everything here is also capped by the
#   autoencoder (its reconstructions alone score FD-clf 105 at this N).
#
# Chapter 6 runs the very same `LatentConsistencyDistillation` on a Stable Diffusion teacher; Chapter 7 benchmarks
# every shipped model.
