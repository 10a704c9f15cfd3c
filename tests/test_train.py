import math

import pytest
import torch

from minilcm.checkpoints import CheckpointError, load_model, save_model
from minilcm.lcm import LatentConsistencyDistillation, lcm_student
from minilcm.toys import GaussianMixture, OracleEps
from minilcm.diffusion import DenoisingLoss
from minilcm.models import MLPDenoiser
from minilcm.schedules import Schedule
from minilcm.train import NonFiniteLoss, TrainConfig, train


def _setup(**kw):
    torch.manual_seed(0)  # the same initial weights every time
    model = MLPDenoiser(hidden=32, depth=2, num_classes=4)
    loss = DenoisingLoss(Schedule(), cond_drop=0.2, null_class=4)
    return model, loss, GaussianMixture()


def _cfg(tmp_path, steps, **kw):
    return TrainConfig(steps=steps, batch_size=64, lr=1e-3, warmup_steps=5, ema_decay=0.9, seed=3,
                       ckpt_dir=str(tmp_path) if tmp_path else None, progress=False, **kw)


def test_resume_equals_uninterrupted_run(tmp_path):
    model, loss, data = _setup()
    full = train(model, loss, data, _cfg(tmp_path / "full", 30))
    model2, loss2, _ = _setup()
    first = train(model2, loss2, data, _cfg(tmp_path / "split", 12))
    assert first.step == 12
    model3, loss3, _ = _setup()  # a fresh process would build a fresh model
    second = train(model3, loss3, data, _cfg(tmp_path / "split", 30))
    assert second.resumed_from == 12
    for a, b in zip(full.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert full.losses == second.losses


def test_training_reduces_the_loss():
    model, loss, data = _setup()
    res = train(model, loss, data, _cfg(None, 300))
    assert sum(res.losses[-30:]) / 30 < 0.7 * sum(res.losses[:10]) / 10


def test_nan_guard_fires_and_keeps_the_last_good_checkpoint(tmp_path):
    model, loss, data = _setup()
    calls = {"n": 0}

    def poisoned(n, g):
        calls["n"] += 1
        x, y = data(n, g)
        if calls["n"] > 7:
            x[0, 0] = math.nan
        return x, y

    with pytest.raises(NonFiniteLoss) as e:
        train(model, loss, poisoned, _cfg(tmp_path, 20, ckpt_every=5))
    msg = str(e.value)
    assert "step 7" in msg and "learning rate" in msg and str(tmp_path) in msg
    good = MLPDenoiser(hidden=32, depth=2, num_classes=4)
    meta = load_model(good, tmp_path)
    assert meta["step"] == 5 and all(torch.isfinite(p).all() for p in good.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN batch never reached the weights


def test_checkpoint_from_another_architecture_fails_clearly(tmp_path):
    model, loss, data = _setup()
    train(model, loss, data, _cfg(tmp_path, 3))
    other = MLPDenoiser(hidden=48, depth=2, num_classes=4)
    with pytest.raises(CheckpointError, match="different architecture"):
        train(other, loss, data, _cfg(tmp_path, 6))
    with pytest.raises(CheckpointError, match="different architecture"):
        load_model(other, tmp_path)


def test_export_round_trip_and_missing_checkpoint(tmp_path):
    model, _, _ = _setup()
    save_model(model, tmp_path / "exp", dtype=torch.float32, note="hello")
    fresh = MLPDenoiser(hidden=32, depth=2, num_classes=4)
    meta = load_model(fresh, tmp_path / "exp")
    assert meta["note"] == "hello"
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="no shipped checkpoint named .no-such-model.*pass a folder path"):
        load_model(fresh, "no-such-model")


def test_lr_mult_scales_the_named_parameters_updates(tmp_path):
    """Adam's first step moves every parameter by about lr (m / sqrt(v) = +-1): cond_proj by 10x that with
    lr_mult={"cond_proj": 10}, the rest by lr; a resumed run keeps the groups; a name that matches nothing fails."""
    def setup():
        torch.manual_seed(0)
        return MLPDenoiser(hidden=32, depth=2, num_classes=4, time_cond_proj_dim=8)
    sched = Schedule()
    teacher = OracleEps(GaussianMixture(), sched)
    student = lcm_student(setup(), sched, w_dim=8)
    with torch.no_grad():  # the MLP's zero-initialised output layer would leave every other gradient at 0
        student.net.out[1].weight.normal_(0, 0.1)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    loss = LatentConsistencyDistillation(teacher, student, k=20, w_min=0.0, w_max=2.0)
    cfg = TrainConfig(steps=1, batch_size=64, lr=1e-3, progress=False, grad_clip=None, lr_mult={"cond_proj": 10})
    res = train(student, loss, GaussianMixture(), cfg)
    moved = {n: (p.detach() - start[n]).abs().max().item() for n, p in res.model.named_parameters()}
    assert 0.5e-2 < moved["net.cond_proj.weight"] <= 1.0001e-2
    assert all(0.5e-3 < v <= 1.0001e-3 for n, v in moved.items() if "cond_proj" not in n)
    with pytest.raises(ValueError, match="match no parameter"):
        train(setup(), DenoisingLoss(sched), GaussianMixture(), TrainConfig(steps=1, progress=False,
                                                                             lr_mult={"no_such": 2}))
    # resume: 3 + 3 steps equal 6 steps
    def run(path, steps):
        s = lcm_student(setup(), sched, w_dim=8)
        lf = LatentConsistencyDistillation(teacher, s, k=20, w_min=0.0, w_max=2.0)
        return train(s, lf, GaussianMixture(), TrainConfig(steps=steps, batch_size=32, lr=1e-3, progress=False,
                                                           ckpt_dir=str(path), lr_mult={"cond_proj": 10}))
    full = run(tmp_path / "full", 6)
    run(tmp_path / "split", 3)
    again = run(tmp_path / "split", 6)
    assert again.resumed_from == 3 and again.losses == full.losses
