"""The recipe that trains every shipped checkpoint: one function (and one ``minilcm train STAGE`` command) per stage.

(each exports to runs/<name>; with --replace-shipped, to data/checkpoints/<name>)
    evaluator    the CIFAR-10 classifier behind FD-clf and class accuracy      -> evaluator-cifar10
    autoencoder  the mini-SD AutoencoderKL (f = 4: 32x32x3 -> 8x8x4)            -> .../minisd-cifar10 (vae/)
    minisd       the mini-SD text-conditioned latent UNet teacher               -> .../minisd-cifar10 (unet/, ...)
    lcm          the LCM student distilled from it (w-conditioned)              -> .../lcm-cifar10
    ddpm         the Chapters 1-4 pixel DDPM teacher (class-conditional, CFG)  -> .../ddpm-cifar10
    cd           its consistency-distilled one-/two-step student (Chapter 4)    -> .../cd-cifar10

Each stage trains in ``runs/<stage>-...`` (resumable: rerun the same command after an interruption, Ctrl-C or
SIGTERM included) and exports fp16 weights with a ``meta.json``: config, steps, images seen, wall time, hardware,
metrics and the git commit. The export goes to ``runs/<name>`` unless ``out`` is given; the shipped folder
``data/checkpoints`` is written only with ``replace_shipped=True`` (``minilcm train STAGE --replace-shipped``), and
an export is written as a unit (a temporary folder renamed into place), so a failure leaves the old one intact.
A student records its teacher (name or path, and the sha256 of its weights, ``checkpoints.content_hash``).
Sizes follow the profile (``MINILCM_PROFILE``): ``gpu`` is the full recipe; ``cpu`` is the CPU-sized fallback
the course ships when no GPU was available (named as such in the metadata); ``fast`` is a smoke test.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

from .checkpoints import (SHIPPED_DIR, CheckpointError, atomic_write, check_export, content_hash, default_export, is_shipped, resolve,
                          save_model, shipped_dir, staged_folder, strip_machine_paths)
from .errors import InputError
from .profiles import current, pick


def provenance(seconds: float, device) -> dict:
    """Where and how a checkpoint was made: git commit, hardware, versions, wall time, profile."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=Path(__file__).parent).stdout.strip())
    except OSError:
        commit, dirty = None, None
    from .profiles import hardware

    return {"git_commit": commit, "git_dirty": dirty, "hardware": hardware(device), "torch": torch.__version__,
            "profile": current(),
            "wall_seconds": round(seconds, 1), "date": time.strftime("%Y-%m-%d")}


def write_meta(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))


def export_target(out, name: str, replace_shipped: bool = False) -> Path:
    """The folder a stage exports to, checked before any training: ``out``, else ``runs/<name>``, else (with
    ``replace_shipped``) the shipped ``data/checkpoints/<name>``. Says what a replacement replaces."""
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


def latent_cache(vae_folder: Path, n: int, encode_fn) -> torch.Tensor:
    """CIFAR-10 train latents (the first ``n`` of a seeded subset, then their mirror images), cached under
    ``runs/cache`` keyed by the autoencoder's weights and the subset: another autoencoder never reuses them.
    ``encode_fn(images, flip) -> latents``. Written atomically by whichever stage computes it first."""
    from .datasets import cifar10

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


def _tail_mean(losses, k: int = 100) -> float:
    """The mean of the last k losses: the ``final_loss`` every stage records."""
    return sum(losses[-k:]) / max(1, len(losses[-k:]))


