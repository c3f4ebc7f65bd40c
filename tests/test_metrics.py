import warnings

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from fiseclip_lib.evaluation.metrics import aupro, image_metrics, pixel_metrics


def sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    return np.nanmax(f1[np.isfinite(f1)])


def slow_aupro(masks, maps, max_fpr=0.3):
    """Independent reference: every distinct score as threshold, explicit loops, trapezoid to max_fpr."""
    masks = masks.astype(bool)
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m)
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        points.append((fpr, pro))
    pts = np.array(points)
    xs, ys = pts[:, 0], pts[:, 1]
    # integrate piecewise-linear curve on [0, max_fpr]
    area = 0.0
    for k in range(1, len(xs)):
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = rng.random(300) + 0.4 * y
    s[:80] = np.round(s[:80], 1)  # ties
    m = image_metrics(y, s)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert m["f1_max"] == pytest.approx(sk_f1_max(y, s), abs=1e-6)


def test_pixel_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 24, 24), bool)
    masks[1, 3:9, 4:10] = True
    masks[2, 10:20, 15:18] = True
    maps = rng.random(masks.shape).astype(np.float32) + 0.5 * masks
    m = pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel()
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert m["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert m["f1_max"] == pytest.approx(sk_f1_max(y, s), abs=1e-6)
    assert m["aupro"] == pytest.approx(slow_aupro(masks, maps), abs=2e-3)


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_slow_reference_with_many_regions_and_empty_images(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 20, 20), bool)
    masks[0, 2:5, 2:5] = True
    masks[0, 10:16, 12:14] = True  # two regions in one image
    masks[3, 5:15, 5:8] = True
    # images 1, 2, 4 have no region
    maps = rng.random(masks.shape) + 0.3 * masks
    maps = np.round(maps, 2)  # ties
    assert aupro(masks, maps) == pytest.approx(slow_aupro(masks, maps), abs=2e-3)


def test_aupro_bounds():
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 4:8, 4:8] = True
    perfect = masks.astype(np.float32)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    inverted = 1.0 - perfect
    assert 0.0 <= aupro(masks, inverted) <= 0.01
    rng = np.random.default_rng(0)
    assert 0.0 <= aupro(masks, rng.random(masks.shape)) <= 1.0


def test_one_class_gives_nan_with_warning():
    with pytest.warns(UserWarning, match="one class"):
        m = image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert all(np.isnan(v) for v in m.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = pixel_metrics(np.zeros((2, 8, 8)), np.random.default_rng(0).random((2, 8, 8)))
    assert all(np.isnan(v) for v in p.values())


def test_pixel_metrics_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_metrics(np.zeros((2, 8, 8)), np.zeros((2, 9, 9)))
