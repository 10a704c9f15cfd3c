"""The recipe that trains every shipped checkpoint: one table of stages, ``STAGES``, and one runner, ``run_stage``
(``minilcm train STAGE`` calls ``STAGES[STAGE](out=..., device=..., ...)``).

(each exports to runs/<name>; with --replace-shipped, to the shipped folder <shipped_dir()>/<name>)
    evaluator    the CIFAR-10 classifier behind FD-clf and class accuracy      -> evaluator-cifar10
    autoencoder  the mini-SD AutoencoderKL (f = 4: 32x32x3 -> 8x8x4)            -> .../minisd-cifar10 (vae/)
    minisd       the mini-SD text-conditioned latent UNet teacher               -> .../minisd-cifar10 (unet/, ...)
    lcm          the LCM student distilled from it (w-conditioned)              -> .../lcm-cifar10
    ddpm         the Chapters 1-4 pixel DDPM teacher (class-conditional, CFG)  -> .../ddpm-cifar10
    cd           its consistency-distilled one-/two-step student (Chapter 4)    -> .../cd-cifar10

A stage names what differs: its builder (model, loss and data, trained through ``train.train`` in
``runs/<stage>-...``: resumable, rerun the same command after an interruption, Ctrl-C or SIGTERM included), its
export and its measurement; its sizes are its row of ``profiles.SIZES``. ``run_stage`` does the rest for every
stage: it checks the export target first (``exports.export_target``: ``runs/<name>`` unless ``out`` is given,
the shipped folder only with ``replace_shipped=True``), trains, exports fp16 weights into a staging folder that
replaces the old export only when complete (``checkpoints.staged_folder``), measures, and writes ``meta.json``
(``checkpoints.write_meta``): the stage's keys, steps, images seen, metrics, and the provenance (git commit,
hardware, wall time, profile). A student records its teacher (``exports.teacher_record``: name or path, and
the sha256 of its weights). Profiles: ``gpu`` is the full recipe; ``cpu`` the CPU-sized fallback the course ships
when no GPU was available (named as such in the metadata); ``fast`` a smoke test.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .budget import MAX_MINUTES, run_tag
from .catalog import STAGE_NAMES
from .checkpoints import save_model, staged_folder, write_meta
from .datasets import cifar10
from .errors import InputError
from .evaluator import (EVALUATOR_NAME, REFERENCE_STATS, ClassifierLoss, EvaluatorNet, accuracy, feature_stats,
                        features)
from .exports import (Trained, budget_record, export_target, git_state, provenance, sample_metrics, tail_mean,
                      teacher_record)
from .latent_stages import (build_autoencoder, build_lcm, build_minisd, export_autoencoder, export_lcm,
                            export_minisd, measure_autoencoder)
from .metrics import frechet_distance
from .minisd import LCM_NAME, MINISD_NAME
from .profiles import sizes
from .recipes import CD_NAME, TEACHER_NAME, CifarCDRecipe, CifarTeacherRecipe, cifar_cd_student, cifar_teacher
from .train import TrainConfig, train
from .zoo import load_model_folder


# ---- the runner ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage: ``build(out, device, progress, sizes, **kw) -> Trained``; ``export(trained, folder, meta)``
    writes the weights into the staging folder; ``measure(trained, folder, device) -> metrics`` measures the
    in-memory model, or with ``measure_export`` the exported weights read back from the folder."""

    name: str
    checkpoint: str             # what it exports (runs/<checkpoint>, or the shipped one)
    build: Callable
    export: Callable
    measure: Callable | None = None
    measure_export: bool = False
    sub: str = ""               # export into <out>/<sub> (the autoencoder: vae/)

    def __call__(self, out=None, device: str = "cpu", progress: bool = True, replace_shipped: bool = False,
                 overrides: dict | None = None, **kw) -> dict:
        return run_stage(self, out, device, progress, replace_shipped, overrides, **kw)