# ---- stage 1: the evaluator ---------------------------------------------------------------------------
def train_evaluator(out: str | Path | None = None, device: str = "cpu", progress: bool = True,
                    replace_shipped: bool = False) -> dict:
    """Train the CIFAR-10 evaluator classifier, measure its test accuracy, export it with the test-set feature
    statistics (FD-clf's reference). Returns the metadata written beside the weights."""
    import numpy as np

    from .datasets import cifar10
    from .evaluator import (EVALUATOR_NAME, REFERENCE_STATS, ClassifierLoss, EvaluatorNet, accuracy, feature_stats,
                            features)
    from .train import TrainConfig, train

    out = export_target(out, EVALUATOR_NAME, replace_shipped)
    widths = pick(fast=(8, 16, 16, 16), cpu=(64, 128, 256, 256), gpu=(64, 128, 256, 256))
    epochs = pick(fast=0.02, cpu=15, gpu=20)
    batch = 256
    steps = max(2, int(epochs * 50_000 / batch))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=pick(fast=2e-3, cpu=3e-3, gpu=3e-3), weight_decay=5e-2,
                      warmup_steps=min(200, steps // 10), lr_decay="cosine", ema_decay=0.999, grad_clip=None,
                      amp_cpu=True, device=device, ckpt_dir=f"runs/evaluator-{steps}",
                      ckpt_every=max(50, steps // 20), progress=progress, desc="evaluator classifier")
    train_set, test_set = cifar10("train"), cifar10("test")
    net = EvaluatorNet(widths).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    res = train(net, ClassifierLoss(), train_set, cfg)
    seconds = time.perf_counter() - t0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(torch.device(device).type == "cpu")):
        acc_model = accuracy(res.model, test_set.images, test_set.labels)
        acc_ema = accuracy(res.ema, test_set.images, test_set.labels)
    best = res.ema if acc_ema >= acc_model else res.model
    # fp16 export: measure what ships (weights rounded to fp16, evaluated in fp32)
    shipped = EvaluatorNet(widths)
    shipped.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in best.state_dict().items()})
    acc = accuracy(shipped, test_set.images, test_set.labels)
    mu, sigma = feature_stats(features(shipped, test_set.images))
    mu_tr, sigma_tr = feature_stats(features(shipped, train_set.subset(10_000).images))
    from .metrics import frechet_distance

    fd_train_test = frechet_distance(mu_tr, sigma_tr, mu, sigma)
    meta = {"stage": "evaluator", "widths": list(widths), "steps": steps, "images_seen": steps * batch,
            "epochs": round(steps * batch / 50_000, 2), "train_config": {k: str(v) for k, v in vars(cfg).items()},
            "metrics": {"test_accuracy_tta": round(acc, 4), "test_accuracy_model": round(acc_model, 4),
                        "test_accuracy_ema": round(acc_ema, 4),
                        "fd_clf_train10k_vs_test": round(fd_train_test, 3)},
            "note": "FD-clf: Fréchet distance in this classifier's features; a proxy for FID, not comparable to it",
            **provenance(seconds, device)}
    with staged_folder(out) as tmp:
        save_model(shipped, tmp, **{k: v for k, v in meta.items() if k != "train_config"})
        np.savez(tmp / REFERENCE_STATS, mu=mu, sigma=sigma)
        write_meta(tmp, meta)
    return {**meta, "exported_to": str(out)}


# ---- stages 2-4: the mini Stable Diffusion of Chapter 5 -------------------------------------------------
MINISD_NAME, LCM_NAME = "minisd-cifar10", "lcm-cifar10"


def _save_diffusers(model, folder: Path) -> None:
    """save_pretrained in fp16 (the shipped size), leaving the in-memory model untouched."""
    import copy

    copy.deepcopy(model).to(torch.float16).save_pretrained(str(folder))
    strip_machine_paths(folder)  # no absolute path of this machine in a config that may be committed


