"""Chapter 3 (fast solvers) and Chapter 4 (consistency models): the DDIM step, lambda, the uniform-lambda grid,
a DPM-Solver-2 step, the DPM-Solver++(2M) update; the CM scalings, Karras' grid, the iCT curriculum and weight,
the pseudo-Huber distance."""
from __future__ import annotations

import math

import torch

from ...consistency import pseudo_huber
from ...diffusion import alpha_bar_at, model_eps, q_sample
from ...ict import ict_discretisation, ict_weight
from ...schedules import Schedule
from ...solvers import _dpm_solver_2, alpha_sigma_lam, ddim_step, spaced_timesteps
from ..core import Case, Exercise, Mistake, register

LIN = Schedule("linear")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _xe(seed, n=2048, d=2):
    g = _g(seed)
    return torch.randn(n, d, generator=g) + 1.0, torch.randn(n, d, generator=g)


# ---- Chapter 3 ----------------------------------------------------------------------------------------
def _ddim_cases():
    x0, eps = _xe(10)
    out = []
    for t, s in ((999.0, 500.0), (500.0, 499.0), (50.0, -1.0)):
        out.append(Case(f"t = {t:g} -> s = {s:g}" + (" (clean data)" if s < 0 else ""),
                        (LIN, q_sample(LIN, x0, torch.tensor(t), eps), t, s, eps)))
    return out


def _ddim_wrong(sc, x, t, s, eps, a=lambda ab: ab.sqrt(), noise=True):
    x0 = (x - (1 - alpha_bar_at(sc, t)).sqrt() * eps) / a(alpha_bar_at(sc, t))
    return (a(alpha_bar_at(sc, s)) * x0 + ((1 - alpha_bar_at(sc, s)).sqrt() * eps if noise else 0)).to(x)


register(Exercise(
    "ddim_step", 3, "One deterministic DDIM step", 1,
    "x0 = (x_t - sigma_t eps) / alpha_t, then x_s = alpha_s x0 + sigma_s eps: the same eps re-noises x0 at s "
    "(Song et al. 2021, Eq. 12 with eta = 0). s = -1 is clean data (alpha = 1, sigma = 0).",
    lambda sc, x, t, s, eps: ddim_step(sc, x, t, s, eps), _ddim_cases, [
        Mistake(lambda sc, x, t, s, e: _ddim_wrong(sc, x, t, s, e, a=lambda ab: ab),
                "your x_s has mean {got_mean:.3g}, expected {want_mean:.3g}: alpha_t is sqrt(alpha_bar_t), not "
                "alpha_bar_t."),
        Mistake(lambda sc, x, t, s, e: _ddim_wrong(sc, x, t, s, e, noise=False),
                "your x_s has std {got_std:.3g}, expected {want_std:.3g}: you returned alpha_s x0; DDIM puts the "
                "predicted noise back, + sigma_s eps."),
        Mistake(lambda sc, x, t, s, e: _ddim_wrong(sc, x, s, t, e) if s >= 0 else None,
                "your step runs from s to t: t is where x is now, s where it goes.")]))


def _lam_cases():
    return [Case("t = 0, 500, 999", (LIN, torch.tensor([0.0, 500.0, 999.0], dtype=torch.float64))),
            Case("t = 250.5 (between timesteps)", (LIN, torch.tensor([250.5], dtype=torch.float64)))]


register(Exercise(
    "half_log_snr", 3, "DPM-Solver's lambda_t", 1,
    "lambda_t = log(alpha_t / sigma_t), half the log signal-to-noise ratio; it falls as t grows.",
    lambda sc, t: sc.lam(t), _lam_cases, [
        Mistake(lambda sc, t: 2 * sc.lam(t),
                "your lambda is twice the expected one: that is log SNR = log(alpha^2 / sigma^2); lambda is half of it."),
        Mistake(lambda sc, t: -sc.lam(t),
                "your lambda has the wrong sign: log(alpha_t / sigma_t) is large near the data (t = 0).")]))


def _grid_cases():
    return [Case("n = 6 over [0, 999]", (LIN, 6)), Case("n = 11 over [0, 999]", (LIN, 11))]


def _grid_ref(sc, n):
    return spaced_timesteps(sc, n, "lambda")


