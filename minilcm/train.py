"""One training loop for every chapter.

    train(model, loss_fn, data, TrainConfig(...)) -> TrainResult

* ``loss_fn(model, batch, generator) -> scalar``: any objective (denoising, CD, CT, LCD, ...).
  If it is an ``nn.Module`` (e.g. it holds a target network) its state is checkpointed too, and if it
  has ``after_step(model, step)`` that is called after every optimizer step (e.g. to update an EMA target).
* ``data(n, generator) -> batch``: a tensor or a tuple of tensors (e.g. ``GaussianMixture``, ``ImageSet``).
* AdamW, linear warm-up, gradient clipping, an EMA copy, bf16 autocast on CUDA, a tqdm bar.
* Checkpoints (safetensors + JSON) with every random state, so a resumed run equals an uninterrupted one.
* A NaN guard: a non-finite loss or gradient stops training before the weights change, and the last
  good checkpoint is kept.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import (CheckpointError, load_checkpoint, load_into, model_config, prefixed, save_checkpoint,
                          unprefixed)


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or inf loss or gradient."""


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float | None = 1.0
    seed: int = 0
    ckpt_dir: str | None = None   # where checkpoints live; resume from here if one exists
    ckpt_every: int = 0           # 0: only at the end (and on Ctrl-C)
    device: str | None = None     # None: cuda if available, else cpu
    amp: bool = True              # bf16 autocast on CUDA (ignored on CPU)
    progress: bool = True
    desc: str = "train"


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module
    losses: list[float] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0
    resumed_from: int = 0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _to(batch, device):
    if isinstance(batch, (tuple, list)):
        return type(batch)(b.to(device) for b in batch)
    return batch.to(device)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters and float buffers."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _optim_tensors(opt: torch.optim.Optimizer) -> dict:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim.{i}.{k}"] = torch.as_tensor(v)
    return out


def _load_optim(opt, tensors, groups):
    state = {}
    for k, v in unprefixed(tensors, "optim").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    sd = opt.state_dict()
    for g, saved in zip(sd["param_groups"], groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def train(model: nn.Module, loss_fn, data, cfg: TrainConfig, *, ema: nn.Module | None = None) -> TrainResult:
    """Train ``model`` on ``loss_fn`` over ``data`` for ``cfg.steps`` steps (resuming from ``cfg.ckpt_dir``)."""
    device = torch.device(cfg.device) if cfg.device else default_device()
    model.to(device).train()
    ema = (ema if ema is not None else copy.deepcopy(model)).to(device).eval().requires_grad_(False)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout and anything else that draws from the global generator
    losses: list[float] = []
    start = 0
    ckpt = Path(cfg.ckpt_dir) if cfg.ckpt_dir else None

    def save(step):
        if ckpt is None:
            return
        tensors = {**prefixed(model.state_dict(), "model"), **prefixed(ema.state_dict(), "ema"),
                   **_optim_tensors(opt), "rng.generator": gen.get_state(), "rng.torch": torch.get_rng_state()}
        if isinstance(loss_fn, nn.Module):
            tensors.update(prefixed(loss_fn.state_dict(), "loss"))
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
        save_checkpoint(ckpt, tensors, {"model_config": model_config(model), "step": step, "losses": losses,
                                        "train_config": asdict(cfg), "param_groups": groups,
                                        "device": str(device), "torch": torch.__version__})

    if ckpt is not None and (ckpt / "state.safetensors").exists():
        tensors, meta = load_checkpoint(ckpt)
        load_into(model, unprefixed(tensors, "model"), meta.get("model_config"), str(ckpt))
        load_into(ema, unprefixed(tensors, "ema"), meta.get("model_config"), str(ckpt))
        if isinstance(loss_fn, nn.Module):
            loss_fn.load_state_dict(unprefixed(tensors, "loss"))
        _load_optim(opt, tensors, meta["param_groups"])
        gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        start, losses = meta["step"], list(meta["losses"])
        if start > cfg.steps:
            raise CheckpointError(f"the checkpoint in {ckpt} is at step {start}, past steps={cfg.steps}; "
                                  "raise steps or use another folder")

    use_amp = cfg.amp and device.type == "cuda"
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.desc,
               disable=not cfg.progress, leave=False, mininterval=2.0)  # few redraws: notebooks stay small
    try:
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            batch = _to(data(cfg.batch_size, gen), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(model, batch, gen)
            if not torch.isfinite(loss):
                _nan_stop("loss", loss.item(), step, cfg, ckpt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if not torch.isfinite(gnorm):
                _nan_stop("gradient norm", gnorm.item(), step, cfg, ckpt)
            opt.step()
            ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            if hasattr(loss_fn, "after_step"):
                loss_fn.after_step(model, step)
            losses.append(loss.item())
            if cfg.progress and (step % 10 == 0 or step == cfg.steps - 1):
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
                save(step + 1)
    except KeyboardInterrupt:
        save(len(losses))  # every completed step is kept: rerun the same call to resume
        raise
    finally:
        bar.close()
    save(cfg.steps)
    return TrainResult(model, ema, losses, cfg.steps, time.perf_counter() - t0, start)


def _nan_stop(what, value, step, cfg, ckpt):
    kept = (f"the last good checkpoint stays in {ckpt}" if ckpt and (ckpt / "state.safetensors").exists()
            else "no checkpoint was written (set ckpt_dir and ckpt_every to keep one)")
    raise NonFiniteLoss(
        f"the {what} became {value} at step {step}; the weights were not updated and {kept}. "
        f"To fix: lower the learning rate (lr={cfg.lr}), add warm-up (warmup_steps={cfg.warmup_steps}), "
        f"clip gradients harder (grad_clip={cfg.grad_clip}), use fp32 instead of autocast, "
        "or check the data for NaN/inf values.")
