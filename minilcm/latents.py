"""The latent side of Chapter 5: the autoencoder's objective, its scaling factor, and cached latents.

Rombach et al. 2022 (LDM, arXiv 2112.10752), Sec. 3.1: an autoencoder E, D with a KL penalty towards N(0, I)
("KL-reg") compresses x (H x W x 3) to z = E(x) (H/f x W/f x c); the diffusion model learns p(z). Sec. 4.3.2 /
App. D.1: z is rescaled by 1 / std(z) measured on the data, so the latent diffusion sees unit-variance inputs
(Stable Diffusion's ``scaling_factor`` 0.18215 is that number for its VAE). A latent whose mean is far from 0 is also
shifted: SD3 and FLUX save one ``shift_factor``; the SDXL-family configs save per-channel ``latents_mean`` and
``latents_std``, which this course uses because its four channels' means differ (``latent_stats``).

LDM's autoencoders are sharp because their decoders are trained with a perceptual distance (LPIPS) and a patch
discriminator besides the pixel loss (Esser et al. 2021, VQGAN, Eq. 4-6). ``DecoderFinetuneLoss`` is that objective
with the course's own CIFAR-10 classifier in LPIPS's place, used on the decoder alone with the encoder frozen (as
Stability's sd-vae-ft-mse fine-tuned SD's decoder), so the latents the diffusion models learn do not change.
"""
from __future__ import annotations

import torch
from torch import nn

from .datasets import to_float


