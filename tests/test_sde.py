"""minilcm.sde: the VP-SDE, reverse SDE and PF-ODE against closed forms, the exact mixture, and convergence orders.

The oracle eps-model (the Gaussian mixture's exact score) separates solver error from learning error.
"""
import math

import pytest
import torch

from minilcm.toys import GaussianMixture, OracleEps
from minilcm.diffusion import q_sample
from minilcm.metrics import noise_floor, sliced_wasserstein
from minilcm.schedules import Schedule
from minilcm.sde import (diffusion_coef, drift_coef, euler_step, forward_sde, heun_step, pf_ode, pf_ode_encode,
                         pf_ode_rk4, pf_ode_velocity, reverse_sde, rk4_step)

S = Schedule("linear")
GM = GaussianMixture()
ORACLE = OracleEps(GM, S)



def lambda_grid(n_steps: int, t_min: float = 0.0) -> torch.Tensor:
    """n_steps + 1 times from T-1 down to t_min, evenly spaced in lambda."""
    return S.timesteps(n_steps + 1, "lambda", t_min=t_min)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, t, **cond):
        self.calls += 1
        return self.inner(x, t, **cond)


# ---- the forward SDE is the discrete schedule in continuous time ---------------------------------
def test_sde_moments_reproduce_alpha_bar():
    """dm/dt = f m, dv/dt = 2 f v + g^2 (Sarkka & Solin 2019, Eq. 5.51), integrated by RK4 from q(x_0 | data),
    land on alpha_t and sigma_t^2 of the *discrete* schedule at every integer t."""
    def rhs(t, m, v):
        f, g2 = drift_coef(S, t).item(), diffusion_coef(S, t).item() ** 2
        return f * m, 2 * f * v + g2

    m, v = S.alpha(0).item(), S.sigma(0).item() ** 2
    ms, vs = [m], [v]
    for t in range(S.T - 1):  # unit steps: the spline is smooth inside each [t, t+1]
        k1 = rhs(t, m, v)
        k2 = rhs(t + 0.5, m + 0.5 * k1[0], v + 0.5 * k1[1])
        k3 = rhs(t + 0.5, m + 0.5 * k2[0], v + 0.5 * k2[1])
        k4 = rhs(t + 1.0, m + k3[0], v + k3[1])
        m += (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0]) / 6
        v += (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1]) / 6
        ms.append(m)
        vs.append(v)
    t = torch.arange(S.T)
    assert torch.allclose(torch.tensor(ms, dtype=torch.float64), S.alpha(t), atol=1e-8, rtol=0)
    assert torch.allclose(torch.tensor(vs, dtype=torch.float64), S.sigma(t) ** 2, atol=1e-8, rtol=0)


def test_beta_integrates_to_the_discrete_betas():
    """int_{t-1}^{t} beta(s) ds = log alpha_bar_{t-1} - log alpha_bar_t (= -log(1 - beta_t)) for every discrete step.
    beta is piecewise quadratic (the derivative of a cubic spline), so Simpson's rule on [t-1, t] is exact."""
    t = torch.arange(1, S.T, dtype=torch.float64)
    simpson = (drift_coef(S, t - 1) + 4 * drift_coef(S, t - 0.5) + drift_coef(S, t)) / 6 * -2
    log_ab = S.alphas_cumprod.double().log()
    assert torch.allclose(simpson, log_ab[:-1] - log_ab[1:], rtol=1e-9, atol=0)
    # alphas_cumprod is a float32 cumprod (as in diffusers): -log(1 - beta_t) agrees up to its rounding
    assert torch.allclose(simpson, -torch.log1p(-S.betas[1:].double()), rtol=1e-3, atol=0)


def test_forward_sde_simulation_matches_q_sample():
    """Euler-Maruyama on the forward SDE from one data point: (x_t - alpha_t x_0) / sigma_t ~ N(0, I)."""
    n = 20_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.5, -1.0]], dtype=torch.float64).expand(n, 2)
    x_start = q_sample(S, x0, torch.zeros(n), torch.randn(n, 2, generator=g, dtype=torch.float64))  # t = 0
    grid = torch.linspace(0, S.T - 1, 401, dtype=torch.float64)
    traj = forward_sde(x_start, S, grid, generator=g, return_trajectory=True).trajectory
    assert len(traj) == 401
    for i in (40, 100, 200, 400):
        t = grid[i]
        z = (traj[i] - S.alpha(t) * x0) / S.sigma(t)
        assert z.mean(0).abs().max() < 0.03, (t, z.mean(0))
        assert (z.var(0) - 1).abs().max() < 0.05, (t, z.var(0))


