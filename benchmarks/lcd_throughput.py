"""LCD training throughput and peak GPU memory on an SD-v1.5-shaped UNet: minilcm against the reference script.

    python benchmarks/lcd_throughput.py                  # GPU: SD v1.5 shapes, batch 16, bf16 -> benchmarks/results/
    python benchmarks/lcd_throughput.py --tiny           # CPU smoke test: tiny shapes, fp32, writes runs/bench/

Setup (one run, same process, variants one after the other): random-init networks of SD v1.5's shapes
(minilcm.models.sd.sd15_shaped: a UNet2DConditionModel with block_out_channels 320/640/1280/1280,
cross_attention_dim 768, 860M parameters), 64x64x4 latents (512 px images), 77x768 text states, batch 16,
bf16 autocast, AdamW, grad-clip 1, EMA target (mu 0.95), l2 loss.

ours       ``minilcm.train.train`` + ``minilcm.lcm.LatentConsistencyDistillation`` on cached latents and text states:
           teacher cond/uncond in ONE fused call, teacher weights in bf16, no VAE or text encoder per step,
           no extra EMA copy (``keep_ema=False``); channels_last, and torch.compile with --compile.
reference  a restatement of the per-step computation of diffusers'
           examples/consistency_distillation/train_lcm_distill_sd_wds.py (written here, not copied): tokenise +
           CLIP text encoder and VAE encode of 512 px images every step, teacher fp32 weights under autocast with
           separate cond and uncond calls, its DDIMSolver / boundary scalings, target under autocast.

Throughput = samples/s over the timed steps (after --warmup steps); memory = torch.cuda.max_memory_allocated over
the whole variant (models, optimizer, data, steps). Writes a JSON and prints a markdown table with the GPU model.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minilcm.consistency import l2  # noqa: E402
from minilcm.guidance import TextConditioning  # noqa: E402
from minilcm.lcm import LatentConsistencyDistillation, lcm_student  # noqa: E402
from minilcm.models.sd import build_tokenizer, minisd_unet, minisd_vae, sd15_shaped, tiny_text_encoder  # noqa: E402
from minilcm.schedules import Schedule  # noqa: E402
from minilcm.sd.data import LatentCaptions  # noqa: E402
from minilcm.train import TrainConfig, train  # noqa: E402

K, W_MIN, W_MAX, MU, W_DIM, LR = 20, 5.0, 15.0, 0.95, 256, 1e-6  # the reference script's defaults (w-dim 256)


# ---- the models (random init) ------------------------------------------------------------------------
def build_parts(tiny: bool, seed: int = 0):
    """UNet config, VAE, text encoder, tokenizer and shapes: SD v1.5's, or tiny ones for a CPU smoke test."""
    torch.manual_seed(seed)
    if tiny:
        tok = build_tokenizer(max_length=16)
        unet = minisd_unet("tiny", cross_attention_dim=32, sample_size=8)
        vae, te, res = minisd_vae("tiny"), tiny_text_encoder(tok, hidden=32), 32
    else:
        tok = build_tokenizer(max_length=77)  # offline; SD's vocabulary is larger, the 77x768 states are the same
        parts = sd15_shaped("cpu", tokenizer=tok)  # SD v1.5's shapes (860M-parameter UNet), random weights
        unet, vae, te, res = parts["unet"], parts["vae"], parts["text_encoder"], 512
    return unet, vae, te.eval(), tok, res


CAPTIONS = ["a photo of a cat", "a picture of a dog", "an image of a ship", "a small photo of the frog"]


# ---- (i) ours ----------------------------------------------------------------------------------------
def run_ours(args, device, compile_: bool = False) -> dict:
    unet, vae, te, tok, res = build_parts(args.tiny)
    z_side, L = unet.config.sample_size, tok.model_max_length
    schedule = Schedule("scaled_linear")
    student = lcm_student(unet, schedule, W_DIM)
    half = torch.bfloat16 if device.type == "cuda" else None
    teacher = unet.to(device, half) if half else unet.to(device)
    n = 4 * args.batch  # cached data: latents + text states, already on the device
    gen = torch.Generator().manual_seed(1)
    data = LatentCaptions(torch.randn(n, 4, z_side, z_side, generator=gen).to(device),
                          torch.randn(n, L, te.config.hidden_size, generator=gen).to(device),
                          torch.randn(L, te.config.hidden_size, generator=gen))
    del vae, te
    loss = LatentConsistencyDistillation(teacher, student, TextConditioning(data.empty), k=K, w_min=W_MIN,
                                         w_max=W_MAX, mu=MU, distance=l2)
    if device.type == "cuda":
        for m in (student.net, teacher, loss.target.net):
            m.to(memory_format=torch.channels_last)
    if compile_:
        for m in (student.net, teacher, loss.target.net):
            m.compile()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        cfg = TrainConfig(steps=args.warmup + args.steps, batch_size=args.batch, lr=LR, weight_decay=1e-2,
                          grad_clip=1.0, device=str(device), amp=True, amp_dtype="bf16", keep_ema=False,
                          log_file=str(log), progress=False)
        train(student, loss, data, cfg)
        rows = [json.loads(line) for line in log.read_text().splitlines()]
    secs = sum(r["seconds"] for r in rows[args.warmup:])
    return {"seconds": secs, "losses": [r["loss"] for r in rows]}