class AutoencoderLoss:
    """The KL-regularised autoencoder objective for ``minilcm.train`` (LDM Sec. 3.1; its perceptual and adversarial
    terms come in a second phase, ``DecoderFinetuneLoss``):

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


class PerceptualDistance(nn.Module):
    """LPIPS (Zhang et al. 2018, Eq. 1) in a frozen classifier's feature maps: each layer's activations are unit-
    normalised over channels at every pixel, and the squared differences are averaged over pixels and summed over
    layers (no learned per-channel weights). ``net`` is an ``evaluator.EvaluatorNet``; its stem and first two stages
    (32x32, 16x16 and 8x8 maps) are used, not the pooled last stage that FD-clf reads."""

    def __init__(self, net: nn.Module, n_stages: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([net.stem, *net.stages[:n_stages]]).eval().requires_grad_(False)

    def train(self, mode: bool = True):  # stays in eval mode: its BatchNorm statistics are the classifier's
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) distances between image batches x and y in [-1, 1]."""
        d = 0.0
        for layer in self.layers:
            x, y = layer(x), layer(y)
            fx = x / (x.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
            fy = y / (y.float().pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
            d = d + (fx - fy).float().pow(2).sum(1).mean(dim=(1, 2))
        return d


class PatchDiscriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017, Sec. 3.2.2): one real/fake logit per 10x10 receptive field,
    an 8x8 map of logits for a 32x32 image."""

    def __init__(self, width: int = 64):
        super().__init__()
        act = nn.LeakyReLU(0.2)
        self.net = nn.Sequential(nn.Conv2d(3, width, 4, 2, 1), act, nn.Conv2d(width, 2 * width, 4, 2, 1),
                                 nn.GroupNorm(8, 2 * width), act, nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DecoderFinetuneLoss(nn.Module):
    """The VQGAN / LDM decoder objective on a frozen encoder, for ``minilcm.train`` (Esser et al. 2021, Eq. 4-6):

        L_D = |x - D(z)|_1 + perceptual_weight * LPIPS(x, D(z)) - adv_weight * mean(disc(D(z))),  z = E(x)'s mean

    and, inside each call, one hinge-loss step of the patch discriminator on x against D(z) (its own AdamW, lr
    ``disc_lr``, betas (0.5, 0.9) as in LDM). The adversarial term is off for the first ``disc_start`` calls, so the
    discriminator learns to tell first. As an ``nn.Module`` its discriminator is checkpointed with the run (the
    discriminator's optimizer moments are not: a resumed run restarts them)."""

    def __init__(self, perceptual: PerceptualDistance, perceptual_weight: float = 1.0, adv_weight: float = 0.1,
                 disc_start: int = 200, disc_lr: float = 2e-4):
        super().__init__()
        self.perceptual, self.disc = perceptual, PatchDiscriminator()
        self.perceptual_weight, self.adv_weight, self.disc_start = perceptual_weight, adv_weight, disc_start
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.disc_opt = None
        self.disc_lr = disc_lr
        self.last: dict = {}

    def forward(self, vae, batch, generator=None):
        x = (batch[0] if isinstance(batch, (tuple, list)) else batch).float()
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = vae.decode(z).sample
        if self.disc_opt is None:
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=self.disc_lr, betas=(0.5, 0.9))
        # the discriminator's step: hinge loss, real x against the detached reconstruction
        self.disc.requires_grad_(True)
        d_loss = (nn.functional.relu(1 - self.disc(x)).mean() + nn.functional.relu(1 + self.disc(recon.detach())).mean())
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.float().backward()
        self.disc_opt.step()
        self.disc.requires_grad_(False)
        l1 = (recon.float() - x).abs().mean()
        lp = self.perceptual(recon, x).mean()
        g = -self.disc(recon).float().mean()
        adv = self.adv_weight if int(self.calls) >= self.disc_start else 0.0
        self.calls += 1
        self.last = {"l1": l1.item(), "lpips": lp.item(), "disc": d_loss.item(), "gen": g.item()}
        return l1 + self.perceptual_weight * lp + adv * g


def freeze_encoder(vae) -> None:
    """Freeze the AutoencoderKL's encoder and quant_conv: only the decoder (post_quant_conv, decoder) trains."""
    for part in (vae.encoder, vae.quant_conv):
        if part is not None:
            part.requires_grad_(False)


def latent_stats(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel (latents_mean, latents_std) of unscaled latents (N, C, h, w). Saved in the AutoencoderKL config
    with scaling_factor 1, diffusers' SDXL-family convention, they make (z - mean) / std zero-mean and unit-variance
    in every channel; one scalar shift (SD3's shift_factor) cannot, when the channels' means differ."""
    z = latents.float().transpose(0, 1).reshape(latents.shape[1], -1)
    return [round(float(v), 5) for v in z.mean(1)], [round(float(v), 5) for v in z.std(1)]


def vae_factors(vae) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(scaling_factor, mean (1, C, 1, 1), std (1, C, 1, 1)) of an AutoencoderKL's config: scaled latents are
    scaling_factor * (z - mean) / std. Without latents_mean / latents_std: mean = shift_factor (or 0), std = 1."""
    cfg, c = vae.config, vae.config.latent_channels
    mean = cfg.latents_mean if getattr(cfg, "latents_mean", None) is not None else [cfg.shift_factor or 0.0] * c
    std = cfg.latents_std if getattr(cfg, "latents_std", None) is not None else [1.0] * c
    return float(cfg.scaling_factor), torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch: int = 500, scaling_factor: float = 1.0, flip: bool = False,
           mean=0.0, std=1.0):
    """Posterior means E(x) of uint8 (N, 3, H, W) or [-1, 1] images -> scaling_factor * (E(x) - mean) / std,
    (N, 4, H/f, W/f); ``vae_factors(vae)`` gives the three numbers a saved autoencoder uses."""
    vae.eval()
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        x = (to_float(x) if x.dtype == torch.uint8 else x.float()).to(dev)
        out.append(vae.encode(x.flip(3) if flip else x).latent_dist.mean.float().cpu())
    return (torch.cat(out) - mean) * (scaling_factor / std)


@torch.no_grad()
def decode(vae, z: torch.Tensor, batch: int = 500, scaling_factor: float = 1.0, mean=0.0, std=1.0):
    """Images in [-1, 1] (float32, on the CPU) from scaled latents z: D(z * std / scaling_factor + mean)."""
    vae.eval()
    dev = next(vae.parameters()).device
    dt = next(vae.parameters()).dtype
    z = z * (std / scaling_factor) + mean
    return torch.cat([vae.decode(z[i:i + batch].to(dev, dt)).sample.float().cpu() for i in range(0, len(z), batch)])


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


def train_decoder(vae, classifier: nn.Module, data, cfg, **loss_kw):
    """Phase 2 of the autoencoder: fine-tune its decoder with ``DecoderFinetuneLoss`` (the encoder frozen, so the
    latents keep their distribution); ``classifier`` gives the perceptual distance. Returns ``train``'s result."""
    from .train import train  # local: train is only needed when training

    vae.requires_grad_(True)  # phase 1's EMA copy comes back frozen
    freeze_encoder(vae)
    loss = DecoderFinetuneLoss(PerceptualDistance(classifier.float()), **loss_kw)
    return train(vae, loss, data, cfg)