# ---- the PF-ODE: closed form, one-step API, samples, inversion, orders ----------------------------
def test_pf_ode_matches_closed_form_for_one_gaussian():
    """For data N(mu, c^2 I) the PF-ODE is affine: x_t = alpha_t mu + s_t / s_u (x_u - alpha_u mu),
    s_t^2 = alpha_bar_t c^2 + sigma_t^2 (the flow that transports one Gaussian marginal into the next)."""
    mu, c = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.3
    gauss = GaussianMixture(means=mu[None], covs=(c ** 2 * torch.eye(2, dtype=torch.float64))[None])
    oracle = OracleEps(gauss, S)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def s(t):
        return (S.alpha_bar(t) * c ** 2 + S.sigma(t) ** 2).sqrt()

    def exact(x_u, u, t):
        return S.alpha(t) * mu + s(t) / s(u) * (x_u - S.alpha(u) * mu)

    # Heun's error to the exact flow falls 4x per halving (measured 2.7e-4, 6.8e-5, 1.8e-5 at 100, 200, 400 steps)
    x0 = exact(x_T, 999, 0)
    errs = [(pf_ode(oracle, x_T, S, lambda_grid(n), method="heun").x - x0).abs().max() for n in (100, 400)]
    assert errs[1] < 3e-5 and errs[0] / errs[1] > 10, errs
    enc = pf_ode_encode(oracle, x0, S, lambda_grid(400), method="heun")  # data -> noise, the same flow backwards
    assert enc.nfe == 800 and (enc.x - x_T).abs().max() < 1.5e-4  # measured 6.0e-5
    # the single steps, in both directions
    x500 = exact(x_T, 999, 500)
    for step, tol in ((euler_step, 1e-3), (heun_step, 1e-6)):
        assert (step(oracle, x500, S, 500.0, 495.0) - exact(x500, 500, 495)).abs().max() < tol
        assert (step(oracle, x500, S, 500.0, 505.0) - exact(x500, 500, 505)).abs().max() < tol


def test_reverse_sde_matches_closed_form_for_one_gaussian():
    """Started from p_999 exactly, Euler-Maruyama on the reverse SDE ends at N(mu, (alpha_bar_0 c^2 + sigma_0^2) I):
    mean and variance within the weak (order-1) bias at 200 steps (measured variance ratio 1.015)."""
    mu, c = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.3
    gauss = GaussianMixture(means=mu[None], covs=(c ** 2 * torch.eye(2, dtype=torch.float64))[None])
    g = torch.Generator().manual_seed(11)
    s2 = lambda t: S.alpha_bar(t) * c ** 2 + S.sigma(t) ** 2  # noqa: E731
    x_T = S.alpha(999) * mu + s2(999).sqrt() * torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    x = reverse_sde(OracleEps(gauss, S), x_T, S, lambda_grid(200), generator=g).x
    assert (x.mean(0) - mu).abs().max() < 0.01, x.mean(0)
    assert (x.var(0) / s2(0) - 1).abs().max() < 0.05, x.var(0) / s2(0)


def test_velocity_is_song_eq13_in_score_form():
    """v = f(t) x - 1/2 g(t)^2 grad log p_t(x), written with the mixture's exact score (not its eps)."""
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for t in (0.0, 3.7, 250.5, 998.2):
        tt = torch.tensor(t, dtype=torch.float64)
        score = GM.score(x, torch.full((32,), t, dtype=torch.float64), S)
        want = drift_coef(S, tt) * x - 0.5 * diffusion_coef(S, tt) ** 2 * score
        got = pf_ode_velocity(ORACLE, x, S, t)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-9), t


