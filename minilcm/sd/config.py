"""The settings of one distillation run, written once.

    DistillConfig        every setting of ``minilcm.sd.distill``, with its default; the ones ``minilcm sd-distill``
                         shows also carry their flag, choices and help in ``field(metadata=...)``
    DatasetOptions       the `datasets`-only settings (``DistillConfig.dataset`` is a dict of them)
    validate(cfg)        fail early (before any loading) on a bad number or option

minilcm/sd/cli.py builds the argparse options and the args -> config conversion from these fields
(``cli_option``), so a setting is added, renamed or documented here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields

from ..errors import InputError

LORA_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
LORA_TARGETS = LORA_ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
                                 "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")  # the LCM-LoRA script's


def option(default=None, help: str | None = None, *, type=None, choices: tuple | None = None,
           flag: str | None = None, switch=MISSING) -> Field:
    """A dataclass field that is also a ``minilcm sd-distill`` option: ``--name-with-dashes`` (or ``flag``), of
    ``type`` (default: that of ``default``), one of ``choices``, with ``help``. A ``switch`` option is a flag
    without a value (store_true) that sets the field to ``switch``; left out, the field keeps its default."""
    cli = {"flag": flag, "help": help, "type": type, "choices": choices}
    if switch is not MISSING:
        cli["switch"] = switch
    return field(default=default, metadata={"cli": cli})


def cli_option(f: Field) -> dict | None:
    """The ``minilcm sd-distill`` option of a field: {flag, dest, help, type, choices[, switch]}; None if the CLI
    does not show it."""
    cli = f.metadata.get("cli")
    if cli is None:
        return None
    flag = cli["flag"] or "--" + f.name.replace("_", "-")
    return {**cli, "flag": flag, "dest": flag[2:].replace("-", "_")}


def choices_of(cls, name: str) -> tuple:
    """The allowed values of a field (its option's ``choices``): argparse offers them, ``validate`` checks them."""
    return next(f for f in fields(cls) if f.name == name).metadata["cli"]["choices"]


def flag_name(name: str) -> str:
    """The CLI flag of a setting: w_min -> --w-min."""
    return "--" + name.replace("_", "-")


@dataclass
class DatasetOptions:
    """How to read a Hugging Face `datasets` name given as DATA (unused for a caption folder)."""

    split: str = option("train", "`datasets` only")
    image_column: str = option("image", "`datasets` only")
    caption_column: str | None = option(None, "`datasets` only (default: text/caption/prompt)", type=str)
    max_samples: int | None = option(None, "`datasets` only", type=int)


@dataclass
class DistillConfig:
    """The keyword arguments of ``minilcm.sd.distill`` (fields with an ``option`` are also CLI flags)."""

    mode: str = option("full", choices=("full", "lora"))  # full: LCM UNet with a w input; lora: LCM-LoRA, fixed w
    steps: int = option(1000)
    batch_size: int = option(8, "per process")
    lr: float | None = option(None, "default 1e-6 (full), 1e-4 (lora)", type=float)  # 1e-6: the reference README
    warmup_steps: int = option(0)
    grad_clip: float = 1.0
    k: int = option(20, "skipping step (T/k DDIM steps for the teacher's solver)")  # T / k = 50 teacher DDIM steps
    w_min: float = option(5.0, "full: w ~ U[w_min, w_max] (guidance_scale = w + 1)")  # LCM's convention for w
    w_max: float = option(15.0)
    w: float = option(7.0, "lora: the fixed w")
    w_dim: int = option(256, "full: size of the w-embedding (time_cond_proj_dim)")
    mu: float = 0.95                 # full: EMA rate of the target theta-
    lora_rank: int = option(64)
    lora_targets: tuple = LORA_TARGETS
    distance: str = option("huber", choices=("huber", "l2"))  # pseudo-Huber or l2
    precision: str = option("bf16", "autocast on CUDA", choices=("bf16", "fp16", "no"))
    gradient_checkpointing: bool = option(False, switch=True)
    optimizer: str = option("adamw", "bitsandbytes' AdamW8bit", flag="--use-8bit-adam", switch="adamw8bit",
                            choices=("adamw", "adamw8bit"))
    channels_last: bool = option(False, switch=True)
    resolution: int | None = option(None, "default: the UNet's sample size x the VAE factor", type=int)  # 512 in SD
    cache: str | None = option(None, "a .safetensors file of precomputed latents + text states", type=str)
    ckpt_every: int = option(500)
    seed: int = option(0)
    device: str | None = option(None, "default: cuda if available (under accelerate: its device)", type=str)
    dataset: dict = field(default_factory=dict, metadata={"options": DatasetOptions})  # keys: DatasetOptions
    progress: bool = option(True, flag="--no-progress", switch=False)


# ---- checks before any work ---------------------------------------------------------------------
def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_numbers(cfg: DistillConfig) -> None:
    for name, low in (("steps", 1), ("batch_size", 1), ("k", 1), ("lora_rank", 1), ("w_dim", 1),
                      ("ckpt_every", 0), ("warmup_steps", 0)):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise InputError(f"{flag_name(name)} must be an integer >= {low}, got {v!r}")
    if cfg.resolution is not None and (isinstance(cfg.resolution, bool) or not isinstance(cfg.resolution, int)
                                       or cfg.resolution < 1):
        raise InputError(f"--resolution must be a positive integer (pixels), got {cfg.resolution!r}")
    if cfg.lr is not None and not (_finite(cfg.lr) and cfg.lr > 0):
        raise InputError(f"--lr must be a finite number > 0, got {cfg.lr!r}")
    for name in ("w", "w_min", "w_max"):
        v = getattr(cfg, name)
        if not (_finite(v) and v >= 0):
            raise InputError(f"{flag_name(name)} must be a finite number >= 0 (LCM convention: "
                             f"guidance_scale = w + 1), got {v!r}")
    if cfg.w_min > cfg.w_max:
        raise InputError(f"--w-min must be <= --w-max, got --w-min {cfg.w_min} --w-max {cfg.w_max}")
    if not (_finite(cfg.mu) and 0 <= cfg.mu <= 1):
        raise InputError(f"mu (the target's EMA rate) must be in [0, 1], got {cfg.mu!r}")
    if cfg.grad_clip is not None and not (_finite(cfg.grad_clip) and cfg.grad_clip > 0):
        raise InputError(f"grad_clip must be a finite number > 0 or None, got {cfg.grad_clip!r}")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch  # here, not at the top: the CLI builds its --help from this module without torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}, but CUDA is not available here: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}, but this machine has {torch.cuda.device_count()} GPU(s): "
                         f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def require_peft() -> None:
    """peft is installed (mode='lora' needs it), else an ImportError naming the install."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ImportError("mode='lora' needs peft: pip install peft (or: pip install minilcm[sd])") from e


def validate(cfg: DistillConfig) -> None:
    """Fail with a one-line ValueError (naming the flag) on a setting that cannot work; run before any loading."""
    if cfg.mode not in choices_of(DistillConfig, "mode"):
        raise InputError(f"--mode must be 'full' or 'lora', got {cfg.mode!r}")
    _check_numbers(cfg)
    for name in ("distance", "precision", "optimizer"):
        allowed = choices_of(DistillConfig, name)
        if getattr(cfg, name) not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    n = (cfg.dataset or {}).get("max_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"--max-samples must be an integer >= 1, got {n!r}")
    _check_device(cfg.device)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError("--use-8bit-adam needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes, or "
                              "leave the flag out") from e
    if cfg.mode == "lora":
        require_peft()
