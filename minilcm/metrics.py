"""Distances between sample sets.

2-D: the sliced Wasserstein-2 distance (Rabin et al. 2011; Bonneel et al. 2015) and an RBF-kernel MMD
(Gretton et al. 2012). Both are 0 for identical distributions; for two independent sets of n samples
from the *same* distribution they sit at a noise floor that shrinks like 1/sqrt(n), so compare against
that floor (``noise_floor``) rather than against 0.
"""
from __future__ import annotations

import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 512, seed: int = 0) -> float:
    """Sliced W2: sqrt of the mean over random unit directions of the 1-D W2^2 between projections.

    a: (n, d), b: (m, d). With n != m the sorted projections are compared at matching quantiles.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected two (n, d) point sets with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a.detach().cpu().double() @ dirs).sort(0).values
    pb = (b.detach().cpu().double() @ dirs).sort(0).values
    if pa.shape[0] != pb.shape[0]:
        q = torch.linspace(0, 1, max(pa.shape[0], pb.shape[0]), dtype=torch.float64)
        pa, pb = (torch.quantile(p, q, dim=0) for p in (pa, pb))
    return ((pa - pb) ** 2).mean().sqrt().item()


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Unbiased squared MMD with a sum of RBF kernels exp(-|x-y|^2 / (2 h^2))."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()

    def k(x, y):
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(a), len(b)
    kaa, kbb = k(a, a), k(b, b)
    return ((kaa.sum() - kaa.diag().sum()) / (n * (n - 1)) + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1))
            - 2 * k(a, b).mean()).item()


def noise_floor(sampler, n: int, metric=sliced_wasserstein, seed: int = 123) -> float:
    """The metric between two independent draws of n points from ``sampler(n, generator)``."""
    g = torch.Generator().manual_seed(seed)
    a, b = sampler(n, g), sampler(n, g)
    a, b = (x[0] if isinstance(x, (tuple, list)) else x for x in (a, b))
    return metric(a, b)
