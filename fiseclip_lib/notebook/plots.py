"""Figures for the notebooks and reports (matplotlib / seaborn). No computation beyond display scaling.

Conventions every figure follows, so that a reader can read it: every map grid has a colour bar (one scale per
row, or per batch where the method compares a batch on one scale) and row and column labels; metrics are
fractions in [0, 1] everywhere and the axes say so; counts get integer ticks; lines of a comparison differ in
colour, marker and dash, so equal results stay visible; patch-level maps are drawn over the image extent, so
they overlay the image they belong to at any resolution; figures from randomly initialised encoders carry a
"(random weights)" mark in their titles (`weights_mark`).

Names are data: a `$` in a category or file name must show as a dollar sign, not start mathtext. That is settled
per text object (`literal_text`: titles, axis labels, legends, colour-bar labels, and tick labels made from names
get `parse_math=False` or an escaping formatter), never by a global switch: importing this module changes no
matplotlib setting, so numeric tick formatters (a log axis' $2^{2}$) keep their mathtext.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RANDOM_MARK = " (random weights)"
FRACTION = " (fraction, 0-1)"


def _plt():
    import matplotlib.pyplot as plt

    return plt


def is_random_source(source) -> bool:
    """Whether one source of numbers is a randomly initialised encoder.

    Args:
        source: a bool (the `pretrained` flag), an encoder (its `.pretrained`), an `workbench.encoder_record`
            dict, or a str (a label such as "SIMULATED text map": not an encoder, so not random weights).
    Returns:
        True for random weights.
    """
    if isinstance(source, (bool, np.bool_)):
        return not bool(source)
    if isinstance(source, str):
        return False
    if isinstance(source, dict):
        return source.get("kind") != "simulated" and source.get("pretrained") is False
    return not bool(getattr(source, "pretrained", True))


def weights_mark(*sources) -> str:
    """The tag for a figure title or table caption: " (random weights)" when any of the numbers it shows come
    from a randomly initialised encoder, else "".

    Args:
        sources: what the figure's numbers come from: `pretrained` flags, encoders, `encoder_record` dicts or
            labels (see `is_random_source`); `weights_mark(encoder.pretrained)` and `weights_mark(cnn, clip)` both
            work.
    Returns:
        RANDOM_MARK or "".
    """
    return RANDOM_MARK if any(is_random_source(s) for s in sources) else ""


def tex_escape(text) -> str:
    """A name as matplotlib text that shows literally also where mathtext is on (`$` -> `\\$`)."""
    return str(text).replace("$", "\\$")


def _text_objects(fig):
    """The text objects of `fig` whose content we or seaborn set from names (not from numeric tick formatters)."""
    texts = [t for t in (getattr(fig, "_suptitle", None), getattr(fig, "_supxlabel", None),
                         getattr(fig, "_supylabel", None)) if t is not None]
    texts += list(fig.texts)
    for leg in fig.legends:
        texts += [*leg.get_texts(), leg.get_title()]
    for ax in fig.axes:
        texts += [ax.title, getattr(ax, "_left_title", None), getattr(ax, "_right_title", None),
                  ax.xaxis.label, ax.yaxis.label, *ax.texts]
        leg = ax.get_legend()
        if leg is not None:
            texts += [*leg.get_texts(), leg.get_title()]
    return [t for t in texts if t is not None]


def literal_text(fig):
    """Make every name-bearing text of `fig` literal: titles, axis and colour-bar labels, legends and free texts
    get `parse_math=False`; an axis whose tick labels are category names gets a formatter that escapes `$`.
    Numeric tick labels keep their mathtext (a log axis shows 2², not raw TeX). Call it after the figure is
    complete (the figure functions here do); returns `fig`.

    Args:
        fig: a matplotlib Figure.
    Returns:
        The same figure.
    """
    from matplotlib.category import StrCategoryFormatter
    from matplotlib.ticker import FixedFormatter, FuncFormatter

    for t in _text_objects(fig):
        t.set_parse_math(False)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            fmt = axis.get_major_formatter()
            if isinstance(fmt, (StrCategoryFormatter, FixedFormatter)):
                axis.set_major_formatter(FuncFormatter(lambda x, pos, f=fmt: tex_escape(f(x, pos))))
    return fig


def figure_texts(fig) -> list[dict]:
    """Every text a reader sees on `fig`, as drawn: titles, axis labels, tick labels, legends, colour bars.

    Args:
        fig: a matplotlib Figure (laid out here without rendering pixels, so tick labels are current).
    Returns:
        [{"text": the string as matplotlib draws it, "math": whether it is typeset as mathtext}]; a text that is
        not math but holds TeX markup shows that markup raw (`report_checks.tex_leaks`).
    """
    from matplotlib.text import Text

    fig.draw_without_rendering()
    all_ticks, drawn = set(), set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.majorTicks + axis.minorTicks:
                all_ticks.update((id(tick.label1), id(tick.label2)))
            try:
                shown_ticks = axis._update_ticks()  # the ticks that are drawn (others keep stale labels)
            except AttributeError:  # pragma: no cover - a future matplotlib: count every tick label
                shown_ticks = axis.majorTicks + axis.minorTicks
            drawn.update(id(t) for tick in shown_ticks for t in (tick.label1, tick.label2))
    seen, out = set(), []
    for t in fig.findobj(Text):
        if id(t) in seen or not t.get_visible() or not t.get_text() or (id(t) in all_ticks and id(t) not in drawn):
            continue
        seen.add(id(t))
        shown, math = t._preprocess_math(t.get_text())  # what Text.draw renders
        out.append({"text": shown, "math": bool(math)})
    return out


def as_rgb(img, size=None):
    """An image (path or PIL) as an RGB array, optionally resized to size x size."""
    from fiseclip_lib.plumbing.images import load_image

    im = load_image(img) if not hasattr(img, "convert") else img.convert("RGB")
    if size is not None:
        im = im.resize((size, size))
    return np.asarray(im)


def _clean(ax):
    ax.set_xticks([]), ax.set_yticks([])


def show_maps(images: Sequence, maps: np.ndarray, masks: np.ndarray | None = None, titles: Sequence[str] | None = None,
              suptitle: str = "", max_cols: int = 8, cmap: str = "jet", label: str = "anomaly score (batch scale)"):
    """Images, ground truth and anomaly maps in columns; one colour scale for the whole batch (a colour bar).

    Args:
        images: paths or PIL images, shown at the maps' size so that the maps overlay them.
        maps: `[N, S, S]` anomaly maps; masks: `[N, S, S]` bool or None; titles: a column label per image.
    """
    plt = _plt()
    n = min(len(images), max_cols)
    rows = 3 if masks is not None else 2
    vmin, vmax = float(np.min(maps[:n])), float(np.max(maps[:n]))
    fig, axes = plt.subplots(rows, n, figsize=(1.8 * n + 1.2, 1.8 * rows + 0.6), squeeze=False, layout="constrained")
    size = maps.shape[-1]
    for i in range(n):
        rgb = as_rgb(images[i], size)
        axes[0, i].imshow(rgb)
        if titles is not None:
            axes[0, i].set_title(str(titles[i]), fontsize=8)
        if masks is not None:
            axes[1, i].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
        ax = axes[rows - 1, i]
        ax.imshow(rgb)
        im = ax.imshow(maps[i], cmap=cmap, alpha=0.5, vmin=vmin, vmax=vmax)
    for ax in axes.flat:
        _clean(ax)
    labels = ["image", "ground truth", "anomaly map"] if masks is not None else ["image", "anomaly map"]
    for r, lab in enumerate(labels):
        axes[r, 0].set_ylabel(lab, fontsize=9)
    cb = fig.colorbar(im, ax=axes[rows - 1, :].tolist(), shrink=0.9, aspect=10)
    cb.set_label(label, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return literal_text(fig)


def show_patch_maps(images: Sequence, grids: dict[str, np.ndarray], size: int, suptitle: str = "", cmap="magma",
                    shared_scale: bool = True, titles: Sequence[str] | None = None, overlay: bool = False,
                    label: str = "value"):
    """Rows = named patch-level maps `[N, h, w]` (e.g. operators), columns = images; a colour bar per row.

    Args:
        size: the image side in pixels; maps are drawn over the same extent so that they line up with the image.
        shared_scale: one colour scale per row (else per map; the colour bar then shows the last map's scale).
        titles: a column label per image. overlay: draw each map semi-transparently over its image.
        label: what the values are (colour bar label).
    """
    plt = _plt()
    n = len(images)
    names = list(grids)
    fig, axes = plt.subplots(len(names) + 1, n, figsize=(1.7 * n + 1.4, 1.7 * (len(names) + 1) + 0.5),
                             squeeze=False, layout="constrained")
    rgbs = [as_rgb(images[i], size) for i in range(n)]
    for i in range(n):
        axes[0, i].imshow(rgbs[i])
        if titles is not None:
            axes[0, i].set_title(str(titles[i]), fontsize=8)
    axes[0, 0].set_ylabel("image", fontsize=9)
    ext = (0, size, size, 0)
    for r, name in enumerate(names, start=1):
        g = np.asarray(grids[name])
        vmin, vmax = (float(g.min()), float(g.max())) if shared_scale else (None, None)
        for i in range(n):
            if overlay:
                axes[r, i].imshow(rgbs[i])
            im = axes[r, i].imshow(g[i], cmap=cmap, vmin=vmin, vmax=vmax, extent=ext, alpha=0.6 if overlay else 1.0,
                                   interpolation="nearest")
        axes[r, 0].set_ylabel(name, fontsize=9)
        cb = fig.colorbar(im, ax=axes[r, :].tolist(), shrink=0.9, aspect=8)
        cb.set_label(label, fontsize=7)
    for ax in axes.flat:
        _clean(ax)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return literal_text(fig)


def show_attention(image, size: int, grid: tuple[int, int], patches: dict[str, tuple[int, int]],
                   maps: dict[str, dict[str, np.ndarray]], suptitle: str = "", cmap: str = "viridis"):
    """Where chosen patches attend: a row per patch (its box on the image, then one attention map per operator).
    Each map is shown relative to its own maximum (identity attention puts 1 on one patch and would otherwise
    leave every other operator black); the maximum is written under each map.

    Args:
        patches: row label -> (row, col) of the patch in the grid.
        maps: row label -> {operator: `[h, w]` attention weights of that patch (summing to 1)}.
    """
    plt = _plt()
    ops = list(next(iter(maps.values())))
    fig, axes = plt.subplots(len(patches), len(ops) + 1, figsize=(1.9 * (len(ops) + 1) + 1.2, 2.0 * len(patches) + 0.5),
                             squeeze=False, layout="constrained")
    rgb = as_rgb(image, size)
    step = size / grid[1]
    for r, (name, (y, x)) in enumerate(patches.items()):
        axes[r, 0].imshow(rgb)
        axes[r, 0].add_patch(plt.Rectangle((x * step, y * step), step, step, fill=False, color="lime", lw=2))
        axes[r, 0].set_ylabel(f"{name}\n(row {y}, col {x})", fontsize=9)
        for c, op in enumerate(ops, start=1):
            a = np.asarray(maps[name][op], dtype=float)
            peak = float(a.max()) if a.size else 0.0
            im = axes[r, c].imshow(a / peak if peak > 0 else a, cmap=cmap, vmin=0, vmax=1, extent=(0, size, size, 0))
            axes[r, c].set_xlabel(f"max {peak:.3f}", fontsize=7)
            if r == 0:
                axes[r, c].set_title(op, fontsize=9)
        cb = fig.colorbar(im, ax=axes[r, :].tolist(), shrink=0.9, aspect=8)
        cb.set_label("attention / map max", fontsize=7)
    for ax in axes.flat:
        _clean(ax)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return literal_text(fig)


def show_keep(images: Sequence, keep: np.ndarray, size: int, masks: np.ndarray | None = None, suptitle: str = "",
              titles: Sequence[str] | None = None):
    """Overlay of the reference patches the filter drops (red) on each image; ground truth outlined in cyan;
    each title gives the kept fraction of that image's patches."""
    plt = _plt()
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.8 * n, 2.5), squeeze=False, layout="constrained")
    for i in range(n):
        ax = axes[0, i]
        ax.imshow(as_rgb(images[i], size))
        overlay = np.zeros((*keep.shape[1:], 4))
        overlay[..., 0] = 1.0
        overlay[..., 3] = 0.45 * (~keep[i].astype(bool))
        ax.imshow(overlay, extent=(0, size, size, 0), interpolation="nearest")
        if masks is not None and masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="cyan", linewidths=0.8)
        head = f"{titles[i]}\n" if titles is not None else ""
        ax.set_title(f"{head}kept {keep[i].mean():.2f}", fontsize=8)
        _clean(ax)
    if suptitle:
        fig.suptitle(suptitle + "\nred: dropped reference patches; cyan: ground truth", fontsize=9)
    return literal_text(fig)


