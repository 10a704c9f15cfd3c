"""One GPU run of the course: train the stages that matter most to a time budget, measure them, pack what comes back.

    python scripts/gpu_run.py OUT                   # on the device (MINILCM_PROFILE=gpu): the plan below
    python scripts/gpu_run.py OUT --dry-run         # here, on the CPU: the same code path, fast profile, tiny budgets

``scripts/gpu_run.sh`` prepares the wheels and the CIFAR archive that travel, installs them on the device, and calls
this. The plan, in order of value (each line a ``minilcm train STAGE --minutes M``; 4 minutes of training in all:
one command may run 10 minutes, and each stage adds its start-up, export and measurement):

  1. minisd  1.25 min  the Chapter 5 teacher, warm-started from the shipped one, on the shipped autoencoder's latents
  2. lcm     1.25 min  its LCM student (guidance-distillation warm start, then LCD)
  3. ddpm    0.75 min  the Chapters 1-4 pixel teacher at the gpu profile's size ("small", 6.5M: 12.4 MiB in fp16)
  4. cd      0.75 min  its consistency-distilled student

then ``minilcm bench`` on the four new models (n images per row) and ``benchmarks/lcd_throughput.py`` (SD-v1.5
shapes, batch 16, bf16). A part that would end past the deadline (``--deadline``, 9.5 minutes from the start) is
skipped and recorded as such; a part that fails is recorded with its error and the run goes on.

What comes back fits the device's rules (at most 8 files of 16 MiB, no folders): ``gpu_run.json`` (the plan, each
stage's budget record and metrics, bench.json, the commit, the hardware, the time of each part), ``bench.md``,
``lcd_throughput.json`` and ``models.tar.partN`` (the trained weights and metadata only: the unchanged vae, text
encoder and tokenizer stay out; ``cat models.tar.part* | tar x`` joins them), packed again after every stage so
that a run cut short still brings back what it finished.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = [("minisd", 1.25), ("lcm", 1.25), ("ddpm", 0.75), ("cd", 0.75)]
DRY_MINUTES = 0.05
# start-up, export and measurement beside the training, in minutes: estimates until a GPU run measures them
# (gpu_run.json records each part's seconds). 4 + 4 x 0.75 + 1 + 1.5 = 9.5 minutes, the default deadline.
OVERHEAD_MIN = {"stage": 0.75, "bench": 1.0, "lcd_throughput": 1.5}
DEADLINE_MIN = 9.5
PART = 16 * 2 ** 20 - 1  # the largest file that comes back through $OUT
SKIP = ("vae", "text_encoder", "tokenizer")  # copies of the shipped autoencoder and text encoder: not sent back


def minilcm(*args, env=None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minilcm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def stage_args(stage: str, models: Path, minutes: float, device: str) -> list[str]:
    """The ``minilcm train`` command of one plan line: each student distils the teacher trained before it."""
    args = ["train", stage, "--minutes", f"{minutes:g}", "--out", str(models / f"{stage_name(stage)}"),
            "--device", device, "--quiet"]
    if stage == "minisd":
        args += ["--init", str(ROOT / "data" / "checkpoints" / "minisd-cifar10")]
    if stage == "lcm":
        args += ["--teacher", str(models / "minisd-cifar10")]
    if stage == "cd":
        args += ["--teacher", str(models / "ddpm-cifar10")]
    return args


def stage_name(stage: str) -> str:
    return {"minisd": "minisd-cifar10", "lcm": "lcm-cifar10", "ddpm": "ddpm-cifar10", "cd": "cd-cifar10"}[stage]


def prepare_models(models: Path) -> None:
    """The minisd stage trains on an existing autoencoder: the shipped one, copied into its export folder."""
    vae = models / "minisd-cifar10" / "vae"
    if not vae.exists():
        shutil.copytree(ROOT / "data" / "checkpoints" / "minisd-cifar10" / "vae", vae)


def pack(models: Path, out: Path) -> list[str]:
    """``models`` as one tar (the trained weights and metadata; ``SKIP`` left out) split into ``out/models.tar.partN``
    of at most ``PART`` bytes; returns the part names. Old parts are replaced."""
    for old in out.glob("models.tar.part*"):
        old.unlink()
    tar = out.parent / f".{out.name}-models.tar"
    with tarfile.open(tar, "w") as tf:
        for f in sorted(p for p in models.rglob("*") if p.is_file()):
            rel = f.relative_to(models)
            if not set(rel.parts) & set(SKIP):
                tf.add(f, arcname=str(rel))
    names = []
    with open(tar, "rb") as fh:
        while chunk := fh.read(PART):
            names.append(f"models.tar.part{len(names)}")
            (out / names[-1]).write_bytes(chunk)
    tar.unlink()
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the folder that comes back ($OUT on the device)")
    p.add_argument("--dry-run", action="store_true", help="CPU, fast profile, 0.05-minute budgets: the same path")
    p.add_argument("--n", type=int, default=None, help="bench images per row (default 1000; 16 with --dry-run)")
    p.add_argument("--work", default=None, help="where models train (default runs/gpu-run)")
    p.add_argument("--deadline", type=float, default=DEADLINE_MIN, help="minutes from the start after which no "
                   "part starts that would not finish (the device allows 10 per command)")
    a = p.parse_args(argv)
    out, work = Path(a.out).resolve(), Path(a.work or ROOT / "runs" / "gpu-run").resolve()
    models = work / "models"
    env = {**os.environ, "MINILCM_PROFILE": "fast" if a.dry_run else "gpu"}
    device = "cpu" if a.dry_run else "cuda"
    n = a.n or (16 if a.dry_run else 1000)
    out.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    record = {"dry_run": a.dry_run, "profile": env["MINILCM_PROFILE"], "device": device,
              "commit": os.environ.get("MINILCM_GIT_COMMIT") or _git_commit(),
              "plan": [{"stage": s, "minutes": DRY_MINUTES if a.dry_run else m} for s, m in PLAN], "stages": {},
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    t_all = time.perf_counter()
    deadline = t_all + 60 * a.deadline

    def fits(minutes: float) -> bool:
        return a.dry_run or time.perf_counter() + 60 * minutes <= deadline

    prepare_models(models)
    for line in record["plan"]:
        stage, t0 = line["stage"], time.perf_counter()
        if not fits(line["minutes"] + OVERHEAD_MIN["stage"]):
            record["stages"][stage] = {"skipped": "the deadline"}
            continue
        r = minilcm(*stage_args(stage, models, line["minutes"], device), env=env, cwd=work)
        entry = {"returncode": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        meta_path = models / stage_name(stage) / "meta.json"
        if r.returncode == 0 and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            entry.update({k: meta.get(k) for k in ("steps", "images_seen", "wall_seconds", "export_seconds",
                                                   "budget", "metrics", "hardware", "git_commit")})
            if stage == "lcm":
                entry["guidance_distillation"] = meta.get("guidance_distillation")
        else:
            entry["stderr"] = r.stderr[-2000:]
        record["stages"][stage] = entry
        record["packed"] = pack(models, out)  # what finished comes back even if the run is cut short
        _write(out / "gpu_run.json", record)
    if fits(OVERHEAD_MIN["bench"]):
        t0 = time.perf_counter()
        trained = {s: models / stage_name(s) for s, _ in PLAN if (models / stage_name(s) / "meta.json").exists()}
        pick = [f"--{s}" for s in ("minisd", "lcm", "ddpm", "cd")]
        args = [x for s, flag in zip(("minisd", "lcm", "ddpm", "cd"), pick) if s in trained
                for x in (flag, str(trained[s]))]
        bench = minilcm("bench", "--n", str(n), "--out", str(work / "bench"), "--device", device, *args,
                        env=env, cwd=work)
        record["bench"] = {"returncode": bench.returncode, "seconds": round(time.perf_counter() - t0, 1), "n": n,
                           **({"stderr": bench.stderr[-2000:]} if bench.returncode else {})}
        if (work / "bench" / "bench.md").exists():
            shutil.copy2(work / "bench" / "bench.md", out / "bench.md")
            record["bench"]["json"] = json.loads((work / "bench" / "bench.json").read_text())
    else:
        record["bench"] = {"skipped": "the deadline"}
    _write(out / "gpu_run.json", record)
    if fits(OVERHEAD_MIN["lcd_throughput"]):
        t0 = time.perf_counter()
        lcd = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lcd_throughput.py"),
                              *(["--tiny", "--steps", "2", "--warmup", "1"] if a.dry_run else []),
                              "--out", str(out / "lcd_throughput.json")], cwd=work, env=env, capture_output=True,
                             text=True)
        record["lcd_throughput"] = {"returncode": lcd.returncode, "seconds": round(time.perf_counter() - t0, 1),
                                    **({"stderr": lcd.stderr[-2000:]} if lcd.returncode else {})}
    else:
        record["lcd_throughput"] = {"skipped": "the deadline"}
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    _write(out / "gpu_run.json", record)
    parts = [record["stages"][s] for s, _ in PLAN] + [record["bench"], record["lcd_throughput"]]
    names = [s for s, _ in PLAN] + ["bench", "lcd_throughput"]
    failed = [nm for nm, e in zip(names, parts) if e.get("returncode") or "skipped" in e]
    print(f"gpu_run: {record['seconds']} s; " + (f"failed or skipped: {', '.join(failed)}" if failed
                                                    else "every part passed"))
    return 1 if failed else 0


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() \
            or None
    except OSError:
        return None


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
