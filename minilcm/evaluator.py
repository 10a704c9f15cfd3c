"""The image evaluator: a CIFAR-10 classifier whose penultimate features give a Fréchet distance, and the
class accuracy of conditional samples.

The Fréchet Inception Distance (Heusel et al. 2017, arXiv 1706.08500) compares Gaussians fitted to the
features of two image sets (see ``metrics.frechet_distance``). Its usual feature extractor, Inception-v3,
needs weights from the internet; the course therefore ships its own extractor, a small ResNet-style
classifier trained on CIFAR-10 (``evaluator-cifar10``), and the CIFAR-10 test set's feature statistics.
A Fréchet distance in this network's features is a **proxy** ("FD-clf"): it ranks samplers the way FID does
for CIFAR-like images but its numbers are not comparable with published FIDs. With Inception weights on
disk (``InceptionFeatures``) the same code gives a true FID.

    EvaluatorNet(widths)            conv stem + 3 residual stages, global max-pool, linear head: (B,3,32,32) -> 10
    ClassifierLoss(label_smoothing) the training objective for ``minilcm.train`` (flip + translate augmentation)
    accuracy(net, images, labels)   top-1 with flip test-time augmentation
    Evaluator.load()                the shipped classifier + reference statistics: .fd(images), .class_accuracy(...)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoints import CheckpointError, load_checkpoint, load_model, resolve
from .datasets import to_float
from .metrics import frechet_distance

EVALUATOR_NAME = "evaluator-cifar10"
REFERENCE_STATS = "cifar10-test-stats.npz"   # inside the evaluator's checkpoint folder


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (the downsampling stage of airbench-style nets)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out), nn.GELU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU())


class EvaluatorNet(nn.Module):
    """A small CIFAR-10 classifier. ``features(x)`` (B, widths[-1]) are the penultimate activations used by the
    Fréchet distance; ``forward(x)`` gives logits. Input: floats in [-1, 1], (B, 3, 32, 32)."""

    def __init__(self, widths=(64, 128, 256, 256), num_classes: int = 10):
        super().__init__()
        w0, w1, w2, w3 = widths
        self.config = {"widths": list(widths), "num_classes": num_classes}
        self.stem = nn.Sequential(nn.Conv2d(3, w0, 3, padding=1, bias=False), nn.BatchNorm2d(w0), nn.GELU())
        self.stages = nn.Sequential(_block(w0, w1), _block(w1, w2), _block(w2, w3))
        self.head = nn.Linear(w3, num_classes, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (3, 32, 32):
            raise ValueError(f"the evaluator expects images (B, 3, 32, 32) in [-1, 1], got {tuple(x.shape)}")
        h = self.stages(self.stem(x))  # (B, w3, 4, 4)
        return h.amax(dim=(2, 3))      # (B, w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) / 8.0  # a fixed temperature keeps the initial logits small


def augment(x: torch.Tensor, generator: torch.Generator | None = None, translate: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random translation of up to ``translate`` pixels (reflect padding)."""
    B = x.shape[0]
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1).to(x.device), x.flip(3), x)
    if translate:
        pad = nn.functional.pad(x, (translate,) * 4, mode="reflect")
        dx, dy = (torch.randint(0, 2 * translate + 1, (2, B), generator=generator)).tolist()
        x = torch.stack([pad[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(B)])
    return x


class ClassifierLoss:
    """Cross-entropy with label smoothing on augmented images: the evaluator's objective for ``minilcm.train``.
    batch = (images in [-1, 1] (B, 3, 32, 32), labels (B,))."""

    def __init__(self, label_smoothing: float = 0.2, translate: int = 2):
        self.label_smoothing, self.translate = label_smoothing, translate

    def __call__(self, model, batch, generator=None):
        x, y = batch
        x = augment(x, generator, self.translate).contiguous(memory_format=torch.channels_last)
        return nn.functional.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)