def _metric_label(name: str) -> str:
    return name + (FRACTION if any(k in name for k in ("auroc", "aupro", "_ap", "f1", "share", "fraction")) else "")


def bar_metrics(df, x: str, y: str, hue: str | None = None, title: str = "", ylim=(0, 1), ylabel: str | None = None):
    """Seaborn bar chart of one metric (metrics are fractions in [0, 1])."""
    import seaborn as sns

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.2), layout="constrained")
    sns.barplot(data=df, x=x, y=y, hue=hue, ax=ax)
    ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel or _metric_label(y))
    if hue:
        ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", title=hue)
    return literal_text(fig)


def line_metrics(df, x: str, y: str, hue: str | None = None, title: str = "", logx: bool = False, ylabel=None,
                 xlabel=None, integer_x: bool = False, ylim=None):
    """Lines of one metric per `hue`; each line has its own marker and dash so that equal lines stay visible."""
    import seaborn as sns
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.2), layout="constrained")
    sns.lineplot(data=df, x=x, y=y, hue=hue, style=hue, markers=True, dashes=True, markersize=7, alpha=0.85,
                 linewidth=1.6, ax=ax)
    if logx:
        ax.set_xscale("log", base=2)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if hue:
        ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left", title=hue)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel or _metric_label(y))
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylim:
        ax.set_ylim(*ylim)
    return literal_text(fig)


