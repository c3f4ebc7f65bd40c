"""Figures for the notebooks and reports (matplotlib / seaborn). No computation beyond display scaling.

Heat-maps of one batch share one colour scale (batch-level normalisation, as the method scores them);
figures from randomly initialised encoders carry a "(random weights)" mark in their titles.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

import matplotlib

RANDOM_MARK = " (random weights)"
# Our figures use no mathtext, and their texts quote user data (category and file names, also through seaborn
# legends and tick labels): a `$` in a name must show as a dollar sign, not switch on math mode. Set once for
# every figure of a notebook that imports this module.
matplotlib.rcParams["text.parse_math"] = False


def _plt():
    import matplotlib.pyplot as plt

    return plt


def weights_mark(pretrained: bool) -> str:
    return "" if pretrained else RANDOM_MARK


def as_rgb(img, size=None):
    """An image (path or PIL) as an RGB array, optionally resized to size x size."""
    from .data import load_image

    im = load_image(img) if not hasattr(img, "convert") else img.convert("RGB")
    if size is not None:
        im = im.resize((size, size))
    return np.asarray(im)


def show_maps(images: Sequence, maps: np.ndarray, masks: np.ndarray | None = None, titles: Sequence[str] | None = None,
              suptitle: str = "", max_cols: int = 8, cmap: str = "jet"):
    """Images, ground truth and anomaly maps in columns; one colour scale for the whole batch."""
    plt = _plt()
    n = min(len(images), max_cols)
    rows = 3 if masks is not None else 2
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n, 1.9 * rows + 0.4), squeeze=False)
    size = maps.shape[-1]
    for i in range(n):
        rgb = as_rgb(images[i], size)
        axes[0, i].imshow(rgb)
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=8)
        if masks is not None:
            axes[1, i].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        ax = axes[rows - 1, i]
        ax.imshow(rgb)
        im = ax.imshow(maps[i], cmap=cmap, alpha=0.5, vmin=vmin, vmax=vmax)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    labels = ["image", "ground truth", "anomaly map"] if masks is not None else ["image", "anomaly map"]
    for r, lab in enumerate(labels):
        axes[r, 0].set_ylabel(lab, fontsize=9)
    fig.subplots_adjust(right=0.9)
    fig.colorbar(im, cax=fig.add_axes([0.92, 0.15, 0.012, 0.7]), label="score (batch scale)")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def show_patch_maps(images: Sequence, grids: dict[str, np.ndarray], size: int, suptitle: str = "", cmap="magma",
                    shared_scale: bool = True):
    """Rows = named patch-level maps `[N, h, w]` (e.g. operators), columns = images."""
    plt = _plt()
    n = len(images)
    names = list(grids)
    fig, axes = plt.subplots(len(names) + 1, n, figsize=(1.8 * n, 1.8 * (len(names) + 1)), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(as_rgb(images[i], size))
    for r, name in enumerate(names, start=1):
        g = grids[name]
        vmin, vmax = (float(g.min()), float(g.max())) if shared_scale else (None, None)
        for i in range(n):
            axes[r, i].imshow(g[i], cmap=cmap, vmin=vmin, vmax=vmax)
        axes[r, 0].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def show_keep(images: Sequence, keep: np.ndarray, size: int, masks: np.ndarray | None = None, suptitle: str = ""):
    """Overlay of the reference patches the text filter drops (red) on each image; ground truth outlined."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n, 2.2), squeeze=False)
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(as_rgb(images[i], size))
        dropped = np.kron(~keep[i], np.ones((size // keep.shape[1], size // keep.shape[2])))
        overlay = np.zeros((*dropped.shape, 4))
        overlay[..., 0] = 1.0
        overlay[..., 3] = 0.45 * dropped
        ax.imshow(overlay, extent=(0, size, size, 0))
        if masks is not None and masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(f"kept {keep[i].mean():.0%}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def bar_metrics(df, x: str, y: str, hue: str | None = None, title: str = "", ylim=(0, 1)):
    """Seaborn bar chart of one metric."""
    import seaborn as sns

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax)
    ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    if hue:
        ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", title=hue)
    fig.tight_layout()
    return fig


def line_metrics(df, x: str, y: str, hue: str | None = None, title: str = "", logx: bool = False, ylabel=None):
    import seaborn as sns

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    sns.lineplot(data=df, x=x, y=y, hue=hue, marker="o", ax=ax)
    if logx:
        ax.set_xscale("log", base=2)
    if hue:
        ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", title=hue)
    ax.set_title(title, fontsize=10)
    if ylabel:
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig
