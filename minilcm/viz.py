"""Figures: image grids, 2-D scatter plots over density contours, trajectories, curves."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter, ScalarFormatter
import numpy as np
import torch

from .metrics import power_law_order


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """(B, C, H, W) floats in [-1, 1] (or uint8) -> one (H', W', C) uint8 array tiled nrow per row."""
    if x.ndim != 4:
        raise ValueError(f"image_grid expects (B, C, H, W), got {tuple(x.shape)}")
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    B, C, H, W = x.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = torch.full((C, ncol * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    return grid.permute(1, 2, 0).squeeze(-1).numpy()


def show_images(x, nrow=None, title=None, ax=None):
    """Draw an image grid on ``ax`` (a new figure if None); returns the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(image_grid(x, nrow), cmap="gray" if x.shape[1] == 1 else None, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def density_contours(ax, log_prob, lim=3.0, n=200, levels=8, **kw):
    """Filled contours of exp(log_prob) over [-lim, lim]^2 on ``ax``."""
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    Z = log_prob(torch.stack([X.flatten(), Y.flatten()], 1)).exp().reshape(n, n)
    ax.contourf(X.numpy(), Y.numpy(), Z.numpy(), levels=levels, cmap=kw.pop("cmap", "Greys"), alpha=kw.pop("alpha", 0.5))


def _square(ax, lim, title):
    """The 2-D panels' frame: [-lim, lim]^2, equal aspect, an optional title."""
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return ax


def scatter_2d(x, ax=None, labels=None, title=None, log_prob=None, lim=3.0, s=2, **kw):
    """2-D points (coloured by label if given), over density contours if ``log_prob`` is given.

    The points are rasterised (``rasterized=True`` unless given): thousands of markers stay one bitmap when the
    figure is saved as PDF or SVG; in notebooks, ``minilcm.notebook.setup`` keeps the embedded figures small.
    """
    kw.setdefault("rasterized", True)
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    if log_prob is not None:
        density_contours(ax, log_prob, lim)
    x = x.detach().cpu()
    c = None if labels is None else labels.detach().cpu().numpy()
    ax.scatter(x[:, 0], x[:, 1], s=s, c=c, cmap="tab10" if c is not None else None, **kw)
    return _square(ax, lim, title)


def trajectories(traj, ax=None, n: int = 30, lim=3.0, color="C0", title=None, **kw):
    """Paths of 2-D points: ``traj`` is a list of (B, 2) tensors (or a (steps, B, 2) tensor); draws the first n."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    path = torch.stack(list(traj)) if not torch.is_tensor(traj) else traj  # (S, B, 2)
    path = path[:, :n].detach().cpu()
    for i in range(path.shape[1]):
        ax.plot(path[:, i, 0], path[:, i, 1], color=color, lw=0.7, alpha=0.7, **kw)
    ax.scatter(path[0, :, 0], path[0, :, 1], s=6, color="k", label="start")
    ax.scatter(path[-1, :, 0], path[-1, :, 1], s=10, color="C3", label="end")
    return _square(ax, lim, title)


def loss_curve(losses, ax=None, smooth: int = 50, title="training loss"):
    """Raw and moving-average loss against step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3))
    l = np.asarray(losses, dtype=float)
    ax.plot(l, alpha=0.3, lw=0.5)
    if len(l) >= smooth:
        ax.plot(np.arange(smooth - 1, len(l)), np.convolve(l, np.ones(smooth) / smooth, mode="valid"))
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    return ax


def error_vs_nfe(rows, key: str = "err_ref", ax=None, fit_min_nfe: int | None = None, title=None):
    """Log-log plot of a benchmark's ``key`` against NFE, one line per solver (``minilcm.solver_bench`` rows).

    With ``fit_min_nfe`` each solver's fitted power law err ~ NFE^-p (``metrics.power_law_order``, the fit
    of ``solver_bench.convergence_order``, over NFE >= fit_min_nfe) is drawn dashed over the whole NFE range and its
    measured order p is written in the legend.
    Returns {solver: p} (empty without a fit) and the axes.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 4))
    orders = {}
    for i, name in enumerate(dict.fromkeys(r.solver for r in rows)):
        pts = [(r.nfe, getattr(r, key)) for r in rows if r.solver == name and getattr(r, key) is not None]
        nfe, err = np.array(pts, dtype=float).T
        label = name
        if fit_min_nfe is not None and (nfe >= fit_min_nfe).sum() >= 2:
            tail = nfe >= fit_min_nfe
            p = orders[name] = power_law_order(nfe[tail], err[tail])
            c = np.exp(np.mean(np.log(err[tail]) + p * np.log(nfe[tail])))  # least-squares intercept
            ax.plot(nfe, c * nfe ** -p, "--", color=f"C{i}", lw=1.2, alpha=0.7, zorder=3)  # extended to all NFE
            label = f"{name}: slope -{p:.2f}"
        ax.plot(nfe, err, "o-", color=f"C{i}", ms=4, label=label)
    ax.set(xscale="log", yscale="log", xlabel="NFE (model evaluations)", ylabel=key)
    lo, hi = min(r.nfe for r in rows), max(r.nfe for r in rows)
    ax.set_xticks([n for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo / 1.5 <= n <= hi * 1.5])
    ax.xaxis.set_major_formatter(ScalarFormatter())  # plain numbers: 5, 10, 20, 50
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return orders, ax
