"""``minilcm bench``: FD-clf, class accuracy and wall clock of every sampler at every NFE on the shipped CIFAR-10
teachers and students, and the LCM headline checked. (The solver-error benchmark is ``minilcm.solver_bench``.)
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, atomic_write, update_meta
from .datasets import cifar10
from .evaluator import Evaluator
from .generate import balanced_labels, generate
from .profiles import hardware
from .zoo import load_model_folder

# The headline of the LCM talk (Luo et al. 2023, arXiv 2310.04378, Sec. 5): about 4 steps instead of 20+, at least
# 5x faster, CFG included. ``model_benchmark`` measures it on the course's own models, all in one run.
#
#     res = model_benchmark(n=1000, w=1.0, out="runs/bench")   # writes bench.md, bench.json, bench.png
#     res["checks"]                                            # the headline, checked

BENCH_PLAN = {  # model role -> [(sampler, steps...)]
    "mini-SD teacher": [("ddim", (4, 8, 25)), ("dpm_solver_pp", (4, 8, 25)), ("ddpm", (25,))],
    "LCM student": [("lcm", (1, 2, 4))],
    # the pixel UNet costs ~5 ms per image per NFE on a 2-core CPU (2 rows under CFG): the essential rows only
    "pixel DDPM teacher": [("ddim", (4,)), ("dpm_solver_pp", (4, 25))],
    "CD student": [("cm", (1, 2))],
}
HEADLINE = {"lcm4_fd_ratio_max": 1.15, "lcm4_speedup_min": 5.0, "lcm2_fd_ratio_max": 1.3}


@dataclass
class ModelBenchRow:
    model: str                       # role: "mini-SD teacher", "LCM student", ..., or a reference row
    sampler: str                     # sampler name, or "reference"
    steps: int | None                # steps asked for
    nfe: int | None                  # network evaluations per sample (a CFG teacher's 2B-row call counts once)
    rows_per_eval: int | None        # 2 for a teacher under CFG: its evaluations cost twice the rows
    n: int                           # images measured
    w: float | None                  # guidance (LCM convention), None when unconditional
    fd_clf: float                    # FD-clf vs the CIFAR-10 test set (lower is better)
    class_acc: float | None          # evaluator's accuracy on the requested classes (conditional samples)
    sec_per_image: float | None      # wall clock of sampling + decoding, per image
    path: str = ""
    note: str = ""


def _reference_images(n: int):
    """n class-balanced CIFAR-10 test images (uint8 (n, 3, 32, 32)) and labels: the first of each class in turn."""
    test = cifar10("test")
    want = balanced_labels(n)
    by_class = {c: (test.labels == c).nonzero().flatten().tolist() for c in range(10)}
    idx = [by_class[c][i // 10] for i, c in enumerate(want)]
    return test.images[idx], test.labels[idx]


def _load_models(plan: dict, device, notes: list, specs: dict) -> dict:
    """{role: LoadedModel} for each role of ``plan``: {role: (name or folder, required)}; an optional model that is
    missing (or given as None) is skipped with a note."""
    models = {}
    for role, (spec, required) in specs.items():
        if role not in plan:
            continue
        if spec is None:
            notes.append(f"{role} left out")
            continue
        try:
            models[role] = load_model_folder(spec, device=device)
        except CheckpointError as e:
            if required:
                raise
            notes.append(f"{role} ({spec}) skipped: {e}")
    return models


def _reference_rows(models: dict, ev, n: int, reference, notes: list) -> list:
    """The two floors: ``n`` real CIFAR-10 test images, and the mini-SD autoencoder's reconstructions of them."""
    rows = []
    try:
        ref_x, ref_y = reference if reference is not None else _reference_images(n)
        rows.append(ModelBenchRow("CIFAR-10 test images", "reference", None, None, None, len(ref_x), None,
                                  ev.fd(ref_x), ev.class_accuracy(ref_x, ref_y), None,
                                  note="the floor of FD-clf at this n"))
        if "mini-SD teacher" in models:
            sd = models["mini-SD teacher"].sd
            rec = sd.decode(sd.encode(ref_x))
            rows.append(ModelBenchRow("VAE reconstruction", "reference", None, None, None, len(ref_x), None,
                                      ev.fd(rec), ev.class_accuracy(rec, ref_y), None,
                                      str(models["mini-SD teacher"].path), "decode(encode(test images))"))
    except Exception as e:  # CIFAR-10 unavailable: the reference rows are optional
        notes.append(f"reference rows skipped: {type(e).__name__}: {e}")
    return rows