def run_stage(stage: Stage, out: str | Path | None = None, device: str = "cpu", progress: bool = True,
              replace_shipped: bool = False, overrides: dict | None = None, **kw) -> dict:
    """Train, export, measure and describe one stage; returns the metadata written, with "exported_to".
    ``overrides``: fields of the profile's size row replaced (``minilcm train --steps / --batch``), recorded."""
    s = sizes(stage.name)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    minutes = overrides.pop("minutes", None)
    if minutes is not None:
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes <= MAX_MINUTES:
            raise InputError(f"--minutes must be a number of minutes in (0, {MAX_MINUTES}], got {minutes!r}")
        if "steps" in overrides:
            raise InputError("give --minutes or --steps, not both: --minutes sets the step count to what fits")
    for k, v in overrides.items():
        if k not in s:
            raise InputError(f"the {stage.name} stage has no {k!r} setting (it has: {', '.join(sorted(s))})")
        if not (isinstance(v, int) and v >= 1):
            raise InputError(f"{k} must be a positive integer, got {v!r}")
    out = export_target(out, stage.checkpoint, replace_shipped)
    git = git_state()  # the code that trains, before the tree can move on
    t = stage.build(out, device, progress, {**s, **overrides, **({"minutes": minutes} if minutes else {})}, **kw)
    recorded = {**overrides, **({"minutes": minutes} if minutes else {})}
    meta = {"stage": stage.name, **t.meta, "steps": t.steps, "images_seen": t.steps * t.batch_size,
            **({"overrides": recorded} if recorded else {}), **provenance(t.seconds, device, git)}
    target = out / stage.sub if stage.sub else out
    t_export = time.perf_counter()
    with staged_folder(target) as tmp:  # weights, metrics and meta.json: one unit
        if stage.measure is not None:
            if stage.measure_export:
                stage.export(t, tmp, meta)  # measure what ships: the fp16 weights, read back
            meta["metrics"] = stage.measure(t, tmp, device)
        meta["export_seconds"] = round(time.perf_counter() - t_export, 1)  # export and measurement, outside a budget
        stage.export(t, tmp, meta)
        write_meta(tmp, meta)
    return {**meta, "exported_to": str(target)}


# ---- stage 1: the evaluator ---------------------------------------------------------------------------
def _build_evaluator(out, device, progress, s) -> Trained:
    """Train the CIFAR-10 classifier; keep the better of its weights and their EMA (bf16 test accuracy), rounded
    to fp16 as it ships, with the test set's feature statistics (FD-clf's reference)."""
    batch = 256
    steps = max(2, int(s["epochs"] * 50_000 / batch))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=s["lr"], weight_decay=5e-2,
                      warmup_steps=min(200, steps // 10), lr_decay="cosine", ema_decay=0.999, grad_clip=None,
                      amp_cpu=True, device=device, ckpt_dir=f"runs/evaluator-{steps}{run_tag(s.get('minutes'))}",
                      ckpt_every=max(50, steps // 20), progress=progress, desc="evaluator classifier",
                      minutes=s.get("minutes"))
    train_set, test_set = cifar10("train"), cifar10("test")
    net = EvaluatorNet(s["widths"]).to(memory_format=torch.channels_last)
    res = train(net, ClassifierLoss(), train_set, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(torch.device(device).type == "cpu")):
        acc_model = accuracy(res.model, test_set.images, test_set.labels)
        acc_ema = accuracy(res.ema, test_set.images, test_set.labels)
    best = res.ema if acc_ema >= acc_model else res.model
    shipped = EvaluatorNet(s["widths"])  # evaluated in fp32 with the fp16-rounded weights that ship
    shipped.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in best.state_dict().items()})
    steps = res.step
    meta = {"widths": list(s["widths"]), "epochs": round(steps * batch / 50_000, 2), **budget_record(res.budget),
            "train_config": {k: str(v) for k, v in vars(cfg).items()},
            "note": "FD-clf: Fréchet distance in this classifier's features; a proxy for FID, not comparable to it"}
    return Trained(shipped, steps, batch, res.seconds, meta,
                   {"train_set": train_set, "test_set": test_set, "acc_model": acc_model, "acc_ema": acc_ema,
                    "stats": feature_stats(features(shipped, test_set.images))})


def _measure_evaluator(t: Trained, folder, device) -> dict:
    test_set, (mu, sigma) = t.extra["test_set"], t.extra["stats"]
    acc = accuracy(t.model, test_set.images, test_set.labels)
    mu_tr, sigma_tr = feature_stats(features(t.model, t.extra["train_set"].subset(10_000).images))
    return {"test_accuracy_tta": round(acc, 4), "test_accuracy_model": round(t.extra["acc_model"], 4),
            "test_accuracy_ema": round(t.extra["acc_ema"], 4),
            "fd_clf_train10k_vs_test": round(frechet_distance(mu_tr, sigma_tr, mu, sigma), 3)}


