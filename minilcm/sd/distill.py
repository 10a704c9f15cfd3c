"""Latent consistency distillation of a diffusers Stable Diffusion teacher: a full LCM UNet, or LCM-LoRA.

    distill(teacher, data, out, mode="full" | "lora", steps, ...)  -> DistillResult (the export folder, losses)
    load_teacher(teacher)            a StableDiffusionPipeline from a local folder or a hub id, with clear errors
    check_teacher(unet, mode)        fail early if the UNet lacks what the mode needs
    validate(cfg)                    fail early (before any loading) on a bad number or option
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

import json
import math
import os
import re
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointError
from ..errors import InputError, UserError
from ..consistency import ConsistencyModel, LCMScalings, l2, pseudo_huber
from ..guidance import TextConditioning
from ..lcm import LatentConsistencyDistillation, lcm_student
from ..schedules import Schedule
from ..train import TrainConfig, default_device, train
from .data import LatentCaptions, caption_pairs, check_cache, first_line, load_or_encode, vae_scale_factor

LORA_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = LORA_ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                                 "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")  # the LCM-LoRA script's


class TeacherError(UserError, ValueError):
    """The teacher is missing, unreadable, or lacks what the chosen mode needs."""


class LaunchError(UserError, RuntimeError):
    """The processes of a multi-process launch do not form one data-parallel group."""


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
    is_main: bool = True    # False on the other processes of a multi-process run (only the main one exports)


# ---- checks before any work ---------------------------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg: DistillConfig) -> None:
    """Fail with a one-line ValueError (naming the flag) on a setting that cannot work; run before any loading."""
    if cfg.mode not in ("full", "lora"):
        raise InputError(f"--mode must be 'full' or 'lora', got {cfg.mode!r}")
    for name, low in (("steps", 1), ("batch_size", 1), ("k", 1), ("lora_rank", 1), ("w_dim", 1),
                      ("ckpt_every", 0), ("warmup_steps", 0)):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InputError(f"{_flag(name)} must be an integer >= {low}, got {v!r}")
    if cfg.resolution is not None and (isinstance(cfg.resolution, bool) or not isinstance(cfg.resolution, int)
                                       or cfg.resolution < 1):
        raise InputError(f"--resolution must be a positive integer (pixels), got {cfg.resolution!r}")

    def finite(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if cfg.lr is not None and not (finite(cfg.lr) and cfg.lr > 0):
        raise InputError(f"--lr must be a finite number > 0, got {cfg.lr!r}")
    for name in ("w", "w_min", "w_max"):
        v = getattr(cfg, name)
        if not (finite(v) and v >= 0):
            raise InputError(f"{_flag(name)} must be a finite number >= 0 (LCM convention: guidance_scale = w + 1), "
                             f"got {v!r}")
    if cfg.w_min > cfg.w_max:
        raise InputError(f"--w-min must be <= --w-max, got --w-min {cfg.w_min} --w-max {cfg.w_max}")
    if not (finite(cfg.mu) and 0 <= cfg.mu <= 1):
        raise InputError(f"mu (the target's EMA rate) must be in [0, 1], got {cfg.mu!r}")
    if cfg.grad_clip is not None and not (finite(cfg.grad_clip) and cfg.grad_clip > 0):
        raise InputError(f"grad_clip must be a finite number > 0 or None, got {cfg.grad_clip!r}")
    for name, allowed in (("distance", ("huber", "l2")), ("precision", ("bf16", "fp16", "no")),
                          ("optimizer", ("adamw", "adamw8bit"))):
        if getattr(cfg, name) not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    n = (cfg.dataset or {}).get("max_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"--max-samples must be an integer >= 1, got {n!r}")
    if cfg.device is not None:
        try:
            dev = torch.device(cfg.device)
        except (RuntimeError, TypeError, ValueError) as e:
            raise InputError(f"--device {cfg.device!r} is not a device: use cpu, cuda or cuda:N") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {cfg.device}, but CUDA is not available here: use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {cfg.device}, but this machine has {torch.cuda.device_count()} GPU(s): "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("--use-8bit-adam needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes, or "
                              "leave the flag out") from e
    if cfg.mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise ImportError("mode='lora' needs peft: pip install peft (or: pip install minilcm[sd])") from e


def check_out(out: Path) -> None:
    """OUT must be a folder (or not exist yet) somewhere writable."""
    if out.exists() and not out.is_dir():
        raise InputError(f"OUT {out} is a file: pass a folder (it is created if missing)")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"OUT {out}: {probe} is a file, not a folder: pass another OUT")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"OUT {out}: {probe} is not writable: pass another OUT")


def check_fit(cfg: DistillConfig, pipe, resolution: int) -> None:
    """The settings that depend on the teacher: its schedule, T >= k, a resolution the VAE can take."""
    T = schedule_of(pipe.scheduler).T
    if cfg.k > T:
        raise InputError(f"--k must be in 1..{T} (the teacher's training timesteps), got {cfg.k}")
    f = vae_scale_factor(pipe)
    if resolution % f:
        raise InputError(f"--resolution must be a multiple of {f} (the teacher's VAE factor), got {resolution}")


# ---- resuming: the checkpoint in OUT must come from a run of the same kind -------------------------
SETTINGS = "sd-distill.json"  # next to train()'s checkpoint: what the checkpoint's tensors depend on


def resume_settings(cfg: DistillConfig, pipe) -> dict:
    """The settings a checkpoint's tensors depend on (a rerun with other ones cannot resume from it)."""
    unet = {k: v for k, v in dict(pipe.unet.config).items() if not str(k).startswith("_")}
    s = {"mode": cfg.mode, "optimizer": cfg.optimizer, "unet": json.loads(json.dumps(unet, default=str))}
    s.update({"w_dim": cfg.w_dim} if cfg.mode == "full" else {"lora_rank": cfg.lora_rank,
                                                              "lora_targets": list(cfg.lora_targets)})
    return s


