"""The one preamble of the course's notebooks:

    from minilcm.notebook import setup   # import it before the other minilcm modules (see "warnings" below)
    PROFILE = setup()                     # prints and returns the profile: fast | cpu | gpu

``setup`` does what every chapter needs before its first cell of work:

* **threads**: ``threads=None`` keeps torch's default, except in the ``fast`` profile (CI, whose few cores are shared)
  where one thread is fastest for the course's small tensors; an int sets that many.
* **warnings**: tqdm's "IProgress not found" (no ipywidgets: tqdm draws text bars) is silenced. tqdm warns when
  ``tqdm.auto`` is first imported, so the filter is installed when this module is imported. With
  ``quiet_hf_libraries=True`` also the warnings, log messages and progress bars of diffusers, transformers and
  huggingface_hub are silenced (Chapter 6's tiny test models make them chatty).
* **seeds**: torch's, numpy's and Python's global generators are seeded (``seed=None`` leaves them alone); the
  notebooks still pass explicit ``torch.Generator`` objects wherever a number is quoted.
* **figures**, so that committed notebooks stay small (under 400 KB each): figures render at ``dpi`` (60 dots per
  inch: a 16-inch-wide row of panels is 960 pixels) with a tight bounding box, and Jupyter's inline backend embeds
  them as JPEG (quality ``JPEG_QUALITY``, optimized, progressive) instead of PNG. A PNG of a scatter plot over
  filled contours or of a grid of noisy images hardly compresses (350 KB for one wide figure at matplotlib's
  default 100 dpi); the JPEG at 60 dpi is 5-8 times smaller and stays legible. A figure made with an explicit
  ``dpi=`` keeps it. Outside Jupyter only the matplotlib settings apply.
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import torch

from . import profiles

FIGURE_DPI = 60
JPEG_QUALITY = 75
HF_LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate")
TQDM_NO_WIDGETS = "IProgress not found"  # tqdm.auto warns on import when ipywidgets is missing

warnings.filterwarnings("ignore", message=TQDM_NO_WIDGETS)  # on import: before anything imports tqdm.auto


def compact_figures(dpi: int = FIGURE_DPI, fmt: str = "jpeg", jpeg_quality: int = JPEG_QUALITY) -> bool:
    """Render figures at ``dpi`` with a tight bounding box and, under Jupyter's inline backend, embed them as
    ``fmt`` ("jpeg" or "png"). Returns whether the inline backend was configured (False outside Jupyter)."""
    import matplotlib
    import matplotlib.pyplot as plt  # noqa: F401  (loads the backend first: the inline one sets its formats on load)

    matplotlib.rcParams.update({"figure.dpi": dpi, "savefig.dpi": "figure", "savefig.bbox": "tight"})
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or "inline" not in matplotlib.get_backend():
        return False
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    # optimize (Huffman tables fitted to the image) and progressive: about 10% smaller, the same pixels
    kw = {"pil_kwargs": {"quality": int(jpeg_quality), "optimize": True, "progressive": True}} \
        if fmt in ("jpeg", "jpg") else {}
    set_matplotlib_formats(fmt, bbox_inches="tight", **kw)
    return True


def quiet_hf() -> None:
    """Silence diffusers / transformers / huggingface_hub: warnings, log messages below errors, progress bars."""
    import importlib

    for lib in HF_LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{lib}(\.|$)")
    for lib in ("diffusers", "transformers"):
        try:
            logging = importlib.import_module(f"{lib}.utils.logging")
        except ImportError:
            continue
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except ImportError:
        pass


def setup(seed: int | None = 0, threads: int | None = None, *, dpi: int = FIGURE_DPI, fmt: str = "jpeg",
          quiet_hf_libraries: bool = False, verbose: bool = True) -> str:
    """Prepare a notebook (threads, warning filters, seeds, compact figures; see the module docstring) and return
    the active profile (``minilcm.profiles.current()``), printed unless ``verbose=False``."""
    profile = profiles.current()
    warnings.filterwarnings("ignore", message=TQDM_NO_WIDGETS)
    if threads is None and profile == "fast":
        threads = 1
    if threads is not None:
        torch.set_num_threads(int(threads))
    if seed is not None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
    compact_figures(dpi, fmt)
    if quiet_hf_libraries:
        quiet_hf()
    if verbose:
        print("profile:", profile)
    return profile
