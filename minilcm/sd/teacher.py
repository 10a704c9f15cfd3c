"""The teacher: a diffusers StableDiffusionPipeline, loaded with clear errors and checked before any work.

    load_teacher(teacher)            a StableDiffusionPipeline (fp32) from a local folder or a hub id
    check_teacher(unet, mode)        fail early if the UNet lacks what the mode needs
    check_fit(cfg, pipe, res)        the settings that depend on the teacher (k <= T, a resolution its VAE takes)
    schedule_of(scheduler)           the teacher's noise schedule as a ``minilcm.schedules.Schedule``
    library_bars(show)               diffusers' and transformers' progress bars on or off

LCD (Luo et al. 2023, arXiv 2310.04378) distils an epsilon-prediction teacher on its own noise schedule: the
solver step and the scalings of Chapter 5 are computed from that schedule, so the teacher's scheduler config is
read once, here, and anything else (v-prediction, trained betas) is refused before training starts.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, UserError, one_line
from ..schedules import Schedule
from .config import LORA_ATTENTION, DistillConfig, require_peft
from .data import vae_scale_factor


class TeacherError(UserError, ValueError):
    """The teacher is missing, unreadable, or lacks what the chosen mode needs."""


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", name)


@contextmanager
def library_bars(show: bool):
    """diffusers' and transformers' progress bars ("Loading ...", "Writing model shards") on or off."""
    if show:
        yield
        return
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
                return rel, one_line(e, 80)
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


def _load_error(name: str, p: Path, e: Exception) -> TeacherError:
    """Why ``from_pretrained`` failed on the teacher ``name`` (folder ``p``), in one line that names the fix."""
    why = f"{type(e).__name__}: {one_line(e)}"
    if not p.exists():
        return TeacherError(f"could not load the teacher {name!r} from the Hugging Face hub ({why}). A hub id needs "
                            "network access (and `huggingface-cli login` for gated models): check the id, or "
                            "pass a local pipeline folder")
    missing = missing_components(p)
    if missing:
        return TeacherError(f"the teacher folder {p} is incomplete (no {', '.join(m + '/' for m in missing)}): "
                            "re-download the teacher, or re-save it with pipe.save_pretrained(folder)")
    bad = unreadable_weights(p)
    if bad is not None:
        return TeacherError(f"the teacher folder {p} is corrupt: {bad[0]} is truncated or unreadable ({bad[1]}); "
                            "re-download the teacher, or re-save it with pipe.save_pretrained(folder)")
    return TeacherError(f"could not load the teacher folder {p} as a StableDiffusionPipeline ({why}): re-download "
                        "it, or re-save it with pipe.save_pretrained(folder)")


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
        with library_bars(progress):
            pipe = StableDiffusionPipeline.from_pretrained(str(p) if p.exists() else name, safety_checker=None,
                                                           requires_safety_checker=False)
    except Exception as e:  # the libraries' messages run to 20-40 lines: keep the first, name the fix
        raise _load_error(name, p, e) from e
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
        require_peft()
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


def check_fit(cfg: DistillConfig, pipe, resolution: int) -> None:
    """The settings that depend on the teacher: its schedule, T >= k, a resolution the VAE can take."""
    T = schedule_of(pipe.scheduler).T
    if cfg.k > T:
        raise InputError(f"--k must be in 1..{T} (the teacher's training timesteps), got {cfg.k}")
    f = vae_scale_factor(pipe)
    if resolution % f:
        raise InputError(f"--resolution must be a multiple of {f} (the teacher's VAE factor), got {resolution}")
