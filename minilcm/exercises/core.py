"""The exercise checker: a learner's function against the package's, on cases chosen to catch the usual mistakes.

    ex = Exercise(name, chapter, title, difficulty, hint, reference, cases, mistakes)
    check("forward_sample", forward_sample)   -> the function to use from here on (yours if right, else the package's)
    evaluate("forward_sample", fn)            -> Feedback(status, message): what ``check`` prints

An exercise's ``cases`` are inputs (a fresh list per call) that tell the usual mistakes apart: t = 0 and t = T - 1,
per-row times, float64 inputs. Its ``mistakes`` are known-wrong versions of the function, each with the message a
learner should read when their output matches it ("did you scale by alpha_bar instead of sqrt(alpha_bar)?"). A
function that raises NotImplementedError is "not implemented yet", never a crash. Everything is compared with
``torch.allclose``-style tolerances, after checking type, shape and dtype, so that a wrong dtype is named as such.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

STATUSES = ("correct", "not implemented", "wrong", "error")


@dataclass
class Case:
    """One input: ``label`` says it in the learner's terms ("t = 999, a batch of 4096")."""

    label: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class Mistake:
    """A known-wrong version of the function and what to tell a learner whose output matches it.

    ``message`` is formatted with: label, got_mean, got_std, want_mean, want_std, got, want, max_diff."""

    wrong: Callable
    message: str


@dataclass
class Exercise:
    name: str
    chapter: int
    title: str
    difficulty: int  # 1 (a line or two) .. 3 (a page of thought)
    hint: str
    reference: Callable
    cases: Callable[[], list]
    mistakes: list = field(default_factory=list)
    rtol: float = 1e-4
    atol: float = 1e-5

    @property
    def stars(self) -> str:
        return "*" * self.difficulty


@dataclass
class Feedback:
    status: str
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "correct"


REGISTRY: dict[str, Exercise] = {}


def register(ex: Exercise) -> Exercise:
    if ex.name in REGISTRY:
        raise ValueError(f"exercise {ex.name!r} is registered twice")
    if not 1 <= ex.difficulty <= 3:
        raise ValueError(f"difficulty must be 1..3, got {ex.difficulty}")
    REGISTRY[ex.name] = ex
    return ex


