"""Consistency models (Chapter 4): scalings, boundary condition, CD / CT losses and their schedules, CM sampling.

Independent references: diffusers' LCMScheduler (scalings and the multistep loop), the closed forms of Song et al.
2023 (App. C) and Karras et al. 2022 (Eq. 5) evaluated from ``alphas_cumprod`` directly, a Monte-Carlo lognormal,
and, on the 2-D mixture, the exact oracle: CD must bring one-step samples to within 2x of the 2-D distance of the
1000-step oracle ODE (its 2-D distance sits at the noise floor of the sample size).
"""
import copy
import math
import time

import pytest
import torch
from torch import nn

from minilcm.consistency import (CMScalings, ConsistencyDistillation, ConsistencyModel, LCMScalings,
                                 cm_sample, cm_timesteps, ddim_solver, paired_forward, pseudo_huber)
from minilcm.ict import ConsistencyTraining, ict_discretisation, ict_weight, lognormal_index_probs
from minilcm.diffusion import TeacherRegression
from minilcm.preconditioning import edm_sigma, EDMPrecond
from minilcm.toys import GaussianMixture, OracleEps
from minilcm.diffusion import eps_to_x0
from minilcm.metrics import sliced_wasserstein
from minilcm.models import MLPDenoiser
from minilcm.schedules import Schedule
from minilcm.sde import euler_step, heun_step
from minilcm.solvers import ddim, ddim_step
from minilcm.train import TrainConfig, train

SCH = Schedule("linear")
MIX = GaussianMixture()
ORACLE = OracleEps(MIX, SCH)


def _random_mlp(seed=0, **kw):
    torch.manual_seed(seed)
    net = MLPDenoiser(hidden=32, depth=1, **kw)
    nn.init.normal_(net.out[-1].weight, std=0.5)  # the zero-initialised output layer would make F trivial
    return net


# ---- the consistency function ---------------------------------------------------------------------
@pytest.mark.parametrize("scaling,t_min", [(CMScalings(0.5), 0.0), (CMScalings(1.3), 0.0), (CMScalings(0.5), 5.3),
                                           (LCMScalings(), 0.0)])
def test_boundary_condition_is_exact(scaling, t_min):
    f = ConsistencyModel(_random_mlp(), SCH, scaling, t_min=t_min)
    x = torch.randn(64, 2)
    t = torch.full((64,), t_min, dtype=torch.float64)
    assert torch.equal(f(x, t), x)
    mixed = t.clone()
    mixed[::2] = 412.7  # a batch mixing t_min with another time keeps the rows at t_min exact
    out = f(x, mixed)
    assert torch.equal(out[1::2], x[1::2])
    assert (out[::2] - x[::2]).abs().max() > 0.1  # and away from t_min, f is not the identity
    with pytest.raises(ValueError, match="t_min"):
        f(x, torch.full((64,), t_min - 0.5 if t_min > 0 else -1.0, dtype=torch.float64))


def test_lcm_scalings_match_diffusers():
    from diffusers import LCMScheduler

    for kw in ({}, {"timestep_scaling": 4.0}):
        ref = LCMScheduler(**kw)
        ours = LCMScalings(**kw)
        for t in [0, 1, 2, 19, 100, 259, 500, 759, 998, 999]:
            c_skip, c_out = ours(SCH, torch.tensor(float(t)), 0.0)
            r_skip, r_out = ref.get_scalings_for_boundary_condition_discrete(t)
            assert abs(c_skip.item() - r_skip) < 1e-12 and abs(c_out.item() - r_out) < 1e-12, (t, kw)


def test_cm_scalings_match_song_et_al_in_edm_variables():
    """Song et al. 2023, App. C with the EDM noise level sigma = sqrt((1 - ab) / ab) read off alphas_cumprod."""
    ab = SCH.alphas_cumprod.double()
    sig = ((1 - ab) / ab).sqrt()
    for sd, t_min in [(0.5, 0), (1.0, 7)]:
        t = torch.arange(t_min, 1000, 37, dtype=torch.float64)
        s, s_min = sig[t.long()], sig[t_min]
        c_skip, c_out = CMScalings(sd)(SCH, t, float(t_min))
        torch.testing.assert_close(c_skip, sd ** 2 / ((s - s_min) ** 2 + sd ** 2), rtol=1e-10, atol=0)
        torch.testing.assert_close(c_out, sd * (s - s_min) / (sd ** 2 + s ** 2).sqrt(), rtol=1e-10, atol=1e-15)