# ---- (ii) the reference script's per-step computation, restated -------------------------------------
def extract(a, t, ndim):
    return a.gather(-1, t).reshape(-1, *([1] * (ndim - 1)))


def scalings_for_boundary_conditions(t, sigma_data=0.5, timestep_scaling=10.0):
    """LCMScheduler's discrete boundary scalings (the script's function of the same name)."""
    s = timestep_scaling * t
    return sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s / (s ** 2 + sigma_data ** 2) ** 0.5


def guidance_scale_embedding(w, dim):
    half = dim // 2
    f = torch.exp(torch.arange(half, dtype=torch.float32) * -(np.log(10000.0) / (half - 1)))
    e = (w * 1000.0)[:, None] * f[None]
    return torch.cat([e.sin(), e.cos()], dim=1)


class DDIMSolver:
    """The script's solver: the grid t = k-1, 2k-1, ..., T-1; x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps."""

    def __init__(self, alphas_cumprod: np.ndarray, T=1000, n=50, device="cpu"):
        ratio = T // n
        self.ddim_timesteps = torch.from_numpy((np.arange(1, n + 1) * ratio).round().astype(np.int64) - 1).to(device)
        prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[self.ddim_timesteps.cpu().numpy()[:-1]].tolist())
        self.ab_prev = torch.from_numpy(prev).to(device)

    def ddim_step(self, x0, eps, index):
        ab = extract(self.ab_prev, index, x0.ndim)
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps


