"""One source, two editions: the instructor notebooks' exercises have a solution and a check each, and the student
edition (``make student``) replaces each solution by a stub, keeps the checks, and still runs to its end."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from minilcm.exercises import all_exercises
from minilcm.exercises.edition import exercises_in, strip_solutions, write_student_edition

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks" / "src").glob("[0-9][0-9]_*.py"))

TOY = '''# %% [markdown]
# Exercise

# %%
def forward_sample(schedule, x0, t, eps):
    # BEGIN SOLUTION
    return x0
    # END SOLUTION


forward_sample = check("forward_sample", forward_sample)
print("after")
'''


def test_strip_solutions_leaves_a_stub_with_the_hint_and_the_check():
    out = strip_solutions(TOY)
    assert "BEGIN SOLUTION" not in out and "return x0" not in out
    assert re.search(r"^    raise NotImplementedError\([\"']x_t = alpha_t x0", out, re.M)
    assert 'forward_sample = check("forward_sample", forward_sample)' in out and 'print("after")' in out


def test_unmatched_markers_and_a_solution_without_its_check_are_refused():
    with pytest.raises(ValueError, match="unmatched"):
        strip_solutions(TOY.replace("    # END SOLUTION\n", ""))
    with pytest.raises(ValueError, match="exactly once"):
        strip_solutions(TOY.replace('forward_sample = check("forward_sample", forward_sample)', ""))


def test_every_exercise_has_one_solution_and_one_check_in_its_chapter():
    registry = all_exercises()
    seen = {}
    for src in SOURCES:
        chapter = int(src.name[:2])
        for name, has_solution in exercises_in(src.read_text()):
            assert name in registry, f"{src.name} checks an unknown exercise {name!r}"
            assert has_solution, f"{src.name}: the cell that checks {name!r} holds no solution block"
            assert name not in seen, f"{name!r} is checked in {seen[name]} and {src.name}"
            assert registry[name].chapter == chapter, f"{name!r} is a Chapter {registry[name].chapter} exercise"
            seen[name] = src.name
    missing = sorted(set(registry) - set(seen))
    assert not missing, f"exercises with a check but no place in a chapter: {missing}"


def test_predict_then_run_questions_and_chapter_frames():
    for src in SOURCES:
        text = src.read_text()
        n_predict = text.count("**Predict, then run.**")
        n_answers = len(re.findall(r'^# %% \[markdown\].*tags=\["answer"\]', text, re.M))
        assert n_answers == n_predict, (src.name, n_predict, n_answers)
        collapsed = len(re.findall(r'^# %% \[markdown\] tags=\["answer"\] jupyter=\{"source_hidden": true\}', text, re.M))
        assert collapsed == n_answers, f"{src.name}: an answer cell is not collapsed"
        if int(src.name[:2]) <= 7:  # the teaching chapters; 08 is the closing one
            assert n_predict >= 2, (src.name, n_predict)
        assert "**Time:**" in text and "**Needs:**" in text, f"{src.name}: no read / run time or prerequisites"
        assert "## Summary" in text and "## Reading" in text, f"{src.name}: no summary or reading list"
        assert "notation.md" in text, f"{src.name} does not link the notation sheet"


def test_write_student_edition_clears_outputs(tmp_path):
    import nbformat

    paths = write_student_edition(ROOT / "notebooks" / "src", tmp_path)
    assert [p.stem for p in paths] == [s.stem for s in SOURCES]
    for p in paths:
        nb = nbformat.read(str(p), as_version=4)
        assert nb.metadata["minilcm"]["edition"] == "student"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs for c in code)
        assert not any("BEGIN SOLUTION" in c.source for c in nb.cells)


@pytest.mark.slow
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_the_student_edition_runs_to_its_end(src, tmp_path):
    """Every stub reports "not implemented yet", the chapter falls back to the package and finishes."""
    import nbformat
    from nbclient import NotebookClient

    path = write_student_edition(src.parent, tmp_path)[SOURCES.index(src)]
    nb = nbformat.read(str(path), as_version=4)
    env_profile = os.environ.get("MINILCM_PROFILE", "fast")
    assert env_profile == "fast" or os.environ.get("MINILCM_STUDENT_FULL"), "run this test in the fast profile"
    NotebookClient(nb, timeout=1800, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    out = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    names = [n for n, _ in exercises_in(src.read_text())]
    assert out.count("not implemented yet") == len(names), (src.name, names)
    assert "[X]" not in out
