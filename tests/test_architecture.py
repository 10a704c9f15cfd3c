"""The structure docs/architecture.md describes, checked: layers import only downward, no module is over 350 lines,
function-local imports of the package say why, the CLI's help needs no torch, and nothing cites a file outside
the repository."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "minilcm"
# docs/architecture.md, section 1: module -> layer (a folder's modules share its layer unless named)
LAYERS = {
    0: ["errors", "catalog", "profiles", "schedules", "checkpoints"],
    1: ["diffusion", "sde", "solvers", "preconditioning", "guidance", "train", "optim", "budget", "interrupts", "toys", "metrics",
        "datasets", "models"],
    2: ["consistency", "ict", "lcm"],
    3: ["latents", "evaluator", "viz"],
    4: ["samplers", "minisd", "zoo"],
    5: ["stages", "latent_stages", "exports", "recipes", "solver_bench", "sd"],
    6: ["generate", "bench", "commands", "cli", "notebook", "exercises", "playground", "__init__"],
}
LAYER_OF = {m: k for k, ms in LAYERS.items() for m in ms}


def modules():
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def top_name(path: Path) -> str:
    """The first component under minilcm/: 'sd' for minilcm/sd/data.py, 'zoo' for minilcm/zoo.py."""
    rel = path.relative_to(PKG).with_suffix("")
    return rel.parts[0]


def package_imports(path: Path):
    """(lineno, imported top-level module, is_local, line text) for every import of a minilcm module."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    pkg_parts = path.relative_to(PKG).parent.parts  # () for minilcm/x.py, ('sd',) for minilcm/sd/x.py
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(pkg_parts[:len(pkg_parts) - (node.level - 1)]) if node.level > 1 else list(pkg_parts)
                full = base + (node.module.split(".") if node.module else [])
                if not full:  # "from . import x": the x are modules
                    names = [a.name for a in node.names]
                else:
                    names = [full[0]]
            elif node.module and node.module.split(".")[0] == "minilcm":
                parts = node.module.split(".")[1:]
                names = [parts[0]] if parts else [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("minilcm.")]
        if not names:
            continue
        local, p = False, parents.get(node)
        while p is not None:
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                local = True
                break
            p = parents.get(p)
        for n in names:
            out.append((node.lineno, n, local, lines[node.lineno - 1]))
    return out


def test_every_module_has_a_layer():
    missing = {top_name(p) for p in modules()} - set(LAYER_OF)
    assert not missing, f"give these modules a layer in docs/architecture.md and in LAYERS here: {sorted(missing)}"


def test_layers_import_only_downward():
    bad = []
    for path in modules():
        me = top_name(path)
        for lineno, other, _, _ in package_imports(path):
            if other in LAYER_OF and other != me and LAYER_OF[other] > LAYER_OF[me]:
                bad.append(f"{path.relative_to(ROOT)}:{lineno} (layer {LAYER_OF[me]}) imports {other} "
                           f"(layer {LAYER_OF[other]})")
    assert not bad, "imports that climb a layer (docs/architecture.md, section 1):\n" + "\n".join(bad)


MATHS = ("diffusion", "sde", "solvers", "preconditioning", "guidance", "consistency", "ict", "lcm")


def test_the_maths_modules_import_no_file_or_cli_code():
    """docs/architecture.md: the maths modules take nothing from checkpoints but model_config, and nothing from the
    data, registry, recipe or front-end layers."""
    bad = []
    for name in MATHS:
        path = PKG / f"{name}.py"
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                mod = node.module.split(".")[0]
                names = {a.name for a in node.names}
                if mod == "checkpoints" and names - {"model_config"}:
                    bad.append(f"{name}.py:{node.lineno} takes {sorted(names - {'model_config'})} from checkpoints")
                if mod in ("datasets", "latents", "evaluator", "viz", "zoo", "samplers", "minisd", "stages", "exports",
                           "recipes", "generate", "bench", "commands", "cli", "sd"):
                    bad.append(f"{name}.py:{node.lineno} imports {mod}")
    assert not bad, bad


def test_no_module_is_over_350_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > 350}
    assert not long, f"split these modules (docs/architecture.md: at most 350 lines): {long}"


def test_local_imports_of_the_package_say_why():
    def says_why(line):
        comment = line.split("#", 1)[1] if "#" in line else ""
        return bool(re.sub(r"noqa(:\s*[A-Z0-9, ]+)?", "", comment).strip())

    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in modules()
           for n, _, local, line in package_imports(p) if local and not says_why(line)]
    assert not bad, ("a function-local import of the package is allowed only to keep `import minilcm` / --help "
                     "torch-free or to break a cycle, with a comment saying which (docs/architecture.md):\n"
                     + "\n".join(bad))


@pytest.mark.parametrize("argv", [None, ["--help"], ["sample", "--help"], ["train", "--help"], ["sd-distill", "--help"]])
def test_import_and_cli_help_import_no_torch(argv):
    code = "import sys\nimport minilcm\n"
    if argv is not None:
        code += f"from minilcm.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False", f"{'minilcm ' + ' '.join(argv) if argv else 'import minilcm'} imported torch"


@pytest.mark.parametrize("folder", ["minilcm", "tests", "notebooks/src", "benchmarks", "docs", "scripts"])
def test_nothing_cites_a_design_file_outside_the_repository(folder):
    here = Path(__file__).name
    hits = [f"{p.relative_to(ROOT)}" for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in (".py", ".md", ".sh") and p.name != here
            and re.search(r"\bDESIGN\.md\b", p.read_text(errors="ignore"))]
    assert not hits, f"cite docs/architecture.md, not DESIGN.md: {hits}"


def test_the_registry_and_the_catalog_agree():
    from minilcm import catalog, samplers, zoo

    assert tuple(samplers.SAMPLERS) == catalog.SAMPLER_NAMES
    assert {n: s.family for n, s in samplers.SAMPLERS.items()} == catalog.SAMPLER_FAMILIES
    assert set(zoo.SAMPLING_MODELS) <= set(catalog.SHIPPED)
    from minilcm import profiles, stages

    assert tuple(stages.STAGES) == catalog.STAGE_NAMES
    assert all(set(profiles.SIZES[name]) == set(profiles.PROFILES) for name in catalog.STAGE_NAMES), \
        "every stage has its fast / cpu / gpu row in profiles.SIZES"