def test_edm_precond_under_cm_scalings_is_song_et_al_parameterisation():
    """ConsistencyModel(EDMPrecond(raw), CMScalings) = c_skip x + c_out raw(c_in x / alpha, t), computed by hand."""
    raw = _random_mlp(1)
    sd = 0.5
    f = ConsistencyModel(EDMPrecond(raw, SCH, sd), SCH, CMScalings(sd))
    x = torch.randn(256, 2) * 3
    t = torch.tensor([0.0, 3.5, 20.0, 101.3, 400.0, 750.25, 998.0, 999.0], dtype=torch.float64).repeat(32)
    s = edm_sigma(SCH, t)
    c_skip, c_out = CMScalings(sd)(SCH, t, 0.0)
    c_in = 1 / (s ** 2 + sd ** 2).sqrt()
    want = c_skip[:, None] * x.double() + c_out[:, None] * raw((c_in / SCH.alpha(t))[:, None].float() * x, t).double()
    torch.testing.assert_close(f(x, t).double(), want, rtol=1e-4, atol=1e-4)


def test_cm_form_starts_as_the_teachers_denoiser():
    """Away from t_min the CM scalings equal EDM's, so f of a copied eps-net is that net's x0-estimate."""
    net = _random_mlp(2)
    f = ConsistencyModel(net, SCH, CMScalings(0.5))
    x = torch.randn(128, 2)
    for tv in (600.0, 999.0):
        t = torch.full((128,), tv, dtype=torch.float64)
        x0_hat = eps_to_x0(SCH, x, t, net(x, t.float()))
        rel = (edm_sigma(SCH, 0.0) / edm_sigma(SCH, tv)).item()  # the size of the CM-vs-EDM difference
        torch.testing.assert_close(f(x, t), x0_hat, rtol=4 * rel, atol=1e-4)


def test_cm_sample_with_lcm_scalings_equals_diffusers_lcm_scheduler():
    """Multistep CM sampling (Algorithm 1) = LCMScheduler's loop, same noise from the same generator."""
    from diffusers import LCMScheduler

    sd = Schedule("scaled_linear")
    net = _random_mlp(3)
    x = torch.randn(32, 2)
    for timesteps in ([999], [999, 759, 499, 259]):
        ref = LCMScheduler()
        ref.set_timesteps(timesteps=timesteps)
        xr, g = x.clone(), torch.Generator().manual_seed(7)
        for t in ref.timesteps:
            xr, denoised = ref.step(net(xr, t.float().expand(32)), t, xr, generator=g, return_dict=False)
        ours = cm_sample(ConsistencyModel(net, sd, LCMScalings()), x, sd, timesteps,
                         generator=torch.Generator().manual_seed(7))
        assert ours.nfe == len(timesteps)
        torch.testing.assert_close(ours.x, denoised, rtol=1e-5, atol=1e-5)


# ---- grids, curricula, distances ------------------------------------------------------------------
def test_cm_timesteps_karras_and_lambda():
    N, rho = 18, 7.0
    ts = cm_timesteps(SCH, N)
    assert ts[0] == 0 and ts[-1] == 999 and len(ts) == N + 1 and torch.all(ts[1:] > ts[:-1])
    s_min, s_max = edm_sigma(SCH, 0.0), edm_sigma(SCH, 999.0)
    i = torch.arange(N + 1, dtype=torch.float64) / N
    karras = (s_min ** (1 / rho) + i * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho  # Karras et al. Eq. 5
    torch.testing.assert_close(edm_sigma(SCH, ts), karras, rtol=1e-8, atol=0)
    lam = SCH.lam(cm_timesteps(SCH, 10, t_min=3.0, spacing="lambda"))
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((10,), (lam[-1] - lam[0]).item() / 10,
                                                                dtype=torch.float64), rtol=1e-8, atol=0)


