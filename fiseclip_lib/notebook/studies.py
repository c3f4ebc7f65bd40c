"""Study helpers for the notebooks: controlled inputs and experiment loops (no plotting, no display).

Offline there is no real text branch (no CLIP weights), so `simulated_text_map` builds a clearly labelled
SIMULATED text map of controlled quality from the ground truth: the defect share of each patch, blurred over
the patch grid (CLIP localises coarsely), plus Gaussian patch noise and a per-image offset (CLIP's text score
of a whole image drifts), scaled so that the map reaches a chosen patch AUROC. Together with the REAL matching
map of a pretrained CNN this studies the mechanics of fusion and filtering honestly: what they do with a text
branch of known quality, not what CLIP's text branch is.
"""
from __future__ import annotations

import random
import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation.metrics import auroc
from fiseclip_lib.core.fusion import fuse
from fiseclip_lib.core.matching import interval_count, lnamd, reference_distances
from fiseclip_lib.core.postprocess import gaussian_smooth, image_scores, upsample

SIMULATED_LABEL = "SIMULATED text map"


def patch_labels(masks, grid: tuple[int, int]) -> np.ndarray:
    """`[N, H, W]` bool masks -> `[N, h * w]` bool: the patch holds at least one defect pixel."""
    m = torch.as_tensor(np.asarray(masks)).float()[:, None]
    return (torch.nn.functional.adaptive_max_pool2d(m, grid)[:, 0] > 0).flatten(1).numpy()


def simulated_text_map(masks, grid: tuple[int, int], target_auroc: float = 0.85, blur: float = 1.0,
                       image_noise: float = 0.5, seed: int = 0, tol: float = 0.002) -> np.ndarray:
    """A SIMULATED text map A_T of controlled patch AUROC (see module doc).

    Args:
        masks: `[N, H, W]` ground-truth masks (bool; all-False for normal images), at least one defect pixel.
        grid: the patch grid `(h, w)`.
        target_auroc: patch AUROC the map reaches (labels: `patch_labels`), within `tol`.
        blur: std of the Gaussian blur of the defect share over the grid, in patches (0: none).
        image_noise: std of a per-image offset, relative to the unit patch noise.
        seed: noise seed (same seed, same map).
    Returns:
        `[N, h * w]` float32 in (0, 1): sigmoid(a * signal + noise - 1.5), `a` found by bisection, so normal
        patches mostly read below 0.5 like a probability of 'abnormal'.
    """
    masks = np.asarray(masks).astype(bool)
    if masks.ndim != 3:
        raise FiseclipError(f"masks must be [N, H, W], got shape {masks.shape}")
    labels = patch_labels(masks, grid)
    if not labels.any() or labels.all():
        raise FiseclipError("a simulated text map needs images with and without defect patches")
    if not 0.5 <= target_auroc < 1.0:
        raise FiseclipError(f"target_auroc {target_auroc} must be in [0.5, 1)")
    share = torch.nn.functional.adaptive_avg_pool2d(torch.as_tensor(masks).float()[:, None], grid)[:, 0].numpy()
    signal = np.stack([ndimage.gaussian_filter(s.astype(np.float64), blur, mode="constant") if blur > 0 else s
                       for s in share]).reshape(len(masks), -1)
    signal = signal / signal.max()
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(signal.shape) + image_noise * rng.standard_normal((len(masks), 1))

    def quality(a: float) -> float:
        return auroc(labels, a * signal + noise)

    lo, hi = 0.0, 1.0
    while quality(hi) < target_auroc:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise FiseclipError(f"target patch AUROC {target_auroc} is out of reach with blur={blur}; lower either")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if quality(mid) < target_auroc:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6 or abs(quality(hi) - target_auroc) < tol:
            break
    logits = hi * signal + noise - 1.5
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


def compose_indices(labels: Sequence[int], size: int, share: float, rng: random.Random) -> list[int]:
    """Indices of a batch of `size` with round(share * size) anomalous images (as data.compose_batch)."""
    labels = list(labels)
    good = [i for i, y in enumerate(labels) if y == 0]
    bad = [i for i, y in enumerate(labels) if y == 1]
    n_bad = int(round(share * size))
    if n_bad > len(bad) or size - n_bad > len(good):
        raise FiseclipError(f"a batch of {size} with {n_bad} anomalous images needs more images "
                            f"({len(good)} normal, {len(bad)} anomalous)")
    batch = rng.sample(good, size - n_bad) + rng.sample(bad, n_bad)
    rng.shuffle(batch)
    return batch


