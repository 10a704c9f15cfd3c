"""Training to a wall-clock budget (minilcm.budget; ``TrainConfig(minutes=...)``, ``minilcm train --minutes``).

The steps here sleep a fixed time, so the rate a budgeted run measures is known: each test checks what the run did
against that, not against itself."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minilcm import budget
from minilcm.budget import fit_steps, phase_minutes, rescaled_warmup, run_tag
from minilcm.diffusion import DenoisingLoss
from minilcm.models import MLPDenoiser
from minilcm.schedules import Schedule
from minilcm.toys import GaussianMixture
from minilcm.train import TrainConfig, learning_rate, train

ROOT = Path(__file__).resolve().parents[1]


class SlowLoss(torch.nn.Module):
    """The denoising loss, plus a sleep: ``delay(step)`` seconds per step (a stand-in for a known step time)."""

    def __init__(self, delay):
        super().__init__()
        self.inner, self.delay, self.calls = DenoisingLoss(Schedule()), delay, 0

    def forward(self, model, batch, gen):
        time.sleep(self.delay(self.calls))
        self.calls += 1
        return self.inner(model, batch, gen)


def _run(minutes, delay, ckpt=None, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(steps=500, batch_size=32, lr=1e-3, warmup_steps=50, lr_decay="cosine", progress=False,
                      ckpt_dir=str(ckpt) if ckpt else None, minutes=minutes, **kw)
    res = train(MLPDenoiser(hidden=16, depth=1, num_classes=8), SlowLoss(delay), GaussianMixture(), cfg)
    return cfg, res


def test_fit_steps_and_the_schedule_arithmetic():
    assert fit_steps(60.0, 10.0, 10, 0.5) == 110
    assert fit_steps(60.0, 70.0, 10, 0.5) == 10  # over budget already: no more steps
    assert rescaled_warmup(100, 1000, 300) == 30 and rescaled_warmup(0, 1000, 300) == 0
    assert rescaled_warmup(100, 1000, 2) == 1  # never the whole run
    assert phase_minutes(10.0, 300, 1300) == pytest.approx(10 * 300 / 1300) and phase_minutes(None, 1, 2) is None
    assert run_tag(None) == "" and run_tag(2.5) == "-2.5min"
    with pytest.raises(ValueError):
        fit_steps(1.0, 0.0, 0, 0.0)


def test_a_budgeted_run_fits_its_steps_and_completes_its_schedule():
    cfg, res = _run(0.03, lambda i: 0.02)  # 1.8 s at about 0.02 s a step: about 80 steps
    b = res.budget
    assert b["minutes"] == 0.03 and res.step == cfg.steps == b["steps"] == b["steps_reached"]
    assert 0.02 <= b["seconds_per_step"] < 0.08, b  # the sleep, plus a small MLP's step (a loaded machine: more)
    assert 15 <= res.step <= 90, b
    assert abs(res.seconds - 1.8) < 1.0, (res.seconds, b)
    assert not b["stopped_early"]
    # the schedule was rescaled to the count: warm-up keeps its tenth, the cosine ends at the last step
    assert cfg.warmup_steps == b["warmup_steps"] == rescaled_warmup(50, 500, res.step)
    assert learning_rate(cfg, cfg.steps - 1) < 0.01 * cfg.lr
    assert len(res.losses) == res.step


def test_a_resumed_budgeted_run_keeps_the_count_it_fixed(tmp_path):
    cfg, res = _run(0.03, lambda i: 0.02, ckpt=tmp_path, ckpt_every=20)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["budget"]["steps"] == res.step and saved["step"] == res.step
    # interrupted half-way: train again from the checkpoint at step 20 with the same budget
    half = tmp_path / "half"
    half.mkdir()
    torch.manual_seed(0)

    class Stop(Exception):
        pass

    def delay(i):
        if i == 15:  # the count is fixed after 10 steps, checkpointed at 15, then the run dies
            raise Stop
        return 0.02
    with pytest.raises(Stop):
        _run(0.03, delay, ckpt=half, ckpt_every=5)
    first = json.loads((half / "config.json").read_text())
    assert first["step"] == 15 and first["budget"]["fixed"]
    cfg2, res2 = _run(0.03, lambda i: 0.04, ckpt=half, ckpt_every=5)  # 2x slower now: it must not re-time
    assert res2.resumed_from == 15 and res2.step == cfg2.steps == first["budget"]["steps"]
    assert res2.budget["seconds_per_step"] == first["budget"]["seconds_per_step"]


def test_a_finished_budgeted_run_reruns_as_finished(tmp_path):
    """Rerunning the same command on a finished run trains nothing more and keeps its budget record."""
    cfg, res = _run(0.02, lambda i: 0.02, ckpt=tmp_path)
    cfg2, res2 = _run(0.02, lambda i: 0.02, ckpt=tmp_path)
    assert res2.resumed_from == res.step == res2.step == cfg2.steps and res2.budget == res.budget
    assert json.loads((tmp_path / "config.json").read_text())["budget"] == res.budget


def test_interrupted_before_the_count_is_fixed_it_times_again_within_the_same_budget(tmp_path):
    class Stop(Exception):
        pass

    def delay(i):
        if i == 5:
            raise Stop
        return 0.02
    with pytest.raises(Stop):
        _run(0.03, delay, ckpt=tmp_path, ckpt_every=5)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["step"] == 5 and saved["budget"]["fixed"] is False and saved["budget"]["planned_steps"] == 500
    cfg, res = _run(0.03, lambda i: 0.02, ckpt=tmp_path)
    assert res.resumed_from == 5 and res.budget["fixed"] and res.budget["planned_steps"] == 500
    assert res.budget["timed_at_step"] == 5 + budget.WARM + budget.TIMED


def test_a_checkpoint_of_a_step_counted_run_is_not_resumed_with_a_budget(tmp_path):
    from minilcm.checkpoints import CheckpointError

    torch.manual_seed(0)
    cfg = TrainConfig(steps=5, batch_size=8, progress=False, ckpt_dir=str(tmp_path))
    train(MLPDenoiser(hidden=16, depth=1, num_classes=8), DenoisingLoss(Schedule()), GaussianMixture(), cfg)
    with pytest.raises(CheckpointError, match="not trained with minutes"):
        _run(0.02, lambda i: 0.0, ckpt=tmp_path)


def test_the_overrun_guard_stops_a_run_that_slows_down(monkeypatch, tmp_path):
    monkeypatch.setattr(budget, "GRACE_S", 0.2)
    # fast while timed (0.005 s), then 0.1 s a step: the count fixed for 1.2 s would take far longer
    slow = lambda i: 0.005 if i < budget.WARM + budget.TIMED else 0.1  # noqa: E731
    cfg, res = _run(0.02, slow, ckpt=tmp_path)
    b = res.budget
    assert b["stopped_early"] and res.step == b["steps_reached"] == cfg.steps < b["steps"]
    assert res.seconds < 1.2 * budget.OVERRUN + 0.2 + 1.0, res.seconds
    assert json.loads((tmp_path / "config.json").read_text())["step"] == res.step  # saved where it stopped
    cfg2, res2 = _run(0.02, slow, ckpt=tmp_path)  # the same command again: it is finished where it stopped
    assert res2.step == res.step == res2.resumed_from


def test_minutes_zero_and_minutes_with_steps_are_refused():
    env = {**os.environ, "MINILCM_PROFILE": "fast"}
    for extra, fix in ((["--minutes", "0"], "--minutes must be"), (["--minutes", "1", "--steps", "5"], "not both")):
        r = subprocess.run([sys.executable, "-m", "minilcm.cli", "train", "ddpm", "--out", "runs/never", *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 2 and fix in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (ROOT / "runs" / "never").exists()


@pytest.mark.slow
def test_a_stage_trains_to_its_budget_and_records_it(tmp_path, cifar_archive):
    """``minilcm train ddpm --minutes 0.2`` (fast profile): the steps fit 12 s, the metadata says so."""
    env = {**os.environ, "MINILCM_PROFILE": "fast", "MINILCM_CIFAR": str(cifar_archive),
           "MINILCM_CACHE": str(ROOT / "data" / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddpm"
    r = subprocess.run([sys.executable, "-m", "minilcm.cli", "train", "ddpm", "--minutes", "0.2", "--out", str(out),
                        "--device", "cpu", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    b = meta["budget"]
    assert meta["overrides"] == {"minutes": 0.2} and b["minutes"] == 0.2
    assert meta["steps"] == b["steps"] == b["steps_reached"] and meta["steps"] > budget.WARM + budget.TIMED
    assert meta["images_seen"] == meta["steps"] * meta["recipe"]["batch_size"]
    assert 6 <= meta["wall_seconds"] <= 12 * budget.OVERRUN + budget.GRACE_S, meta["wall_seconds"]
    assert meta["export_seconds"] > 0 and "budget 0.2 min: training took" in r.stdout
