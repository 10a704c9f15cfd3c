"""Chapter 6: LCD and LCM-LoRA of a Stable Diffusion pipeline (minilcm.sd), on a tiny SD-shaped teacher, CPU only.

The teacher is ``tiny_sd_pipeline`` (UNet2DConditionModel, AutoencoderKL, CLIP text model, offline tokenizer),
the data a folder of a few generated PNGs with captions. Checked: two steps of each mode; export; reload with
diffusers; the exported LCM pipeline's 4-step sampling equals ``minilcm.lcm.lcm_sample``; the exported LoRA
reproduces the trained student; resume equals an uninterrupted run; the clear errors; the CLI; the benchmark.
"""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minilcm import sd
from minilcm.consistency import ConsistencyModel, LCMScalings
from minilcm.lcm import lcm_sample, lcm_timesteps
from minilcm.models.sd import tiny_sd_pipeline
from minilcm.train import TrainConfig, make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a photo of a cat", "a picture of a dog", "an image of a ship", "a small photo of the frog"]
FAST = dict(batch_size=2, lr=1e-3, device="cpu", progress=False, lora_rank=4, ckpt_every=1)


def write_images(folder: Path, n: int = 4, sidecars: bool = False) -> Path:
    """n coloured 40x40 PNGs with captions in metadata.jsonl (or .txt sidecars)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a = np.zeros((40, 40, 3), np.uint8)
        a[..., i % 3] = 60 * (i + 1)
        a[10 * (i % 3):10 * (i % 3) + 15, 5:30] = 255
        Image.fromarray(a).save(folder / f"img{i}.png")
        if sidecars:
            (folder / f"img{i}.txt").write_text(CAPTIONS[i % 4])
        rows.append({"file_name": f"img{i}.png", "text": CAPTIONS[i % 4]})
    if not sidecars:
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher")
    tiny_sd_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("captions"))


@pytest.fixture(scope="module")
def full_run(teacher, data, tmp_path_factory):
    return sd.distill(teacher, data, tmp_path_factory.mktemp("full"), mode="full", steps=2, **FAST)


@pytest.fixture(scope="module")
def lora_run(teacher, data, tmp_path_factory):
    return sd.distill(teacher, data, tmp_path_factory.mktemp("lora"), mode="lora", steps=2, **FAST)


# ---- data --------------------------------------------------------------------------------------------
def test_caption_folder_both_conventions(tmp_path):
    meta = sd.folder_pairs(write_images(tmp_path / "meta"))
    side = sd.folder_pairs(write_images(tmp_path / "side", sidecars=True))
    assert [c for _, c in meta] == [c for _, c in side] == CAPTIONS
    assert all(p.suffix == ".png" for p, _ in meta)


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(sd.DataError, match="does not exist"):
        sd.folder_pairs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sd.DataError, match="holds no images"):
        sd.folder_pairs(tmp_path / "empty")
    folder = write_images(tmp_path / "partial", sidecars=True)
    (folder / "img2.txt").unlink()
    with pytest.raises(sd.DataError, match="1 of 4 images .* have no caption .*img2.png"):
        sd.folder_pairs(folder)


def test_cache_round_trip_and_mismatch(teacher, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher)
    cache = tmp_path / "cache.safetensors"
    a = sd.load_or_encode(data, pipe, 32, cache)
    assert cache.exists() and a.latents.shape == (4, 4, 8, 8) and a.embeds.shape == (4, 16, 32)
    b = sd.load_or_encode(tmp_path / "not-read", pipe, 32, cache)  # read from the cache: the source is not used
    assert torch.equal(a.latents, b.latents) and torch.equal(a.embeds, b.embeds)
    with pytest.raises(sd.DataError, match="delete the cache"):
        sd.load_or_encode(data, pipe, 64, cache)


# ---- teacher checks ----------------------------------------------------------------------------------
def test_teacher_errors_are_clear(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    with pytest.raises(sd.TeacherError, match="does not exist"):
        sd.load_teacher(tmp_path / "no-such-teacher")
    with pytest.raises(sd.TeacherError, match="no model_index.json"):
        sd.load_teacher(tmp_path)

    class NoWInput(torch.nn.Module):  # a text-conditioned eps-net that cannot grow a w input
        config = {"cross_attention_dim": 32}

    with pytest.raises(sd.TeacherError, match="time_cond_proj_dim"):
        sd.check_teacher(NoWInput(), "full")
    no_attention = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2, mid_block_type=None, cross_attention_dim=32, norm_num_groups=8)
    sd.check_teacher(no_attention, "full")  # fine for the full mode
    with pytest.raises(sd.TeacherError, match="attention layers"):
        sd.check_teacher(no_attention, "lora")
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match="pip install peft"):
        sd.check_teacher(no_attention, "lora")


def test_8bit_adam_without_bitsandbytes_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        make_optimizer(TrainConfig(optimizer="adamw8bit"), [torch.nn.Parameter(torch.zeros(2))])


# ---- full LCM: distil, export, reload, sample --------------------------------------------------------
def test_full_mode_exports_an_lcm_pipeline(full_run, teacher):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    assert len(full_run.losses) == 2 and all(np.isfinite(full_run.losses))
    log = [json.loads(s) for s in (full_run.export.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["samples_per_s"] > 0 for r in log)
    pipe = DiffusionPipeline.from_pretrained(full_run.export)
    assert type(pipe).__name__ == "LatentConsistencyModelPipeline" and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.config.time_cond_proj_dim == 256
    assert pipe.unet.time_embedding.cond_proj.weight.abs().sum() > 0  # the w input was trained (it starts at 0)
    img = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=8.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    # StableDiffusionPipeline with an LCMScheduler loads the same folder
    sdp = StableDiffusionPipeline.from_pretrained(full_run.export, safety_checker=None, requires_safety_checker=False)
    assert isinstance(sdp.scheduler, LCMScheduler) and sdp.unet.config.time_cond_proj_dim == 256


def test_exported_pipeline_samples_as_minilcm_lcm_sample(full_run):
    """The diffusers pipeline at 4 steps = minilcm.lcm.lcm_sample on the same noise, prompt and w."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(full_run.export)
    w = 7.0
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=w + 1, latents=x_T.clone(),
               output_type="latent", generator=torch.Generator().manual_seed(4)).images
    emb = sd.data.text_states(pipe, ["a photo of a cat"])
    schedule = sd.schedule_of(pipe.scheduler)
    mine = lcm_sample(ConsistencyModel(pipe.unet, schedule, LCMScalings()), x_T, schedule,
                      lcm_timesteps(schedule, 4), cond={"encoder_hidden_states": emb}, w=w,
                      generator=torch.Generator().manual_seed(4)).x
    assert torch.allclose(ref, mine, atol=1e-4), (ref - mine).abs().max()


