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
# # Chapter 8 — Next steps: the GPU profile, capstone projects, and where to read on
#
# **The road, walked:** DDPM → the SDE / probability-flow ODE view → DDIM and DPM-Solver → consistency models →
# latent consistency models (LCM) → the same distillation on Stable Diffusion → measuring all of it → **your turn.**
#
# **Time:** about 10 minutes to read; a few seconds to run. **Needs:** Chapters 1–7. Symbols:
# [the notation sheet](../docs/notation.md).
#
# Every model this course ships was trained on a 2-core CPU in under an hour. This chapter says what changes with a
# GPU, proposes projects that extend the package the way `docs/architecture.md` describes, each with a starting
# point and a number to beat, and lists what to read next.

# %%
import json

from minilcm.notebook import setup  # first: it silences tqdm's import-time warning
from minilcm.profiles import SIZES
from minilcm.zoo import shipped_meta

PROFILE = setup()

# %% [markdown]
# ## 1. The gpu profile
#
# One environment variable sizes everything: `MINILCM_PROFILE=gpu` (the default when CUDA is present). The notebooks
# then train and sample at the sizes below, and every stage of the recipe trains at its gpu row:
#
#     MINILCM_PROFILE=gpu minilcm train minisd --out runs/minisd-gpu    # a stage, at its gpu size
#     MINILCM_PROFILE=gpu minilcm train lcm --out runs/lcm-gpu --steps 5000 --batch 128   # capped from the command line
#     minilcm train lcm --out runs/lcm-10min --minutes 10               # as many steps as fit in 10 minutes
#     MINILCM_PROFILE=gpu minilcm bench --n 10000                       # the benchmark at 10k images per row
#
# `--out` keeps the shipped checkpoints in `data/checkpoints/` untouched; replacing those needs `--replace-shipped`.
# The table compares the cpu rows, which trained what ships, with the gpu rows:

# %%
print(f"{'stage':10s} {'field':14s} {'cpu':>10s} {'gpu':>10s}")
for stage in ("autoencoder", "minisd", "lcm", "ddpm", "cd"):
    rows = SIZES.get(stage, {})
    for field in ("steps", "batch_size", "size", "guidance_steps"):
        if field in rows.get("cpu", {}) or field in rows.get("gpu", {}):
            print(f"{stage:10s} {field:14s} {str(rows['cpu'].get(field, '-')):>10s} {str(rows['gpu'].get(field, '-')):>10s}")
meta = shipped_meta("lcm-cifar10")
print("\nthe shipped LCM student:", json.dumps({k: meta.get(k) for k in ("steps", "images_seen", "wall_seconds",
                                                                        "hardware", "date")}))
assert SIZES["lcm"]["gpu"]["steps"] > SIZES["lcm"]["cpu"]["steps"]

# %% [markdown]
# **What it has not yet done.** No GPU has been lent to this project so far: the gpu rows have never run end to
# end, and their step counts add up to hours on one GPU. `--minutes M` trains any stage to a wall-clock budget
# instead (it times the first steps and fits the step count and the learning-rate schedule to M), and
# `bash scripts/gpu_run.sh` is the one-command GPU run: the Chapter 5 teacher and student, then the pixel teacher and
# its CD student, 4 minutes of training in all, then the benchmarks, within one 10-minute command
# (`bash scripts/gpu_run.sh dry-run` runs the same path on a CPU in a few minutes). What the gpu profile is for, in
# this course's own measurements:
#
# * **Chapter 5's $w$ knob.** The shipped student's class accuracy moves by 20 points from $w$ = 0 to 3 where the
#   teacher's moves by 50; the 2-D experiment of Chapter 5 says a longer distillation closes that gap.
# * **A pixel teacher worth distilling.** The CPU teacher of Chapters 1–4 (1.1M parameters) draws blurry scenes; the
#   gpu row trains the 6.5M `small` UNet (12.4 MiB in fp16, within the 16 MiB a GPU run brings back per file;
#   the 35.7M `base` one would not be).
# * **The LCD throughput row** of the README (ours against the reference script's per-step work, SD-v1.5 shapes):
#   `python benchmarks/lcd_throughput.py` on a GPU.

