"""Chapter 6: LCD and LCM-LoRA of a Stable Diffusion pipeline (minilcm.sd), on a tiny SD-shaped teacher, CPU only.

The teacher is ``tiny_sd_pipeline`` (UNet2DConditionModel, AutoencoderKL, CLIP text model, offline tokenizer),
the data a folder of a few generated PNGs with captions. Checked: two steps of each mode; export; reload with
diffusers; the exported LCM pipeline's 4-step sampling equals ``minilcm.lcm.lcm_sample``; the exported LoRA
reproduces the trained student; resume equals an uninterrupted run; the clear errors (every mistake in
``minilcm sd-distill`` is one short message, exit code 2, nothing left behind); the CLI; the benchmark.
The multi-process run is tests/test_sd_multiprocess.py.
"""
import argparse
import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import record_message
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


def test_cli_prints_the_result_on_the_main_process_only(monkeypatch, capsys):
    from minilcm.sd import cli as sd_cli
    from minilcm.sd.training import DistillResult

    distill_module = sys.modules["minilcm.sd.training"]
    for main in (False, True):
        r = DistillResult(Path("out/lora"), [0.5], 1, 0.1, 0, torch.nn.Identity(), is_main=main)
        monkeypatch.setattr(distill_module, "distill", lambda *a, _r=r, **k: _r)
        args = argparse.Namespace(**{a: None for a in ("teacher", "data", "out", "lr", "resolution", "cache", "device",
                                                      "caption_column", "max_samples")})
        for a, v in dict(mode="lora", steps=1, batch_size=2, warmup_steps=0, k=20, w_min=5.0, w_max=15.0, w=7.0,
                         w_dim=256, lora_rank=4, distance="huber", precision="bf16", gradient_checkpointing=False,
                         use_8bit_adam=False, channels_last=False, ckpt_every=1, seed=0, no_progress=True,
                         split="train", image_column="image").items():
            setattr(args, a, v)
        assert sd_cli.sd_distill(args) == 0
        printed = capsys.readouterr().out
        assert (json.loads(printed)["step"] == 1) if main else printed == ""


# ---- every sd-distill mistake: one short message that names the fix, exit code 2, nothing left behind ---------
def sd_argv(teacher, data, out, *extra) -> list[str]:
    """``minilcm sd-distill`` arguments for one tiny step; ``extra`` flags come last, so they win."""
    return ["sd-distill", str(teacher), str(data), str(out), "--steps", "1", "--batch-size", "2", "--lora-rank", "4",
            "--device", "cpu", "--no-progress", "--ckpt-every", "1", *extra]


