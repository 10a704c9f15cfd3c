"""minilcm: from DDPM to latent consistency models, one small package.

Modules follow the course: schedules -> diffusion -> sde -> solvers -> consistency -> lcm -> sd; the layers and
what each may import are in docs/architecture.md. The names below load on first use, so ``import minilcm`` (and
``minilcm --help``) does not import torch.
"""
from importlib import import_module

__version__ = "0.1.0"
_LAZY = {"Schedule": "schedules", "Sample": "diffusion", "q_sample": "diffusion", "ddpm": "diffusion",
         "DenoisingLoss": "diffusion", "train": "train", "TrainConfig": "train"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'minilcm' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