# %% [markdown]
# ## 2. Capstone projects
#
# Each starts from a named place in the package and ends with a number `minilcm` can measure. The architecture
# document says how to add a sampler, a loss or a model so that `minilcm sample`, `minilcm bench` and the tests
# pick it up.
#
# 1. **Flow matching on the same oracle.** Train a velocity model on the 2-D mixture with the straight path
#    $x_t = (1 - t)x_0 + t\epsilon$ (Lipman et al. 2023; rectified flow, Liu et al. 2023). *Start:* the worked
#    example "a flow-matching loss" in `docs/architecture.md`, `minilcm.train`, `minilcm.toys.GaussianMixture`.
#    *Goal:* sliced Wasserstein distance to the data at 4 Euler steps below DDIM's at 4 steps on the exact oracle
#    (Chapter 4 prints DDIM's); after one reflow, below that again.
# 2. **DPM-Solver-fast against UniPC.** Add UniPC (Zhao et al. 2023) to the sampler registry. *Start:*
#    `minilcm/solvers.py` and its `SAMPLERS`, `minilcm.solver_bench`. *Goal:* agree with diffusers'
#    `UniPCMultistepScheduler` to $10^{-5}$, and report the error to the converged ODE at 5, 6, 8 and 10 NFE on the
#    oracle beside `dpm_solver_fast` (Chapter 3's benchmark).
# 3. **TCD or DMD against LCM.** Trajectory consistency distillation (Zheng et al. 2024) or distribution matching
#    distillation (Yin et al. 2024) of the mini-SD teacher. *Start:* `minilcm.lcm.LatentConsistencyDistillation`
#    and `latent_stages.build_lcm`. *Goal:* a lower FD-clf than `lcm-cifar10` at 1 and 2 steps in one
#    `minilcm bench --n 1000 --no-pixel` run, at no more training steps.
# 4. **LCM-LoRA with a style LoRA.** Train a style LoRA on one CIFAR-10 class with the tiny SD pipeline, then
#    compose it with an LCM-LoRA by adapter weights, $\theta' = \theta + \lambda_1\tau' + \lambda_2\tau_\text{LCD}$
#    (Chapter 6, Exercise 6.3). *Start:* `minilcm sd-distill --mode lora`, diffusers' `set_adapters`. *Goal:* at 4
#    steps, the composed pipeline's class accuracy for the style's class within 5 points of the style LoRA's at 25
#    teacher steps.
# 5. **A true FID.** With Inception-v3 weights on disk, `minilcm.evaluator.InceptionFeatures` computes FID with the
#    same code as FD-clf. *Goal:* the Spearman rank correlation between FD-clf and FID over the rows of one
#    `minilcm bench` table, which the course has never measured (Chapter 7).
# 6. **One-step LCM.** The shipped student scores about 1.1× its teacher's 25-step FD-clf at one step. *Start:* the
#    lcm stage's `k`, `w_max`, its guidance warm start, and the sampler's timesteps. *Goal:* LCM@1 within 1.05× of
#    the teacher's DPM-Solver++ 25 in one `minilcm bench` run.
# 7. **The $w$ knob.** *Goal:* the student's 4-step class accuracy within 8 points of the teacher's at each of
#    $w$ = 0, 1 and 3 (1,000 images each), Chapter 5's open target. *Start:* `minilcm train lcm` with more steps, a
#    larger skipping step, or the guidance-distillation warm start's length.

# %% [markdown]
# ## Summary
#
# * The gpu profile is one variable away; `--minutes` trains any stage to a time budget, `--steps` / `--batch` cap
#   it; the shipped checkpoints stay put
#   unless `--replace-shipped` is given.
# * Seven projects, each with a place to start and a number to reach.
#
# ## Reading
#
# * Lipman et al. 2023, *Flow Matching for Generative Modeling* ([arXiv 2210.02747](https://arxiv.org/abs/2210.02747));
#   Liu, Gong & Liu 2023, *Flow Straight and Fast* ([arXiv 2209.03003](https://arxiv.org/abs/2209.03003)).
# * Zhao et al. 2023, *UniPC* ([arXiv 2302.04867](https://arxiv.org/abs/2302.04867)).
# * Zheng et al. 2024, *Trajectory Consistency Distillation* ([arXiv 2402.19159](https://arxiv.org/abs/2402.19159));
#   Yin et al. 2024, *One-step Diffusion with Distribution Matching Distillation* ([arXiv 2311.18828](https://arxiv.org/abs/2311.18828)).
# * Kim et al. 2024, *Consistency Trajectory Models* ([arXiv 2310.02279](https://arxiv.org/abs/2310.02279)); Lu &
#   Song 2024, *Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models* ([arXiv 2410.11081](https://arxiv.org/abs/2410.11081)).
# * Karras et al. 2022, *Elucidating the Design Space of Diffusion-Based Generative Models* ([arXiv 2206.00364](https://arxiv.org/abs/2206.00364)),
#   read again after this course: most of its choices now have a name.
