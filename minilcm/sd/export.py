"""Export a distilled student in the formats diffusers loads.

    export_pipeline(pipe, unet, folder)   a LatentConsistencyModelPipeline folder: the student UNet (with its
                                          w input, time_cond_proj_dim) + the teacher's VAE, text encoder and
                                          tokenizer + an LCMScheduler. DiffusionPipeline.from_pretrained(folder)
                                          loads it; so does StableDiffusionPipeline (it embeds guidance_scale - 1
                                          as timestep_cond for such a UNet).
    export_lora(unet, folder)             pytorch_lora_weights.safetensors: pipe.load_lora_weights(folder) on the
                                          teacher pipeline, then an LCMScheduler and guidance_scale ~ 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def lcm_scheduler(teacher_scheduler, k: int = 20):
    """LCMScheduler on the teacher's noise schedule, its skipping grid that of the distillation (T // k steps)."""
    from diffusers import LCMScheduler

    T = teacher_scheduler.config.num_train_timesteps
    return LCMScheduler.from_config(teacher_scheduler.config, original_inference_steps=T // k)


def export_pipeline(pipe, unet, folder, meta: dict | None = None, dtype=None):
    """Save the student ``unet`` with the teacher's other parts as a LatentConsistencyModelPipeline."""
    import copy

    from diffusers import LatentConsistencyModelPipeline

    if unet.config.get("time_cond_proj_dim") is None:
        raise ValueError("the student UNet has no w input (time_cond_proj_dim): export LoRA students with export_lora")
    unet = copy.deepcopy(unet).to("cpu")
    unet.to(memory_format=torch.contiguous_format)
    if dtype is not None and unet.dtype != dtype:
        unet = unet.to(dtype)
    lcm = LatentConsistencyModelPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=unet, scheduler=lcm_scheduler(pipe.scheduler, (meta or {}).get("k", 20)),
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = Path(folder)
    lcm.save_pretrained(str(folder))
    (folder / "minilcm.json").write_text(json.dumps(meta or {}, indent=1, default=str))
    return folder


def export_lora(unet, folder, meta: dict | None = None):
    """Save the peft LoRA adapters of ``unet`` in diffusers' format (``pipe.load_lora_weights(folder)``)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # peft's key names (lora_A / lora_B), which load_lora_weights reads as they are
    layers = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    (folder / "minilcm.json").write_text(json.dumps(meta or {}, indent=1, default=str))
    return folder


def load_lcm_lora_pipeline(teacher_folder, lora_folder, k: int = 20):
    """The teacher pipeline with the LoRA loaded and an LCMScheduler: sample with ~4 steps, guidance_scale 1."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_folder), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_folder))
    pipe.scheduler = lcm_scheduler(pipe.scheduler, k)
    return pipe
