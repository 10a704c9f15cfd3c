"""One training loop for every chapter.

    train(model, loss_fn, data, TrainConfig(...)) -> TrainResult

* ``loss_fn(model, batch, generator) -> scalar``: any objective (denoising, CD, CT, LCD, ...).
  If it is an ``nn.Module`` (e.g. it holds a target network) its state is checkpointed too, and if it
  has ``after_step(model, step)`` that is called after every optimizer step (e.g. to update an EMA target).
* ``data(n, generator) -> batch``: a tensor or a tuple of tensors (e.g. ``GaussianMixture``, ``ImageSet``).
* AdamW, linear warm-up, gradient clipping, an EMA copy, bf16 autocast on CUDA, a tqdm bar.
* Checkpoints (safetensors + JSON) with every random state, so a resumed run equals an uninterrupted one,
  bit for bit on the CPU; written every ``ckpt_every`` steps, every ``ckpt_minutes`` of wall clock, at the end,
  and on SIGINT / SIGTERM: the step in flight finishes, a consistent checkpoint is saved, and
  ``errors.TrainingInterrupted`` ("stopped at step N of M; rerun the same command to resume") is raised. A
  second signal stops at once (the previous checkpoint stays: a checkpoint is one file, renamed into place).
* A NaN guard: a non-finite loss or gradient stops training before the weights change, and the last
  good checkpoint is kept.
* Options for large models (Chapter 6; all off by default): fp16 autocast with a GradScaler (``amp_dtype``),
  8-bit AdamW (``optimizer="adamw8bit"``, bitsandbytes), no EMA copy (``keep_ema=False``), a JSONL log of loss
  and throughput (``log_file``), and multi-GPU data parallelism through an ``accelerate.Accelerator``
  (``train(..., accelerator=acc)``: each process draws its own batches; the main process checkpoints).
"""
from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import TrainingInterrupted
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
    ckpt_every: int = 0           # 0: only at the end (and on Ctrl-C / SIGTERM)
    ckpt_minutes: float = 2.0     # also checkpoint after this much wall clock since the last one (0: off)
    device: str | None = None     # None: cuda if available, else cpu
    amp: bool = True              # bf16 autocast on CUDA
    amp_cpu: bool = False         # bf16 autocast on CPU too (fast with AMX/AVX512-bf16: ~3x for convnets)
    lr_decay: str = "none"        # "none" or "cosine" (to 0 over the steps after warm-up)
    progress: bool = True
    desc: str = "train"
    amp_dtype: str = "bf16"       # autocast dtype: "bf16", or "fp16" (adds a GradScaler)
    optimizer: str = "adamw"      # "adamw" (torch) or "adamw8bit" (bitsandbytes' AdamW8bit)
    keep_ema: bool = True         # False: no EMA copy (saves a model's worth of memory); result.ema is the model
    log_file: str | None = None   # a JSONL file: one line per step with loss, lr, seconds and samples/s


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


def _load_optim(opt, tensors, groups, where, check: bool = True):
    state = {}
    for k, v in unprefixed(tensors, "optim").items():
        i, name = k.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    if check and len({frozenset(st) for st in state.values()}) > 1:  # an older minilcm saved mid-step on Ctrl-C
        raise CheckpointError(f"the checkpoint in {where} holds a half-updated optimizer (written while a step was "
                              "interrupted); delete the folder to start afresh")
    sd = opt.state_dict()
    for g, saved in zip(sd["param_groups"], groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (its moments in 8 bits: 2 bytes per parameter instead of 8)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes (and a CUDA GPU): pip install bitsandbytes; "
                              "or use optimizer='adamw'") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'adamw8bit', got {cfg.optimizer!r}")