def train_autoencoder(out: str | Path | None = None, device: str = "cpu", progress: bool = True,
                      replace_shipped: bool = False) -> dict:
    """Train the mini-SD AutoencoderKL (f = 4) on CIFAR-10, measure reconstructions and the latent scaling factor,
    and save it as ``<out>/vae`` (a diffusers AutoencoderKL folder with ``scaling_factor`` in its config)."""
    from .datasets import cifar10
    from .latents import AutoencoderLoss, decode, encode, measure_scaling_factor
    from .models.sd import minisd_vae
    from .train import TrainConfig, train

    out = export_target(out, MINISD_NAME, replace_shipped)
    size = pick(fast="tiny", cpu="mini", gpu="mini")
    steps = pick(fast=3, cpu=2500, gpu=20_000)
    batch = pick(fast=8, cpu=64, gpu=128)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=min(100, steps // 10), lr_decay="cosine",
                      ema_decay=0.999, amp_cpu=True, device=device, ckpt_dir=f"runs/autoencoder-{size}-{steps}",
                      ckpt_every=max(50, steps // 20), progress=progress, desc="mini-SD autoencoder")
    train_set, test_set = cifar10("train"), cifar10("test")
    vae = minisd_vae(size).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    res = train(vae, AutoencoderLoss(), train_set, cfg)
    seconds = time.perf_counter() - t0
    vae = res.ema.float().to(memory_format=torch.contiguous_format)
    vae = vae.to(torch.float16).float()  # measure what ships (fp16 weights)
    z = encode(vae, train_set.subset(10_000).images)  # a random subset: the archive is sorted by class
    sf = measure_scaling_factor(z)
    vae.register_to_config(scaling_factor=sf)
    x = test_set.subset(2000).images
    rec = decode(vae, encode(vae, x))
    mse = ((rec.clamp(-1, 1) - (x.float() / 127.5 - 1)) ** 2).mean().item()
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # peak-to-peak 2 on [-1, 1]
    metrics = {"test_psnr_db": round(psnr, 2), "test_mse": round(mse, 5), "scaling_factor": round(sf, 5),
               "latent_shape": list(z.shape[1:]), "compression": 3 * 32 * 32 / z[0].numel(),
               "params": sum(p.numel() for p in vae.parameters())}
    try:
        from .evaluator import Evaluator

        ev = Evaluator.load()
        metrics["fd_clf_reconstructions_10k"] = round(ev.fd(decode(vae, encode(vae, test_set.images))), 3)
    except Exception as e:  # the evaluator stage has not run yet
        metrics["fd_clf_reconstructions_10k"] = f"not measured ({type(e).__name__})"
    meta = {"stage": "autoencoder", "size": size, "steps": steps, "images_seen": steps * batch,
            "metrics": metrics, **provenance(seconds, device)}
    with staged_folder(out / "vae") as tmp:
        _save_diffusers(vae, tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    if (out / "unet").exists():
        print(f"note: {out / 'unet'} was trained on the previous autoencoder's latents: retrain it with "
              f"`minilcm train minisd --out {out}`")
    return {**meta, "exported_to": str(out / "vae")}


def train_minisd(out: str | Path | None = None, device: str = "cpu", progress: bool = True,
                 replace_shipped: bool = False) -> dict:
    """Train the mini-SD teacher: a UNet2DConditionModel on the autoencoder's CIFAR-10 latents, conditioned on
    class captions through a frozen, randomly initialised CLIP text encoder, with 10% caption dropout (CFG).
    Saves the whole StableDiffusionPipeline (vae/ from the autoencoder stage) to ``out``."""
    from diffusers import AutoencoderKL

    from .datasets import CIFAR10_CLASSES, cifar10
    from .diffusion import DenoisingLoss
    from .latents import LatentSet, encode
    from .guidance import TextConditioning
    from .models.sd import (CAPTION_TEMPLATES, assemble_pipeline, build_tokenizer, class_caption_table,
                            encode_prompts, minisd_unet, sd_scheduler, tiny_text_encoder)
    from .schedules import Schedule
    from .train import TrainConfig, train

    out = export_target(out, MINISD_NAME, replace_shipped)
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
    size = pick(fast="tiny", cpu="mini", gpu="mini")
    steps = pick(fast=3, cpu=3500, gpu=60_000)
    batch = pick(fast=8, cpu=128, gpu=256)
    train_set = cifar10("train")
    n = pick(fast=64, cpu=len(train_set), gpu=len(train_set))
    z = latent_cache(out / "vae", n, lambda x, flip: encode(vae, x, scaling_factor=sf, flip=flip))
    part = train_set.subset(n) if n < len(train_set) else train_set
    data = LatentSet(z, part.labels.repeat(2), caps)
    unet = minisd_unet(size, cross_attention_dim=te.config.hidden_size,
                       sample_size=z.shape[-1])
    schedule = Schedule("scaled_linear")
    loss = DenoisingLoss(schedule, cond_drop=0.1, conditioning=TextConditioning(empty))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=pick(fast=1e-3, cpu=1e-3, gpu=3e-4),
                      warmup_steps=min(200, steps // 10), lr_decay="cosine", ema_decay=pick(fast=0.9, cpu=0.999,
                                                                                             gpu=0.9999),
                      amp_cpu=False, device=device, ckpt_dir=f"runs/minisd-{size}-{steps}-{content_hash(out / 'vae')[:8]}",
                      ckpt_every=max(50, steps // 30), progress=progress, desc="mini-SD teacher UNet")
    t0 = time.perf_counter()
    res = train(unet, loss, data, cfg)
    seconds = time.perf_counter() - t0
    pipe = assemble_pipeline(res.ema.eval(), vae, te, tok, sd_scheduler("ddim"))
    vae_meta = (out / "vae" / "meta.json").read_text() if (out / "vae" / "meta.json").exists() else "{}"
    meta = {"stage": "minisd", "unet_size": size, "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder": "CLIPTextModel (2 layers, 64 wide), random init, frozen", "captions": CAPTION_TEMPLATES,
            "cond_drop": 0.1, "schedule": "scaled_linear", "steps": steps, "images_seen": steps * batch,
            "final_loss": round(_tail_mean(res.losses), 5),
            **provenance(seconds, device)}
    with staged_folder(out) as folder:  # pipeline, vae metadata and meta.json: one unit
        pipe.to(torch.float16).save_pretrained(str(folder))
        pipe.to(torch.float32)
        (folder / "vae" / "meta.json").write_text(vae_meta)
        strip_machine_paths(folder)
        write_meta(folder, meta)
    return {**meta, "exported_to": str(out)}


def train_lcm(out: str | Path | None = None, device: str = "cpu", progress: bool = True,
              teacher: str | Path = MINISD_NAME, replace_shipped: bool = False) -> dict:
    """Latent consistency distillation (Luo et al. 2023, Algorithm 1) of the mini-SD teacher into a w-conditioned
    student (``lcm.lcm_student``: the teacher's UNet copied, a zero-initialised w input added), on the cached
    CIFAR-10 latents with the class captions. Saves the student UNet (fp16) and an LCMScheduler to ``out``."""
    from .datasets import CIFAR10_CLASSES, cifar10
    from .latents import LatentSet
    from .guidance import TextConditioning
    from .lcm import LatentConsistencyDistillation, lcm_student
    from .minisd import MiniSD
    from .models.sd import CAPTION_TEMPLATES, class_caption_table, sd_scheduler
    from .train import TrainConfig, train

    out = export_target(out, LCM_NAME, replace_shipped)
    sd = MiniSD.load(teacher, device="cpu")
    record = teacher_record(teacher)
    train_set = cifar10("train")
    n = pick(fast=64, cpu=len(train_set), gpu=len(train_set))
    part = train_set.subset(n) if n < len(train_set) else train_set
    z = latent_cache(resolve(teacher) / "vae", n, lambda x, flip: sd.encode(x.flip(3) if flip else x))
    caps = sd.embed(class_caption_table()).reshape(len(CIFAR10_CLASSES), len(CAPTION_TEMPLATES), *sd.empty.shape)
    data = LatentSet(z, part.labels.repeat(2), caps)
    w_min, w_max, k = 0.0, 4.0, 20
    student = lcm_student(sd.unet, sd.schedule, w_dim=256)
    loss = LatentConsistencyDistillation(sd.unet, student, TextConditioning(sd.empty), k=k, w_min=w_min, w_max=w_max,
                                         mu=0.95)
    steps = pick(fast=2, cpu=1000, gpu=20_000)
    batch = pick(fast=4, cpu=64, gpu=256)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=pick(fast=1e-4, cpu=1e-4, gpu=5e-5), warmup_steps=min(50, steps),
                      ema_decay=pick(fast=0.9, cpu=0.99, gpu=0.999), device=device, amp=False,
                      ckpt_dir=f"runs/lcm-{steps}-{record['teacher_sha256'][:8]}", ckpt_every=max(50, steps // 30), progress=progress,
                      desc="LCD of the mini-SD")
    t0 = time.perf_counter()
    res = train(student, loss, data, cfg)
    seconds = time.perf_counter() - t0
    meta = {"stage": "lcm", **record, "k": k, "w_min": w_min, "w_max": w_max, "mu": 0.95,
            "w_convention": "LCM: eps_w = (1 + w) eps_c - w eps_u (diffusers guidance_scale = w + 1)",
            "w_dim": 256, "distance": "pseudo_huber", "steps": steps, "images_seen": steps * batch,
            "final_loss": round(_tail_mean(res.losses), 6),
            **provenance(seconds, device)}
    with staged_folder(out) as tmp:
        _save_diffusers(res.ema.net, tmp / "unet")
        sd_scheduler("lcm").save_pretrained(str(tmp / "scheduler"))
        strip_machine_paths(tmp)
        write_meta(tmp, meta)
    return {**meta, "exported_to": str(out)}


# ---- stages 5-6: the pixel-space CIFAR-10 models of Chapters 1-4 ------------------------------------------
def _sample_metrics(folder: Path, runs: list[tuple[str, int]], n: int, w: float, device: str) -> dict:
    """FD-clf (and class accuracy when conditional) of ``n`` samples per (sampler, steps), when the evaluator
    exists; the numbers ``minilcm bench`` measures in full."""
    from .evaluator import Evaluator
    from .generate import generate
    from .zoo import load_model_folder

    try:
        ev = Evaluator.load(device=device)
    except Exception as e:  # the evaluator stage has not run yet
        return {"not_measured": f"no evaluator ({type(e).__name__}): run `minilcm train evaluator`"}
    m = load_model_folder(folder, device=device)
    out = {}
    for sampler, steps in runs:
        g = generate(m, sampler, steps, n, w=w, seed=0, device=device)
        key = f"{sampler}{steps}"
        out[f"fd_clf_{key}_n{n}"] = round(ev.fd(g.images_nchw), 2)
        if m.conditional != "none":
            out[f"class_acc_{key}_w{w:g}"] = round(ev.class_accuracy(g.images_nchw, torch.from_numpy(g.labels)), 4)
        out[f"sec_per_image_{key}"] = round(g.seconds_per_image, 5)
    return out


def _export_pixel(model, out: Path, meta: dict, runs, w: float, device: str) -> dict:
    """Export a pixel model (fp16) with its metadata, then measure what ships and write the metrics beside it
    (all in a staging folder that replaces ``out`` only when everything is written)."""
    with staged_folder(out) as tmp:
        save_model(model.cpu(), tmp, **meta)  # export first: the metrics sample the fp16 weights that ship
        meta["metrics"] = _sample_metrics(tmp, runs, pick(fast=8, cpu=1000, gpu=2000), w, device)
        save_model(model.cpu(), tmp, **meta)
        write_meta(tmp, meta)
    return {**meta, "exported_to": str(out)}



def train_ddpm(out: str | Path | None = None, device: str = "cpu", progress: bool = True,
               replace_shipped: bool = False) -> dict:
    """Train the Chapters 1-4 pixel DDPM teacher (``recipes.cifar_teacher``: a class-conditional UNet2DModel in
    ``EDMPrecond`` with the SNR+1 weighting, 10% null-class dropout for CFG, linear schedule, hflip) and export its EMA weights in fp16 as ``ddpm-cifar10``."""
    from .recipes import TEACHER_NAME, CifarTeacherRecipe, cifar_teacher

    out = export_target(out, TEACHER_NAME, replace_shipped)
    recipe = CifarTeacherRecipe(
        size=pick(fast="tiny", cpu="tiny", gpu="base"), steps=pick(fast=3, cpu=6000, gpu=40_000),
        batch_size=pick(fast=8, cpu=64, gpu=128), lr=pick(fast=1e-3, cpu=1e-3, gpu=2e-4),
        warmup_steps=pick(fast=0, cpu=200, gpu=1000), ema_decay=pick(fast=0.9, cpu=0.999, gpu=0.9999),
        lr_decay=pick(fast="none", cpu="cosine", gpu="none"), amp=True, precond="edm", weighting="snr+1")
    t0 = time.perf_counter()
    model, info = cifar_teacher(recipe, use_shipped=False, device=device, progress=progress,
                                ckpt_dir=f"runs/ddpm-{recipe.size}-{recipe.steps}")
    seconds = time.perf_counter() - t0
    meta = {"stage": "ddpm", "schedule": recipe.schedule, "recipe": dict(vars(recipe)),
            "params": sum(p.numel() for p in model.parameters()), "steps": recipe.steps,
            "images_seen": recipe.steps * recipe.batch_size,
            "final_loss": round(_tail_mean(info["losses"]), 5), **provenance(seconds, device)}
    return _export_pixel(model, out, meta, [("dpm_solver_pp", 25), ("ddim", 25)], 1.0, device)


def train_cd(out: str | Path | None = None, device: str = "cpu", progress: bool = True,
             teacher: str | Path = "ddpm-cifar10", replace_shipped: bool = False) -> dict:
    """Consistency-distil the pixel DDPM teacher (``recipes.cifar_cd_student``: Heun on the N = 18 Karras grid,
    mu = 0.95, pseudo-Huber; the teacher's null-class model, as Song et al. 2023 distil unconditionally) and export
    the student's EMA weights in fp16 as ``cd-cifar10``."""
    from .zoo import load_model_folder
    from .recipes import CD_NAME, CifarCDRecipe, cifar_cd_student

    out = export_target(out, CD_NAME, replace_shipped)
    t = load_model_folder(teacher, device=device)
    if t.kind != "pixel-teacher":
        raise InputError(f"{teacher} holds a {t.kind} model; `minilcm train cd` distils a pixel DDPM teacher "
                         "(`minilcm train ddpm` makes one)")
    recipe = CifarCDRecipe(
        steps=pick(fast=2, cpu=1200, gpu=20_000), batch_size=pick(fast=4, cpu=32, gpu=256),
        times_per_batch=pick(fast=2, cpu=4, gpu=8), lr=pick(fast=1e-4, cpu=1e-4, gpu=4e-4),
        ema_decay=pick(fast=0.9, cpu=0.99, gpu=0.9999))
    t0 = time.perf_counter()
    student, info = cifar_cd_student(recipe, teacher=t.model.float(), use_shipped=False, device=device,
                                     progress=progress, ckpt_dir=f"runs/cd-{recipe.steps}-{content_hash(resolve(teacher))[:8]}")
    seconds = time.perf_counter() - t0
    meta = {"stage": "cd", **teacher_record(teacher), "recipe": dict(vars(recipe)),
            "steps": recipe.steps, "images_seen": recipe.steps * recipe.batch_size,
            "final_loss": round(_tail_mean(info["losses"]), 6), **provenance(seconds, device)}
    return _export_pixel(student, out, meta, [("cm", 1), ("cm", 2)], 0.0, device)


STAGES = {"evaluator": train_evaluator, "autoencoder": train_autoencoder, "minisd": train_minisd, "lcm": train_lcm,
          "ddpm": train_ddpm, "cd": train_cd}
