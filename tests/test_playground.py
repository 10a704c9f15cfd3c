"""The LCM playground: one redraw is a timed grid from the shipped student; the panel's knobs redraw it."""
from __future__ import annotations

import pytest
import torch

from minilcm.playground import lcm_playground, render


@pytest.fixture(scope="module")
def models():
    from minilcm.minisd import MiniSD
    from minilcm.zoo import load_lcm_student

    return MiniSD.load(), load_lcm_student()


def test_render_student_and_teacher_from_the_same_noise(models):
    sd, student = models
    a, secs = render(sd, student, w=1.0, steps=2, label=3, seed=5, n=4)
    b, _ = render(sd, student, w=1.0, steps=2, label=3, seed=5, n=4)
    c, _ = render(sd, student, w=3.0, steps=2, label=3, seed=5, n=4)
    assert a.shape == (4, 3, 32, 32) and secs > 0 and torch.equal(a, b) and not torch.equal(a, c)
    t, _ = render(sd, student, w=1.0, label=3, seed=5, n=2, teacher=True)
    assert t.shape == (2, 3, 32, 32) and torch.isfinite(t).all()


def test_the_panel_redraws_when_a_knob_turns(models, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    pytest.importorskip("ipywidgets")
    import minilcm.playground as pg

    calls = []
    real = pg.render
    monkeypatch.setattr(pg, "render", lambda *a, **k: calls.append(k) or real(*a, **{**k, "n": 2}))
    sd, student = models
    panel = lcm_playground(sd, student, n=2)
    assert panel is not None and len(calls) == 2  # the static figure, then the panel's first draw
    w_slider = panel.children[0].children[0]
    w_slider.value = 2.5
    assert calls[-1]["w"] == 2.5 and not calls[-1]["teacher"]
    panel.children[1].children[2].click()
    assert calls[-1]["teacher"] is True