def test_step_api_and_nfe():
    """euler_step/heun_step are what pf_ode does; NFE is 1/step (Euler) and 2/step (Heun, the last step included)."""
    model = CountingModel(ORACLE)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = S.timesteps(11, "lambda")  # 11 times -> 10 steps
    for method, step, per in (("euler", euler_step, 1), ("heun", heun_step, 2)):
        model.calls = 0
        out = pf_ode(model, x, S, ts, method=method, return_trajectory=True)
        assert out.nfe == model.calls == 10 * per
        assert len(out.trajectory) == 11 and torch.equal(out.trajectory[0], x)
        manual = x
        for t, s in zip(ts.tolist(), ts.tolist()[1:]):
            manual = step(ORACLE, manual, S, t, s)
        assert torch.equal(out.x, manual)
        enc = pf_ode_encode(model, x, S, ts, method=method)
        assert enc.nfe == 10 * per
    model.calls = 0
    assert reverse_sde(model, x, S, ts, generator=torch.Generator().manual_seed(0)).nfe == model.calls == 10
    with pytest.raises(ValueError, match="method"):
        pf_ode(ORACLE, x, S, ts, method="rk45")
    with pytest.raises(ValueError, match="decreasing"):
        pf_ode(ORACLE, x, S, ts.flip(0))


def test_steps_take_one_time_per_sample():
    """Consistency distillation draws a different (t, s) per sample: (B,) tensors give the row-by-row float result."""
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    t = torch.tensor([999.0, 700.5, 400.0, 120.25, 30.0, 5.0], dtype=torch.float64)
    s = torch.tensor([950.0, 690.0, 350.5, 100.0, 35.0, 0.0], dtype=torch.float64)  # one step goes up (encodes)
    for step in (euler_step, heun_step):
        batched = step(ORACLE, x, S, t, s)
        rows = torch.cat([step(ORACLE, x[i:i + 1], S, t[i].item(), s[i].item()) for i in range(6)])
        assert torch.allclose(batched, rows, rtol=1e-12, atol=1e-12)


def test_float32_inputs_stay_float32():
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(4))
    assert heun_step(ORACLE, x, S, 999.0, 900.0).dtype == torch.float32
    assert pf_ode(ORACLE, x, S, S.timesteps(5, "lambda")).x.dtype == torch.float32
    assert reverse_sde(ORACLE, x, S, S.timesteps(5, "lambda")).x.dtype == torch.float32


@pytest.fixture(scope="module")
def data_and_floor():
    n = 2000
    data = GM.sample(n, torch.Generator().manual_seed(100))[0].double()
    return data, noise_floor(GM, n)


def _check_matches_mixture(x, data, floor):
    m, cov = GM.mean_cov()
    assert torch.isfinite(x).all()
    sw = sliced_wasserstein(x, data)
    assert sw < 2 * floor, (sw, floor)  # the floor itself fluctuates by ~30% between draws
    assert (x.mean(0) - m).abs().max() < 0.1, x.mean(0)  # 4 standard errors for n = 2000
    assert (torch.cov(x.T) - cov).abs().max() < 0.1, torch.cov(x.T)
    return sw


def test_reverse_sde_and_pf_ode_sample_the_mixture(data_and_floor):
    data, floor = data_and_floor
    x_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sde = reverse_sde(ORACLE, x_T, S, lambda_grid(200), generator=torch.Generator().manual_seed(6))
    ode = pf_ode(ORACLE, x_T, S, lambda_grid(25), method="heun")
    _check_matches_mixture(sde.x, data, floor)
    _check_matches_mixture(ode.x, data, floor)
    # the SDE is stochastic and the ODE is not: same noise, other seed -> another SDE sample, the same ODE sample
    sde2 = reverse_sde(ORACLE, x_T[:64], S, lambda_grid(20), generator=torch.Generator().manual_seed(7))
    sde3 = reverse_sde(ORACLE, x_T[:64], S, lambda_grid(20), generator=torch.Generator().manual_seed(8))
    assert (sde2.x - sde3.x).abs().max() > 0.1
    assert torch.equal(pf_ode(ORACLE, x_T[:64], S, lambda_grid(20)).x, pf_ode(ORACLE, x_T[:64], S, lambda_grid(20)).x)


def test_encode_decode_round_trip():
    """Data -> noise -> data with Heun at 100 steps returns x within 1e-3 (measured 1.8e-4); the code is ~N(0, I)."""
    x0 = GM.sample(256, torch.Generator().manual_seed(9))[0].double()
    ts = S.timesteps(101, "lambda")
    z = pf_ode_encode(ORACLE, x0, S, ts, method="heun").x
    assert z.mean(0).abs().max() < 0.25 and (z.std(0) - 1).abs().max() < 0.15
    back = pf_ode(ORACLE, z, S, ts, method="heun").x
    assert (back - x0).abs().max() < 1e-3


