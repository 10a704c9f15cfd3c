"""Latent consistency distillation of a diffusers Stable Diffusion teacher: a full LCM UNet, or LCM-LoRA.

    distill(teacher, data, out, mode="full" | "lora", steps, ...)  -> DistillResult (the export folder, losses)
    load_teacher(teacher)            a StableDiffusionPipeline from a local folder or a hub id, with clear errors
    check_teacher(unet, mode)        fail early if the UNet lacks what the mode needs
    build(pipe, data, cfg)           (student, loss): the pieces ``minilcm.train`` runs

Nothing here re-implements the method: the loss, the augmented PF-ODE solver step, the w-embedding and the
scalings are ``minilcm.lcm`` / ``minilcm.consistency`` (Chapter 5), and the loop is ``minilcm.train.train``
(AdamW or 8-bit AdamW, bf16/fp16 autocast, checkpoints with every random state, a JSONL log, accelerate).

mode="full"  (Luo et al. 2023, arXiv 2310.04378, Sec. 4): the student is a copy of the teacher UNet with a
             zero-initialised w input (``lcm_student``), trained with w ~ U[w_min, w_max]; the exported pipeline
             uses the target network theta- (the EMA of Algorithm 1) and LCMScheduler.
mode="lora"  (LCM-LoRA, Luo et al. 2023b, arXiv 2311.05556): the student is the teacher's own UNet plus LoRA
             adapters (peft) at one fixed w; the teacher is the same UNet with its adapters switched off, and the
             target is the online student without gradients, so the GPU holds ONE UNet. Exports LoRA weights.
"""
from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..consistency import ConsistencyModel, LCMScalings, l2, pseudo_huber
from ..lcm import LatentConsistencyDistillation, TextConditioning, lcm_student
from ..schedules import Schedule
from ..train import TrainConfig, default_device, train
from .data import LatentCaptions, load_or_encode, vae_scale_factor

LORA_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = LORA_ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                                 "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")  # the LCM-LoRA script's


class TeacherError(UserError, ValueError):
    """The teacher is missing, unreadable, or lacks what the chosen mode needs."""


@dataclass
class DistillConfig:
    mode: str = "full"               # "full" (LCM UNet with a w input) or "lora" (LCM-LoRA at fixed w)
    steps: int = 1000
    batch_size: int = 8
    lr: float | None = None          # None: 1e-6 full (the reference script's README), 1e-4 lora
    warmup_steps: int = 0
    grad_clip: float = 1.0
    k: int = 20                      # skipping step: T / k = 50 DDIM steps of the teacher's solver
    w_min: float = 5.0               # full: w ~ U[w_min, w_max] (LCM convention, guidance_scale = w + 1)
    w_max: float = 15.0
    w: float = 7.0                   # lora: the one w it is distilled at
    w_dim: int = 256                 # full: size of the w-embedding (time_cond_proj_dim)
    mu: float = 0.95                 # full: EMA rate of the target theta-
    distance: str = "huber"          # "huber" (pseudo-Huber) or "l2"
    lora_rank: int = 64
    lora_targets: tuple = LORA_TARGETS
    precision: str = "bf16"          # autocast on CUDA: "bf16", "fp16" or "no"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"         # or "adamw8bit" (bitsandbytes)
    channels_last: bool = False
    resolution: int | None = None    # None: the UNet's sample_size x the VAE's factor (512 for SD v1.5)
    cache: str | None = None         # a .safetensors file of latents + text states (written once, then read)
    ckpt_every: int = 500
    seed: int = 0
    device: str | None = None
    progress: bool = True
    dataset: dict = field(default_factory=dict)   # for a `datasets` name: split, image_column, caption_column, ...


@dataclass
class DistillResult:
    export: Path            # the pipeline folder (full) or the LoRA folder (lora)
    losses: list
    step: int
    seconds: float
    resumed_from: int
    student: nn.Module      # the trained ConsistencyModel (its .net is the UNet)


# ---- the teacher -----------------------------------------------------------------------------------
def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


def load_teacher(teacher):
    """A StableDiffusionPipeline (in fp32) from a ``save_pretrained`` folder or a hub id (which needs network)."""
    from diffusers import StableDiffusionPipeline

    if not isinstance(teacher, (str, os.PathLike)):
        return teacher  # already a pipeline
    name = str(teacher)
    p = Path(name).expanduser()
    if p.exists() and not (p / "model_index.json").exists():
        raise TeacherError(f"{p} is not a diffusers pipeline folder (no model_index.json): save the teacher with "
                           "pipe.save_pretrained(folder), or pass a hub id "
                           "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    if not p.exists() and _looks_local(name):
        raise TeacherError(f"the teacher folder {p} does not exist (pass a diffusers pipeline folder or a hub id)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(p) if p.exists() else name, safety_checker=None,
                                                       requires_safety_checker=False)
    except Exception as e:
        raise TeacherError(f"could not load the teacher {name!r} as a StableDiffusionPipeline ({type(e).__name__}: "
                           f"{e}). A hub id needs network access (and maybe `huggingface-cli login`).") from e
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):  # a half-precision folder still trains in fp32
        if part.dtype != torch.float32:
            part.float()
    return pipe