def model_benchmark(n: int, w: float = 1.0, out: str | None = "runs/bench", *, device: str = "cpu", seed: int = 0,
                    batch: int = 250, minisd="minisd-cifar10", lcm="lcm-cifar10", evaluator="evaluator-cifar10",
                    pixel_teacher="ddpm-cifar10", pixel_cm="cd-cifar10", plan: dict | None = None,
                    reference=None, progress: bool = True) -> dict:
    """Run every sampler of ``plan`` (default ``BENCH_PLAN``) at each step count on each model with the same seed,
    ``n`` class-balanced images and guidance ``w``; measure FD-clf, class accuracy, NFE and the wall time per image
    (sampling + decoding; never the metric). Adds two reference rows: ``n`` real CIFAR-10 test images (the floor
    of FD-clf at this n: the Fréchet distance is biased upward at small n) and their autoencoder reconstructions
    (the mini-SD's VAE floor: no latent model beats its decoder).

    minisd, lcm, evaluator   required (shipped names or folder paths)
    pixel_teacher, pixel_cm  the Chapters 1-4 CIFAR models: skipped, with a note, when they do not exist
    reference                (images uint8 (n, 3, 32, 32), labels) for the reference rows; default: the CIFAR-10
                             test set (skipped, with a note, when CIFAR-10 is unavailable)
    out                      folder for bench.md, bench.json and bench.png (None: write nothing)

    Returns {"header", "rows" (list of dict), "checks", "notes", "table" (markdown), "files"}.
    """
    plan = BENCH_PLAN if plan is None else plan
    ev = Evaluator.load(evaluator, device=device)
    notes = []
    models = _load_models(plan, device, notes, {"mini-SD teacher": (minisd, True), "LCM student": (lcm, True),
                                          "pixel DDPM teacher": (pixel_teacher, False), "CD student": (pixel_cm, False)})
    runs = [(role, s, k) for role in models for s, steps in plan[role] for k in steps]
    it = runs
    if progress:
        it = tqdm(runs, desc="minilcm bench")
    rows = []
    for role, sampler, steps in it:
        m = models[role]
        g = generate(m, sampler, steps, n, w=w, seed=seed, batch=batch, device=device)
        x = g.images_nchw
        cond = (g.labels >= 0).all()
        rows.append(ModelBenchRow(role, sampler, steps, g.nfe, g.rows_per_eval, n, w if cond else None,
                                  ev.fd(x), ev.class_accuracy(x, torch.from_numpy(g.labels)) if cond else None,
                                  g.seconds_per_image, str(m.path)))
    rows += _reference_rows(models, ev, n, reference, notes)
    checks = headline_checks(rows)
    header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "hardware": hardware(device), "device": str(device),
              "n": n, "w": w, "guidance_scale": w + 1, "seed": seed, "batch": batch,
              "evaluator": {"path": str(evaluator), **ev.meta.get("metrics", {})}, "torch": torch.__version__}
    if n < 1000:
        notes.append(f"n = {n} < 1000: FD-clf is biased upward and noisy at small n; compare rows with each other "
                     "and with the test-image floor, not with published FIDs")
    res = {"header": header, "rows": [dict(vars(r)) for r in rows], "checks": checks, "notes": notes}
    res["table"] = bench_markdown(res)
    res["files"] = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "bench.md", lambda tmp: tmp.write_text(res["table"]))
        atomic_write(out / "bench.json", lambda tmp: tmp.write_text(
            json.dumps({k: v for k, v in res.items() if k != "files"}, indent=1)))
        kinds = ("md", "json")
        if importlib.util.find_spec("matplotlib") is not None:  # a headless GPU run may carry none: no figure then
            atomic_write(out / "bench.png", lambda tmp: plot_model_benchmark(
                rows, tmp, title=f"minilcm bench, n = {n}, w = {w:g} ({header['hardware']})"))
            kinds += ("png",)
        res["files"] = {k: str(out / f"bench.{k}") for k in kinds}
    return res


