"""Chapter 6, several processes: `minilcm sd-distill` under a 2-process CPU launch (torchrun + accelerate, gloo).

The launch is the one `accelerate launch --multi_gpu --num_processes 2` makes (WORLD_SIZE / RANK / LOCAL_RANK
for each process). On a machine without CUDA that is the case of the bug this guards against: accelerate used to
leave such processes unjoined, each acting as rank 0 (same seed, duplicated log lines, a race on the checkpoint);
sd-distill now joins them on the CPU. With CUDA, ACCELERATE_USE_CPU=1 keeps the run on the CPU. Checked: ONE log stream
(log.jsonl has one line per step), ONE result line, ONE export, ranks taken from accelerate (0 and 1, one of them
main), identical trainable parameters on both processes after training, the export equal to them, and a rerun with
more steps resuming from the checkpoint.

Each process's trained adapters are dumped by a wrapper script this test writes (SD_DUMP); the package has no
debug hook for it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minilcm.models.sd import tiny_sd_pipeline
from test_sd import write_images

ROOT = Path(__file__).resolve().parents[1]

WRAPPER = '''
import importlib, os, sys
import torch

D = importlib.import_module("minilcm.sd.training")  # the module of distill()
_distill = D.distill


def distill(*args, **kwargs):
    r = _distill(*args, **kwargs)
    from accelerate import PartialState
    from peft.utils import get_peft_model_state_dict

    state = PartialState()
    lora = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(r.student.net).items()}
    torch.save({"process_index": state.process_index, "num_processes": state.num_processes,
                "is_main": getattr(r, "is_main", None), "step": r.step, "resumed_from": r.resumed_from, "lora": lora},
               os.path.join(os.environ["SD_DUMP"], "rank%s.pt" % os.environ["RANK"]))
    return r


D.distill = distill
from minilcm.cli import main

sys.exit(main(sys.argv[1:]))
'''


def launch(wrapper: Path, dump: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """Two CPU processes through torch.distributed.run (a free local port: --standalone); no timeout (a loaded
    2-core machine is slow, and the processes end on their own: torchrun stops both when one fails)."""
    for f in dump.glob("rank*.pt"):
        f.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SD_DUMP": str(dump),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if torch.cuda.is_available():  # two CPU processes even on a GPU machine (one GPU cannot host two NCCL ranks)
        env["ACCELERATE_USE_CPU"] = "1"
    else:
        env.pop("ACCELERATE_USE_CPU", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper), *argv]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)


def result_lines(stdout: str) -> list[dict]:
    return [json.loads(ln) for ln in stdout.splitlines() if ln.startswith('{"export"')]


def lora_export(out: Path) -> dict:
    from safetensors.torch import load_file

    return {k.removeprefix("unet."): v for k, v in load_file(out / "lora" / "pytorch_lora_weights.safetensors").items()}


def dumps(dump: Path) -> list[dict]:
    found = sorted(dump.glob("rank*.pt"))
    assert len(found) == 2, found
    return [torch.load(f, weights_only=True) for f in found]


@pytest.mark.slow
def test_two_processes_one_log_one_export_same_weights_and_resume(tmp_path):
    teacher, data, out, dump = tmp_path / "teacher", write_images(tmp_path / "captions"), tmp_path / "out", tmp_path
    tiny_sd_pipeline(teacher)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    argv = ["sd-distill", str(teacher), str(data), str(out), "--mode", "lora", "--batch-size", "2", "--lora-rank",
            "4", "--lr", "1e-3", "--ckpt-every", "1", "--no-progress"]

    run = launch(wrapper, dump, argv + ["--steps", "3"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = result_lines(run.stdout)
    assert len(printed) == 1 and printed[0]["step"] == 3 and printed[0]["resumed_from"] == 0, run.stdout
    log = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # one stream: the main process's
    ranks = dumps(dump)
    assert sorted(r["process_index"] for r in ranks) == [0, 1] and {r["num_processes"] for r in ranks} == {2}
    assert sorted(r["is_main"] for r in ranks) == [False, True]
    a, b = (r["lora"] for r in ranks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # one model, not two
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # and it trained (lora_B starts at zero)
    exported = lora_export(out)
    assert exported.keys() == a.keys() and all(torch.equal(exported[k], a[k]) for k in a)
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["minilcm.json", "pytorch_lora_weights.safetensors"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or ".partial" in p.name]  # no half-written file

    run = launch(wrapper, dump, argv + ["--steps", "5"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = result_lines(run.stdout)
    assert len(printed) == 1 and printed[0]["step"] == 5 and printed[0]["resumed_from"] == 3, run.stdout
    assert [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    ranks = dumps(dump)
    assert all(r["resumed_from"] == 3 and r["step"] == 5 for r in ranks)
    a, b = (r["lora"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = lora_export(out)
    assert all(torch.equal(exported[k], a[k]) for k in a)
