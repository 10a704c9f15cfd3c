"""The Chapter 5 stages of ``stages.STAGES``: the mini-SD autoencoder, its latent teacher UNet and the LCM student.

    autoencoder  phase 1: AutoencoderKL with L2 + KL (``latents.AutoencoderLoss``), or ``init=`` an existing one;
                 phase 2: its decoder fine-tuned with a perceptual distance in the course classifier's feature maps
                 and a patch discriminator (``latents.train_decoder``), the encoder frozen; then the per-channel
                 latent statistics (``latents.latent_stats``) saved as latents_mean / latents_std
    minisd       the text-conditioned UNet teacher on those normalised latents (``init=``: warm start from a
                 mini-SD pipeline's UNet)
    lcm          latent consistency distillation of the teacher; exports the target network theta^- (the reference
                 script's convention, and ``minilcm sd-distill``'s)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .checkpoints import CheckpointError, atomic_write, content_hash, default_export, resolve, strip_machine_paths, write_meta
from .budget import phase_minutes, run_tag
from .datasets import CIFAR10_CLASSES, cifar10
from .diffusion import DenoisingLoss
from .errors import InputError
from .evaluator import Evaluator
from .exports import Trained, budget_record, save_diffusers, tail_mean, teacher_record
from .guidance import TextConditioning
from .latents import AutoencoderLoss, LatentSet, decode, encode, latent_stats, train_decoder, vae_factors
from .lcm import GuidanceDistillation, LatentConsistencyDistillation, lcm_student
from .minisd import MINISD_NAME, MiniSD
from .models.sd import (CAPTION_TEMPLATES, assemble_pipeline, build_tokenizer, class_caption_table, encode_prompts,
                        minisd_unet, minisd_vae, sd_scheduler, tiny_text_encoder)
from .schedules import Schedule
from .train import TrainConfig, train


def latent_cache(vae_folder: Path, n: int, encode_fn) -> torch.Tensor:
    """CIFAR-10 train latents (the first ``n`` of a seeded subset, then their mirror images), cached under
    ``runs/cache`` keyed by the autoencoder's folder (weights and config, so its latent statistics too) and the
    subset: another autoencoder never reuses them. ``encode_fn(images, flip) -> latents``. Written atomically."""
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


def _provenance_of(folder: Path, meta_json: Path) -> dict:
    """What a stage started from with ``--init``: the folder, and that checkpoint's steps, date and commit."""
    old = json.loads(meta_json.read_text()) if meta_json.exists() else {}
    return {"from": str(folder), **{k: old.get(k) for k in ("steps", "images_seen", "date", "git_commit")}}


def _init_folder(init, sub: str, file: str) -> Path:
    """The folder ``init`` names (a path, or a pipeline folder holding ``sub``/), checked for ``file``."""
    p = Path(init)
    for cand in (p, p / sub):
        if (cand / file).exists():
            return cand
    raise InputError(f"--init {init}: no {file} there or in its {sub}/ folder; pass a mini-SD pipeline folder "
                     f"(e.g. data/checkpoints/{MINISD_NAME}) or its {sub}/")


