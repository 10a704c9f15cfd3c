"""The ``minilcm`` command line.

    minilcm demo [--out runs/demo] [--steps 3000]      the newcomer's first run (under a minute on a CPU)
    minilcm sample --model NAME_OR_PATH --sampler S --steps N --n N --out FILE.npz [...]   images from a checkpoint
    minilcm bench [--n N] [--w W] [--out runs/bench]   every sampler at every NFE on the shipped models, one table
    minilcm train {evaluator,autoencoder,minisd,lcm,ddpm,cd}   one stage of the shipped checkpoints (minilcm.stages)
    minilcm sd-distill TEACHER DATA OUT [--mode full|lora ...]   LCD / LCM-LoRA of a Stable Diffusion (Chapter 6)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .checkpoints import atomic_write
from .errors import InputError, TrainingInterrupted, UserError, debug, short


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def demo(args) -> int:
    """Train the 2-D teacher on the Gaussian mixture, sample it, draw data vs samples, time every part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .toys import GaussianMixture
    from .diffusion import DenoisingLoss, ddpm
    from .metrics import sliced_wasserstein
    from .models import MLPDenoiser
    from .schedules import Schedule
    from .train import TrainConfig, train
    from .viz import scatter_2d

    if args.steps < 1 or args.n < 2:
        raise InputError(f"--steps must be >= 1 and --n >= 2, got --steps {args.steps} --n {args.n}")
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
    from tqdm.auto import tqdm

    from .generate import NFECounter

    counter = NFECounter(res.ema, tqdm(total=1000, desc=f"sample {args.n} points, 1000-step DDPM", unit="NFE",
                                         leave=False, mininterval=1.0))
    try:
        samples = ddpm(res.ema, x_T, schedule, schedule.timesteps(1000), generator=g).x
    finally:
        counter.close()
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
    atomic_write(out / "demo.png", lambda tmp: fig.savefig(tmp, dpi=100))
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


def train_stage(args) -> int:
    """Train one stage of the shipped-checkpoint recipe (minilcm.stages) and print its metadata."""
    import json

    from . import stages

    kw = {"teacher": args.teacher} if args.stage in ("lcm", "cd") and args.teacher else {}
    if args.teacher and args.stage not in ("lcm", "cd"):
        raise InputError(f"--teacher is for the lcm and cd stages; `minilcm train {args.stage}` has no teacher")
    meta = stages.STAGES[args.stage](out=args.out, device=args.device, replace_shipped=args.replace_shipped,
                                     progress=not args.quiet, **kw)
    print(json.dumps(meta.get("metrics", {}), indent=1))
    print(f"exported to {meta['exported_to']}")
    return 0


def writable_out(out: Path, force: bool, *extra: Path) -> None:
    """Fail before any work when ``out`` (and the files written beside it) cannot be written, or exist and
    ``--force`` was not given. Writability is probed by creating (and removing) a file in the nearest existing
    folder: permission bits alone say nothing for root or on a read-only mount."""
    import tempfile

    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"--out {out}: {probe} is a file, not a folder; choose another --out")
    try:
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {probe} ({e.strerror or type(e).__name__}); choose another "
                         "--out") from None
    for f in (out, *extra):
        if f.is_dir():
            raise InputError(f"--out {out}: {f} is a folder; name a file")
        if f.exists() and not force:
            raise InputError(f"{f} exists; pass --force to overwrite it, or choose another --out")


