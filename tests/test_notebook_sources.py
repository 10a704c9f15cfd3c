"""The notebooks are edited as jupytext percent sources (notebooks/src/NN_name.py) and synced into
notebooks/NN_name.ipynb by `make notebooks`. These tests fail when the two disagree: every notebook has a source
and every source a notebook, and their cells match one by one in type and text. No notebook is executed."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
FIX = "run `make notebooks` to sync the sources into the notebooks"


def _stems(folder: Path, suffix: str) -> set[str]:
    return {p.stem for p in folder.glob(f"*{suffix}")}


def test_every_notebook_has_a_source_and_every_source_a_notebook():
    notebooks, sources = _stems(NOTEBOOKS, ".ipynb"), _stems(SOURCES, ".py")
    assert notebooks, f"no notebooks in {NOTEBOOKS}"
    no_source = sorted(notebooks - sources)
    no_notebook = sorted(sources - notebooks)
    assert not no_source, (f"notebooks without a source in notebooks/src/: {no_source}; write one with "
                           "`jupytext --to py:percent -o notebooks/src/NAME.py notebooks/NAME.ipynb`")
    assert not no_notebook, f"sources without a notebook: {no_notebook}; {FIX}"


def _lines(source: str) -> list[str]:
    return source.rstrip("\n").split("\n")


def _first_difference(a: list[str], b: list[str]) -> tuple[int, str, str]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i + 1, x, y
    i = min(len(a), len(b))
    return i + 1, a[i] if i < len(a) else "<end of cell>", b[i] if i < len(b) else "<end of cell>"


@pytest.mark.parametrize("stem", sorted(_stems(SOURCES, ".py") & _stems(NOTEBOOKS, ".ipynb")))
def test_source_and_notebook_have_the_same_cells(stem):
    src_path, nb_path = SOURCES / f"{stem}.py", NOTEBOOKS / f"{stem}.ipynb"
    src = jupytext.read(src_path).cells
    nb = nbformat.read(nb_path, as_version=4).cells
    where = f"notebooks/{stem}.ipynb vs notebooks/src/{stem}.py"
    for i, (s, n) in enumerate(zip(src, nb)):
        if s.cell_type != n.cell_type:
            pytest.fail(f"{where}: cell {i} is {s.cell_type} in the source but {n.cell_type} in the notebook; {FIX}")
        a, b = _lines(s.source), _lines(n.source)
        if a != b:
            line, x, y = _first_difference(a, b)
            pytest.fail(f"{where}: {s.cell_type} cell {i} differs at its line {line}:\n"
                        f"  source:   {x!r}\n  notebook: {y!r}\n{FIX}")
    if len(src) != len(nb):
        pytest.fail(f"{where}: the source has {len(src)} cells, the notebook {len(nb)} (cell {min(len(src), len(nb))} "
                    f"is the first one only one of them has); {FIX}")