# ---- the autoencoder ------------------------------------------------------------------------------------
def build_autoencoder(out, device, progress, s, init=None) -> Trained:
    """Phase 1 (or ``init``), phase 2, the fp16 rounding it ships with, and its latent statistics on a random 10k."""
    size, steps, dsteps, batch = s["size"], s["steps"], s["decoder_steps"], s["batch_size"]
    minutes, both = s.get("minutes"), (steps if init is None else 0) + dsteps  # a budget: shared by step counts
    train_set, test_set = cifar10("train"), cifar10("test")
    seconds, meta = 0.0, {"size": size}
    if init is None:
        cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=min(100, steps // 10),
                          lr_decay="cosine", ema_decay=0.999, amp_cpu=True, device=device,
                          ckpt_dir=f"runs/autoencoder-{size}-{steps}{run_tag(minutes)}",
                          ckpt_every=max(50, steps // 20),
                          progress=progress, desc="mini-SD autoencoder (phase 1: L2 + KL)",
                          minutes=phase_minutes(minutes, steps, both))
        res = train(minisd_vae(size).to(memory_format=torch.channels_last), AutoencoderLoss(), train_set, cfg)
        vae, seconds, steps, tag = res.ema.float(), res.seconds, res.step, f"{size}-{steps}{run_tag(minutes)}"
        meta["phase1"] = {"steps": steps, "batch_size": batch, "loss": "L2 + 1e-3 KL", "seconds": round(seconds, 1),
                          **budget_record(res.budget)}
    else:
        folder = _init_folder(init, "vae", "config.json")
        vae = AutoencoderKL.from_pretrained(str(folder), dtype=torch.float32)
        tag = f"init-{content_hash(folder)[:8]}"
        meta["phase1"] = _provenance_of(folder, folder / "meta.json")
    dcfg = TrainConfig(steps=dsteps, batch_size=batch, lr=s["decoder_lr"], warmup_steps=min(50, dsteps // 10),
                       lr_decay="cosine", ema_decay=0.999, amp_cpu=True, device=device,
                       ckpt_dir=f"runs/autoencoder-decoder-{tag}-{dsteps}{run_tag(minutes)}",
                       ckpt_every=max(50, dsteps // 15), progress=progress,
                       desc="mini-SD decoder (phase 2: L1 + perceptual + patch GAN)",
                       minutes=phase_minutes(minutes, dsteps, both))
    loss_kw = {k: s[k] for k in ("perceptual_weight", "adv_weight", "disc_start")}
    res = train_decoder(vae.float().to(memory_format=torch.channels_last), Evaluator.load(device="cpu").net,
                        train_set, dcfg, **loss_kw)
    dsteps = res.step
    meta["phase2"] = {"steps": dsteps, "batch_size": batch, "lr": s["decoder_lr"], **loss_kw,
                      "perceptual": "LPIPS-style distance in evaluator-cifar10's stem + first two stages",
                      "seconds": round(res.seconds, 1), **budget_record(res.budget)}
    vae = res.ema.float().to(memory_format=torch.contiguous_format).requires_grad_(True)
    vae = vae.to(torch.float16).float()  # measure what ships (fp16 weights)
    z = encode(vae, train_set.subset(10_000).images)  # a random subset: the archive is sorted by class
    mean, std = latent_stats(z)
    vae.register_to_config(scaling_factor=1.0, shift_factor=None, latents_mean=mean, latents_std=std)
    return Trained(vae, dsteps if init is not None else steps + dsteps, batch, seconds + res.seconds, meta,
                   {"test_set": test_set, "z": z})


def measure_autoencoder(t: Trained, folder, device) -> dict:
    """Reconstruction PSNR / MSE on 2,000 test images, FD-clf of all 10,000 test reconstructions, the latent
    statistics and the scaled latents' mean / std (0 / 1 by construction)."""
    vae, z, test_set = t.model, t.extra["z"], t.extra["test_set"]
    sf, mean, std = vae_factors(vae)
    x = test_set.subset(2000).images
    rec = decode(vae, encode(vae, x))
    mse = ((rec.clamp(-1, 1) - (x.float() / 127.5 - 1)) ** 2).mean().item()
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()  # peak-to-peak 2 on [-1, 1]
    zs = (z - mean) * (sf / std)
    metrics = {"test_psnr_db": round(psnr, 2), "test_mse": round(mse, 5), "latents_mean": vae.config.latents_mean,
               "latents_std": vae.config.latents_std, "scaled_latent_mean": round(zs.mean().item(), 4),
               "scaled_latent_std": round(zs.std().item(), 4), "latent_shape": list(z.shape[1:]),
               "compression": 3 * 32 * 32 / z[0].numel(), "params": sum(p.numel() for p in vae.parameters())}
    try:
        ev = Evaluator.load()
        metrics["fd_clf_reconstructions_10k"] = round(ev.fd(decode(vae, encode(vae, test_set.images)).clamp(-1, 1)), 3)
    except Exception as e:  # the evaluator stage has not run yet
        metrics["fd_clf_reconstructions_10k"] = f"not measured ({type(e).__name__})"
    return metrics


def export_autoencoder(t: Trained, folder: Path, meta: dict) -> None:
    save_diffusers(t.model, folder)
    unet = folder.parent / "unet"
    if unet.exists():
        print(f"note: {unet} was trained on the previous autoencoder's latents: retrain it with "
              f"`minilcm train minisd --out {folder.parent}`")


# ---- the teacher ----------------------------------------------------------------------------------------
def build_minisd(out, device, progress, s, init=None) -> Trained:
    """The mini-SD teacher: a UNet2DConditionModel on the autoencoder's normalised CIFAR-10 latents, conditioned on
    class captions through a frozen, randomly initialised CLIP text encoder, with 10% caption dropout (CFG),
    assembled into a StableDiffusionPipeline with the autoencoder stage's vae/. ``init``: a mini-SD pipeline whose
    UNet is the starting point (a warm start, recorded in the metadata)."""
    if not (out / "vae").exists():
        raise CheckpointError(f"{out / 'vae'} is missing: run `minilcm train autoencoder"
                              f"{'' if out == default_export(MINISD_NAME) else ' --out ' + str(out)}` first")
    vae = AutoencoderKL.from_pretrained(str(out / "vae"), dtype=torch.float32).eval()
    sf, mean, std = vae_factors(vae)
    tok = build_tokenizer()
    te = tiny_text_encoder(tok, hidden=64, seed=0)  # frozen at its random initialisation (see Chapter 5)
    caps = encode_prompts(tok, te, class_caption_table())
    caps = caps.reshape(len(CIFAR10_CLASSES), len(CAPTION_TEMPLATES), *caps.shape[1:])  # (10, 4, L, D)
    empty = encode_prompts(tok, te, [""])[0]
    size, steps, batch = s["size"], s["steps"], s["batch_size"]
    train_set = cifar10("train")
    n = s["n_train"] or len(train_set)
    vae.to(device)  # encode where the training runs (100k images: minutes on a CPU, seconds on a GPU)
    z = latent_cache(out / "vae", n, lambda x, flip: encode(vae, x, scaling_factor=sf, flip=flip, mean=mean, std=std))
    vae.cpu()
    part = train_set.subset(n) if n < len(train_set) else train_set
    data = LatentSet(z, part.labels.repeat(2), caps)
    meta = {}
    if init is None:
        unet = minisd_unet(size, cross_attention_dim=te.config.hidden_size, sample_size=z.shape[-1])
        tag = "scratch"
    else:
        folder = _init_folder(init, "unet", "config.json")
        unet = UNet2DConditionModel.from_pretrained(str(folder), dtype=torch.float32)
        tag = f"init-{content_hash(folder)[:8]}"
        meta["init"] = _provenance_of(folder, folder.parent / "meta.json")
    loss = DenoisingLoss(Schedule("scaled_linear"), cond_drop=0.1, conditioning=TextConditioning(empty))
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=s["lr"], warmup_steps=min(200, steps // 10),
                      lr_decay="cosine", ema_decay=s["ema_decay"], amp_cpu=False, device=device,
                      ckpt_dir=f"runs/minisd-{size}-{steps}-{content_hash(out / 'vae')[:8]}-{tag}"
                               f"{run_tag(s.get('minutes'))}",
                      ckpt_every=max(50, steps // 30), progress=progress, desc="mini-SD teacher UNet",
                      minutes=s.get("minutes"))
    res = train(unet, loss, data, cfg)
    steps = res.step
    meta.update(budget_record(res.budget))
    pipe = assemble_pipeline(res.ema.eval(), vae, te, tok, sd_scheduler("ddim"))
    vae_meta = json.loads((out / "vae" / "meta.json").read_text()) if (out / "vae" / "meta.json").exists() else {}
    meta.update({"unet_size": size, "unet_params": sum(p.numel() for p in unet.parameters()),
                 "text_encoder": "CLIPTextModel (2 layers, 64 wide), random init, frozen", "captions": CAPTION_TEMPLATES,
                 "cond_drop": 0.1, "schedule": "scaled_linear", "final_loss": round(tail_mean(res.losses), 5)})
    return Trained(pipe, steps, batch, res.seconds, meta, {"vae_meta": vae_meta})


def export_minisd(t: Trained, folder: Path, meta: dict) -> None:
    save_diffusers(t.model, folder)  # the whole pipeline, vae/ included: keep the vae's own metadata
    write_meta(folder / "vae", t.extra["vae_meta"])


# ---- the LCM student ------------------------------------------------------------------------------------
def build_lcm(out, device, progress, s, teacher: str | Path = MINISD_NAME) -> Trained:
    """Latent consistency distillation (Luo et al. 2023, Algorithm 1) of the mini-SD teacher into a w-conditioned
    student (``lcm.lcm_student``: the teacher's UNet copied, a w input added with the reference script's random
    initialisation), on the cached CIFAR-10 latents with the class captions. Exports theta^- (``loss.target``).

    With ``guidance_steps`` > 0 the student is first warm-started by guidance distillation
    (``lcm.GuidanceDistillation``, Meng et al. 2023's stage one): it regresses the guided teacher at every t, so
    LCD starts from a student whose w already acts (LCD alone has to carry w's effect up the grid from t = 0)."""
    sd = MiniSD.load(teacher, device="cpu")
    record = teacher_record(teacher)
    train_set = cifar10("train")
    n = s["n_train"] or len(train_set)
    part = train_set.subset(n) if n < len(train_set) else train_set
    sd.vae.to(device)  # encode where the training runs
    z = latent_cache(resolve(teacher) / "vae", n, lambda x, flip: sd.encode(x.flip(3) if flip else x))
    sd.vae.cpu()
    caps = sd.embed(class_caption_table()).reshape(len(CIFAR10_CLASSES), len(CAPTION_TEMPLATES), *sd.empty.shape)
    data = LatentSet(z, part.labels.repeat(2), caps)
    w_min, w_max, k, mu = 0.0, 4.0, 20, 0.95
    student = lcm_student(sd.unet, sd.schedule, w_dim=256, w_init="random")
    steps, batch, w_mult, g_steps = s["steps"], s["batch_size"], s["w_lr_mult"], s["guidance_steps"]
    minutes = s.get("minutes")  # a budget: the two phases share it by their step counts
    tag = f"{record['teacher_sha256'][:8]}-w{w_mult}{run_tag(minutes)}"
    gd = {}
    if g_steps:  # the warm start: the student learns eps_w at every t first (lcm.GuidanceDistillation)
        g_cfg = TrainConfig(steps=g_steps, batch_size=batch, lr=s["lr"], warmup_steps=min(100, g_steps // 10),
                            lr_decay="none", keep_ema=False, device=device, amp=False, lr_mult={"cond_proj": w_mult},
                            ckpt_dir=f"runs/lcm-gd-{g_steps}-{tag}", ckpt_every=max(50, g_steps // 30),
                            progress=progress, desc="guidance distillation",
                            minutes=phase_minutes(minutes, g_steps, g_steps + steps))
        g_res = train(student, GuidanceDistillation(sd.unet, student, TextConditioning(sd.empty), w_min=w_min,
                                                    w_max=w_max), data, g_cfg)
        gd = {"steps": g_res.step, "seconds": round(g_res.seconds, 1),
              "final_loss": round(tail_mean(g_res.losses), 6), **budget_record(g_res.budget),
              "loss": "Meng et al. 2023 stage one: ||x0_theta(x_t, t, c, w) - x0_w(x_t, t, c)||^2"}
    loss = LatentConsistencyDistillation(sd.unet, student, TextConditioning(sd.empty), k=k, w_min=w_min, w_max=w_max,
                                         mu=mu)
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=s["lr"], warmup_steps=min(100, steps // 10),
                      lr_decay="cosine", keep_ema=False, device=device, amp=False, lr_mult={"cond_proj": w_mult},
                      ckpt_dir=f"runs/lcm-{steps}-{tag}-gd{g_steps}-target",
                      ckpt_every=max(50, steps // 30), progress=progress, desc="LCD of the mini-SD",
                      minutes=phase_minutes(minutes, steps, g_steps + steps))
    res = train(student, loss, data, cfg)
    steps = res.step
    meta = {**record, "k": k, "w_min": w_min, "w_max": w_max, "mu": mu, "w_init": "random", "w_lr_mult": w_mult,
            "guidance_distillation": gd or None,
            "exported": "the target network theta^- (mu = 0.95), as the reference script and minilcm sd-distill",
            "w_convention": "LCM: eps_w = (1 + w) eps_c - w eps_u (diffusers guidance_scale = w + 1)",
            "w_dim": 256, "distance": "pseudo_huber", "final_loss": round(tail_mean(res.losses), 6),
            **budget_record(res.budget)}
    return Trained(loss.target.net, steps, batch, res.seconds + gd.get("seconds", 0.0), meta)


def export_lcm(t: Trained, folder: Path, meta: dict) -> None:
    save_diffusers(t.model, folder / "unet")
    sd_scheduler("lcm").save_pretrained(str(folder / "scheduler"))
    strip_machine_paths(folder)
