"""Chapter 5's mini Stable Diffusion: the offline tokenizer, the pipeline round trip, the latent objective, the
text-conditioned denoising loss, the evaluator's Fréchet distance, and the whole recipe end to end (fast profile)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minilcm.diffusion import DenoisingLoss
from minilcm.evaluator import ClassifierLoss, EvaluatorNet, augment, feature_stats
from minilcm.latents import AutoencoderLoss, LatentSet, measure_scaling_factor
from minilcm.guidance import TextConditioning
from minilcm.metrics import frechet_distance
from minilcm.models.sd import build_tokenizer, course_words, minisd_vae, tiny_sd_pipeline
from minilcm.schedules import Schedule
from minilcm.train import TrainConfig, learning_rate

ROOT = Path(__file__).resolve().parents[1]


# ---- the tokenizer built offline ------------------------------------------------------------------------
def test_tokenizer_spells_each_course_word_as_one_token_and_encodes_anything():
    tok = build_tokenizer()
    for w in course_words():
        ids = tok(w).input_ids
        assert len(ids) == 3 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id, w
    assert tok.convert_ids_to_tokens(tok("a photo of a cat").input_ids)[1:-1] == \
        ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    ids = tok("A Zebra!").input_ids  # unknown words fall back to bytes: nothing is <unk>
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "azebra!"
    padded = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert padded.shape == (1, tok.model_max_length)


def test_pipeline_saves_and_loads_offline_with_identical_outputs(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd_pipeline(tmp_path / "sd")
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"), local_files_only=True)
    kw = dict(num_inference_steps=2, output_type="np", guidance_scale=2.0)
    a = pipe("a photo of a dog", generator=torch.Generator().manual_seed(0), **kw).images
    b = again("a photo of a dog", generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_vae_is_f4_and_the_scaling_factor_whitens():
    vae = minisd_vae("tiny")
    z = vae.encode(torch.randn(2, 3, 32, 32)).latent_dist.mean
    assert z.shape == (2, 4, 8, 8)  # 3072 numbers -> 256: a compression of 12
    lat = 3.0 * torch.randn(4000, 4, 8, 8)
    assert abs(measure_scaling_factor(lat) - 1 / 3.0) < 0.01


def test_autoencoder_loss_is_reconstruction_plus_weighted_kl():
    vae = minisd_vae("tiny")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base, with_kl = AutoencoderLoss(0.0)(vae, x, g()), AutoencoderLoss(1.0)(vae, x, g())
    kl = vae.encode(x).latent_dist.kl().mean() / x[0].numel()
    assert torch.allclose(with_kl - base, kl, rtol=1e-4)


# ---- text conditioning in the one denoising loss ------------------------------------------------------------
class Recorder(torch.nn.Module):
    def forward(self, x, t, encoder_hidden_states=None):
        self.ehs = encoder_hidden_states
        return torch.zeros_like(x)


def test_caption_dropout_replaces_whole_rows_by_the_empty_prompt():
    empty = torch.full((16, 8), -7.0)
    loss = DenoisingLoss(Schedule("scaled_linear"), cond_drop=0.5, conditioning=TextConditioning(empty))
    net = Recorder()
    z, ehs = torch.randn(400, 4, 8, 8), torch.randn(400, 16, 8)
    loss(net, (z, ehs), torch.Generator().manual_seed(0))
    dropped = (net.ehs == -7.0).all(dim=(1, 2))
    kept = (net.ehs == ehs).all(dim=(1, 2))
    assert (dropped | kept).all() and 0.4 < dropped.float().mean() < 0.6


def test_latent_set_pairs_each_latent_with_a_caption_of_its_class():
    caps = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 3, 2, 2)  # caption value = class index
    z = torch.arange(20.0).view(20, 1, 1, 1).expand(20, 4, 8, 8)
    labels = torch.arange(20) % 10
    x, c = LatentSet(z, labels, caps)(64, torch.Generator().manual_seed(0))
    assert torch.equal(c[:, 0, 0], x[:, 0, 0, 0] % 10)


def test_cosine_learning_rate():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, lr_decay="cosine")
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.5) and learning_rate(cfg, 109) < 1e-3
    assert learning_rate(TrainConfig(steps=10, lr=2.0), 5) == 2.0
    with pytest.raises(ValueError, match="lr_decay"):
        learning_rate(TrainConfig(lr_decay="step"), 0)


# ---- the evaluator and the Fréchet distance -----------------------------------------------------------------
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    d1, d2 = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2
    ref = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(ref, rel=1e-10)
    A = rng.normal(size=(5, 5))
    S = A @ A.T
    assert frechet_distance(mu1[:1].repeat(5), S, mu1[:1].repeat(5), S) == pytest.approx(0, abs=1e-8)
    scipy = pytest.importorskip("scipy.linalg")
    B = rng.normal(size=(5, 5))
    S2 = B @ B.T
    ref = np.trace(S + S2 - 2 * scipy.sqrtm(S @ S2).real)
    assert frechet_distance(np.zeros(5), S, np.zeros(5), S2) == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_of_two_samples_of_one_gaussian_are_close():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, 3, generator=g), torch.randn(20000, 3, generator=g) + torch.tensor([1.0, 0, 0])
    assert frechet_distance(*feature_stats(a), *feature_stats(b)) == pytest.approx(1.0, abs=0.05)


def test_evaluator_net_shapes_augmentation_and_a_clear_error():
    net = EvaluatorNet((8, 16, 16, 16))
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    assert net(x).shape == (6, 10) and net.features(x).shape == (6, 16)
    y = augment(x, torch.Generator().manual_seed(0), translate=2)
    assert y.shape == x.shape
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), translate=0).abs().sum(), x.abs().sum())
    loss = ClassifierLoss()(net, (x, torch.arange(6)), torch.Generator().manual_seed(0))
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        net.features(torch.rand(2, 3, 28, 28))


# ---- the recipe end to end, in the fast profile --------------------------------------------------------------
@pytest.mark.slow
def test_recipe_stages_run_end_to_end_and_the_student_reloads_identically(tmp_path, cifar_archive):
    """autoencoder -> minisd -> lcm through ``minilcm train`` (fast profile), then: the pipeline folder loads with
    diffusers, and the exported student reproduces the in-memory student's LCM samples exactly (fp16 weights)."""
    env = {**os.environ, "MINILCM_PROFILE": "fast", "MINILCM_CIFAR": str(cifar_archive),
           "MINILCM_CACHE": str(ROOT / "data" / "cache"), "OMP_NUM_THREADS": "1"}
    for stage in ("autoencoder", "minisd", "lcm"):
        out = tmp_path / ("lcm" if stage == "lcm" else "sd")
        args = [sys.executable, "-m", "minilcm.cli", "train", stage, "--out", str(out), "--device", "cpu"]
        args += ["--teacher", str(tmp_path / "sd"), "--steps", "3", "--batch", "2"] if stage == "lcm" else []
        r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    lcm_meta = json.loads((tmp_path / "lcm" / "meta.json").read_text())  # --steps / --batch replace the profile's
    assert lcm_meta["overrides"] == {"steps": 3, "batch_size": 2}
    assert lcm_meta["steps"] == 3 and lcm_meta["images_seen"] == 6
    from minilcm.minisd import MiniSD
    from minilcm.zoo import load_lcm_student

    sd = MiniSD.load(tmp_path / "sd")
    assert sd.latent_shape == (4, 8, 8) and sd.meta["stage"] == "minisd"
    student = load_lcm_student(tmp_path / "lcm")
    assert student.net.config.time_cond_proj_dim == 256
    runs = [sd.sample("lcm", 2, labels=[3, 5], w=1.0, student=s, generator=torch.Generator().manual_seed(0))
            for s in (student, load_lcm_student(tmp_path / "lcm"))]
    assert runs[0].shape == (2, 3, 32, 32) and torch.equal(runs[0], runs[1])
    for name in ("ddim", "dpm_solver_pp"):
        assert torch.isfinite(sd.sample(name, 3, labels=[0], w=1.0)).all()
    with pytest.raises(ValueError, match="student"):
        sd.sample("lcm", 2, labels=[0])
    with pytest.raises(ValueError, match="unknown sampler"):
        sd.sample("euler", 2, labels=[0])


def test_missing_checkpoints_name_the_command(tmp_path):
    from minilcm.checkpoints import CheckpointError
    from minilcm.minisd import MiniSD
    from minilcm.zoo import load_lcm_student

    with pytest.raises(CheckpointError, match="minilcm train minisd"):
        MiniSD.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="minilcm train lcm"):
        load_lcm_student(tmp_path / "half")


def test_subset_samples_across_a_class_sorted_set():
    """The JPEG archive is sorted by class: a subset must be random, not the first n rows."""
    from minilcm.datasets import ImageSet

    sorted_set = ImageSet(torch.zeros(1000, 3, 32, 32, dtype=torch.uint8), torch.arange(1000) // 100)
    sub = sorted_set.subset(100)
    assert len(sub) == 100 and len(set(sub.labels.tolist())) == 10
    assert torch.equal(sub.labels, sorted_set.subset(100).labels)  # seeded
    assert len(set(sorted_set.subset(1000).labels.tolist())) == 10 and len(sorted_set.subset(1000)) == 1000
