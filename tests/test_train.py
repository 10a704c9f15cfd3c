import math

import pytest
import torch

from minilcm.checkpoints import CheckpointError, load_model, save_model
from minilcm.toys import GaussianMixture
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
