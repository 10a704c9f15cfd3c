"""Bad input, the way a newcomer types it: every case must give a short message that names the fix (at most three
lines on stderr), exit code 2 (or a named exception in Python), no traceback, and no file left behind.

The command-line cases run ``minilcm.cli.main`` in this process on the tiny random models of ``conftest.tiny``.
The list of cases is the one the README's results table counts (``test_the_count_of_bad_inputs``).
"""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import record_message
from minilcm.checkpoints import CheckpointError
from minilcm.cli import main

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "checkpoints"


def run_cli(capsys, argv):
    """(exit code, stderr) of `minilcm ARGV`; argparse's own errors (SystemExit) count as exit codes."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_clear(rc, err, fix, code=2):
    """Exit ``code``, a message of at most three lines containing ``fix``, no traceback."""
    record_message(err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == code, (rc, err)
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 3, err
    assert fix.lower() in err.lower(), (fix, err)


def files_below(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")) if Path(folder).exists() else []


# ---- variants of the tiny models, each broken in one way -----------------------------------------------
@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")

    def copy(key, name):
        shutil.copytree(tiny[key], d / name)
        return d / name

    # a pixel teacher whose EDM config lost its raw.unet; one whose num_classes disagrees with its weights
    f = copy("ddpm", "no-unet")
    from minilcm.checkpoints import load_checkpoint, save_checkpoint

    tensors, meta = load_checkpoint(f)
    meta["model_config"] = {"class": "EDMPrecond", "raw": {"class": "EpsUNet"}, "schedule": "linear",
                            "sigma_data": 0.5}
    save_checkpoint(f, tensors, meta)
    f = copy("ddpm", "classes100")
    tensors, meta = load_checkpoint(f)
    meta["model_config"]["num_classes"] = 100
    save_checkpoint(f, tensors, meta)
    # a truncated pixel checkpoint
    f = copy("ddpm", "truncated-pixel")
    (f / "state.safetensors").write_bytes((f / "state.safetensors").read_bytes()[:5000])
    # a mini-SD with a truncated UNet, one with a UNet config of the wrong width
    f = copy("sd", "sd-truncated")
    w = next((f / "unet").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:3000])
    f = copy("sd", "sd-width")
    cfg = json.loads((f / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
    (f / "unet" / "config.json").write_text(json.dumps(cfg))
    # an LCM student whose teacher changed since it was distilled; one that names no teacher
    f = copy("lcm", "lcm-changed-teacher")
    meta = json.loads((f / "meta.json").read_text())
    meta.update(teacher_sha256="0" * 64, stage="lcm")
    (f / "meta.json").write_text(json.dumps(meta))
    f = copy("lcm", "lcm-no-teacher")
    (f / "meta.json").write_text(json.dumps({"stage": "lcm"}))
    f = copy("lcm", "lcm-ranged")
    meta = json.loads((f / "meta.json").read_text())
    meta.update(w_min=0.0, w_max=4.0)
    (f / "meta.json").write_text(json.dumps(meta))
    (d / "empty").mkdir()
    (d / "a-file").write_text("not a folder")
    return {k: str(d / k) for k in ("no-unet", "classes100", "truncated-pixel", "sd-truncated", "sd-width",
                                    "lcm-changed-teacher", "lcm-no-teacher", "lcm-ranged", "empty", "a-file")}


# ---- minilcm sample ------------------------------------------------------------------------------------
SAMPLE_CASES = [
    # (id, model key, extra args, the fix the message must name)
    ("out-not-npz", "ddpm", ["--sampler", "ddim", "--out", "{tmp}/x.txt"], ".npz"),
    ("out-below-a-file", "ddpm", ["--sampler", "ddim", "--out", "{a-file}/x.npz"], "choose another --out"),
    ("out-unwritable", "ddpm", ["--sampler", "ddim", "--out", "/proc/minilcm-test/x.npz"], "choose another --out"),
    ("out-is-a-folder", "ddpm", ["--sampler", "ddim", "--out", "{tmp}/folder.npz"], "name a file"),
    ("out-exists", "ddpm", ["--sampler", "ddim", "--out", "{tmp}/exists.npz"], "--force"),
    ("guidance-nan", "sd", ["--sampler", "ddim", "--guidance", "nan"], "finite"),
    ("guidance-inf", "ddpm", ["--sampler", "ddim", "--guidance", "inf"], "finite"),
    ("guidance-not-a-number", "ddpm", ["--sampler", "ddim", "--guidance", "strong"], "invalid float"),
    ("batch-0", "ddpm", ["--sampler", "ddim", "--batch", "0"], "batch must be >= 1"),
    ("n-0", "ddpm", ["--sampler", "ddim", "--n", "0"], "number of images"),
    ("steps-0", "ddpm", ["--sampler", "ddim", "--steps", "0"], "steps must be >= 1"),
    ("steps-fraction", "ddpm", ["--sampler", "ddim", "--steps", "2.5"], "invalid int"),
    ("steps-too-many-lcm", "lcm", ["--sampler", "lcm", "--steps", "10000"], "takes 1..50 steps"),
    ("steps-too-many-cm", "cd", ["--sampler", "cm", "--steps", "19"], "1..18"),
    ("steps-too-many-teacher", "ddpm", ["--sampler", "ddim", "--steps", "5000"], "1..1000"),
    ("empty-prompt", "sd", ["--sampler", "ddim", "--prompt", ""], "give a text"),
    ("blank-prompt", "lcm", ["--sampler", "lcm", "--prompt", "   "], "give a text"),
    ("class-name-unknown", "sd", ["--sampler", "ddim", "--class", "zebra"], "one of: airplane"),
    ("class-index-10", "ddpm", ["--sampler", "ddim", "--class", "10"], "classes 0-9"),
    ("class-and-prompt", "sd", ["--sampler", "ddim", "--class", "1", "--prompt", "a cat"], "not allowed with"),
    ("lcm-on-a-teacher", "sd", ["--sampler", "lcm"], "valid: ddpm, ddim"),
    ("teacher-sampler-on-lcm", "lcm", ["--sampler", "ddim"], "valid: lcm"),
    ("unknown-sampler", "sd", ["--sampler", "euler"], "invalid choice"),
    ("prompt-on-class-model", "ddpm", ["--sampler", "ddim", "--prompt", "a cat"], "use --class"),
    ("class-on-unconditional", "cd", ["--sampler", "cm", "--class", "3"], "takes no class"),
    ("cuda-without-gpu", "ddpm", ["--sampler", "ddim", "--device", "cuda"], "--device cpu"),
    ("model-missing", "{tmp}/nowhere", ["--sampler", "ddim"], "check the path"),
    ("model-name-unknown", "ddpm-cifar100", ["--sampler", "ddim"], "pass a folder path"),
    ("model-is-the-evaluator", "ev", ["--sampler", "ddim"], "sample from one of"),
    ("model-folder-empty", "{empty}", ["--sampler", "ddim"], "not a model folder"),
    ("config-without-raw-unet", "{no-unet}", ["--sampler", "ddim"], "re-export"),
    ("config-num-classes-100", "{classes100}", ["--sampler", "ddim"], "num_class_embeds"),
    ("truncated-pixel-weights", "{truncated-pixel}", ["--sampler", "ddim"], "delete the folder"),
    ("truncated-diffusers-weights", "{sd-truncated}", ["--sampler", "ddim"], "restore the folder"),
    ("unet-config-wrong-width", "{sd-width}", ["--sampler", "ddim"], "restore the folder"),
    ("student-teacher-changed", "{lcm-changed-teacher}", ["--sampler", "lcm"], "distil again"),
    ("student-names-no-teacher", "{lcm-no-teacher}", ["--sampler", "lcm"], "teacher"),
]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=[c[0] for c in SAMPLE_CASES])
def test_sample_bad_input(case, tiny, broken, tmp_path, capsys):
    _, model, extra, fix = case
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "exists.npz").write_bytes(b"keep me")
    before = files_below(tmp_path)
    fmt = {"tmp": str(tmp_path), **broken}
    model = tiny.get(model, model).format(**fmt)
    extra = [a.format(**fmt) for a in extra]
    argv = ["sample", "--model", model, "--steps", "2", "--n", "2", "--out", str(tmp_path / "x.npz"), "--quiet"]
    argv += extra  # a later --steps / --n / --out overrides the default above
    rc, err = run_cli(capsys, argv)
    assert_clear(rc, err, fix)
    assert files_below(tmp_path) == before  # nothing written, nothing left behind
    assert (tmp_path / "exists.npz").read_bytes() == b"keep me"


def test_sample_guidance_outside_the_students_range_warns(broken, tmp_path, capsys):
    out = tmp_path / "w.npz"
    rc = main(["sample", "--model", broken["lcm-ranged"], "--sampler", "lcm", "--steps", "1", "--n", "2",
               "--guidance", "100", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0 and "outside the range this student was distilled on, w in [0, 4]" in err
    assert out.exists() and out.with_suffix(".png").exists()


def test_sample_overwrites_only_with_force_and_leaves_no_partial_file(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.npz"
    args = ["sample", "--model", tiny["cd"], "--sampler", "cm", "--steps", "1", "--n", "2", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    first = out.read_bytes()
    assert main([*args, "--seed", "1", "--force"]) == 0 and out.read_bytes() != first
    # a failure while writing (disk full) leaves neither a partial .npz nor a .png
    import minilcm.commands as commands

    def full_disk(images, path):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(commands, "_write_grid", full_disk)
    out2 = tmp_path / "t.npz"
    rc, err = run_cli(capsys, [*args[:-3], "--out", str(out2), "--quiet"])
    assert_clear(rc, err, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.png"]


# ---- minilcm train -------------------------------------------------------------------------------------
TRAIN_CASES = [
    ("profile-unknown", ["train", "ddpm"], {"MINILCM_PROFILE": "laptop"}, "one of fast, cpu, gpu"),
    ("out-is-shipped", ["train", "ddpm", "--out", str(SHIPPED / "ddpm-cifar10")], {}, "--replace-shipped"),
    ("out-inside-shipped", ["train", "autoencoder", "--out", str(SHIPPED / "minisd-cifar10")], {},
     "--replace-shipped"),
    ("teacher-missing", ["train", "lcm", "--teacher", "{tmp}/no-teacher"], {}, "check the path"),
    ("teacher-of-the-wrong-kind", ["train", "cd", "--teacher", "{sd}"], {}, "minilcm train ddpm"),
    ("teacher-on-a-stage-without-one", ["train", "evaluator", "--teacher", "{sd}"], {}, "lcm and cd stages"),
    ("minisd-without-autoencoder", ["train", "minisd", "--out", "{tmp}/sd-out"], {}, "minilcm train autoencoder"),
    ("cifar-missing", ["train", "ddpm", "--out", "{tmp}/d"], {"MINILCM_CIFAR": "{tmp}/no-cifar.tar.gz"},
     "MINILCM_CIFAR"),
    ("cifar-corrupt", ["train", "evaluator", "--out", "{tmp}/e"], {"MINILCM_CIFAR": "{tmp}/corrupt.tar.gz"},
     "MINILCM_CIFAR"),
    ("stage-unknown", ["train", "vae"], {}, "invalid choice"),
    ("steps-zero", ["train", "ddpm", "--steps", "0", "--out", "{tmp}/d"], {}, "positive integer"),
    ("steps-on-a-stage-sized-in-epochs", ["train", "evaluator", "--steps", "5", "--out", "{tmp}/e"], {},
     "has no 'steps' setting"),
    ("out-holds-other-files", ["train", "ddpm", "--out", "{tmp}/notes"], {}, "holds no exported model"),
    ("out-is-the-shipped-root", ["train", "ddpm", "--out", str(SHIPPED), "--replace-shipped"], {},
     "name a new folder"),
    ("out-is-the-working-folder", ["train", "ddpm", "--out", "."], {}, "name a new folder"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(case, tiny, tmp_path, capsys, monkeypatch):
    _, argv, env, fix = case
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "corrupt.tar.gz").write_bytes(b"\x1f\x8b\x08 this is not a tar archive")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("an export must not wipe me")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MINILCM_PROFILE", "fast")
    fmt = {"tmp": str(tmp_path), **tiny}
    for k, v in env.items():
        monkeypatch.setenv(k, v.format(**fmt))
    shipped_before = {p: p.stat().st_mtime_ns for p in SHIPPED.rglob("*")}
    before = files_below(tmp_path)
    rc, err = run_cli(capsys, [a.format(**fmt) for a in argv] + ["--quiet"] * (argv[1] != "vae"))
    assert_clear(rc, err, fix)
    assert files_below(work) == [] and files_below(tmp_path) == before  # no runs/, no export
    assert {p: p.stat().st_mtime_ns for p in SHIPPED.rglob("*")} == shipped_before


# ---- minilcm bench -------------------------------------------------------------------------------------
BENCH_CASES = [
    ("n-0", ["--n", "0"], "--n must be >= 1"),
    ("n-negative", ["--n", "-5"], "--n must be >= 1"),
    ("batch-0", ["--batch", "0"], "--batch must be >= 1"),
    ("w-nan", ["--w", "nan"], "finite"),
    ("evaluator-missing", ["--evaluator", "{tmp}/no-ev"], "check the path"),
    ("cuda-without-gpu", ["--device", "cuda"], "--device cpu"),
]


@pytest.mark.parametrize("case", BENCH_CASES, ids=[c[0] for c in BENCH_CASES])
def test_bench_bad_input(case, tiny, tmp_path, capsys):
    _, extra, fix = case
    if torch.cuda.is_available() and "cuda" in extra:
        pytest.skip("this machine has CUDA")
    out = tmp_path / "bench"
    argv = ["bench", "--out", str(out), "--minisd", tiny["sd"], "--lcm", tiny["lcm"], "--evaluator", tiny["ev"],
            "--no-pixel", "--quiet", "--n", "4"] + [a.format(tmp=tmp_path) for a in extra]
    rc, err = run_cli(capsys, argv)
    assert_clear(rc, err, fix)
    assert not out.exists()


# ---- the Python API: named exceptions ------------------------------------------------------------------
def _api_cases(tiny):
    from minilcm.diffusion import check_timesteps
    from minilcm.generate import generate
    from minilcm.zoo import load_model_folder
    from minilcm.lcm import lcm_timesteps
    from minilcm.models import cifar_unet
    from minilcm.schedules import Schedule
    from minilcm.solvers import ddim
    from minilcm.train import TrainConfig, train

    s = Schedule("linear")
    eps0 = lambda x, t, **c: torch.zeros_like(x)  # noqa: E731
    return [
        ("steps-fraction", lambda: generate(tiny["cd"], "cm", 2.5, 2), ValueError, "whole number"),
        ("steps-bool", lambda: generate(tiny["cd"], "cm", True, 2), ValueError, "whole number"),
        ("n-fraction", lambda: generate(tiny["cd"], "cm", 1, 1.5), ValueError, "whole number"),
        ("w-nan", lambda: generate(tiny["ddpm"], "ddim", 2, 2, w=math.nan), ValueError, "finite"),
        ("eta-negative", lambda: ddim(eps0, torch.zeros(2, 2), s, s.timesteps(4), eta=-1.0), ValueError, "eta"),
        ("timesteps-nan", lambda: ddim(eps0, torch.zeros(2, 2), s, [999.0, math.nan, 0.0]), ValueError, "finite"),
        ("timesteps-inf", lambda: check_timesteps(s, [math.inf, 10.0]), ValueError, "finite"),
        ("grid-fraction", lambda: s.timesteps(2.5), ValueError, "whole number"),
        ("lcm-grid-too-long", lambda: lcm_timesteps(Schedule("scaled_linear"), 51), ValueError, "1..50"),
        ("image-16x16", lambda: cifar_unet("tiny")(torch.zeros(1, 3, 16, 16), torch.zeros(1)), ValueError,
         "32x32"),
        ("load-evaluator", lambda: load_model_folder(tiny["ev"]), CheckpointError, "sample from one of"),
        ("amp-dtype", lambda: train(torch.nn.Linear(2, 2), None, None, TrainConfig(amp_dtype="fp8")), ValueError,
         "bf16"),
    ]


API_IDS = ["steps-fraction", "steps-bool", "n-fraction", "w-nan", "eta-negative", "timesteps-nan", "timesteps-inf",
           "grid-fraction", "lcm-grid-too-long", "image-16x16", "load-evaluator", "amp-dtype"]


@pytest.mark.parametrize("name", API_IDS)
def test_api_bad_input(name, tiny):
    cases = {c[0]: c for c in _api_cases(tiny)}
    _, fn, exc, fix = cases[name]
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    record_message(f"{type(e.value).__name__}: {msg}")
    assert fix in msg and len(msg.strip().splitlines()) <= 3, msg


def test_a_half_updated_optimizer_is_named_not_a_keyerror(tmp_path):
    """An older minilcm saved a checkpoint mid-step on Ctrl-C (132 `step` entries, 131 `exp_avg`): resuming says
    what happened and what to do, instead of KeyError: 'exp_avg'."""
    from minilcm.checkpoints import load_checkpoint, save_checkpoint
    from minilcm.toys import GaussianMixture
    from minilcm.diffusion import DenoisingLoss
    from minilcm.models import MLPDenoiser
    from minilcm.schedules import Schedule
    from minilcm.train import TrainConfig, train

    cfg = TrainConfig(steps=3, batch_size=8, ckpt_dir=str(tmp_path / "run"), progress=False, device="cpu")
    data = GaussianMixture()
    net = lambda: MLPDenoiser(hidden=16, depth=1, num_classes=data.num_classes)  # noqa: E731
    loss = DenoisingLoss(Schedule("linear"), cond_drop=0.1, null_class=data.num_classes)
    train(net(), loss, data, cfg)
    tensors, meta = load_checkpoint(tmp_path / "run")
    del tensors[next(k for k in tensors if k.endswith(".exp_avg"))]
    save_checkpoint(tmp_path / "run", tensors, meta)
    cfg.steps = 6
    with pytest.raises(CheckpointError, match="half-updated optimizer.*delete the folder"):
        train(net(), loss, data, cfg)


def test_a_failed_swap_puts_the_old_export_back(tmp_path, monkeypatch):
    """staged_folder: the old export is moved aside, the new one renamed in; if that second rename fails, the old
    one is put back (never a missing folder), and no staging folder is left."""
    import os

    from minilcm import checkpoints

    out = tmp_path / "model"
    out.mkdir()
    (out / "meta.json").write_text("old")
    real = os.replace

    def fail_second(a, b):
        if str(a).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(checkpoints.os, "replace", fail_second)
    with pytest.raises(OSError):
        with checkpoints.staged_folder(out) as tmp:
            (tmp / "meta.json").write_text("new")
    assert (out / "meta.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_debug_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    argv = ["sample", "--model", str(tmp_path / "nowhere"), "--sampler", "ddim", "--steps", "2", "--n", "2",
            "--out", str(tmp_path / "x.npz")]
    with pytest.raises(CheckpointError):
        main(["--debug", *argv])
    monkeypatch.setenv("MINILCM_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(argv)


def test_the_count_of_bad_inputs():
    """The README's results table states how many bad inputs are tried (this file and tests/test_sd.py's
    sd-distill cases); keep that number true."""
    n = len(SAMPLE_CASES) + len(TRAIN_CASES) + len(BENCH_CASES) + len(API_IDS) + 1  # + the half-updated optimizer
    assert n >= 40
    readme = (ROOT / "README.md").read_text()
    assert f"{n} bad inputs" in readme, f"the README should say '{n} bad inputs' (this file)"
