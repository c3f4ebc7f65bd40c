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
    # the rule itself leaves non-finite scores out (a stream's history); calibrate refuses them, naming them
    assert robust_threshold(np.append(s, [np.inf, np.nan]), 0.01) == robust_threshold(s, 0.01)
    with pytest.raises(FiseclipError, match=r"2 score\(s\) are not finite \(positions 6, 7\)"):
        calibrate(np.append(s, [np.inf, np.nan]), None, method="robust_z")


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


# ------------------------------------------------------------------------- threshold files that cannot be misapplied

CLI = ["--model", "fiseclip-tiny", "--pretrained", "none", "--image-size", "28", "--batch-size", "4",
       "--no-progress", "--no-feature-cache"]

# One other valid value per score-changing field: the set of keys must be the config's own list (metadata), so a
# new field cannot be left out of the threshold's checks.
ALT = {"method": "musc", "model": "efficientnet-lite0", "pretrained": "openai", "image_size": 113, "layers": (1, 2),
       "precision": "bf16", "quick_gelu": True, "restore": "sclip", "restore_depth": 2, "text_temperature": 50.0,
       "class_names": {"wall": "brick wall"}, "filter": "soft", "filter_theta": 0.4, "filter_ratio": 0.2,
       "filter_min_keep": 0.2, "batch_size": 6, "shuffle": False, "seed": 1, "degrees": (1,), "topmin_max": 0.4,
       "match_dtype": "bf16", "musc_pool": "batch", "fusion": "gated", "alpha": 0.4, "gate_tau": 0.4,
       "fusion_norm": "minmax", "sigma": 2.0, "beta": 0.1, "rscin": False, "rscin_ks": (2, 5), "tiles": "2x2",
       "tile_overlap": 0.5, "tile_match": "all", "match_window": 2, "align": "translation"}


class _Det:
    """What Threshold.check reads of a Detector: its config and its encoder's identity."""

    def __init__(self, config, identity):
        self.config = config
        self.encoder = type("E", (), {"identity": staticmethod(lambda: dict(identity))})()


def _record(cfg, identity, mode="batch", references=0, class_name=None):
    rec = {"config": cfg.resolved(), "encoder": identity, "scoring": {"mode": mode, "references": references}}
    return {**rec, "class_name": class_name} if class_name else rec


def test_every_score_changing_field_is_recorded_and_a_mismatch_names_it_with_both_values(tiny_encoder):
    import dataclasses

    from fiseclip_lib.config import BATCH_ONLY_FIELDS, SCORE_NEUTRAL_FIELDS

    scoring = {f.name for f in dataclasses.fields(FiseConfig) if f.metadata["scores"]}
    assert set(ALT) == scoring and not scoring & SCORE_NEUTRAL_FIELDS
    ident = tiny_encoder.identity()
    base = FiseConfig(**{**TINY, "rscin": True})  # RsCIN on: its k list counts too
    rng = np.random.default_rng(0)
    t = calibrate(rng.normal(size=40), None, "robust_z", provenance=_record(base, ident))
    later = {f.name for f in dataclasses.fields(FiseConfig) if f.metadata["keyed_when_set"]}
    assert set(t.config) == scoring - later and t.mode == "batch"  # options added later: recorded when set
    t.check(_Det(base, ident), "batch")  # itself: silent
    t.check(_Det(base.replace(device="cpu", encode_batch=1, match_engine="reference", cache_dir="/x"), ident),
            "batch")  # fields that change no score
    for name, alt in ALT.items():
        other = base.replace(**{name: alt}, **({"match_window": 1} if name == "align" else {}))
        b, o = (json.loads(json.dumps(c.resolved())) for c in (base, other))
        expected = {k for k in scoring if b[k] != o[k]}  # a naive comparison of the resolved configs
        assert name in expected  # (a method brings its own automatic values: musc smooths with sigma 0)
        diffs = t.differences(_Det(other, ident), "batch")
        assert {d.split(" ")[0] for d in diffs} == expected, (name, diffs)
        mine = [d for d in diffs if d.startswith(f"{name} ")][0]
        assert f"{b[name]!r} in the threshold vs {o[name]!r} now" in mine, mine
        with pytest.raises(FiseclipError, match=f"calibrated on other scores: {name} "):
            t.check(_Det(other, ident), "batch")
    # a stream ignores batch formation and pool re-scoring: those fields are neither recorded nor compared
    s = calibrate(rng.normal(size=40), None, "robust_z", provenance=_record(base, ident, mode="stream"))
    assert set(s.config) == scoring - BATCH_ONLY_FIELDS - later and s.mode == "stream"
    for name in BATCH_ONLY_FIELDS:
        s.check(_Det(base.replace(**{name: ALT[name]}), ident), "stream")
    # without RsCIN its k list changes no score
    off = calibrate(rng.normal(size=40), None, "robust_z", provenance=_record(base.replace(rscin=False), ident))
    off.check(_Det(base.replace(rscin=False, rscin_ks=(4,)), ident), "batch")
    # the encoder: every identity field but the weights' name (their content is weights_id)
    for k, v in (("weights_id", "other"), ("input_size", 99), ("mean", [0.0, 0.0, 0.0]), ("precision", "fp16")):
        with pytest.raises(FiseclipError, match=f"encoder {k} "):
            t.check(_Det(base, {**ident, k: v}), "batch")
    t.check(_Det(base, {**ident, "weights": "/elsewhere/same.safetensors"}), "batch")


