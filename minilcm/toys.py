"""2-D toys with exact densities and scores: the Gaussian mixture every formula is tested against, and two shapes.

    GaussianMixture(means, covs, weights)   q(x_t) in closed form: sample, log_prob, score, eps_star (its exact eps),
                                            class_posterior / misassigned_mass (how sharp a class's samples are)
    OracleEps(mixture, schedule)            the exact eps-model of a mixture (the one call convention)
    two_moons(n), swiss_roll(n)             (x, label) point clouds
"""
from __future__ import annotations

import math

import torch

from .schedules import Schedule, broadcast



class GaussianMixture:
    """A class-labelled mixture of 2-D Gaussians: p_0(x) = sum_k pi_k N(x; mu_k, C_k).

    Its noised marginal under the VP forward process is again a mixture, in closed form:

        p_t(x) = sum_k pi_k N(x; alpha_t mu_k, alpha_t^2 C_k + sigma_t^2 I)

    so ``log_prob(x, t)``, ``score(x, t)`` and the oracle ``eps(x, t) = -sigma_t score`` are exact at every t.
    Conditioning on a class keeps only that class's components (renormalised). Later chapters use it
    as an oracle teacher that separates solver error from learning error.

    Default: 8 components on a ring of radius 1.5 (std 0.2); class c owns components 2c and 2c+1,
    so there are 4 classes, each a pair of neighbouring blobs.
    """

    def __init__(self, means=None, covs=None, weights=None, classes=None):
        if means is None:
            ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8) + math.pi / 8
            means = 1.5 * torch.stack([ang.cos(), ang.sin()], dim=1)
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, 2)
        K, d = self.means.shape
        self.covs = (torch.as_tensor(covs, dtype=torch.float64) if covs is not None
                     else 0.2 ** 2 * torch.eye(d, dtype=torch.float64).expand(K, d, d).clone())  # (K, d, d)
        self.weights = (torch.as_tensor(weights, dtype=torch.float64) if weights is not None
                        else torch.full((K,), 1.0 / K, dtype=torch.float64))
        self.weights = self.weights / self.weights.sum()
        self.classes = (torch.as_tensor(classes, dtype=torch.long) if classes is not None
                        else torch.arange(K) // 2)
        self.num_classes = int(self.classes.max()) + 1
        self.dim = d

    # -- sampling ---------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, class_label: int | None = None):
        """Draw n points; returns (x float32 (n, 2), labels long (n,))."""
        w = self.weights.clone()
        if class_label is not None:
            w = w * (self.classes == class_label)
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        L = torch.linalg.cholesky(self.covs)[comp]  # (n, d, d)
        z = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        x = self.means[comp] + (L @ z).squeeze(-1)
        return x.float(), self.classes[comp]

    def __call__(self, n: int, generator=None):
        """Batch source for ``minilcm.train``: (x, labels)."""
        return self.sample(n, generator)

    # -- exact densities and scores ---------------------------------------------------------
    def _marginal(self, t, schedule, x):
        """Means (B?, K, d) and covariances (B?, K, d, d) of p_t's components."""
        if t is None:
            return self.means, self.covs
        a2 = schedule.alpha_bar(t).double().to(x.device)
        a2 = a2.reshape(-1, 1, 1, 1) if a2.ndim else a2
        eye = torch.eye(self.dim, dtype=torch.float64, device=x.device)
        means = a2.sqrt().squeeze(-1) * self.means if a2.ndim else a2.sqrt() * self.means
        return means, a2 * self.covs + (1 - a2) * eye

    def _component_logp(self, x, t=None, schedule=None, class_labels=None):
        x = x.double()
        if t is not None:
            t = torch.as_tensor(t, dtype=torch.float64)
            if t.ndim and bool((t == t.flatten()[0]).all()):
                t = t.flatten()[0]  # one time for the whole batch: invert K covariances, not B*K
        means, covs = self._marginal(t, schedule, x)
        diff = x[:, None, :] - means  # (B, K, d)
        prec = torch.linalg.inv(covs).expand(x.shape[0], *covs.shape[-3:])  # (B, K, d, d), a view if shared
        maha = torch.einsum("bki,bkij,bkj->bk", diff, prec, diff)
        logdet = torch.logdet(covs).expand(x.shape[0], covs.shape[-3])  # (B, K)
        logw = self.weights.log().to(x.device)
        if class_labels is not None:
            keep = self.classes.to(x.device)[None, :] == torch.as_tensor(class_labels, device=x.device).reshape(-1, 1)
            wsum = torch.stack([self.weights[self.classes == c].sum() for c in range(self.num_classes)]).to(x.device)
            logw = torch.where(keep, logw - wsum.log()[torch.as_tensor(class_labels, device=x.device).reshape(-1)][:, None],
                               torch.tensor(-math.inf, dtype=torch.float64, device=x.device))
        comp = logw - 0.5 * (maha + logdet + self.dim * math.log(2 * math.pi))  # (B, K)
        return comp, diff, prec

    def log_prob(self, x, t=None, schedule: Schedule | None = None, class_labels=None) -> torch.Tensor:
        """Exact log p_t(x) (t=None: the data density p_0), optionally conditioned on a class. float64."""
        comp, _, _ = self._component_logp(x, t, schedule, class_labels)
        return torch.logsumexp(comp, dim=1)

    def score(self, x, t=None, schedule: Schedule | None = None, class_labels=None) -> torch.Tensor:
        """Exact grad_x log p_t(x) = sum_k r_k(x) (-(alpha^2 C_k + sigma^2 I)^-1 (x - alpha mu_k)). float64."""
        comp, diff, prec = self._component_logp(x, t, schedule, class_labels)
        r = torch.softmax(comp, dim=1)  # responsibilities (B, K)
        per_comp = -torch.einsum("bkij,bkj->bki", prec, diff)
        return (r[..., None] * per_comp).sum(1)

    def class_posterior(self, x) -> torch.Tensor:
        """Exact p(c | x) under the data density p_0, (B, num_classes) float64: the components' responsibilities
        (Bayes, pi_k N(x; mu_k, C_k) / p(x)) summed over each class's components."""
        comp, _, _ = self._component_logp(x)
        r = torch.softmax(comp, dim=1)  # (B, K)
        return r.new_zeros(x.shape[0], self.num_classes).index_add_(1, self.classes.to(r.device), r)

    def misassigned_mass(self, x, labels) -> float:
        """Class sharpness, measured exactly: 1 - E[p(c | x)], the mass the data's class posterior puts on classes
        other than the requested c of each sample (0: every sample unmistakably its class; lower = sharper)."""
        post = self.class_posterior(x)
        return 1 - post[torch.arange(len(labels)), torch.as_tensor(labels).long()].mean().item()

    def mean_cov(self):
        """Exact mean and covariance of p_0."""
        m = (self.weights[:, None] * self.means).sum(0)
        d = self.means - m
        cov = (self.weights[:, None, None] * (self.covs + d[:, :, None] * d[:, None, :])).sum(0)
        return m, cov


class OracleEps(torch.nn.Module):
    """The exact eps-model of a GaussianMixture: eps(x, t) = -sigma_t * score_t(x) (the package call convention, minilcm.diffusion).

    ``class_labels`` equal to ``null_class`` (default: the mixture's num_classes) mean 'unconditional',
    exactly as for a model trained with label dropout.
    """

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule
        self.null_class = mixture.num_classes

    def forward(self, x, t, class_labels=None):
        t = t.detach().double().cpu()
        if class_labels is None or torch.all(class_labels == self.null_class):
            s = self.mixture.score(x, t, self.schedule)
        else:
            labels = torch.as_tensor(class_labels)
            s_u = self.mixture.score(x, t, self.schedule)
            s_c = self.mixture.score(x, t, self.schedule, class_labels=labels.clamp(max=self.null_class - 1))
            s = torch.where((labels == self.null_class).reshape(-1, 1).to(x.device), s_u, s_c)
        return (-broadcast(self.schedule.sigma(t), s.double()) * s).to(x.dtype)


def two_moons(n: int, generator: torch.Generator | None = None, noise: float = 0.08):
    """Two interleaving half-circles, centred and scaled to about unit variance; labels 0/1."""
    y = torch.randint(0, 2, (n,), generator=generator)
    th = torch.rand(n, generator=generator) * math.pi
    x = torch.stack([th.cos(), th.sin()], 1)
    x = torch.where(y[:, None] == 0, x, torch.stack([1 - th.cos(), 0.5 - th.sin()], 1))
    x = x + noise * torch.randn(n, 2, generator=generator)
    return ((x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])).float(), y


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.3):
    """The 2-D swiss roll spiral, scaled to about unit variance; labels: 0 inner half, 1 outer half."""
    u = torch.rand(n, generator=generator)
    th = 1.5 * math.pi * (1 + 2 * u)
    x = torch.stack([th * th.cos(), th * th.sin()], 1) + noise * torch.randn(n, 2, generator=generator)
    return (x / 7.5).float(), (u > 0.5).long()
