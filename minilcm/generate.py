"""One way to turn a checkpoint into images: ``generate(model, sampler, steps, n)``, shared by ``minilcm sample``,
``minilcm bench`` and the notebooks.

    out = generate("lcm-cifar10", "lcm", steps=4, n=100, w=1.0)          # a shipped name or a folder path
    out.images  (N, 32, 32, 3) uint8 RGB,  out.labels (N,) CIFAR-10 class index (-1: unconditional)
    out.seconds_per_image, out.nfe

``model`` is a shipped name, a folder path or a ``zoo.LoadedModel`` (the model zoo loads all three kinds of
folder); ``sampler`` is a name of the sampler registry (``minilcm.samplers``).

Guidance w is in the LCM convention, eps_w = (1 + w) eps(x, t, c) - w eps(x, t, null) (Luo et al. 2023, Eq. 9);
diffusers' ``guidance_scale`` is w + 1. A teacher pays for CFG with a fused batch of 2B rows per evaluation; the
LCM student has w baked in (B rows). The time reported is the wall clock of sampling and decoding, per image.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .datasets import CIFAR10_CLASSES, to_uint8
from .errors import InputError
from .samplers import SAMPLER_NAMES, get_sampler, sample_images
from .schedules import whole_number
from .zoo import LoadedModel, guidance_range, load_model_folder

@dataclass
class Generated:
    """What ``generate`` returns."""

    images: np.ndarray          # (N, 32, 32, 3) uint8, RGB
    labels: np.ndarray          # (N,) int64: the CIFAR-10 class index asked for, -1 when unconditional
    seconds_per_image: float    # wall clock of sampling + decoding (+ text encoding), divided by N
    nfe: int                    # network evaluations per sample (a CFG teacher's fused 2B-row call counts once)
    rows_per_eval: int = 1      # 2 for a teacher under CFG (cond + uncond rows), 1 otherwise
    info: dict = field(default_factory=dict)

    @property
    def images_nchw(self) -> torch.Tensor:
        """The images as a uint8 tensor (N, 3, 32, 32), the evaluator's input."""
        return torch.from_numpy(self.images).permute(0, 3, 1, 2).contiguous()


# ---- conditions ---------------------------------------------------------------------------------------
def parse_class(c) -> int:
    """A CIFAR-10 class index (0-9, int or digit string) or name ("cat") -> the index."""
    if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.strip().lstrip("-").isdigit()):
        i = int(c)
        if not 0 <= i < len(CIFAR10_CLASSES):
            raise InputError(f"class index {i} is out of range: CIFAR-10 has classes 0-9 ({', '.join(CIFAR10_CLASSES)})")
        return i
    name = str(c).strip().lower()
    if name not in CIFAR10_CLASSES:
        raise InputError(f"unknown class {c!r}; use an index 0-9 or one of: {', '.join(CIFAR10_CLASSES)}")
    return CIFAR10_CLASSES.index(name)


def prompt_label(prompt: str) -> int:
    """The CIFAR-10 class a prompt names, when exactly one class word appears in it; else -1."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    hits = [i for i, c in enumerate(CIFAR10_CLASSES) if c in words]
    return hits[0] if len(hits) == 1 else -1


def balanced_labels(n: int) -> np.ndarray:
    """0, 1, ..., 9, 0, 1, ...: every class n // 10 or n // 10 + 1 times."""
    return np.arange(n, dtype=np.int64) % len(CIFAR10_CLASSES)


# ---- counting and checking ----------------------------------------------------------------------------
class NFECounter:
    """Counts forward calls of a module (each is one network evaluation, whatever its batch)."""

    def __init__(self, module: torch.nn.Module, bar=None):
        self.calls, self.bar = 0, bar
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        self.handle.remove()
        if self.bar is not None:
            self.bar.close()


def check_request(sampler: str, steps, n, *, w=1.0, batch=250, prompt=None) -> None:
    """Reject impossible requests before any model is loaded: whole numbers >= 1 for steps, n and batch; a finite
    w; a non-empty prompt."""
    if sampler not in SAMPLER_NAMES:
        raise InputError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLER_NAMES)}")
    for name, v in (("steps", steps), ("n (the number of images)", n), ("batch", batch)):
        try:
            v = whole_number(v, name)
        except ValueError as e:
            raise InputError(str(e)) from None
        if v < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not math.isfinite(w):
        raise InputError(f"the guidance w must be a finite number (LCM convention, guidance_scale = w + 1), got {w!r}")
    if prompt is not None and not str(prompt).strip():
        raise InputError("the prompt is empty (that is the unconditional prompt): give a text, or leave --prompt out "
                         "to sample the ten classes")


