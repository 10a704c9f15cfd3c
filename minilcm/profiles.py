"""One knob sizes every notebook's work: ``MINILCM_PROFILE`` = fast | cpu | gpu.

fast  CI: seconds per cell, just enough to prove the code runs and the claims hold.
cpu   a learner's laptop (default without CUDA): minutes at most.
gpu   default when CUDA is present: the real thing.

    from minilcm.profiles import PROFILE, pick
    steps = pick(fast=300, cpu=3000, gpu=20000)

The recipe's sizes are one table, ``SIZES``: recipe -> profile -> sizes; ``sizes("ddpm")`` is the active
profile's row. ``minilcm.stages`` trains each stage with its row, and ``minilcm.recipes`` sizes the notebooks'
CIFAR-10 teacher and consistency student with theirs.
"""
from __future__ import annotations

import os
import platform

import torch

from .errors import InputError

PROFILES = ("fast", "cpu", "gpu")


def current() -> str:
    """The active profile: $MINILCM_PROFILE, else gpu with CUDA, else cpu."""
    p = os.environ.get("MINILCM_PROFILE", "").strip().lower()
    if not p:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if p not in PROFILES:
        raise InputError(f"MINILCM_PROFILE={p!r} is not a profile; set it to one of {', '.join(PROFILES)}")
    return p


PROFILE = current()


def pick(fast, cpu, gpu=None):
    """The value for the active profile (``gpu`` defaults to ``cpu``)."""
    return {"fast": fast, "cpu": cpu, "gpu": cpu if gpu is None else gpu}[current()]


# ---- the recipe's sizes ------------------------------------------------------------------------------
# gpu is the full recipe; cpu the CPU-sized fallback shipped when no GPU was available; fast a smoke test.
# n_train: the CIFAR-10 training images used (None: all 50,000). n_samples: the images each sample metric draws.
SIZES = {
    # the FD-clf classifier (``minilcm train evaluator``); steps = epochs * 50,000 / 256
    "evaluator": {
        "fast": dict(widths=(8, 16, 16, 16), epochs=0.02, lr=2e-3),
        "cpu": dict(widths=(64, 128, 256, 256), epochs=15, lr=3e-3),
        "gpu": dict(widths=(64, 128, 256, 256), epochs=20, lr=3e-3)},
    # the mini-SD autoencoder, its latent teacher UNet and the LCM student distilled from it (Chapter 5)
    "autoencoder": {
        # phase 1 (L2 + KL) steps, then phase 2: the decoder alone with the perceptual and patch-GAN terms
        "fast": dict(size="tiny", steps=3, batch_size=8, decoder_steps=3, decoder_lr=1e-4, perceptual_weight=0.5,
                     adv_weight=0.05, disc_start=1),
        "cpu": dict(size="mini", steps=2500, batch_size=64, decoder_steps=1500, decoder_lr=1e-4,
                    perceptual_weight=0.5, adv_weight=0.05, disc_start=300),
        "gpu": dict(size="mini", steps=20_000, batch_size=128, decoder_steps=5000, decoder_lr=1e-4,
                    perceptual_weight=0.5, adv_weight=0.05, disc_start=1000)},
    "minisd": {
        "fast": dict(size="tiny", steps=3, batch_size=8, lr=1e-3, ema_decay=0.9, n_train=64),
        "cpu": dict(size="mini", steps=3500, batch_size=128, lr=1e-3, ema_decay=0.999, n_train=None),
        "gpu": dict(size="mini", steps=60_000, batch_size=256, lr=3e-4, ema_decay=0.9999, n_train=None)},
    "lcm": {
        # the export is the LCD target theta^- (mu = 0.95), so no separate training EMA
        # w_lr_mult: the w projection (cond_proj) trains at this multiple of lr (a short run barely moves it at 1x)
        # guidance_steps: the guidance-distillation warm start before LCD (lcm.GuidanceDistillation; 0 = none)
        "fast": dict(steps=2, batch_size=4, lr=1e-4, n_train=64, w_lr_mult=10, guidance_steps=2),
        "cpu": dict(steps=1000, batch_size=64, lr=1e-4, n_train=None, w_lr_mult=10, guidance_steps=6000),
        "gpu": dict(steps=20_000, batch_size=256, lr=5e-5, n_train=None, w_lr_mult=10, guidance_steps=2000)},
    # the pixel DDPM teacher of Chapters 1-4 and its consistency-distilled student (Chapter 4): recipes fields
    "ddpm": {
        "fast": dict(size="tiny", steps=3, batch_size=8, lr=1e-3, warmup_steps=0, ema_decay=0.9, lr_decay="none"),
        "cpu": dict(size="tiny", steps=6000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                    lr_decay="cosine"),
        # gpu: "small" (6M parameters, 12 MB in fp16) ships within the 16 MiB a GPU run brings back; "base"
        # (36M, 71.5 MB) does not. Trained to a budget by scripts/gpu_run.py, the steps are what fits.
        "gpu": dict(size="small", steps=40_000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999,
                    lr_decay="cosine")},
    "cd": {
        "fast": dict(steps=2, batch_size=4, lr=1e-4, warmup_steps=1, ema_decay=0.9),
        "cpu": dict(steps=1200, batch_size=32, lr=1e-4, warmup_steps=100, ema_decay=0.99),
        "gpu": dict(steps=20_000, batch_size=256, lr=4e-4, warmup_steps=1000, ema_decay=0.9999)},
    "pixel_metrics": {  # FD-clf and class accuracy of the two pixel stages' exports
        "fast": dict(n_samples=8), "cpu": dict(n_samples=1000), "gpu": dict(n_samples=2000)},
    # what a notebook trains when the shipped checkpoint is absent (recipes.cifar_teacher / cifar_cd_student)
    "cifar_teacher": {
        "fast": dict(size="tiny", steps=20, batch_size=32, lr=1e-3, warmup_steps=0, ema_decay=0.9),
        "cpu": dict(size="tiny", steps=200, batch_size=64, lr=1e-3, warmup_steps=50, ema_decay=0.995),
        "gpu": dict(size="base", steps=20_000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999)},
    "cifar_cd_student": {
        "fast": dict(steps=4, batch_size=8, lr=1e-4, warmup_steps=1, ema_decay=0.9),
        "cpu": dict(steps=40, batch_size=32, lr=1e-4, warmup_steps=10, ema_decay=0.99),
        "gpu": dict(steps=20_000, batch_size=256, lr=4e-4, warmup_steps=1000, ema_decay=0.9999)},
}


def sizes(recipe: str) -> dict:
    """The active profile's row of ``SIZES[recipe]`` (a fresh dict)."""
    return dict(pick(**SIZES[recipe]))


def hardware(device="cpu") -> str:
    """The machine a number was measured on: the GPU's name, or the CPU's model, cores and torch threads."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