def _batches(images: torch.Tensor, batch: int):
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        yield to_float(x) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict(net: nn.Module, images: torch.Tensor, batch: int = 500, tta: bool = True) -> torch.Tensor:
    """Logits of uint8 (N, 3, 32, 32) or [-1, 1] float images; ``tta`` averages with the mirrored image."""
    net.eval()
    dev = next(net.parameters()).device
    out = []
    for x in _batches(images, batch):
        x = x.to(dev)
        logits = net(x)
        out.append((logits + net(x.flip(3))) / 2 if tta else logits)
    return torch.cat(out).float().cpu()


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kw) -> float:
    """Top-1 accuracy (fraction) of ``net`` on ``images`` against ``labels``."""
    return (predict(net, images, **kw).argmax(1) == labels.cpu()).float().mean().item()


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Penultimate features (N, D) float64 of uint8 or [-1, 1] float images."""
    net.eval()
    dev = next(net.parameters()).device
    return torch.cat([net.features(x.to(dev)).double().cpu() for x in _batches(images, batch)])


def feature_stats(feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), Sigma (D, D)): the mean and unbiased covariance of features (N, D)."""
    f = feats.double().numpy()
    if len(f) < 2:
        raise ValueError("the Fréchet distance needs at least 2 images (use thousands for a stable value)")
    return f.mean(0), np.cov(f, rowvar=False)


# ---- the shipped evaluator ----------------------------------------------------------------------------
class Evaluator:
    """The shipped CIFAR-10 evaluator: FD-clf (a Fréchet distance in its features) and class accuracy.

        ev = Evaluator.load()            # data/checkpoints/evaluator-cifar10
        ev.fd(images_uint8)              # vs the CIFAR-10 test set (10,000 images)
        ev.class_accuracy(images, labels)
    """

    def __init__(self, net: EvaluatorNet, ref_mu: np.ndarray, ref_sigma: np.ndarray, meta: dict | None = None):
        self.net, self.ref_mu, self.ref_sigma, self.meta = net.eval(), ref_mu, ref_sigma, meta or {}

    @classmethod
    def load(cls, name_or_path=EVALUATOR_NAME, device="cpu") -> "Evaluator":
        path = resolve(name_or_path)
        cfg = load_checkpoint(path)[1]["model_config"]
        net = EvaluatorNet(cfg["widths"], cfg["num_classes"])
        meta = load_model(net, path)
        stats = path / REFERENCE_STATS
        if not stats.exists():
            raise CheckpointError(f"{stats} is missing: rebuild it with `minilcm train evaluator` "
                                  "(it is written after training)")
        z = np.load(stats)
        return cls(net.to(device), z["mu"], z["sigma"], meta)

    def stats(self, images: torch.Tensor):
        return feature_stats(features(self.net, images))

    def fd(self, images: torch.Tensor) -> float:
        """FD-clf of the images against the CIFAR-10 test set."""
        return frechet_distance(*self.stats(images), self.ref_mu, self.ref_sigma)

    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """The fraction of images the classifier assigns to their requested class (conditional samples)."""
        return accuracy(self.net, images, labels)


@torch.no_grad()
def sampler_fd(ev: Evaluator, sample, noise: torch.Tensor, batch: int = 250) -> float:
    """FD-clf of the images ``sample(z)`` draws from ``noise`` (N, ...), ``batch`` noises at a time, each batch
    clamped to [-1, 1]: how to measure a sampler held in the notebook (a shipped model folder has ``generate`` and
    ``minilcm bench``). Use thousands of noises: the Fréchet distance is biased upward at small N."""
    return ev.fd(torch.cat([sample(z).float().clamp(-1, 1).cpu() for z in noise.split(batch)]))


# ---- Inception-v3, when its weights are on disk --------------------------------------------------------
INCEPTION_HELP = (
    "Inception-v3 weights are not on this machine. To use a true FID, download torchvision's weights once "
    "(on a machine with internet: python -c \"import torchvision; torchvision.models.inception_v3("
    "weights='DEFAULT')\") and copy the file inception_v3_google-0cc3c7bd.pth into $TORCH_HOME/hub/checkpoints, "
    "or point $MINILCM_INCEPTION at it. Without it, use Evaluator (FD-clf, the proxy).")


def inception_weights() -> Path | None:
    """The local Inception-v3 weight file: $MINILCM_INCEPTION, else torchvision's cache; None when absent."""
    env = os.environ.get("MINILCM_INCEPTION")
    if env:
        return Path(env) if Path(env).exists() else None
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    hits = sorted(hub.glob("inception_v3_google-*.pth")) if hub.exists() else []
    return hits[0] if hits else None


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 pool features (2048-d) at 299x299: plug into ``features``-style use for FID.
    Raises FileNotFoundError with download instructions when the weights are not on disk."""

    def __init__(self, weights: Path | None = None):
        super().__init__()
        from torchvision.models import inception_v3

        weights = weights or inception_weights()
        if weights is None:
            raise FileNotFoundError(INCEPTION_HELP)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        net.fc = nn.Identity()
        self.net = net.eval()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
        return self.net((x - mean) / std)