def _find(rows, model, sampler, steps):
    for r in rows:
        r = r if isinstance(r, dict) else vars(r)
        if r["model"] == model and r["sampler"] == sampler and r["steps"] == steps:
            return r
    return None


def headline_checks(rows) -> dict:
    """The talk's headline on our models: LCM at 4 steps within 1.15x of the teacher's DPM-Solver++ at 25 on FD-clf
    and >= 5x faster per image; LCM at 2 steps within 1.3x; and LCM at 4 better than the teacher's DDIM at 4."""
    T, S = "mini-SD teacher", "LCM student"
    l4, l2 = _find(rows, S, "lcm", 4), _find(rows, S, "lcm", 2)
    p25, d4 = _find(rows, T, "dpm_solver_pp", 25), _find(rows, T, "ddim", 4)
    out = {}
    if l4 and p25:
        r, s = l4["fd_clf"] / p25["fd_clf"], p25["sec_per_image"] / l4["sec_per_image"]
        out["lcm4_fd_ratio"] = {"value": r, "target": f"<= {HEADLINE['lcm4_fd_ratio_max']}",
                                "pass": r <= HEADLINE["lcm4_fd_ratio_max"]}
        out["lcm4_speedup"] = {"value": s, "target": f">= {HEADLINE['lcm4_speedup_min']}",
                               "pass": s >= HEADLINE["lcm4_speedup_min"]}
    if l2 and p25:
        r = l2["fd_clf"] / p25["fd_clf"]
        out["lcm2_fd_ratio"] = {"value": r, "target": f"<= {HEADLINE['lcm2_fd_ratio_max']}",
                                "pass": r <= HEADLINE["lcm2_fd_ratio_max"]}
    if l4 and d4:
        out["lcm4_beats_ddim4"] = {"value": l4["fd_clf"] / d4["fd_clf"], "target": "< 1", "pass":
                                   l4["fd_clf"] < d4["fd_clf"]}
    return out


