import pytest
import torch
from diffusers import DDPMScheduler

from minilcm.schedules import Schedule

DIFFUSERS = {"linear": dict(beta_schedule="linear"),
             "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
             "cosine": dict(beta_schedule="squaredcos_cap_v2")}


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_equal_diffusers_exactly(kind):
    ours, ref = Schedule(kind), DDPMScheduler(**DIFFUSERS[kind])
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.betas, ref.betas)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_lambda_round_trip(kind):
    s = Schedule(kind)
    lam_min, lam_max = s.lam(999.0).item(), s.lam(0.0).item()
    lam = torch.linspace(lam_min, lam_max, 101, dtype=torch.float64)
    assert (s.lam_continuous(s.t_of_lam(lam)) - lam).abs().max() < 1e-9
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9], dtype=torch.float64)
    assert (s.t_of_lam(s.lam(t)) - t).abs().max() < 1e-7


def test_continuous_time_is_exact_at_integers_and_smooth_between():
    s = Schedule("linear")
    k = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(s.log_alpha_bar(k).exp(), s.alphas_cumprod.double(), rtol=0, atol=1e-15)
    # beta(t) is the derivative of -log alpha_bar: compare with a central difference
    t = torch.tensor([0.3, 12.7, 444.4, 997.5], dtype=torch.float64)
    h = 1e-4
    fd = -(s.log_alpha_bar(t + h) - s.log_alpha_bar(t - h)) / (2 * h)
    assert torch.allclose(s.beta(t), fd, rtol=1e-6, atol=0)
    # and it tracks the discrete rates: log alpha_bar drops by -log(1 - beta_{k+1}) from k to k+1,
    # so the slope at knot k is close to the mean of the two neighbouring drops
    drops = -torch.log1p(-s.betas.double())
    inner = k[5:-10].long()  # away from the natural-spline ends (M = 0 there)
    assert torch.allclose(s.beta(k[inner]), (drops[inner] + drops[inner + 1]) / 2, rtol=1e-3)


def test_snr_is_decreasing_and_sigma_alpha_are_vp():
    for kind in ["linear", "scaled_linear", "cosine"]:
        s = Schedule(kind)
        t = torch.linspace(0, 999, 2001, dtype=torch.float64)
        assert (s.snr(t)[1:] < s.snr(t)[:-1]).all()
        assert torch.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t))


def test_timesteps_validate():
    s = Schedule()
    with pytest.raises(ValueError, match="unknown spacing"):
        s.timesteps(10, "uniformish")
    with pytest.raises(ValueError, match="out of range"):
        s.alpha_bar(torch.tensor(1000.5))
    with pytest.raises(ValueError, match="unknown schedule kind"):
        Schedule("quadratic")
