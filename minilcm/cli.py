"""The ``minilcm`` command line.

    minilcm demo [--out runs/demo] [--steps 3000]      the newcomer's first run (under a minute on a CPU)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def demo(args) -> int:
    """Train the 2-D teacher on the Gaussian mixture, sample it, draw data vs samples, time every part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .datasets import GaussianMixture
    from .diffusion import DenoisingLoss, ddpm
    from .metrics import sliced_wasserstein
    from .models import MLPDenoiser
    from .schedules import Schedule
    from .train import TrainConfig, train
    from .viz import scatter_2d

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    torch.manual_seed(0)
    schedule, data = Schedule("linear"), GaussianMixture()

    t0 = time.perf_counter()
    model = MLPDenoiser(hidden=128, depth=3, num_classes=data.num_classes)
    res = train(model, DenoisingLoss(schedule, cond_drop=0.1, null_class=data.num_classes), data,
                TrainConfig(steps=args.steps, batch_size=256, lr=1e-3, warmup_steps=100, device="cpu",
                            desc="train 2-D DDPM"))
    times["train the 2-D DDPM teacher"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(args.n, 2, generator=g)
    samples = ddpm(res.ema, x_T, schedule, schedule.timesteps(1000), generator=g).x
    times[f"sample {args.n} points, 1000-step DDPM"] = time.perf_counter() - t0

    ref, _ = data.sample(args.n, torch.Generator().manual_seed(2))
    other, _ = data.sample(args.n, torch.Generator().manual_seed(3))
    d_model, d_noise, d_floor = (sliced_wasserstein(a, ref) for a in (samples, x_T, other))

    t0 = time.perf_counter()
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    lp = lambda x: data.log_prob(x)  # noqa: E731
    scatter_2d(x_T, axes[0], title=f"noise x_T  (SW2 {d_noise:.3f})", log_prob=lp)
    scatter_2d(samples, axes[1], title=f"DDPM samples  (SW2 {d_model:.3f})", log_prob=lp)
    scatter_2d(other, axes[2], title=f"fresh data  (SW2 {d_floor:.3f})", log_prob=lp)
    fig.suptitle("minilcm demo: a 2-D DDPM trained in seconds (SW2 = sliced Wasserstein distance to data)")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=100)
    times["draw the figure"] = time.perf_counter() - t0

    print(f"\nsliced W2 to the data: samples {d_model:.3f}, initial noise {d_noise:.3f}, "
          f"a fresh data draw {d_floor:.3f} (the floor)")
    for k, v in times.items():
        print(f"  {v:6.1f} s  {k}")
    print(f"  {sum(times.values()):6.1f} s  total        figure: {out / 'demo.png'}")
    if not d_model < 0.5 * d_noise:
        print("the samples are not closer to the data than the noise: something is wrong", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="minilcm", description="minilcm: from DDPM to latent consistency models")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train and sample a 2-D DDPM in under a minute, write a figure")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=3000)
    d.add_argument("--n", type=int, default=2000, help="number of samples")
    d.set_defaults(fn=demo)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