# ---- generation ---------------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _check_fits(m: LoadedModel, sampler: str, steps: int, w: float) -> None:
    """Fail before any work when the step count does not fit the sampler's grid; warn when w is outside the range a
    student was distilled on."""
    try:  # the grid each sampler will run: an impossible step count fails here, before any work
        get_sampler(sampler).grid(m.schedule, steps)
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"--steps {steps} does not fit the {sampler} sampler: {e}") from e
    rng = guidance_range(m) if m.conditional != "none" else None
    if rng is not None and not rng[0] <= w <= rng[1]:
        warnings.warn(f"w = {w:g} is outside the range this student was distilled on, w in [{rng[0]:g}, {rng[1]:g}] "
                      "(LCM convention): expect poor images", stacklevel=3)


def _conditions(m: LoadedModel, n: int, class_, prompt, labels):
    """(prompts or None, labels (n,)) for a request: a prompt, explicit labels, one class, or the ten classes evenly;
    a condition the model cannot take is an InputError."""
    if prompt is not None and (class_ is not None or labels is not None):
        raise InputError("give a class or a prompt, not both")
    if prompt is not None and m.conditional != "text":
        raise InputError(f"--prompt needs a text-conditioned model (the mini-SD or its LCM student); the {m.kind} "
                         f"model in {m.path} is " + ("class-conditional: use --class" if m.conditional == "class"
                                                     else "unconditional"))
    if m.conditional == "none" and (class_ is not None or labels is not None):
        raise InputError(f"the {m.kind} model in {m.path} is unconditional: it takes no class")
    prompts = None
    if prompt is not None:
        prompts, lab = [prompt] * n, np.full(n, prompt_label(prompt), dtype=np.int64)
    elif m.conditional == "none":
        lab = np.full(n, -1, dtype=np.int64)
    elif labels is not None:
        lab = np.array([parse_class(c) for c in labels], dtype=np.int64)
        if len(lab) != n:
            raise InputError(f"{len(lab)} labels for n={n} images")
    elif class_ is not None:
        lab = np.full(n, parse_class(class_), dtype=np.int64)
    else:
        lab = balanced_labels(n)
    return prompts, lab


def generate(model, sampler: str, steps: int, n: int, *, w: float = 1.0, class_=None, prompt: str | None = None,
             labels=None, seed: int = 0, batch: int = 250, device: str = "cpu", warmup: bool = True,
             progress: bool = False) -> Generated:
    """Sample ``n`` images from ``model`` (a shipped name, a folder path or a ``LoadedModel``) with ``sampler``
    at ``steps`` network evaluations.

    class_  one CIFAR-10 class (index or name) for all images; ``labels`` an explicit (n,) array of classes;
            neither: a conditional model samples the classes evenly (0, 1, ..., 9, 0, ...).
    prompt  free text for the text-conditioned mini-SD / LCM student; the label is the class the prompt names
            when it names exactly one, else -1.
    w       guidance in the LCM convention (diffusers guidance_scale = w + 1); ignored by unconditional models.
    seed    one torch.Generator seeded with it draws every noise: the same seed gives the same x_T for every
            sampler and model of the same latent shape.
    warmup  sample one image first (untimed), so that one-off start-up costs stay out of the time per image.
    progress  a tqdm bar over network evaluations (``minilcm sample`` shows it unless --quiet).
    Impossible requests (steps 2.5, n 0, w nan, an empty prompt, ...) raise ValueError before any work; a w
    outside a student's distillation range gives a warning naming that range.
    """
    check_request(sampler, steps, n, w=w, batch=batch, prompt=prompt)
    steps, n, batch = int(steps), int(n), int(batch)
    m = model if isinstance(model, LoadedModel) else load_model_folder(model, device=device)
    if sampler not in m.samplers:
        raise InputError(f"sampler {sampler!r} does not fit the {m.kind} model in {m.path}; valid: "
                         f"{', '.join(m.samplers)}")
    _check_fits(m, sampler, steps, w)
    prompts, lab = _conditions(m, n, class_, prompt, labels)
    if warmup:
        sample_images(m, sampler, min(steps, 2), lab[:1], None if prompts is None else prompts[:1], w,
                      torch.Generator().manual_seed(seed + 1))
    g = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        n_batches_total = -(-n // batch)
        bar = tqdm(total=n_batches_total * steps, desc=f"sample {n} ({sampler}, {steps} steps)", unit="NFE",
                   leave=False, mininterval=1.0)
    counter = NFECounter(m.net, bar)
    out, n_batches = [], 0
    try:
        _sync(m.device)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            pr = None if prompts is None else prompts[i:i + batch]
            out.append(sample_images(m, sampler, steps, lab[i:i + batch], pr, w, g))
            n_batches += 1
        _sync(m.device)
        seconds = time.perf_counter() - t0
    finally:
        counter.close()
    x = torch.cat(out)
    images = to_uint8(x).permute(0, 2, 3, 1).contiguous().numpy()
    rows = 2 if m.kind in ("minisd", "pixel-teacher") and m.conditional != "none" else 1
    return Generated(images, lab, seconds / n, counter.calls // n_batches, rows,
                     {"model": str(m.path), "kind": m.kind, "sampler": sampler, "steps": steps, "w": w,
                      "seed": seed, "batch": batch, "device": str(m.device), "seconds": seconds})
