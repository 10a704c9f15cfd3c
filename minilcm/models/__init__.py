"""Noise-prediction models. Every one is called as ``model(x_t, t, **cond) -> eps``."""
from .mlp import MLPDenoiser, timestep_embedding
from .unet import UNET_SIZES, cifar_unet, EpsUNet

__all__ = ["MLPDenoiser", "timestep_embedding", "cifar_unet", "EpsUNet", "UNET_SIZES"]
