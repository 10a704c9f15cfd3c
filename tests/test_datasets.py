import gzip
import io
import math
import tarfile
import warnings

import numpy as np
import pytest
import torch

import minilcm.datasets as datasets
from minilcm.datasets import CIFAR10_CLASSES, CifarUnavailable, cifar10, cifar_source
from minilcm.toys import GaussianMixture, OracleEps, swiss_roll, two_moons
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


def test_mixture_class_posterior_is_bayes_by_components():
    """p(c | x) = sum of c's components' pi_k N(x; mu_k, C_k) over all components', with unequal weights, and the
    misassigned mass of a batch is 1 - the mean posterior of the asked classes."""
    gm = GaussianMixture(weights=torch.arange(1, 9, dtype=torch.float64))
    x = 1.5 * torch.randn(5, 2, dtype=torch.float64)
    dens = torch.stack([gm.weights[k] * torch.distributions.MultivariateNormal(gm.means[k], gm.covs[k]).log_prob(x).exp()
                        for k in range(8)], 1)  # (5, 8)
    ref = torch.stack([dens[:, gm.classes == c].sum(1) for c in range(4)], 1) / dens.sum(1, keepdim=True)
    assert torch.allclose(gm.class_posterior(x), ref, atol=1e-10)
    labels = torch.tensor([0, 1, 2, 3, 0])
    assert gm.misassigned_mass(x, labels) == pytest.approx(1 - ref[torch.arange(5), labels].mean().item(), abs=1e-10)


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


# ---- CIFAR-10: where it is found, and every bad input as a short message that names the fix ----------------------
@pytest.mark.slow
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


def _image_folder(root, n_train=3, n_test=2, classes=("cat", "ship")):
    """A tiny CIFAR-10 in ImageFolder layout: train/<class>/*.jpg and test/<class>/*.jpg."""
    from PIL import Image

    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (200, 10 * i, 0)).save(d / f"{i:04d}.jpg")
    return root


