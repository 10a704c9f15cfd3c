"""Chapter 1 (DDPM) and Chapter 2 (the SDE and the PF-ODE): the forward sample, x0 from eps, the posterior, the
ancestral step, CFG; the VP drift, the PF-ODE velocity, an Euler and a Heun step, the empirical order."""
from __future__ import annotations

import torch

from ...diffusion import alpha_bar_at, eps_to_x0, posterior_mean_var, q_sample
from ...guidance import cfg_combine
from ...metrics import power_law_order
from ...schedules import Schedule, broadcast
from ...sde import drift_coef, euler_step, heun_step, pf_ode_velocity
from ..core import Case, Exercise, Mistake, register

LIN = Schedule("linear")


def _b(v, x):
    return broadcast(v, x).to(x)


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _x0_eps(n=4096, d=2, seed=0, dtype=torch.float32):
    g = _g(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) + 1.0, torch.randn(n, d, generator=g, dtype=dtype)


def _times(*ts, n=4096):
    return [torch.full((n,), float(t), dtype=torch.float64) for t in ts]


# ---- Chapter 1 ----------------------------------------------------------------------------------------
def _forward_cases():
    x0, eps = _x0_eps()
    per_row = torch.tensor([0.0, 250.0, 500.0, 999.0], dtype=torch.float64).repeat(1024)
    x64, e64 = _x0_eps(dtype=torch.float64)
    return [Case(f"t = {int(t[0])}, x0 with mean 1, a batch of 4096", (LIN, x0, t, eps)) for t in _times(500, 0, 999)] + [
        Case("per-row times t = 0, 250, 500, 999", (LIN, x0, per_row, eps)),
        Case("float64 inputs at t = 500", (LIN, x64, _times(500)[0], e64))]


register(Exercise(
    "forward_sample", 1, "Sample q(x_t | x_0)", 1,
    "x_t = alpha_t x0 + sigma_t eps, with alpha_t = schedule.alpha(t) = sqrt(alpha_bar_t) and sigma_t = "
    "schedule.sigma(t); broadcast the (B,) coefficients over x0's other dimensions (minilcm.schedules.broadcast).",
    q_sample, _forward_cases, [
        Mistake(lambda s, x0, t, e: _b(s.alpha_bar(t), x0) * x0 + _b(s.sigma(t), x0) * e,
                "your x_t has mean {got_mean:.3g}, expected {want_mean:.3g}: did you scale x0 by alpha_bar_t instead "
                "of alpha_t = sqrt(alpha_bar_t)?"),
        Mistake(lambda s, x0, t, e: _b(s.alpha(t), x0) * x0 + _b(1 - s.alpha_bar(t), x0) * e,
                "your x_t has std {got_std:.3g}, expected {want_std:.3g}: did you scale the noise by 1 - alpha_bar_t "
                "(the variance) instead of sigma_t = sqrt(1 - alpha_bar_t)?"),
        Mistake(lambda s, x0, t, e: _b(s.sigma(t), x0) * x0 + _b(s.alpha(t), x0) * e,
                "your x_t has mean {got_mean:.3g}, expected {want_mean:.3g}: alpha_t and sigma_t are swapped (x0 gets "
                "alpha_t, the noise sigma_t)."),
        Mistake(lambda s, x0, t, e: _b(s.alpha((t + 1).clamp(max=999)), x0) * x0
                + _b(s.sigma((t + 1).clamp(max=999)), x0) * e,
                "your x_t is the one of t + 1: the course's t runs 0 .. T-1 as diffusers' does, so index the schedule "
                "at t itself.")]))


def _x0_cases():
    x0, eps = _x0_eps(seed=1)
    out = []
    for t in _times(500, 10, 990):
        out.append(Case(f"t = {int(t[0])}", (LIN, q_sample(LIN, x0, t, eps), t, eps)))
    return out


register(Exercise(
    "predict_x0", 1, "x0 from the predicted noise", 1,
    "invert x_t = alpha_t x0 + sigma_t eps for x0.",
    eps_to_x0, _x0_cases, [
        Mistake(lambda s, x, t, e: (x - _b(s.sigma(t), x) * e) / _b(s.alpha_bar(t), x),
                "your x0 has std {got_std:.3g}, expected {want_std:.3g}: divide by alpha_t = sqrt(alpha_bar_t), "
                "not by alpha_bar_t."),
        Mistake(lambda s, x, t, e: (x - e) / _b(s.alpha(t), x),
                "your x0 has std {got_std:.3g}, expected {want_std:.3g}: the noise enters x_t as sigma_t eps, so "
                "subtract sigma_t eps, not eps."),
        Mistake(lambda s, x, t, e: (x - _b(s.sigma(t), x) * e) * _b(s.alpha(t), x),
                "your x0 has std {got_std:.3g}, expected {want_std:.3g}: divide by alpha_t; you multiplied.")]))