def pool_distances(layers: dict[int, torch.Tensor], grid: tuple[int, int], degrees=(1, 3, 5)) -> torch.Tensor:
    """Distances between all images of a pool, once, for every (layer, degree): `[L * R, N, N, P]`, d[., j, i, p]
    from patch p of image i to its nearest patch of image j (+inf for j == i). LNAMD works per image, so any
    batch drawn from the pool has the same distances: `batch_visual_map` then costs no GEMM."""
    return torch.stack([reference_distances(lnamd(t, grid, r)) for t in layers.values() for r in degrees])


def batch_visual_map(dist: torch.Tensor, idx: Sequence[int], topmin_max: float = 0.3) -> torch.Tensor:
    """A_V of the batch `idx` from `pool_distances` (equal to matching.visual_map on that batch without filter):
    mean over the K = max(1, floor(topmin_max (n - 1))) nearest references, then over layers and degrees."""
    idx = torch.as_tensor(list(idx))
    d = dist[:, idx][:, :, idx]  # [LR, n(j), n(i), P]; the diagonal stays +inf
    k = interval_count(len(idx) - 1, topmin_max)
    return torch.topk(d, k, dim=1, largest=False).values.mean(dim=1).mean(dim=0)


def default_variants(alpha: float = 0.5, tau: float = 0.5) -> dict[str, Callable]:
    """Map variants of the normalisation study: name -> f(A_V, A_T) on one batch `[n, P]`."""
    out: dict[str, Callable] = {"visual only (raw A_V)": lambda v, t: v, "text only (simulated A_T)": lambda v, t: t}
    for mode in ("additive", "multiplicative", "gated"):
        for norm in ("minmax", "robust") + (("none",) if mode == "additive" else ()):
            out[f"{mode} / {norm}"] = (lambda m, n: lambda v, t: fuse(v, t, m, alpha, tau, n))(mode, norm)
    return out


