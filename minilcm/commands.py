"""What each ``minilcm`` command does, once ``minilcm.cli`` has parsed its arguments (the parser stays torch-free,
so ``minilcm --help`` is instant; this module imports what the commands need).

    demo(args)         train and sample a 2-D DDPM, write a figure (the newcomer's first run)
    train_stage(args)  one stage of the shipped-checkpoint recipe (``minilcm.stages``)
    sample(args)       images from a checkpoint into FILE.npz + FILE.png (``minilcm.generate``)
    bench(args)        every sampler at every NFE on the shipped models (``minilcm.bench``)
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import stages  # noqa: E402
from .bench import model_benchmark  # noqa: E402
from .checkpoints import atomic_write  # noqa: E402
from .diffusion import DenoisingLoss, ddpm  # noqa: E402
from .errors import InputError  # noqa: E402
from .generate import NFECounter, check_request, generate  # noqa: E402
from .metrics import sliced_wasserstein  # noqa: E402
from .models import MLPDenoiser  # noqa: E402
from .profiles import pick  # noqa: E402
from .schedules import Schedule  # noqa: E402
from .toys import GaussianMixture  # noqa: E402
from .train import TrainConfig, train  # noqa: E402
from .zoo import guidance_range, load_model_folder  # noqa: E402


def device_of(args) -> str:
    """The --device asked for, "auto" meaning cuda when available; cuda without CUDA is a user error."""
    dev = getattr(args, "device", "auto") or "auto"
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda but CUDA is not available here; use --device cpu")
    return dev


def demo(args) -> int:
    """Train the 2-D teacher on the Gaussian mixture, sample it, draw data vs samples, time every part."""
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
    # matplotlib only where a figure is drawn: `train` and `bench` run without it (a headless GPU run carries none)
    import matplotlib

    matplotlib.use("Agg")  # the commands write figures to files; never open a window
    import matplotlib.pyplot as plt

    from .viz import scatter_2d  # matplotlib at import: see above
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
    kw = {"teacher": args.teacher} if args.stage in ("lcm", "cd") and args.teacher else {}
    if args.teacher and args.stage not in ("lcm", "cd"):
        raise InputError(f"--teacher is for the lcm and cd stages; `minilcm train {args.stage}` has no teacher")
    if getattr(args, "init", None):
        if args.stage not in ("autoencoder", "minisd"):
            raise InputError(f"--init is for the autoencoder and minisd stages, not {args.stage}")
        kw["init"] = args.init
    meta = stages.STAGES[args.stage](out=args.out, device=device_of(args), replace_shipped=args.replace_shipped,
                                     progress=not args.quiet,
                                     overrides={"steps": args.steps, "batch_size": args.batch,
                                                "minutes": getattr(args, "minutes", None)}, **kw)
    print(json.dumps(meta.get("metrics", {}), indent=1))
    if getattr(args, "minutes", None):
        b = meta.get("budget") or {}
        print(f"budget {args.minutes:g} min: training took {meta['wall_seconds']} s (last phase: {meta['steps']} steps "
              f"at {b.get('seconds_per_step', '?')} s each); export and measurement {meta.get('export_seconds', 0)} s")
    print(f"exported to {meta['exported_to']}")
    return 0


def writable_out(out: Path, force: bool, *extra: Path) -> None:
    """Fail before any work when ``out`` (and the files written beside it) cannot be written, or exist and
    ``--force`` was not given. Writability is probed by creating (and removing) a file in the nearest existing
    folder: permission bits alone say nothing for root or on a read-only mount."""
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
    out = Path(args.out)
    if out.suffix != ".npz":
        raise InputError(f"--out must name a .npz file, got {out}")
    png = out.with_suffix(".png")
    writable_out(out, args.force, png)
    device = device_of(args)
    check_request(args.sampler, args.steps, args.n, w=args.guidance, batch=args.batch, prompt=args.prompt)
    t0 = time.perf_counter()
    model = load_model_folder(args.model, device=device)
    load_s = time.perf_counter() - t0
    rng = guidance_range(model) if model.conditional != "none" else None
    if rng is not None and not rng[0] <= args.guidance <= rng[1]:
        print(f"minilcm sample: warning: w = {args.guidance:g} is outside the range this student was distilled on, "
              f"w in [{rng[0]:g}, {rng[1]:g}] (LCM convention): expect poor images", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning above, once
        res = generate(model, args.sampler, args.steps, args.n, w=args.guidance, class_=args.class_,
                       prompt=args.prompt, seed=args.seed, batch=args.batch, device=device,
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
          f"batch {args.batch}, {device}; loading took {load_s:.1f} s)")
    print(f"wrote {out} (images {res.images.shape} uint8, labels) and {png}")
    return 0


def _write_grid(images, path: Path) -> None:
    """A PNG grid of (N, 32, 32, 3) uint8 images, 10 per row (one column per class when classes cycle)."""
    from .viz import image_grid  # viz imports matplotlib, which `train` and `bench` do without (a headless GPU run)

    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    Image.fromarray(image_grid(x, nrow=min(10, len(images)))).save(path, format="PNG")


def bench(args) -> int:
    """Every sampler at every NFE on the shipped teachers and students (minilcm.bench.model_benchmark)."""
    if args.n is not None and args.n < 1:
        raise InputError(f"--n must be >= 1 (images per row), got {args.n}; leave it out for the profile's default")
    if args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    if not math.isfinite(args.w):
        raise InputError(f"--w must be a finite number, got {args.w}")
    n = args.n or pick(fast=20, cpu=1000, gpu=10_000)
    writable_out(Path(args.out) / "bench.md", True)
    device = device_of(args)
    res = model_benchmark(n, args.w, args.out, device=device, seed=args.seed, batch=args.batch,
                          minisd=args.minisd, lcm=args.lcm, evaluator=args.evaluator,
                          pixel_teacher=None if args.no_pixel else args.ddpm,
                          pixel_cm=None if args.no_pixel else args.cd, progress=not args.quiet)
    print(res["table"])
    print("wrote " + ", ".join(res["files"].values()))
    return 0
