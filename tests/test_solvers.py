"""Fast solvers (Chapter 3): DDIM, DPM-Solver 1-3, DPM-Solver++(2M), spacings and the benchmark.

Every formula is checked against something independent: diffusers' schedulers on the same eps-model
and timesteps, DDPM for DDIM(eta=1), DDIM for DPM-Solver-1, and empirical convergence orders on the
exact eps-model of a Gaussian mixture.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from minilcm.solver_bench import BenchRow, convergence_order, reference_solution, solver_benchmark, table
from minilcm.toys import GaussianMixture, OracleEps
from minilcm.diffusion import ddpm
from minilcm.schedules import Schedule, broadcast
from minilcm.samplers import SAMPLERS, get_sampler, nfe_per_step, timesteps_for_nfe
from minilcm.solvers import ddim, dpm_solver, dpm_solver_pp, spaced_timesteps

DIFFUSERS_BETAS = {"linear": {}, "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                        beta_end=0.012)}



class RandomUNetEps(nn.Module):
    """eps of N(0, I) data (sigma_t x) plus alpha_t times a small random diffusers UNet.

    The UNet makes the model nonlinear; the Gaussian part keeps samples O(1), as a trained model's are
    (a bare random UNet predicts eps at random, and x0 = (x - sigma eps) / alpha blows up to ~1e3).
    """

    def __init__(self, schedule: Schedule, seed: int = 0):
        from diffusers import UNet2DModel

        super().__init__()
        torch.manual_seed(seed)
        self.schedule = schedule
        self.unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()

    def forward(self, x, t):
        t = torch.as_tensor(t).expand(x.shape[0])
        return (broadcast(self.schedule.sigma(t), x) * x
                + broadcast(self.schedule.alpha(t), x) * self.unet(x, t).sample)


def run_diffusers(scheduler, model, x, **step_kwargs):
    """diffusers' own denoising loop: one model call and one ``scheduler.step`` per timestep."""
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t), t, x, **step_kwargs).prev_sample
    return x


def images(seed=1):
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# ---- timesteps ------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_schedule_timesteps_equal_diffusers_for_every_n(spacing):
    from diffusers import DDIMScheduler

    schedule, ref = Schedule("linear"), DDIMScheduler(timestep_spacing=spacing)
    for n in range(1, schedule.T + 1):
        ref.set_timesteps(n)
        assert torch.equal(schedule.timesteps(n, spacing), ref.timesteps.double()), (spacing, n)


def test_spaced_timesteps_lambda_and_linspace():
    s = Schedule("linear")
    ts = spaced_timesteps(s, 9, "lambda", t_min=20.0)
    assert ts[0] == 999 and ts[-1] == 20 and (ts[1:] < ts[:-1]).all()
    dl = s.lam_continuous(ts).diff()
    assert torch.allclose(dl, dl.mean().expand_as(dl), rtol=1e-9)  # equal steps h in lambda
    assert torch.equal(spaced_timesteps(s, 5, "linspace"), torch.tensor([999, 749.25, 499.5, 249.75, 0.0],
                                                                         dtype=torch.float64))
    with pytest.raises(ValueError, match="spacing"):
        spaced_timesteps(s, 5, "karras")


@pytest.mark.parametrize("sampler,kw,k", [("ddim", {}, 1), ("dpm_solver_pp", {}, 1), ("dpm_solver", {"order": 1}, 1),
                                          ("dpm_solver", {"order": 2}, 2), ("dpm_solver", {"order": 3}, 3)])
def test_nfe_budget_is_spent_and_reported(sampler, kw, k):
    s = Schedule("linear")
    model = OracleEps(GaussianMixture(), s)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    assert nfe_per_step(sampler, **kw) == k
    for nfe in (7, 10):
        for dz in (True, False):
            ts = timesteps_for_nfe(s, nfe, sampler, denoise_to_zero=dz, **kw)
            used = get_sampler(sampler).fn(model, x, s, ts, denoise_to_zero=dz, **kw).nfe
            assert used == k * (len(ts) - 1) + int(dz)  # k per step, one for the step to clean data
            assert nfe - k < used <= nfe  # the most steps that fit