def get(name: str) -> Exercise:
    from . import chapters  # noqa: F401  (a cycle: chapters/ imports this module; importing registers them)

    if name not in REGISTRY:
        raise KeyError(f"no exercise {name!r}; the exercises are: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


# ---- comparing outputs ------------------------------------------------------------------------------
def _leaves(x):
    if isinstance(x, (tuple, list)) and not (x and all(isinstance(v, (int, float)) for v in x)):
        return [leaf for v in x for leaf in _leaves(v)]
    return [x]


def _as_tensor(x):
    if torch.is_tensor(x):
        return x
    if isinstance(x, (int, float)) or (isinstance(x, (list, tuple)) and all(isinstance(v, (int, float)) for v in x)):
        return torch.as_tensor(x, dtype=torch.float64)
    return None


def mismatch(got, want, rtol: float, atol: float) -> str | None:
    """None if ``got`` matches ``want``; else what differs, in plain words (type, length, shape, dtype, values)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"your function returned a {type(got).__name__}, expected a dict"
        if set(got) != set(want):
            return f"your dict has the keys {sorted(got)}, expected {sorted(want)}"
        for k in want:
            problem = mismatch(got[k], want[k], rtol, atol)
            if problem is not None:
                return f"{problem} (key {k!r})"
        return None
    g_leaves, w_leaves = _leaves(got), _leaves(want)
    if len(g_leaves) != len(w_leaves):
        return f"your function returned {len(g_leaves)} value(s), expected {len(w_leaves)}"
    for i, (g, w) in enumerate(zip(g_leaves, w_leaves)):
        where = f" (returned value {i + 1})" if len(w_leaves) > 1 else ""
        gt, wt = _as_tensor(g), _as_tensor(w)
        if gt is None:
            return f"your function returned a {type(g).__name__}{where}, expected a {type(w).__name__}"
        if torch.is_tensor(w) and not torch.is_tensor(g):
            return f"your function returned a {type(g).__name__}{where}, expected a torch tensor"
        if tuple(gt.shape) != tuple(wt.shape):
            return f"your output has shape {tuple(gt.shape)}{where}, expected {tuple(wt.shape)}"
        if torch.is_tensor(w) and torch.is_tensor(g) and g.dtype != w.dtype:
            return (f"your output is {str(g.dtype).replace('torch.', '')}{where}, expected "
                    f"{str(w.dtype).replace('torch.', '')}: keep the dtype of the inputs (e.g. build constants "
                    "with dtype=x.dtype, or convert the schedule's float64 coefficients with .to(x))")
        if torch.is_tensor(w) and torch.is_tensor(g) and g.device != w.device:
            return f"your output is on {g.device}{where}, expected {w.device}: keep it on the input's device"
        gd, wd = gt.detach().double().cpu(), wt.detach().double().cpu()
        if not torch.isfinite(gd).all() and torch.isfinite(wd).all():
            return f"your output has {int((~torch.isfinite(gd)).sum())} non-finite value(s){where} (nan or inf)"
        if not torch.allclose(gd, wd, rtol=rtol, atol=atol, equal_nan=True):
            d = (gd - wd).abs()
            return f"your output differs{where}: max |difference| {d.max().item():.3g}"
    return None


def _stats(got, want) -> dict:
    def summary(x):
        if isinstance(x, dict):
            x = next(iter(x.values()), None)
        t = _as_tensor(_leaves(x)[0])
        if t is None or t.numel() == 0:
            return float("nan"), float("nan"), repr(x)
        t = t.detach().double().cpu()
        std = t.std().item() if t.numel() > 1 else 0.0
        flat = t.flatten()
        short = ", ".join(f"{v:.4g}" for v in flat[:6].tolist()) + (", ..." if flat.numel() > 6 else "")
        return t.mean().item(), std, f"[{short}]" if flat.numel() > 1 else short

    gm, gs, g = summary(got)
    wm, ws, w = summary(want)
    if isinstance(got, dict) or isinstance(want, dict):
        return dict(got_mean=gm, got_std=gs, want_mean=wm, want_std=ws, got=g, want=w, max_diff=float("nan"))
    try:
        diff = (_as_tensor(_leaves(got)[0]).double() - _as_tensor(_leaves(want)[0]).double()).abs().max().item()
    except Exception:  # noqa: BLE001  (shapes differ: no difference to report)
        diff = float("nan")
    return dict(got_mean=gm, got_std=gs, want_mean=wm, want_std=ws, got=g, want=w, max_diff=diff)


class _Fields(dict):
    """The fields a mistake's message may use; any other {...} (maths such as e^{-h}) is left as written."""

    def __missing__(self, key):
        return "{" + key + "}"


# ---- evaluating a learner's function ------------------------------------------------------------------
def evaluate(name: str, fn: Callable) -> Feedback:
    """Run ``fn`` on the exercise's cases; the first case it gets wrong decides the message."""
    ex = get(name)
    for case in ex.cases():
        try:
            got = fn(*case.args, **case.kwargs)
        except NotImplementedError:
            return Feedback("not implemented", f"{ex.name}: not implemented yet. Hint: {ex.hint}")
        except Exception as e:  # noqa: BLE001  (the learner's error, reported in their terms)
            return Feedback("error", f"{ex.name} [{case.label}]: your function raised {type(e).__name__}: {e}. "
                                     f"Hint: {ex.hint}")
        want = ex.reference(*case.args, **case.kwargs)
        problem = mismatch(got, want, ex.rtol, ex.atol)
        if problem is None:
            continue
        for m in ex.mistakes:
            try:
                wrong = m.wrong(*case.args, **case.kwargs)
            except Exception:  # noqa: BLE001  (a wrong variant may not apply to this case)
                continue
            if mismatch(wrong, want, ex.rtol, ex.atol) is not None and mismatch(got, wrong, ex.rtol, ex.atol) is None:
                fields = _Fields(label=case.label, **_stats(got, want))
                return Feedback("wrong", f"{ex.name} [{case.label}]: " + m.message.format_map(fields))
        s = _stats(got, want)
        return Feedback("wrong", f"{ex.name} [{case.label}]: {problem}. Yours: {s['got']}; expected: "
                                 f"{s['want']}. Hint: {ex.hint}")
    return Feedback("correct", f"{ex.name}: correct")


def check(name: str, fn: Callable, *, strict: bool = False, verbose: bool = True) -> Callable:
    """Check a learner's ``fn`` for exercise ``name`` and return the function the chapter goes on with.

    Right: one line "ok", and ``fn`` itself. Not implemented or wrong: the feedback and a note, and the package's
    reference (so the chapter still runs to its end); with ``strict=True`` a wrong function raises AssertionError.
    """
    fb = evaluate(name, fn)
    ex = get(name)
    if fb.ok:
        if verbose:
            print(f"[ok] {fb.message}")
        return fn
    if strict and fb.status in ("wrong", "error"):
        raise AssertionError(fb.message)
    print(f"[{'todo' if fb.status == 'not implemented' else 'X'}] {fb.message}")
    print(f"     (the rest of this chapter uses the package's {_ref_name(ex)} instead)")
    return ex.reference


def _ref_name(ex: Exercise) -> str:
    mod = getattr(ex.reference, "__module__", "") or ""
    return f"{mod}.{ex.reference.__name__}" if mod.startswith("minilcm") and mod != __name__ else ex.name