def test_mode_category_and_scale_are_checked_and_all_differences_are_named(tiny_encoder):
    ident = tiny_encoder.identity()
    cfg = FiseConfig(**TINY)
    t = calibrate(np.arange(30.0), None, "robust_z", provenance=_record(cfg, ident, "batch", 3, "bottle"))
    assert t.mode == "bank" and t.category == "bottle"  # a batch with references is a bank
    assert t.scale == {"method": "fiseclip", "fusion_norm": "robust", "rscin": False, "beta": 0.0}
    det = _Det(cfg, ident)
    t.check(det, "bank", class_name="bottle")
    with pytest.raises(FiseclipError, match="category 'bottle' in the threshold vs class name 'cable' now"):
        t.check(det, "bank", class_name="cable")
    with pytest.raises(FiseclipError, match="mode bank in the threshold vs batch now"):
        t.check(det, "batch", class_name="bottle")
    with pytest.raises(FiseclipError, match="mode bank in the threshold vs stream now"):
        t.check(det, "stream", class_name="bottle")
    # several differences at once: each one named, none hidden behind another
    with pytest.raises(FiseclipError) as e:
        t.check(_Det(cfg.replace(alpha=0.2, fusion_norm="none"), ident), "batch", class_name="cable")
    msg = str(e.value)
    for part in ("category 'bottle'", "mode bank", "alpha 0.5 in the threshold vs 0.2 now",
                 "fusion_norm 'robust' in the threshold vs 'none' now"):
        assert part in msg, msg
    with pytest.warns(UserWarning, match="category 'bottle'"):
        t.check(det, "bank", force=True, class_name="cable")


def _write(path, d):
    path.write_text(json.dumps(d))
    return str(path)


def test_an_edited_threshold_file_is_refused_and_given_comes_only_from_a_number(tmp_path, tiny_encoder):
    ident = tiny_encoder.identity()
    cfg = FiseConfig(**TINY)
    t = calibrate(np.arange(30.0), None, "robust_z", provenance=_record(cfg, ident), category="wall")
    t.save(tmp_path / "t.json")
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["format"] == "fiseclip-threshold/2" and load_threshold(tmp_path / "t.json").value == t.value
    det = _Det(cfg.replace(alpha=0.2), ident)
    for edit in ({"method": "given"}, {"value": 0.1}, {"config": {**d["config"], "alpha": 0.2}},
                 {"encoder": None, "config_hash": None}, {"category": None}, {"mode": "stream"}):
        with pytest.raises(FiseclipError) as e:
            load_threshold(_write(tmp_path / "e.json", {**d, **edit})).check(det, "batch")
        assert "e.json" in str(e.value) and ("changed after fiseclip calibrate" in str(e.value)
                                             or "is not one fiseclip calibrate writes" in str(e.value)), edit
    no_sum = {k: v for k, v in d.items() if k != "checksum"}
    with pytest.raises(FiseclipError, match="checksum"):
        load_threshold(_write(tmp_path / "e.json", no_sum))
    with pytest.raises(FiseclipError, match="'given' is what a plain number"):  # format 1 too
        load_threshold(_write(tmp_path / "e.json", {"format": "fiseclip-threshold/1", "value": 1.0,
                                                    "method": "given"}))
    load_threshold(0.7).check(det, "stream")  # a number typed by the user: the one unchecked threshold


def test_threshold_files_of_format_1_still_load_and_are_checked_by_hash(tmp_path, tiny_encoder):
    """A file the previous version wrote (format 1: encoder fields, a config hash, no config) still applies to the
    same scores, also with a bank (format 1 called it batch), and is refused for another config."""
    from fiseclip_lib.decisions.calibrate import ENCODER_FIELDS, config_hash

    ident = tiny_encoder.identity()
    cfg = FiseConfig(**TINY)
    old = {"format": "fiseclip-threshold/1", "value": 1.5, "method": "f1", "false_alarm_rate": None, "stats": {},
           "n_scores": 10, "category": "wall", "encoder": {k: ident[k] for k in ENCODER_FIELDS},
           "config_method": "fiseclip", "config_hash": config_hash(cfg.resolved(), "batch"), "mode": "batch",
           "source": "scores.csv"}
    t = load_threshold(_write(tmp_path / "old.json", old))
    t.check(_Det(cfg, ident), "batch", class_name="wall")
    t.check(_Det(cfg, ident), "bank", class_name="wall")
    with pytest.raises(FiseclipError, match="records only its hash"):
        t.check(_Det(cfg.replace(alpha=0.2), ident), "batch")
    with pytest.raises(FiseclipError, match="category 'wall'"):
        t.check(_Det(cfg, ident), "batch", class_name="cable")


