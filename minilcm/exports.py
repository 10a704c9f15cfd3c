"""A recipe export (``minilcm.stages``): where it goes, what it records, and how its samples measure.

    export_target(out, name, replace_shipped)   the folder an export goes to, checked before any training
    provenance(seconds, device)                 git commit, hardware, versions, wall time, profile, date
    teacher_record(teacher)                     a student's teacher: its name or path, and its weights' sha256
    sample_metrics(folder, runs, n, w, device)  FD-clf, class accuracy and time per image of a model's samples
    Trained, tail_mean, save_diffusers          what a stage's builder returns, its final loss, fp16 diffusers saves

The shipped folder (``checkpoints.shipped_dir()``, which honours ``MINILCM_CHECKPOINTS``) is written only with
``replace_shipped`` (``minilcm train STAGE --replace-shipped``).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoints import (check_export, content_hash, default_export, is_shipped, resolve, shipped_dir,
                          strip_machine_paths)
from .datasets import CIFAR10_CLASSES, to_uint8
from .evaluator import Evaluator
from .profiles import current, hardware
from .samplers import sample_images
from .zoo import load_model_folder


@dataclass
class Trained:
    """What a stage's builder returns: the model to export, how it trained, and the stage's own metadata keys."""

    model: object
    steps: int
    batch_size: int
    seconds: float              # the training loop's wall clock (train.TrainResult.seconds)
    meta: dict
    extra: dict = field(default_factory=dict)  # what the export and the measurement need besides the model


def budget_record(budget: dict | None) -> dict:
    """``{"budget": ...}`` for a stage's metadata when it trained to a time budget (``train.TrainResult.budget``)."""
    return {"budget": budget} if budget else {}


def tail_mean(losses, k: int = 100) -> float:
    """The mean of the last k losses: the ``final_loss`` the stages record."""
    return sum(losses[-k:]) / max(1, len(losses[-k:]))


def save_diffusers(model, folder: Path) -> None:
    """save_pretrained in fp16 (the shipped size), leaving the in-memory model untouched."""
    copy.deepcopy(model).to(torch.float16).save_pretrained(str(folder))
    strip_machine_paths(folder)  # no absolute path of this machine in a config that may be committed


def git_state() -> dict:
    """The commit the code runs from, and whether tracked files differ from it. Read it when a run starts: the
    working tree may move on while it trains. Where the tree has no .git (a GPU run), $MINILCM_GIT_COMMIT."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except OSError:
        commit, dirty = None, None
    if commit is None and os.environ.get("MINILCM_GIT_COMMIT"):  # a copy of the tree without .git (a GPU run)
        commit, dirty = os.environ["MINILCM_GIT_COMMIT"], os.environ.get("MINILCM_GIT_DIRTY") == "1"
    return {"git_commit": commit, "git_dirty": dirty}


def provenance(seconds: float, device, git: dict | None = None) -> dict:
    """Where and how a checkpoint was made: git commit (``git``: ``git_state()`` read when training started; by
    default read now), hardware, versions, wall time, profile."""
    return {**(git or git_state()), "hardware": hardware(device), "torch": torch.__version__,
            "profile": current(),
            "wall_seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d")}


def export_target(out, name: str, replace_shipped: bool = False) -> Path:
    """The folder a stage exports to, checked before any training: ``out``, else ``runs/<name>``, else (with
    ``replace_shipped``) the shipped ``<shipped_dir()>/<name>``. Says what a replacement replaces."""
    if out is None:
        out = shipped_dir() / name if replace_shipped else default_export(name)
    out = check_export(out, replace_shipped, name)
    if is_shipped(out) and out.exists():
        old = out / "meta.json"
        when = ""
        if old.exists():
            try:
                m = json.loads(old.read_text())
                when = f" (trained {m.get('date', '?')}, {m.get('steps', '?')} steps, profile {m.get('profile', '?')})"
            except ValueError:
                pass
        print(f"--replace-shipped: the export will replace the shipped checkpoint {out}{when}")
    else:
        print(f"the export will go to {out}")
    return Path(out)


def teacher_record(teacher) -> dict:
    """What a student stores about its teacher: a shipped name as is, else the absolute path; and the sha256 of
    the teacher's weights, which loading checks."""
    path = resolve(teacher)
    name = path.name if is_shipped(path) else str(path.resolve())
    return {"teacher": name, "teacher_sha256": content_hash(path)}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def sample_metrics(folder, runs: list[tuple[str, int]], n: int, w: float, device: str, batch: int = 250) -> dict:
    """FD-clf (and class accuracy when conditional) of ``n`` samples per (sampler, steps), when the evaluator
    exists: the numbers ``minilcm bench`` measures in full, drawn as ``generate.generate`` draws them for seed 0
    (one generator for the whole run, batches of ``batch`` in order, the classes 0, 1, ..., 9, 0, ...; one untimed
    warm-up image from its own generator first), so both give the same images."""
    try:
        ev = Evaluator.load(device=device)
    except Exception as e:  # the evaluator stage has not run yet
        return {"not_measured": f"no evaluator ({type(e).__name__}): run `minilcm train evaluator`"}
    m = load_model_folder(folder, device=device)
    if m.conditional != "none":
        labels = np.arange(n, dtype=np.int64) % len(CIFAR10_CLASSES)
    else:
        labels = np.full(n, -1, dtype=np.int64)
    out = {}
    for sampler, steps in runs:
        sample_images(m, sampler, min(steps, 2), labels[:1], None, w, torch.Generator().manual_seed(1))  # warm-up
        g = torch.Generator().manual_seed(0)
        _sync(m.device)
        t0 = time.perf_counter()
        x = [sample_images(m, sampler, steps, labels[i:i + batch], None, w, g) for i in range(0, n, batch)]
        _sync(m.device)
        seconds = time.perf_counter() - t0
        images = to_uint8(torch.cat(x)).contiguous()  # (n, 3, 32, 32) uint8, the evaluator's input
        key = f"{sampler}{steps}"
        out[f"fd_clf_{key}_n{n}"] = round(ev.fd(images), 2)
        if m.conditional != "none":
            out[f"class_acc_{key}_w{w:g}"] = round(ev.class_accuracy(images, torch.from_numpy(labels)), 4)
        out[f"sec_per_image_{key}"] = round(seconds / n, 5)
    return out
