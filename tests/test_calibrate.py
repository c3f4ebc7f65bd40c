"""Thresholds: F1-optimal against scikit-learn, the unsupervised and conformal rules, provenance checks, and a
false-alarm rate that holds on held-out batches of normal images."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import precision_recall_curve

from fiseclip_lib import Detector, FiseConfig
from fiseclip_lib.decisions.calibrate import (Threshold, calibrate, conformal_threshold, f1_threshold, load_threshold,
                                    robust_threshold)
from fiseclip_lib.cli import main
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation.run import run_benchmark

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=5)


@pytest.mark.parametrize("seed", range(5))
def test_f1_threshold_reaches_sklearn_f1_max(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(y * 1.2, 1.0), 2)  # ties included
    t, stats = f1_threshold(s, y)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0)
    assert stats["f1"] == pytest.approx(f1.max(), abs=1e-12)
    pred = s > t
    tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(stats["f1"])
    assert not np.isclose(s, t).any()  # midway between scores, never on one


def test_robust_and_conformal_rules_follow_their_formulas():
    s = np.array([1.0, 2.0, 2.5, 3.0, 100.0])
    med, mad = 2.5, 0.5
    assert robust_threshold(s, 0.01) == pytest.approx(med + 2.3263478740408408 * 1.4826 * mad)
    x = np.arange(1, 100, dtype=float)  # n = 99
    assert conformal_threshold(x, 0.1) == 90.0  # ceil(100 * 0.9) = 90th smallest
    with pytest.raises(FiseclipError, match="at least 99 normal scores"):
        conformal_threshold(x[:50], 0.01)
    with pytest.raises(FiseclipError, match="false-alarm rate"):
        robust_threshold(s, 0.7)


def _normal_images(tmp_path, n, seed=0, size=48):
    """Normal images from one process: random crops of one real texture with sensor noise."""
    from skimage import data as skdata

    tex = skdata.brick()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        y, x = rng.integers(0, tex.shape[0] - 96, 2)
        crop = tex[y:y + 96, x:x + 96].astype(float) + rng.normal(0, 6, (96, 96))
        p = tmp_path / f"n{seed}_{i:03d}.png"
        Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).convert("RGB").resize((size, size)).save(p)
        paths.append(str(p))
    return paths


@pytest.mark.slow
def test_threshold_keeps_its_false_alarm_rate_on_held_out_batches(tmp_path, tiny_encoder):
    """Calibrate on 20 batches of normal images, apply to 20 other batches (same line, same config).

    Tolerance: the held-out false-alarm rate is a binomial proportion over n = 160 images, so its standard
    deviation is sqrt(a (1 - a) / n) = 0.024 at a = 0.1; the conformal rule's expected rate lies in
    [a - 1/(m + 1), a] for m = 160 calibration scores. We allow 3 standard deviations beyond that interval
    (and the same for the unsupervised rule, compared with its own rate on the calibration set, which adds
    that set's binomial spread).
    """
    det = Detector(FiseConfig(**{**TINY, "batch_size": 8, "image_size": 56}), encoder=None)
    paths = _normal_images(tmp_path, 320)
    scores = np.concatenate([det.score_batch(paths[i:i + 8], "wall").scores for i in range(0, 320, 8)])
    cal, test = scores[:160], scores[160:]
    a, n = 0.1, 160
    sd = math.sqrt(a * (1 - a) / n)
    t = calibrate(cal, np.zeros(160), method="quantile", false_alarm_rate=a)
    far = float(np.mean(test > t.value))
    assert a - 1 / (n + 1) - 3 * sd <= far <= a + 3 * sd, far
    r = calibrate(cal, None, method="robust_z", false_alarm_rate=a)
    far_cal, far_test = r.stats["calibration_flag_rate"], float(np.mean(test > r.value))
    assert abs(far_test - far_cal) <= 3 * math.sqrt(2) * sd, (far_cal, far_test)


def test_calibrate_cli_on_run_scores_and_provenance_checks(small_demo, tmp_path, tiny_encoder, capsys):
    cfg = FiseConfig(**TINY)
    run_benchmark("demo", small_demo, cfg, tmp_path / "run", progress=False)
    scores = tmp_path / "run" / "scores.csv"
    assert main(["calibrate", "--scores", str(scores), "--out", str(tmp_path / "t.json")]) == 2
    assert "--category" in capsys.readouterr().err
    assert main(["calibrate", "--scores", str(scores), "--out", str(tmp_path / "t.json"), "--category",
                 "textile"]) == 0
    d = json.loads((tmp_path / "t.json").read_text())
    df = pd.read_csv(scores)
    df = df[df.category == "textile"]
    assert d["method"] == "f1" and d["encoder"]["model"] == "fiseclip-tiny" and d["mode"] == "batch"
    assert d["stats"]["f1"] == pytest.approx(f1_threshold(df.score, df.label)[1]["f1"])
    t = load_threshold(tmp_path / "t.json")
    assert t.value == d["value"]
    det = Detector(cfg, encoder=tiny_encoder)
    t.check(det, "batch")  # same config: silent
    with pytest.raises(FiseclipError, match="calibrated on other scores"):
        t.check(Detector(cfg.replace(alpha=0.3), encoder=tiny_encoder), "batch")
    with pytest.raises(FiseclipError, match="calibrated on other scores"):
        t.check(det, "stream")
    with pytest.warns(UserWarning, match="calibrated on other scores"):
        t.check(Detector(cfg.replace(alpha=0.3), encoder=tiny_encoder), "batch", force=True)
    bare = Threshold(value=1.0, method="f1")  # calibrated from scores without a config.json beside them
    with pytest.warns(UserWarning, match="records no config"):
        bare.check(det, "batch")
    load_threshold(0.7).check(det, "stream")  # a number the user chose: nothing to check, no warning


def _naive_lower_median(values):
    flat = sorted(float(v) for v in values)
    return flat[(len(flat) - 1) // 2]  # the lower of the two middle values for an even count


def test_robust_threshold_uses_the_lower_median_and_mad_of_fusion():
    """One median/MAD definition (core/robust.py) for thresholds and fusion: on an even count the lower middle
    value, not numpy's average of the two, against a naive sorted-list reference."""
    import torch

    from fiseclip_lib.core import fusion, robust

    s = np.array([10.0, 1.0, 3.0, 2.0, 7.0, 4.0])  # sorted 1 2 3 4 7 10: lower median 3 (numpy: 3.5)
    med = _naive_lower_median(s)
    mad = _naive_lower_median([abs(v - med) for v in s])  # |s - 3| sorted 0 1 1 2 4 7: lower median 1
    assert (med, mad) == (3.0, 1.0)
    z = 2.3263478740408408
    assert robust_threshold(s, 0.01) == pytest.approx(med + z * 1.4826 * mad, rel=1e-15)
    assert robust_threshold(s, 0.01) != pytest.approx(np.median(s) + z * 1.4826 * np.median(np.abs(s - np.median(s))))
    t = calibrate(s, None, method="robust_z")
    assert (t.stats["median"], t.stats["mad"]) == (med, mad)
    # the same definition as fusion's robust z (torch's median), and one constant
    assert robust.median_mad(s) == (med, mad)
    tm, tmad = robust.median_mad(torch.tensor(s, dtype=torch.float64))
    assert (float(tm), float(tmad)) == (med, mad)
    assert robust.MAD_TO_SIGMA == 1.4826 and not hasattr(fusion, "MAD_TO_STD")
    # non-finite scores are left out of the statistics, as they are out of the threshold
    t = calibrate(np.append(s, [np.inf, np.nan]), None, method="robust_z")
    assert (t.stats["median"], t.stats["mad"]) == (med, mad)


def test_threshold_files_of_the_previous_version_still_apply_to_the_same_config():
    """Before config.json recorded resolved values, threshold files hashed the config as written (automatic values
    null, no match_engine). The hash below is what version 0.1 (commit 74c01e7) wrote for the demo params file
    (params/demo.yaml, batch mode); such a file keeps working for that config and is refused for another."""
    from fiseclip_lib.encoder import load_encoder

    demo = dict(method="fiseclip", model="fiseclip-tiny", pretrained="none", image_size=168, batch_size=16, seed=0,
                device="auto")
    old = Threshold(value=1.0, method="f1", encoder={"model": "fiseclip-tiny"}, config_method="fiseclip",
                    config_hash="46b0b3cd9fe7a6f5", mode="batch", source="threshold.json")
    enc = load_encoder("fiseclip-tiny", "none", image_size=168, device="cpu")
    old.check(Detector(FiseConfig(**demo), encoder=enc), "batch")  # accepted
    old.check(Detector(FiseConfig(**demo, sigma=4.0, encode_batch=2), encoder=enc), "batch")  # the same scores
    with pytest.raises(FiseclipError, match="calibrated on other scores"):
        old.check(Detector(FiseConfig(**demo, sigma=2.0), encoder=enc), "batch")
