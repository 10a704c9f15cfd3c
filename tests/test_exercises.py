"""The exercise checks: each accepts the package's answer, names each known mistake, and copes with stubs."""
from __future__ import annotations

import re

import pytest
import torch

from minilcm.exercises import all_exercises, check, evaluate, get

EXERCISES = all_exercises()


def first_words(message: str) -> str:
    """The fixed part of a mistake's message, before its first formatted field."""
    return re.split(r"\{", message)[0][:60]


def test_at_least_thirty_exercises_spread_over_the_chapters():
    per_chapter = {c: sum(e.chapter == c for e in EXERCISES.values()) for c in range(1, 8)}
    assert len(EXERCISES) >= 30, per_chapter
    assert all(per_chapter[c] >= 4 for c in range(1, 7)) and per_chapter[7] >= 2, per_chapter
    for e in EXERCISES.values():
        assert e.hint and 1 <= e.difficulty <= 3 and e.title
        assert len(e.mistakes) >= 2, f"{e.name} names fewer than two known mistakes"


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_the_reference_passes_quietly(name, capsys):
    ex = EXERCISES[name]
    fb = evaluate(name, ex.reference)
    assert fb.ok, fb.message
    assert check(name, ex.reference, verbose=False) is ex.reference
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_every_known_mistake_gets_its_own_message(name):
    ex = EXERCISES[name]
    for m in ex.mistakes:
        fb = evaluate(name, m.wrong)
        assert fb.status == "wrong", (name, fb)
        assert first_words(m.message) in fb.message, (name, m.message, fb.message)
        assert not re.search(r"\{(label|got|want|got_mean|got_std|want_mean|want_std|max_diff)[}:]", fb.message)


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_a_stub_is_not_implemented_yet_and_falls_back(name, capsys):
    ex = EXERCISES[name]

    def stub(*args, **kwargs):
        raise NotImplementedError(ex.hint)

    fb = evaluate(name, stub)
    assert fb.status == "not implemented" and "not implemented yet" in fb.message and ex.hint in fb.message
    assert check(name, stub) is ex.reference
    out = capsys.readouterr().out
    assert "not implemented yet" in out and "instead" in out


def test_a_crash_and_a_wrong_dtype_are_named():
    def crash(schedule, x0, t, eps):
        return schedule.alpha(t) * x0  # (B,) * (B, 2): no broadcast

    fb = evaluate("forward_sample", crash)
    assert fb.status == "error" and "RuntimeError" in fb.message and "t = 500" in fb.message

    ref = get("forward_sample").reference

    def float32_always(schedule, x0, t, eps):
        return ref(schedule, x0, t, eps).float()

    fb = evaluate("forward_sample", float32_always)
    assert fb.status == "wrong" and "float32" in fb.message and "float64" in fb.message and "float64 inputs" in fb.message


def test_an_unknown_mistake_gets_the_numbers_and_the_hint():
    ref = get("forward_sample").reference
    fb = evaluate("forward_sample", lambda s, x0, t, e: ref(s, x0, t, e) * 1.01)
    assert fb.status == "wrong" and "max |difference|" in fb.message and "Hint:" in fb.message


def test_strict_raises_on_a_wrong_function():
    with pytest.raises(AssertionError, match="alpha_t and sigma_t are swapped"):
        check("forward_sample", get("forward_sample").mistakes[2].wrong, strict=True)


def test_unknown_exercise_lists_the_names():
    with pytest.raises(KeyError, match="forward_sample"):
        get("no_such_exercise")


# ---- the references that are not the package's own functions, against something independent --------------
def test_posterior_mean_and_ancestral_step_equal_diffusers_ddpm_scheduler():
    from diffusers import DDPMScheduler

    from minilcm.exercises.chapters.ch1_ch2 import LIN, ancestral_step_ref, posterior_mean_ref

    sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small",
                        clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    for t in (999, 500, 1, 0):
        z = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(t))
        want = sch.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        got = ancestral_step_ref(LIN, x_t, t, eps, z)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if t >= 1:
            x0 = sch.step(eps, t, x_t).pred_original_sample
            mean = ancestral_step_ref(LIN, x_t, t, eps, torch.zeros_like(z))
            torch.testing.assert_close(posterior_mean_ref(LIN, x0, x_t, t), mean, rtol=1e-5, atol=1e-5)


