"""Distances between sample sets.

2-D: the sliced Wasserstein-2 distance (Rabin et al. 2011; Bonneel et al. 2015). It is 0 for identical
distributions; for two independent sets of n samples
from the *same* distribution they sit at a noise floor that shrinks like 1/sqrt(n), so compare against
that floor (``noise_floor``) rather than against 0.
"""
from __future__ import annotations

import numpy as np
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


def noise_floor(sampler, n: int, metric=sliced_wasserstein, seed: int = 123) -> float:
    """The metric between two independent draws of n points from ``sampler(n, generator)``."""
    g = torch.Generator().manual_seed(seed)
    a, b = sampler(n, g), sampler(n, g)
    a, b = (x[0] if isinstance(x, (tuple, list)) else x for x in (a, b))
    return metric(a, b)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, Sigma1) and N(mu2, Sigma2) (Dowson & Landau 1982; FID, Heusel et al.
    2017, Eq. 6):

        d^2 = |mu1 - mu2|^2 + tr(Sigma1 + Sigma2 - 2 (Sigma1^1/2 Sigma2 Sigma1^1/2)^1/2)

    The trace of the matrix square root is computed from the eigenvalues of the symmetric PSD matrix
    Sigma1^1/2 Sigma2 Sigma1^1/2, which is stabler than scipy's sqrtm of the non-symmetric Sigma1 Sigma2.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, Sigma {s1.shape} vs {s2.shape}")
    ev, V = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (V * np.sqrt(ev.clip(min=0))) @ V.T  # Sigma1^1/2
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum()
    d2 = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    return float(max(d2, 0.0))


def power_law_order(nfe, err) -> float:
    """The empirical order p in err ~ C NFE^-p: minus the least-squares slope of log err against log NFE."""
    x, y = np.log(np.asarray(nfe, np.float64)), np.log(np.asarray(err, np.float64))
    if x.size < 2:
        raise ValueError("need at least two (nfe, err) points to fit a slope")
    xc = x - x.mean()
    return float(-(xc * (y - y.mean())).sum() / (xc * xc).sum())
