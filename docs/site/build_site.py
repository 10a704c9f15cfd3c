"""Build the course web site from the committed notebooks, as executed, without running them (``make site``).

    python docs/site/build_site.py [OUT_DIR]          # default build/site; open OUT_DIR/index.html

The stack is Sphinx + MyST-NB + sphinx-book-theme (the Jupyter Book 1 stack, all from PyPI), chosen because every
asset it needs ships inside its Python packages: nothing is fetched at build time or at view time. MathJax 3 is
served from the site itself (the files of the ``sphinx-mathjax-offline`` wheel, only the part the pages use).

This script assembles a Sphinx source tree in ``build/site-src`` and runs ``sphinx-build`` on it:
  - ``index.md``: the README (the chapter names become links), a reading-order table with each chapter's read and
    run times taken from the chapter's own Time line, and the table of contents;
  - ``notebooks/NN_*.ipynb``: the committed notebooks with a download box (student edition, instructor edition,
    how to run it locally); solution cells collapsed (``hide-input``), "predict, then run" answers in dropdowns,
    tqdm and playground widget outputs dropped (their JavaScript would come from a CDN; the playground's static
    figure stays);
  - ``student/``: the student edition (``minilcm.exercises.edition``), linked from every chapter;
  - ``docs/``: the notation sheet, the architecture, the instructor guide and the classroom kit;
  - ``checkpoints/``: a page per shipped checkpoint (its ``meta.json`` and its rows of the README's benchmark
    table) and the table itself.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = Path(__file__).resolve().parent
WIDGET = "application/vnd.jupyter.widget-view+json"
DOCS = ["notation.md", "architecture.md", "instructor.md", "classroom.md"]
# which rows of the README's benchmark table belong to which shipped checkpoint
BENCH_MODEL = {"minisd-cifar10": "mini-SD teacher", "lcm-cifar10": "LCM student", "ddpm-cifar10": "pixel DDPM teacher",
               "cd-cifar10": "CD student"}
SOLUTION = "# BEGIN SOLUTION"


def chapters() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def chapter_title(nb: dict) -> str:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            m = re.search(r"^# (.+)$", "".join(cell["source"]), re.M)
            if m:
                return m.group(1).strip()
    raise ValueError("a chapter without a '# Title' heading")


def chapter_time(nb: dict) -> str:
    """The chapter's own "**Time:** ..." sentence, up to "**Needs:**" (the frame every chapter opens with)."""
    for cell in nb["cells"]:
        text = " ".join("".join(cell["source"]).split())
        m = re.search(r"\*\*Time:\*\*\s*(.+?)\s*\*\*Needs:\*\*", text)
        if cell["cell_type"] == "markdown" and m:
            return m.group(1).rstrip(" .")
    raise ValueError("a chapter without its **Time:** ... **Needs:** line")


def _md_cell(text: str, cell_id: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text}


def site_notebook(nb: dict, stem: str) -> dict:
    """The committed notebook as the site shows it (outputs untouched, nothing executed)."""
    nb = copy.deepcopy(nb)
    nb["metadata"].pop("widgets", None)
    cells = []
    for cell in nb["cells"]:
        src = "".join(cell["source"])
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if cell["cell_type"] == "code":
            if SOLUTION in src and "hide-input" not in tags:
                tags.append("hide-input")  # the solution collapsed; its check's output stays visible
            outs = []
            for o in cell.get("outputs", []):
                if WIDGET in o.get("data", {}):
                    continue  # a tqdm bar or the playground panel: live widgets only
                outs.append(o)
            cell["outputs"] = outs
        elif cell["cell_type"] == "markdown" and "answer" in tags:
            cell["source"] = f"::::{{dropdown}} Answer\n{src}\n::::"
        cells.append(cell)
    download = (
        f"::::{{admonition}} Run this chapter yourself\n:class: tip\n"
        f"- {{download}}`Student edition <../student/{stem}.ipynb>`: the exercises as stubs for you to write, "
        f"outputs cleared.\n"
        f"- {{download}}`Instructor edition <{stem}.ipynb>`: this page, with its solutions and the outputs of "
        f"the committed cpu-profile run.\n\n"
        f"Locally: in the course folder, `make lab` (it installs into `.venv` first), then open "
        f"`notebooks/{stem}.ipynb`, or put the student edition beside it. Offline classrooms: "
        f"[the classroom kit](../docs/classroom.md).\n::::")
    cells.insert(1, _md_cell(download, "minilcm-site-download"))
    nb["cells"] = cells
    return nb


def readme_index(readme: str, rows: list[tuple[str, str, str]]) -> str:
    """The README as the site's front page: chapter names linked, a reading-order table, the table of contents."""
    text = re.sub(r"`(0\d_\w+)\.ipynb`", r"[\1](notebooks/\1.ipynb)", readme)
    text = text.replace("`docs/architecture.md`", "[the architecture](docs/architecture.md)")
    text = re.sub(r"`data/README\.md`", "[the checkpoint pages](checkpoints/index.md)", text)
    table = ["## Reading order", "",
             "Each chapter, its reading and running time (from the chapter's own first cell), and the student "
             "edition to download from its page. Instructors: [the instructor guide](docs/instructor.md) and "
             "[the classroom kit](docs/classroom.md).", "",
             "| chapter | time |", "|---|---|"]
    table += [f"| [{title}](notebooks/{stem}.ipynb) | {time} |" for stem, title, time in rows]
    first, _, rest = text.partition("\n## ")
    toc = ["", "```{toctree}", ":hidden:", ":caption: Chapters", "", *[f"notebooks/{s}" for s, _, _ in rows], "```",
           "", "```{toctree}", ":hidden:", ":caption: Reference", "", "docs/notation", "docs/architecture",
           "checkpoints/index", "```", "", "```{toctree}", ":hidden:", ":caption: Teaching", "", "docs/instructor",
           "docs/classroom", "```", ""]
    return "\n".join([first.rstrip(), "", *table, "", "## " + rest, *toc])


