"""The model zoo: every checkpoint kind loaded by shipped name or folder, the table of shipped names, and the
command that trains each. Stages, recipes, benchmarks and ``generate`` load through here (``docs/architecture.md``).

    m = load_model_folder("lcm-cifar10")          # a shipped name or a path -> LoadedModel
    m.kind, m.samplers, m.model, m.schedule        # what it is, which samplers run it, the model to call

Three kinds of model folder (``model_kind`` tells them apart):

    minisd  a StableDiffusionPipeline folder (model_index.json): the Chapter 5 mini-SD teacher under CFG,
            samplers ddpm / ddim / dpm_solver / dpm_solver_pp (``minisd.MiniSD``)
    lcm     an LCM student folder (unet/ + meta.json naming its "teacher"): sampler lcm; the autoencoder and the
            text encoder come from the teacher's folder
    pixel   a ``checkpoints.save_model`` folder (state.safetensors + config.json) of a Chapters 1-4 CIFAR-10 model:
            an ``EpsUNet`` (the DDPM teacher: the four teacher samplers, CFG through the null class) or a
            ``ConsistencyModel`` (the CD student: sampler cm); ``build_pixel_model`` rebuilds it from its config

Shipped folders live in ``checkpoints.shipped_dir()`` (``MINILCM_CHECKPOINTS`` overrides it).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from .checkpoints import (CheckpointError, content_hash, is_shipped, load_checkpoint, load_model, load_pretrained,
                          resolve, resolve_folder, shipped_dir)
from .catalog import SAMPLING_MODELS, SHIPPED
from .consistency import CMScalings, ConsistencyModel, LCMScalings
from .errors import InputError, one_line
from .minisd import LCM_NAME, MiniSD
from .models import EpsUNet
from .preconditioning import EDMPrecond
from .samplers import TEACHER_SAMPLERS
from .schedules import Schedule

TRAIN_COMMANDS = {name: s.train for name, s in SHIPPED.items()}


def missing_shipped(names=None) -> dict[str, str]:
    """{name: the command that trains it} for each shipped checkpoint (default: all) not complete in
    ``checkpoints.shipped_dir()``."""
    names = list(SHIPPED) if names is None else names
    return {n: SHIPPED[n].train for n in names if not (shipped_dir() / n / SHIPPED[n].marker).exists()}


def shipped_meta(name: str, sub: str = "") -> dict:
    """The ``meta.json`` of a shipped checkpoint (or of its ``sub`` folder, e.g. "vae"); {} when absent."""
    p = shipped_dir() / name / sub / "meta.json"
    return json.loads(p.read_text()) if p.exists() else {}


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
    unet_cfg = {k: v for k, v in cfg["unet"].items() if not k.startswith("_")}
    net = EpsUNet(UNet2DModel.from_config(unet_cfg), cfg.get("num_classes"), cfg.get("size"))
    k, embeds = cfg.get("num_classes"), unet_cfg.get("num_class_embeds")
    if (k is None) != (embeds is None) or (k is not None and embeds != k + 1):
        raise InputError(f"num_classes = {k} does not match the UNet's num_class_embeds = {embeds} (classes + the "
                         "null class)")
    return net


def build_pixel_model(cfg: dict):
    """The eps-model of a pixel checkpoint's config: an ``EpsUNet``, or one wrapped in ``preconditioning.EDMPrecond``."""
    if cfg.get("class") == "EDMPrecond":
        return EDMPrecond(build_pixel_model(cfg["raw"]), Schedule(cfg["schedule"]), cfg["sigma_data"])
    return _pixel_net(cfg)


def _build(cfg: dict, path: Path, build):
    """``build(cfg)``, with a config that is not one minilcm wrote turned into a one-line CheckpointError."""
    try:
        return build(cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else one_line(e, 160)
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
    meta = load_checkpoint(path)[1]
    cfg = meta.get("model_config", {})
    cls = cfg.get("class")
    if cls in ("EpsUNet", "EDMPrecond"):
        model = _build(cfg, path, build_pixel_model)
        meta = load_model(model, path)
        schedule = Schedule(meta.get("schedule", "linear"))  # the Chapter 1 recipe's schedule
        cond = "class" if model.null_class is not None else "none"
        return LoadedModel("pixel-teacher", path, TEACHER_SAMPLERS, cond, net=model, model=model.eval().to(device),
                           schedule=schedule, device=device)
    if cls == "ConsistencyModel":
        def build(cfg):
            scaling = dict(cfg["scaling"])
            scaling_cls = {"CMScalings": CMScalings, "LCMScalings": LCMScalings}[scaling.pop("class")]
            return ConsistencyModel(build_pixel_model(cfg["net"]), Schedule(cfg["schedule"]), scaling_cls(**scaling),
                                    cfg.get("t_min", 0.0))

        model = _build(cfg, path, build)
        schedule = model.schedule
        load_model(model, path)
        # the CD student is distilled from the teacher's null-class (unconditional) model, as Song et al. do
        return LoadedModel("pixel-cm", path, ("cm",), "none", net=model.net, model=model.eval().to(device),
                           schedule=schedule, device=device)
    raise CheckpointError(f"{path} holds a {cls!r}, not a model that samples images (EpsUNet, EDMPrecond or "
                          f"ConsistencyModel); sample from one of: {', '.join(SAMPLING_MODELS)}")


def load_lcm_student(name_or_path=LCM_NAME, device="cpu") -> ConsistencyModel:
    """The LCM student: a UNet2DConditionModel with a w input (``time_cond_proj_dim``) in LCMScalings, as the
    consistency function f(x, t, w, c) that ``lcm.lcm_sample`` runs; its training record is ``student.meta``."""
    path = resolve_folder(name_or_path, "unet/config.json", "distil it with `minilcm train lcm`")
    unet = load_pretrained(UNet2DConditionModel, path / "unet", "LCM student UNet", dtype=torch.float32)
    student = ConsistencyModel(unet.eval().to(device), Schedule("scaled_linear"), LCMScalings())
    student.meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").exists() else {}
    return student