def fusion_norm_study(dist: torch.Tensor, grid: tuple[int, int], labels: Sequence[int],
                      masks, text_maps, batch_sizes=(4, 8, 16, 32), shares=(0.0, 0.125, 0.25, 0.375, 0.5),
                      n_trials: int = 2, seed: int = 0, variants: dict[str, Callable] | None = None,
                      image_size: int = 128, sigma: float = 4.0):
    """Score batches of varied contamination with each fusion variant; pool the scores over batches.

    For each batch size and trial, one batch per anomalous share is drawn (so a "run" holds an all-normal
    batch next to contaminated ones, as shuffled batches of a real category do); the REAL matching map A_V is
    computed per batch from the pool's distances `dist`, the text map is the per-image `text_maps` (batch-independent,
    as CLIP's is). Image score = max of the upsampled, smoothed map; pooled metrics use every scored instance.

    Args:
        dist: `pool_distances` of all images of one category (encode once, match once, reuse).
        grid: patch grid. labels: `[N]` 0/1. masks: `[N, H, W]` bool at `image_size`. text_maps: `[N, P]`.
    Batch sizes that the category cannot fill at every share are skipped with a warning.

    Returns:
        (per_image, summary): per_image has a row per (variant, batch size, trial, share, image) with columns
        variant, batch_size, trial, share, image, label, score; summary a row per (variant, batch size) with
        image_auroc and patch_auroc pooled over the batches of a run (mean over trials), normal_batch_max
        (the largest image score in the all-normal batch) and defect_median (median score of the defective
        images of the other batches), both in the variant's units and averaged over trials.
    """
    variants = variants or default_variants()
    labels = np.asarray(labels).astype(int)
    plabels = patch_labels(masks, grid)
    text = torch.as_tensor(np.asarray(text_maps), dtype=torch.float32)
    rows, patch_rows = [], []
    n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    feasible = [bs for bs in batch_sizes if all(int(round(s * bs)) <= n_bad and bs - int(round(s * bs)) <= n_good
                                                for s in shares)]
    if len(feasible) < len(batch_sizes):
        warnings.warn(f"batch sizes {sorted(set(batch_sizes) - set(feasible))} skipped: the category has "
                      f"{n_good} normal and {n_bad} anomalous images")
    for bs in feasible:
        for trial in range(n_trials):
            rng = random.Random(seed * 100003 + trial * 1009 + bs)
            for share in shares:
                idx = compose_indices(labels, bs, share, rng)
                a_v = batch_visual_map(dist, idx)
                a_t = text[idx]
                for name, fn in variants.items():
                    patch = fn(a_v, a_t).float()
                    maps = gaussian_smooth(upsample(patch, grid, image_size), sigma)
                    scores = image_scores(maps).numpy()
                    for i, s in zip(idx, scores):
                        rows.append((name, bs, trial, share, i, labels[i], float(s)))
                    patch_rows.append((name, bs, trial, patch.numpy().ravel(), plabels[idx].ravel()))
    per_image = pd.DataFrame(rows, columns=["variant", "batch_size", "trial", "share", "image", "label", "score"])
    pa = {}
    for name, bs, trial, p, y in patch_rows:
        pa.setdefault((name, bs, trial), ([], []))
        pa[(name, bs, trial)][0].append(p)
        pa[(name, bs, trial)][1].append(y)
    summary = []
    for (name, bs), g in per_image.groupby(["variant", "batch_size"], sort=False):
        per_trial = []
        for trial, gt in g.groupby("trial"):
            ps, ys = pa[(name, bs, trial)]
            normal_batch = gt[gt.share == 0.0]
            per_trial.append({
                "image_auroc": auroc(gt.label, gt.score),
                "patch_auroc": auroc(np.concatenate(ys), np.concatenate(ps)),
                "normal_batch_max": float(normal_batch.score.max()) if len(normal_batch) else float("nan"),
                "defect_median": float(gt[gt.label == 1].score.median()),
            })
        summary.append({"variant": name, "batch_size": bs, **pd.DataFrame(per_trial).mean().to_dict()})
    return per_image, pd.DataFrame(summary)


def composition_spread(per_image: pd.DataFrame) -> pd.DataFrame:
    """How much an image's score depends on the batch it shares: for each variant and batch size, the std of
    each image's scores over the batches it appeared in, divided by the gap between the median defective and
    the median normal score (a unitless spread; lower = scores mean the same in every batch), median over images.
    """
    out = []
    for (name, bs), g in per_image.groupby(["variant", "batch_size"], sort=False):
        gap = g[g.label == 1].score.median() - g[g.label == 0].score.median()
        spread = g.groupby("image").score.std().dropna()
        out.append({"variant": name, "batch_size": bs,
                    "relative_spread": float(spread.median() / gap) if gap > 0 and len(spread) else float("nan")})
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------ offline lessons
# Small pieces the lessons 01 and 03 compute offline with numbers that mean something: attention built from REAL
# CNN features (notebook 01) and a text filter applied to the SIMULATED text map (notebook 03).

def uniform_attention_distance(grid: tuple[int, int]) -> float:
    """The mean attention distance (patches) of an operator that attends uniformly to every patch (itself
    included): the exact mean Euclidean distance over all ordered patch pairs of the grid. An operator near this
    value is not local at all (for a g x g grid it is about 0.52 g).

    Args:
        grid: the patch grid `(h, w)`.
    Returns:
        The distance in patches.
    """
    h, w = grid
    if h < 1 or w < 1:
        raise FiseclipError(f"grid {grid} must have at least one patch")
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    return float(torch.cdist(pos, pos).mean())


