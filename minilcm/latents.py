"""The latent side of Chapter 5: the autoencoder's objective, its scaling factor, and cached latents.

Rombach et al. 2022 (LDM, arXiv 2112.10752), Sec. 3.1: an autoencoder E, D with a KL penalty towards N(0, I)
("KL-reg") compresses x (H x W x 3) to z = E(x) (H/f x W/f x c); the diffusion model learns p(z). Sec. 4.3.2 /
App. D.1: z is rescaled by 1 / std(z) measured on the data, so the latent diffusion sees unit-variance inputs
(Stable Diffusion's ``scaling_factor`` 0.18215 is that number for its VAE).
"""
from __future__ import annotations

import torch
from torch import nn

from .datasets import to_float


class AutoencoderLoss:
    """The KL-regularised autoencoder objective for ``minilcm.train`` (LDM Sec. 3.1, without the perceptual and
    adversarial terms, which need pretrained networks):

        L = |x - D(z)|^2 (mean over pixels) + kl_weight * KL(q(z|x) || N(0, I)) / (number of pixels),  z ~ q(z|x)

    batch = (images in [-1, 1], labels) or images alone."""

    def __init__(self, kl_weight: float = 1e-3):
        self.kl_weight = kl_weight

    def __call__(self, vae, batch, generator=None):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator).to(post.mean)
        recon = vae.decode(z).sample.float()
        kl = post.kl().float().mean() / x[0].numel()
        return nn.functional.mse_loss(recon, x.float()) + self.kl_weight * kl


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 500, scaling_factor: float = 1.0, flip: bool = False):
    """Posterior means of uint8 (N, 3, H, W) or [-1, 1] images, times ``scaling_factor`` -> (N, 4, H/f, W/f)."""
    vae.eval()
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        x = (to_float(x) if x.dtype == torch.uint8 else x.float()).to(dev)
        out.append(vae.encode(x.flip(3) if flip else x).latent_dist.mean.float().cpu())
    return torch.cat(out) * scaling_factor


@torch.no_grad()
def decode(vae, z: torch.Tensor, batch: int = 500, scaling_factor: float = 1.0) -> torch.Tensor:
    """Images in [-1, 1] (float32, on the CPU) from scaled latents z."""
    vae.eval()
    dev = next(vae.parameters()).device
    dt = next(vae.parameters()).dtype
    return torch.cat([vae.decode((z[i:i + batch] / scaling_factor).to(dev, dt)).sample.float().cpu()
                      for i in range(0, len(z), batch)])


def measure_scaling_factor(latents: torch.Tensor) -> float:
    """1 / std of unscaled latents over the data (LDM App. D.1): scaled latents have unit variance."""
    return float(1.0 / latents.float().std())


class LatentSet:
    """Cached (scaled) latents with their class labels; batches are (latents, caption embeddings) for
    ``DenoisingLoss(conditioning=guidance.TextConditioning(...))``: each row gets one of its class's caption embeddings
    (``captions``: (num_classes, num_templates, L, D)) drawn at random."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, captions: torch.Tensor):
        if len(latents) != len(labels):
            raise ValueError(f"{len(latents)} latents but {len(labels)} labels")
        self.latents, self.labels, self.captions = latents, labels, captions

    def __len__(self):
        return len(self.labels)

    def __call__(self, n: int, generator=None):
        idx = torch.randint(0, len(self), (n,), generator=generator)
        tpl = torch.randint(0, self.captions.shape[1], (n,), generator=generator)
        y = self.labels[idx]
        return self.latents[idx].float(), self.captions[y, tpl].float()
