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

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL

from .catalog import STAGE_NAMES
from .checkpoints import (CheckpointError, atomic_write, content_hash, default_export, resolve, save_model,
                          staged_folder, strip_machine_paths, write_meta)
from .datasets import CIFAR10_CLASSES, cifar10
from .diffusion import DenoisingLoss
from .errors import InputError
from .evaluator import (EVALUATOR_NAME, REFERENCE_STATS, ClassifierLoss, Evaluator, EvaluatorNet, accuracy,
                        feature_stats, features)
from .guidance import TextConditioning
from .latents import AutoencoderLoss, LatentSet, decode, encode, measure_scaling_factor
from .lcm import LatentConsistencyDistillation, lcm_student
from .metrics import frechet_distance
from .minisd import LCM_NAME, MINISD_NAME, MiniSD
from .models.sd import (CAPTION_TEMPLATES, assemble_pipeline, build_tokenizer, class_caption_table, encode_prompts,
                        minisd_unet, minisd_vae, sd_scheduler, tiny_text_encoder)
from .profiles import sizes
from .exports import export_target, provenance, sample_metrics, teacher_record
from .recipes import CD_NAME, TEACHER_NAME, CifarCDRecipe, CifarTeacherRecipe, cifar_cd_student, cifar_teacher
from .schedules import Schedule
from .train import TrainConfig, train
from .zoo import load_model_folder


# ---- the runner ---------------------------------------------------------------------------------------
@dataclass
class Trained:
    """What a stage's builder returns: the model to export, how it trained, and the stage's own metadata keys."""

    model: object
    steps: int
    batch_size: int
    seconds: float              # the training loop's wall clock (train.TrainResult.seconds)
    meta: dict
    extra: dict = field(default_factory=dict)  # what the export and the measurement need besides the model


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
                 **kw) -> dict:
        return run_stage(self, out, device, progress, replace_shipped, **kw)


def run_stage(stage: Stage, out: str | Path | None = None, device: str = "cpu", progress: bool = True,
              replace_shipped: bool = False, **kw) -> dict:
    """Train, export, measure and describe one stage; returns the metadata written, with "exported_to"."""
    out = export_target(out, stage.checkpoint, replace_shipped)
    t = stage.build(out, device, progress, sizes(stage.name), **kw)
    meta = {"stage": stage.name, **t.meta, "steps": t.steps, "images_seen": t.steps * t.batch_size,
            **provenance(t.seconds, device)}
    target = out / stage.sub if stage.sub else out
    with staged_folder(target) as tmp:  # weights, metrics and meta.json: one unit
        if stage.measure is not None:
            if stage.measure_export:
                stage.export(t, tmp, meta)  # measure what ships: the fp16 weights, read back
            meta["metrics"] = stage.measure(t, tmp, device)
        stage.export(t, tmp, meta)
        write_meta(tmp, meta)
    return {**meta, "exported_to": str(target)}


def _tail_mean(losses, k: int = 100) -> float:
    """The mean of the last k losses: the ``final_loss`` the stages record."""
    return sum(losses[-k:]) / max(1, len(losses[-k:]))


def _save_diffusers(model, folder: Path) -> None:
    """save_pretrained in fp16 (the shipped size), leaving the in-memory model untouched."""
    copy.deepcopy(model).to(torch.float16).save_pretrained(str(folder))
    strip_machine_paths(folder)  # no absolute path of this machine in a config that may be committed


def latent_cache(vae_folder: Path, n: int, encode_fn) -> torch.Tensor:
    """CIFAR-10 train latents (the first ``n`` of a seeded subset, then their mirror images), cached under
    ``runs/cache`` keyed by the autoencoder's weights and the subset: another autoencoder never reuses them.
    ``encode_fn(images, flip) -> latents``. Written atomically by whichever stage computes it first."""
    train_set = cifar10("train")
    key = content_hash(vae_folder)[:16]
    cache = Path("runs") / "cache" / f"minisd-latents-{key}-n{n}-seed0.pt"
    if cache.exists():
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # an unreadable cache is rebuilt
            cache.unlink(missing_ok=True)
    part = train_set.subset(n) if n < len(train_set) else train_set
    z = torch.cat([encode_fn(part.images, False), encode_fn(part.images, True)])  # hflip augmentation
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: torch.save(z, tmp))
    return z