# ---- LCM-LoRA ----------------------------------------------------------------------------------------
def test_lora_mode_trains_adapters_only_and_exports_them(lora_run, teacher):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    net = lora_run.student.net
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_run.losses) == 2 and all(np.isfinite(lora_run.losses))
    pipe = sd.load_lcm_lora_pipeline(teacher, lora_run.export)
    base = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    assert isinstance(pipe.scheduler, LCMScheduler)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999.0, 259.0])
    c = torch.randn(2, 16, 32)
    with torch.no_grad():
        loaded, trained, plain = (m(x, t, encoder_hidden_states=c).sample for m in (pipe.unet, net.eval(), base.unet))
    assert torch.allclose(loaded, trained, atol=1e-5), (loaded - trained).abs().max()  # the LoRA round-trips
    assert (loaded - plain).abs().max() > 1e-4  # and it changed the teacher
    img = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=1.0, output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_lora_parameter_count_matches_peft(teacher):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    expected = sd.lora_parameter_count(unet, rank=4)
    assert sd.add_lora(unet, rank=4) == expected > 0


# ---- resume ------------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(teacher, data, tmp_path):
    kw = dict(mode="full", **FAST, cache=str(tmp_path / "cache.safetensors"))
    whole = sd.distill(teacher, data, tmp_path / "a", steps=3, **kw)
    sd.distill(teacher, data, tmp_path / "b", steps=1, **kw)  # "interrupted" after one step
    resumed = sd.distill(teacher, data, tmp_path / "b", steps=3, **kw)
    assert resumed.resumed_from == 1 and resumed.step == 3
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    for p, q in zip(whole.student.parameters(), resumed.student.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_accelerator_path_runs(teacher, data, tmp_path):
    from accelerate import Accelerator

    r = sd.distill(teacher, data, tmp_path, mode="lora", steps=1, accelerator=Accelerator(cpu=True), **FAST)
    assert len(r.losses) == 1 and (r.export / "pytorch_lora_weights.safetensors").exists()


def test_train_options_fp16_scaler_and_no_ema(tmp_path):
    """train()'s additions used by sd-distill: fp16 autocast with a GradScaler, keep_ema=False, the JSONL log."""
    net = torch.nn.Linear(3, 1)
    loss = lambda m, b, g: ((m(b) - 1) ** 2).mean()  # noqa: E731
    data = lambda n, g: torch.randn(n, 3, generator=g)  # noqa: E731
    cfg = TrainConfig(steps=3, batch_size=4, amp_cpu=True, amp_dtype="fp16", keep_ema=False, progress=False,
                      device="cpu", ckpt_dir=str(tmp_path / "ck"), log_file=str(tmp_path / "log.jsonl"))
    r = train(net, loss, data, cfg)
    assert r.ema is net and len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert "scaler" in meta


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_parses_and_runs(teacher, data, tmp_path, capsys):
    from minilcm.sd.cli import config_from_args, register

    parser = argparse.ArgumentParser(prog="minilcm")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["sd-distill", str(teacher), str(data), str(tmp_path), "--mode", "lora", "--steps", "1",
                              "--batch-size", "2", "--lora-rank", "4", "--device", "cpu", "--no-progress",
                              "--use-8bit-adam", "--gradient-checkpointing", "--precision", "fp16"])
    kw = config_from_args(args)
    assert kw["optimizer"] == "adamw8bit" and kw["gradient_checkpointing"] and kw["precision"] == "fp16"
    assert kw["mode"] == "lora" and kw["batch_size"] == 2 and kw["progress"] is False
    args = parser.parse_args(["sd-distill", str(teacher), str(data), str(tmp_path), "--mode", "lora", "--steps", "1",
                              "--batch-size", "2", "--lora-rank", "4", "--device", "cpu", "--no-progress",
                              "--gradient-checkpointing"])
    assert args.fn(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 1 and Path(out["export"]).name == "lora"


# ---- the benchmark -----------------------------------------------------------------------------------
def test_benchmark_tiny_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("lcd_throughput", ROOT / "benchmarks" / "lcd_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    res = bench.main(["--tiny", "--steps", "2", "--warmup", "1", "--out", str(out)])
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"reference", "ours"}
    assert all("error" not in r and r["samples_per_s"] > 0 and r["finite"] for r in rows.values()), rows
    assert json.loads(out.read_text())["tiny"] is True and "| ours |" in res["table"]
