import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


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
    """The offline CIFAR-10 archive: $MINILCM_CIFAR, else ../shared/data/cifar10-jpeg.tar.gz."""
    p = Path(os.environ.get("MINILCM_CIFAR", SHARED_CIFAR))
    if not p.exists():
        pytest.fail(f"the CIFAR-10 archive is needed for this test: set MINILCM_CIFAR (looked at {p})")
    return p