def test_ict_curriculum():
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 points, K' = floor(K / (log2 floor(s1/s0) + 1)) (iCT, Eq. 8)."""
    K = 8000  # K' = 8000 // 8 = 1000
    got = {k: ict_discretisation(k, K) for k in (0, 999, 1000, 2500, 6999, 7000, 7999)}
    assert got == {0: 10, 999: 10, 1000: 20, 2500: 40, 6999: 640, 7000: 1280, 7999: 1280}
    K_prime = math.floor(1000 / (math.log2(15) + 1))  # s0 = 10, s1 = 150 (Song et al. 2023's CT values)
    assert ict_discretisation(K_prime - 1, 1000, 10, 150) == 10 and ict_discretisation(K_prime, 1000, 10, 150) == 20
    assert ict_discretisation(10 ** 6, 1000, 10, 150) == 150


def test_lognormal_index_probs_match_monte_carlo():
    sig = edm_sigma(SCH, cm_timesteps(SCH, 40))
    p = lognormal_index_probs(sig, -1.1, 2.0)
    assert abs(p.sum().item() - 1) < 1e-12 and torch.all(p >= 0)
    g = torch.Generator().manual_seed(0)
    log_s = -1.1 + 2.0 * torch.randn(400_000, generator=g, dtype=torch.float64)
    log_s = log_s[(log_s >= sig[0].log()) & (log_s < sig[-1].log())]
    freq = torch.bincount(torch.bucketize(log_s, sig.log(), right=True) - 1, minlength=40).double() / len(log_s)
    se = (p * (1 - p) / len(log_s)).sqrt()
    assert torch.all((freq - p).abs() < 5 * se + 1e-6), (freq - p).abs().max()


def test_pseudo_huber():
    a, b = torch.zeros(2, 4), torch.tensor([[3.0, 4.0, 0, 0], [1e-5, 0, 0, 0]])
    c = 0.00054 * 2  # c = 0.00054 sqrt(d), d = 4
    d = pseudo_huber(a, b)
    assert abs(d[0].item() - (math.sqrt(25 + c * c) - c)) < 1e-6  # ~ L2 for large differences
    assert abs(d[1].item() - 1e-10 / (2 * c)) < 1e-10  # ~ L2^2 / (2c) for small ones


# ---- the pieces of the losses ---------------------------------------------------------------------
class _DropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(2, 64), nn.Dropout(0.5), nn.Linear(64, 2)

    def forward(self, x, t):
        return self.b(self.drop(self.a(x)))


def test_paired_forward_shares_dropout_masks():
    online = _DropNet().train()
    target = copy.deepcopy(online).eval()
    x, t = torch.randn(16, 2), torch.zeros(16)
    assert not torch.equal(online(x, t), online(x, t))  # dropout is active
    o, tg = paired_forward(online, target, x, t, x, t)
    assert target.training and torch.equal(o, tg) and o.requires_grad and not tg.requires_grad


def test_batched_teacher_step_equals_row_by_row():
    x = torch.randn(12, 2)
    ts = cm_timesteps(SCH, 18)
    n = torch.tensor([0, 5, 5, 17, 3, 0, 17, 9, 9, 9, 1, 12])
    for solver in (heun_step, euler_step, ddim_solver):  # one batched call with per-row times = one call per row
        out = solver(ORACLE, x, SCH, ts[n + 1], ts[n], {})
        for i in range(12):
            want = solver(ORACLE, x[i:i + 1], SCH, ts[n[i] + 1].item(), ts[n[i]].item(), {})
            torch.testing.assert_close(out[i:i + 1], want, rtol=1e-6, atol=1e-6, msg=solver.__name__)
    eps = ORACLE(x, torch.full((12,), 500.0))
    torch.testing.assert_close(ddim_solver(ORACLE, x, SCH, 500.0, 300.0), ddim_step(SCH, x, 500.0, 300.0, eps))


