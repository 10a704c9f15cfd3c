"""The LCM playground (Chapter 5): turn w, the number of steps, the class and the seed, and see the student redraw.

    panel = lcm_playground(sd, student)        # an ipywidgets panel in JupyterLab; None without ipywidgets
    imgs, seconds = render(sd, student, w=1.0, steps=4, label=3, seed=0)   # one grid, timed

Each change redraws ``n`` images from the shipped LCM student: ``steps`` student evaluations of n rows, then the
VAE decoder. The same seed gives the same starting noise for every setting, so what changes in the grid is what the
knob changed; "teacher" draws the 25-step DPM-Solver++ result from that same noise, for comparison. Executed
without a live frontend (nbval, the site build) the panel is a static figure of its first setting.
"""
from __future__ import annotations

import time

import torch

from .datasets import CIFAR10_CLASSES
from .viz import show_images

TEACHER = ("dpm_solver_pp", 25)


def render(sd, student, *, w: float = 1.0, steps: int = 4, label: int = 0, seed: int = 0, n: int = 16,
           teacher: bool = False):
    """(images (n, 3, 32, 32) in [-1, 1], wall seconds): n images of class ``label`` from the student at (w, steps),
    or from the teacher's 25-step DPM-Solver++ with ``teacher=True``, all from the noise of ``seed``."""
    labels = torch.full((n,), int(label))
    t0 = time.perf_counter()
    with torch.no_grad():
        if teacher:
            imgs = sd.sample(*TEACHER, labels=labels, w=w, generator=torch.Generator().manual_seed(seed))
        else:
            imgs = sd.sample("lcm", steps, labels=labels, w=w, student=student,
                             generator=torch.Generator().manual_seed(seed))
    return imgs, time.perf_counter() - t0


def _figure(imgs, title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.6))
    show_images(imgs, nrow=4, ax=ax, title=title)
    return fig


def lcm_playground(sd, student, *, n: int = 16, w: float = 1.0, steps: int = 4, label: int = 3, seed: int = 0):
    """A panel of sliders (w 0..4, steps 1..8), a class menu, a seed box and a teacher button over an image grid.

    Returns the ipywidgets panel (display it as a cell's last expression), or None when ipywidgets is missing; in
    both cases a static figure of the first setting is shown first, so an executed notebook carries a picture."""
    import matplotlib.pyplot as plt
    from IPython.display import display

    imgs, secs = render(sd, student, w=w, steps=steps, label=label, seed=seed, n=n)
    fig = _figure(imgs, f"LCM, {steps} steps, w = {w:g}, {CIFAR10_CLASSES[label]}: {secs * 1e3:.0f} ms")
    plt.show()
    try:
        import ipywidgets as W
    except ImportError:
        print("pip install ipywidgets for the interactive panel")
        return None
    plt.close(fig)
    ws = W.FloatSlider(value=w, min=0.0, max=4.0, step=0.25, description="w")
    st = W.IntSlider(value=steps, min=1, max=8, description="steps")
    cl = W.Dropdown(options=[(c, i) for i, c in enumerate(CIFAR10_CLASSES)], value=label, description="class")
    sdw = W.IntText(value=seed, description="seed")
    tb = W.Button(description="teacher, 25 steps")
    out = W.Output()

    def redraw(*_, teacher=False):
        imgs, secs = render(sd, student, w=ws.value, steps=st.value, label=cl.value, seed=sdw.value, n=n,
                            teacher=teacher)
        who = "teacher DPM-Solver++, 25 steps" if teacher else f"LCM, {st.value} steps"
        with out:
            out.clear_output(wait=True)
            display(_figure(imgs, f"{who}, w = {ws.value:g}: {secs * 1e3:.0f} ms"))
            plt.close("all")

    for c in (ws, st, cl, sdw):
        c.observe(redraw, names="value")
    tb.on_click(lambda _: redraw(teacher=True))
    redraw()
    return W.VBox([W.HBox([ws, st]), W.HBox([cl, sdw, tb]), out])
