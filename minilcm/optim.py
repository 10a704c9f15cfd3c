"""The optimizer of the one training loop (``train.train``): AdamW, or bitsandbytes' 8-bit AdamW, over parameter
groups with per-group learning-rate multipliers (the lcm stage trains the w projection at 10x lr)."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, lr_mult: dict) -> list[dict]:
    """The optimizer's parameter groups: one per entry of ``lr_mult`` ({name part: multiplier}) that matches a
    parameter name (first match wins), after one group of the rest at multiplier 1. Each carries ``lr_mult``."""
    groups, rest = {key: [] for key in lr_mult}, []
    for name, p in model.named_parameters():
        key = next((k for k in lr_mult if k in name), None)
        (groups[key] if key is not None else rest).append(p)
    if unused := [k for k, ps in groups.items() if not ps]:
        raise ValueError(f"lr_mult names {unused}, which match no parameter of the {type(model).__name__}")
    return [{"params": rest, "lr_mult": 1.0}] + [{"params": ps, "lr_mult": float(lr_mult[k])} for k, ps in groups.items()]


def make_optimizer(cfg, params) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (its moments in 8 bits: 2 bytes per parameter instead of 8), as ``cfg``
    (a ``train.TrainConfig``) names it, at its lr and weight decay. ``params``: parameters or ``param_groups``."""
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