def _strict(text):
    def refuse(name):
        raise ValueError(name)
    return json.loads(text, parse_constant=refuse)


def test_calibrate_cli_refuses_non_finite_rows_and_reports_its_flag_rate(tmp_path, capsys):
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(1.0, 0.2, 40), 4)
    df = pd.DataFrame({"path": [f"im{i:02d}.png" for i in range(40)], "score": scores})
    df.to_csv(tmp_path / "s.csv", index=False)
    (tmp_path / "s.csv").write_text((tmp_path / "s.csv").read_text().replace(f"im07.png,{scores[7]}", "im07.png,nan")
                                    .replace(f"im30.png,{scores[30]}", "im30.png,inf"))
    capsys.readouterr()
    assert main(["calibrate", "--scores", str(tmp_path / "s.csv"), "--out", str(tmp_path / "t.json")]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("fiseclip: error")]
    assert len(err) == 1 and "row(s) at line 9 (nan, im07.png), line 32 (inf, im30.png)" in err[0], err
    assert not (tmp_path / "t.json").exists()
    df.to_csv(tmp_path / "s.csv", index=False)
    for method, used in (("robust_z", scores), ("quantile", scores)):
        assert main(["calibrate", "--scores", str(tmp_path / "s.csv"), "--out", str(tmp_path / "t.json"),
                     "--method", method, "--false-alarm-rate", "0.1"]) == 0
        d = _strict((tmp_path / "t.json").read_text())  # strict JSON: no NaN or Infinity
        flagged = int(sum(v > d["value"] for v in used))  # a naive count over the scores used
        assert d["n_used"] == len(used) and d["flag_rate"] == pytest.approx(flagged / len(used))
        assert f"flags {flagged} of the {len(used)} scores used ({flagged / len(used):.1%})" in capsys.readouterr().out
    # f1 over labelled scores; quantile over the normal ones only
    df["label"] = (scores > 1.1).astype(int)
    df.to_csv(tmp_path / "s.csv", index=False)
    for method, used in (("f1", scores), ("quantile", scores[scores <= 1.1])):
        assert main(["calibrate", "--scores", str(tmp_path / "s.csv"), "--out", str(tmp_path / "t.json"),
                     "--method", method, "--false-alarm-rate", "0.1"]) == 0
        d = _strict((tmp_path / "t.json").read_text())
        assert d["n_used"] == len(used) and d["flag_rate"] == pytest.approx(np.mean(used > d["value"]))


def test_predict_with_a_threshold_of_another_class_or_mode_stops_naming_both(tmp_path, capsys):
    imgs, refs = tmp_path / "imgs", tmp_path / "refs"
    for i in range(8):
        folder = imgs if i < 6 else refs
        folder.mkdir(exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    args = ["--images", str(imgs), *CLI]
    assert main(["predict", *args, "--class-name", "bottle", "--out", str(tmp_path / "a")]) == 0
    assert main(["calibrate", "--scores", str(tmp_path / "a" / "predictions.csv"), "--out",
                 str(tmp_path / "t.json")]) == 0
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["category"] == "bottle" and d["mode"] == "batch"
    capsys.readouterr()
    assert main(["predict", *args, "--class-name", "bottle", "--threshold", str(tmp_path / "t.json"), "--out",
                 str(tmp_path / "c")]) == 0
    for extra, text in ((["--class-name", "cable"], "category 'bottle' in the threshold vs class name 'cable' now"),
                        (["--class-name", "bottle", "--reference-dir", str(refs)], "mode batch in the threshold vs "
                                                                                   "bank now"),
                        (["--class-name", "bottle", "--stream"], "mode batch in the threshold vs stream now")):
        capsys.readouterr()
        assert main(["predict", *args, *extra, "--threshold", str(tmp_path / "t.json"), "--out",
                     str(tmp_path / "c")]) == 2, extra
        err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("fiseclip: error")]
        assert len(err) == 1 and text in err[0], err
    # a bank's predictions calibrate a bank threshold
    assert main(["predict", *args, "--class-name", "bottle", "--reference-dir", str(refs), "--out",
                 str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["scoring"]["mode"] == "bank"
    assert main(["calibrate", "--scores", str(tmp_path / "b" / "predictions.csv"), "--out",
                 str(tmp_path / "tb.json")]) == 0
    assert json.loads((tmp_path / "tb.json").read_text())["mode"] == "bank"
    assert main(["predict", *args, "--class-name", "bottle", "--reference-dir", str(refs), "--threshold",
                 str(tmp_path / "tb.json"), "--out", str(tmp_path / "c")]) == 0
