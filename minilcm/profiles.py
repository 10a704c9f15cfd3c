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
        from .errors import InputError

        raise InputError(f"MINILCM_PROFILE={p!r} is not a profile; set it to one of {', '.join(PROFILES)}")
    return p


PROFILE = current()


def pick(fast, cpu, gpu=None):
    """The value for the active profile (``gpu`` defaults to ``cpu``)."""
    return {"fast": fast, "cpu": cpu, "gpu": cpu if gpu is None else gpu}[current()]


def hardware(device="cpu") -> str:
    """The machine a number was measured on: the GPU's name, or the CPU's model, cores and torch threads."""
    import platform

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads"
