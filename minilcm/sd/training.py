"""The distillation run: check every input, load the teacher, encode the data once, train, export.

    distill(teacher, data, out, mode="full" | "lora", steps, ...)  -> DistillResult (the export folder, losses)

The loop is ``minilcm.train.train`` (AdamW or 8-bit AdamW, bf16/fp16 autocast, checkpoints with every random
state, a JSONL log, accelerate); the student and the loss are ``minilcm.sd.student.build``.

mode="full" is LCD (Luo et al. 2023, arXiv 2310.04378, Algorithm 1) and mode="lora" LCM-LoRA (Luo et al. 2023b,
arXiv 2311.05556); their reference implementations are diffusers' examples/consistency_distillation/
train_lcm_distill_sd_wds.py and train_lcm_distill_lora_sd_wds.py. Unlike those, the latents and text states are
computed once, before training (minilcm.sd.data), not on every step.
"""
from __future__ import annotations

import os
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import CheckpointError, staged_folder
from ..errors import UserError, one_line
from ..train import TrainConfig, default_device, train
from .config import DistillConfig, validate
from .data import LatentCaptions, caption_pairs, check_cache, load_or_encode, vae_scale_factor
from .export import export_lora, export_pipeline
from .resume import SETTINGS, check_out, check_resume, remove_if_unused, resume_settings, write_settings
from .student import build
from .teacher import check_fit, check_teacher, library_bars, load_teacher


class LaunchError(UserError, RuntimeError):
    """The processes of a multi-process launch do not form one data-parallel group."""


@dataclass
class DistillResult:
    export: Path            # the pipeline folder (full) or the LoRA folder (lora)
    losses: list
    step: int
    seconds: float
    resumed_from: int
    student: nn.Module      # the trained ConsistencyModel (its .net is the UNet)
    is_main: bool = True    # False on the other processes of a multi-process run (only the main one exports)


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


def _list_data(data, cfg: DistillConfig):
    """(pairs, dataset, cached): the caption pairs to encode, or the LatentCaptions given / read from the cache."""
    if isinstance(data, LatentCaptions):
        return None, data, False
    if cfg.cache is not None and Path(cfg.cache).exists():
        return None, LatentCaptions.load(cfg.cache), True
    return caption_pairs(data, **cfg.dataset), None, False


def _encode(pairs, pipe, res: int, cfg: DistillConfig, device, acc, main: bool) -> LatentCaptions:
    """The latents and text states of ``pairs``, with the teacher's VAE and text encoder on ``device`` meanwhile."""
    pipe.vae.to(device)
    pipe.text_encoder.to(device)
    main_first = acc.main_process_first() if acc is not None else nullcontext()
    with main_first:  # with a cache file, the main process encodes and the others read it
        dataset = load_or_encode(pairs, pipe, res, cfg.cache, progress=cfg.progress and main)
    pipe.vae.cpu()
    pipe.text_encoder.cpu()
    return dataset


def _train_config(cfg: DistillConfig, lr: float, device, out: Path, ckpt: Path) -> TrainConfig:
    return TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=cfg.warmup_steps,
                       grad_clip=cfg.grad_clip, seed=cfg.seed, ckpt_dir=str(ckpt),
                       ckpt_every=cfg.ckpt_every, device=str(device), amp=cfg.precision != "no",
                       amp_dtype=cfg.precision if cfg.precision != "no" else "bf16", optimizer=cfg.optimizer,
                       keep_ema=False, log_file=str(out / "log.jsonl"), progress=cfg.progress,
                       desc=f"LCD ({cfg.mode})")


def _train(student, loss, dataset, tcfg: TrainConfig, acc, ckpt: Path):
    """train(), with a checkpoint that does not fit this run reported as one line that names the fix."""
    try:
        return train(student, loss, dataset, tcfg, accelerator=acc)
    except CheckpointError as e:  # e.g. a checkpoint from an older minilcm that does not fit this run
        why = re.sub(r"^the checkpoint in \S+ ", "", one_line(e, 100_000))
        why = why if len(why) <= 140 else why[:137].rstrip() + "..."
        raise CheckpointError(f"cannot resume from {ckpt}: {why}; use another OUT folder, or delete {ckpt} to "
                              "start afresh") from e


def _export(pipe, student, loss, cfg: DistillConfig, lr: float, out: Path, main: bool) -> Path:
    """Write out/pipeline (full: the target network theta-) or out/lora on the main process; the folder."""
    meta = {"mode": cfg.mode, **{k: v for k, v in asdict(cfg).items() if k != "dataset"}, "lr": lr}
    export = out / ("pipeline" if cfg.mode == "full" else "lora")
    if main:
        with library_bars(cfg.progress), staged_folder(export) as tmp:  # written whole, then renamed into place
            if cfg.mode == "full":
                export_pipeline(pipe, loss.target.net, tmp, meta=meta)
            else:
                export_lora(student.net, tmp, meta=meta)
    return export


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
    cfg = DistillConfig(mode=mode, steps=steps, **kwargs)
    validate(cfg)
    out = Path(out)
    check_out(out)
    acc = accelerator if accelerator is not None else _accelerator()
    main = acc is None or acc.is_main_process
    pairs, dataset, cached = _list_data(data, cfg)  # before the teacher loads: a bad folder fails in a second
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
        dataset = _encode(pairs, pipe, res, cfg, device, acc, main)
    torch.manual_seed(cfg.seed)  # the LoRA adapters' initialisation: the same on every process and every run
    student, loss = build(pipe, dataset, cfg, device)
    lr = cfg.lr if cfg.lr is not None else (1e-6 if mode == "full" else 1e-4)
    created = not out.exists()
    if main and not resuming:  # only the main process writes into out (train() logs and checkpoints on it alone)
        write_settings(ckpt, settings)
    try:
        r = _train(student, loss, dataset, _train_config(cfg, lr, device, out, ckpt), acc, ckpt)
    except BaseException:
        if main and created:
            remove_if_unused(out)
        raise
    if main and resuming and not vouched:  # an older minilcm's checkpoint: train() loaded it, so it fits
        write_settings(ckpt, settings)
    if acc is not None:
        acc.wait_for_everyone()
    export = _export(pipe, student, loss, cfg, lr, out, main)
    if acc is not None:
        acc.wait_for_everyone()  # the export is complete on every process's return
    return DistillResult(export, r.losses, r.step, r.seconds, r.resumed_from, student, is_main=main)
