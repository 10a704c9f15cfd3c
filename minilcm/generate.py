"""One way to turn a checkpoint into images: ``generate(model, sampler, steps, n)``, shared by ``minilcm sample``,
``minilcm bench`` and the notebooks.

    out = generate("lcm-cifar10", "lcm", steps=4, n=100, w=1.0)          # a shipped name or a folder path
    out.images  (N, 32, 32, 3) uint8 RGB,  out.labels (N,) CIFAR-10 class index (-1: unconditional)
    out.seconds_per_image, out.nfe

Three kinds of model folder (``load_model_folder`` tells them apart):

    minisd  a StableDiffusionPipeline folder (model_index.json): the Chapter 5 mini-SD teacher under CFG,
            samplers ddpm / ddim / dpm_solver / dpm_solver_pp (``minisd.MiniSD``)
    lcm     an LCM student folder (unet/ + meta.json naming its "teacher"): sampler lcm; the autoencoder and the
            text encoder come from the teacher's folder
    pixel   a ``checkpoints.save_model`` folder (state.safetensors + config.json) of a Chapters 1-4 CIFAR-10 model:
            an ``EpsUNet`` (the DDPM teacher: the four teacher samplers, CFG through the null class) or a
            ``ConsistencyModel`` (the CD student: sampler cm, ``consistency.cm_sample``)

Guidance w is in the LCM convention, eps_w = (1 + w) eps(x, t, c) - w eps(x, t, null) (Luo et al. 2023, Eq. 9);
diffusers' ``guidance_scale`` is w + 1. A teacher pays for CFG with a fused batch of 2B rows per evaluation; the
LCM student has w baked in (B rows). The time reported is the wall clock of sampling and decoding, per image.
"""
from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoints import CheckpointError, content_hash, resolve
from .datasets import CIFAR10_CLASSES, to_uint8
from .errors import InputError
from .schedules import Schedule
from .solvers import teacher_timesteps

TEACHER_SAMPLERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver_pp")
ALL_SAMPLERS = TEACHER_SAMPLERS + ("cm", "lcm")
# how to make each shipped checkpoint: named in the error when one is missing
TRAIN_COMMANDS = {
    "minisd-cifar10": "`minilcm train autoencoder` then `minilcm train minisd`",
    "lcm-cifar10": "`minilcm train lcm` (after the mini-SD teacher)",
    "evaluator-cifar10": "`minilcm train evaluator`",
    "ddpm-cifar10": "`minilcm train ddpm`",
    "cd-cifar10": "`minilcm train cd` (after the DDPM teacher)",
}


