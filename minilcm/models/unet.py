"""Builders of small diffusers UNet2DModels for 32x32 CIFAR-10, wrapped in the one call convention."""
from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn

# name -> (block_out_channels, layers_per_block, attention at the 2nd resolution)
UNET_SIZES = {
    "tiny": ((32, 64, 64), 1, False),     # ~1M params: tests, CPU demos
    "small": ((64, 128, 128), 2, True),   # ~6M params: a CPU-trainable teacher
    "base": ((128, 256, 256, 256), 2, True),  # ~36M params: the GPU teacher
}


class EpsUNet(nn.Module):
    """A diffusers ``UNet2DModel`` called as ``model(x, t, class_labels=None) -> eps``.

    For a class-conditional UNet the label ``num_classes`` is the null class (classifier-free guidance),
    and ``class_labels=None`` means the null class.
    """

    def __init__(self, unet, num_classes: int | None = None, size: str | None = None):
        super().__init__()
        self.unet = unet
        self.num_classes = num_classes
        self.config = dict(size=size, num_classes=num_classes, unet=dict(unet.config))

    @property
    def null_class(self):
        return self.num_classes

    def forward(self, x, t, class_labels=None):
        if x.ndim != 4 or x.shape[1] != self.unet.config.in_channels:
            raise ValueError(f"expected images (B, {self.unet.config.in_channels}, H, W), got {tuple(x.shape)}")
        size = self.unet.config.sample_size
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if tuple(x.shape[-2:]) != size:
            raise ValueError(f"this UNet was built for {size[0]}x{size[1]} images, got {x.shape[-2]}x{x.shape[-1]}: "
                             "resize the input or build the UNet with sample_size=...")
        if self.num_classes is not None and class_labels is None:
            class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        elif self.num_classes is None and class_labels is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but class_labels were given")
        return self.unet(x, t, class_labels=class_labels).sample


def cifar_unet(size: str = "tiny", num_classes: int | None = None, dropout: float = 0.0) -> EpsUNet:
    """A ``diffusers.UNet2DModel`` for (B, 3, 32, 32) images; class-conditional when ``num_classes`` is set."""
    if size not in UNET_SIZES:
        raise ValueError(f"unknown UNet size {size!r}; choose one of {list(UNET_SIZES)}")
    channels, layers, attn = UNET_SIZES[size]
    down = ["DownBlock2D"] * len(channels)
    up = ["UpBlock2D"] * len(channels)
    if attn:
        down[1], up[-2] = "AttnDownBlock2D", "AttnUpBlock2D"
    unet = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=channels,
        layers_per_block=layers, down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=min(32, channels[0]), dropout=dropout,
        num_class_embeds=(num_classes + 1) if num_classes else None,
    )
    return EpsUNet(unet, num_classes, size)