# ---- registry and argument errors -----------------------------------------------------------------
def test_registry_and_clear_errors():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm_solver", "dpm_solver_pp", "dpm_solver_fast", "cm", "lcm"}
    assert get_sampler("dpm_solver_pp").fn is dpm_solver_pp and get_sampler("ddpm").fn is ddpm
    with pytest.raises(ValueError, match="valid: ddpm, ddim, dpm_solver, dpm_solver_pp, dpm_solver_fast, cm, lcm"):
        get_sampler("euler")
    s = Schedule("linear")
    model = OracleEps(GaussianMixture(), s)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        dpm_solver(model, x, s, [999, 0], order=4)
    with pytest.raises(ValueError, match="at least two"):
        dpm_solver_pp(model, x, s, [999], denoise_to_zero=False)
    with pytest.raises(ValueError, match="decreasing"):
        ddim(model, x, s, [0, 999])


# ---- DDIM -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing,n,eta", [("leading", 10, 0.0), ("trailing", 25, 0.0), ("leading", 10, 0.5)])
def test_ddim_matches_diffusers_ddim_scheduler(kind, spacing, n, eta):
    from diffusers import DDIMScheduler

    schedule = Schedule(kind)
    model, x = RandomUNetEps(schedule), images()
    ref = DDIMScheduler(clip_sample=False, timestep_spacing=spacing, **DIFFUSERS_BETAS[kind])
    ref.set_timesteps(n)
    # with eta > 0 diffusers draws its noise from the generator exactly as ddim does
    expected = run_diffusers(ref, model, x, eta=eta, generator=torch.Generator().manual_seed(3))
    out = ddim(model, x, schedule, ref.timesteps, eta=eta, generator=torch.Generator().manual_seed(3))
    assert out.nfe == n
    assert (out.x - expected).abs().max() <= 1e-5


def test_ddim_eta_one_is_ddpm():
    """Song et al. 2021, Sec. 4.1: eta = 1 gives DDPM's posterior noise; the same generator gives the same sample."""
    s = Schedule("linear")
    model, x = RandomUNetEps(s), images()
    ts = s.timesteps(20, "trailing")
    a = ddim(model, x, s, ts, eta=1.0, generator=torch.Generator().manual_seed(5)).x
    b = ddpm(model, x, s, ts, generator=torch.Generator().manual_seed(5)).x
    assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("integer_times", [True, False])
def test_ddim_equals_dpm_solver_1(integer_times):
    """DPM-Solver paper, Sec. 4.1: DPM-Solver-1 is DDIM. Float rounding only (DDIM's alpha_bar is float32)."""
    s = Schedule("scaled_linear")
    if integer_times:  # a random UNet in float32 on diffusers' trailing grid
        model, x, ts, tol = RandomUNetEps(s), images(), s.timesteps(12, "trailing"), 1e-5
    else:  # the exact mixture eps-model in float64 on a continuous lambda grid
        model, ts, tol = OracleEps(GaussianMixture(), s), spaced_timesteps(s, 12, "lambda", t_min=3.0), 1e-6
        x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dz in (True, False):
        a = ddim(model, x, s, ts, denoise_to_zero=dz)
        b = dpm_solver(model, x, s, ts, order=1, denoise_to_zero=dz)
        assert a.nfe == b.nfe == len(ts) - 1 + dz
        assert (a.x - b.x).abs().max() <= tol


def test_final_step_to_clean_data_is_the_x0_prediction():
    s = Schedule("linear")
    model, x = RandomUNetEps(s), images()
    t = 400.0
    with torch.no_grad():
        x0 = (x - s.sigma(t).item() * model(x, torch.tensor(t))) / s.alpha(t).item()
    for sampler in (ddim, dpm_solver, dpm_solver_pp):
        out = sampler(model, x, s, [t])
        assert out.nfe == 1 and torch.allclose(out.x, x0, atol=1e-5)


# ---- DPM-Solver++ ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("spacing,n", [("linspace", 10), ("linspace", 20), ("trailing", 8)])
def test_dpm_solver_pp_matches_diffusers_multistep(kind, spacing, n):
    """diffusers' defaults: lower_order_final=True, final_sigmas_type="zero" -> last step first order to sigma=0."""
    from diffusers import DPMSolverMultistepScheduler

    schedule = Schedule(kind)
    model, x = RandomUNetEps(schedule), images()
    ref = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing,
                                      **DIFFUSERS_BETAS[kind])
    ref.set_timesteps(n)
    expected = run_diffusers(ref, model, x)
    out = dpm_solver_pp(model, x, schedule, ref.timesteps)
    assert out.nfe == n
    assert (out.x - expected).abs().max() <= 1e-5