def show_reference_distances(panels: dict[str, tuple[np.ndarray, np.ndarray]], k: int, suptitle: str = ""):
    """Per-reference nearest-patch distances of chosen patches, sorted; the K smallest (the interval) shaded.

    Args:
        panels: title -> (distances to each other image `[N-1]`, is that reference anomalous `[N-1]` bool).
        k: the interval count K.
    """
    plt = _plt()
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, (name, (dist, bad)) in zip(axes[0], panels.items()):
        order = np.argsort(dist)
        ax.bar(np.arange(1, len(order) + 1), dist[order],
               color=["tab:red" if bad[j] else "tab:blue" for j in order])
        ax.axvspan(0.5, k + 0.5, color="gold", alpha=0.3)
        score = float(dist[order][:k].mean())
        ax.axhline(score, color="k", ls="--")
        ax.set_title(f"{name}: score {score:.3f}", fontsize=9)
        ax.set_xlabel("reference rank (1 = nearest)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].set_ylabel("nearest-patch distance")
    handles = [Patch(color="tab:blue", label="normal reference"), Patch(color="tab:red", label="anomalous reference"),
               Patch(color="gold", alpha=0.3, label=f"interval: the K={k} nearest"),
               plt.Line2D([], [], color="k", ls="--", label="score = mean over the interval")]
    axes[0, -1].legend(handles=handles, fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return literal_text(fig)