register(Exercise(
    "lambda_grid", 3, "A solver grid uniform in lambda", 2,
    "n times from T-1 down to 0, evenly spaced in lambda: take lambda at both ends, torch.linspace between, and map "
    "back with schedule.t_of_lam. A sampling grid decreases.",
    _grid_ref, _grid_cases, [
        Mistake(lambda sc, n: _grid_ref(sc, n).flip(0),
                "your grid increases; a sampling grid runs from the noise (T-1) to the data (0)."),
        Mistake(lambda sc, n: torch.linspace(999.0, 0.0, n, dtype=torch.float64),
                "your grid is uniform in t, not in lambda: its middle is t = {got}, expected {want}."),
        Mistake(lambda sc, n: _grid_ref(sc, n + 1),
                "your grid has one time too many: n times, both ends included.")], rtol=1e-6, atol=1e-4))


class _Curved(torch.nn.Module):
    def forward(self, x, t, **_):
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1) / 1000
        return (0.5 * x * tt + 0.2 * torch.sin(3 * x) * (1 - tt)).to(x)


def _dpm2_ref(model, x, sc, t, s):
    eps_fn = lambda x_, t_: model_eps(model, x_, t_)  # noqa: E731
    return _dpm_solver_2(eps_fn, sc, x, t, s, eps_fn(x, t))


def _dpm2_cases():
    x, _ = _xe(11)
    m = _Curved()
    return [Case(f"t = {t:g} -> s = {s:g}", (m, x, LIN, t, s)) for t, s in ((999.0, 600.0), (400.0, 100.0))]


def _dpm2_t_midpoint(model, x, sc, t, s):
    """DPM-Solver-2 with its midpoint halfway in t instead of in lambda (a usual slip)."""
    a_t, _, l_t = alpha_sigma_lam(sc, t)
    a_s, sg_s, l_s = alpha_sigma_lam(sc, s)
    m = (t + s) / 2
    a_m, sg_m, l_m = alpha_sigma_lam(sc, m)
    u = (a_m / a_t) * x - sg_m * math.expm1(l_m - l_t) * model_eps(model, x, t)
    return (a_s / a_t) * x - sg_s * math.expm1(l_s - l_t) * model_eps(model, u, m)


register(Exercise(
    "dpm_solver_2_step", 3, "One DPM-Solver-2 step", 3,
    "Lu et al. 2022, Algorithm 1 (r1 = 1/2): h = lambda_s - lambda_t; the midpoint m has lambda_m = lambda_t + h/2; "
    "u = (alpha_m / alpha_t) x - sigma_m (e^{h/2} - 1) eps(x, t); x_s = (alpha_s / alpha_t) x - sigma_s (e^h - 1) "
    "eps(u, m). Use minilcm.solvers.alpha_sigma_lam and schedule.t_of_lam.",
    _dpm2_ref, _dpm2_cases, [
        Mistake(_dpm2_t_midpoint,
                "your midpoint is halfway in t; DPM-Solver-2 takes it halfway in lambda (lambda_t + h / 2, mapped back "
                "with schedule.t_of_lam)."),
        Mistake(lambda model, x, sc, t, s: ddim_step(sc, x, t, s, model_eps(model, x, t)),
                "your step is first order (DDIM / DPM-Solver-1): the final update uses the midpoint's eps(u, m).")],
    rtol=1e-4, atol=1e-4))


def dpm_pp_update_ref(sc, x, t_prev, t_cur, t_next, x0_prev, x0_cur, _sign=-1.0):
    """DPM-Solver++(2M), Lu et al. 2022b, Algorithm 2: the step t_cur -> t_next from the last two data predictions.
    (``_sign=+1`` is the usual slip, e^{h} - 1 for e^{-h} - 1.)"""
    _, sg_c, l_c = alpha_sigma_lam(sc, t_cur)
    a_n, sg_n, l_n = alpha_sigma_lam(sc, t_next)
    l_p = alpha_sigma_lam(sc, t_prev)[2]
    h, r = l_n - l_c, (l_c - l_p) / (l_n - l_c)
    D = (1 + 1 / (2 * r)) * x0_cur - 1 / (2 * r) * x0_prev
    return (sg_n / sg_c) * x - a_n * math.expm1(_sign * h) * D


def _pp_cases():
    x0a, eps = _xe(12)
    x0b = x0a + 0.1 * eps
    out = []
    for tp, tc, tn in ((999.0, 700.0, 400.0), (400.0, 200.0, 50.0)):
        out.append(Case(f"t = {tp:g}, {tc:g} -> {tn:g}", (LIN, q_sample(LIN, x0b, torch.tensor(tc), eps), tp, tc, tn,
                                                           x0a, x0b)))
    return out


