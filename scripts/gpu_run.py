"""One GPU run of the course: train the stages that matter most to a time budget, measure them, pack what comes back.

    python scripts/gpu_run.py OUT                   # on the device (MINILCM_PROFILE=gpu): the plan below
    python scripts/gpu_run.py OUT --dry-run         # here, on the CPU: the same code path, fast profile, tiny budgets

``scripts/gpu_run.sh`` prepares the wheels and the CIFAR archive that travel, installs them on the device, and calls
this. The plan, in order of value (each line a ``minilcm train STAGE --minutes M``; 8 minutes of training in all,
so that one 15-minute lease holds the machine start, the installs, the measurement and the copy back):

  1. minisd  2.5 min  the Chapter 5 teacher, warm-started from the shipped one, on the shipped autoencoder's latents
  2. lcm     2.0 min  its LCM student (guidance-distillation warm start, then LCD)
  3. ddpm    2.0 min  the Chapters 1-4 pixel teacher at the gpu profile's size ("small", 6M: ships in 12 MB fp16)
  4. cd      1.5 min  its consistency-distilled student

then ``minilcm bench`` on the four new models (n images per row) and ``benchmarks/lcd_throughput.py`` (SD-v1.5
shapes, batch 16, bf16). Everything lands in OUT: ``models/`` (the checkpoints; any file over 16 MiB split into
parts, ``cat`` joins them), ``bench/`` (bench.md, bench.json), ``lcd_throughput.json`` and ``gpu_run.json`` (the
plan, each stage's budget record and metrics, the commit it ran from, the hardware, and how long each part took).
A stage that fails is recorded with its error and the run goes on with the next.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAN = [("minisd", 2.5), ("lcm", 2.0), ("ddpm", 2.0), ("cd", 1.5)]
DRY_MINUTES = 0.05
PART = 16 * 2 ** 20 - 1  # the largest file that comes back through $OUT


def minilcm(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minilcm.cli", *args], cwd=ROOT, env=env, capture_output=True,
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


def pack(src: Path, dst: Path) -> list[str]:
    """Copy ``src`` into ``dst``, splitting any file over 16 MiB into ``NAME.part0``, ``NAME.part1``, ..."""
    written = []
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if f.stat().st_size <= PART:
            shutil.copy2(f, dst / rel)
            written.append(str(rel))
            continue
        with open(f, "rb") as fh:
            i = 0
            while chunk := fh.read(PART):
                part = dst / rel.parent / f"{rel.name}.part{i}"
                part.write_bytes(chunk)
                written.append(str(part.relative_to(dst)))
                i += 1
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the folder that comes back ($OUT on the device)")
    p.add_argument("--dry-run", action="store_true", help="CPU, fast profile, 0.05-minute budgets: the same path")
    p.add_argument("--n", type=int, default=None, help="bench images per row (default 2000; 16 with --dry-run)")
    p.add_argument("--work", default=None, help="where models train (default runs/gpu-run)")
    a = p.parse_args(argv)
    out, work = Path(a.out).resolve(), Path(a.work or ROOT / "runs" / "gpu-run").resolve()
    models = work / "models"
    env = {**os.environ, "MINILCM_PROFILE": "fast" if a.dry_run else "gpu"}
    device = "cpu" if a.dry_run else "cuda"
    n = a.n or (16 if a.dry_run else 2000)
    out.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    record = {"dry_run": a.dry_run, "profile": env["MINILCM_PROFILE"], "device": device,
              "commit": os.environ.get("MINILCM_GIT_COMMIT") or _git_commit(),
              "plan": [{"stage": s, "minutes": DRY_MINUTES if a.dry_run else m} for s, m in PLAN], "stages": {},
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    t_all = time.perf_counter()
    prepare_models(models)
    for line in record["plan"]:
        stage, t0 = line["stage"], time.perf_counter()
        r = minilcm(*stage_args(stage, models, line["minutes"], device), env=env)
        entry = {"returncode": r.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        meta_path = models / stage_name(stage) / "meta.json"
        if r.returncode == 0 and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            entry.update({k: meta.get(k) for k in ("steps", "images_seen", "wall_seconds", "export_seconds",
                                                   "budget", "metrics", "hardware")})
            if stage == "lcm":
                entry["guidance_distillation"] = meta.get("guidance_distillation")
        else:
            entry["stderr"] = r.stderr[-2000:]
        record["stages"][stage] = entry
        _write(out / "gpu_run.json", record)
    t0 = time.perf_counter()
    bench = minilcm("bench", "--n", str(n), "--out", str(work / "bench"), "--device", device,
                    "--minisd", str(models / "minisd-cifar10"), "--lcm", str(models / "lcm-cifar10"),
                    "--ddpm", str(models / "ddpm-cifar10"), "--cd", str(models / "cd-cifar10"), env=env)
    record["bench"] = {"returncode": bench.returncode, "seconds": round(time.perf_counter() - t0, 1), "n": n,
                       **({"stderr": bench.stderr[-2000:]} if bench.returncode else {})}
    for f in ("bench.md", "bench.json"):
        if (work / "bench" / f).exists():
            (out / "bench").mkdir(exist_ok=True)
            shutil.copy2(work / "bench" / f, out / "bench" / f)
    t0 = time.perf_counter()
    lcd = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lcd_throughput.py"),
                          *(["--tiny", "--steps", "2", "--warmup", "1"] if a.dry_run else []),
                          "--out", str(out / "lcd_throughput.json")], cwd=ROOT, env=env, capture_output=True, text=True)
    record["lcd_throughput"] = {"returncode": lcd.returncode, "seconds": round(time.perf_counter() - t0, 1),
                                **({"stderr": lcd.stderr[-2000:]} if lcd.returncode else {})}
    record["packed"] = pack(models, out / "models")
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    _write(out / "gpu_run.json", record)
    failed = [k for k, v in record["stages"].items() if v["returncode"]] + \
             [k for k in ("bench", "lcd_throughput") if record[k]["returncode"]]
    print(f"gpu_run: {record['seconds']} s; " + (f"failed: {', '.join(failed)}" if failed else "every part passed"))
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