def feature_attention(layers, patch: int, temperature: float = 0.1) -> np.ndarray:
    """Self-similarity attention of one patch on given features: softmax over patches q of
    cos(f_patch, f_q) / temperature, averaged over layers. It is the q q^T attention of SCLIP / ClearCLIP with
    the features themselves as queries, so on REAL (pretrained) features it shows where such an operator looks.

    Args:
        layers: `[P, C]` features of one image, or a dict of such (or of `[1, P, C]`) per layer.
        patch: the query patch's row-major index.
        temperature: the softmax temperature (lower: more peaked).
    Returns:
        `[P]` float attention weights summing to 1.
    """
    if temperature <= 0:
        raise FiseclipError(f"temperature {temperature} must be > 0")
    feats = list(layers.values()) if isinstance(layers, dict) else [layers]
    out = []
    for f in feats:
        f = torch.as_tensor(f).float().reshape(-1, torch.as_tensor(f).shape[-1])
        if not 0 <= patch < len(f):
            raise FiseclipError(f"patch {patch} is outside the {len(f)} patches of the features")
        f = torch.nn.functional.normalize(f, dim=-1)
        out.append(torch.softmax(f @ f[patch] / temperature, dim=0))
    return torch.stack(out).mean(0).numpy()


def keep_stats(keep, labels) -> dict:
    """How a reference filter's keep mask treats defect and normal patches.

    Args:
        keep: `[N, P]` (or `[N, h, w]`) bool, True = kept as a reference patch.
        labels: same shape, True = defect patch (`patch_labels`).
    Returns:
        {"kept_fraction", "defect_dropped" (share of defect patches dropped: what the filter is for),
        "normal_dropped" (share of normal patches dropped: references lost for nothing)}; NaN where a class is
        absent.
    """
    keep = np.asarray(keep, bool).reshape(len(keep), -1)
    labels = np.asarray(labels, bool).reshape(len(labels), -1)
    if keep.shape != labels.shape:
        raise FiseclipError(f"keep {keep.shape} and labels {labels.shape} must have the same shape")
    drop = ~keep
    return {"kept_fraction": float(keep.mean()),
            "defect_dropped": float(drop[labels].mean()) if labels.any() else float("nan"),
            "normal_dropped": float(drop[~labels].mean()) if (~labels).any() else float("nan")}


def threshold_keep(text_map, theta: float, min_keep: float = 0.1) -> np.ndarray:
    """The reference filter of the option `filter=threshold` (`filtering.reference_keep`) on a given text map:
    keep = A_T < theta, every image keeping at least ceil(min_keep * P) of its least abnormal patches.

    Args:
        text_map: `[N, P]` A_T in [0, 1] (e.g. `simulated_text_map`). theta: the threshold.
        min_keep: the least share of patches every reference keeps.
    Returns:
        `[N, P]` bool, True = kept as a reference patch.
    """
    from fiseclip_lib.core.filtering import reference_keep

    keep, _ = reference_keep(torch.as_tensor(np.asarray(text_map), dtype=torch.float32), "threshold",
                             theta=float(theta), min_keep=min_keep)
    return keep.numpy()


def filter_sweep(text_map, labels, thetas: Sequence[float], min_keep: float = 0.1) -> pd.DataFrame:
    """The threshold filter (`filtering.reference_keep`, with its per-image minimum) at each theta on a text map.

    Args:
        text_map: `[N, P]` A_T in [0, 1] (e.g. `simulated_text_map`). labels: `[N, P]` bool defect patches.
        thetas: thresholds. min_keep: the least share of patches every reference keeps.
    Returns:
        A row per theta: theta and the `keep_stats` columns.
    """
    return pd.DataFrame([{"theta": float(th), **keep_stats(threshold_keep(text_map, th, min_keep), labels)}
                         for th in thetas])


def attention_share(attention, labels, exclude: int | None = None) -> float:
    """The share of one patch's attention that lands on labelled (e.g. defect) patches; attention spread
    uniformly would give the labelled patches' share of the grid.

    Args:
        attention: `[P]` or `[h, w]` non-negative weights. labels: same size, bool.
        exclude: a patch index left out of both (the query itself: its weight on itself says nothing about
            where else it looks), the rest renormalised.
    Returns:
        sum(attention on labelled) / sum(attention); 0 when all weight is on the excluded patch (identity).
    """
    a = np.asarray(attention, float).ravel().copy()
    m = np.asarray(labels, bool).ravel()
    if a.shape != m.shape or a.sum() <= 0:
        raise FiseclipError(f"attention ({a.size} weights, sum {a.sum():.3g}) and labels ({m.size}) do not match")
    if exclude is not None:
        a[exclude] = 0.0
        if a.sum() <= 0:  # identity attention: it looks at no other patch, defect or not
            return 0.0
    return float(a[m].sum() / a.sum())