def posterior_mean_ref(schedule, x0, x_t, t):
    return posterior_mean_var(schedule, x0, x_t, float(t), float(t) - 1)[0]


def _posterior_cases():
    x0, eps = _x0_eps(seed=2)
    return [Case(f"t = {t}", (LIN, x0, q_sample(LIN, x0, torch.tensor(float(t)), eps), t)) for t in (1, 100, 999, 0)]


def _post(schedule, x0, x_t, t, ab_prev_at, alpha_t):
    ab_t, ab_p = schedule.alpha_bar(torch.tensor(float(t))), ab_prev_at
    beta = 1 - ab_t / ab_p
    return ((ab_p.sqrt() * beta / (1 - ab_t)) * x0 + (alpha_t * (1 - ab_p) / (1 - ab_t)) * x_t).to(x0)


register(Exercise(
    "posterior_mean", 1, "The mean of q(x_{t-1} | x_t, x_0)", 2,
    "DDPM Eq. 7: mu = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x0 + sqrt(a_t) (1 - alpha_bar_{t-1}) / "
    "(1 - alpha_bar_t) x_t, where DDPM's a_t = 1 - beta_t = alpha_bar_t / alpha_bar_{t-1} (NOT the course's "
    "alpha_t = sqrt(alpha_bar_t)); t is a Python int, and at t = 0 alpha_bar_{-1} = 1 (schedule.alpha_bar rejects "
    "-1: handle t = 0 yourself).",
    posterior_mean_ref, _posterior_cases, [
        Mistake(lambda s, x0, x, t: _post(s, x0, x, t, alpha_bar_at(s, t - 1), s.alpha(torch.tensor(float(t)))),
                "your mean is off (mean {got_mean:.4g}, expected {want_mean:.4g}): the x_t coefficient needs DDPM's "
                "sqrt(a_t) = sqrt(1 - beta_t); you used the course's alpha_t = sqrt(alpha_bar_t) (see the notation "
                "sheet)."),
        Mistake(lambda s, x0, x, t: _post(s, x0, x, t, alpha_bar_at(s, t), (alpha_bar_at(s, t) / alpha_bar_at(s, t - 1)).sqrt()),
                "your mean is off: did you use alpha_bar_t where alpha_bar_{t-1} belongs (an off-by-one in t)?"),
        Mistake(lambda s, x0, x, t: _post(s, x, x0, t, alpha_bar_at(s, t - 1), (alpha_bar_at(s, t) / alpha_bar_at(s, t - 1)).sqrt()),
                "your mean is off: the two coefficients are swapped (sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) "
                "multiplies x0).")]))


def ancestral_step_ref(schedule, x_t, t, eps, z):
    ab_t = schedule.alpha_bar(torch.tensor(float(t)))
    x0 = (x_t - (1 - ab_t).sqrt().to(x_t) * eps) / ab_t.sqrt().to(x_t)
    mean, var = posterior_mean_var(schedule, x0, x_t, float(t), float(t) - 1)
    return mean + var.sqrt().to(x_t) * z if t > 0 else mean


def _ancestral_cases():
    x0, eps = _x0_eps(seed=3)
    z = torch.randn(x0.shape, generator=_g(4))
    return [Case(f"t = {t}", (LIN, q_sample(LIN, x0, torch.tensor(float(t)), eps), t, eps, z)) for t in (500, 1, 0)]


def _ancestral_var(schedule, x_t, t, eps, z, var_of, last_noise=False):
    out = ancestral_step_ref(schedule, x_t, t, eps, torch.zeros_like(z))
    return out + var_of(schedule, t).sqrt().to(x_t) * z if (t > 0 or last_noise) else out


