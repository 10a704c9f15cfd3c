"""The one-command GPU run (scripts/gpu_run.sh, scripts/gpu_run.py), proved on the CPU before a GPU is spent on it:
``prepare`` gathers what travels and checks its size; ``dry-run`` takes the device path (install from the wheels
with --no-index --target, every stage of the plan trained to a budget, the benchmark, the LCD throughput script,
the packing of what comes back) in the fast profile with 0.05-minute budgets."""
import importlib.util
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_run", ROOT / "scripts" / "gpu_run.py")
gpu_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_run)


def test_pack_makes_one_tar_in_parts_and_leaves_the_unchanged_copies_out(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_run, "PART", 1000)
    src = tmp_path / "models"
    for d in ("m/unet", "m/vae", "m/tokenizer"):
        (src / d).mkdir(parents=True)
    big = os.urandom(2500)
    (src / "m" / "unet" / "w.safetensors").write_bytes(big)
    (src / "m" / "vae" / "v.safetensors").write_bytes(b"shipped")
    (src / "m" / "meta.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "models.tar.part9").write_bytes(b"stale")
    names = gpu_run.pack(src, out)
    assert names == [f"models.tar.part{i}" for i in range(len(names))] and len(names) >= 3
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # the stale part is gone, nothing else written
    assert all((out / n).stat().st_size <= 1000 for n in names)
    joined = tmp_path / "joined.tar"
    joined.write_bytes(b"".join((out / n).read_bytes() for n in names))
    with tarfile.open(joined) as tf:
        assert sorted(tf.getnames()) == ["m/meta.json", "m/unet/w.safetensors"]
        assert tf.extractfile("m/unet/w.safetensors").read() == big


def test_the_plan_fits_eight_minutes_and_each_student_distils_the_teacher_before_it(tmp_path):
    o = gpu_run.OVERHEAD_MIN  # one command may run 10 minutes: the plan and its estimated overheads fit the deadline
    total = sum(m + o["stage"] for _, m in gpu_run.PLAN) + o["bench"] + o["lcd_throughput"]
    assert total <= gpu_run.DEADLINE_MIN < 10
    stages = [s for s, _ in gpu_run.PLAN]
    assert stages.index("minisd") < stages.index("lcm") and stages.index("ddpm") < stages.index("cd")
    lcm = gpu_run.stage_args("lcm", tmp_path, 2.0, "cuda")
    assert lcm[lcm.index("--teacher") + 1] == str(tmp_path / "minisd-cifar10") and "--minutes" in lcm
    cd = gpu_run.stage_args("cd", tmp_path, 1.5, "cuda")
    assert cd[cd.index("--teacher") + 1] == str(tmp_path / "ddpm-cifar10")


@pytest.mark.slow
def test_prepare_then_the_dry_run_takes_the_device_path(tmp_path, cifar_archive):
    env = {**os.environ, "MINILCM_CIFAR": str(cifar_archive), "OMP_NUM_THREADS": "1",
           "MINILCM_CACHE": str(ROOT / "data" / "cache"), "GPU_RUN_WORK": str(tmp_path / "work")}
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
        assert e["git_commit"] == rec["commit"]
    assert rec["bench"]["returncode"] == 0 and rec["bench"]["json"]["rows"] and (out / "bench.md").is_file()
    assert json.loads((out / "lcd_throughput.json").read_text())
    # what comes back follows the device's rules: at most 8 files of 16 MiB, no folders
    files = sorted(out.iterdir())
    assert len(files) <= 8 and all(f.is_file() and f.stat().st_size <= 16 * 2 ** 20 for f in files), files
    joined = tmp_path / "models.tar"
    joined.write_bytes(b"".join((out / n).read_bytes() for n in rec["packed"]))
    with tarfile.open(joined) as tf:
        names = tf.getnames()
    for stage, _ in gpu_run.PLAN:
        assert f"{gpu_run.stage_name(stage)}/meta.json" in names, names
    assert not any("/vae/" in n or "/text_encoder/" in n for n in names)
