"""Checkpoints: safetensors for every tensor, a JSON file for everything else; the shipped-weights registry.

A checkpoint is a folder:
    state.safetensors   model.*, ema.*, optim.*, rng.* (and loss.* for losses with state)
    config.json         model config, step, optimizer hyper-parameters, loss history, ...
Writes go to temporary files renamed into place, so an interrupted save never leaves a half checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

STATE, CONFIG = "state.safetensors", "config.json"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "data" / "checkpoints"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def model_config(model: torch.nn.Module) -> dict:
    """A JSON description of an architecture: its class and its ``config`` (our models and diffusers' have one)."""
    cfg = getattr(model, "config", None)
    cfg = dict(cfg) if cfg is not None else {}
    return json.loads(json.dumps({"class": type(model).__name__, **cfg}, default=str))


def save_checkpoint(path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` to the folder ``path`` atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(flat, str(path / (STATE + ".tmp")))
    (path / (CONFIG + ".tmp")).write_text(json.dumps(meta, indent=1))
    os.replace(path / (STATE + ".tmp"), path / STATE)
    os.replace(path / (CONFIG + ".tmp"), path / CONFIG)
    return path


def load_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint folder written by :func:`save_checkpoint`."""
    path = Path(path)
    if not (path / STATE).exists() or not (path / CONFIG).exists():
        raise CheckpointError(f"no checkpoint in {path}: expected {STATE} and {CONFIG} there")
    try:
        return load_file(str(path / STATE)), json.loads((path / CONFIG).read_text())
    except Exception as e:
        raise CheckpointError(f"the checkpoint in {path} is unreadable ({type(e).__name__}: {e}); "
                              "delete the folder to start afresh") from e


def prefixed(sd: dict, prefix: str) -> dict:
    return {f"{prefix}.{k}": v for k, v in sd.items()}


def unprefixed(tensors: dict, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _architecture(cfg):
    """A config without diffusers' private bookkeeping keys ("_use_default_values" is built from a set, so its
    order changes from process to process); what remains describes the architecture."""
    if isinstance(cfg, dict):
        return {k: _architecture(v) for k, v in cfg.items() if not str(k).startswith("_")}
    return cfg


def load_into(model: torch.nn.Module, sd: dict, saved_config: dict | None, where: str) -> None:
    """Load a state dict, failing with a message that names both architectures when they differ."""
    mine = model_config(model)
    if saved_config is not None and _architecture(saved_config) != _architecture(mine):
        raise CheckpointError(
            f"the checkpoint in {where} was written by a different architecture:\n"
            f"  checkpoint: {saved_config}\n  this model: {mine}\n"
            "Build the model with the checkpoint's config, or use another checkpoint folder "
            "(delete it to start afresh).")
    own = model.state_dict()
    bad = sorted(k for k in sd if k not in own or own[k].shape != sd[k].shape)
    missing = sorted(k for k in own if k not in sd)
    if bad or missing:
        raise CheckpointError(f"the checkpoint in {where} does not fit this model: "
                              f"{len(bad)} unexpected or mis-shaped tensors (e.g. {bad[:3]}), "
                              f"{len(missing)} missing (e.g. {missing[:3]}). Build the model the checkpoint was "
                              "trained with, or start afresh in another folder.")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


# ---- small exported models -------------------------------------------------------------------
def save_model(model: torch.nn.Module, path, dtype=torch.float16, **meta) -> Path:
    """Export a model's weights (fp16 by default) with its config and any metadata (metrics, steps, ...)."""
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return save_checkpoint(path, prefixed(sd, "model"), {"model_config": model_config(model), **meta})


def load_model(model: torch.nn.Module, path, use_ema: bool = True) -> dict:
    """Load weights into ``model`` from an exported model or a training checkpoint (its EMA by default).

    Returns the checkpoint's metadata.
    """
    tensors, meta = load_checkpoint(resolve(path))
    sd = unprefixed(tensors, "ema") if use_ema and any(k.startswith("ema.") for k in tensors) else {}
    load_into(model, sd or unprefixed(tensors, "model"), meta.get("model_config"), str(path))
    return meta


def resolve(name_or_path) -> Path:
    """A folder path as given, or the name of a shipped checkpoint under data/checkpoints/."""
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = shipped_dir() / str(name_or_path)
    if shipped.exists():
        return shipped
    names = ", ".join(sorted(available())) or "none yet"
    raise CheckpointError(f"no checkpoint named or found at {name_or_path!r}. Shipped checkpoints: {names}. "
                          "Train one with the course's recipe or pass a folder path.")


def shipped_dir() -> Path:
    """Where shipped checkpoints are looked up by name: $MINILCM_CHECKPOINTS, else data/checkpoints of the repo."""
    return Path(os.environ.get("MINILCM_CHECKPOINTS") or SHIPPED_DIR)


def available() -> list[str]:
    """Names of the checkpoints shipped under data/checkpoints/ (pipeline folders included)."""
    d = shipped_dir()
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir()
                  if (p / STATE).exists() or (p / "model_index.json").exists() or (p / "unet").is_dir())