@dataclass
class Generated:
    """What ``generate`` returns."""

    images: np.ndarray          # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray          # (N,) int64: the CIFAR-10 class index asked for, -1 when unconditional
    seconds_per_image: float    # wall clock of sampling + decoding (+ text encoding), divided by N
    nfe: int                    # network evaluations per sample (a CFG teacher's fused 2B-row call counts once)
    rows_per_eval: int = 1      # 2 for a teacher under CFG (cond + uncond rows), 1 otherwise
    info: dict = field(default_factory=dict)

    @property
    def images_nchw(self) -> torch.Tensor:
        """The images as a uint8 tensor (N, 3, 32, 32), the evaluator's input."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous()


@dataclass
class LoadedModel:
    """A model folder loaded once, for many ``generate`` calls."""

    kind: str                   # minisd | lcm | pixel-teacher | pixel-cm
    path: Path
    samplers: tuple
    conditional: str            # "text" (prompts or classes), "class" (class labels only) or "none"
    sd: object = None           # MiniSD (kinds minisd and lcm)
    net: torch.nn.Module = None  # the network whose calls are the NFE
    model: object = None        # the LCM student (ConsistencyModel), the pixel EpsUNet or ConsistencyModel
    schedule: Schedule | None = None
    device: str = "cpu"


# ---- loading ------------------------------------------------------------------------------------------
def _resolve(name_or_path) -> Path:
    """A shipped name or a path; a missing shipped checkpoint names the command that trains it."""
    try:
        return resolve(name_or_path)
    except CheckpointError as e:
        how = TRAIN_COMMANDS.get(str(name_or_path))
        raise CheckpointError(f"{e} Make it with {how}." if how else str(e)) from None


SAMPLING_MODELS = ("minisd-cifar10", "lcm-cifar10", "ddpm-cifar10", "cd-cifar10")


def model_kind(path: Path) -> str:
    """minisd, lcm or pixel: what the folder holds (see the module docstring)."""
    path = Path(path)
    if (path / "reference_stats.npz").exists() or path.name == "evaluator-cifar10":
        raise CheckpointError(f"{path} is the FD-clf evaluator (a classifier), not a model that samples images; "
                              f"sample from one of: {', '.join(SAMPLING_MODELS)}")
    if (path / "model_index.json").exists():
        return "minisd"
    if (path / "unet" / "config.json").exists() and (path / "meta.json").exists():
        return "lcm"
    if (path / "state.safetensors").exists() and (path / "config.json").exists():
        return "pixel"
    raise CheckpointError(f"{path} is not a model folder minilcm can sample: expected model_index.json (mini-SD), "
                          "unet/ + meta.json (LCM student) or state.safetensors + config.json (pixel model)")


def _pixel_net(cfg: dict):
    """An EpsUNet built from its saved config (the UNet2DModel's own config, so any size round-trips)."""
    from diffusers import UNet2DModel

    from .models import EpsUNet

    unet_cfg = {k: v for k, v in cfg["unet"].items() if not k.startswith("_")}
    net = EpsUNet(UNet2DModel.from_config(unet_cfg), cfg.get("num_classes"), cfg.get("size"))
    k, embeds = cfg.get("num_classes"), unet_cfg.get("num_class_embeds")
    if (k is None) != (embeds is None) or (k is not None and embeds != k + 1):
        raise InputError(f"num_classes = {k} does not match the UNet's num_class_embeds = {embeds} (classes + the "
                         "null class)")
    return net


def _pixel_eps_model(cfg: dict):
    """The eps-model of a pixel checkpoint's config: an ``EpsUNet``, or one wrapped in ``consistency.EDMPrecond``."""
    if cfg.get("class") == "EDMPrecond":
        from .consistency import EDMPrecond

        return EDMPrecond(_pixel_eps_model(cfg["raw"]), Schedule(cfg["schedule"]), cfg["sigma_data"])
    return _pixel_net(cfg)


def _build(cfg: dict, path: Path, build):
    """``build(cfg)``, with a config that is not one minilcm wrote turned into a one-line CheckpointError."""
    try:
        return build(cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:160]
        raise CheckpointError(f"the model config in {path / 'config.json'} cannot be built ({what}); re-export the "
                              "model with the recipe (`minilcm train ...`) or use another folder") from e


def check_teacher_hash(student_path: Path, meta: dict) -> None:
    """Refuse a student whose recorded teacher (``teacher_sha256``) now holds different weights."""
    want = meta.get("teacher_sha256")
    if not want:
        return
    teacher = resolve(meta["teacher"])
    got = content_hash(teacher)
    if got != want:
        from .checkpoints import is_shipped

        again = f"`minilcm train {meta.get('stage', 'lcm')} --teacher {meta['teacher']}" + (
            " --replace-shipped`" if is_shipped(student_path) else f" --out {student_path}`")
        raise CheckpointError(f"the student in {student_path} was distilled from {meta['teacher']} with weights "
                              f"sha256 {want[:12]}, but {teacher} now holds {got[:12]}: restore that teacher, or "
                              f"distil again with {again}")


def guidance_range(m: "LoadedModel"):
    """(w_min, w_max) a student was distilled on, from its metadata; None for teachers."""
    meta = getattr(m.model, "meta", None) or {}
    if "w_min" in meta and "w_max" in meta:
        return float(meta["w_min"]), float(meta["w_max"])
    return None


def load_model_folder(name_or_path, device: str = "cpu") -> LoadedModel:
    """Load any of the three kinds of model folder by shipped name or path."""
    from .minisd import MiniSD, load_lcm_student

    path = _resolve(name_or_path)
    kind = model_kind(path)
    if kind == "minisd":
        sd = MiniSD.load(path, device=device)
        return LoadedModel("minisd", path, TEACHER_SAMPLERS, "text", sd=sd, net=sd.unet, schedule=sd.schedule,
                           device=device)
    if kind == "lcm":
        meta = json.loads((path / "meta.json").read_text())
        teacher = meta.get("teacher")
        if not teacher:
            raise CheckpointError(f"{path / 'meta.json'} names no \"teacher\": the LCM student needs its teacher's "
                                  "autoencoder and text encoder")
        try:
            sd = MiniSD.load(teacher, device=device)
        except CheckpointError as e:
            raise CheckpointError(f"the LCM student in {path} needs its teacher {teacher!r}: {e}") from None
        check_teacher_hash(path, meta)
        student = load_lcm_student(path, device=device)
        return LoadedModel("lcm", path, ("lcm",), "text", sd=sd, net=student.net, model=student,
                           schedule=sd.schedule, device=device)
    from .checkpoints import load_checkpoint, load_model

    meta = load_checkpoint(path)[1]
    cfg = meta.get("model_config", {})
    cls = cfg.get("class")
    if cls in ("EpsUNet", "EDMPrecond"):
        model = _build(cfg, path, _pixel_eps_model)
        meta = load_model(model, path)
        schedule = Schedule(meta.get("schedule", "linear"))  # the Chapter 1 recipe's schedule
        cond = "class" if model.null_class is not None else "none"
        return LoadedModel("pixel-teacher", path, TEACHER_SAMPLERS, cond, net=model, model=model.eval().to(device),
                           schedule=schedule, device=device)
    if cls == "ConsistencyModel":
        from .consistency import CMScalings, ConsistencyModel, LCMScalings

        def build(cfg):
            scaling = dict(cfg["scaling"])
            scaling_cls = {"CMScalings": CMScalings, "LCMScalings": LCMScalings}[scaling.pop("class")]
            return ConsistencyModel(_pixel_eps_model(cfg["net"]), Schedule(cfg["schedule"]), scaling_cls(**scaling),
                                    cfg.get("t_min", 0.0))

        model = _build(cfg, path, build)
        schedule = model.schedule
        load_model(model, path)
        # the CD student is distilled from the teacher's null-class (unconditional) model, as Song et al. do
        return LoadedModel("pixel-cm", path, ("cm",), "none", net=model.net, model=model.eval().to(device),
                           schedule=schedule, device=device)
    raise CheckpointError(f"{path} holds a {cls!r}, not a model that samples images (EpsUNet, EDMPrecond or "
                          f"ConsistencyModel); sample from one of: {', '.join(SAMPLING_MODELS)}")


# ---- conditions ---------------------------------------------------------------------------------------
def parse_class(c) -> int:
    """A CIFAR-10 class index (0-9, int or digit string) or name ("cat") -> the index."""
    if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.strip().lstrip("-").isdigit()):
        i = int(c)
        if not 0 <= i < len(CIFAR10_CLASSES):
            raise InputError(f"class index {i} is out of range: CIFAR-10 has classes 0-9 ({', '.join(CIFAR10_CLASSES)})")
        return i
    name = str(c).strip().lower()
    if name not in CIFAR10_CLASSES:
        raise InputError(f"unknown class {c!r}; use an index 0-9 or one of: {', '.join(CIFAR10_CLASSES)}")
    return CIFAR10_CLASSES.index(name)


