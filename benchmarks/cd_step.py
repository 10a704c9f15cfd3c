"""The CD step's teacher solve, batched over per-row times against one call per distinct time, on CPU.

    python benchmarks/cd_step.py                 # the shipped CIFAR teacher, batch 64, N = 18 -> benchmarks/results/
    python benchmarks/cd_step.py --tiny          # a random tiny UNet, batch 8: a smoke test (runs/bench/)

``consistency.ConsistencyDistillation`` draws the grid index n i.i.d. per row (Song et al. 2023, Algorithm 2) and
hands the (B,) times to ``sde.heun_step`` at once: two teacher calls of B rows. The alternative it replaced loops
over the distinct times of the batch, one Heun step per group (up to N = 18 groups, so up to 36 smaller calls).
Both are timed on the same batches, one after the other in one process (interleaved, best of the repeats), with
their max difference; and the whole CD step (solve + online and target forwards + backward + Adam), batched, so
that the solve's share of a step is on record too. Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minilcm.consistency import CMScalings, ConsistencyDistillation, ConsistencyModel, cm_timesteps  # noqa: E402
from minilcm.schedules import Schedule  # noqa: E402
from minilcm.sde import heun_step  # noqa: E402


def per_time_heun(teacher, x, sched, t, s, cond):
    """One Heun step per distinct time of the batch (the loop ConsistencyDistillation no longer runs)."""
    out = torch.empty_like(x)
    for tv in t.unique():
        rows = (t == tv).nonzero().squeeze(1)
        out[rows] = heun_step(teacher, x[rows], sched, t[rows], s[rows], {k: v[rows] for k, v in cond.items()})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny UNet, batch 8, 2 repeats (smoke test)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="the JSON to write (default benchmarks/results/cd_step.json, "
                                                "runs/bench/cd_step.json with --tiny)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        from minilcm.models.unet import cifar_unet
        teacher, name = cifar_unet("tiny", num_classes=10).eval(), "random tiny UNet"
    else:
        from minilcm.recipes import cifar_teacher
        teacher, name = cifar_teacher(progress=False)[0], "ddpm-cifar10 (shipped)"
    sched = Schedule("linear")  # the CIFAR teacher's (recipes.CifarTeacherRecipe)
    B = args.batch or (8 if args.tiny else 64)
    repeats = args.repeats or (2 if args.tiny else 5)
    teacher = teacher.requires_grad_(False)
    grid = cm_timesteps(sched, 18)  # (19,) t_0 < ... < t_18
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(repeats):
        n = torch.randint(0, 18, (B,), generator=gen)
        x = torch.randn(B, 3, 32, 32, generator=gen)
        batches.append((x, grid[n + 1].float(), grid[n].float(), {"class_labels": torch.full((B,), 10)}, n))
    times = {"batched": [], "per_time": []}
    groups, max_diff = [], 0.0
    with torch.no_grad():
        for x, t, s, cond, n in batches:  # interleaved, so that drift in the machine hits both alike
            t0 = time.perf_counter()
            a = heun_step(teacher, x, sched, t, s, cond)
            times["batched"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = per_time_heun(teacher, x, sched, t, s, cond)
            times["per_time"].append(time.perf_counter() - t0)
            groups.append(len(n.unique()))
            max_diff = max(max_diff, (a - b).abs().max().item())
    student = ConsistencyModel(copy.deepcopy(teacher).requires_grad_(True), sched, CMScalings(0.5)).train()
    loss = ConsistencyDistillation(teacher, student, N=18, solver=heun_step)
    opt = torch.optim.Adam(student.parameters(), lr=1e-5)
    step_s = []
    for x, *_ in batches:
        t0 = time.perf_counter()
        v = loss(student, (x.clamp(-1, 1), None), generator=gen)
        opt.zero_grad()
        v.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    res = {"teacher": name, "batch": B, "N": 18, "repeats": repeats, "distinct_times_per_batch": groups,
           "solve_s_batched": round(best["batched"], 4), "solve_s_per_time": round(best["per_time"], 4),
           "speedup": round(best["per_time"] / best["batched"], 2), "max_abs_diff": max_diff,
           "cd_step_s_batched": round(min(step_s), 4),
           "solve_share_of_step": round(best["batched"] / min(step_s), 3),
           "tiny": args.tiny, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out) if args.out else ROOT / ("runs/bench" if args.tiny else "benchmarks/results") / "cd_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
