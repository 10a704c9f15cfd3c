"""``minilcm sd-distill``: the command line of ``minilcm.sd.distill``.

    minilcm sd-distill TEACHER DATA OUT [--mode full|lora] [--steps N] [--batch-size B] ...
    accelerate launch --multi_gpu --num_processes 8 -m minilcm.cli sd-distill TEACHER DATA OUT ...    (8 GPUs)
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 -m minilcm.cli sd-distill ...    (2 CPU processes)

Every input is checked before any work (minilcm.sd.distill.distill); a mistake is one short message on stderr and
exit code 2 (minilcm.cli.main). With several processes only the main one logs, checkpoints, exports and prints
the result line.

``register(subparsers)`` adds the subcommand to the ``minilcm`` parser (minilcm/cli.py).
"""
from __future__ import annotations

import json


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
    p.add_argument("--mode", choices=["full", "lora"], default="full")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--lr", type=float, default=None, help="default 1e-6 (full), 1e-4 (lora)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--k", type=int, default=20, help="skipping step (T/k DDIM steps for the teacher's solver)")
    p.add_argument("--w-min", type=float, default=5.0, help="full: w ~ U[w_min, w_max] (guidance_scale = w + 1)")
    p.add_argument("--w-max", type=float, default=15.0)
    p.add_argument("--w", type=float, default=7.0, help="lora: the fixed w")
    p.add_argument("--w-dim", type=int, default=256, help="full: size of the w-embedding (time_cond_proj_dim)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--distance", choices=["huber", "l2"], default="huber")
    p.add_argument("--precision", choices=["bf16", "fp16", "no"], default="bf16", help="autocast on CUDA")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes' AdamW8bit")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--resolution", type=int, default=None, help="default: the UNet's sample size x the VAE factor")
    p.add_argument("--cache", default=None, help="a .safetensors file of precomputed latents + text states")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available (under accelerate: its device)")
    p.add_argument("--split", default="train", help="`datasets` only")
    p.add_argument("--image-column", default="image", help="`datasets` only")
    p.add_argument("--caption-column", default=None, help="`datasets` only (default: text/caption/prompt)")
    p.add_argument("--max-samples", type=int, default=None, help="`datasets` only")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=sd_distill)
    return p


def config_from_args(args) -> dict:
    """The keyword arguments of ``minilcm.sd.distill`` for parsed ``args``."""
    return dict(mode=args.mode, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                warmup_steps=args.warmup_steps, k=args.k, w_min=args.w_min, w_max=args.w_max, w=args.w,
                w_dim=args.w_dim, lora_rank=args.lora_rank, distance=args.distance, precision=args.precision,
                gradient_checkpointing=args.gradient_checkpointing,
                optimizer="adamw8bit" if args.use_8bit_adam else "adamw", channels_last=args.channels_last,
                resolution=args.resolution, cache=args.cache, ckpt_every=args.ckpt_every, seed=args.seed,
                device=args.device, progress=not args.no_progress,
                dataset=dict(split=args.split, image_column=args.image_column, caption_column=args.caption_column,
                             max_samples=args.max_samples))


def sd_distill(args) -> int:
    from .distill import distill

    r = distill(args.teacher, args.data, args.out, **config_from_args(args))
    if not r.is_main:  # one result line per run, not one per process
        return 0
    tail = r.losses[-50:]
    print(json.dumps({"export": str(r.export), "step": r.step, "resumed_from": r.resumed_from,
                      "seconds": round(r.seconds, 2), "final_loss": sum(tail) / max(1, len(tail))}))
    return 0
