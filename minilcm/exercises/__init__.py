"""Exercises with feedback (``check``) and the student edition of the notebooks (``edition``).

    from minilcm.exercises import check
    forward_sample = check("forward_sample", forward_sample)   # yours if right, else the package's, with a note

``core`` holds the checker, ``chapters`` the exercises (a reference, the cases, the known mistakes), ``edition``
the instructor-to-student conversion behind ``make student``.
"""
from . import chapters  # noqa: F401  (registers every exercise)
from .core import REGISTRY, Case, Exercise, Feedback, Mistake, check, evaluate, get

__all__ = ["REGISTRY", "Case", "Exercise", "Feedback", "Mistake", "all_exercises", "check", "evaluate", "get"]


def all_exercises() -> dict:
    """Every exercise by name, in chapter order."""
    return dict(sorted(REGISTRY.items(), key=lambda kv: kv[1].chapter))
