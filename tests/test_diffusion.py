import pytest
import torch
from diffusers import DDPMScheduler

from minilcm import diffusion as D
from minilcm.schedules import Schedule


@pytest.mark.parametrize("kind,kw", [("linear", {}), ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012))])
def test_add_noise_and_ancestral_step_match_diffusers(kind, kw):
    ours, ref = Schedule(kind), DDPMScheduler(beta_schedule=kind, clip_sample=False, **kw)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    assert (D.q_sample(ours, x0, t, eps) - ref.add_noise(x0, eps, t)).abs().max() <= 1e-5

    model = lambda x, t: torch.tanh(0.5 * x) + 1e-3 * t.reshape(-1, 1, 1, 1)  # noqa: E731  any eps-model
    for n in (1000, 20):
        ref.set_timesteps(n)
        ts = list(ref.timesteps)
        for i in (0, len(ts) // 2, len(ts) - 1):  # first, middle, final (noise-free) step
            x = torch.randn(4, 3, 8, 8, generator=g)
            step = ts[i: i + 2]
            ours_x = D.ddpm(model, x, ours, step, generator=torch.Generator().manual_seed(1),
                            return_trajectory=True).trajectory[1]
            ref_x = ref.step(model(x, ts[i].expand(4).float()), ts[i], x,
                             generator=torch.Generator().manual_seed(1)).prev_sample
            assert (ours_x - ref_x).abs().max() <= 1e-5, (n, int(ts[i]))


def test_clip_matches_diffusers_clip_sample():
    ours, ref = Schedule(), DDPMScheduler(clip_sample=True)
    ref.set_timesteps(10)
    x = 3 * torch.randn(2, 3, 4, 4)
    model = lambda x, t: -x  # noqa: E731  pushes x0 far outside [-1, 1]
    t = ref.timesteps[3]
    ours_x = D.ddpm(model, x, ours, ref.timesteps[3:5], clip_x0=1.0, generator=torch.Generator().manual_seed(2),
                    return_trajectory=True).trajectory[1]
    ref_x = ref.step(model(x, t), t, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert (ours_x - ref_x).abs().max() <= 1e-5


def test_conversions_round_trip():
    s = Schedule()
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 100, 400, 700, 999])
    xt = D.q_sample(s, x0, t, eps)
    assert torch.allclose(D.eps_to_x0(s, xt, t, eps), x0, atol=1e-9)
    assert torch.allclose(D.x0_to_eps(s, xt, t, x0), eps, atol=1e-9)
    v = D.eps_to_v(s, xt, t, eps)
    a, sg = s.alpha(t).reshape(-1, 1), s.sigma(t).reshape(-1, 1)
    assert torch.allclose(v, a * eps - sg * x0, atol=1e-9)  # the definition of v
    assert torch.allclose(D.v_to_eps(s, xt, t, v), eps, atol=1e-9)
    assert torch.allclose(D.score_to_eps(s, xt, t, D.eps_to_score(s, xt, t, eps)), eps)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_losses_are_zero_for_the_perfect_predictor(prediction):
    """Each loss is minimised (exactly 0) by a model that knows the noise: build one from the generator."""
    s = Schedule()
    loss = D.DenoisingLoss(s, prediction=prediction)
    x0 = torch.randn(16, 2)

    class Oracle:  # recovers eps from x_t by replaying the generator the loss used
        def __call__(self, x_t, t):
            g = torch.Generator().manual_seed(7)
            tt = torch.randint(0, s.T, (16,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            assert torch.equal(tt.float(), t)
            out = {"eps": eps, "x0": x0, "v": s.alpha(tt).reshape(-1, 1).float() * eps
                   - s.sigma(tt).reshape(-1, 1).float() * x0}
            return out[prediction]

    assert loss(Oracle(), x0, torch.Generator().manual_seed(7)).item() < 1e-10
    assert loss(lambda x, t: torch.zeros_like(x), x0, torch.Generator().manual_seed(7)).item() > 0.1


def test_bad_inputs_fail_clearly():
    s = Schedule()
    with pytest.raises(ValueError, match="strictly decreasing"):
        D.ddpm(lambda x, t: x, torch.zeros(2, 2), s, [10, 20])
    with pytest.raises(ValueError, match="shaped like its input"):
        D.ddpm(lambda x, t: x[:, :1], torch.zeros(2, 2), s, [10, 0])
    with pytest.raises(ValueError, match="prediction"):
        D.DenoisingLoss(s, prediction="score")


def test_snr_plus_one_weighting_is_the_v_loss():
    """weighting="snr+1" on an eps-model equals the v-prediction loss of the same model written as a v-model,
    v_hat = (eps_hat - sigma_t x_t) / alpha_t (Salimans & Ho 2022): same draws, same number."""
    s = Schedule("linear")
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    eps_model = lambda x, t: net(x) * 0.3 + x  # noqa: E731  (any function of x_t; t unused)

    def v_model(x, t):
        a, sg = s.alpha(t.double()).float().view(-1, 1, 1, 1), s.sigma(t.double()).float().view(-1, 1, 1, 1)
        return (eps_model(x, t) - sg * x) / a

    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    weighted = D.DenoisingLoss(s, weighting="snr+1")(eps_model, x0, torch.Generator().manual_seed(3))
    v_loss = D.DenoisingLoss(s, prediction="v")(v_model, x0, torch.Generator().manual_seed(3))
    plain = D.DenoisingLoss(s)(eps_model, x0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(weighted, v_loss, rtol=2e-4, atol=0)
    assert weighted > plain  # 1 + SNR >= 1
    with pytest.raises(ValueError, match="weighting"):
        D.DenoisingLoss(s, weighting="min-snr")
