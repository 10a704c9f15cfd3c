"""``minilcm sd-distill``: the command line of ``minilcm.sd.distill``.

    minilcm sd-distill TEACHER DATA OUT [--mode full|lora] [--steps N] [--batch-size B] ...
    accelerate launch --multi_gpu --num_processes 8 -m minilcm.cli sd-distill TEACHER DATA OUT ...    (8 GPUs)
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m minilcm.cli sd-distill ...    (2 CPU processes)

Every input is checked before any work (minilcm.sd.training.distill); a mistake is one short message on stderr and
exit code 2 (minilcm.cli.main). With several processes only the main one logs, checkpoints, exports and prints
the result line.

The options are not written here: each is a field of ``minilcm.sd.config.DistillConfig`` (flag, type, default,
choices and help in its metadata), and ``add_config_options`` / ``config_from_args`` read them from there.

``register(subparsers)`` adds the subcommand to the ``minilcm`` parser (minilcm/cli.py).
"""
from __future__ import annotations

import json
from dataclasses import Field, fields

from .config import DistillConfig, cli_option


def _cli_fields(cls=DistillConfig):
    """(field, option) for every field the CLI shows, in the dataclass's order; a field whose metadata names an
    options dataclass (``dataset``) stands for that dataclass's fields."""
    for f in fields(cls):
        if "options" in f.metadata:
            yield from _cli_fields(f.metadata["options"])
        elif (opt := cli_option(f)) is not None:
            yield f, opt


def add_config_options(p) -> None:
    """One argparse option per CLI field of DistillConfig (see ``minilcm.sd.config.option``)."""
    for f, opt in _cli_fields():
        if "switch" in opt:
            p.add_argument(opt["flag"], action="store_true", help=opt["help"])
            continue
        kind = opt["type"] or type(f.default)
        p.add_argument(opt["flag"], type=kind, default=f.default, choices=opt["choices"], help=opt["help"])


def _value(f: Field, opt: dict, args):
    v = getattr(args, opt["dest"])
    if "switch" in opt:
        return opt["switch"] if v else f.default
    return v


def config_from_args(args) -> dict:
    """The keyword arguments of ``minilcm.sd.distill`` for parsed ``args``."""
    kw = {}
    for f in fields(DistillConfig):
        sub = f.metadata.get("options")
        if sub is not None:
            kw[f.name] = {g.name: _value(g, opt, args) for g, opt in _cli_fields(sub)}
        elif (opt := cli_option(f)) is not None:
            kw[f.name] = _value(f, opt, args)
    return kw


def register(subparsers):
    p = subparsers.add_parser(
        "sd-distill", help="latent consistency distillation of a Stable Diffusion teacher (full LCM or LCM-LoRA)",
        description="Distil a diffusers StableDiffusionPipeline (folder or hub id) on image-caption data (an "
                    "ImageFolder-style folder with metadata.jsonl or .txt captions, or a `datasets` name) into an "
                    "LCM pipeline (--mode full) or LCM-LoRA weights (--mode lora). Rerun the same command to resume.")
    p.add_argument("teacher", help="StableDiffusionPipeline folder or hub id "
                                   "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)")
    p.add_argument("data", help="caption folder, or a Hugging Face `datasets` name")
    p.add_argument("out", help="output folder: checkpoint/, log.jsonl, and pipeline/ (full) or lora/ (lora)")
    add_config_options(p)
    p.set_defaults(fn=sd_distill)
    return p


def sd_distill(args) -> int:
    from . import training  # here, not at the top: `minilcm --help` builds this parser without torch

    r = training.distill(args.teacher, args.data, args.out, **config_from_args(args))  # looked up per call
    if not r.is_main:  # one result line per run, not one per process
        return 0
    tail = r.losses[-50:]
    print(json.dumps({"export": str(r.export), "step": r.step, "resumed_from": r.resumed_from,
                      "seconds": round(r.seconds, 2), "final_loss": sum(tail) / max(1, len(tail))}))
    return 0