def test_class_conditioning_reaches_the_class_components():
    """cond is passed to the model: conditioned samples land on their class's two mixture components."""
    s, gm = Schedule("linear"), GaussianMixture()
    model = OracleEps(gm, s)
    labels = torch.arange(64) % gm.num_classes
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for sampler in (ddim, dpm_solver, dpm_solver_pp):
        out = sampler(model, x, s, s.timesteps(20, "trailing"), cond={"class_labels": labels}).x
        nearest = torch.cdist(out.double(), gm.means).argmin(1)
        assert (gm.classes[nearest] == labels).float().mean() > 0.95


# ---- convergence orders on the exact mixture ODE ----------------------------------------------------
# Uniform steps in lambda from t = 999 to t_min = 50 (sigma = 0.17; going on to t = 0 gives the same orders
# but a longer pre-asymptotic range), no final denoising (pure ODE error), float64, and a reference from
# 200 steps of DPM-Solver-3 (error ~1e-7, below every measured error).
T_MIN = 50.0
STEPS = (16, 32, 64)


@pytest.fixture(scope="module")
def ode_problem():
    s = Schedule("linear")
    model = OracleEps(GaussianMixture(), s)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = dpm_solver(model, x, s, spaced_timesteps(s, 201, "lambda", t_min=T_MIN), order=3,
                     denoise_to_zero=False).x
    return s, model, x, ref


@pytest.mark.parametrize("sampler,kw,order", [(ddim, {}, 1), (dpm_solver, {"order": 1}, 1),
                                              (dpm_solver, {"order": 2}, 2), (dpm_solver, {"order": 3}, 3),
                                              (dpm_solver_pp, {}, 2)])
def test_empirical_convergence_order(ode_problem, sampler, kw, order):
    s, model, x, ref = ode_problem
    nfes, errs = [], []
    for n in STEPS:
        out = sampler(model, x, s, spaced_timesteps(s, n + 1, "lambda", t_min=T_MIN), denoise_to_zero=False, **kw)
        nfes.append(out.nfe)
        errs.append((out.x - ref).pow(2).mean().sqrt().item())
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.2, (nfes, errs, slope)


# ---- the benchmark --------------------------------------------------------------------------------
def test_solver_benchmark_on_the_oracle():
    s, gm = Schedule("linear"), GaussianMixture()
    model = OracleEps(gm, s)
    g = torch.Generator().manual_seed(0)
    x, data = torch.randn(400, 2, generator=g), gm.sample(400, g)[0]
    ref = reference_solution(model, s, x, nfe=300)
    calls = []
    rows = solver_benchmark(model, s, x, [5, 10, 20], reference=ref, data=data,
                            image_metric=lambda imgs: calls.append(imgs.shape) or 0.0)
    assert len(rows) == 12 and len(calls) == 12 and all(isinstance(r, BenchRow) for r in rows)
    err = {(r.solver, r.nfe): r.err_ref for r in rows}
    assert err["DPM-Solver++(2M)", 10] < 0.75 * err["DDIM", 10]  # measured 0.58x on three seeds
    assert all(r.dist_data is not None and r.seconds > 0 and r.nfe <= 20 for r in rows)
    assert convergence_order(rows, "DDIM") > 0.8  # errors fall with NFE
    assert "DPM-Solver++(2M)" in table(rows)
    plain = solver_benchmark(model, s, x, [10], {"DDIM": ("ddim", {})}, reference=ref)
    assert plain[0].dist_data is None and plain[0].image_metric is None  # no data, no metric: no numbers