def test_cd_calls_the_teacher_once_per_step_with_iid_times():
    """CD's teacher sees the whole batch at once (2 calls for Heun), at per-row i.i.d. grid times."""
    calls = []

    class Spy(OracleEps):
        def forward(self, x, t, class_labels=None):
            calls.append(t.clone())
            return super().forward(x, t, class_labels)

    student = ConsistencyModel(EDMPrecond(MLPDenoiser(hidden=16, depth=1), SCH), SCH)
    loss = ConsistencyDistillation(Spy(MIX, SCH), student, N=18, mu=0.9, solver=heun_step)
    loss(student, MIX.sample(64, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert len(calls) == 2 and all(len(t) == 64 for t in calls)
    assert len(torch.unique(calls[0])) > 12  # 64 i.i.d. draws from 18 grid times: not a few shared blocks


def test_cd_target_ema_labels_and_checkpoint_without_teacher():
    seen = []

    class Spy(OracleEps):
        def forward(self, x, t, class_labels=None):
            seen.append(class_labels)
            return super().forward(x, t, class_labels)

    student = ConsistencyModel(EDMPrecond(MLPDenoiser(hidden=16, depth=1, num_classes=4), SCH), SCH)
    loss = ConsistencyDistillation(Spy(MIX, SCH), student, N=6, mu=0.9, use_labels=True)
    batch = MIX.sample(32, torch.Generator().manual_seed(0))
    loss(student, batch, torch.Generator().manual_seed(1)).backward()
    assert all(lab is not None for lab in seen)  # the teacher saw the class labels
    old = [p.clone() for p in loss.target.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    loss.after_step(student, 0)
    for o, tp, sp in zip(old, loss.target.parameters(), student.parameters()):
        torch.testing.assert_close(tp, 0.9 * o + 0.1 * sp)
    keys = loss.state_dict().keys()
    assert any(k.startswith("target.") for k in keys) and not any(k.startswith("teacher.") for k in keys)
    loss.load_state_dict(loss.state_dict())  # loads without asking for the teacher


def test_ct_resume_equals_uninterrupted(tmp_path):
    def run(steps, ckpt):
        torch.manual_seed(0)
        model = ConsistencyModel(EDMPrecond(MLPDenoiser(hidden=16, depth=1), SCH), SCH)
        loss = ConsistencyTraining(SCH, total_steps=8, s0=2, s1=16)
        res = train(model, loss, MIX, TrainConfig(steps=steps, batch_size=32, ckpt_dir=ckpt, ckpt_every=4,
                                                  progress=False))
        return res, loss

    full, loss_full = run(8, None)
    run(4, str(tmp_path))
    resumed, loss_res = run(8, str(tmp_path))
    assert resumed.resumed_from == 4 and int(loss_res.k) == int(loss_full.k) == 8
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b)


# ---- the 2-D mixture with the exact oracle ---------------------------------------------------------
def _swd(x, refs, n_proj=512):
    """Sliced W2 to each reference set, averaged (the references' own spread is the noise floor)."""
    return sum(sliced_wasserstein(x, r, n_proj=n_proj) for r in refs) / len(refs)


@pytest.fixture(scope="module")
def cd_student():
    """CD from the oracle teacher: an EDM-preconditioned MLP (hidden 128, depth 3) first fitted to the oracle as a
    function (it has no weights to copy), then distilled with Heun on the N = 18 Karras grid, iCT's weighting."""
    torch.manual_seed(0)
    c0 = time.process_time()
    net = EDMPrecond(MLPDenoiser(hidden=128, depth=3), SCH, sigma_data=0.5)
    train(net, TeacherRegression(ORACLE, SCH), MIX, TrainConfig(steps=1500, batch_size=256, lr=2e-3, progress=False))
    student = ConsistencyModel(net, SCH, CMScalings(0.5))
    loss = ConsistencyDistillation(ORACLE, student, N=18, mu=0.95, solver=heun_step, weight=ict_weight)
    res = train(student, loss, MIX, TrainConfig(steps=1500, batch_size=256, lr=1e-3, ema_decay=0.99, progress=False))
    return res.ema.eval(), loss.timesteps.tolist(), time.process_time() - c0


@pytest.mark.slow
def test_cd_one_step_within_2x_of_the_1000_step_oracle_ode(cd_student):
    model, _, cpu_s = cd_student
    print(f"CD on the mixture: {cpu_s:.0f} s of CPU")  # a record, not an assertion: a busy machine is slower
    n = 4000
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    refs = [MIX.sample(n, torch.Generator().manual_seed(s))[0] for s in (2, 3, 4)]
    d_ode = _swd(ddim(ORACLE, x_T, SCH, SCH.timesteps(1000)).x, refs)  # the exact-solver yardstick (~ noise floor)
    d_one = _swd(cm_sample(model, x_T, SCH, [999]).x, refs)
    # measured: d_ode 0.048, d_one 0.058 (ratio 1.2); ratios 1.1-1.6 over training seeds 0-5. Pure noise: 1.1
    assert d_one < 2 * d_ode, f"1-step CD {d_one:.4f} vs 1000-step oracle ODE {d_ode:.4f}"


@pytest.mark.slow
def test_two_steps_beat_one_step(cd_student):
    model, grid, _ = cd_student
    n = 20_000  # two 20k data sets sit 0.01-0.02 apart. Measured: d1 0.040, d2 0.024; d2/d1 0.37-0.61 over seeds 0-5
    # the re-noising generator must not share x_T's seed: the same z re-injected biases the result (ring too large)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(5))
    refs = [MIX.sample(n, torch.Generator().manual_seed(s))[0] for s in (6, 7)]
    d1 = _swd(cm_sample(model, x_T, SCH, [999]).x, refs, n_proj=128)
    d2 = _swd(cm_sample(model, x_T, SCH, [999, grid[5]], generator=torch.Generator().manual_seed(8)).x, refs,
              n_proj=128)
    assert d2 < 0.8 * d1, f"2-step {d2:.4f} vs 1-step {d1:.4f}"


@pytest.mark.slow
def test_ct_beats_the_untrained_model():
    torch.manual_seed(0)
    model = ConsistencyModel(EDMPrecond(MLPDenoiser(hidden=128, depth=3), SCH, 0.5), SCH, CMScalings(0.5))
    untrained = copy.deepcopy(model).eval()
    steps = 1000
    res = train(model, ConsistencyTraining(SCH, total_steps=steps), MIX,
                TrainConfig(steps=steps, batch_size=256, lr=1e-3, ema_decay=0.99, progress=False))
    n = 4000
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    refs = [MIX.sample(n, torch.Generator().manual_seed(s))[0] for s in (2, 3)]
    d_ct = _swd(cm_sample(res.ema.eval(), x_T, SCH, [999]).x, refs)
    d_untrained = _swd(cm_sample(untrained, x_T, SCH, [999]).x, refs)
    assert d_ct < 0.5 * d_untrained, f"CT {d_ct:.4f} vs untrained {d_untrained:.4f}"  # measured 0.116 vs 1.08


# ---- the pixel-space recipe -------------------------------------------------------------------------
@pytest.mark.slow
def test_cifar_cd_recipe_trains_checkpoints_and_loads_when_shipped(cifar_archive, tmp_path, monkeypatch):
    import minilcm.checkpoints as ckpts
    from minilcm.checkpoints import save_model
    from minilcm.models import cifar_unet
    from minilcm.recipes import CD_NAME, CifarCDRecipe, cifar_cd_student

    monkeypatch.setenv("MINILCM_CIFAR", str(cifar_archive))
    monkeypatch.setattr(ckpts, "SHIPPED_DIR", tmp_path / "shipped")  # no shipped student: distil here
    teacher = cifar_unet("tiny", num_classes=10).eval()
    student, info = cifar_cd_student(CifarCDRecipe(steps=2, batch_size=4), teacher=teacher,
                                     ckpt_dir=str(tmp_path / "run"), progress=False)
    assert info["source"] == "trained here" and len(info["losses"]) == 2 and not student.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(student(x, torch.zeros(2)), x)
    tensors, _ = ckpts.load_checkpoint(tmp_path / "run")
    assert any(k.startswith("loss.target.") for k in tensors)
    assert not any(k.startswith("loss.teacher.") for k in tensors)
    s = cm_sample(student, x, student.schedule, [999.0, 500.0], generator=torch.Generator().manual_seed(0))
    assert s.x.shape == x.shape and s.nfe == 2

    save_model(student, tmp_path / "shipped" / CD_NAME, dtype=torch.float32)  # as the checkpoints issue will
    shipped, info = cifar_cd_student(progress=False)
    assert info["source"] == "shipped"
    torch.testing.assert_close(shipped(x, torch.full((2,), 999.0)), student(x, torch.full((2,), 999.0)))


def test_cd_step_benchmark_tiny_runs(tmp_path):
    """benchmarks/cd_step.py: the batched Heun solve and the per-time loop it replaced agree, and both are timed."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cd_step.py"
    spec = importlib.util.spec_from_file_location("cd_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "cd_step.json"
    res = bench.main(["--tiny", "--repeats", "1", "--out", str(out)])
    assert res["max_abs_diff"] < 1e-4 and res["solve_s_batched"] > 0 and res["solve_s_per_time"] > 0
    assert res["distinct_times_per_batch"][0] > 1 and res["cd_step_s_batched"] > res["solve_s_batched"]
    assert json.loads(out.read_text())["tiny"] is True
