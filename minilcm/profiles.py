"""One knob sizes every notebook's work: ``MINILCM_PROFILE`` = fast | cpu | gpu.

fast  CI: seconds per cell, just enough to prove the code runs and the claims hold.
cpu   a learner's laptop (default without CUDA): minutes at most.
gpu   default when CUDA is present: the real thing.

    from minilcm.profiles import PROFILE, pick
    steps = pick(fast=300, cpu=3000, gpu=20000)
"""
from __future__ import annotations

import os

import torch

PROFILES = ("fast", "cpu", "gpu")


def current() -> str:
    """The active profile: $MINILCM_PROFILE, else gpu with CUDA, else cpu."""
    p = os.environ.get("MINILCM_PROFILE", "").strip().lower()
    if not p:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if p not in PROFILES:
        raise ValueError(f"MINILCM_PROFILE={p!r} is not a profile; set it to one of {', '.join(PROFILES)}")
    return p


PROFILE = current()


def pick(fast, cpu, gpu=None):
    """The value for the active profile (``gpu`` defaults to ``cpu``)."""
    return {"fast": fast, "cpu": cpu, "gpu": cpu if gpu is None else gpu}[current()]