def bench_markdown(res: dict) -> str:
    """The benchmark as a markdown table with its date, hardware and headline checks."""
    h = res["header"]
    rows = res["rows"]
    # each family's speed-up is against its own teacher's 25-step DPM-Solver++
    family = {"mini-SD teacher": "mini-SD teacher", "LCM student": "mini-SD teacher",
              "pixel DDPM teacher": "pixel DDPM teacher", "CD student": "pixel DDPM teacher"}
    base = {t: _find(rows, t, "dpm_solver_pp", 25) for t in set(family.values())}
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = [f"**minilcm bench** — {h['date']} — {h['hardware']}", "",
             f"n = {h['n']} class-balanced images per row, seed {h['seed']}, batch {h['batch']}; "
             f"w = {h['w']:g} (LCM convention; diffusers guidance_scale = {h['guidance_scale']:g}). "
             "FD-clf: Fréchet distance in the course's CIFAR-10 classifier features vs the test set, "
             "a proxy for FID (lower is better). Time: sampling + decoding per image, CFG's 2B rows included.", "",
             "| model | sampler | steps | NFE | rows / eval | FD-clf | class acc | ms / image | speed-up vs its teacher's DPM-Solver++ 25 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        p25 = base.get(family.get(r["model"]))
        sp = f"{p25['sec_per_image'] / r['sec_per_image']:.1f}x" if p25 and r["sec_per_image"] else "–"
        lines.append(f"| {r['model']} | {r['sampler']} | {f(r['steps'], 'd')} | {f(r['nfe'], 'd')} | "
                     f"{f(r['rows_per_eval'], 'd')} | {r['fd_clf']:.4g} | {f(r['class_acc'], '.3f')} | "
                     f"{f(None if r['sec_per_image'] is None else r['sec_per_image'] * 1e3, '.2f')} | {sp} |")
    lines += ["", "Headline (LCM talk: about 4 steps, at least 5x faster than a 20+ step sampler):", ""]
    names = {"lcm4_fd_ratio": "LCM 4 steps FD-clf / teacher DPM-Solver++ 25",
             "lcm4_speedup": "teacher DPM-Solver++ 25 time / LCM 4 steps time",
             "lcm2_fd_ratio": "LCM 2 steps FD-clf / teacher DPM-Solver++ 25",
             "lcm4_beats_ddim4": "LCM 4 steps FD-clf / teacher DDIM 4"}
    for k, c in res["checks"].items():
        lines.append(f"- {names[k]}: {c['value']:.2f} (target {c['target']}): {'PASS' if c['pass'] else 'FAIL'}")
    for note in res["notes"]:
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def plot_model_benchmark(rows, path=None, title: str | None = None):
    """FD-clf against NFE and against the wall time per image, one line per (model, sampler); reference rows as
    horizontal lines. Returns the figure (saved to ``path`` when given)."""
    import matplotlib.pyplot as plt

    rows = [r if isinstance(r, dict) else vars(r) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    series = {}
    for r in rows:
        if r["sampler"] != "reference":
            series.setdefault(f"{r['model']}: {r['sampler']}", []).append(r)
    for i, (label, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["nfe"])
        style = dict(marker="o" if "student" in label else "s", ls="-" if "student" in label else "--",
                     color=f"C{i}", label=label, ms=5)
        axes[0].plot([r["nfe"] for r in rs], [r["fd_clf"] for r in rs], **style)
        axes[1].plot([r["sec_per_image"] * 1e3 for r in rs], [r["fd_clf"] for r in rs], **style)
        for r in rs:
            axes[1].annotate(str(r["nfe"]), (r["sec_per_image"] * 1e3, r["fd_clf"]), fontsize=8,
                             textcoords="offset points", xytext=(3, 3))
    for j, r in enumerate(r for r in rows if r["sampler"] == "reference"):
        for ax in axes:  # a labelled line: FD-clf is linear here, so the floors sit in view below the models
            ax.axhline(r["fd_clf"], color="gray", ls=":" if j else "-.", lw=1)
            ax.annotate(f"{r['model']}: {r['fd_clf']:.1f}", (0.01, r["fd_clf"]), xycoords=("axes fraction", "data"),
                        fontsize=8, color="0.35", textcoords="offset points", xytext=(0, 3))
    nfes = sorted({r["nfe"] for r in rows if r["nfe"]})
    top = 1.08 * max([r["fd_clf"] for r in rows if r.get("fd_clf") is not None] or [1.0])
    axes[0].set(xscale="log", xlabel="NFE (network evaluations per sample, log)", ylim=(0, top),
                ylabel="FD-clf (lower is better)", title="quality vs NFE")
    axes[0].set_xticks(nfes, [str(v) for v in nfes])
    axes[0].minorticks_off()
    axes[1].set(xscale="log", xlabel="wall time per image (ms, log; point labels: NFE)", ylim=(0, top),
                ylabel="FD-clf (lower is better)", title="quality vs time")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the axes
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def record_metrics(bench, by: str = "minilcm bench") -> list[str]:
    """Write a benchmark's rows into the ``meta.json`` of each model folder it measured, under ``"bench"``:
    {"n", "w", "measured", "hardware", "by", "<sampler>@<steps>": {"fd_clf", "class_acc", "ms_per_image", "nfe"}}.
    ``bench`` is ``model_benchmark``'s result or the path of its ``bench.json``. Returns the files written.
    (This is how the shipped checkpoints' metadata gets its benchmark numbers: run the benchmark, then record it.)"""
    res = json.loads(Path(bench).read_text()) if isinstance(bench, (str, Path)) else bench
    h, per_path = res["header"], {}
    for r in res["rows"]:
        if r["sampler"] == "reference" or not r.get("path"):
            continue
        entry = per_path.setdefault(r["path"], {"n_per_row": h["n"], "w": h["w"], "measured": h["date"],
                                                "hardware": h["hardware"], "by": by})
        entry[f"{r['sampler']}@{r['steps']}"] = {
            "fd_clf": round(r["fd_clf"], 2), "nfe": r["nfe"], "ms_per_image": round(r["sec_per_image"] * 1e3, 2),
            "class_acc": None if r["class_acc"] is None else round(r["class_acc"], 4)}
    return [str(update_meta(path, {"bench": entry})) for path, entry in per_path.items()]
