"""The student edition: the instructor notebooks with their solutions replaced by stubs (``make student``).

    python -m minilcm.exercises.edition [SRC_DIR] [OUT_DIR]      # default notebooks/src -> build/student

One source, two editions (the approach of Neuromatch's generator): an instructor source ``notebooks/src/NN_*.py``
(jupytext percent format) writes each exercise as the learner's function with its solution between markers,

    def forward_sample(schedule, x0, t, eps):
        # BEGIN SOLUTION
        ...
        # END SOLUTION

    forward_sample = check("forward_sample", forward_sample)

and the student edition replaces every marked block by ``raise NotImplementedError(<the exercise's hint>)`` at the
same indentation. The checks stay: a stub is reported "not implemented yet" and the chapter goes on with the
package's function. Outputs are empty (the edition is built from the sources, never from executed notebooks), and
collapsed answer cells stay collapsed.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .core import get

SOLUTION = re.compile(r"^(?P<indent>[ \t]*)# BEGIN SOLUTION[ \t]*\n.*?^(?P=indent)# END SOLUTION[ \t]*\n",
                      re.S | re.M)
CHECK = re.compile(r"""\bcheck\(\s*["'](?P<name>\w+)["']""")
CELL = re.compile(r"^# %%", re.M)


def cells(text: str) -> list[str]:
    """The percent source split at its cell markers (the header before the first marker is cell 0)."""
    starts = [m.start() for m in CELL.finditer(text)]
    bounds = [0, *starts, len(text)] if starts and starts[0] != 0 else [*starts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def exercises_in(text: str) -> list[tuple[str, bool]]:
    """(exercise name, whether its cell holds a solution block) for every ``check("name", ...)`` in a source."""
    out = []
    for cell in cells(text):
        has_solution = bool(SOLUTION.search(cell))
        out += [(m.group("name"), has_solution) for m in CHECK.finditer(cell)]
    return out


def strip_solutions(text: str) -> str:
    """The student source: every solution block becomes a stub raising NotImplementedError with its hint."""
    parts = []
    for cell in cells(text):
        names = [m.group("name") for m in CHECK.finditer(cell)]
        if SOLUTION.search(cell) and len(names) != 1:
            raise ValueError(f"a cell with a solution block must call check() exactly once, found {names}:\n{cell}")

        def stub(m, name=names[0] if names else None):
            hint = get(name).hint if name else "write this function"
            return f"{m.group('indent')}raise NotImplementedError({hint!r})\n"

        parts.append(SOLUTION.sub(stub, cell))
    out = "".join(parts)
    if "# BEGIN SOLUTION" in out or "# END SOLUTION" in out:
        raise ValueError("unmatched solution markers (each '# BEGIN SOLUTION' needs an '# END SOLUTION' at the same "
                         "indentation)")
    return out


def write_student_edition(src_dir: str | Path = "notebooks/src", out_dir: str | Path = "build/student") -> list[Path]:
    """Write OUT_DIR/NN_name.ipynb for every SRC_DIR/NN_name.py; returns the paths written."""
    import jupytext

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    sources = sorted(src_dir.glob("[0-9][0-9]_*.py"))
    if not sources:
        raise FileNotFoundError(f"no notebook sources NN_name.py in {src_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources:
        nb = jupytext.reads(strip_solutions(src.read_text()), fmt="py:percent")
        nb.metadata.setdefault("minilcm", {})["edition"] = "student"
        for i, cell in enumerate(nb.cells):
            cell.id = f"{src.stem[:2]}-{i:03d}"  # stable ids (nbformat 4.5 wants one per cell)
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        path = out_dir / f"{src.stem}.ipynb"
        tmp = path.with_name(f".{path.stem}.partial.ipynb")
        jupytext.write(nb, str(tmp), fmt="ipynb")
        tmp.replace(path)  # never a half-written notebook
        written.append(path)
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    paths = write_student_edition(*argv[:2])
    print(f"student edition: {len(paths)} notebooks in {paths[0].parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