def bench_table(readme: str) -> tuple[list[str], list[str]]:
    """The README's benchmark table: (its header and separator lines, its rows)."""
    lines = readme.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| model | sampler |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:start + 2], lines[start + 2:end]


def _flat(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", json.dumps(v) if isinstance(v, (list, bool)) or v is None else str(v)))
    return out


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def checkpoint_pages(out: Path, readme: str, data_readme: str) -> list[str]:
    """checkpoints/index.md (the benchmark table, a list of the checkpoints) and one page per checkpoint."""
    head, rows = bench_table(readme)
    what = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w-]+)` \| (.+?) \|", data_readme, re.M)}
    ckdir = ROOT / "data" / "checkpoints"
    names = sorted(p.name for p in ckdir.iterdir() if p.is_dir())
    out.mkdir(parents=True)
    lines = ["# Shipped checkpoints", "",
             "The trained models the notebooks, `minilcm sample` and `minilcm bench` load by name, from "
             "`data/checkpoints/`. Each page lists the checkpoint's `meta.json` (its recipe, steps, hardware, "
             "metrics and git commit) and its rows of the benchmark.", ""]
    lines += [f"- [{n}]({n}.md): {what.get(n, '')}" for n in names]
    lines += ["", "```{toctree}", ":hidden:", "", *names, "```"]
    lines += ["", "## The benchmark", "", "From the README (`minilcm bench --n 1000`, notebook 07), as committed:", "",
              *head, *rows, ""]
    (out / "index.md").write_text("\n".join(lines))
    for n in names:
        folder = ckdir / n
        metas = sorted(folder.rglob("meta.json"))
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        page = [f"# {n}", "", what.get(n, ""), "",
                "| file | size |", "|---|---:|"]
        page += [f"| `{p.relative_to(folder)}` | {_size(p.stat().st_size)} |" for p in files]
        for meta in metas:
            rel = meta.relative_to(folder)
            page += ["", f"## `{rel}`", "", "| key | value |", "|---|---|"]
            page += [f"| `{k}` | {_cell(v)} |" for k, v in _flat(json.loads(meta.read_text()))]
        model = BENCH_MODEL.get(n)
        mine = [r for r in rows if model and r.startswith(f"| {model} |")]
        if mine:
            page += ["", "## Benchmark rows", "", "From the README's table ([all of it](index.md)):", "", *head, *mine]
        (out / f"{n}.md").write_text("\n".join(page) + "\n")
    return names


def mathjax_files(static: Path) -> None:
    """MathJax 3 served from the site: tex-chtml.js, its fonts and the TeX extensions it may autoload."""
    dist = metadata.distribution("sphinx-mathjax-offline")
    src = Path(dist.locate_file("sphinx-mathjax-offline/static/mathjax"))
    dst = static / "mathjax"
    (dst / "output" / "chtml").mkdir(parents=True)
    shutil.copy2(src / "tex-chtml.js", dst / "tex-chtml.js")
    shutil.copytree(src / "output" / "chtml" / "fonts", dst / "output" / "chtml" / "fonts")
    shutil.copytree(src / "input" / "tex" / "extensions", dst / "input" / "tex" / "extensions")


def assemble(src: Path) -> None:
    """Write the Sphinx source tree into ``src`` (replacing it)."""
    if src.exists():
        shutil.rmtree(src)
    (src / "notebooks").mkdir(parents=True)
    readme = (ROOT / "README.md").read_text()
    rows = []
    for path in chapters():
        nb = json.loads(path.read_text())
        rows.append((path.stem, chapter_title(nb), chapter_time(nb)))
        (src / "notebooks" / path.name).write_text(json.dumps(site_notebook(nb, path.stem), indent=1))
    (src / "index.md").write_text(readme_index(readme, rows))
    (src / "docs").mkdir()
    for name in DOCS:
        shutil.copy2(ROOT / "docs" / name, src / "docs" / name)
    if (ROOT / "docs" / "screenshots").is_dir():
        shutil.copytree(ROOT / "docs" / "screenshots", src / "docs" / "screenshots")
    checkpoint_pages(src / "checkpoints", readme, (ROOT / "data" / "README.md").read_text())
    from minilcm.exercises.edition import write_student_edition  # the package, imported only for this step
    write_student_edition(ROOT / "notebooks" / "src", src / "student")
    mathjax_files(src / "_static")
    shutil.copy2(CONF_DIR / "conf.py", src / "conf.py")
    for f in (CONF_DIR / "_static").iterdir():
        shutil.copy2(f, src / "_static" / f.name)


def build(out: Path = ROOT / "build" / "site", src: Path = ROOT / "build" / "site-src") -> Path:
    """Assemble the source tree and run sphinx-build into ``out`` (written into a temporary folder, then moved)."""
    assemble(src)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-W", "--keep-going", str(src), str(tmp)]
    subprocess.run(cmd, check=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    target = build(Path(sys.argv[1]).resolve()) if len(sys.argv) > 1 else build()
    print(f"site: {target}/index.html")