def run_sd_distill(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``minilcm sd-distill`` through ``minilcm.cli.main``. While main() has no central
    handler of user errors yet (``cli.USER_ERRORS``), the same check one level down: the subcommand must raise one
    of the exceptions that handler catches, and its message is what it would print."""
    from minilcm import cli
    from minilcm.errors import UserError
    from minilcm.sd.cli import register

    capsys.readouterr()
    if hasattr(cli, "USER_ERRORS"):
        rc = cli.main(argv)
        return rc, capsys.readouterr().err
    parser = argparse.ArgumentParser(prog="minilcm")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    with pytest.raises((UserError, ValueError, FileNotFoundError, ImportError, OSError)) as e:
        args.fn(args)
    return 2, f"minilcm sd-distill: error: {e.value}\n"


def snapshot(folder: Path):
    """Every file below ``folder`` with its size and mtime (None: no such path)."""
    if not folder.exists():
        return None
    if folder.is_file():
        return folder.stat().st_size, folder.stat().st_mtime_ns
    return sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns) for f in folder.rglob("*"))


LONG_TAIL = "\n".join(f"    at line {i} of a long library traceback-like message" for i in range(30))


def copy_teacher(c) -> Path:
    return Path(shutil.copytree(c.teacher, c.tmp / "teacher-copy"))


def truncated_teacher(c) -> Path:
    t = copy_teacher(c)
    f = t / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    return t


def without_unet(c) -> Path:
    t = copy_teacher(c)
    shutil.rmtree(t / "unet")
    return t


def offline_hub(c) -> str:
    from diffusers import StableDiffusionPipeline

    def offline(*args, **kwargs):  # what from_pretrained raises for a hub id without network (20-40 lines)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in "
                      "the cached files.\n" + LONG_TAIL)

    c.mp.setattr(StableDiffusionPipeline, "from_pretrained", offline)
    return "someone/stable-diffusion"


def caption_folder(c, name="caps", **kw) -> Path:
    return write_images(c.tmp / name, **kw)


def without_captions(c) -> Path:
    folder = caption_folder(c)
    (folder / "metadata.jsonl").unlink()
    return folder


def bad_metadata(c, line='{"file_name": "img3.png", "text": "a frog"') -> Path:
    folder = caption_folder(c)
    with open(folder / "metadata.jsonl", "a") as f:
        f.write(line + "\n")
    return folder


def corrupt_image(c) -> Path:
    folder = caption_folder(c)
    (folder / "img1.png").write_bytes(b"this is not a PNG")
    return folder


def mistyped_folder(name):
    def setup(c):
        c.mp.chdir(c.tmp)
        return name
    return setup


def no_datasets_package(c) -> str:
    c.mp.chdir(c.tmp)
    c.mp.setitem(sys.modules, "datasets", None)
    return "data/captins"


def hub_dataset_offline(c) -> str:
    fake = types.ModuleType("datasets")

    def load_dataset(name, split="train"):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\n" + LONG_TAIL)

    fake.load_dataset = load_dataset
    c.mp.chdir(c.tmp)
    c.mp.setitem(sys.modules, "datasets", fake)
    return "someone/captions"


def previous_run(fixture):
    """OUT holding the checkpoint of an earlier run (a copy of a module fixture's folder)."""
    def setup(c):
        shutil.copytree(c.request.getfixturevalue(fixture).export.parent, c.out)
    return setup


def older_lora_checkpoint(c):
    """A lora checkpoint without sd-distill.json (an older minilcm), resumed with another rank."""
    previous_run("lora_run")(c)
    (c.out / "checkpoint" / "sd-distill.json").unlink()


def truncated_checkpoint(c):
    previous_run("full_run")(c)
    f = c.out / "checkpoint" / "state.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def other_teacher(c) -> Path:
    previous_run("full_run")(c)
    tiny_sd_pipeline(c.tmp / "teacher-w8", time_cond_proj_dim=8)
    return c.tmp / "teacher-w8"


def corrupt_cache(c):
    (c.tmp / "cache.safetensors").write_bytes(b"garbage")


def mismatched_cache(c):
    sd.LatentCaptions(torch.zeros(2, 4, 16, 16), torch.zeros(2, 16, 32).half(), torch.zeros(16, 32)).save(
        c.tmp / "cache.safetensors")


def no_cuda(c):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")


# name: (extra flags, expected message (regex), setups: {"teacher": f, "data": f, "out": f, "env": f})
BAD_INPUTS = {
    "teacher folder missing": ([], r"the teacher folder \S*no-teacher does not exist: check the path",
                               {"teacher": lambda c: c.tmp / "no-teacher"}),
    "teacher not a pipeline": ([], r"not a diffusers pipeline folder \(no model_index.json\)",
                               {"teacher": lambda c: c.tmp}),
    "hub id offline": ([], r"from the Hugging Face hub \(OSError: We couldn't connect.*needs network access.*pass "
                           r"a local pipeline folder", {"teacher": offline_hub}),
    "truncated teacher weights": ([], r"teacher-copy is corrupt: unet/diffusion_pytorch_model.safetensors is "
                                      r"truncated or unreadable .*re-download the teacher",
                                  {"teacher": truncated_teacher}),
    "teacher without its unet": ([], r"teacher-copy is incomplete \(no unet/\): re-download the teacher",
                                 {"teacher": without_unet}),
    "empty data folder": ([], r"holds no images .*put the images", {"data": lambda c: (c.tmp / "empty").mkdir() or
                                                                    c.tmp / "empty"}),
    "images without captions": ([], r"4 of 4 images in \S+ have no caption .*add them to metadata.jsonl",
                                {"data": without_captions}),
    "malformed metadata.jsonl": ([], r"caps/metadata.jsonl, line 5: not valid JSON .*one object per line",
                                 {"data": bad_metadata}),
    "metadata line not an object": ([], r"metadata.jsonl, line 5: expected a JSON object, got list",
                                    {"data": lambda c: bad_metadata(c, '["img3.png", "a frog"]')}),
    "metadata row without caption": ([], r"metadata.jsonl, line 5: need 'file_name' and one of",
                                     {"data": lambda c: bad_metadata(c, '{"file_name": "img3.png"}')}),
    "corrupt image": ([], r"cannot read the image \S+img1.png .*replace it or remove it", {"data": corrupt_image}),
    "mistyped ./captins": ([], r"no data folder ./captins \(and it is not a Hugging Face dataset name\): check the "
                               r"path", {"data": mistyped_folder("./captins")}),
    "mistyped captins": ([], r"no data folder captins \(and it is not a Hugging Face dataset name\): check the path",
                         {"data": mistyped_folder("captins")}),
    "owner/name without datasets": ([], r"no data folder data/captins: check the path \(to read .* pip install "
                                        r"datasets\)", {"data": no_datasets_package}),
    "hub dataset offline": ([], r"no data folder someone/captions, and it could not be loaded as a Hugging Face "
                                r"dataset \(ConnectionError: Couldn't reach.*check the path",
                            {"data": hub_dataset_offline}),
    "corrupt cache": (["--cache", "CACHE"], r"cache.safetensors is not a latents cache written by sd-distill .*delete "
                                            r"it or pass another --cache", {"env": corrupt_cache}),
    "cache of another teacher": (["--cache", "CACHE"], r"holds \(4, 16, 16\) latents.*delete the cache",
                                 {"env": mismatched_cache}),
    "steps 0": (["--steps", "0"], r"--steps must be an integer >= 1, got 0", {}),
    "batch size 0": (["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0", {}),
    "lr nan": (["--lr", "nan"], r"--lr must be a finite number > 0, got nan", {}),
    "lr 0": (["--lr", "0"], r"--lr must be a finite number > 0, got 0.0", {}),
    "w inf": (["--mode", "lora", "--w", "inf"], r"--w must be a finite number >= 0", {}),
    "w_min negative": (["--w-min", "-1"], r"--w-min must be a finite number >= 0", {}),
    "w_min above w_max": (["--w-min", "9", "--w-max", "2"], r"--w-min must be <= --w-max, got --w-min 9.0 --w-max 2.0",
                          {}),
    "w_max nan": (["--w-max", "nan"], r"--w-max must be a finite number >= 0", {}),
    "k 0": (["--k", "0"], r"--k must be an integer >= 1, got 0", {}),
    "k above T": (["--k", "5000"], r"--k must be in 1..1000 \(the teacher's training timesteps\), got 5000", {}),
    "lora rank 0": (["--mode", "lora", "--lora-rank", "0"], r"--lora-rank must be an integer >= 1, got 0", {}),
    "ckpt_every negative": (["--ckpt-every", "-1"], r"--ckpt-every must be an integer >= 0, got -1", {}),
    "warmup negative": (["--warmup-steps", "-5"], r"--warmup-steps must be an integer >= 0, got -5", {}),
    "w_dim 0": (["--w-dim", "0"], r"--w-dim must be an integer >= 1, got 0", {}),
    "resolution not a multiple": (["--resolution", "30"], r"--resolution must be a multiple of 4", {}),
    "max samples 0": (["--max-samples", "0"], r"--max-samples must be an integer >= 1, got 0", {}),
    "device typo": (["--device", "gpu"], r"--device 'gpu' is not a device: use cpu, cuda or cuda:N", {}),
    "device cuda without CUDA": (["--device", "cuda"], r"CUDA is not available here: use --device cpu",
                                 {"env": no_cuda}),
    "8-bit Adam without bitsandbytes": (["--use-8bit-adam"], r"needs bitsandbytes .*pip install bitsandbytes",
                                        {"env": lambda c: c.mp.setitem(sys.modules, "bitsandbytes", None)}),
    "lora without peft": (["--mode", "lora"], r"mode='lora' needs peft: pip install peft",
                          {"env": lambda c: c.mp.setitem(sys.modules, "peft", None)}),
    "OUT is a file": ([], r"OUT \S+ is a file: pass a folder", {"out": lambda c: c.out.write_text("not a folder")}),
    "resume: other mode": (["--mode", "lora", "--steps", "3"], r"checkpoint holds a --mode full run, and this is "
                           r"--mode lora: use another OUT folder, or delete \S+checkpoint to start afresh",
                           {"out": previous_run("full_run")}),
    "resume: other lora rank": (["--mode", "lora", "--lora-rank", "8", "--steps", "3"],
                                r"written with --lora-rank 4, and this run has --lora-rank 8: use another OUT",
                                {"out": previous_run("lora_run")}),
    "resume: other w_dim": (["--w-dim", "64", "--steps", "3"], r"written with --w-dim 256, and this run has --w-dim "
                            r"64: use another OUT", {"out": previous_run("full_run")}),
    "resume: other teacher": (["--steps", "3"], r"trained from a different teacher UNet \(time_cond_proj_dim None vs "
                              r"8\): use another OUT", {"teacher": other_teacher}),
    "resume: past --steps": (["--steps", "1"], r"checkpoint is at step 2, past --steps 1: pass --steps 2 or more",
                             {"out": previous_run("full_run")}),
    "resume: older checkpoint that does not fit": (
        ["--mode", "lora", "--lora-rank", "8", "--steps", "3"],
        r"cannot resume from \S+checkpoint: does not fit this model.*use another OUT folder, or delete",
        {"out": older_lora_checkpoint}),
    "resume: truncated checkpoint": (["--steps", "3"], r"the checkpoint in \S+ is unreadable .*use another OUT "
                                     r"folder, or delete", {"out": truncated_checkpoint}),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_sd_distill_mistakes_are_one_short_message(case, teacher, data, tmp_path, monkeypatch, request, capsys):
    """main([sd-distill ...]) returns 2 and prints at most 3 lines naming the fix, no traceback; OUT is left as it
    was (not created, or unchanged)."""
    extra, expected, setups = BAD_INPUTS[case]
    c = types.SimpleNamespace(tmp=tmp_path, teacher=teacher, data=data, mp=monkeypatch, request=request,
                              out=tmp_path / "out")
    for what in ("env", "out"):
        if what in setups:
            setups[what](c)
    t = setups["teacher"](c) if "teacher" in setups else teacher
    d = setups["data"](c) if "data" in setups else data
    extra = [str(tmp_path / "cache.safetensors") if a == "CACHE" else a for a in extra]
    before = snapshot(c.out)
    rc, err = run_sd_distill(sd_argv(t, d, c.out, *extra), capsys)
    record_message(err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and 1 <= len(lines) <= 3, err
    assert lines[0].startswith("minilcm sd-distill: error: ") and "Traceback" not in err, err
    assert re.search(expected, err), err
    assert "at line 3 of a long" not in err  # only the first line of a library's long message
    assert snapshot(c.out) == before, "OUT was created or changed"


def test_a_failure_inside_training_leaves_no_out_folder(teacher, data, tmp_path, monkeypatch):
    distill_module = sys.modules["minilcm.sd.training"]

    def broken(*args, **kwargs):
        raise ValueError("a failure before the first step")

    monkeypatch.setattr(distill_module, "train", broken)
    with pytest.raises(ValueError, match="before the first step"):
        sd.distill(teacher, data, tmp_path / "out", mode="lora", steps=1, **FAST)
    assert not (tmp_path / "out").exists()


def test_processes_that_accelerate_does_not_join_are_an_error(monkeypatch):
    """`accelerate launch --multi_gpu` on a machine without CUDA starts N processes that accelerate leaves
    unjoined: each would act as rank 0 (same seed, N logs, a race on the checkpoint). distill refuses that."""
    import accelerate

    distill_module = sys.modules["minilcm.sd.training"]
    made = []

    class Unjoined:
        num_processes, process_index, is_main_process, distributed_type = 1, 0, True, "NO"

        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(accelerate, "Accelerator", Unjoined)
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert distill_module._accelerator() is None and not made  # one process: no accelerator at all
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(distill_module.LaunchError, match="2 processes were launched, but accelerate joined 1"):
        distill_module._accelerator()
    assert made == [{"mixed_precision": "no", "cpu": not torch.cuda.is_available()}]


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
