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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import StepBudget
from .checkpoints import (CheckpointError, load_checkpoint, load_into, model_config, prefixed, save_checkpoint,
                          unprefixed)
from .errors import TrainingInterrupted
from .interrupts import StopRequest
from .optim import make_optimizer, param_groups  # noqa: F401  (make_optimizer is also imported from here)


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
    lr_mult: dict = field(default_factory=dict)  # {name part: m}: parameters whose name contains it train at m x lr
    minutes: float | None = None  # a wall-clock budget: steps (and the LR schedule) fitted to it (minilcm.budget)
    tf32: bool = True             # on CUDA, TF32 matmuls and convolutions for what runs in fp32 (the lcm and cd stages)


@dataclass
class TrainResult:
    model: nn.Module
    ema: nn.Module
    losses: list[float] = field(default_factory=list)
    step: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    budget: dict | None = None  # with cfg.minutes: the measured rate, the steps fixed and reached (minilcm.budget)


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


def train(model: nn.Module, loss_fn, data, cfg: TrainConfig, *, ema: nn.Module | None = None,
          accelerator=None) -> TrainResult:
    """Train ``model`` on ``loss_fn`` over ``data`` for ``cfg.steps`` steps (resuming from ``cfg.ckpt_dir``).

    ``accelerator``: an ``accelerate.Accelerator`` (e.g. under ``accelerate launch``) for data-parallel training;
    create it with mixed_precision="no" (autocast is this loop's, from ``cfg.amp``/``amp_dtype``)."""
    if cfg.amp_dtype not in ("bf16", "fp16"):
        raise ValueError(f"amp_dtype must be 'bf16' or 'fp16', got {cfg.amp_dtype!r}")
    run = _Run(model, loss_fn, cfg, ema, accelerator)
    start = run.resume()
    log = _StepLog(cfg.log_file, cfg.batch_size * run.world) if cfg.log_file and run.main else None
    t0 = t_saved = time.perf_counter()
    if log is not None:
        log.t_last = t0
    stop = StopRequest(sync=accelerator if run.world > 1 else None)
    fit = StepBudget(cfg, run.saved_budget, t0, start, run.world) if cfg.minutes else None
    run.budget = fit.info if fit is not None else None  # saved with every checkpoint, a finished run's included
    bar = tqdm(initial=start, total=None if fit and not fit.fixed else cfg.steps, desc=cfg.desc,
               disable=not (cfg.progress and run.main), leave=False, mininterval=2.0)  # few redraws: notebooks stay small
    step = start
    try:
        stop.install()
        while step < cfg.steps:
            run.losses.append(run.step(data, step))
            if log is not None:
                log.write(step + 1, run.losses[-1], run.opt.param_groups[0]["lr"])
            if cfg.progress and (step % 10 == 0 or step == cfg.steps - 1):
                bar.set_postfix(loss=f"{sum(run.losses[-50:]) / len(run.losses[-50:]):.4f}", refresh=False)
            bar.update(1)
            step = done = step + 1
            over = fit is not None and fit.after_step(done, start)
            if fit is not None:
                bar.total = cfg.steps if fit.fixed else None
            if over:
                cfg.steps = done  # the overrun guard: this step is the last (fit.info says so)
            signum, due = stop.poll(run.ckpt is not None and _minutes_due(cfg, t_saved))
            if signum is not None:
                run.save(done)  # every completed step is kept (a second signal now stops at once; the write is atomic)
                raise TrainingInterrupted(done, fit.total() if fit else cfg.steps, signum, saved_to=run.ckpt)
            if done < cfg.steps and (due or (cfg.ckpt_every and done % cfg.ckpt_every == 0)):
                run.save(done)
                t_saved = time.perf_counter()
        run.save(cfg.steps)  # still under the handlers: a signal now waits for this save
        signum, _ = stop.poll(False)  # agreed by every rank, as in the loop
        if signum is not None:
            raise TrainingInterrupted(cfg.steps, cfg.steps, signum, saved_to=run.ckpt)
    finally:
        stop.restore()
        bar.close()
        if log is not None:
            log.close()
    return TrainResult(model, run.ema, run.losses, cfg.steps, time.perf_counter() - t0, start, run.budget)


def _minutes_due(cfg: TrainConfig, t_saved: float) -> bool:
    """Whether ``ckpt_minutes`` of wall clock have passed since the last checkpoint."""
    return bool(cfg.ckpt_minutes and time.perf_counter() - t_saved >= 60 * cfg.ckpt_minutes)


