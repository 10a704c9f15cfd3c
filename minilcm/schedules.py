"""Variance-preserving (VP) noise schedules.

    x_t = alpha_t * x_0 + sigma_t * eps,   alpha_t = sqrt(alpha_bar_t),  sigma_t = sqrt(1 - alpha_bar_t)

Time ``t`` is the diffusers-style timestep: the integers 0..T-1 index the discrete schedule of
DDPM (Ho et al. 2020, Eq. 4) exactly as ``diffusers.DDPMScheduler.alphas_cumprod`` does, and a float
``t`` between two integers is *continuous* time. In between, ``log alpha_bar`` is a natural cubic
spline through the discrete values, so the schedule is exact at every integer and twice
continuously differentiable everywhere: the VP-SDE rate ``beta(t) = -d log alpha_bar / dt`` exists and
ODE solvers see smooth coefficients (their convergence orders are measurable).

The half log-SNR follows DPM-Solver (Lu et al. 2022, Sec. 3.1):  lambda_t = log(alpha_t / sigma_t).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("linear", "scaled_linear", "cosine")


def make_betas(kind: str = "linear", T: int = 1000, beta_start: float | None = None,
               beta_end: float | None = None) -> torch.Tensor:
    """Per-step betas, float32, built the way diffusers builds them (so alphas_cumprod match bit for bit).

    linear        DDPM (Ho et al. 2020): 1e-4 .. 0.02
    scaled_linear Stable Diffusion: sqrt-linear from 0.00085 to 0.012
    cosine        Nichol & Dhariwal 2021, Eq. 17 (s = 0.008, betas capped at 0.999)
    """
    if kind == "linear":
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(b0, b1, T, dtype=torch.float32)
    if kind == "scaled_linear":
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float32) ** 2
    if kind == "cosine":
        f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)],
                            dtype=torch.float32)
    raise ValueError(f"unknown schedule kind {kind!r}; choose one of {KINDS}")


def _natural_cubic_spline(y: torch.Tensor) -> torch.Tensor:
    """Second derivatives M_i of the natural cubic spline through (i, y_i), i = 0..n-1.

    Unit knot spacing gives M_{i-1} + 4 M_i + M_{i+1} = 6 (y_{i+1} - 2 y_i + y_{i-1}), M_0 = M_{n-1} = 0,
    solved by the Thomas algorithm (plain floats: a 1000-knot spline takes about a millisecond).
    """
    v = y.tolist()
    n = len(v)
    rhs = [6 * (v[i + 1] - 2 * v[i] + v[i - 1]) for i in range(1, n - 1)]
    c, d = [0.25], [rhs[0] / 4]
    for i in range(1, n - 2):
        m = 4 - c[-1]
        c.append(1 / m)
        d.append((rhs[i] - d[-1]) / m)
    M = [0.0] * n
    for i in range(n - 3, -1, -1):
        M[i + 1] = d[i] - c[i] * M[i + 2]
    return torch.tensor(M, dtype=y.dtype)


@dataclass
class Schedule:
    """A VP schedule over T discrete steps, with a C^2 continuous-time extension.

    >>> s = Schedule("linear"); s.alphas_cumprod.shape
    torch.Size([1000])
    """

    kind: str = "linear"
    T: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    betas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.betas = make_betas(self.kind, self.T, self.beta_start, self.beta_end)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # float32, as diffusers
        self._log_ab = self.alphas_cumprod.double().log()  # knots of the spline
        self._M = _natural_cubic_spline(self._log_ab)

    # ---- continuous time ---------------------------------------------------------------------
    def _check(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if torch.any(t < 0) or torch.any(t > self.T - 1):
            raise ValueError(f"timestep out of range [0, {self.T - 1}]: got min {t.min().item():.4g}, "
                             f"max {t.max().item():.4g}")
        return t

    def log_alpha_bar(self, t) -> torch.Tensor:
        """log alpha_bar(t): table value at integer t, cubic-spline value in between (float64)."""
        t = self._check(t)
        i = t.floor().clamp(max=self.T - 2).long()
        a = t - i  # position inside [i, i+1]
        y0, y1, M0, M1 = self._log_ab[i], self._log_ab[i + 1], self._M[i], self._M[i + 1]
        return (1 - a) * y0 + a * y1 + ((1 - a) ** 3 - (1 - a)) * M0 / 6 + (a ** 3 - a) * M1 / 6

    def beta(self, t) -> torch.Tensor:
        """Continuous VP-SDE rate beta(t) = -d log alpha_bar / dt (Song et al. 2021, Eq. 11), per unit of t."""
        t = self._check(t)
        i = t.floor().clamp(max=self.T - 2).long()
        a = t - i
        y0, y1, M0, M1 = self._log_ab[i], self._log_ab[i + 1], self._M[i], self._M[i + 1]
        dlog = (y1 - y0) + (-3 * (1 - a) ** 2 + 1) * M0 / 6 + (3 * a ** 2 - 1) * M1 / 6
        return -dlog

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar(t); exactly ``alphas_cumprod[t]`` (as float64) at integer t."""
        t = torch.as_tensor(t)
        if not t.is_floating_point() or torch.all(t == t.round()):
            idx = self._check(t).long()
            return self.alphas_cumprod.double()[idx]
        return self.log_alpha_bar(t).exp()

    def alpha(self, t) -> torch.Tensor:
        """Signal scale alpha_t = sqrt(alpha_bar_t)."""
        return self.alpha_bar(t).sqrt()

    def sigma(self, t) -> torch.Tensor:
        """Noise scale sigma_t = sqrt(1 - alpha_bar_t)."""
        return (1 - self.alpha_bar(t)).sqrt()

    def snr(self, t) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t^2 / sigma_t^2."""
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def lam(self, t) -> torch.Tensor:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) (DPM-Solver, Lu et al. 2022, Sec. 3.1)."""
        ab = self.alpha_bar(t)
        return 0.5 * (ab.log() - torch.log1p(-ab))

    def t_of_lam(self, lam, iters: int = 60) -> torch.Tensor:
        """Inverse of ``lam``: the continuous t with lambda_t = lam (bisection; lambda is decreasing in t)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo_l, hi_l = self.lam(torch.tensor(float(self.T - 1))), self.lam(torch.tensor(0.0))
        if torch.any(lam < lo_l - 1e-9) or torch.any(lam > hi_l + 1e-9):
            raise ValueError(f"lambda outside the schedule's range [{lo_l:.4f}, {hi_l:.4f}]")
        lo = torch.zeros_like(lam)
        hi = torch.full_like(lam, float(self.T - 1))
        for _ in range(iters):
            mid = (lo + hi) / 2
            go_right = self.lam_continuous(mid) > lam  # lambda still too large -> move to larger t
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        return (lo + hi) / 2

    def lam_continuous(self, t) -> torch.Tensor:
        """lambda_t from the spline, even at integer t (equal to ``lam`` there up to float64 rounding)."""
        la = self.log_alpha_bar(t)
        return 0.5 * (la - torch.log(-torch.expm1(la)))

    # ---- timesteps for samplers ----------------------------------------------------------------
    def timesteps(self, n: int, spacing: str = "leading", t_max: float | None = None,
                  t_min: float = 0.0) -> torch.Tensor:
        """``n`` decreasing timesteps for a sampler (float64).

        leading   diffusers' default: 0, T/n, 2T/n, ...   reversed  (integers)
        trailing  diffusers' "trailing": T-1, T-1-T/n, ... (integers; starts at the noisiest step)
        linspace  evenly spaced in continuous time from t_max (default T-1) to t_min (default 0), both included
        lambda    evenly spaced in log-SNR lambda from t_max to t_min (continuous t)

        The integer grids have at most T entries; the continuous ones take any n (e.g. fine reference grids).
        """
        T = self.T
        n = whole_number(n, "the number of steps")
        if spacing in ("leading", "trailing"):
            if t_max is not None or t_min != 0.0:
                raise ValueError(f"{spacing} is diffusers' integer grid over the whole schedule: t_max and t_min "
                                 "apply to the linspace and lambda spacings only")
            if n < 1 or n > T:
                raise ValueError(f"number of steps must be in 1..{T}, got {n}")
            if spacing == "leading":
                return (torch.arange(0, n) * (T // n)).flip(0).double()
            # numpy, exactly as diffusers computes it: a float32 (or torch) arange rounds some k*T/n that
            # land on .5 the other way (e.g. n = 48 gave 937 where diffusers has 936)
            return torch.from_numpy(np.round(np.arange(T, 0, -T / n))).double() - 1
        if spacing not in ("linspace", "lambda"):
            raise ValueError(f"unknown spacing {spacing!r}; choose leading, trailing, linspace or lambda")
        t_max = float(T - 1) if t_max is None else float(t_max)
        if n < 1 or not 0 <= t_min < t_max <= T - 1:
            raise ValueError(f"need n >= 1 and 0 <= t_min < t_max <= {T - 1}; got n={n}, t_min={t_min}, t_max={t_max}")
        if spacing == "linspace":
            return torch.linspace(t_max, t_min, n, dtype=torch.float64)
        lam = self.lam_continuous(torch.tensor([t_max, t_min], dtype=torch.float64))
        ts = self.t_of_lam(torch.linspace(lam[0].item(), lam[1].item(), n, dtype=torch.float64))
        ts[0], ts[-1] = t_max, t_min  # exact ends (the bisection is accurate to ~1e-13)
        return ts


def whole_number(n, what: str = "n") -> int:
    """``n`` as an int when it is a whole number (3, 3.0, np.int64(3)); a clear ValueError for 2.5, nan or True."""
    if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) or not math.isfinite(n) \
            or int(n) != n:
        raise ValueError(f"{what} must be a whole number, got {n!r}")
    return int(n)


def broadcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample (B,) or scalar coefficient to multiply x of shape (B, ...), in x's dtype."""
    coef = torch.as_tensor(coef).to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(-1, *([1] * (x.ndim - 1)))