def sample(args) -> int:
    """Sample images from a checkpoint (minilcm.generate) and write FILE.npz (images, labels) and FILE.png."""
    import numpy as np

    from .generate import check_request, generate
    from .zoo import guidance_range, load_model_folder

    out = Path(args.out)
    if out.suffix != ".npz":
        raise InputError(f"--out must name a .npz file, got {out}")
    png = out.with_suffix(".png")
    writable_out(out, args.force, png)
    if args.device == "cuda" and not _has_cuda():
        raise InputError("--device cuda but CUDA is not available here; use --device cpu")
    check_request(args.sampler, args.steps, args.n, w=args.guidance, batch=args.batch, prompt=args.prompt)
    t0 = time.perf_counter()
    model = load_model_folder(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    rng = guidance_range(model) if model.conditional != "none" else None
    if rng is not None and not rng[0] <= args.guidance <= rng[1]:
        print(f"minilcm sample: warning: w = {args.guidance:g} is outside the range this student was distilled on, "
              f"w in [{rng[0]:g}, {rng[1]:g}] (LCM convention): expect poor images", file=sys.stderr)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning above, once
        res = generate(model, args.sampler, args.steps, args.n, w=args.guidance, class_=args.class_,
                       prompt=args.prompt, seed=args.seed, batch=args.batch, device=args.device,
                       progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, images=res.images, labels=res.labels)

    written = []
    try:
        atomic_write(out, save_npz)
        written.append(out)
        atomic_write(png, lambda tmp: _write_grid(res.images[:100], tmp))
    except BaseException:
        for f in written:  # the pair is one result: never leave half of it
            f.unlink(missing_ok=True)
        raise
    cfg = "" if model.conditional == "none" else f", w = {args.guidance:g} (guidance_scale {args.guidance + 1:g})"
    print(f"{args.n} images from {model.kind} {model.path} with {args.sampler}, {args.steps} steps "
          f"({res.nfe} NFE{', CFG: 2 rows per evaluation' if res.rows_per_eval == 2 else ''}){cfg}")
    print(f"wall time per image: {res.seconds_per_image * 1e3:.2f} ms ({res.info['seconds']:.2f} s for {args.n}, "
          f"batch {args.batch}, {args.device}; loading took {load_s:.1f} s)")
    print(f"wrote {out} (images {res.images.shape} uint8, labels) and {png}")
    return 0


def _write_grid(images, path: Path) -> None:
    """A PNG grid of (N, 32, 32, 3) uint8 images, 10 per row (one column per class when classes cycle)."""
    import torch
    from PIL import Image

    from .viz import image_grid

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    Image.fromarray(image_grid(x, nrow=min(10, len(images)))).save(path, format="PNG")


def bench(args) -> int:
    """Every sampler at every NFE on the shipped teachers and students (minilcm.bench.model_benchmark)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    from .bench import model_benchmark
    from .profiles import pick

    if args.n is not None and args.n < 1:
        raise InputError(f"--n must be >= 1 (images per row), got {args.n}; leave it out for the profile's default")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if not math.isfinite(args.w):
        raise InputError(f"--w must be a finite number, got {args.w}")
    n = args.n or pick(fast=20, cpu=1000, gpu=10_000)
    writable_out(Path(args.out) / "bench.md", True)
    if args.device == "cuda" and not _has_cuda():
        raise InputError("--device cuda but CUDA is not available here; use --device cpu")
    res = model_benchmark(n, args.w, args.out, device=args.device, seed=args.seed, batch=args.batch,
                          minisd=args.minisd, lcm=args.lcm, evaluator=args.evaluator,
                          pixel_teacher=None if args.no_pixel else args.ddpm,
                          pixel_cm=None if args.no_pixel else args.cd, progress=not args.quiet)
    print(res["table"])
    print("wrote " + ", ".join(res["files"].values()))
    return 0


USER_ERRORS = (UserError, ValueError, OSError, ImportError)


def _main_rank() -> bool:
    """False on the non-main processes of a multi-process launch (accelerate launch, torchrun set RANK)."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: one line naming the problem and where the help is (exit code 2), instead of
    the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def main(argv=None) -> int:
    p = _Parser(prog="minilcm", description="minilcm: from DDPM to latent consistency models. "
                                "A user error prints one short message and exits with code 2; --debug (or "
                                "MINILCM_DEBUG=1) shows the traceback.")
    p.add_argument("--debug", action="store_true", help="show tracebacks (same as MINILCM_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train and sample a 2-D DDPM in under a minute, write a figure")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=3000)
    d.add_argument("--n", type=int, default=2000, help="number of samples")
    d.set_defaults(fn=demo)
    t = sub.add_parser("train", help="train one stage of the shipped checkpoints (see minilcm.stages)")
    t.add_argument("stage", choices=["evaluator", "autoencoder", "minisd", "lcm", "ddpm", "cd"])
    t.add_argument("--out", default=None, help="export folder (default: runs/<name>; the shipped checkpoints in "
                   "data/checkpoints are never replaced unless --replace-shipped is given)")
    t.add_argument("--replace-shipped", action="store_true", help="allow the export to replace a shipped "
                   "checkpoint under data/checkpoints (with --out pointing there, or to make the stage's default "
                   "the shipped folder)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    t.add_argument("--teacher", default=None, help="lcm / cd stage: the teacher folder to distil (default: the shipped mini-SD / ddpm-cifar10)")
    t.set_defaults(fn=train_stage)
    s = sub.add_parser("sample", help="sample images from a checkpoint into FILE.npz (+ FILE.png)",
                       description="Sample images from a shipped checkpoint or a folder (see minilcm.generate). "
                       "--guidance is w in the LCM convention, eps_w = (1 + w) eps_cond - w eps_uncond: diffusers' "
                       "guidance_scale = w + 1. Without --class or --prompt a conditional model samples the ten "
                       "classes evenly.")
    s.add_argument("--model", required=True, metavar="NAME_OR_PATH", help="shipped name (minisd-cifar10, lcm-cifar10, ddpm-cifar10, "
                   "cd-cifar10) or a folder path")
    s.add_argument("--sampler", required=True, choices=["ddpm", "ddim", "dpm_solver", "dpm_solver_pp", "cm", "lcm"])
    s.add_argument("--steps", type=int, required=True, metavar="N", help="network evaluations (NFE) per sample")
    s.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="CFG weight w, LCM convention (diffusers guidance_scale = w + 1); default 1.0")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_", default=None, metavar="INDEX_OR_NAME", help="CIFAR-10 class index (0-9) or name")
    which.add_argument("--prompt", default=None, metavar="TEXT", help="text prompt (the text-conditioned mini-SD and LCM student)")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0, metavar="S")
    s.add_argument("--batch", type=int, default=250, metavar="B", help="images per batch (default 250)")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if _has_cuda() else "cpu")
    s.add_argument("--out", required=True, metavar="FILE.npz", help="FILE.npz (the PNG grid is written beside it as FILE.png)")
    s.add_argument("--force", action="store_true", help="overwrite FILE.npz / FILE.png if they exist")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=sample)
    b = sub.add_parser("bench", help="every sampler at every NFE on the shipped models: table, JSON, plot",
                       description="Run the mini-SD teacher (DDIM, DPM-Solver++ at 4/8/25 steps, DDPM at 25) and the "
                       "LCM student (1/2/4 steps), plus the pixel DDPM/CD models when shipped, on the same seeds; "
                       "measure FD-clf, class accuracy, NFE and time per image; check the LCM headline.")
    b.add_argument("--n", type=int, default=None, help="images per row (default by profile: fast 20, cpu 1000, "
                   "gpu 10000)")
    b.add_argument("--w", type=float, default=1.0, help="guidance, LCM convention (guidance_scale = w + 1)")
    b.add_argument("--out", default="runs/bench", help="folder for bench.md, bench.json, bench.png")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if _has_cuda() else "cpu")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch", type=int, default=250)
    b.add_argument("--minisd", default="minisd-cifar10", help="mini-SD teacher (name or folder)")
    b.add_argument("--lcm", default="lcm-cifar10", help="LCM student (name or folder)")
    b.add_argument("--evaluator", default="evaluator-cifar10", help="FD-clf evaluator (name or folder)")
    b.add_argument("--ddpm", default="ddpm-cifar10", help="pixel DDPM teacher (skipped when missing)")
    b.add_argument("--cd", default="cd-cifar10", help="pixel CD student (skipped when missing)")
    b.add_argument("--no-pixel", action="store_true", help="leave out the pixel models even when shipped (their "
                   "32x32 UNets are slow on a CPU)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=bench)
    from .sd.cli import register as register_sd_distill

    register_sd_distill(sub)  # minilcm sd-distill (Chapter 6)
    args = p.parse_args(argv)
    try:
        from .profiles import current

        current()  # a mistyped MINILCM_PROFILE fails here, before any work
        return args.fn(args)
    except TrainingInterrupted as e:
        if _main_rank():
            print(f"minilcm {args.cmd}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug or debug():
            raise
        print(f"minilcm {args.cmd}: interrupted (Ctrl-C); no partial output was kept", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.debug or debug():
            raise
        if not _main_rank():  # under accelerate / torchrun every process fails alike: one message
            return 2
        hint = not isinstance(e, UserError)  # a ValueError / OSError from a library: maybe a bug, say how to see it
        print(f"minilcm {args.cmd}: error: {short(e, 2 if hint else 3)}", file=sys.stderr)
        if hint:  # an OSError or ImportError: the traceback may say more
            print("(run with --debug or MINILCM_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