class _Run:
    """One training run's state: the model, its EMA copy, the optimizer, the GradScaler and the random streams;
    ``step`` is one optimizer step, ``save`` / ``resume`` write and read all of it as one checkpoint."""

    def __init__(self, model: nn.Module, loss_fn, cfg: TrainConfig, ema: nn.Module | None, acc):
        self.model, self.loss_fn, self.cfg, self.acc = model, loss_fn, cfg, acc
        self.rank, self.world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
        self.main = self.rank == 0
        self.device = device = (acc.device if acc is not None else torch.device(cfg.device) if cfg.device
                                else default_device())
        model.to(device).train()
        if device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if cfg.keep_ema:
            self.ema = (ema if ema is not None else copy.deepcopy(model)).to(device).eval().requires_grad_(False)
        else:
            self.ema = model
        if isinstance(loss_fn, nn.Module):
            loss_fn.to(device)
        self.opt = make_optimizer(cfg, param_groups(model, cfg.lr_mult) if cfg.lr_mult else model.parameters())
        self.net = model  # what the loss calls: the model, or its DistributedDataParallel wrapper
        if acc is not None:
            self.net, self.opt = acc.prepare(model, self.opt)
        self.gen = torch.Generator()
        self.seed_streams(0)
        self.budget: dict | None = None        # a budgeted run's record (saved with every checkpoint)
        self.saved_budget: dict | None = None  # ... as read back by resume()
        self.losses: list[float] = []
        self.ckpt = Path(cfg.ckpt_dir) if cfg.ckpt_dir else None
        self.use_amp = (cfg.amp and device.type == "cuda") or (cfg.amp_cpu and device.type == "cpu")
        self.amp_dtype = torch.float16 if cfg.amp_dtype == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.use_amp and cfg.amp_dtype == "fp16")

    def seed_streams(self, offset: int) -> None:
        """One random stream per process: the batch generator, and the global generator (dropout and anything
        else that draws from it)."""
        seed = self.cfg.seed + 1_000_003 * self.rank + offset
        self.gen.manual_seed(seed)
        torch.manual_seed(seed)

    def step(self, data, step: int) -> float:
        """One optimizer step at learning_rate(step); the NaN guard stops before a non-finite update."""
        cfg, opt, scaler = self.cfg, self.opt, self.scaler
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, step) * g.get("lr_mult", 1.0)
        batch = _to(data(cfg.batch_size, self.gen), self.device)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            loss = self.loss_fn(self.net, batch, self.gen)
        if not torch.isfinite(loss):
            _nan_stop("loss", loss.item(), step, cfg, self.ckpt)
        opt.zero_grad(set_to_none=True)
        scaled = scaler.scale(loss) if scaler.is_enabled() else loss
        self.acc.backward(scaled) if self.acc is not None else scaled.backward()
        if scaler.is_enabled():
            scaler.unscale_(opt)
        gnorm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip or math.inf)
        if not torch.isfinite(gnorm) and not scaler.is_enabled():  # with fp16 the scaler skips such steps
            _nan_stop("gradient norm", gnorm.item(), step, cfg, self.ckpt)
        if scaler.is_enabled():
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if cfg.keep_ema:
            ema_update(self.ema, self.model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if hasattr(self.loss_fn, "after_step"):
            self.loss_fn.after_step(self.model, step)
        return loss.item()

    def save(self, step: int) -> None:
        """Checkpoint everything a resumed run needs to continue bit for bit (the main process writes it)."""
        if self.acc is not None:
            self.acc.wait_for_everyone()
        if self.ckpt is None or not self.main:
            return
        tensors = {**prefixed(self.model.state_dict(), "model"), **_optim_tensors(self.opt),
                   "rng.generator": self.gen.get_state(), "rng.torch": torch.get_rng_state()}
        if self.cfg.keep_ema:
            tensors.update(prefixed(self.ema.state_dict(), "ema"))
        if isinstance(self.loss_fn, nn.Module):
            tensors.update(prefixed(self.loss_fn.state_dict(), "loss"))
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.state_dict()["param_groups"]]
        meta = {"model_config": model_config(self.model), "step": step, "losses": self.losses,
                "train_config": asdict(self.cfg), "param_groups": groups, "device": str(self.device),
                "torch": torch.__version__}
        if self.scaler.is_enabled():
            meta["scaler"] = self.scaler.state_dict()
        if self.budget is not None:
            meta["budget"] = self.budget
        save_checkpoint(self.ckpt, tensors, meta)

    def resume(self) -> int:
        """Load the checkpoint in ``ckpt_dir`` when there is one; the step to continue from (0: a fresh run)."""
        ckpt, cfg = self.ckpt, self.cfg
        if ckpt is None or not (ckpt / "state.safetensors").exists():
            return 0
        tensors, meta = load_checkpoint(ckpt)
        load_into(self.model, unprefixed(tensors, "model"), meta.get("model_config"), str(ckpt))
        if cfg.keep_ema:
            load_into(self.ema, unprefixed(tensors, "ema"), meta.get("model_config"), str(ckpt))
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.load_state_dict(unprefixed(tensors, "loss"))
        # torch's AdamW gives every parameter the same state; bitsandbytes' 8-bit AdamW does not (by tensor size)
        _load_optim(self.opt, tensors, meta["param_groups"], ckpt, check=cfg.optimizer == "adamw")
        self.gen.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.scaler.is_enabled() and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        start, self.losses, self.saved_budget = meta["step"], list(meta["losses"]), meta.get("budget")
        if start > cfg.steps and not cfg.minutes:  # a budgeted run's count is its checkpoint's
            raise CheckpointError(f"the checkpoint in {ckpt} is at step {start}, past steps={cfg.steps}; "
                                  "raise steps or use another folder")
        if self.rank > 0:  # the checkpoint holds the main process's streams: give the others their own again
            self.seed_streams(start)
        return start


class _StepLog:
    """The JSONL log: one line per step with its loss, learning rate, seconds and samples per second."""

    def __init__(self, path: str, samples_per_step: int):
        self.f, self.samples, self.t_last = open(path, "a"), samples_per_step, time.perf_counter()

    def write(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        self.f.write(json.dumps({"step": step, "loss": loss, "lr": lr, "seconds": round(now - self.t_last, 6),
                                 "samples_per_s": round(self.samples / max(now - self.t_last, 1e-9), 3)}) + "\n")
        self.f.flush()
        self.t_last = now

    def close(self) -> None:
        self.f.close()


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