def test_solver_references_equal_the_package_samplers():
    from minilcm.diffusion import model_eps
    from minilcm.exercises.chapters.ch3_ch4 import LIN, _Curved, _dpm2_ref, dpm_pp_update_ref
    from minilcm.solvers import dpm_solver, dpm_solver_pp

    m, x = _Curved(), torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    ts = [999.0, 700.0, 400.0, 150.0]
    # DPM-Solver-2, one step 999 -> 700, against the package's sampler on that one interval
    want = dpm_solver(m, x, LIN, [999.0, 700.0], order=2, denoise_to_zero=False).x
    torch.testing.assert_close(_dpm2_ref(m, x, LIN, 999.0, 700.0), want, rtol=1e-5, atol=1e-6)
    # DPM-Solver++(2M): a first-order step, then the exercise's update, equals dpm_solver_pp over the same grid
    want = dpm_solver_pp(m, x, LIN, ts, denoise_to_zero=False).x

    def x0_of(x_, t):
        a, s = LIN.alpha(torch.tensor(t)).item(), LIN.sigma(torch.tensor(t)).item()
        return (x_ - s * model_eps(m, x_, t)) / a

    x0s = [x0_of(x, ts[0])]
    a1, s1 = LIN.alpha(torch.tensor(ts[1])).item(), LIN.sigma(torch.tensor(ts[1])).item()
    s0 = LIN.sigma(torch.tensor(ts[0])).item()
    h = (LIN.lam(torch.tensor(ts[1])) - LIN.lam(torch.tensor(ts[0]))).item()
    y = (s1 / s0) * x - a1 * torch.expm1(torch.tensor(-h)).item() * x0s[0]
    for i in (1, 2):
        x0s.append(x0_of(y, ts[i]))
        y = dpm_pp_update_ref(LIN, y, ts[i - 1], ts[i], ts[i + 1], x0s[-2], x0s[-1])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_cm_references_equal_the_package():
    from minilcm.consistency import CMScalings, cm_timesteps
    from minilcm.exercises.chapters.ch3_ch4 import LIN, cm_scalings_ref, karras_ref
    from minilcm.preconditioning import edm_sigma

    t = torch.tensor([0.0, 3.0, 100.0, 600.0, 999.0], dtype=torch.float64)
    s, s_min = edm_sigma(LIN, t), edm_sigma(LIN, 0.0)
    for sd in (0.5, 1.08):
        for a, b in zip(cm_scalings_ref(s, s_min, sd), CMScalings(sd)(LIN, t, 0.0)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    grid = edm_sigma(LIN, cm_timesteps(LIN, 18))
    torch.testing.assert_close(karras_ref(grid[0].item(), grid[-1].item(), 18), grid, rtol=1e-6, atol=1e-9)


def test_script_huber_and_the_lora_references():
    from minilcm.exercises.chapters.ch5_ch7 import lora_compose_ref, lora_merge_ref, script_huber_ref

    a, b = torch.zeros(2, 3), torch.full((2, 3), 0.3)
    assert abs(script_huber_ref(a, b, 0.4).item() - 0.1) < 1e-6  # sqrt(0.09 + 0.16) - 0.4 = 0.1
    W, A, B = torch.zeros(3, 2), torch.ones(1, 2), torch.ones(3, 1)
    assert torch.equal(lora_merge_ref(W, A, B, 2.0, 1), torch.full((3, 2), 2.0))
    out = lora_compose_ref({"w": torch.ones(2)}, {"w": torch.ones(2)}, {}, 0.5, 1.0)
    assert torch.equal(out["w"], torch.full((2,), 1.5))
