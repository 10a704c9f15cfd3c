"""minilcm: from DDPM to latent consistency models, one small package.

Modules follow the course: schedules -> diffusion -> sde -> solvers -> consistency -> lcm -> sd.
"""
from .schedules import Schedule  # noqa: F401
from .diffusion import Sample, q_sample, ddpm, DenoisingLoss  # noqa: F401
from .train import train, TrainConfig  # noqa: F401

__version__ = "0.1.0"