def check_teacher(unet: nn.Module, mode: str) -> None:
    """Fail with a clear message if ``unet`` cannot be distilled in ``mode``."""
    if mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {mode!r}")
    cfg = getattr(unet, "config", {}) or {}
    if cfg.get("cross_attention_dim") is None:
        raise TeacherError(f"the teacher's {type(unet).__name__} has no cross-attention to text "
                           "(cross_attention_dim): a Stable Diffusion UNet2DConditionModel is needed")
    if mode == "full" and ("time_cond_proj_dim" not in cfg or not hasattr(type(unet), "from_config")):
        raise TeacherError(f"mode='full' adds a w-embedding input (time_cond_proj_dim) to the UNet, which "
                           f"{type(unet).__name__} cannot take; use a UNet2DConditionModel, or mode='lora'")
    if mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise ImportError("mode='lora' needs peft: pip install peft (or: pip install minilcm[sd])") from e
        if not hasattr(unet, "add_adapter"):
            raise TeacherError(f"{type(unet).__name__} has no peft integration (add_adapter); use a diffusers UNet")
        names = [n for n, _ in unet.named_modules()]
        if not any(n.endswith("." + a) for n in names for a in LORA_ATTENTION):
            raise TeacherError(f"mode='lora' puts adapters on attention layers ({', '.join(LORA_ATTENTION)}), and "
                               f"the teacher's {type(unet).__name__} has none; use mode='full'")


def schedule_of(scheduler) -> Schedule:
    """The teacher's noise schedule as a ``Schedule`` (epsilon prediction only: the LCD code is eps-based)."""
    c = scheduler.config
    if c.get("prediction_type", "epsilon") != "epsilon":
        raise TeacherError(f"the teacher predicts {c['prediction_type']!r}; minilcm distils epsilon-prediction "
                           "teachers (SD v1.x); SD 2.x v-prediction is not supported")
    kind = {"squaredcos_cap_v2": "cosine"}.get(c.get("beta_schedule"), c.get("beta_schedule"))
    if c.get("trained_betas") is not None or kind not in ("linear", "scaled_linear", "cosine"):
        raise TeacherError(f"unsupported teacher schedule {c.get('beta_schedule')!r}")
    return Schedule(kind, T=c["num_train_timesteps"], beta_start=c.get("beta_start"), beta_end=c.get("beta_end"))


# ---- LoRA --------------------------------------------------------------------------------------------
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


# ---- putting it together ---------------------------------------------------------------------------
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


def _accelerator():
    """An accelerate.Accelerator when launched with several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(mixed_precision="no")  # autocast is train()'s own


def distill(teacher, data, out, mode: str = "full", steps: int = 1000, *, accelerator=None, **kwargs) -> DistillResult:
    """Distil ``teacher`` (pipeline folder, hub id or StableDiffusionPipeline) on ``data`` (caption folder,
    `datasets` name, or a LatentCaptions) into ``out``:

        out/checkpoint/   train()'s checkpoint (rerun the same call to resume)
        out/log.jsonl     loss, lr and samples/s per step
        out/pipeline/     mode="full": a LatentConsistencyModelPipeline folder (LCMScheduler)
        out/lora/         mode="lora": pytorch_lora_weights.safetensors for pipe.load_lora_weights(out/lora)

    Keyword arguments are ``DistillConfig`` fields (batch_size, lr, k, w_min, w_max, w, precision, ...)."""
    from .export import export_lora, export_pipeline

    cfg = DistillConfig(mode=mode, steps=steps, **kwargs)
    pipe = load_teacher(teacher)
    check_teacher(pipe.unet, mode)
    acc = accelerator if accelerator is not None else _accelerator()
    device = acc.device if acc is not None else torch.device(cfg.device) if cfg.device else default_device()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(data, LatentCaptions):
        dataset = data
    else:
        res = cfg.resolution or pipe.unet.config.sample_size * vae_scale_factor(pipe)
        pipe.vae.to(device)
        pipe.text_encoder.to(device)
        main_first = acc.main_process_first() if acc is not None else nullcontext()
        with main_first:  # with a cache file, the main process encodes and the others read it
            dataset = load_or_encode(data, pipe, res, cfg.cache, progress=cfg.progress, **cfg.dataset)
        pipe.vae.cpu()
        pipe.text_encoder.cpu()
    student, loss = build(pipe, dataset, cfg, device)
    lr = cfg.lr if cfg.lr is not None else (1e-6 if mode == "full" else 1e-4)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=cfg.warmup_steps,
                       grad_clip=cfg.grad_clip, seed=cfg.seed, ckpt_dir=str(out / "checkpoint"),
                       ckpt_every=cfg.ckpt_every, device=str(device), amp=cfg.precision != "no",
                       amp_dtype=cfg.precision if cfg.precision != "no" else "bf16", optimizer=cfg.optimizer,
                       keep_ema=False, log_file=str(out / "log.jsonl"), progress=cfg.progress,
                       desc=f"LCD ({mode})")
    r = train(student, loss, dataset, tcfg, accelerator=acc)
    if acc is not None:
        acc.wait_for_everyone()
    main = acc is None or acc.is_main_process
    settings = {"mode": mode, **{k: v for k, v in asdict(cfg).items() if k != "dataset"}, "lr": lr}
    if mode == "full":
        export = out / "pipeline"
        if main:
            export_pipeline(pipe, loss.target.net, export, meta=settings)
    else:
        export = out / "lora"
        if main:
            export_lora(student.net, export, meta=settings)
    return DistillResult(export, r.losses, r.step, r.seconds, r.resumed_from, student)