register(Exercise(
    "ancestral_step", 1, "One DDPM ancestral step (Algorithm 2)", 2,
    "x0 = (x_t - sigma_t eps) / alpha_t, then x_{t-1} = posterior mean (your posterior_mean) + sqrt(beta-tilde_t) z "
    "with beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); at t = 0 no noise, and the mean is x0 "
    "itself (alpha_bar_{-1} = 1).",
    ancestral_step_ref, _ancestral_cases, [
        Mistake(lambda s, x, t, e, z: _ancestral_var(s, x, t, e, z, lambda s, t: posterior_mean_var(
                    s, x, x, float(t), float(t) - 1)[1] ** 2),
                "your x_{t-1} has std {got_std:.3g}, expected {want_std:.3g}: the noise is scaled by the standard "
                "deviation sqrt(beta-tilde_t); you used the variance beta-tilde_t."),
        Mistake(lambda s, x, t, e, z: _ancestral_var(s, x, t, e, z, lambda s, t: 1 - alpha_bar_at(s, t) / alpha_bar_at(s, t - 1)),
                "your noise has variance beta_t, DDPM's other choice (diffusers' fixed_large); this course uses "
                "beta-tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) (fixed_small)."),
        Mistake(lambda s, x, t, e, z: ancestral_step_ref(s, x, t, e, torch.zeros_like(z)),
                "your x_{t-1} has std {got_std:.3g}, expected {want_std:.3g}: you added no noise; DDPM's step adds "
                "sqrt(beta-tilde_t) z.")]))


def _cfg_cases():
    g = _g(5)
    ec, eu = torch.randn(64, 3, 8, 8, generator=g), torch.randn(64, 3, 8, 8, generator=g)
    return [Case("w = 3", (ec, eu, 3.0)), Case("w = 0 (no guidance)", (ec, eu, 0.0)),
            Case("per-row w in [0, 4]", (ec, eu, torch.linspace(0, 4, 64)))]


register(Exercise(
    "cfg", 1, "Classifier-free guidance, the course's convention", 1,
    "eps_w = (1 + w) eps_cond - w eps_uncond, so w = 0 is the conditional model alone; w is a Python float or a "
    "(B,) tensor: torch.as_tensor(w), then broadcast it over eps.",
    cfg_combine, _cfg_cases, [
        Mistake(lambda ec, eu, w: _b(torch.as_tensor(w), ec) * ec + (1 - _b(torch.as_tensor(w), ec)) * eu,
                "your eps_w uses diffusers' guidance_scale convention (w eps_c + (1 - w) eps_u); the course's w is "
                "guidance_scale - 1: eps_w = (1 + w) eps_c - w eps_u."),
        Mistake(lambda ec, eu, w: (1 + _b(torch.as_tensor(w), ec)) * eu - _b(torch.as_tensor(w), ec) * ec,
                "your guidance pushes away from the condition: (1 + w) multiplies the conditional eps, -w the "
                "unconditional one.")]))


# ---- Chapter 2 ----------------------------------------------------------------------------------------
def vp_drift_ref(schedule, x, t):
    return _b(drift_coef(schedule, t), x) * x


def _drift_cases():
    x, _ = _x0_eps(seed=6)
    return [Case(f"t = {int(t[0])}", (LIN, x, t)) for t in _times(0, 500, 999)]


register(Exercise(
    "vp_drift", 2, "The VP-SDE drift f(x, t)", 1,
    "Song et al. 2021, Eq. 11: f(x, t) = -1/2 beta(t) x, with beta(t) = schedule.beta(t).",
    vp_drift_ref, _drift_cases, [
        Mistake(lambda s, x, t: -_b(s.beta(t), x) * x,
                "your drift is twice the expected one: the VP-SDE's drift is -1/2 beta(t) x."),
        Mistake(lambda s, x, t: 0.5 * _b(s.beta(t), x) * x,
                "your drift has the wrong sign: the VP-SDE shrinks x towards 0, f = -1/2 beta(t) x.")]))


def pf_velocity_ref(schedule, x, t, eps):
    return pf_ode_velocity(lambda x_, t_, **_: eps, x, schedule, t)


def _velocity_cases():
    x0, eps = _x0_eps(seed=7)
    return [Case(f"t = {int(t[0])}", (LIN, q_sample(LIN, x0, t, eps), t, eps)) for t in _times(10, 500, 999)]


def _vel(s, x, t, eps, k_score, sign=1.0, use_sigma=True):
    sig = _b(s.sigma(t), x) if use_sigma else 1.0
    return -0.5 * _b(s.beta(t), x) * (x - sign * k_score * eps / sig)