def test_convergence_orders():
    """Step halving N = 25..200, uniform in lambda, against an RK4 reference (200 steps; it agrees with 400 RK4
    steps to 4e-7): the log-log slope of the RMS error over 32 paths is ~1 for Euler and ~2 for Heun
    (measured per halving 1.02 1.01 1.01 and 2.14 2.04 2.01). The RMS, not the max: a single path passing
    near a saddle between blobs can stay pre-asymptotic at 25 steps (max-error order 1.4 for some seeds).

    Why lambda: the linear schedule spends over a third of its log-SNR range in the first 10% of t (lambda falls
    from 4.6 to 1.1 over t in [0, 100]). With steps uniform in t, Heun's error is ~4x larger at every N and its
    order settles late (1.86, 1.99, 2.14 per halving); Euler's hardly changes.
    """
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def rk4(x, ts):
        ts = ts.tolist()
        for t, s in zip(ts, ts[1:]):
            h = s - t
            k1 = pf_ode_velocity(ORACLE, x, S, t)
            k2 = pf_ode_velocity(ORACLE, x + h / 2 * k1, S, t + h / 2)
            k3 = pf_ode_velocity(ORACLE, x + h / 2 * k2, S, t + h / 2)
            k4 = pf_ode_velocity(ORACLE, x + h * k3, S, s)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x

    ref = rk4(x_T, lambda_grid(200))
    Ns = [25, 50, 100, 200]
    for method, order in (("euler", 1), ("heun", 2)):
        errs = [(pf_ode(ORACLE, x_T, S, lambda_grid(N), method=method).x - ref).norm(dim=1).pow(2).mean().sqrt().item()
                for N in Ns]
        slopes = [math.log(errs[i] / errs[i + 1], 2) for i in range(len(Ns) - 1)]
        logN, logE = torch.tensor(Ns).double().log(), torch.tensor(errs).log()
        fit = -((logN - logN.mean()) * (logE - logE.mean())).sum() / ((logN - logN.mean()) ** 2).sum()
        assert abs(fit.item() - order) < 0.3, (method, errs, fit)
        assert all(abs(s - order) < 0.3 for s in slopes), (method, slopes)


def test_pf_ode_rk4_is_fourth_order_against_the_closed_form():
    """``sde.pf_ode_rk4`` (the reference solver of Chapter 2) on one Gaussian, whose PF-ODE flow is affine and exact:
    the error falls 9-12x per halving of the step at 20-80 steps (measured orders 3.61 and 3.19: well above Heun's 2,
    though not the textbook 4 on this discrete schedule's continuous-time interpolation), and NFE = 4 per step."""
    mu, c = torch.tensor([0.7, -0.4], dtype=torch.float64), 0.3
    gauss = GaussianMixture(means=mu[None], covs=(c ** 2 * torch.eye(2, dtype=torch.float64))[None])
    oracle = OracleEps(gauss, S)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = lambda t: (S.alpha_bar(t) * c ** 2 + S.sigma(t) ** 2).sqrt()  # noqa: E731
    x0 = S.alpha(0) * mu + s(0) / s(999) * (x_T - S.alpha(999) * mu)
    errs = []
    for n in (20, 40, 80):
        out = pf_ode_rk4(oracle, x_T, S, S.timesteps(n + 1, "lambda"))
        assert out.nfe == 4 * n
        errs.append((out.x - x0).abs().max().item())
    orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]
    assert all(3.0 < p < 4.6 for p in orders) and errs[-1] < 2e-6, (errs, orders)
    # one step equals the textbook RK4 written out here
    t, u = 500.0, 480.0
    h = u - t
    k1 = pf_ode_velocity(oracle, x_T, S, t)
    k2 = pf_ode_velocity(oracle, x_T + h / 2 * k1, S, t + h / 2)
    k3 = pf_ode_velocity(oracle, x_T + h / 2 * k2, S, t + h / 2)
    k4 = pf_ode_velocity(oracle, x_T + h * k3, S, u)
    assert torch.equal(rk4_step(oracle, x_T, S, t, u), x_T + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
