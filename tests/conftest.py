import json
import os
from pathlib import Path

import numpy as np

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def record_message(err: str) -> None:
    """With MINILCM_RECORD_MESSAGES=FILE, append {case, stderr} as a JSON line: the list of bad inputs and their
    messages, for a maintainer to read (pytest tests/test_bad_inputs.py tests/test_sd.py)."""
    f = os.environ.get("MINILCM_RECORD_MESSAGES")
    if f:
        case = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]  # drop " (call)"
        with open(f, "a") as fh:
            fh.write(json.dumps({"case": case, "stderr": err.strip()}) + "\n")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests use tiny tensors (2-D points, (B, K, 2, 2) covariances, small UNets): one thread avoids the thread
    pool's overhead, which is 10-50x on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    """The offline CIFAR-10 source, found by the package's one rule (``minilcm.datasets.cifar_source``)."""
    from minilcm.datasets import cifar_source

    p = cifar_source()
    if p is None or not Path(p).exists():
        pytest.fail(f"the CIFAR-10 archive is needed for this test: set MINILCM_CIFAR (looked at {p or SHARED_CIFAR})")
    return Path(p)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tiny random models of every kind, saved as the shipped ones are: {"sd", "lcm", "ev", "ddpm", "cd", "unc"}."""
    from minilcm import checkpoints
    from minilcm.consistency import CMScalings, ConsistencyModel
    from minilcm.evaluator import REFERENCE_STATS, EvaluatorNet, feature_stats, features
    from minilcm.lcm import lcm_student
    from minilcm.models import cifar_unet
    from minilcm.models.sd import tiny_sd_pipeline
    from minilcm.schedules import Schedule

    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(d / "sd")
    student = lcm_student(pipe.unet, Schedule("scaled_linear"), w_dim=256)
    student.net.save_pretrained(str(d / "lcm" / "unet"))
    (d / "lcm" / "meta.json").write_text(json.dumps({"stage": "lcm", "teacher": str(d / "sd")}))
    ev = EvaluatorNet((8, 16, 16, 16)).eval()
    checkpoints.save_model(ev, d / "ev")
    ref = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    mu, sigma = feature_stats(features(ev, ref))
    np.savez(d / "ev" / REFERENCE_STATS, mu=mu, sigma=sigma)
    checkpoints.save_model(cifar_unet("tiny", num_classes=10), d / "ddpm", schedule="linear")
    checkpoints.save_model(ConsistencyModel(cifar_unet("tiny", num_classes=10), Schedule("linear"), CMScalings(0.5)),
                           d / "cd")
    checkpoints.save_model(cifar_unet("tiny"), d / "unc")
    return {k: str(d / k) for k in ("sd", "lcm", "ev", "ddpm", "cd", "unc")}
