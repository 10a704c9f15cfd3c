"""The ``minilcm`` command line.

    minilcm demo [--out runs/demo] [--steps 3000]      the newcomer's first run (under a minute on a CPU)
    minilcm sample --model NAME_OR_PATH --sampler S --steps N --n N --out FILE.npz [...]   images from a checkpoint
    minilcm bench [--n N] [--w W] [--out runs/bench]   every sampler at every NFE on the shipped models, one table
    minilcm train {evaluator,autoencoder,minisd,lcm,ddpm,cd}   one stage of the shipped checkpoints (minilcm.stages)
    minilcm sd-distill TEACHER DATA OUT [--mode full|lora ...]   LCD / LCM-LoRA of a Stable Diffusion (Chapter 6)
"""
from __future__ import annotations

import argparse
import os
import sys

from .catalog import SAMPLER_NAMES, SAMPLING_MODELS, STAGE_NAMES
from .errors import TrainingInterrupted, UserError, debug, short
from .sd.cli import register as register_sd_distill


USER_ERRORS = (UserError, ValueError, OSError, ImportError)


def _main_rank() -> bool:
    """False on the non-main processes of a multi-process launch (accelerate launch, torchrun set RANK)."""
    return os.environ.get("RANK", "0") in ("", "0")


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: one line naming the problem and where the help is (exit code 2), instead of
    the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: ``minilcm {demo,train,sample,bench,sd-distill}`` (torch-free: names from catalog)."""
    p = _Parser(prog="minilcm", description="minilcm: from DDPM to latent consistency models. "
                                "A user error prints one short message and exits with code 2; --debug (or "
                                "MINILCM_DEBUG=1) shows the traceback.")
    p.add_argument("--debug", action="store_true", help="show tracebacks (same as MINILCM_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for add in (_add_demo, _add_train, _add_sample, _add_bench, register_sd_distill):  # sd-distill: Chapter 6
        add(sub)
    return p


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="train and sample a 2-D DDPM in under a minute, write a figure")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=3000)
    d.add_argument("--n", type=int, default=2000, help="number of samples")
    d.set_defaults(fn="demo")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train one stage of the shipped checkpoints (see minilcm.stages)")
    t.add_argument("stage", choices=STAGE_NAMES)
    t.add_argument("--out", default=None, help="export folder (default: runs/<name>; the shipped checkpoints in "
                   "data/checkpoints are never replaced unless --replace-shipped is given)")
    t.add_argument("--replace-shipped", action="store_true", help="allow the export to replace a shipped "
                   "checkpoint under data/checkpoints (with --out pointing there, or to make the stage's default "
                   "the shipped folder)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available; the default)")
    t.add_argument("--teacher", default=None, help="lcm / cd stage: the teacher folder to distil (default: the shipped mini-SD / ddpm-cifar10)")
    t.add_argument("--init", default=None, help="autoencoder: start from this vae (or mini-SD pipeline) folder, "
                   "skip phase 1 and fine-tune its decoder; minisd: warm-start the UNet from this pipeline folder")
    t.add_argument("--steps", type=int, default=None, metavar="N", help="training steps (default: the profile's)")
    t.add_argument("--batch", type=int, default=None, metavar="B", help="batch size (default: the profile's)")
    t.add_argument("--minutes", type=float, default=None, metavar="M",
                   help="train for M minutes of wall clock: the first steps are timed, then the step count and the "
                   "learning-rate schedule are fitted to the budget (instead of --steps); export and measurement "
                   "come after it and are reported separately")
    t.set_defaults(fn="train_stage")


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="sample images from a checkpoint into FILE.npz (+ FILE.png)",
                       description="Sample images from a shipped checkpoint or a folder (see minilcm.generate). "
                       "--guidance is w in the LCM convention, eps_w = (1 + w) eps_cond - w eps_uncond: diffusers' "
                       "guidance_scale = w + 1. Without --class or --prompt a conditional model samples the ten "
                       "classes evenly.")
    s.add_argument("--model", required=True, metavar="NAME_OR_PATH", help=f"shipped name ({', '.join(SAMPLING_MODELS)}) or a folder path")
    s.add_argument("--sampler", required=True, choices=SAMPLER_NAMES)
    s.add_argument("--steps", type=int, required=True, metavar="N", help="network evaluations (NFE) per sample")
    s.add_argument("--guidance", type=float, default=1.0, metavar="W",
                   help="CFG weight w, LCM convention (diffusers guidance_scale = w + 1); default 1.0")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_", default=None, metavar="INDEX_OR_NAME", help="CIFAR-10 class index (0-9) or name")
    which.add_argument("--prompt", default=None, metavar="TEXT", help="text prompt (the text-conditioned mini-SD and LCM student)")
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0, metavar="S")
    s.add_argument("--batch", type=int, default=250, metavar="B", help="images per batch (default 250)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (the default): cuda when available, else cpu")
    s.add_argument("--out", required=True, metavar="FILE.npz", help="FILE.npz (the PNG grid is written beside it as FILE.png)")
    s.add_argument("--force", action="store_true", help="overwrite FILE.npz / FILE.png if they exist")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn="sample")


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="every sampler at every NFE on the shipped models: table, JSON, plot",
                       description="Run the mini-SD teacher (DDIM, DPM-Solver++ at 4/8/25 steps, DDPM at 25) and the "
                       "LCM student (1/2/4 steps), plus the pixel DDPM/CD models when shipped, on the same seeds; "
                       "measure FD-clf, class accuracy, NFE and time per image; check the LCM headline.")
    b.add_argument("--n", type=int, default=None, help="images per row (default by profile: fast 20, cpu 1000, "
                   "gpu 10000)")
    b.add_argument("--w", type=float, default=1.0, help="guidance, LCM convention (guidance_scale = w + 1)")
    b.add_argument("--out", default="runs/bench", help="folder for bench.md, bench.json, bench.png")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (the default): cuda when available, else cpu")
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
    b.set_defaults(fn="bench")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .profiles import current  # imported here, not at the top: it imports torch, which --help never needs

        current()  # a mistyped MINILCM_PROFILE fails here, before any work
        if isinstance(args.fn, str):
            from . import commands  # the commands import torch and the package: only once a command runs

            return getattr(commands, args.fn)(args)
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
