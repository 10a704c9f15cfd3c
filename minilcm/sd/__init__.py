"""Chapter 6: latent consistency distillation of a real Stable Diffusion teacher (full LCM or LCM-LoRA).

    from minilcm.sd import distill
    distill("path/to/sd-v1-5", "path/to/captioned_images", "runs/lcm", mode="full", steps=1000)

``python -m minilcm.cli sd-distill ...`` (or ``accelerate launch -m minilcm.cli sd-distill ...``) is the same call.

The submodules, in the order a run uses them (no submodule is named after a function exported here):

    config     DistillConfig: every setting (and the CLI's flags and help), validate()
    data       caption folders / `datasets`, and the cache of latents and text states
    teacher    load_teacher, check_teacher, schedule_of
    student    build (the student and the LCD loss), add_lora, lora_parameter_count
    resume     OUT and its checkpoint: resuming, and cleaning up after a failure
    training   distill(): the whole run
    export     the LCM pipeline / LoRA folders diffusers loads
    cli        ``minilcm sd-distill``
"""
from importlib import import_module

# every public name, and the submodule that holds it; loaded on first use, so that `minilcm --help` (which registers
# the sd-distill parser from .cli and .config) imports no torch
_WHERE = {"DistillConfig": "config", "DataError": "data", "LatentCaptions": "data", "caption_pairs": "data",
          "encode_pairs": "data", "folder_pairs": "data", "load_or_encode": "data", "text_states": "data",
          "export_lora": "export", "export_pipeline": "export", "lcm_scheduler": "export",
          "load_lcm_lora_pipeline": "export", "add_lora": "student", "build": "student",
          "lora_parameter_count": "student", "TeacherError": "teacher", "check_teacher": "teacher",
          "load_teacher": "teacher", "schedule_of": "teacher", "DistillResult": "training", "distill": "training"}


_SUBMODULES = ("config", "data", "teacher", "student", "resume", "training", "export", "cli")


def __getattr__(name):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'minilcm.sd' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_WHERE, *_SUBMODULES])


__all__ = ["DataError", "DistillConfig", "DistillResult", "LatentCaptions", "TeacherError", "add_lora", "build",
           "caption_pairs", "check_teacher", "distill", "encode_pairs", "export_lora", "export_pipeline",
           "folder_pairs", "lcm_scheduler", "load_lcm_lora_pipeline", "load_or_encode", "load_teacher",
           "lora_parameter_count", "schedule_of"]