register(Exercise(
    "dpm_solver_pp_update", 3, "The DPM-Solver++(2M) update", 3,
    "h = lambda_next - lambda_cur, r = (lambda_cur - lambda_prev) / h, D = (1 + 1/(2r)) x0_cur - 1/(2r) x0_prev, "
    "x_next = (sigma_next / sigma_cur) x - alpha_next (e^{-h} - 1) D.",
    dpm_pp_update_ref, _pp_cases, [
        Mistake(lambda sc, x, tp, tc, tn, a, b: dpm_pp_update_ref(sc, x, tp, tc, tn, b, b),
                "your update is first order (DPM-Solver++(1), i.e. DDIM): D extrapolates the two data predictions."),
        Mistake(lambda sc, x, tp, tc, tn, a, b: dpm_pp_update_ref(sc, x, tp, tc, tn, b, a),
                "your D extrapolates the wrong way: x0_cur (the newer) gets 1 + 1/(2r), x0_prev -1/(2r)."),
        Mistake(lambda sc, x, tp, tc, tn, a, b: dpm_pp_update_ref(sc, x, tp, tc, tn, a, b, _sign=1.0),
                "the data-prediction form uses e^{-h} - 1: you wrote e^{h} - 1 (the noise-prediction form's).")]))


# ---- Chapter 4 ----------------------------------------------------------------------------------------
def cm_scalings_ref(s, s_min, sigma_d):
    ds = s - s_min
    return sigma_d ** 2 / (ds ** 2 + sigma_d ** 2), sigma_d * ds / (sigma_d ** 2 + s ** 2).sqrt()


