"""minilcm.generate, `minilcm sample` and `minilcm bench` on tiny random stand-ins of every model kind (CPU, fast)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minilcm import checkpoints
from minilcm.bench import BENCH_PLAN, model_benchmark
from minilcm.cli import main
from minilcm.generate import Generated, balanced_labels, generate, parse_class, prompt_label
from minilcm.zoo import load_model_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def loaded(tiny):
    return {k: load_model_folder(tiny[k]) for k in ("sd", "lcm", "ddpm", "cd", "unc")}


# ---- helpers --------------------------------------------------------------------------------------------
def test_labels_classes_and_prompts():
    assert np.bincount(balanced_labels(25), minlength=10).tolist() == [3] * 5 + [2] * 5
    assert parse_class("cat") == parse_class("3") == parse_class(3) == 3
    assert parse_class(" Truck ") == 9
    with pytest.raises(ValueError, match="airplane, automobile"):
        parse_class("zebra")
    with pytest.raises(ValueError, match="out of range"):
        parse_class(10)
    assert prompt_label("a photo of a cat") == 3
    assert prompt_label("A SHIP at sea") == 8
    assert prompt_label("a cat and a dog") == -1 and prompt_label("a photo of a zebra") == -1
    assert prompt_label("a category") == -1  # whole words only


# ---- generate() for each kind -----------------------------------------------------------------------------
@pytest.mark.parametrize("key,sampler,steps,nfe,rows", [
    ("sd", "ddim", 3, 3, 2), ("sd", "dpm_solver_pp", 3, 3, 2), ("sd", "dpm_solver", 5, 5, 2), ("sd", "ddpm", 2, 2, 2),
    ("lcm", "lcm", 2, 2, 1), ("ddpm", "ddim", 2, 2, 2), ("ddpm", "dpm_solver_pp", 2, 2, 2), ("cd", "cm", 2, 2, 1),
    ("unc", "ddim", 2, 2, 1)])
def test_generate_each_kind(loaded, key, sampler, steps, nfe, rows):
    out = generate(loaded[key], sampler, steps, 5, batch=3, seed=1)
    assert isinstance(out, Generated)
    assert out.images.shape == (5, 32, 32, 3) and out.images.dtype == np.uint8
    assert out.labels.dtype == np.int64 and out.labels.shape == (5,)
    expect = [-1] * 5 if key in ("cd", "unc") else [0, 1, 2, 3, 4]
    assert out.labels.tolist() == expect
    assert (out.nfe, out.rows_per_eval) == (nfe, rows)  # counted calls of the network, per batch
    assert out.seconds_per_image > 0
    again = generate(loaded[key], sampler, steps, 5, batch=3, seed=1, warmup=False)
    np.testing.assert_array_equal(out.images, again.images)  # the seed fixes everything


def test_generate_conditions(loaded, tiny):
    g = generate(loaded["sd"], "ddim", 2, 4, prompt="a picture of a frog", warmup=False)
    assert g.labels.tolist() == [6] * 4
    assert generate(loaded["lcm"], "lcm", 1, 3, class_="horse", warmup=False).labels.tolist() == [7] * 3
    assert generate(loaded["ddpm"], "ddim", 1, 3, labels=[1, "cat", 9], warmup=False).labels.tolist() == [1, 3, 9]
    # w changes the guided teacher's samples; loading by path works as well as a LoadedModel
    a = generate(tiny["sd"], "ddim", 2, 2, w=0.0, warmup=False).images
    b = generate(loaded["sd"], "ddim", 2, 2, w=3.0, warmup=False).images
    assert not np.array_equal(a, b)


def test_generate_errors(loaded):
    with pytest.raises(ValueError, match="valid: ddpm, ddim, dpm_solver, dpm_solver_pp"):
        generate(loaded["sd"], "cm", 2, 2)
    with pytest.raises(ValueError, match="valid: lcm"):
        generate(loaded["lcm"], "ddim", 2, 2)
    with pytest.raises(ValueError, match="class-conditional: use --class"):
        generate(loaded["ddpm"], "ddim", 2, 2, prompt="a cat")
    with pytest.raises(ValueError, match="unconditional"):
        generate(loaded["cd"], "cm", 1, 2, class_=3)
    with pytest.raises(ValueError, match="unknown class"):
        generate(loaded["sd"], "ddim", 2, 2, class_="unicorn")


def test_missing_checkpoint_names_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "SHIPPED_DIR", tmp_path)
    with pytest.raises(checkpoints.CheckpointError, match="minilcm train minisd"):
        load_model_folder("minisd-cifar10")
    with pytest.raises(checkpoints.CheckpointError, match="minilcm train lcm"):
        load_model_folder("lcm-cifar10")


# ---- minilcm sample -----------------------------------------------------------------------------------------
def test_sample_cli_end_to_end(tiny, tmp_path, capsys):
    out = tmp_path / "s" / "imgs.npz"
    rc = main(["sample", "--model", tiny["sd"], "--sampler", "dpm_solver_pp", "--steps", "3", "--guidance", "1.5",
               "--n", "20", "--seed", "3", "--batch", "8", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    z = np.load(out)
    assert sorted(z.files) == ["images", "labels"]
    assert z["images"].dtype == np.uint8 and z["images"].shape == (20, 32, 32, 3)
    assert np.issubdtype(z["labels"].dtype, np.integer)
    assert np.bincount(z["labels"], minlength=10).tolist() == [2] * 10  # classes evenly spread
    assert out.with_suffix(".png").exists()
    assert "wall time per image" in capsys.readouterr().out


def test_sample_cli_class_prompt_and_student(tiny, tmp_path):
    cases = [(["--model", tiny["lcm"], "--sampler", "lcm", "--steps", "2", "--class", "cat"], [3] * 3),
             (["--model", tiny["sd"], "--sampler", "ddim", "--steps", "2", "--class", "8"], [8] * 3),
             (["--model", tiny["sd"], "--sampler", "ddim", "--steps", "2", "--prompt", "a photo of a dog"], [5] * 3),
             (["--model", tiny["sd"], "--sampler", "ddim", "--steps", "2", "--prompt", "a blurry cat or dog"], [-1] * 3),
             (["--model", tiny["cd"], "--sampler", "cm", "--steps", "1"], [-1] * 3)]
    for i, (args, labels) in enumerate(cases):
        out = tmp_path / f"{i}.npz"
        assert main(["sample", *args, "--n", "3", "--out", str(out)]) == 0
        assert np.load(out)["labels"].tolist() == labels


def test_sample_cli_errors(tiny, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "x.npz")
    base = ["sample", "--steps", "2", "--n", "2", "--out", out]
    assert main([*base, "--model", tiny["sd"], "--sampler", "lcm"]) == 2
    assert "valid: ddpm, ddim, dpm_solver, dpm_solver_pp" in capsys.readouterr().err
    assert main([*base, "--model", tiny["ddpm"], "--sampler", "ddim", "--prompt", "a cat"]) == 2
    assert "--prompt needs a text-conditioned model" in capsys.readouterr().err
    assert main([*base, "--model", tiny["sd"], "--sampler", "ddim", "--class", "zebra"]) == 2
    assert "unknown class 'zebra'" in capsys.readouterr().err
    monkeypatch.setattr(checkpoints, "SHIPPED_DIR", tmp_path / "none")
    assert main([*base, "--model", "lcm-cifar10", "--sampler", "lcm"]) == 2
    assert "minilcm train lcm" in capsys.readouterr().err
    for bad in (["--sampler", "euler"], ["--sampler", "ddim", "--class", "1", "--prompt", "a cat"]):
        with pytest.raises(SystemExit):  # argparse: invalid choice, mutually exclusive options
            main([*base, "--model", tiny["sd"], *bad])
    assert not Path(out).exists()


@pytest.mark.slow
def test_sample_cli_as_a_program(tiny, tmp_path):
    """Other tools drive `minilcm sample` as a program: python -m minilcm.cli sample ..."""
    out = tmp_path / "p.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "minilcm.cli", "sample", "--model", tiny["lcm"], "--sampler", "lcm",
                        "--steps", "4", "--n", "10", "--out", str(out)], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "wall time per image" in r.stdout and "(4 NFE" in r.stdout
    assert np.load(out)["labels"].tolist() == list(range(10))


# ---- minilcm bench -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_on_tiny_models(tiny, tmp_path):
    ref = (torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.arange(10))
    res = model_benchmark(10, 1.0, tmp_path / "bench", minisd=tiny["sd"], lcm=tiny["lcm"], evaluator=tiny["ev"],
                          pixel_teacher=tiny["ddpm"], pixel_cm=tiny["cd"], reference=ref, batch=10, progress=False)
    for ext in ("md", "json", "png"):
        assert (tmp_path / "bench" / f"bench.{ext}").stat().st_size > 0
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    want = [(role, s, k) for role, plan in BENCH_PLAN.items() for s, steps in plan for k in steps]
    got = [(r["model"], r["sampler"], r["steps"]) for r in rows if r["sampler"] != "reference"]
    assert got == want  # every sampler at every step count on every model, in order
    for r in rows:
        assert np.isfinite(r["fd_clf"]) and r["fd_clf"] >= 0 and r["n"] == 10
        if r["sampler"] != "reference":
            assert r["nfe"] == r["steps"] and r["sec_per_image"] > 0
            assert r["rows_per_eval"] == (2 if r["model"] in ("mini-SD teacher", "pixel DDPM teacher") else 1)
            assert (r["class_acc"] is None) == (r["model"] == "CD student")
    assert [r["model"] for r in rows if r["sampler"] == "reference"] == ["CIFAR-10 test images", "VAE reconstruction"]
    assert set(res["checks"]) == {"lcm4_fd_ratio", "lcm4_speedup", "lcm2_fd_ratio", "lcm4_beats_ddim4"}
    md = (tmp_path / "bench" / "bench.md").read_text()
    assert res["header"]["date"][:4] in md and "cpu" in md and "| LCM student | lcm | 4 | 4 | 1 |" in md
    from minilcm.bench import record_metrics

    written = record_metrics(tmp_path / "bench" / "bench.json")
    assert sorted(written) == sorted(str(Path(tiny[k]) / "meta.json") for k in ("sd", "lcm", "ddpm", "cd"))
    cd_meta = json.loads((Path(tiny["cd"]) / "meta.json").read_text())["bench"]
    assert cd_meta["n_per_row"] == 10 and cd_meta["cm@2"]["nfe"] == 2 and cd_meta["cm@1"]["class_acc"] is None
    # each student's speed-up is against its own teacher's DPM-Solver++ 25 (the pixel block against the pixel teacher)
    for prefix in ("| LCM student | lcm | 4 |", "| CD student | cm | 1 |", "| pixel DDPM teacher | ddim | 4 |"):
        line = next(ln for ln in md.splitlines() if ln.startswith(prefix))
        assert line.rstrip(" |").endswith("x"), line


def test_bench_cli_skips_what_is_missing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINILCM_CIFAR", str(tmp_path / "no-cifar.tar.gz"))
    out = tmp_path / "b"
    rc = main(["bench", "--n", "4", "--out", str(out), "--minisd", tiny["sd"], "--lcm", tiny["lcm"],
               "--evaluator", tiny["ev"], "--ddpm", str(tmp_path / "nope"), "--cd", str(tmp_path / "nope")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pixel DDPM teacher" in text and "skipped" in text and "reference rows skipped" in text
    assert len(json.loads((out / "bench.json").read_text())["rows"]) == 10  # 7 teacher rows + 3 student rows


# ---- the pixel stages of the recipe, in the fast profile ------------------------------------------------------
@pytest.mark.slow
def test_pixel_stages_train_export_and_sample(tmp_path, cifar_archive):
    """``minilcm train ddpm`` then ``minilcm train cd --teacher`` (fast profile): both export folders that
    ``minilcm sample`` reads, with the metadata the checkpoints issue asks for (steps, images seen, wall time,
    hardware, git commit, metrics)."""
    env = {**os.environ, "MINILCM_PROFILE": "fast", "MINILCM_CIFAR": str(cifar_archive),
           "MINILCM_CACHE": str(ROOT / "data" / "cache"), "OMP_NUM_THREADS": "1"}
    for stage in ("ddpm", "cd"):
        args = [sys.executable, "-m", "minilcm.cli", "train", stage, "--out", str(tmp_path / stage), "--device", "cpu"]
        args += ["--teacher", str(tmp_path / "ddpm")] if stage == "cd" else []
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        meta = json.loads((tmp_path / stage / "meta.json").read_text())
        assert meta["stage"] == stage and meta["steps"] >= 2 and meta["images_seen"] == meta["steps"] * meta[
            "recipe"]["batch_size"]
        assert {"git_commit", "hardware", "wall_seconds", "metrics", "final_loss"} <= set(meta)
    assert load_model_folder(tmp_path / "ddpm").kind == "pixel-teacher"
    cd = load_model_folder(tmp_path / "cd")
    assert cd.kind == "pixel-cm" and cd.model.scaling.sigma_data == 0.5
    g = generate(cd, "cm", 2, 3)
    assert g.images.shape == (3, 32, 32, 3) and g.nfe == 2 and (g.labels == -1).all()
    r = subprocess.run([sys.executable, "-m", "minilcm.cli", "train", "cd", "--out", str(tmp_path / "x"),
                        "--teacher", str(tmp_path / "cd")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "minilcm train ddpm" in r.stderr


def test_plot_model_benchmark_has_linear_fd_axes_and_labelled_floors(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from minilcm.bench import plot_model_benchmark

    rows = [dict(model="teacher", sampler="ddim", nfe=n, fd_clf=f, sec_per_image=n * 0.008)
            for n, f in ((4, 170.0), (25, 104.0))]
    rows += [dict(model="LCM student", sampler="lcm", nfe=n, fd_clf=f, sec_per_image=0.005 + n * 0.004)
             for n, f in ((1, 112.0), (4, 100.0))]
    rows += [dict(model="CIFAR-10 test images", sampler="reference", nfe=None, fd_clf=12.2, sec_per_image=None)]
    fig = plot_model_benchmark(rows, path=tmp_path / "b.png", title="t")
    a, b = fig.axes[:2]
    assert a.get_yscale() == "linear" and a.get_ylim()[0] == 0 and a.get_ylim()[1] > 170
    assert any("12.2" in t.get_text() for t in a.texts)  # the floor is labelled with its value
    assert (tmp_path / "b.png").stat().st_size > 0
