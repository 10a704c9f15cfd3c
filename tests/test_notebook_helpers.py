"""The notebooks' helpers: the one preamble (``minilcm.notebook.setup``) and the FD-clf of a sampler held in a
notebook (``evaluator.sampler_fd``)."""
import matplotlib
import numpy as np
import torch

from minilcm.evaluator import sampler_fd
from minilcm.notebook import FIGURE_DPI, setup


def test_setup_seeds_threads_and_compact_figures(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MINILCM_PROFILE", "fast")
        assert setup(seed=3, verbose=False) == "fast"
        assert torch.get_num_threads() == 1  # the fast profile (CI's shared cores): one thread
        a = torch.rand(3)
        setup(seed=3, threads=2, verbose=False)
        assert torch.get_num_threads() == 2 and torch.equal(a, torch.rand(3))  # seeded again: the same draw
        assert matplotlib.rcParams["figure.dpi"] == FIGURE_DPI and matplotlib.rcParams["savefig.bbox"] == "tight"
        monkeypatch.setenv("MINILCM_PROFILE", "cpu")
        assert setup(seed=None, verbose=False) == "cpu"
    finally:
        torch.set_num_threads(before)


def test_sampler_fd_batches_clamps_and_measures_everything():
    class Ev:  # stands in for an Evaluator: records what it was asked to measure
        def fd(self, images):
            self.seen = images
            return float(images.sum())

    calls = []

    def sample(z):
        calls.append(len(z))
        return 3 * z.double()  # out of [-1, 1] and float64: sampler_fd clamps and casts

    ev, noise = Ev(), torch.randn(10, 2, generator=torch.Generator().manual_seed(0))
    value = sampler_fd(ev, sample, noise, batch=4)
    assert calls == [4, 4, 2] and ev.seen.dtype == torch.float32 and ev.seen.shape == (10, 2)
    assert np.isclose(value, (3 * noise).clamp(-1, 1).sum().item())
