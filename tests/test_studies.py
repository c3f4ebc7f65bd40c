"""Offline-lesson helpers of studies.py, each against an independent reference (naive loops, sklearn-free)."""
import itertools
import math

import numpy as np
import pytest
import torch

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.notebook import studies


def test_uniform_attention_distance_is_the_mean_over_all_patch_pairs():
    grid = (3, 4)
    cells = list(itertools.product(range(grid[0]), range(grid[1])))
    naive = np.mean([math.dist(a, b) for a in cells for b in cells])
    assert studies.uniform_attention_distance(grid) == pytest.approx(naive)
    # the continuous limit: a g x g grid approaches 0.5214 g
    assert studies.uniform_attention_distance((40, 40)) / 40 == pytest.approx(0.5214, abs=0.01)
    with pytest.raises(FiseclipError):
        studies.uniform_attention_distance((0, 3))


def test_feature_attention_is_a_softmax_of_cosines_averaged_over_layers():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 3))

    def naive(f, p, t):
        cos = [f[p] @ f[q] / np.linalg.norm(f[p]) / np.linalg.norm(f[q]) for q in range(len(f))]
        e = np.exp(np.array(cos) / t)
        return e / e.sum()

    got = studies.feature_attention({1: torch.tensor(a)[None], 2: torch.tensor(b)}, patch=2, temperature=0.2)
    assert got == pytest.approx((naive(a, 2, 0.2) + naive(b, 2, 0.2)) / 2, abs=1e-6)
    assert got.sum() == pytest.approx(1.0, abs=1e-6)
    # a lower temperature puts more weight on the patch itself (its cosine is the largest: 1)
    assert studies.feature_attention(a, 2, 0.05)[2] > studies.feature_attention(a, 2, 1.0)[2]
    with pytest.raises(FiseclipError):
        studies.feature_attention(a, 6)
    with pytest.raises(FiseclipError):
        studies.feature_attention(a, 0, temperature=0)


def test_keep_stats_counts_dropped_patches_per_class():
    keep = np.array([[1, 0, 0, 1], [1, 1, 0, 1]], bool)
    labels = np.array([[0, 1, 1, 0], [0, 0, 1, 1]], bool)
    s = studies.keep_stats(keep, labels)
    # defect patches: (0,1) (0,2) (1,2) dropped, (1,3) kept -> 3/4; normal: all 4 kept -> 0
    assert s == {"kept_fraction": 5 / 8, "defect_dropped": 0.75, "normal_dropped": 0.0}
    assert math.isnan(studies.keep_stats(keep, np.zeros_like(labels))["defect_dropped"])
    with pytest.raises(FiseclipError):
        studies.keep_stats(keep, labels[:, :3])


def test_filter_sweep_applies_the_threshold_and_the_per_image_minimum():
    text = np.array([[0.9, 0.8, 0.2, 0.1], [0.6, 0.4, 0.3, 0.7]], np.float32)
    labels = text > 0.5
    df = studies.filter_sweep(text, labels, [0.05, 0.5, 0.95], min_keep=0.25)
    by = df.set_index("theta")
    # theta 0.5 drops exactly the patches >= 0.5, i.e. every defect patch and no normal one
    assert by.loc[0.5, "defect_dropped"] == 1.0 and by.loc[0.5, "normal_dropped"] == 0.0
    # theta 0.05 would drop everything; each image keeps its least abnormal patch (min_keep 0.25 of 4)
    assert by.loc[0.05, "kept_fraction"] == pytest.approx(2 / 8)
    assert by.loc[0.95, "kept_fraction"] == 1.0
    assert list(df.kept_fraction) == sorted(df.kept_fraction)  # a higher theta never keeps fewer
    # the keep mask itself, against a naive per-image loop
    keep = studies.threshold_keep(text, 0.65, min_keep=0.5)
    for row, k in zip(text, keep):
        want = row < 0.65
        if want.sum() < 2:  # min_keep 0.5 of 4 patches: the two least abnormal
            want = np.isin(np.arange(4), np.argsort(row)[:2])
        assert (k == want).all()


def test_attention_share_weights_the_labelled_patches():
    att = np.array([[0.1, 0.3], [0.2, 0.4]])
    assert studies.attention_share(att, [[0, 1], [0, 1]]) == pytest.approx(0.7)
    assert studies.attention_share(att * 5, [[0, 1], [0, 1]]) == pytest.approx(0.7)  # scale-free
    # leaving the query (index 3, weight 0.4) out: 0.3 of the remaining 0.6
    assert studies.attention_share(att, [[0, 1], [0, 1]], exclude=3) == pytest.approx(0.5)
    assert studies.attention_share(np.eye(4)[1], [1, 1, 1, 1], exclude=1) == 0.0  # identity looks nowhere else
    with pytest.raises(FiseclipError):
        studies.attention_share(att, [1, 0, 1])