def _scal_cases():
    s = torch.tensor([0.002, 0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    return [Case("s = 0.002 (= s_min), 0.01, 0.5, 3, 80; sigma_d = 0.5", (s, 0.002, 0.5)),
            Case("the same s with sigma_d = 1.08", (s, 0.002, 1.08))]


register(Exercise(
    "cm_scalings", 4, "The consistency model's c_skip and c_out", 2,
    "Song et al. 2023, App. C, in the EDM noise level s: c_skip = sigma_d^2 / ((s - s_min)^2 + sigma_d^2), "
    "c_out = sigma_d (s - s_min) / sqrt(sigma_d^2 + s^2). At s = s_min: c_skip = 1, c_out = 0 (the boundary).",
    cm_scalings_ref, _scal_cases, [
        Mistake(lambda s, m, d: (d ** 2 / (s ** 2 + d ** 2), d * s / (d ** 2 + s ** 2).sqrt()),
                "your scalings are EDM's denoiser scalings, without s_min: at s = s_min c_skip must be exactly 1 and "
                "c_out 0 (the boundary condition f(x, t_min) = x)."),
        Mistake(lambda s, m, d: (d ** 2 / ((s - m) ** 2 + d ** 2), d * (s - m) / (d ** 2 + s ** 2)),
                "your c_out has no square root in its denominator: sigma_d (s - s_min) / sqrt(sigma_d^2 + s^2).")]))


def karras_ref(s_min, s_max, N, rho=7.0):
    i = torch.arange(N + 1, dtype=torch.float64) / N
    return (s_min ** (1 / rho) + i * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho


def _karras_cases():
    return [Case("s_min = 0.002, s_max = 80, N = 18", (0.002, 80.0, 18)),
            Case("s_min = 0.01, s_max = 157, N = 4, rho = 3", (0.01, 157.0, 4), {"rho": 3.0})]


register(Exercise(
    "karras_levels", 4, "Karras et al.'s grid of noise levels", 1,
    "N + 1 increasing levels s_i = (s_min^(1/rho) + i/N (s_max^(1/rho) - s_min^(1/rho)))^rho, i = 0 .. N "
    "(Karras et al. 2022, Eq. 5; CD's grid t_0 < ... < t_N).",
    karras_ref, _karras_cases, [
        Mistake(lambda a, b, N, rho=7.0: karras_ref(a, b, N, rho).flip(0),
                "your grid decreases; CD indexes it increasing, t_0 = t_min < ... < t_N = T-1."),
        Mistake(lambda a, b, N, rho=7.0: karras_ref(a, b, N - 1, rho),
                "your grid has N points; N intervals need N + 1 (i = 0 .. N)."),
        Mistake(lambda a, b, N, rho=7.0: karras_ref(a, b, N, 1 / rho),
                "your levels are bunched at the wrong end: the exponent inside is 1/rho and the power outside rho.")],
    rtol=1e-6, atol=1e-9))


def _ict_cases():
    return [Case(f"k = {k}, K = {K}" + (f", s1 = {s1}" if s1 != 1280 else ""), (k, K), {"s1": s1})
            for k, K, s1 in ((0, 1000, 1280), (150, 1000, 1280), (999, 1000, 1280), (999, 1000, 320), (600, 800, 80))]


def _ict_wrong(k, K, s0=10, s1=1280, plus_one=True, cap=True):
    Kp = max(1, math.floor(K / (math.log2(math.floor(s1 / s0)) + (1 if plus_one else 0))))
    n = s0 * 2 ** (k // Kp)
    return min(n, s1) if cap else n


register(Exercise(
    "ict_curriculum", 4, "iCT's discretisation curriculum", 2,
    "Song & Dhariwal 2023, Eq. 8: K' = floor(K / (log2 floor(s1 / s0) + 1)), intervals N(k) = min(s0 2^floor(k / K'), "
    "s1) (the grid then has N(k) + 1 points). Return the number of intervals, an int.",
    lambda k, K, s0=10, s1=1280: ict_discretisation(k, K, s0, s1), _ict_cases, [
        Mistake(lambda k, K, s0=10, s1=1280: _ict_wrong(k, K, s0, s1, cap=False),
                "your N(k) = {got} passes s1: the curriculum stops doubling at s1 (the min)."),
        Mistake(lambda k, K, s0=10, s1=1280: _ict_wrong(k, K, s0, s1, plus_one=False),
                "your N(k) = {got}, expected {want}: K' divides K by log2(s1 / s0) + 1 stages, so the last doubling "
                "gets its own share of the steps."),
        Mistake(lambda k, K, s0=10, s1=1280: ict_discretisation(k, K, s0, s1) + 1,
                "your N(k) = {got}, expected {want}: return the number of intervals; the points are one more.")],
    rtol=0, atol=0))


def _ictw_cases():
    s = torch.tensor([0.002, 0.01, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    return [Case("a Karras-like grid of 6 levels", (s[:-1], s[1:]))]


register(Exercise(
    "ict_weight", 4, "iCT's loss weight", 1,
    "lambda(s_n) = 1 / (s_{n+1} - s_n) (iCT, Sec. 3.1): large on the small-noise intervals.",
    ict_weight, _ictw_cases, [
        Mistake(lambda a, b: 1 / (a - b), "your weights are negative: s_{n+1} > s_n, so divide by s_{n+1} - s_n."),
        Mistake(lambda a, b: b - a, "your weights grow with the noise; iCT's is the inverse, 1 / (s_{n+1} - s_n)."),
    ]))


def _ph_cases():
    g = _g(13)
    a = torch.randn(16, 3, 8, 8, generator=g)
    b = a + 0.01 * torch.randn(16, 3, 8, 8, generator=g)
    return [Case("a batch of 16 images of 3x8x8, b close to a", (a, b)),
            Case("the same, far apart", (a, torch.randn(16, 3, 8, 8, generator=g))),
            Case("c = 0.1 given", (a, b), {"c": 0.1})]


register(Exercise(
    "pseudo_huber", 4, "The pseudo-Huber distance", 1,
    "iCT, Sec. 3.3, per sample: d(a, b) = sqrt(||a - b||^2 + c^2) - c over all of a sample's dimensions, with "
    "c = 0.00054 sqrt(d) by default (d = numbers per sample). Return shape (B,).",
    pseudo_huber, _ph_cases, [
        Mistake(lambda a, b, c=None: pseudo_huber(a, b, c) + (0.00054 * math.sqrt(a[0].numel()) if c is None else c),
                "your distance is c too large: subtract c, so that d(a, a) = 0."),
        Mistake(lambda a, b, c=None: ((a - b) ** 2).flatten(1).sum(1),
                "your distance is the squared L2; pseudo-Huber is sqrt(||a - b||^2 + c^2) - c."),
        Mistake(lambda a, b, c=None: (((a - b) ** 2 + (0.00054 * math.sqrt(a[0].numel()) if c is None else c) ** 2)
                                      .sqrt() - (0.00054 * math.sqrt(a[0].numel()) if c is None else c))
                .flatten(1).mean(1),
                "your distance is elementwise (the reference LCD script's huber); iCT's takes the norm of the whole "
                "sample.")]))
