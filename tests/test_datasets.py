import gzip
import math
import shutil

import pytest
import torch

from minilcm.datasets import (CIFAR10_CLASSES, CifarUnavailable, GaussianMixture, OracleEps, cifar10, swiss_roll,
                              two_moons)
from minilcm.schedules import Schedule


def _reference_log_prob(gm, x, t, s, cls=None):
    """p_t by torch.distributions, one component at a time: independent of the package's vectorised maths."""
    out = []
    for xi, ti in zip(x, t):
        a2 = s.alpha_bar(ti).double()
        terms = []
        for k in range(len(gm.weights)):
            if cls is not None and gm.classes[k] != cls:
                continue
            w = gm.weights[k] / (gm.weights[gm.classes == cls].sum() if cls is not None else 1)
            mvn = torch.distributions.MultivariateNormal(a2.sqrt() * gm.means[k],
                                                         a2 * gm.covs[k] + (1 - a2) * torch.eye(2, dtype=torch.float64))
            terms.append(w.log() + mvn.log_prob(xi))
        out.append(torch.logsumexp(torch.stack(terms), 0))
    return torch.stack(out)


def test_mixture_log_prob_matches_torch_distributions():
    gm, s = GaussianMixture(), Schedule()
    x = 2 * torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 3.5, 100.0, 420.25, 800.0, 999.0], dtype=torch.float64)
    assert torch.allclose(gm.log_prob(x, t, s), _reference_log_prob(gm, x, t, s), atol=1e-10)
    labels = torch.tensor([2] * 6)
    assert torch.allclose(gm.log_prob(x, t, s, class_labels=labels), _reference_log_prob(gm, x, t, s, cls=2), atol=1e-10)


@pytest.mark.parametrize("conditional", [False, True])
def test_mixture_score_is_autograd_of_log_density(conditional):
    gm, s = GaussianMixture(), Schedule()
    x = 2 * torch.randn(8, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 10.0, 77.7, 300.0, 500.0, 900.0, 999.0], dtype=torch.float64)
    labels = torch.arange(8) % gm.num_classes if conditional else None
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gm.log_prob(xr, t, s, class_labels=labels).sum(), xr)
    assert torch.allclose(g, gm.score(x, t, s, class_labels=labels), atol=1e-9)
    # and at the data distribution itself (t=None)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(gm.log_prob(xr).sum(), xr)
    assert torch.allclose(g, gm.score(x), atol=1e-9)


def test_oracle_eps_is_minus_sigma_score_and_handles_the_null_class():
    gm, s = GaussianMixture(), Schedule()
    oracle = OracleEps(gm, s)
    x, t = torch.randn(4, 2), torch.tensor([5.0, 50.0, 500.0, 999.0])
    expect = -s.sigma(t).reshape(-1, 1) * gm.score(x, t, s)
    assert torch.allclose(oracle(x, t).double(), expect, atol=1e-6)
    labels = torch.tensor([0, gm.num_classes, 3, gm.num_classes])  # null class = unconditional
    out = oracle(x, t, class_labels=labels)
    assert torch.allclose(out[1], oracle(x, t)[1]) and torch.allclose(out[3], oracle(x, t)[3])
    assert not torch.allclose(out[0], oracle(x, t)[0])
    # at t = 999 the marginal is almost N(0, I), so eps ~ x
    assert torch.allclose(oracle(x, torch.full((4,), 999.0)), x, atol=1e-2)


def test_mixture_samples_have_the_exact_moments():
    gm = GaussianMixture()
    x, y = gm.sample(200_000, torch.Generator().manual_seed(0))
    m, c = gm.mean_cov()
    assert torch.allclose(x.double().mean(0), m, atol=0.02)
    assert torch.allclose(torch.cov(x.double().T), c, atol=0.03)
    assert set(y.tolist()) == set(range(gm.num_classes))
    xc, yc = gm.sample(1000, class_label=2)
    assert (yc == 2).all()


@pytest.mark.parametrize("toy", [two_moons, swiss_roll])
def test_toys_are_about_unit_scale(toy):
    x, y = toy(20_000, torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 2) and y.shape == (20_000,)
    assert x.mean(0).abs().max() < 0.3 and 0.4 < x.std(0).min() and x.std(0).max() < 1.6


def test_shared_archive_loads_as_cifar10(cifar_archive):
    train, test = cifar10("train", source=cifar_archive), cifar10("test", source=cifar_archive)
    assert len(train) == 50_000 and len(test) == 10_000
    assert train.images.shape == (50_000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert train.classes == CIFAR10_CLASSES
    x, y = test[torch.arange(500)]
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert x.min() < -0.95 and x.max() > 0.95  # really scaled to [-1, 1], not [0, 1]


def test_truncated_archive_gives_the_clear_error(cifar_archive, tmp_path):
    bad = tmp_path / "cifar10-truncated.tar.gz"
    with open(cifar_archive, "rb") as f:
        bad.write_bytes(f.read(2_000_000))  # the first 2 MB of 20
    with pytest.raises(CifarUnavailable) as e:
        cifar10("train", source=bad, cache=False)
    msg = str(e.value)
    assert "corrupt or truncated" in msg and "MINILCM_CIFAR" in msg and "download" in msg


def test_not_an_archive_and_missing_sources_give_the_clear_error(tmp_path, monkeypatch):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(gzip.compress(b"this is not a tar file" * 100))
    with pytest.raises(CifarUnavailable, match="MINILCM_CIFAR"):
        cifar10("test", source=junk, cache=False)
    with pytest.raises(CifarUnavailable, match="does not exist"):
        cifar10("test", source=tmp_path / "nowhere.tar.gz")
    monkeypatch.delenv("MINILCM_CIFAR", raising=False)
    with pytest.raises(CifarUnavailable) as e:  # no archive and no official copy, download disabled (offline)
        cifar10("test", root=tmp_path / "empty", download=False)
    assert "MINILCM_CIFAR" in str(e.value) and "torchvision" in str(e.value)


def test_extracted_folder_works(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for c in ("cat", "ship"):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (200, 10 * i, 0)).save(d / f"{i:04d}.jpg")
    ds = cifar10("train", source=tmp_path, cache=False)
    assert len(ds) == 6 and sorted(set(ds.labels.tolist())) == [CIFAR10_CLASSES.index("cat"), CIFAR10_CLASSES.index("ship")]