def _tiny_archive(path, folder):
    with tarfile.open(path, "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(folder / split, arcname=split)
    return path


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No MINILCM_CIFAR, a fake checkout in tmp_path/work/repo (nothing in its usual places) and its own cache."""
    repo = tmp_path / "work" / "repo"
    (repo / "data").mkdir(parents=True)
    monkeypatch.delenv("MINILCM_CIFAR", raising=False)
    monkeypatch.setenv("MINILCM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_checkout", lambda: repo)
    return repo


def _short_error(exc_info) -> str:
    """The message the CLI prints: at most 3 lines, naming MINILCM_CIFAR."""
    msg = str(exc_info.value)
    assert 1 <= len(msg.strip().splitlines()) <= 3, msg
    assert "MINILCM_CIFAR" in msg and "fix:" in msg, msg
    assert isinstance(exc_info.value, datasets.UserError)
    return msg


def test_cifar_source_order(isolated, tmp_path, monkeypatch):
    """source argument > $MINILCM_CIFAR > ../shared/data archive > data/ archive > the official release in root."""
    repo = isolated
    shared = repo.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    inside = repo / "data" / "cifar10-jpeg.tar.gz"
    root = repo / "data" / "cifar10"
    assert datasets._default_root() == root  # the checkout's data/cifar10, not the cwd's
    monkeypatch.chdir(tmp_path)
    assert cifar_source() is None
    (root / "cifar-10-batches-py").mkdir(parents=True)
    assert cifar_source() == root
    assert cifar_source(root=tmp_path / "elsewhere") is None
    inside.write_bytes(b"x")
    assert cifar_source() == inside
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"x")
    assert cifar_source() == shared
    monkeypatch.setenv("MINILCM_CIFAR", str(tmp_path / "env.tar.gz"))
    assert cifar_source() == tmp_path / "env.tar.gz"  # returned as given, even though it does not exist
    assert cifar_source(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.setenv("MINILCM_CIFAR", "")  # empty = unset
    assert cifar_source() == shared


def test_cifar10_reads_what_cifar_source_finds(isolated, tmp_path, monkeypatch):
    """No variable set, the archive beside the checkout: found and read (this is what `make` relied on)."""
    archive = isolated.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir(parents=True)
    _tiny_archive(archive, _image_folder(tmp_path / "img", n_train=2, n_test=1))
    monkeypatch.chdir(tmp_path)
    assert len(cifar10("train")) == 4 and len(cifar10("test")) == 2
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_missing_cifar_is_a_short_error(isolated, tmp_path):
    with pytest.raises(CifarUnavailable) as e:  # nothing anywhere, download disabled (offline)
        cifar10("test", root=tmp_path / "empty", download=False)
    msg = _short_error(e)
    assert "not found" in msg and str(isolated / "data" / "cifar10-jpeg.tar.gz") in msg and "online" in msg


def test_wrong_path_is_a_short_error(isolated, tmp_path, monkeypatch):
    with pytest.raises(CifarUnavailable) as e:
        cifar10("test", source=tmp_path / "nowhere.tar.gz")
    assert "does not exist" in _short_error(e) and "source=" in str(e.value)
    monkeypatch.setenv("MINILCM_CIFAR", str(tmp_path / "typo.tar.gz"))
    with pytest.raises(CifarUnavailable) as e:
        cifar10("test")
    assert "typo.tar.gz" in _short_error(e) and "unset it" in str(e.value)


def test_corrupt_archive_is_a_short_error(isolated, tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(gzip.compress(b"this is not a tar file" * 100))
    noise = tmp_path / "noise.tar.gz"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    for bad in (junk, noise):
        with pytest.raises(CifarUnavailable) as e:
            cifar10("test", source=bad, cache=False)
        assert "corrupt or truncated" in _short_error(e)


def test_truncated_archive_is_a_short_error(isolated, tmp_path):
    good = _tiny_archive(tmp_path / "good.tar.gz", _image_folder(tmp_path / "img", n_train=20, n_test=5))
    bad = tmp_path / "cifar10-truncated.tar.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CifarUnavailable) as e:
        cifar10("train", source=bad, cache=False)
    assert "corrupt or truncated" in _short_error(e) and "again" in str(e.value)


def test_truncated_real_archive_is_a_short_error(isolated, cifar_archive, tmp_path):
    bad = tmp_path / "cifar10-truncated.tar.gz"
    with open(cifar_archive, "rb") as f:
        bad.write_bytes(f.read(2_000_000))  # the first 2 MB of 20
    with pytest.raises(CifarUnavailable) as e:
        cifar10("train", source=bad, cache=False)
    assert "corrupt or truncated" in _short_error(e)


def test_empty_archive_and_empty_folder_are_short_errors(isolated, tmp_path):
    empty_tar = tmp_path / "empty.tar.gz"
    with tarfile.open(empty_tar, "w:gz") as tf:  # a valid archive, but no train/<class>/*.jpg
        data = b"hello"
        info = tarfile.TarInfo("README.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "empty_dir" / "train").mkdir(parents=True)
    only_train = _image_folder(tmp_path / "only_train", n_test=0)
    for bad, what in ((empty_tar, "train"), (tmp_path / "empty_dir", "train"), (only_train, "test")):
        with pytest.raises(CifarUnavailable) as e:
            cifar10("train", source=bad, cache=False)
        assert f"holds no {what}/<class>/*.jpg" in _short_error(e)


def test_unreadable_image_in_a_folder_is_a_short_error(isolated, tmp_path):
    folder = _image_folder(tmp_path / "img")
    (folder / "train" / "cat" / "0000.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CifarUnavailable) as e:
        cifar10("train", source=folder, cache=False)
    assert "could not be read" in _short_error(e)


def test_extracted_folder_works(isolated, tmp_path):
    ds = cifar10("train", source=_image_folder(tmp_path / "img"), cache=False)
    assert len(ds) == 6 and sorted(set(ds.labels.tolist())) == [CIFAR10_CLASSES.index("cat"), CIFAR10_CLASSES.index("ship")]


def test_corrupt_cache_is_ignored_and_rebuilt(isolated, tmp_path):
    folder = _image_folder(tmp_path / "img")
    first = cifar10("train", source=folder)
    caches = sorted((tmp_path / "cache").glob("*.npz"))
    assert len(caches) == 2  # both splits, written on the first decode
    train_cache = next(p for p in caches if p.name.endswith("-train.npz"))
    for damage in (train_cache.read_bytes()[:100], b"garbage", b""):
        train_cache.write_bytes(damage)
        with pytest.warns(UserWarning, match="rebuilding"):
            again = cifar10("train", source=folder)
        assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the rebuilt cache reads back cleanly
            assert torch.equal(cifar10("train", source=folder).images, first.images)
    np.savez(train_cache, images=np.zeros((3, 32), np.uint8), labels=np.zeros(3))  # a readable file, wrong arrays
    with pytest.warns(UserWarning, match="rebuilding"):
        assert torch.equal(cifar10("train", source=folder).images, first.images)


def test_cache_write_is_atomic(isolated, tmp_path, monkeypatch):
    """A failed write leaves neither a half-written cache nor a temporary file; an OSError is only a warning."""
    folder = _image_folder(tmp_path / "img")
    real_savez = np.savez

    def savez_then_fail(f, **arrays):
        real_savez(f, **arrays)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.np, "savez", savez_then_fail)
    with pytest.warns(UserWarning, match="MINILCM_CACHE"):
        assert len(cifar10("train", source=folder)) == 6  # the data still comes back
    assert list((tmp_path / "cache").iterdir()) == []

    def interrupted(f, **arrays):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cifar10("train", source=folder)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(datasets.np, "savez", real_savez)
    cifar10("train", source=folder)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".npz", ".npz"]