def train(model: nn.Module, loss_fn, data, cfg: TrainConfig, *, ema: nn.Module | None = None,
          accelerator=None) -> TrainResult:
    """Train ``model`` on ``loss_fn`` over ``data`` for ``cfg.steps`` steps (resuming from ``cfg.ckpt_dir``).

    ``accelerator``: an ``accelerate.Accelerator`` (e.g. under ``accelerate launch``) for data-parallel training;
    create it with mixed_precision="no" (autocast is this loop's, from ``cfg.amp``/``amp_dtype``)."""
    if cfg.amp_dtype not in ("bf16", "fp16"):
        raise ValueError(f"amp_dtype must be 'bf16' or 'fp16', got {cfg.amp_dtype!r}")
    acc = accelerator
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    main = rank == 0
    device = acc.device if acc is not None else torch.device(cfg.device) if cfg.device else default_device()
    model.to(device).train()
    if cfg.keep_ema:
        ema = (ema if ema is not None else copy.deepcopy(model)).to(device).eval().requires_grad_(False)
    else:
        ema = model
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    opt = make_optimizer(cfg, model.parameters())
    net = model  # what the loss calls: the model, or its DistributedDataParallel wrapper
    if acc is not None:
        net, opt = acc.prepare(model, opt)
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)  # one stream per process
    torch.manual_seed(cfg.seed + 1_000_003 * rank)  # dropout and anything else that draws from the global generator
    losses: list[float] = []
    start = 0
    ckpt = Path(cfg.ckpt_dir) if cfg.ckpt_dir else None

    use_amp = (cfg.amp and device.type == "cuda") or (cfg.amp_cpu and device.type == "cpu")
    amp_dtype = torch.float16 if cfg.amp_dtype == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and cfg.amp_dtype == "fp16")

    def save(step):
        if acc is not None:
            acc.wait_for_everyone()
        if ckpt is None or not main:
            return
        tensors = {**prefixed(model.state_dict(), "model"), **_optim_tensors(opt),
                   "rng.generator": gen.get_state(), "rng.torch": torch.get_rng_state()}
        if cfg.keep_ema:
            tensors.update(prefixed(ema.state_dict(), "ema"))
        if isinstance(loss_fn, nn.Module):
            tensors.update(prefixed(loss_fn.state_dict(), "loss"))
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
        meta = {"model_config": model_config(model), "step": step, "losses": losses, "train_config": asdict(cfg),
                "param_groups": groups, "device": str(device), "torch": torch.__version__}
        if scaler.is_enabled():
            meta["scaler"] = scaler.state_dict()
        save_checkpoint(ckpt, tensors, meta)

    if ckpt is not None and (ckpt / "state.safetensors").exists():
        tensors, meta = load_checkpoint(ckpt)
        load_into(model, unprefixed(tensors, "model"), meta.get("model_config"), str(ckpt))
        if cfg.keep_ema:
            load_into(ema, unprefixed(tensors, "ema"), meta.get("model_config"), str(ckpt))
        if isinstance(loss_fn, nn.Module):
            loss_fn.load_state_dict(unprefixed(tensors, "loss"))
        # torch's AdamW gives every parameter the same state; bitsandbytes' 8-bit AdamW does not (by tensor size)
        _load_optim(opt, tensors, meta["param_groups"], ckpt, check=cfg.optimizer == "adamw")
        gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        if scaler.is_enabled() and "scaler" in meta:
            scaler.load_state_dict(meta["scaler"])
        start, losses = meta["step"], list(meta["losses"])
        if start > cfg.steps:
            raise CheckpointError(f"the checkpoint in {ckpt} is at step {start}, past steps={cfg.steps}; "
                                  "raise steps or use another folder")
        if rank > 0:  # the checkpoint holds the main process's streams: give the others their own again
            gen.manual_seed(cfg.seed + 1_000_003 * rank + start)
            torch.manual_seed(cfg.seed + 1_000_003 * rank + start)

    log = open(cfg.log_file, "a") if cfg.log_file and main else None
    t0 = t_last = t_saved = time.perf_counter()
    stop = _StopRequest(sync=acc if world > 1 else None)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=cfg.desc,
               disable=not (cfg.progress and main), leave=False, mininterval=2.0)  # few redraws: notebooks stay small
    done = start
    try:
        stop.install()
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = learning_rate(cfg, step)
            batch = _to(data(cfg.batch_size, gen), device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                loss = loss_fn(net, batch, gen)
            if not torch.isfinite(loss):
                _nan_stop("loss", loss.item(), step, cfg, ckpt)
            opt.zero_grad(set_to_none=True)
            scaled = scaler.scale(loss) if scaler.is_enabled() else loss
            acc.backward(scaled) if acc is not None else scaled.backward()
            if scaler.is_enabled():
                scaler.unscale_(opt)
            gnorm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if not torch.isfinite(gnorm) and not scaler.is_enabled():  # with fp16 the scaler skips such steps
                _nan_stop("gradient norm", gnorm.item(), step, cfg, ckpt)
            if scaler.is_enabled():
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if cfg.keep_ema:
                ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
            if hasattr(loss_fn, "after_step"):
                loss_fn.after_step(model, step)
            losses.append(loss.item())
            if log is not None:
                now = time.perf_counter()
                log.write(json.dumps({"step": step + 1, "loss": losses[-1], "lr": opt.param_groups[0]["lr"],
                                      "seconds": round(now - t_last, 6),
                                      "samples_per_s": round(cfg.batch_size * world / max(now - t_last, 1e-9), 3)})
                          + "\n")
                log.flush()
                t_last = now
            if cfg.progress and (step % 10 == 0 or step == cfg.steps - 1):
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}", refresh=False)
            done = step + 1
            due = bool(cfg.ckpt_minutes and ckpt is not None and time.perf_counter() - t_saved >= 60 * cfg.ckpt_minutes)
            signum, due = stop.poll(due)
            if signum is not None:
                save(done)  # every completed step is kept (a second signal now stops at once; the write is atomic)
                raise TrainingInterrupted(done, cfg.steps, signum, saved_to=ckpt)
            if done < cfg.steps and (due or (cfg.ckpt_every and done % cfg.ckpt_every == 0)):
                save(done)
                t_saved = time.perf_counter()
        save(cfg.steps)  # still under the handlers: a signal now waits for this save
        signum, _ = stop.poll(False)  # agreed by every rank, as in the loop
        if signum is not None:
            raise TrainingInterrupted(cfg.steps, cfg.steps, signum, saved_to=ckpt)
    finally:
        stop.restore()
        bar.close()
        if log is not None:
            log.close()
    return TrainResult(model, ema, losses, cfg.steps, time.perf_counter() - t0, start)