def _export_evaluator(t: Trained, folder: Path, meta: dict) -> None:
    save_model(t.model, folder, **{k: v for k, v in meta.items() if k != "train_config"})
    mu, sigma = t.extra["stats"]
    np.savez(folder / REFERENCE_STATS, mu=mu, sigma=sigma)


# ---- stages 5-6: the pixel-space CIFAR-10 models of Chapters 1-4 ------------------------------------------
def _build_ddpm(out, device, progress, s) -> Trained:
    """The Chapters 1-4 pixel DDPM teacher (``recipes.cifar_teacher``: a class-conditional UNet2DModel in
    ``EDMPrecond`` with the SNR+1 weighting, 10% null-class dropout for CFG, linear schedule, hflip), its EMA."""
    recipe = CifarTeacherRecipe(**s)
    model, info = cifar_teacher(recipe, use_shipped=False, device=device, progress=progress,
                                ckpt_dir=f"runs/ddpm-{recipe.size}-{recipe.steps}{run_tag(recipe.minutes)}")
    meta = {"schedule": recipe.schedule, "recipe": dict(vars(recipe)),
            "params": sum(p.numel() for p in model.parameters()),
            "final_loss": round(tail_mean(info["losses"]), 5), **budget_record(info["budget"])}
    return Trained(model, info["steps"], recipe.batch_size, info["seconds"], meta)


def _build_cd(out, device, progress, s, teacher: str | Path = TEACHER_NAME) -> Trained:
    """Consistency distillation of the pixel DDPM teacher (``recipes.cifar_cd_student``: Heun on the N = 18 Karras
    grid, mu = 0.95, pseudo-Huber; the teacher's null-class model, as Song et al. 2023 distil unconditionally)."""
    t = load_model_folder(teacher, device=device)
    if t.kind != "pixel-teacher":
        raise InputError(f"{teacher} holds a {t.kind} model; `minilcm train cd` distils a pixel DDPM teacher "
                         "(`minilcm train ddpm` makes one)")
    record = teacher_record(teacher)
    recipe = CifarCDRecipe(**s)
    run_dir = f"runs/cd-{recipe.steps}-{record['teacher_sha256'][:8]}{run_tag(recipe.minutes)}"
    student, info = cifar_cd_student(recipe, teacher=t.model.float(), use_shipped=False, device=device,
                                     progress=progress, ckpt_dir=run_dir)
    meta = {**record, "recipe": dict(vars(recipe)), "final_loss": round(tail_mean(info["losses"]), 6),
            **budget_record(info["budget"])}
    return Trained(student, info["steps"], recipe.batch_size, info["seconds"], meta)


def _export_pixel(t: Trained, folder: Path, meta: dict) -> None:
    save_model(t.model.cpu(), folder, **meta)


def _pixel_metrics(runs: list[tuple[str, int]], w: float) -> Callable:
    """The pixel stages' measurement: FD-clf (and class accuracy) of the exported model for each (sampler, steps)."""
    def measure(t: Trained, folder: Path, device) -> dict:
        return sample_metrics(folder, runs, sizes("pixel_metrics")["n_samples"], w, device)
    return measure


STAGES = {s.name: s for s in (
    Stage("evaluator", EVALUATOR_NAME, _build_evaluator, _export_evaluator, _measure_evaluator),
    Stage("autoencoder", MINISD_NAME, build_autoencoder, export_autoencoder, measure_autoencoder, sub="vae"),
    Stage("minisd", MINISD_NAME, build_minisd, export_minisd),
    Stage("lcm", LCM_NAME, build_lcm, export_lcm),
    Stage("ddpm", TEACHER_NAME, _build_ddpm, _export_pixel, _pixel_metrics([("dpm_solver_pp", 25), ("ddim", 25)], 1.0),
          measure_export=True),
    Stage("cd", CD_NAME, _build_cd, _export_pixel, _pixel_metrics([("cm", 1), ("cm", 2)], 0.0), measure_export=True),
)}
assert tuple(STAGES) == STAGE_NAMES, "catalog.STAGE_NAMES names every stage, in order"