# ---- stage 1: the evaluator ---------------------------------------------------------------------------
def _build_evaluator(out, device, progress, s) -> Trained:
    """Train the CIFAR-10 classifier; keep the better of its weights and their EMA (bf16 test accuracy), rounded
    to fp16 as it ships, with the test set's feature statistics (FD-clf's reference)."""
    batch = 256
    steps = max(2, int(s["epochs"] * 50_000 / batch))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=s["lr"], weight_decay=5e-2,
                      warmup_steps=min(200, steps // 10), lr_decay="cosine", ema_decay=0.999, grad_clip=None,
                      amp_cpu=True, device=device, ckpt_dir=f"runs/evaluator-{steps}",
                      ckpt_every=max(50, steps // 20), progress=progress, desc="evaluator classifier")
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
    meta = {"widths": list(s["widths"]), "epochs": round(steps * batch / 50_000, 2),
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


# ---- stages 2-4: the mini Stable Diffusion of Chapter 5 -------------------------------------------------
def _build_autoencoder(out, device, progress, s) -> Trained:
    """Train the mini-SD AutoencoderKL (f = 4) on CIFAR-10, round it to fp16 as it ships, and set the latent
    scaling factor it is saved with (1 / std of its latents, LDM App. D.1)."""
    steps, batch = s["steps"], s["batch_size"]
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=min(100, steps // 10), lr_decay="cosine",
                      ema_decay=0.999, amp_cpu=True, device=device, ckpt_dir=f"runs/autoencoder-{s['size']}-{steps}",
                      ckpt_every=max(50, steps // 20), progress=progress, desc="mini-SD autoencoder")
    train_set, test_set = cifar10("train"), cifar10("test")
    vae = minisd_vae(s["size"]).to(memory_format=torch.channels_last)
    res = train(vae, AutoencoderLoss(), train_set, cfg)
    vae = res.ema.float().to(memory_format=torch.contiguous_format)
    vae = vae.to(torch.float16).float()  # measure what ships (fp16 weights)
    z = encode(vae, train_set.subset(10_000).images)  # a random subset: the archive is sorted by class
    vae.register_to_config(scaling_factor=measure_scaling_factor(z))
    return Trained(vae, steps, batch, res.seconds, {"size": s["size"]}, {"test_set": test_set, "z": z})


def _measure_autoencoder(t: Trained, folder, device) -> dict:
    """Reconstruction PSNR / MSE on 2,000 test images, the latent shape, and FD-clf of reconstructions."""
    vae, z, test_set = t.model, t.extra["z"], t.extra["test_set"]
    x = test_set.subset(2000).images
    rec = decode(vae, encode(vae, x))
    mse = ((rec.clamp(-1, 1) - (x.float() / 127.5 - 1)) ** 2).mean().item()
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # peak-to-peak 2 on [-1, 1]
    metrics = {"test_psnr_db": round(psnr, 2), "test_mse": round(mse, 5),
               "scaling_factor": round(vae.config.scaling_factor, 5), "latent_shape": list(z.shape[1:]),
               "compression": 3 * 32 * 32 / z[0].numel(), "params": sum(p.numel() for p in vae.parameters())}
    try:
        ev = Evaluator.load()
        metrics["fd_clf_reconstructions_10k"] = round(ev.fd(decode(vae, encode(vae, test_set.images))), 3)
    except Exception as e:  # the evaluator stage has not run yet
        metrics["fd_clf_reconstructions_10k"] = f"not measured ({type(e).__name__})"
    return metrics


def _export_autoencoder(t: Trained, folder: Path, meta: dict) -> None:
    _save_diffusers(t.model, folder)
    unet = folder.parent / "unet"
    if unet.exists():
        print(f"note: {unet} was trained on the previous autoencoder's latents: retrain it with "
              f"`minilcm train minisd --out {folder.parent}`")


def _build_minisd(out, device, progress, s) -> Trained:
    """The mini-SD teacher: a UNet2DConditionModel on the autoencoder's CIFAR-10 latents, conditioned on class
    captions through a frozen, randomly initialised CLIP text encoder, with 10% caption dropout (CFG), assembled
    into a StableDiffusionPipeline with the autoencoder stage's vae/."""
    if not (out / "vae").exists():
        raise CheckpointError(f"{out / 'vae'} is missing: run `minilcm train autoencoder"
                              f"{'' if out == default_export(MINISD_NAME) else ' --out ' + str(out)}` first")
    vae = AutoencoderKL.from_pretrained(str(out / "vae"), dtype=torch.float32).eval()
    sf = vae.config.scaling_factor
    tok = build_tokenizer()
    te = tiny_text_encoder(tok, hidden=64, seed=0)  # frozen at its random initialisation (see Chapter 5)
    caps = encode_prompts(tok, te, class_caption_table())
    caps = caps.reshape(len(CIFAR10_CLASSES), len(CAPTION_TEMPLATES), *caps.shape[1:])  # (10, 4, L, D)
    empty = encode_prompts(tok, te, [""])[0]
    size, steps, batch = s["size"], s["steps"], s["batch_size"]
    train_set = cifar10("train")
    n = s["n_train"] or len(train_set)
    z = latent_cache(out / "vae", n, lambda x, flip: encode(vae, x, scaling_factor=sf, flip=flip))
    part = train_set.subset(n) if n < len(train_set) else train_set
    data = LatentSet(z, part.labels.repeat(2), caps)
    unet = minisd_unet(size, cross_attention_dim=te.config.hidden_size, sample_size=z.shape[-1])
    loss = DenoisingLoss(Schedule("scaled_linear"), cond_drop=0.1, conditioning=TextConditioning(empty))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=s["lr"], warmup_steps=min(200, steps // 10),
                      lr_decay="cosine", ema_decay=s["ema_decay"], amp_cpu=False, device=device,
                      ckpt_dir=f"runs/minisd-{size}-{steps}-{content_hash(out / 'vae')[:8]}",
                      ckpt_every=max(50, steps // 30), progress=progress, desc="mini-SD teacher UNet")
    res = train(unet, loss, data, cfg)
    pipe = assemble_pipeline(res.ema.eval(), vae, te, tok, sd_scheduler("ddim"))
    vae_meta = json.loads((out / "vae" / "meta.json").read_text()) if (out / "vae" / "meta.json").exists() else {}
    meta = {"unet_size": size, "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder": "CLIPTextModel (2 layers, 64 wide), random init, frozen", "captions": CAPTION_TEMPLATES,
            "cond_drop": 0.1, "schedule": "scaled_linear", "final_loss": round(_tail_mean(res.losses), 5)}
    return Trained(pipe, steps, batch, res.seconds, meta, {"vae_meta": vae_meta})


def _export_minisd(t: Trained, folder: Path, meta: dict) -> None:
    _save_diffusers(t.model, folder)  # the whole pipeline, vae/ included: keep the vae's own metadata
    write_meta(folder / "vae", t.extra["vae_meta"])


def _build_lcm(out, device, progress, s, teacher: str | Path = MINISD_NAME) -> Trained:
    """Latent consistency distillation (Luo et al. 2023, Algorithm 1) of the mini-SD teacher into a w-conditioned
    student (``lcm.lcm_student``: the teacher's UNet copied, a zero-initialised w input added), on the cached
    CIFAR-10 latents with the class captions."""
    sd = MiniSD.load(teacher, device="cpu")
    record = teacher_record(teacher)
    train_set = cifar10("train")
    n = s["n_train"] or len(train_set)
    part = train_set.subset(n) if n < len(train_set) else train_set
    z = latent_cache(resolve(teacher) / "vae", n, lambda x, flip: sd.encode(x.flip(3) if flip else x))
    caps = sd.embed(class_caption_table()).reshape(len(CIFAR10_CLASSES), len(CAPTION_TEMPLATES), *sd.empty.shape)
    data = LatentSet(z, part.labels.repeat(2), caps)
    w_min, w_max, k = 0.0, 4.0, 20
    student = lcm_student(sd.unet, sd.schedule, w_dim=256)
    loss = LatentConsistencyDistillation(sd.unet, student, TextConditioning(sd.empty), k=k, w_min=w_min, w_max=w_max,
                                         mu=0.95)
    steps, batch = s["steps"], s["batch_size"]
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=s["lr"], warmup_steps=min(50, steps),
                      ema_decay=s["ema_decay"], device=device, amp=False,
                      ckpt_dir=f"runs/lcm-{steps}-{record['teacher_sha256'][:8]}", ckpt_every=max(50, steps // 30),
                      progress=progress, desc="LCD of the mini-SD")
    res = train(student, loss, data, cfg)
    meta = {**record, "k": k, "w_min": w_min, "w_max": w_max, "mu": 0.95,
            "w_convention": "LCM: eps_w = (1 + w) eps_c - w eps_u (diffusers guidance_scale = w + 1)",
            "w_dim": 256, "distance": "pseudo_huber", "final_loss": round(_tail_mean(res.losses), 6)}
    return Trained(res.ema.net, steps, batch, res.seconds, meta)


def _export_lcm(t: Trained, folder: Path, meta: dict) -> None:
    _save_diffusers(t.model, folder / "unet")
    sd_scheduler("lcm").save_pretrained(str(folder / "scheduler"))
    strip_machine_paths(folder)


# ---- stages 5-6: the pixel-space CIFAR-10 models of Chapters 1-4 ------------------------------------------
def _build_ddpm(out, device, progress, s) -> Trained:
    """The Chapters 1-4 pixel DDPM teacher (``recipes.cifar_teacher``: a class-conditional UNet2DModel in
    ``EDMPrecond`` with the SNR+1 weighting, 10% null-class dropout for CFG, linear schedule, hflip), its EMA."""
    recipe = CifarTeacherRecipe(**s)
    model, info = cifar_teacher(recipe, use_shipped=False, device=device, progress=progress,
                                ckpt_dir=f"runs/ddpm-{recipe.size}-{recipe.steps}")
    meta = {"schedule": recipe.schedule, "recipe": dict(vars(recipe)),
            "params": sum(p.numel() for p in model.parameters()),
            "final_loss": round(_tail_mean(info["losses"]), 5)}
    return Trained(model, recipe.steps, recipe.batch_size, info["seconds"], meta)


def _build_cd(out, device, progress, s, teacher: str | Path = TEACHER_NAME) -> Trained:
    """Consistency distillation of the pixel DDPM teacher (``recipes.cifar_cd_student``: Heun on the N = 18 Karras
    grid, mu = 0.95, pseudo-Huber; the teacher's null-class model, as Song et al. 2023 distil unconditionally)."""
    t = load_model_folder(teacher, device=device)
    if t.kind != "pixel-teacher":
        raise InputError(f"{teacher} holds a {t.kind} model; `minilcm train cd` distils a pixel DDPM teacher "
                         "(`minilcm train ddpm` makes one)")
    record = teacher_record(teacher)
    recipe = CifarCDRecipe(**s)
    student, info = cifar_cd_student(recipe, teacher=t.model.float(), use_shipped=False, device=device,
                                     progress=progress, ckpt_dir=f"runs/cd-{recipe.steps}-{record['teacher_sha256'][:8]}")
    meta = {**record, "recipe": dict(vars(recipe)), "final_loss": round(_tail_mean(info["losses"]), 6)}
    return Trained(student, recipe.steps, recipe.batch_size, info["seconds"], meta)


def _export_pixel(t: Trained, folder: Path, meta: dict) -> None:
    save_model(t.model.cpu(), folder, **meta)


def _pixel_metrics(runs: list[tuple[str, int]], w: float) -> Callable:
    """The pixel stages' measurement: FD-clf (and class accuracy) of the exported model for each (sampler, steps)."""
    def measure(t: Trained, folder: Path, device) -> dict:
        return sample_metrics(folder, runs, sizes("pixel_metrics")["n_samples"], w, device)
    return measure


STAGES = {s.name: s for s in (
    Stage("evaluator", EVALUATOR_NAME, _build_evaluator, _export_evaluator, _measure_evaluator),
    Stage("autoencoder", MINISD_NAME, _build_autoencoder, _export_autoencoder, _measure_autoencoder, sub="vae"),
    Stage("minisd", MINISD_NAME, _build_minisd, _export_minisd),
    Stage("lcm", LCM_NAME, _build_lcm, _export_lcm),
    Stage("ddpm", TEACHER_NAME, _build_ddpm, _export_pixel, _pixel_metrics([("dpm_solver_pp", 25), ("ddim", 25)], 1.0),
          measure_export=True),
    Stage("cd", CD_NAME, _build_cd, _export_pixel, _pixel_metrics([("cm", 1), ("cm", 2)], 0.0), measure_export=True),
)}
assert tuple(STAGES) == STAGE_NAMES, "catalog.STAGE_NAMES names every stage, in order"