register(Exercise(
    "pf_ode_velocity", 2, "The probability-flow ODE's velocity", 2,
    "dx/dt = f(x, t) - 1/2 g(t)^2 score with score = -eps / sigma_t: -1/2 beta(t) (x - eps / sigma_t) "
    "(Song et al. 2021, Eq. 13).",
    pf_velocity_ref, _velocity_cases, [
        Mistake(lambda s, x, t, e: _vel(s, x, t, e, 2.0),
                "your velocity is the reverse SDE's drift (score term g^2 score); the ODE has half of it, 1/2 g^2."),
        Mistake(lambda s, x, t, e: _vel(s, x, t, e, 1.0, sign=-1.0),
                "the score term has the wrong sign: the score is -eps / sigma_t."),
        Mistake(lambda s, x, t, e: _vel(s, x, t, e, 1.0, use_sigma=False),
                "your velocity is off at small t (std {got_std:.3g}, expected {want_std:.3g}): the score is "
                "-eps / sigma_t; you left out sigma_t.")]))


class _Affine(torch.nn.Module):
    """A fixed eps-model, eps(x, t) = 0.8 sigma_t x + 0.1: smooth in x and t, so that Euler, Heun and their usual
    slips all give different answers."""

    def forward(self, x, t, **_):
        return _b(LIN.sigma(t.double()), x) * x * 0.8 + 0.1


def _step_cases():
    x, _ = _x0_eps(seed=8)
    m = _Affine()
    return [Case("t = 999 -> 900", (m, x, LIN, 999.0, 900.0)), Case("t = 300 -> 250", (m, x, LIN, 300.0, 250.0)),
            Case("t = 100 -> 200 (forward in time)", (m, x, LIN, 100.0, 200.0))]


def _v(m, x, t):
    return pf_ode_velocity(m, x, LIN, t)


register(Exercise(
    "euler_step", 2, "One Euler step of the PF-ODE", 1,
    "x_s = x_t + (s - t) v(x_t, t) with v = minilcm.sde.pf_ode_velocity(model, x, schedule, t); s < t when "
    "sampling, so the step size s - t is negative.",
    euler_step, _step_cases, [
        Mistake(lambda m, x, sc, t, s: x + (t - s) * _v(m, x, t),
                "your step goes the wrong way: the step size is s - t (negative when sampling), not t - s."),
        Mistake(lambda m, x, sc, t, s: x + (s - t) * _v(m, x, s),
                "you evaluated the velocity at the end time s; Euler uses the start, v(x_t, t).")]))


register(Exercise(
    "heun_step", 2, "One Heun step of the PF-ODE", 2,
    "predict x_e = x_t + h v(x_t, t) with h = s - t, then x_s = x_t + h/2 (v(x_t, t) + v(x_e, s)) "
    "(Karras et al. 2022, Algorithm 1).",
    heun_step, _step_cases, [
        Mistake(lambda m, x, sc, t, s: x + (s - t) * _v(m, x, t),
                "your step is Euler's (first order): add the corrector, the average of v(x_t, t) and v(x_e, s)."),
        Mistake(lambda m, x, sc, t, s: x + (s - t) * (_v(m, x, t) + _v(m, x + (s - t) * _v(m, x, t), s)),
                "your step is twice too long: the trapezoid averages the two velocities, h / 2 (v_t + v_e)."),
        Mistake(lambda m, x, sc, t, s: x + (s - t) / 2 * (_v(m, x, t) + _v(m, x + (s - t) * _v(m, x, t), t)),
                "you evaluated the corrector's velocity at t; it belongs at the end time s, v(x_e, s).")]))


def _order_cases():
    nfe = [4, 8, 16, 32]
    return [Case("err = 3 NFE^-2", (nfe, [3 * n ** -2.0 for n in nfe])),
            Case("err = 0.5 NFE^-1 with noise", (nfe, [0.5 / n * (1 + 0.05 * (-1) ** i) for i, n in enumerate(nfe)]))]


register(Exercise(
    "convergence_order", 2, "The empirical order of a solver", 2,
    "err ~ C NFE^-p is a line in log-log axes: p is minus the least-squares slope of log err against log NFE "
    "(use every point, not only the ends).",
    power_law_order, _order_cases, [
        Mistake(lambda nfe, err: -power_law_order(nfe, err),
                "your order is {got}, expected {want}: the slope is negative, the order is minus the slope."),
        Mistake(lambda nfe, err: float(-(torch.tensor(err[-1]).log() - torch.tensor(err[0]).log())
                                       / (torch.tensor(float(nfe[-1])).log() - torch.tensor(float(nfe[0])).log())),
                "your order ({got}) uses only the two end points; fit the slope to every point (least squares).")],
    rtol=1e-6, atol=1e-9))