def _checkpoint_meta(ckpt: Path, fix: str) -> dict:
    """train()'s metadata of the checkpoint in ``ckpt`` (the safetensors header, or config.json); reads no tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(ckpt / "state.safetensors"), framework="pt") as f:
            header = (f.metadata() or {}).get("minilcm_config")
        meta = json.loads(header if header is not None else (ckpt / "config.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
        return meta
    except Exception as e:  # truncated, not a safetensors file, config.json missing or not JSON
        raise CheckpointError(f"the checkpoint in {ckpt} is unreadable ({type(e).__name__}: {first_line(e, 80)}): "
                              f"{fix}") from e


def check_resume(ckpt: Path, cfg: DistillConfig, settings: dict) -> int:
    """The step the checkpoint in ``ckpt`` is at (0: none), after checking that this run can resume from it."""
    if not (ckpt / "state.safetensors").exists():
        return 0
    fix = f"use another OUT folder, or delete {ckpt} to start afresh"
    meta = _checkpoint_meta(ckpt, fix)
    try:
        saved = json.loads((ckpt / SETTINGS).read_text())
        if not isinstance(saved, dict):
            raise ValueError(SETTINGS)
    except (OSError, ValueError):  # written by an older minilcm: the mode is in the progress bar's title
        m = re.fullmatch(r"LCD \((\w+)\)", str((meta.get("train_config") or {}).get("desc", "")))
        saved = {"mode": m.group(1)} if m else {}
    if saved.get("mode", cfg.mode) != cfg.mode:
        raise CheckpointError(f"{ckpt} holds a --mode {saved['mode']} run, and this is --mode {cfg.mode}: {fix}")
    if "unet" in saved and saved["unet"] != settings["unet"]:
        keys = sorted(k for k in set(saved["unet"]) | set(settings["unet"])
                      if saved["unet"].get(k) != settings["unet"].get(k))
        diff = ", ".join(f"{k} {saved['unet'].get(k)} vs {settings['unet'].get(k)}" for k in keys[:2])
        raise CheckpointError(f"{ckpt} was trained from a different teacher UNet ({diff[:160]}): {fix}")
    for key in ("w_dim", "lora_rank", "lora_targets", "optimizer"):
        if key in saved and saved[key] != settings.get(key):
            flag = "--use-8bit-adam" if key == "optimizer" else _flag(key)
            old, new = (("on" if v == "adamw8bit" else "off") if key == "optimizer" else v
                        for v in (saved[key], settings.get(key)))
            raise CheckpointError(f"{ckpt} was written with {flag} {old}, and this run has {flag} {new}: {fix}")
    step = int(meta.get("step", 0))
    if step > cfg.steps:
        raise CheckpointError(f"{ckpt} is at step {step}, past --steps {cfg.steps}: pass --steps {step} or more to "
                              "resume, or use another OUT folder")
    return step


def _remove_if_unused(out: Path) -> None:
    """Remove ``out`` (created by this run) when a failure left nothing in it but an empty log and the settings."""
    import shutil

    for f in out.rglob("*"):
        if f.is_dir():
            continue
        rel = f.relative_to(out).as_posix()
        if not ((rel == "log.jsonl" and f.stat().st_size == 0) or rel == f"checkpoint/{SETTINGS}"):
            return
    shutil.rmtree(out, ignore_errors=True)


# ---- the teacher -----------------------------------------------------------------------------------
def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


@contextmanager
def _library_bars(show: bool):
    """diffusers' and transformers' progress bars ("Loading ...", "Writing model shards") on or off."""
    if show:
        yield
        return
    import importlib

    mods = []
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    was = [m.is_progress_bar_enabled() for m in mods]
    for m in mods:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip(mods, was):
            if on:
                m.enable_progress_bar()


def unreadable_weights(folder: Path) -> tuple[str, str] | None:
    """(file, reason) for the first weight file below ``folder`` that is truncated or corrupt, else None. Reads
    only each safetensors header (and a zip's directory), so it is quick at any size."""
    from safetensors import safe_open

    for f in sorted(folder.rglob("*")):
        if not f.is_file() or f.suffix not in (".safetensors", ".bin"):
            continue
        rel = str(f.relative_to(folder))
        if f.stat().st_size == 0:
            return rel, "empty file"
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except Exception as e:
                return rel, first_line(e, 80)
        else:
            with open(f, "rb") as fh:
                zipped = fh.read(2) == b"PK"
            if zipped and not zipfile.is_zipfile(f):
                return rel, "truncated zip archive"
    return None


OPTIONAL_PARTS = ("safety_checker", "feature_extractor", "image_encoder")  # load_teacher passes None / skips them


def missing_components(folder: Path) -> list[str]:
    """The parts model_index.json names (unet, vae, text_encoder, ...) that have no folder in ``folder`` (the
    safety checker and other parts sd-distill does not load are left out)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(index, dict):
        return []
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
            and v[0] is not None and k not in OPTIONAL_PARTS and not (folder / k).is_dir()]


def load_teacher(teacher, progress: bool = True):
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
        raise TeacherError(f"the teacher folder {p} does not exist: check the path (or pass a hub id such as "
                           "stable-diffusion-v1-5/stable-diffusion-v1-5)")
    try:
        with _library_bars(progress):
            pipe = StableDiffusionPipeline.from_pretrained(str(p) if p.exists() else name, safety_checker=None,
                                                           requires_safety_checker=False)
    except Exception as e:  # the libraries' messages run to 20-40 lines: keep the first, name the fix
        why = f"{type(e).__name__}: {first_line(e)}"
        if not p.exists():
            raise TeacherError(f"could not load the teacher {name!r} from the Hugging Face hub ({why}). A hub id needs "
                               "network access (and `huggingface-cli login` for gated models): check the id, or "
                               "pass a local pipeline folder") from e
        missing = missing_components(p)
        if missing:
            raise TeacherError(f"the teacher folder {p} is incomplete (no {', '.join(m + '/' for m in missing)}): "
                               "re-download the teacher, or re-save it with pipe.save_pretrained(folder)") from e
        bad = unreadable_weights(p)
        if bad is not None:
            raise TeacherError(f"the teacher folder {p} is corrupt: {bad[0]} is truncated or unreadable ({bad[1]}); "
                               "re-download the teacher, or re-save it with pipe.save_pretrained(folder)") from e
        raise TeacherError(f"could not load the teacher folder {p} as a StableDiffusionPipeline ({why}): re-download "
                           "it, or re-save it with pipe.save_pretrained(folder)") from e
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


def launched_processes() -> int:
    """How many processes the launcher started (torchrun / accelerate launch: WORLD_SIZE; MPI: its own)."""
    n = 1
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        try:
            n = max(n, int(os.environ.get(key) or 1))
        except ValueError:
            pass
    return n


def _accelerator():
    """An accelerate.Accelerator when launched with several processes (``accelerate launch``), else None.

    The ranks are accelerate's own (``process_index``, ``is_main_process``), never read from the environment: a
    launcher can start N processes that accelerate does not join into a group (``--multi_gpu`` on a machine
    without CUDA), and each would then act as rank 0. Without CUDA the processes are joined on the CPU (gloo);
    if accelerate still sets up fewer processes than were launched, this fails instead of training N copies."""
    world = launched_processes()
    if world <= 1:
        return None
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())  # autocast is train()'s own
    if acc.num_processes != world:
        raise LaunchError(f"{world} processes were launched, but accelerate joined {acc.num_processes} "
                          f"({acc.distributed_type}): check the launch flags or `accelerate config`, or run one "
                          "process")
    return acc


def distill(teacher, data, out, mode: str = "full", steps: int = 1000, *, accelerator=None, **kwargs) -> DistillResult:
    """Distil ``teacher`` (pipeline folder, hub id or StableDiffusionPipeline) on ``data`` (caption folder,
    `datasets` name, or a LatentCaptions) into ``out``:

        out/checkpoint/   train()'s checkpoint (rerun the same call to resume)
        out/log.jsonl     loss, lr and samples/s per step
        out/pipeline/     mode="full": a LatentConsistencyModelPipeline folder (LCMScheduler)
        out/lora/         mode="lora": pytorch_lora_weights.safetensors for pipe.load_lora_weights(out/lora)

    Keyword arguments are ``DistillConfig`` fields (batch_size, lr, k, w_min, w_max, w, precision, ...).

    Every input is checked before any work and before ``out`` is created: a bad setting, data folder, teacher or a
    checkpoint in ``out`` from another kind of run raises a short ValueError / DataError / TeacherError /
    CheckpointError that names the fix. With several processes only the main one logs, checkpoints and exports."""
    from .export import export_lora, export_pipeline

    cfg = DistillConfig(mode=mode, steps=steps, **kwargs)
    validate(cfg)
    out = Path(out)
    check_out(out)
    acc = accelerator if accelerator is not None else _accelerator()
    main = acc is None or acc.is_main_process
    # the data is listed (or its cache read) before the teacher loads: a bad folder fails in a second
    pairs, dataset, cached = None, None, False
    if isinstance(data, LatentCaptions):
        dataset = data
    elif cfg.cache is not None and Path(cfg.cache).exists():
        dataset, cached = LatentCaptions.load(cfg.cache), True
    else:
        pairs = caption_pairs(data, **cfg.dataset)
    pipe = load_teacher(teacher, progress=cfg.progress and main)
    check_teacher(pipe.unet, mode)
    res = cfg.resolution or pipe.unet.config.sample_size * vae_scale_factor(pipe)
    check_fit(cfg, pipe, res)
    settings = resume_settings(cfg, pipe)
    ckpt = out / "checkpoint"
    check_resume(ckpt, cfg, settings)
    resuming = (ckpt / "state.safetensors").exists()
    vouched = (ckpt / SETTINGS).exists()  # when resuming: this file was just checked against this run
    if cached:
        check_cache(dataset, pipe, res, cfg.cache)
    device = acc.device if acc is not None else torch.device(cfg.device) if cfg.device else default_device()
    if dataset is None:
        pipe.vae.to(device)
        pipe.text_encoder.to(device)
        main_first = acc.main_process_first() if acc is not None else nullcontext()
        with main_first:  # with a cache file, the main process encodes and the others read it
            dataset = load_or_encode(pairs, pipe, res, cfg.cache, progress=cfg.progress and main)
        pipe.vae.cpu()
        pipe.text_encoder.cpu()
    torch.manual_seed(cfg.seed)  # the LoRA adapters' initialisation: the same on every process and every run
    student, loss = build(pipe, dataset, cfg, device)
    lr = cfg.lr if cfg.lr is not None else (1e-6 if mode == "full" else 1e-4)
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=cfg.warmup_steps,
                       grad_clip=cfg.grad_clip, seed=cfg.seed, ckpt_dir=str(ckpt),
                       ckpt_every=cfg.ckpt_every, device=str(device), amp=cfg.precision != "no",
                       amp_dtype=cfg.precision if cfg.precision != "no" else "bf16", optimizer=cfg.optimizer,
                       keep_ema=False, log_file=str(out / "log.jsonl"), progress=cfg.progress,
                       desc=f"LCD ({mode})")
    created = not out.exists()

    def write_settings():
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / SETTINGS).write_text(json.dumps(settings, indent=1))

    if main and not resuming:  # only the main process writes into out (train() logs and checkpoints on it alone)
        write_settings()
    try:
        try:
            r = train(student, loss, dataset, tcfg, accelerator=acc)
        except CheckpointError as e:  # e.g. a checkpoint from an older minilcm that does not fit this run
            why = re.sub(r"^the checkpoint in \S+ ", "", first_line(e, 100_000))
            why = why if len(why) <= 140 else why[:137].rstrip() + "..."
            raise CheckpointError(f"cannot resume from {ckpt}: {why}; use another OUT folder, or delete {ckpt} to "
                                  "start afresh") from e
    except BaseException:
        if main and created:
            _remove_if_unused(out)
        raise
    if main and resuming and not vouched:  # an older minilcm's checkpoint: train() loaded it, so it fits
        write_settings()
    if acc is not None:
        acc.wait_for_everyone()
    meta = {"mode": mode, **{k: v for k, v in asdict(cfg).items() if k != "dataset"}, "lr": lr}
    export = out / ("pipeline" if mode == "full" else "lora")
    if main:
        from ..checkpoints import staged_folder

        with _library_bars(cfg.progress), staged_folder(export) as tmp:  # written whole, then renamed into place
            if mode == "full":
                export_pipeline(pipe, loss.target.net, tmp, meta=meta)
            else:
                export_lora(student.net, tmp, meta=meta)
    if acc is not None:
        acc.wait_for_everyone()  # the export is complete on every process's return
    return DistillResult(export, r.losses, r.step, r.seconds, r.resumed_from, student, is_main=main)
