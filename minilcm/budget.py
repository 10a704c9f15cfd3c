"""Training to a wall-clock budget: ``TrainConfig(minutes=M)``, and ``minilcm train STAGE --minutes M``.

"Train this for 10 minutes on my laptop" and "fit the gpu profile into one 15-minute GPU lease" are the same
request. A budgeted run of ``train.train``

1. runs ``WARM`` steps untimed (the first steps allocate memory, autotune kernels and fill caches), then times the
   next ``TIMED`` steps;
2. fixes its step count to what fits in the budget at that rate, ``n = done + floor((budget - elapsed) / rate)``,
   and rescales its learning-rate schedule to it (the cosine decay ends at ``n``; a warm-up keeps its fraction of
   the run), so the schedule completes instead of being cut off;
3. records the budget, the measured rate and the steps in ``TrainResult.budget`` and in every checkpoint. A resumed
   run reads the count back and keeps it: it finishes the same schedule (bit for bit on the CPU, as without a
   budget), and does not re-time.

A run whose steps turn out slower than timed (checkpoints, a busy machine) is stopped at ``OVERRUN`` x its budget
plus ``GRACE_S``, whatever step it is at, and says so in ``budget["stopped_early"]``. The budget covers the training
loop only: loading, export and measurement are bounded by the stage and reported beside it (``stages.run_stage``).
A stage of two training phases (the autoencoder's two, the lcm stage's guidance warm start and LCD) splits its
budget between them in proportion to the profile's step counts (``phase_minutes``).
"""
from __future__ import annotations

import math
import time

from .checkpoints import CheckpointError

WARM = 2          # untimed steps at the start
TIMED = 8         # steps timed to measure the rate
OVERRUN = 1.10    # a run past 110% of its budget (plus GRACE_S) stops where it is
GRACE_S = 5.0
MAX_MINUTES = 24 * 60


def fit_steps(budget_s: float, elapsed_s: float, done: int, s_per_step: float) -> int:
    """The step count that fits: the steps done, plus as many more as the time left allows at the measured rate."""
    if s_per_step <= 0:
        raise ValueError(f"s_per_step must be positive, got {s_per_step}")
    return done + max(0, math.floor((budget_s - elapsed_s) / s_per_step))


def rescaled_warmup(warmup: int, old_steps: int, new_steps: int) -> int:
    """A warm-up keeps its fraction of the run (at least one step when it had any, never the whole run)."""
    if warmup <= 0:
        return 0
    return max(1, min(round(warmup * new_steps / max(1, old_steps)), max(1, new_steps - 1)))


def phase_minutes(minutes: float | None, steps: int, total_steps: int) -> float | None:
    """A phase's share of its stage's budget, in proportion to its steps in the profile."""
    if minutes is None:
        return None
    return minutes * steps / max(1, total_steps)


def run_tag(minutes: float | None) -> str:
    """The suffix of a budgeted run's checkpoint folder: a budgeted run never resumes a step-counted one."""
    return "" if minutes is None else f"-{minutes:g}min"


class StepBudget:
    """The budget of one ``train`` call. ``after_step(done, start)`` is called after every completed step; it fixes
    the count once the rate is timed, and returns True when the run must stop early (the overrun guard).
    ``info`` is the record saved with every checkpoint: provisional (``"fixed": False``) until the count is fixed."""

    def __init__(self, cfg, saved: dict | None, t0: float, start: int, world: int = 1):
        if not (0 < cfg.minutes <= MAX_MINUTES):
            raise ValueError(f"minutes must be in (0, {MAX_MINUTES}], got {cfg.minutes}")
        if world > 1:  # each rank would time itself and fix its own count: the ranks would disagree
            raise ValueError("a time budget (minutes=) is not supported with several processes yet; use steps=")
        if start > 0 and (saved is None or saved.get("minutes") != cfg.minutes):
            raise CheckpointError(f"the checkpoint in {cfg.ckpt_dir} was not trained with minutes={cfg.minutes}: "
                                  "resume it with the settings it was started with, or use another folder")
        self.cfg, self.t0, self.budget_s = cfg, t0, 60.0 * cfg.minutes
        self.t_timed: float | None = None
        saved = dict(saved or {})
        self.spent = float(saved.get("train_seconds", 0.0))  # a resumed run's budget counts its earlier time
        self.planned_steps = saved.get("planned_steps", cfg.steps)
        self.planned_warmup = saved.get("planned_warmup", cfg.warmup_steps)
        if saved.get("fixed"):  # a resumed run: the count it fixed, not a new one
            self.info = saved
            cfg.steps, cfg.warmup_steps = saved["steps"], saved["warmup_steps"]
            if saved.get("stopped_early"):  # the overrun guard ended it: it is complete where it stopped
                cfg.steps = saved["steps_reached"]
        else:  # fresh, or interrupted before the count was fixed: time the steps from here
            self.info = {"minutes": cfg.minutes, "fixed": False, "planned_steps": self.planned_steps,
                         "planned_warmup": self.planned_warmup, "train_seconds": round(self.spent, 2)}
            cfg.steps = 10 ** 9  # no end until the rate is measured

    @property
    def fixed(self) -> bool:
        return bool(self.info.get("fixed"))

    def total(self) -> int:
        """The step count to report: the fixed one, or the planned one while timing."""
        return self.cfg.steps if self.fixed else self.planned_steps

    def elapsed(self) -> float:
        return self.spent + time.perf_counter() - self.t0

    def after_step(self, done: int, start: int) -> bool:
        now = time.perf_counter()
        self.info["train_seconds"] = round(self.elapsed(), 2)
        if not self.fixed:
            if done == start + WARM:
                self.t_timed = now
            n_timed = done - start - WARM
            if (self.t_timed is not None and n_timed >= TIMED) or self.elapsed() >= self.budget_s:
                # the budget may run out before the timing does: then the steps so far are the run
                rate = (now - self.t_timed) / n_timed if n_timed > 0 else (now - self.t0) / max(1, done - start)
                self.fix(done, rate)
            return False
        self.info["steps_reached"] = done
        if done < self.cfg.steps and self.elapsed() > OVERRUN * self.budget_s + GRACE_S:
            self.info["stopped_early"] = True
            return True
        return False

    def fix(self, done: int, rate: float) -> None:
        """Fix the run's step count and its schedule from the measured seconds per step. The steps timed ran with
        the planned warm-up (``timing_warmup``); the rest follow the rescaled one (``warmup_steps``)."""
        cfg = self.cfg
        n = max(done, fit_steps(self.budget_s, self.elapsed(), done, rate))
        cfg.steps = n
        cfg.warmup_steps = min(rescaled_warmup(self.planned_warmup, self.planned_steps, n), max(0, n - 1))
        self.info.update({"fixed": True, "seconds_per_step": round(rate, 5), "steps": n,
                          "warmup_steps": cfg.warmup_steps, "timing_warmup": self.planned_warmup,
                          "timed_at_step": done, "steps_reached": done, "stopped_early": False})