class _StopRequest:
    """SIGINT / SIGTERM become a request that the loop honours between steps (so an optimizer step is never cut in
    half). A second signal raises KeyboardInterrupt at once. Handlers are installed only in the main thread and
    restored afterwards. With several processes (``sync``: an accelerate.Accelerator) the request, and the
    wall-clock checkpoint decision, are max-reduced across ranks so every rank stops, or saves, at the same step."""

    def __init__(self, sync=None):
        self.signum, self.sync, self.old = None, sync, {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self._handler)
            except (ValueError, OSError):
                pass

    def _handler(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)
        self.old = {}

    def poll(self, due: bool):
        """(signal number or None, whether a checkpoint is due), agreed by every rank."""
        if self.sync is None:
            return self.signum, due
        import torch.distributed as dist

        t = torch.tensor([self.signum or 0, int(due)], device=self.sync.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        signum = int(t[0])
        return (signum or None), bool(t[1])


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at ``steps``."""
    if cfg.lr_decay not in ("none", "cosine"):
        raise ValueError(f"lr_decay must be 'none' or 'cosine', got {cfg.lr_decay!r}")
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "cosine":
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return cfg.lr


def _nan_stop(what, value, step, cfg, ckpt):
    kept = (f"the last good checkpoint stays in {ckpt}" if ckpt and (ckpt / "state.safetensors").exists()
            else "no checkpoint was written (set ckpt_dir and ckpt_every to keep one)")
    raise NonFiniteLoss(
        f"the {what} became {value} at step {step}; the weights were not updated and {kept}. "
        f"To fix: lower the learning rate (lr={cfg.lr}), add warm-up (warmup_steps={cfg.warmup_steps}), "
        f"clip gradients harder (grad_clip={cfg.grad_clip}), use fp32 instead of autocast, "
        "or check the data for NaN/inf values.")
