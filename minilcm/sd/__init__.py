"""Chapter 6: latent consistency distillation of a real Stable Diffusion teacher (full LCM or LCM-LoRA).

    from minilcm.sd import distill
    distill("path/to/sd-v1-5", "path/to/captioned_images", "runs/lcm", mode="full", steps=1000)

``python -m minilcm.cli sd-distill ...`` (or ``accelerate launch -m minilcm.cli sd-distill ...``) is the same call.
"""
from .data import DataError, LatentCaptions, caption_pairs, encode_pairs, folder_pairs, load_or_encode
from .distill import (DistillConfig, DistillResult, TeacherError, add_lora, build, check_teacher, distill,
                      load_teacher, lora_parameter_count, schedule_of)
from .export import export_lora, export_pipeline, lcm_scheduler, load_lcm_lora_pipeline
