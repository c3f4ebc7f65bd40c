"""Evaluation metrics with the field's conventions (METHOD.md, "Evaluation conventions").

Image level: AUROC, AP (step-wise average precision, as sklearn), F1-max (max of 2PR/(P+R) over the PR curve,
non-finite values ignored). Pixel level: the same over all pixels of a category, plus AU-PRO (per connected
region overlap, integrated up to FPR 0.3 and normalised by 0.3).

All curves come from one sort of the scores, in float32, so that hundreds of 518x518 maps fit in memory.
One-class input gives NaN with a warning instead of an exception.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

NAN_METRICS_IMAGE = {"auroc": float("nan"), "ap": float("nan"), "f1_max": float("nan")}


def _binary_curve(labels: np.ndarray, scores: np.ndarray, dtype=np.float32):
    """True/false positive counts at each distinct threshold, thresholds descending (as sklearn's); scores are
    compared in `dtype` (float32 for maps: half the memory of millions of pixels)."""
    scores = np.asarray(scores, dtype=dtype).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in size")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    tps = np.cumsum(labels[order], dtype=np.int64)
    del order
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = tps[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def _curve_metrics(labels, scores, what: str) -> dict:
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        warnings.warn(f"{what}: only one class present ({'all normal' if n_pos == 0 else 'all anomalous'}); "
                      f"AUROC, AP and F1-max are undefined (NaN)")
        return dict(NAN_METRICS_IMAGE)
    tps, fps = _binary_curve(labels, scores)
    n_neg = labels.size - n_pos
    area = _roc_area(tps, fps, n_pos, n_neg)
    precision = tps / (tps + fps)
    recall = tps / n_pos
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]
    return {"auroc": area, "ap": ap, "f1_max": float(f1.max()) if f1.size else 0.0}


def _roc_area(tps, fps, n_pos: int, n_neg: int) -> float:
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def auroc(labels, scores) -> float:
    """Area under the ROC curve (ties count half), NaN without a warning when only one class is present (for
    studies that compute many of them).

    Example:
        >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        return float("nan")
    tps, fps = _binary_curve(labels, scores, np.float64)
    return _roc_area(tps, fps, n_pos, labels.size - n_pos)


def image_metrics(labels, scores) -> dict:
    """labels (0/1) and scores per image -> {"auroc", "ap", "f1_max"} as floats in [0, 1] (NaN if one class)."""
    return _curve_metrics(labels, scores, "image metrics")


def aupro(masks, maps, max_fpr: float = 0.3, num_thresholds: int = 1000) -> float:
    """Area under the per-region-overlap curve up to `max_fpr`, normalised by `max_fpr` (in [0, 1]).

    Thresholds are placed at the normal-pixel quantiles for `num_thresholds` FPR targets in [0, max_fpr]
    plus the lowest score, each also just above itself, and each FPR is then computed exactly; the curve is integrated by trapezoids
    with linear interpolation at `max_fpr`. Connected regions use 4-connectivity (scipy's default).
    Memory: one sorted float32 copy of the normal pixels plus one image at a time.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    if masks.ndim == 2:
        masks, maps = masks[None], maps[None]
    normal = np.sort(maps[~masks].astype(np.float32, copy=False))
    if normal.size == 0 or not masks.any():
        warnings.warn("AU-PRO: needs both defect regions and normal pixels; NaN")
        return float("nan")
    n = normal.size
    targets = np.linspace(0.0, max_fpr, num_thresholds)
    idx = np.clip(n - 1 - np.floor(targets * n).astype(np.int64), 0, n - 1)
    base = np.unique(np.r_[normal[idx], normal[0]])
    # Just above each normal value the FPR is that of the next value but the overlap can be higher (defect
    # pixels in between): evaluating both sides makes the curve exact between consecutive normal values.
    thresholds = np.unique(np.r_[base, np.nextafter(base, np.float32(np.inf))])  # ascending
    # A pixel is positive when score >= threshold; one more threshold above everything gives (0, 0).
    fpr = (n - np.searchsorted(normal, thresholds, side="left")) / n
    overlap_sum = np.zeros_like(thresholds, dtype=np.float64)
    regions = 0
    for m, a in zip(masks, maps):
        if not m.any():
            continue
        labeled, count = ndimage.label(m)
        vals = a[m].astype(np.float32, copy=False)
        lab = labeled[m]
        order = np.lexsort((vals, lab))
        vals, lab = vals[order], lab[order]
        bounds = np.searchsorted(lab, np.arange(1, count + 2))
        for r in range(count):
            seg = vals[bounds[r]:bounds[r + 1]]
            overlap_sum += (seg.size - np.searchsorted(seg, thresholds, side="left")) / seg.size
        regions += count
    pro = overlap_sum / regions
    # Sort by FPR ascending (thresholds descending) and prepend the (0, 0) point of an infinite threshold.
    fpr, pro = np.r_[0.0, fpr[::-1]], np.r_[0.0, pro[::-1]]
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr and keep.sum() < fpr.size:
        j = keep.sum()  # first point beyond max_fpr: interpolate the curve at max_fpr
        y_end = pro[j - 1] + (pro[j] - pro[j - 1]) * (max_fpr - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    area = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    return float(min(max(area / max_fpr, 0.0), 1.0))


def pixel_metrics(masks, maps, aupro_max_fpr: float = 0.3) -> dict:
    """masks (bool/0-1) and maps `[N, H, W]` -> {"auroc", "ap", "f1_max", "aupro"} floats in [0, 1].

    Masks must already be at the maps' resolution (evaluation resolution = input size, nearest, > 0.5).
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape; resize masks with nearest first")
    masks = masks > 0.5
    out = _curve_metrics(masks, maps, "pixel metrics")
    out["aupro"] = aupro(masks, maps, max_fpr=aupro_max_fpr) if np.isfinite(out["auroc"]) else float("nan")
    return out
