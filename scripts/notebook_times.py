"""The run times in the committed notebooks: each chapter's total and its slow cells, for docs/instructor.md.

    python scripts/notebook_times.py              # cells of at least 15 s
    python scripts/notebook_times.py --min 5

nbclient records when each cell started and finished (``metadata.execution``: ``iopub.execute_input`` and
``shell.execute_reply``); a chapter's total is the sum over its cells (kernel start-up not included), and the date is
that of its last cell. A notebook whose cells carry no timing (saved from an editor that strips it) says so.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _when(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def cell_times(path: Path) -> tuple[list[tuple[int, float, str]], str | None]:
    """[(cell index, seconds, first source line)], and the time the last cell finished (None without timings)."""
    cells, last = [], None
    for i, c in enumerate(json.loads(path.read_text())["cells"]):
        m = c.get("metadata", {}).get("execution", {})
        if "iopub.execute_input" in m and "shell.execute_reply" in m:
            s = (_when(m["shell.execute_reply"]) - _when(m["iopub.execute_input"])).total_seconds()
            src = "".join(c["source"]).strip().splitlines()
            cells.append((i, s, src[0][:70] if src else ""))
            last = m["shell.execute_reply"]
    return cells, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min", type=float, default=15.0, help="list the cells of at least this many seconds")
    a = p.parse_args(argv)
    for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells, last = cell_times(nb)
        if not cells:
            print(f"{nb.name}: no cell timings recorded")
            continue
        print(f"{nb.name}: {sum(s for _, s, _ in cells):.0f} s in its cells, finished {last[:16].replace('T', ' ')} UTC")
        for i, s, first in cells:
            if s >= a.min:
                print(f"  cell {i:3d}  {s:6.0f} s  {first}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
