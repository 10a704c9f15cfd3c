"""The Chapter 5 mini Stable Diffusion and its LCM student, loaded and sampled with the course's samplers.

    sd = MiniSD.load()                       # data/checkpoints/minisd-cifar10, a StableDiffusionPipeline folder
    x = sd.sample("dpm_solver_pp", 25, labels, w=1.0)                 # the teacher under CFG: (B, 3, 32, 32)
    student = zoo.load_lcm_student()         # data/checkpoints/lcm-cifar10: the w-conditioned consistency model
    x = sd.sample("lcm", 4, labels, w=1.0, student=student)

Every teacher sampler runs the guided eps (``guidance.GuidedEps``: one fused batch of 2B rows per evaluation, so the
teacher's NFE counts CFG's doubled work once per step but costs twice the rows); the LCM student bakes w in and
costs B rows per step. Time is the diffusers-style timestep of Stable Diffusion's scaled_linear schedule.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .checkpoints import load_pretrained, resolve_folder
from .datasets import CIFAR10_CLASSES
from .guidance import GuidedEps, TextConditioning
from .latents import decode, encode, vae_factors
from .models.sd import CAPTION_TEMPLATES, encode_prompts
from .samplers import TEACHER_SAMPLERS, run_sampler
from .schedules import Schedule

MINISD_NAME, LCM_NAME = "minisd-cifar10", "lcm-cifar10"


class MiniSD:
    """A StableDiffusionPipeline's parts in the course's convention: ``unet(x, t, encoder_hidden_states=...)`` is the
    eps-model on *scaled* latents z = scaling_factor * (E(x) - latents_mean) / latents_std (``latents.vae_factors``:
    per channel, from the vae's config); ``decode`` maps them back to images in [-1, 1]."""

    def __init__(self, pipe, device="cpu"):
        self.pipe = pipe
        self.unet, self.vae = pipe.unet.float().eval().to(device), pipe.vae.float().eval().to(device)
        self.text_encoder, self.tokenizer = pipe.text_encoder.float().eval().to(device), pipe.tokenizer
        self.scaling_factor, self.latents_mean, self.latents_std = vae_factors(pipe.vae)
        self.schedule = Schedule("scaled_linear")
        self.device = torch.device(device)
        self.latent_shape = (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)
        self.empty = self.embed([""])[0]  # (L, D): the unconditional input of CFG
        self.conditioning = TextConditioning(self.empty)

    @classmethod
    def load(cls, name_or_path=MINISD_NAME, device="cpu") -> "MiniSD":
        """Load a StableDiffusionPipeline folder (a shipped name or a path), offline."""
        path = resolve_folder(name_or_path, "model_index.json",
                              "train it with `minilcm train autoencoder` then `minilcm train minisd`")
        pipe = load_pretrained(StableDiffusionPipeline, path, "mini-SD pipeline", dtype=torch.float32,
                                local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, device)

    @property
    def meta(self) -> dict:
        p = Path(self.pipe.config._name_or_path) / "meta.json"
        return json.loads(p.read_text()) if p.exists() else {}

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder states (B, L, D) of prompts, padded to the tokenizer's max length as Stable Diffusion does."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)

    def prompts(self, labels, template: int = 0) -> list[str]:
        """The course captions of CIFAR-10 class indices ("a photo of a cat")."""
        return [CAPTION_TEMPLATES[template].format(CIFAR10_CLASSES[int(c)]) for c in labels]

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, 32, 32), float32 on the CPU, from scaled latents."""
        return decode(self.vae, z, batch, self.scaling_factor, self.latents_mean, self.latents_std).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
        return encode(self.vae, images, batch, self.scaling_factor, mean=self.latents_mean, std=self.latents_std)

    def teacher(self, w: float) -> GuidedEps:
        """The guided teacher eps_w = (1 + w) eps(x, t, c) - w eps(x, t, "") as one eps-model (LCM's convention)."""
        return GuidedEps(self.unet, self.conditioning, w)

    @torch.no_grad()
    def sample_latents(self, sampler: str, steps: int, cond: torch.Tensor, w: float = 1.0, *, student=None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents (B, 4, 8, 8) for text states ``cond`` (B, L, D) with ``steps`` model evaluations.

        sampler: ddpm / ddim / dpm_solver / dpm_solver_pp (the guided teacher on diffusers' trailing grid plus the
        final step to clean data: NFE = steps; dpm_solver is 2nd order, so steps // 2 steps) or lcm (``student``).
        """
        if sampler == "lcm" and student is None:
            raise ValueError("sampler 'lcm' needs the LCM student: pass student=load_lcm_student()")
        if sampler not in TEACHER_SAMPLERS + ("lcm",):
            raise ValueError(f"unknown sampler {sampler!r} for the mini-SD; choose one of "
                             f"{', '.join(TEACHER_SAMPLERS + ('lcm',))}")
        x = torch.randn((cond.shape[0], *self.latent_shape), generator=generator).to(self.device)
        model = student if sampler == "lcm" else self.unet
        return run_sampler(sampler, model, x, self.schedule, steps, cond={"encoder_hidden_states": cond.to(self.device)},
                           conditioning=self.conditioning, w=w, generator=generator).x

    def sample(self, sampler: str, steps: int, labels=None, prompts=None, w: float = 1.0, *, student=None,
               generator=None, batch: int = 250) -> torch.Tensor:
        """Images in [-1, 1] for class ``labels`` (their captions) or free ``prompts``."""
        prompts = list(prompts) if prompts is not None else self.prompts(labels)
        out = []
        for i in range(0, len(prompts), batch):
            cond = self.embed(prompts[i:i + batch])
            out.append(self.decode(self.sample_latents(sampler, steps, cond, w, student=student,
                                                       generator=generator)))
        return torch.cat(out)
