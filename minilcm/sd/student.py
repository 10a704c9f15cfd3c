"""The student and the loss of latent consistency distillation, built around the teacher's UNet.

    build(pipe, data, cfg, device)   (student, loss): the pieces ``minilcm.train`` runs
    add_lora(unet, rank, targets)    freeze the UNet and add LoRA adapters (peft); the trainable count
    lora_parameter_count(unet, r)    the same count without building adapters (works on a meta-device UNet)
    AdaptersOff(unet)                the LoRA student's teacher: the same UNet with its adapters switched off

Nothing here re-implements the method: the loss, the augmented PF-ODE solver step, the w-embedding and the
scalings are ``minilcm.lcm`` / ``minilcm.consistency`` (Chapter 5).

mode="full"  (Luo et al. 2023, arXiv 2310.04378, Sec. 4): the student is a copy of the teacher UNet with a
             w input added (``lcm_student``: randomly initialised, as in the reference script), trained with
             w ~ U[w_min, w_max]; the exported pipeline uses the target network theta- (the EMA of Algorithm 1).
mode="lora"  (LCM-LoRA, Luo et al. 2023b, arXiv 2311.05556): the student is the teacher's own UNet plus LoRA
             adapters (peft) at one fixed w; the teacher is the same UNet with its adapters switched off, and the
             target is the online student without gradients, so the GPU holds ONE UNet. The targeted layers are
             those of diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py.
"""
from __future__ import annotations

import torch
from torch import nn

from ..consistency import ConsistencyModel, LCMScalings, l2, pseudo_huber
from ..guidance import TextConditioning
from ..lcm import LatentConsistencyDistillation, lcm_student
from .config import LORA_TARGETS, DistillConfig
from .data import LatentCaptions
from .teacher import schedule_of


class AdaptersOff(nn.Module):
    """The teacher hidden inside a LoRA student: the same UNet, called with its adapters switched off.

    The UNet is NOT registered as a submodule, so the loss's ``.eval()``, ``.requires_grad_(False)``, ``.to()``
    and ``state_dict()`` leave the student alone."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.__dict__["unet"] = unet

    def forward(self, x, t, **cond):
        self.unet.disable_adapters()
        try:
            return self.unet(x, t, **cond)
        finally:
            self.unet.enable_adapters()


def add_lora(unet: nn.Module, rank: int = 64, targets=LORA_TARGETS) -> int:
    """Freeze ``unet`` and add LoRA adapters (rank r, alpha = r, Gaussian A, zero B: the student starts as the
    teacher) on the ``targets`` it has; returns the number of trainable parameters."""
    from peft import LoraConfig

    names = [n for n, _ in unet.named_modules()]
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=present))
    for p in unet.parameters():  # adapters train in fp32 even on a half-precision base
        if p.requires_grad:
            p.data = p.data.float()
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def lora_parameter_count(unet: nn.Module, rank: int = 64, targets=LORA_TARGETS) -> int:
    """r (d_in + d_out) per targeted Linear (r (c_in k^2) + c_out r per Conv2d), counted without building
    adapters: works on a meta-device UNet the size of SD v1.5."""
    n = 0
    for name, m in unet.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            if isinstance(m, nn.Linear):
                n += rank * (m.in_features + m.out_features)
            elif isinstance(m, nn.Conv2d):
                n += rank * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * rank
    return n


def build(pipe, data: LatentCaptions, cfg: DistillConfig, device) -> tuple[ConsistencyModel, nn.Module]:
    """The student (a ConsistencyModel around a UNet) and the LCD loss, for ``minilcm.train``."""
    schedule = schedule_of(pipe.scheduler)
    conditioning = TextConditioning(data.empty)
    distance = {"huber": pseudo_huber, "l2": l2}[cfg.distance]
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if device.type == "cuda" else None
    unet = pipe.unet if pipe.unet.dtype == torch.float32 else pipe.unet.float()
    if cfg.mode == "full":
        student = lcm_student(unet, schedule, cfg.w_dim)
        teacher = unet.to(device, half) if half else unet  # the frozen teacher runs in half precision
        loss = LatentConsistencyDistillation(teacher, student, conditioning, k=cfg.k, w_min=cfg.w_min,
                                             w_max=cfg.w_max, mu=cfg.mu, distance=distance)
    else:
        if half:
            unet.to(device, half)  # frozen base weights in half precision; adapters fp32 (add_lora)
        add_lora(unet, cfg.lora_rank, cfg.lora_targets)
        student = ConsistencyModel(unet, schedule, LCMScalings())
        loss = LatentConsistencyDistillation(AdaptersOff(unet), student, conditioning, k=cfg.k, fixed_w=cfg.w,
                                             share_target=True, distance=distance)
    if cfg.gradient_checkpointing:
        student.net.enable_gradient_checkpointing()
    if cfg.channels_last:
        for m in (student.net, getattr(loss.teacher, "unet", loss.teacher), getattr(loss.target, "net", None)):
            if m is not None:
                m.to(memory_format=torch.channels_last)
    return student, loss
