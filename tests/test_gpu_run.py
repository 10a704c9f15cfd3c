"""The one-command GPU run (scripts/gpu_run.sh, scripts/gpu_run.py), proved on the CPU before a GPU is spent on it:
``prepare`` gathers what travels and checks its size; ``dry-run`` takes the device path (install from the wheels
with --no-index --target, every stage of the plan trained to a budget, the benchmark, the LCD throughput script,
the packing of what comes back) in the fast profile with 0.05-minute budgets."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "scripts" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_run)


def test_pack_splits_files_over_the_limit_and_cat_joins_them(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "PART", 1000)
    src = tmp_path / "src"
    (src / "m" / "unet").mkdir(parents=True)
    big = os.urandom(2500)
    (src / "m" / "unet" / "w.safetensors").write_bytes(big)
    (src / "m" / "meta.json").write_text("{}")
    written = gpu_run.pack(src, tmp_path / "out")
    assert written == ["m/meta.json", "m/unet/w.safetensors.part0", "m/unet/w.safetensors.part1",
                       "m/unet/w.safetensors.part2"]
    parts = sorted((tmp_path / "out" / "m" / "unet").iterdir())
    assert all(p.stat().st_size <= 1000 for p in parts) and b"".join(p.read_bytes() for p in parts) == big


def test_the_plan_fits_eight_minutes_and_each_student_distils_the_teacher_before_it(tmp_path):
    assert sum(m for _, m in gpu_run.PLAN) <= 8.0
    stages = [s for s, _ in gpu_run.PLAN]
    assert stages.index("minisd") < stages.index("lcm") and stages.index("ddpm") < stages.index("cd")
    lcm = gpu_run.stage_args("lcm", tmp_path, 2.0, "cuda")
    assert lcm[lcm.index("--teacher") + 1] == str(tmp_path / "minisd-cifar10") and "--minutes" in lcm
    cd = gpu_run.stage_args("cd", tmp_path, 1.5, "cuda")
    assert cd[cd.index("--teacher") + 1] == str(tmp_path / "ddpm-cifar10")


@pytest.mark.slow
def test_prepare_then_the_dry_run_takes_the_device_path(tmp_path, cifar_archive):
    env = {**os.environ, "MINILCM_CIFAR": str(cifar_archive), "OMP_NUM_THREADS": "1",
           "MINILCM_CACHE": str(ROOT / "data" / "cache")}
    r = subprocess.run(["bash", "scripts/gpu_run.sh", "prepare"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-1500:]
    assert "(limit 64)" in r.stdout and list((ROOT / ".gpu" / "wheels").glob("diffusers-*.whl"))
    out = tmp_path / "out"
    r = subprocess.run(["bash", "scripts/gpu_run.sh", "dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "installing from .gpu/wheels: diffusers" in r.stdout and "every part passed" in r.stdout
    rec = json.loads((out / "gpu_run.json").read_text())
    assert rec["dry_run"] and rec["commit"] and len(rec["commit"]) == 40
    for stage, _ in gpu_run.PLAN:
        e = rec["stages"][stage]
        assert e["returncode"] == 0 and e["budget"]["steps"] == e["steps"] >= 1, (stage, e)
        assert (out / "models" / gpu_run.stage_name(stage) / "meta.json").is_file()
    meta = json.loads((out / "models" / "lcm-cifar10" / "meta.json").read_text())
    assert meta["git_commit"] == rec["commit"] and meta["overrides"]["minutes"] == gpu_run.DRY_MINUTES
    assert (out / "bench" / "bench.md").is_file() and rec["bench"]["returncode"] == 0
    assert json.loads((out / "lcd_throughput.json").read_text())
    assert all((out / "models" / f).stat().st_size < 16 * 2 ** 20 for f in rec["packed"])
