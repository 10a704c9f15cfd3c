"""How far the LCM student's w knob turns: class accuracy at w = 0 / 1 / 3, against the guided teacher's.

    python benchmarks/w_knob.py                                   # the shipped lcm-cifar10, 1000 images per w
    python benchmarks/w_knob.py --student runs/lcm-gd1000 --teacher-too --n 1000 --out benchmarks/results/w_knob.json
    python benchmarks/w_knob.py --tiny                            # 20 images per w: a smoke test

For each w the student samples n class-balanced images (LCM, 4 steps, seed 0; ``minilcm.generate.generate``) and
the course classifier (``evaluator-cifar10``) reads their class; the teacher (mini-SD, DPM-Solver++ 25 steps, the
same requests and seed) is measured too with ``--teacher-too``. The target of the course (issue 15): the student
within 8 points of the teacher at every w. Run it with nothing else on the machine if you read its seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from minilcm.evaluator import Evaluator  # noqa: E402
from minilcm.profiles import hardware  # noqa: E402
from minilcm.generate import generate  # noqa: E402
from minilcm.zoo import load_model_folder  # noqa: E402

WS = (0.0, 1.0, 3.0)


def accuracies(model, sampler: str, steps: int, n: int, ev: Evaluator) -> dict:
    out = {}
    for w in WS:
        t0 = time.perf_counter()
        g = generate(model, sampler, steps, n, w=w, seed=0)
        out[f"{w:g}"] = {"accuracy": round(ev.class_accuracy(g.images_nchw, torch.from_numpy(g.labels)), 4),
                         "seconds": round(time.perf_counter() - t0, 1)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="lcm-cifar10")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--teacher-too", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    n = 20 if a.tiny else a.n
    ev = Evaluator.load(device="cpu")
    student = load_model_folder(a.student)
    result = {"student": str(a.student), "n_per_w": n, "sampler": "lcm, 4 steps", "seed": 0,
              "student_accuracy": accuracies(student, "lcm", 4, n, ev), "hardware": hardware("cpu"),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.teacher_too:
        result["teacher"] = "minisd-cifar10, dpm_solver_pp 25 steps"
        result["teacher_accuracy"] = accuracies(load_model_folder("minisd-cifar10"), "dpm_solver_pp", 25, n, ev)
        result["gap_points"] = {w: round(100 * (result["student_accuracy"][w]["accuracy"]
                                                - result["teacher_accuracy"][w]["accuracy"]), 1)
                                for w in result["student_accuracy"]}
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
