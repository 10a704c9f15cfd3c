"""OUT, the run's folder: checked before any work, resumed from when it holds a checkpoint of the same kind of
run, and removed again when a failure left nothing in it.

    check_out(out)                      OUT is a folder (or does not exist yet) somewhere writable
    resume_settings(cfg, pipe)          what a checkpoint's tensors depend on (written next to it, SETTINGS)
    check_resume(ckpt, cfg, settings)   the step to resume from, after checking the checkpoint fits this run
    write_settings(ckpt, settings)      write them next to the checkpoint
    remove_if_unused(out)               remove an OUT this run created when it holds nothing worth keeping

A rerun of the same command resumes (the reference scripts' --resume_from_checkpoint latest, without the flag);
a rerun with another mode, teacher, w-embedding size, LoRA rank / targets or optimizer is refused with the fix.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..checkpoints import CheckpointError
from ..errors import InputError, one_line
from .config import DistillConfig, flag_name


SETTINGS = "sd-distill.json"  # next to train()'s checkpoint: what the checkpoint's tensors depend on


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
        raise CheckpointError(f"the checkpoint in {ckpt} is unreadable ({type(e).__name__}: {one_line(e, 80)}): "
                              f"{fix}") from e


def _saved_settings(ckpt: Path, meta: dict) -> dict:
    """The SETTINGS written next to the checkpoint in ``ckpt`` (``meta``: train()'s metadata of it)."""
    try:
        saved = json.loads((ckpt / SETTINGS).read_text())
        if not isinstance(saved, dict):
            raise ValueError(SETTINGS)
    except (OSError, ValueError):  # written by an older minilcm: the mode is in the progress bar's title
        m = re.fullmatch(r"LCD \((\w+)\)", str((meta.get("train_config") or {}).get("desc", "")))
        saved = {"mode": m.group(1)} if m else {}
    return saved


def check_resume(ckpt: Path, cfg: DistillConfig, settings: dict) -> int:
    """The step the checkpoint in ``ckpt`` is at (0: none), after checking that this run can resume from it."""
    if not (ckpt / "state.safetensors").exists():
        return 0
    fix = f"use another OUT folder, or delete {ckpt} to start afresh"
    meta = _checkpoint_meta(ckpt, fix)
    saved = _saved_settings(ckpt, meta)
    if saved.get("mode", cfg.mode) != cfg.mode:
        raise CheckpointError(f"{ckpt} holds a --mode {saved['mode']} run, and this is --mode {cfg.mode}: {fix}")
    if "unet" in saved and saved["unet"] != settings["unet"]:
        keys = sorted(k for k in set(saved["unet"]) | set(settings["unet"])
                      if saved["unet"].get(k) != settings["unet"].get(k))
        diff = ", ".join(f"{k} {saved['unet'].get(k)} vs {settings['unet'].get(k)}" for k in keys[:2])
        raise CheckpointError(f"{ckpt} was trained from a different teacher UNet ({diff[:160]}): {fix}")
    for key in ("w_dim", "lora_rank", "lora_targets", "optimizer"):
        if key in saved and saved[key] != settings.get(key):
            flag = "--use-8bit-adam" if key == "optimizer" else flag_name(key)
            old, new = (("on" if v == "adamw8bit" else "off") if key == "optimizer" else v
                        for v in (saved[key], settings.get(key)))
            raise CheckpointError(f"{ckpt} was written with {flag} {old}, and this run has {flag} {new}: {fix}")
    step = int(meta.get("step", 0))
    if step > cfg.steps:
        raise CheckpointError(f"{ckpt} is at step {step}, past --steps {cfg.steps}: pass --steps {step} or more to "
                              "resume, or use another OUT folder")
    return step


def write_settings(ckpt: Path, settings: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / SETTINGS).write_text(json.dumps(settings, indent=1))


def remove_if_unused(out: Path) -> None:
    """Remove ``out`` (created by this run) when a failure left nothing in it but an empty log and the settings."""
    for f in out.rglob("*"):
        if f.is_dir():
            continue
        rel = f.relative_to(out).as_posix()
        if not ((rel == "log.jsonl" and f.stat().st_size == 0) or rel == f"checkpoint/{SETTINGS}"):
            return
    shutil.rmtree(out, ignore_errors=True)