def run_reference(args, device) -> dict:
    from diffusers import UNet2DConditionModel

    teacher, vae, te, tok, res = build_parts(args.tiny)
    cuda = device.type == "cuda"
    wdt = torch.bfloat16 if cuda else torch.float32  # accelerate's mixed_precision="bf16"
    unet = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=W_DIM)
    unet.load_state_dict(teacher.state_dict(), strict=False)
    target = UNet2DConditionModel.from_config(unet.config)
    target.load_state_dict(unet.state_dict())
    for m in (teacher, vae, te, target):
        m.requires_grad_(False)
    unet.train(), target.train()
    vae.to(device)                      # fp32; the loop casts it to the weight dtype on its first step
    te.to(device, wdt)
    target.to(device)
    teacher.to(device)                  # cast_teacher_unet is off by default: fp32 weights under autocast
    unet.to(device)
    ab = Schedule("scaled_linear").alphas_cumprod
    alpha, sigma = ab.sqrt().to(device), (1 - ab).sqrt().to(device)
    solver = DDIMSolver(ab.numpy(), 1000, 1000 // K, device)
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    n = 4 * args.batch
    gen = torch.Generator().manual_seed(1)
    images = (torch.rand(n, 3, res, res, generator=gen) * 2 - 1).to(device)  # the "dataloader" output
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    B = args.batch
    with torch.no_grad():
        uncond = te(tok([""] * B, return_tensors="pt", padding="max_length",
                        max_length=tok.model_max_length).input_ids.to(device))[0]
    student_ac = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)  # accelerate wraps unet.forward

    def step(i):
        idx = torch.randint(0, n, (B,), generator=gen)
        # 1. images and captions -> latents and text states, every step
        with torch.no_grad():
            ids = tok([prompts[j] for j in idx], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            prompt_embeds = te(ids.to(device))[0]
            if vae.dtype != wdt:
                vae.to(dtype=wdt)
            latents = vae.encode(images[idx.to(device)].to(wdt)).latent_dist.sample()
            latents = (latents * vae.config.scaling_factor).to(wdt)
        # 2-5. t_{n+k}, t_n, scalings, noise, w
        index = torch.randint(0, 1000 // K, (B,), device=device).long()
        start = solver.ddim_timesteps[index]
        t = torch.where(start - K < 0, torch.zeros_like(start), start - K)
        c_skip_s, c_out_s = [x.reshape(-1, 1, 1, 1) for x in scalings_for_boundary_conditions(start)]
        c_skip, c_out = [x.reshape(-1, 1, 1, 1) for x in scalings_for_boundary_conditions(t)]
        noise = torch.randn_like(latents)
        # DDPMScheduler.add_noise (in the latents' dtype)
        x_nk = (extract(alpha, start, 4) * latents + extract(sigma, start, 4) * noise).to(latents.dtype)
        w = (W_MAX - W_MIN) * torch.rand((B,)) + W_MIN
        w_emb = guidance_scale_embedding(w, W_DIM).to(device, latents.dtype)
        w = w.reshape(B, 1, 1, 1).to(device, latents.dtype)
        # 7. online prediction
        with student_ac:
            eps = unet(x_nk, start, timestep_cond=w_emb, encoder_hidden_states=prompt_embeds.float()).sample
        x0 = (x_nk - extract(sigma, start, 4) * eps) / extract(alpha, start, 4)
        model_pred = c_skip_s * x_nk + c_out_s * x0
        # 8. teacher: separate cond and uncond calls, CFG on x0 and eps, one DDIM step
        with torch.no_grad(), torch.autocast(device.type, enabled=cuda):
            eps_c = teacher(x_nk.to(wdt), start, encoder_hidden_states=prompt_embeds.to(wdt)).sample
            eps_u = teacher(x_nk.to(wdt), start, encoder_hidden_states=uncond.to(wdt)).sample
            a, s = extract(alpha, start, 4), extract(sigma, start, 4)
            x0_c, x0_u = (x_nk - s * eps_c) / a, (x_nk - s * eps_u) / a
            pred_x0 = x0_c + w * (x0_c - x0_u)
            pred_eps = eps_c + w * (eps_c - eps_u)
            x_prev = solver.ddim_step(pred_x0, pred_eps, index)
        # 9. target prediction
        with torch.no_grad():
            with torch.autocast(device.type, dtype=wdt, enabled=cuda):
                eps_t = target(x_prev.float(), t, timestep_cond=w_emb,
                               encoder_hidden_states=prompt_embeds.float()).sample
            x0_t = (x_prev - extract(sigma, t, 4) * eps_t) / extract(alpha, t, 4)
            tgt = c_skip * x_prev + c_out * x0_t
        # 10-12. l2 loss, backward, clip, step, EMA target
        loss = F.mse_loss(model_pred.float(), tgt.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p_t, p in zip(target.parameters(), unet.parameters()):
                p_t.mul_(MU).add_(p, alpha=1 - MU)
        return loss.item()

    losses = [step(i) for i in range(args.warmup)]
    sync(device)
    t0 = time.perf_counter()
    losses += [step(i) for i in range(args.steps)]
    sync(device)
    return {"seconds": time.perf_counter() - t0, "losses": losses}


# ---- driver ------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, fn, args, device) -> dict:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        r = fn(args, device)
    except torch.cuda.OutOfMemoryError as e:  # record it and go on with the other variants
        return {"variant": name, "error": f"out of memory: {e}"[:300]}
    except Exception as e:  # noqa: BLE001 - a benchmark must report, not crash half-way
        return {"variant": name, "error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        gc.collect()
    row = {"variant": name, "samples_per_s": args.batch * args.steps / r["seconds"],
           "step_ms": 1000 * r["seconds"] / args.steps, "final_loss": r["losses"][-1],
           "finite": bool(np.isfinite(r["losses"]).all())}
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2 ** 30
        torch.cuda.empty_cache()
    return row


def markdown(result: dict) -> str:
    rows = result["rows"]
    ref = next((r for r in rows if r["variant"] == "reference" and "error" not in r), None)
    lines = [f"LCD training step ({result['shapes']}), batch {result['batch']}, {result['dtype']}, "
             f"{result['device_name']}, torch {result['torch']}", "",
             "| variant | samples/s | ms/step | peak GPU memory (GiB) | speed vs reference | memory vs reference |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error'][:60]} | | | | |")
            continue
        mem = r.get("peak_mem_gib")
        sp = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref else "-"
        mr = f"{mem / ref['peak_mem_gib']:.2f}x" if ref and mem is not None and ref.get("peak_mem_gib") else "-"
        lines.append(f"| {r['variant']} | {r['samples_per_s']:.2f} | {r['step_ms']:.0f} | "
                     f"{'-' if mem is None else f'{mem:.1f}'} | {sp} | {mr} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke test, not a measurement)")
    p.add_argument("--batch", type=int, default=None, help="default 16 (2 with --tiny)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also run ours with torch.compile")
    p.add_argument("--variants", default="reference,ours", help="comma-separated: reference, ours, ours_compile")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/lcd_throughput.json; "
                                               "runs/bench/lcd_throughput_tiny.json with --tiny)")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 16)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    if not args.tiny and device.type != "cuda":
        print("warning: SD-v1.5 shapes on a CPU take minutes per step; use --tiny for a smoke test", file=sys.stderr)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    fns = {"reference": run_reference, "ours": run_ours,
           "ours_compile": lambda a, d: run_ours(a, d, compile_=True)}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile and "ours_compile" not in names:
        names.append("ours_compile")
    unknown = [v for v in names if v not in fns]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(fns)}")
    import diffusers

    result = {"tiny": args.tiny, "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or "cpu", "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
              "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
              "shapes": "tiny" if args.tiny else "SD v1.5: latents 4x64x64, text 77x768, UNet 860M",
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    out = Path(args.out) if args.out else ROOT / ("runs/bench/lcd_throughput_tiny.json" if args.tiny
                                                  else "benchmarks/results/lcd_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result["rows"].append(measure(name, fns[name], args, device))
        out.write_text(json.dumps(result, indent=1))  # after every variant: a crash keeps what was measured
    table = markdown(result)
    result["table"] = table
    out.write_text(json.dumps(result, indent=1))
    print(table)
    print(f"\nwritten to {out}")
    return result


if __name__ == "__main__":
    main()