def prompt_label(prompt: str) -> int:
    """The CIFAR-10 class a prompt names, when exactly one class word appears in it; else -1."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    hits = [i for i, c in enumerate(CIFAR10_CLASSES) if c in words]
    return hits[0] if len(hits) == 1 else -1


def balanced_labels(n: int) -> np.ndarray:
    """0, 1, ..., 9, 0, 1, ...: every class n // 10 or n // 10 + 1 times."""
    return np.arange(n, dtype=np.int64) % len(CIFAR10_CLASSES)


# ---- timesteps and NFE --------------------------------------------------------------------------------
def cm_steps(schedule: Schedule, steps: int, N: int = 18, t_min: float = 0.0) -> list[float]:
    """Multistep CM timesteps: ``steps`` times read evenly from the N-interval Karras grid of CD, noisiest first
    (T-1 alone for one step; two steps give T-1 and the grid's middle, as Chapter 4 uses)."""
    from .consistency import cm_timesteps

    grid = cm_timesteps(schedule, N, t_min).tolist()  # increasing, grid[N] = T - 1
    if not 1 <= steps <= N:
        raise InputError(f"the consistency model takes 1..{N} steps, got {steps}")
    return [grid[N - (i * N) // steps] for i in range(steps)]


class NFECounter:
    """Counts forward calls of a module (each is one network evaluation, whatever its batch)."""

    def __init__(self, module: torch.nn.Module, bar=None):
        self.calls, self.bar = 0, bar
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        self.handle.remove()
        if self.bar is not None:
            self.bar.close()


def check_request(sampler: str, steps, n, *, w=1.0, batch=250, prompt=None) -> None:
    """Reject impossible requests before any model is loaded: whole numbers >= 1 for steps, n and batch; a finite
    w; a non-empty prompt."""
    from .schedules import whole_number

    if sampler not in ALL_SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; valid: {', '.join(ALL_SAMPLERS)}")
    for name, v in (("steps", steps), ("n (the number of images)", n), ("batch", batch)):
        try:
            v = whole_number(v, name)
        except ValueError as e:
            raise InputError(str(e)) from None
        if v < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not math.isfinite(w):
        raise InputError(f"the guidance w must be a finite number (LCM convention, guidance_scale = w + 1), got {w!r}")
    if prompt is not None and not str(prompt).strip():
        raise InputError("the prompt is empty (that is the unconditional prompt): give a text, or leave --prompt out "
                         "to sample the ten classes")


# ---- generation ---------------------------------------------------------------------------------------
def _sample_batch(m: LoadedModel, sampler: str, steps: int, labels: np.ndarray, prompts, w: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, 32, 32) on the CPU for one batch."""
    if m.kind in ("minisd", "lcm"):
        student = m.model if m.kind == "lcm" else None
        kw = {"prompts": prompts} if prompts is not None else {"labels": labels.tolist()}
        return m.sd.sample(sampler, steps, w=w, student=student, generator=generator, batch=len(labels), **kw)
    B = len(labels)
    x = torch.randn((B, 3, 32, 32), generator=generator).to(m.device)
    if m.kind == "pixel-cm":
        from .consistency import cm_sample

        return cm_sample(m.model, x, m.schedule, cm_steps(m.schedule, steps, t_min=m.model.t_min),
                         generator=generator).x.float().cpu().clamp(-1, 1)
    from .solvers import get_sampler

    ts, kw = teacher_timesteps(m.schedule, sampler, steps)
    model, cond = m.model, None
    if m.conditional == "class":
        from .lcm import ClassConditioning, GuidedEps

        model = GuidedEps(m.model, ClassConditioning(m.model.null_class), w)
        cond = {"class_labels": torch.as_tensor(labels, dtype=torch.long, device=m.device)}
    return get_sampler(sampler)(model, x, m.schedule, ts, cond=cond, generator=generator, **kw).x.float().cpu() \
        .clamp(-1, 1)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def generate(model, sampler: str, steps: int, n: int, *, w: float = 1.0, class_=None, prompt: str | None = None,
             labels=None, seed: int = 0, batch: int = 250, device: str = "cpu", warmup: bool = True,
             progress: bool = False) -> Generated:
    """Sample ``n`` images from ``model`` (a shipped name, a folder path or a ``LoadedModel``) with ``sampler``
    at ``steps`` network evaluations.

    class_  one CIFAR-10 class (index or name) for all images; ``labels`` an explicit (n,) array of classes;
            neither: a conditional model samples the classes evenly (0, 1, ..., 9, 0, ...).
    prompt  free text for the text-conditioned mini-SD / LCM student; the label is the class the prompt names
            when it names exactly one, else -1.
    w       guidance in the LCM convention (diffusers guidance_scale = w + 1); ignored by unconditional models.
    seed    one torch.Generator seeded with it draws every noise: the same seed gives the same x_T for every
            sampler and model of the same latent shape.
    warmup  sample one image first (untimed), so that one-off start-up costs stay out of the time per image.
    progress  a tqdm bar over network evaluations (``minilcm sample`` shows it unless --quiet).
    Impossible requests (steps 2.5, n 0, w nan, an empty prompt, ...) raise ValueError before any work; a w
    outside a student's distillation range gives a warning naming that range.
    """
    check_request(sampler, steps, n, w=w, batch=batch, prompt=prompt)
    steps, n, batch = int(steps), int(n), int(batch)
    m = model if isinstance(model, LoadedModel) else load_model_folder(model, device=device)
    if sampler not in m.samplers:
        raise InputError(f"sampler {sampler!r} does not fit the {m.kind} model in {m.path}; valid: "
                         f"{', '.join(m.samplers)}")
    try:  # the grid each sampler will run: an impossible step count fails here, before any work
        if sampler == "lcm":
            from .lcm import lcm_timesteps

            lcm_timesteps(m.schedule, steps)
        elif sampler == "cm":
            cm_steps(m.schedule, steps, t_min=m.model.t_min)
        else:
            teacher_timesteps(m.schedule, sampler, steps)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"--steps {steps} does not fit the {sampler} sampler: {e}") from e
    rng = guidance_range(m) if m.conditional != "none" else None
    if rng is not None and not rng[0] <= w <= rng[1]:
        warnings.warn(f"w = {w:g} is outside the range this student was distilled on, w in [{rng[0]:g}, {rng[1]:g}] "
                      "(LCM convention): expect poor images", stacklevel=2)
    if prompt is not None and (class_ is not None or labels is not None):
        raise InputError("give a class or a prompt, not both")
    if prompt is not None and m.conditional != "text":
        raise InputError(f"--prompt needs a text-conditioned model (the mini-SD or its LCM student); the {m.kind} "
                         f"model in {m.path} is " + ("class-conditional: use --class" if m.conditional == "class"
                                                     else "unconditional"))
    if m.conditional == "none" and (class_ is not None or labels is not None):
        raise InputError(f"the {m.kind} model in {m.path} is unconditional: it takes no class")
    prompts = None
    if prompt is not None:
        prompts, lab = [prompt] * n, np.full(n, prompt_label(prompt), dtype=np.int64)
    elif m.conditional == "none":
        lab = np.full(n, -1, dtype=np.int64)
    elif labels is not None:
        lab = np.array([parse_class(c) for c in labels], dtype=np.int64)
        if len(lab) != n:
            raise InputError(f"{len(lab)} labels for n={n} images")
    elif class_ is not None:
        lab = np.full(n, parse_class(class_), dtype=np.int64)
    else:
        lab = balanced_labels(n)
    if warmup:
        _sample_batch(m, sampler, min(steps, 2), lab[:1], None if prompts is None else prompts[:1], w,
                      torch.Generator().manual_seed(seed + 1))
    g = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        n_batches_total = -(-n // batch)
        bar = tqdm(total=n_batches_total * steps, desc=f"sample {n} ({sampler}, {steps} steps)", unit="NFE",
                   leave=False, mininterval=1.0)
    counter = NFECounter(m.net, bar)
    out, n_batches = [], 0
    try:
        _sync(m.device)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            pr = None if prompts is None else prompts[i:i + batch]
            out.append(_sample_batch(m, sampler, steps, lab[i:i + batch], pr, w, g))
            n_batches += 1
        _sync(m.device)
        seconds = time.perf_counter() - t0
    finally:
        counter.close()
    x = torch.cat(out)
    images = to_uint8(x).permute(0, 2, 3, 1).contiguous().numpy()
    rows = 2 if m.kind in ("minisd", "pixel-teacher") and m.conditional != "none" else 1
    return Generated(images, lab, seconds / n, counter.calls // n_batches, rows,
                     {"model": str(m.path), "kind": m.kind, "sampler": sampler, "steps": steps, "w": w,
                      "seed": seed, "batch": batch, "device": str(m.device), "seconds": seconds})