def test_the_benchmark_runs_dpm_solver_fast_on_its_own_grid():
    """FAST_SOLVER in solver_benchmark: exactly the budget, the same samples as a direct call on the paper's grid
    (uniform in lambda, whatever the benchmark's spacing), and closer than the fixed order 3 at the same budget."""
    from minilcm.solver_bench import DEFAULT_SOLVERS, FAST_SOLVER
    from minilcm.solvers import dpm_solver_fast, dpm_solver_fast_timesteps

    s, gm = Schedule("linear"), GaussianMixture()
    model = OracleEps(gm, s)
    x = torch.randn(400, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = reference_solution(model, s, x, nfe=300, denoise_to_zero=False, t_min=50.0)
    rows = solver_benchmark(model, s, x, [5, 6], {**DEFAULT_SOLVERS, **FAST_SOLVER}, reference=ref,
                            spacing="linspace", denoise_to_zero=False, t_min=50.0, keep_samples=True)
    fast = {r.nfe: r for r in rows if r.solver == "DPM-Solver-fast"}
    assert sorted(fast) == [5, 6]  # exactly the budget
    ts, orders = dpm_solver_fast_timesteps(s, 6, t_end=50.0)
    assert orders == [3, 2, 1] and torch.equal(fast[6].x, dpm_solver_fast(model, x, s, ts, orders=orders).x)
    err = {(r.solver, budget): r.err_ref for r, budget in zip(rows, [5, 6] * 5)}  # (label, budget) in run order
    # measured on seeds 0-2: at budget 5, fast (orders 3, 2) 2.13 against one order-3 step (3 NFE) 5.5; at 6 NFE
    # (3, 2, 1) 0.375-0.379 against two order-3 steps 0.505-0.521
    assert err["DPM-Solver-fast", 5] < 0.5 * err["DPM-Solver-3", 5], err
    assert err["DPM-Solver-fast", 6] < 0.85 * err["DPM-Solver-3", 6], err


def test_convergence_order_fits_a_power_law():
    rows = [BenchRow("x", n, 3.0 * n ** -2.5) for n in (4, 8, 16, 32)]
    assert math.isclose(convergence_order(rows, "x"), 2.5, rel_tol=1e-9)
    with pytest.raises(ValueError, match="at least two"):
        convergence_order(rows, "x", min_nfe=32)


def test_alpha_sigma_lam_and_power_law_order():
    """The coefficients a DPM-Solver step reads, and the slope fit behind every measured order."""
    from minilcm.metrics import power_law_order
    from minilcm.solvers import CLEAN, alpha_sigma_lam

    s = Schedule("linear")
    for t in (0.0, 312.5, 999.0):
        a, sg, lam = alpha_sigma_lam(s, t)
        tt = torch.tensor(t, dtype=torch.float64)
        assert math.isclose(a, s.alpha(tt).item(), rel_tol=1e-12) and math.isclose(sg, s.sigma(tt).item(), rel_tol=1e-12)
        assert math.isclose(lam, math.log(a / sg), rel_tol=1e-12, abs_tol=1e-12)
    assert alpha_sigma_lam(s, CLEAN) == (1.0, 0.0, math.inf)
    nfe = [5, 10, 20, 40]
    assert math.isclose(power_law_order(nfe, [3.0 * n ** -2.5 for n in nfe]), 2.5, rel_tol=1e-12)
    with pytest.raises(ValueError, match="two"):
        power_law_order([5], [1.0])


# ---- DPM-Solver-fast ----------------------------------------------------------------------------------
def test_dpm_solver_fast_orders_follow_the_paper():
    from minilcm.solvers import dpm_solver_fast_orders

    assert dpm_solver_fast_orders(1) == [1] and dpm_solver_fast_orders(2) == [2]
    assert dpm_solver_fast_orders(6) == [3, 2, 1] and dpm_solver_fast_orders(10) == [3, 3, 3, 1]
    assert dpm_solver_fast_orders(11) == [3, 3, 3, 2]
    for nfe in range(1, 30):
        o = dpm_solver_fast_orders(nfe)
        assert sum(o) == nfe and max(o) <= 3 and len(o) == (nfe // 3 + 1 if nfe >= 3 else 1)
    with pytest.raises(ValueError, match="NFE"):
        dpm_solver_fast_orders(0)


def test_dpm_solver_fast_beats_one_fixed_order_at_equal_nfe_on_the_oracle():
    """Against the 1000-step DDIM solution of the mixture's exact PF-ODE, at the same NFE: one order-3 step over the
    whole lambda range is a usage error (measured 38.4 at 3 NFE, fast 0.45; at 6 NFE 2.33 vs 0.88; 15: 0.17 vs 0.05)."""
    from minilcm.samplers import run_sampler
    from minilcm.toys import GaussianMixture, OracleEps

    sch = Schedule("linear")
    oracle = OracleEps(GaussianMixture(), sch)
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    ref = ddim(oracle, x, sch, sch.timesteps(1000), denoise_to_zero=False).x
    for nfe in (3, 6, 15):
        fast = run_sampler("dpm_solver_fast", oracle, x, sch, nfe)  # the registry's grid and orders
        fixed = dpm_solver(oracle, x, sch, torch.linspace(999, 0, nfe // 3 + 1).tolist(), order=3,
                           denoise_to_zero=False)
        assert fast.nfe == fixed.nfe == nfe
        e_fast, e_fixed = ((s.x - ref).norm(dim=1).mean().item() for s in (fast, fixed))
        assert e_fast < 0.5 * e_fixed, (nfe, e_fast, e_fixed)
