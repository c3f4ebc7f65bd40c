"""predict: run's scores on unlabeled images, the reference bank, overlays at the original size, thresholds,
hostile names, and the command line's one-line errors (a fault table in the style of test_faults.py)."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fiseclip_lib import Detector, FiseConfig
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.cli import main
from fiseclip_lib.decisions.predict import (OVERLAY_COLOURS, PREDICTION_COLUMNS, ReferenceBank, bank_query_scores,
                                           default_threshold, overlay_geometry, predict, render_overlay,
                                           unique_stems)
from fiseclip_lib.evaluation.run import run_benchmark
from helpers import hold_output_lock

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=5)
CLI = ["--model", "fiseclip-tiny", "--pretrained", "none", "--image-size", "28", "--batch-size", "4",
       "--no-progress", "--no-feature-cache"]


def test_predict_without_references_gives_run_scores(small_demo, tiny_encoder, tmp_path):
    cfg = FiseConfig(**TINY)
    run_benchmark("demo", small_demo, cfg, tmp_path / "run", categories=["textile"], progress=False)
    ran = pd.read_csv(tmp_path / "run" / "scores.csv")
    det = Detector(cfg, encoder=tiny_encoder)
    df = predict(str(small_demo / "textile" / "test" / "*" / "*.png"), "textile", out=tmp_path / "p", detector=det,
                 progress=False)
    ran["name"] = [p.split("test/", 1)[1] for p in ran.path]
    df["name"] = [p.split("test/", 1)[1] for p in df.path]
    merged = ran.merge(df, on="name", suffixes=("_run", "_pred"))
    assert len(merged) == len(ran) == 13
    np.testing.assert_allclose(merged.score_run, merged.score_pred, atol=1e-6)
    assert (merged.batch_run == merged.batch_pred).all()
    written = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert list(written.columns) == PREDICTION_COLUMNS
    # decisions follow the threshold recorded in each row; references = the other images of the batch
    assert ((written.score > written.threshold) == (written.decision == "anomalous")).all()
    assert (written.references == written.groupby("batch").path.transform("count") - 1).all()


def test_every_scoring_mode_equals_the_reference_matching_engine(small_demo, tiny_encoder):
    """The fast engines (batch, bank, both, per-image) against the short reference implementation of LNAMD + MSM
    through the whole scoring path, for the options that change what matching sees."""
    paths = [s.path for s in D.load_mvtec(small_demo) if s.category == "textile"][:7]
    for opt in ({}, {"filter": "soft"}, {"fusion": "gated"}, {"method": "musc"}, {"fusion_norm": "minmax"}):
        fast = Detector(FiseConfig(**TINY, **opt), encoder=tiny_encoder)
        slow = Detector(FiseConfig(**TINY, **opt, match_engine="reference"), encoder=tiny_encoder)
        bank = ReferenceBank.from_images(fast, paths[5:], "textile")
        feats = fast.encode(paths[:5])
        for refs, mutual in ((None, True), (bank, True), (bank, False)):
            a = fast.score_features(feats, "textile", references=refs, mutual=mutual)
            b = slow.score_features(feats, "textile", references=refs, mutual=mutual)
            np.testing.assert_allclose(a.visual_map, b.visual_map, atol=1e-5, err_msg=f"{opt} {mutual}")
            np.testing.assert_allclose(a.maps, b.maps, atol=1e-4, err_msg=f"{opt} {mutual}")


def test_reference_bank_is_never_scored_or_filtered_and_counts_as_references(small_demo, tiny_encoder, tmp_path):
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    refs = sorted(str(p) for p in (small_demo / "textile" / "test" / "good").glob("*.png"))[:3]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for s in D.load_mvtec(small_demo):
        if s.category == "textile" and s.path not in refs:
            shutil.copy(s.path, imgs / f"{s.defect}_{os.path.basename(s.path)}")
    bank = ReferenceBank.from_images(det, refs, "textile")
    assert len(bank) == 3 and all(e.keep is None and e.penalty is None for e in bank.entries)
    df = predict(str(imgs), "textile", out=tmp_path / "p", detector=det, reference_dir=refs, progress=False)
    assert len(df) == 10 and not set(df.path) & {os.path.basename(r) for r in refs}
    assert (df.references == df.groupby("batch").path.transform("count") - 1 + 3).all()
    # the bank changes the scores; a reference is matched exactly like an extra in-batch image without filter
    plain = predict(str(imgs), "textile", detector=det, progress=False)
    assert not np.allclose(plain.score, df.score)
    conf = json.loads((tmp_path / "p" / "config.json").read_text())
    assert conf["scoring"] == {"mode": "bank", "references": 3, "bank_size": None}  # batches plus a bank


def _img(path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_overlays_one_per_image_at_original_size_with_unique_stems(tmp_path, tiny_encoder):
    src = tmp_path / "src"
    sizes = {"a/x.png": (50, 37), "b/x.png": (64, 64), "b/X.jpg": (90, 40), "b/$a <b> & c.png": (33, 33),
             "b/line\nbreak.png": (40, 48), "b/big.png": (120, 80)}
    for i, (name, size) in enumerate(sizes.items()):
        _img(src / name, size, i)
    os.rename(_img(src / "c" / "tmp.png", (30, 30), 9), os.fsencode(src / "c") + b"/caf\xe9.png")
    det = Detector(FiseConfig(**{**TINY, "image_size": 28}), encoder=None)
    out = tmp_path / "out"
    df = predict(str(src / "**" / "*"), "thing", out=out, detector=det, progress=False, threshold=0.5)
    assert len(df) == 7 and df.overlay.nunique() == 7
    assert not [p.name for p in out.rglob(".*") if p.name != ".fiseclip.lock"]  # no hidden or temp files
    written = pd.read_csv(out / "predictions.csv")
    assert len(written) == 7
    for row in df.itertuples():
        assert (out / row.overlay).is_file(), row.overlay
    for p in src.rglob("*"):
        if p.is_file():
            match = [r for r in df.itertuples() if os.fsencode(r.path) == os.fsencode(str(p))]
            assert len(match) == 1, p
            with Image.open(out / match[0].overlay) as ov, Image.open(p) as im:
                # the image keeps its size, pixel for pixel; banner, frame and colour bar lie outside it
                g = overlay_geometry(*im.size)
                assert ov.size == g["size"], p
                assert ov.size[0] - g["strip"] - 2 * g["border"] == im.size[0], p
                assert ov.size[1] - g["banner"] - g["border"] == im.size[1], p
    assert unique_stems(["a/x.png", "b/x.png", "b/X.jpg"]) == ["x", "x-2", "X-3"]
    assert unique_stems([".hidden.png", "a\nb.png"]) == ["_hidden", "a_b"]
    assert ((df.score > 0.5) == (df.decision == "anomalous")).all() and set(df.threshold) == {0.5}


def _blob_case(tmp_path, w=90, h=70):
    """An image, a map the size of the image with one hot blob (so no resizing), and its peak."""
    img = _img(tmp_path / "im.png", (w, h), 3)
    yy, xx = np.mgrid[:h, :w]
    amap = np.exp(-((xx - 60) ** 2 + (yy - 30) ** 2) / 60.0).astype(np.float32)
    return img, amap, float(amap.max())


def _rgb(hex_colour):
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_overlay_is_actionable_and_leaves_the_original_untouched_outside_the_hot_region(tmp_path):
    img, amap, peak = _blob_case(tmp_path)
    original = np.asarray(Image.open(img).convert("RGB"))
    h, w = original.shape[:2]
    g = overlay_geometry(w, h)
    for decision, thr in (("anomalous", 0.5), ("normal", 1.5), ("undecided", None)):
        out = tmp_path / f"{decision}.png"
        render_overlay(img, amap, peak, thr, decision, out)
        png = np.asarray(Image.open(out).convert("RGB"))
        assert png.shape[:2] == (g["size"][1], g["size"][0])
        area = png[g["y0"]:g["y0"] + h, g["x0"]:g["x0"] + w]
        level = thr if thr is not None else (float(np.median(amap)) + peak) / 2
        hot = amap > level
        # outside the hot region the image is exactly the original (not washed out); inside it is not
        assert np.array_equal(area[~hot], original[~hot]), decision
        assert hot.any() == (decision != "normal")
        if hot.any():
            assert (np.abs(area[hot].astype(int) - original[hot]).sum(-1) > 0).mean() > 0.9
        # the decision's colour on the frame (left, below the image) and the banner, readable at a glance
        want = _rgb(OVERLAY_COLOURS[decision])
        for y, x in ((g["y0"] + h // 2, 0), (png.shape[0] - 1, g["x0"] + w // 2), (1, g["x0"] + w - 2)):
            assert tuple(png[y, x]) == want, (decision, y, x)
        # the colour bar lies right of the frame, outside the image: coloured pixels in the strip
        strip = png[g["y0"]:g["y0"] + h, g["x0"] + w + g["border"]:]
        assert (strip.std(-1) > 30).sum() > 50, decision


def test_overlay_leaves_the_plotting_state_of_a_notebook_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    img, amap, peak = _blob_case(tmp_path)
    before_backend = matplotlib.get_backend()
    before_rc = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    before_figs = plt.get_fignums()
    render_overlay(img, amap, peak, 0.5, "anomalous", tmp_path / "o.png")
    render_overlay(img, amap, peak, None, "undecided", tmp_path / "u.png")
    assert matplotlib.get_backend() == before_backend
    after_rc = {k: v for k, v in matplotlib.rcParams.items() if k != "backend"}
    assert {k for k in before_rc if str(before_rc[k]) != str(after_rc[k])} == set()
    assert plt.get_fignums() == before_figs  # nothing left in pyplot's figure manager


def test_default_threshold_is_robust_z_of_the_bank_scores_else_of_the_run():
    rng = np.random.default_rng(0)
    run = np.concatenate([rng.normal(1, 0.1, 20), rng.normal(3, 0.5, 25)])  # more than half defective
    bank = rng.normal(1, 0.1, 16)
    z = 2.3263478740408408  # Phi^-1(0.99)

    def naive(x):
        med = np.sort(x)[(len(x) - 1) // 2]  # lower median, as fusion's
        return med + z * 1.4826 * np.sort(np.abs(x - med))[(len(x) - 1) // 2]

    value, rec = default_threshold(run, 0.01, bank)
    assert value == pytest.approx(naive(bank)) and rec["n_scores"] == 16 and "bank" in rec["method"]
    assert rec["false_alarm_rate"] == 0.01 and "0.01" in rec["method"]
    caught = (run[20:] > value).mean()
    run_value, run_rec = default_threshold(run, 0.01, bank[:4])  # too few bank scores: this run's rule
    assert run_value == pytest.approx(naive(run)) and run_rec["n_scores"] == 45 and "this run" in run_rec["method"]
    assert caught > 0.9 > (run[20:] > run_value).mean()  # the contaminated run's own rule misses most defects
    tight = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5])  # MAD 0: robust_z alone would be 1.0
    floor_value, floor_rec = default_threshold(run, 0.01, tight)
    assert floor_value == 1.5 and "maximum" in floor_rec["method"]  # no known-good score is ever flagged


def test_bank_scores_as_queries_are_on_the_run_scale(small_demo, tiny_encoder, tmp_path):
    """A bank image is scored like a run image: a run image scored the same way (query against the other images
    of its batch, filtered, plus the bank) gets its in-batch score (musc without RsCIN)."""
    det = Detector(FiseConfig(**TINY, method="musc", rscin=False, musc_pool="batch"), encoder=tiny_encoder)
    test = sorted(s.path for s in D.load_mvtec(small_demo) if s.category == "textile")
    refs = sorted(str(p) for p in (small_demo / "textile" / "train" / "good").glob("*.png"))
    refs = refs + test[-3:]  # a few more known-good references: test images never scored here
    test = test[:-3]
    df = predict(test, "textile", out=tmp_path / "p", detector=det, reference_dir=refs, progress=False,
                 overlays=False)
    bank = ReferenceBank.from_images(det, refs, "textile")
    normal = bank_query_scores(det, test, bank, "textile")
    n_batches = df.batch.nunique()
    assert normal.shape == (len(refs) * n_batches,) and np.isfinite(normal).all()
    conf = json.loads((tmp_path / "p" / "config.json").read_text())
    assert conf["threshold"]["n_scores"] == normal.size and "bank" in conf["threshold"]["rule"]
    assert df.threshold.iloc[0] == pytest.approx(default_threshold(df.score, 0.01, normal)[0])
    assert (df.threshold_method == conf["threshold"]["method"]).all()
    row = df.iloc[0]
    mates = [p for p, b in zip(df.path, df.batch) if b == row.batch and p != row.path]
    others = ReferenceBank.from_images(det, mates, "textile", filtered=True)  # paths as given: absolute
    one = det.encode([row.path])
    again = det.score_features(one, "textile", references=ReferenceBank(others.entries + bank.entries),
                               mutual=False).scores[0]
    assert again == pytest.approx(row.score, abs=1e-5)
    # with RsCIN the bank cannot anchor the threshold: the run's own rule, and a note saying so
    rs = Detector(FiseConfig(**TINY, method="musc", rscin=True), encoder=tiny_encoder)
    assert bank_query_scores(rs, test, bank, "textile").size == 0


def test_predict_applies_a_calibrated_threshold_file(small_demo, tmp_path, tiny_encoder):
    cfg = FiseConfig(**TINY)
    run_benchmark("demo", small_demo, cfg, tmp_path / "run", categories=["textile"], progress=False)
    assert main(["calibrate", "--scores", str(tmp_path / "run" / "scores.csv"), "--out",
                 str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    det = Detector(cfg, encoder=tiny_encoder)
    # fiseclip's fusion normalises over each batch: a fixed threshold is applied, and the user is told why it moves
    assert cfg.method == "fiseclip" and cfg.fusion_norm != "none"
    with pytest.warns(UserWarning, match="fixed threshold means something else in every batch"):
        df = predict(str(small_demo / "textile" / "test" / "*" / "*.png"), "textile", detector=det,
                     threshold=str(tmp_path / "t.json"), progress=False)
    assert (df.threshold == t["value"]).all() and (df.threshold_method == "f1").all()
    assert ((df.score > t["value"]) == (df.decision == "anomalous")).all()


def test_streaming_predict_writes_states_and_bank_admissions(small_demo, tmp_path, tiny_encoder):
    det = Detector(FiseConfig(**TINY, method="musc"), encoder=tiny_encoder)
    df = predict(str(small_demo / "textile" / "test" / "good"), "textile", out=tmp_path / "s", detector=det,
                 stream=True, bank_size=3, threshold=1e9, progress=False)
    assert list(df.state[:2]) == ["cold", "cold"] and set(df.state[2:]) == {"warm"}
    assert (df.references <= 3).all() and df.admitted.all() and np.isfinite(df.score).all()
    assert len(list((tmp_path / "s" / "overlays").glob("*.png"))) == len(df)


# ------------------------------------------------------------------------------------------- fault table

def _tree(tmp):
    imgs = tmp / "imgs"
    for i in range(6):
        _img(imgs / f"{i:03d}.png", (32, 32), i)
    return imgs


def _then(_side_effect, args):
    """Run a setup step (its value is ignored), then give the command-line arguments."""
    return args


FAULTS = {
    "images missing": (lambda t, i: ["--images", str(t / "nope"), "--class-name", "x"], "does not exist"),
    "images folder empty": (lambda t, i: _then((t / "empty").mkdir(), ["--images", str(t / "empty"), "--class-name",
                                                                    "x"]), "no image files"),
    "glob matches nothing": (lambda t, i: ["--images", str(t / "*.tif"), "--class-name", "x"], "matches no image"),
    "no --images": (lambda t, i: ["--class-name", "x"], "--images is required"),
    "no --class-name": (lambda t, i: ["--images", str(i)], "--class-name is required"),
    "unreadable image": (lambda t, i: _then((i / "003.png").write_bytes(b"junk"), ["--images", str(i), "--class-name",
                                                                               "x"]), "003.png cannot be read"),
    "bank size 0": (lambda t, i: ["--images", str(i), "--class-name", "x", "--stream", "--bank-size", "0"],
                    "--bank-size 0"),
    "threshold file missing": (lambda t, i: ["--images", str(i), "--class-name", "x", "--threshold",
                                             str(t / "t.json")], "t.json does not exist"),
    "threshold file not JSON": (lambda t, i: _then((t / "t.json").write_text("{"), [
        "--images", str(i), "--class-name", "x", "--threshold", str(t / "t.json")]), "not valid JSON"),
    "threshold file foreign": (lambda t, i: _then((t / "t.json").write_text('{"value": 1}'), [
        "--images", str(i), "--class-name", "x", "--threshold", str(t / "t.json")]), "not a fiseclip threshold"),
    "threshold value nan": (lambda t, i: _then((t / "t.json").write_text(
        '{"format": "fiseclip-threshold/1", "value": NaN}'), [
        "--images", str(i), "--class-name", "x", "--threshold", str(t / "t.json")]), "not a finite number"),
    "references overlap images": (lambda t, i: ["--images", str(i), "--class-name", "x", "--reference-dir", str(i)],
                                  "is also an image to score"),
    "reference dir missing": (lambda t, i: ["--images", str(i), "--class-name", "x", "--reference-dir",
                                            str(t / "refs")], "refs does not exist"),
    "false alarm rate 2": (lambda t, i: ["--images", str(i), "--class-name", "x", "--false-alarm-rate", "2"],
                           "false-alarm rate 2"),
    "config bogus": (lambda t, i: ["--images", str(i), "--class-name", "x", "--set", "alpha=9"], "alpha"),
    "out is a file": (lambda t, i: _then((t / "f").write_text("x"), ["--images", str(i), "--class-name", "x", "--out",
                                                                  str(t / "f" / "sub")]), "is not writable"),
}
CAL_FAULTS = {
    "scores missing": (lambda t: ["--scores", str(t / "nope.csv")], "does not exist"),
    "no score column": (lambda t: _then((t / "s.csv").write_text("a,b\n1,2\n"), ["--scores", str(t / "s.csv")]),
                        "no score column"),
    "not UTF-8": (lambda t: _then((t / "s.csv").write_bytes(b"score\n\xff\xfe\n"), ["--scores", str(t / "s.csv")]),
                  "s.csv"),
    "labels not 0/1": (lambda t: _then((t / "s.csv").write_text("score,label\n1,0\n2,7\n"),
                                       ["--scores", str(t / "s.csv")]), "labels must be 0"),
    "f1 without anomalies": (lambda t: _then((t / "s.csv").write_text("score,label\n1,0\n2,0\n"),
                                             ["--scores", str(t / "s.csv"), "--method", "f1"]), "needs both"),
    "unknown category": (lambda t: _then((t / "s.csv").write_text("score,category\n1,a\n"),
                                         ["--scores", str(t / "s.csv"), "--category", "b"]), "no category 'b'"),
    "out is a folder": (lambda t: _then(((t / "s.csv").write_text("score\n1\n2\n"), (t / "o").mkdir()),
                                        ["--scores", str(t / "s.csv"), "--out", str(t / "o")]), "is a folder"),
}


def _one_line_error(capsys, code, text):
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    assert code == 2, cap.out + cap.err
    lines = [l for l in cap.err.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("fiseclip: error:"), cap.err
    assert text in lines[0], lines[0]


@pytest.mark.parametrize("name", list(FAULTS))
def test_predict_fault(name, tmp_path, capsys):
    setup, text = FAULTS[name]
    imgs = _tree(tmp_path)
    args = setup(tmp_path, imgs)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    capsys.readouterr()
    _one_line_error(capsys, main(["predict", *args, *CLI]), text)
    out = tmp_path / "out"
    if out.is_dir():  # nothing half-written
        assert not [p.name for p in out.rglob(".*") if p.name != ".fiseclip.lock"]
        assert not (out / "predictions.csv").exists()


@pytest.mark.parametrize("name", list(CAL_FAULTS))
def test_calibrate_fault(name, tmp_path, capsys):
    setup, text = CAL_FAULTS[name]
    args = setup(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "t.json")]
    capsys.readouterr()
    _one_line_error(capsys, main(["calibrate", *args]), text)
    assert not (tmp_path / "t.json").exists()


def test_predict_threshold_from_other_config_stops_and_output_folder_lock(tmp_path, capsys):
    imgs = _tree(tmp_path)
    assert main(["predict", "--images", str(imgs), "--class-name", "x", "--out", str(tmp_path / "a"), *CLI]) == 0
    assert main(["calibrate", "--scores", str(tmp_path / "a" / "predictions.csv"), "--out",
                 str(tmp_path / "t.json")]) == 0
    capsys.readouterr()
    code = main(["predict", "--images", str(imgs), "--class-name", "x", "--out", str(tmp_path / "b"), "--threshold",
                 str(tmp_path / "t.json"), "--set", "alpha=0.2", *CLI])
    _one_line_error(capsys, code, "calibrated on other scores")
    assert main(["predict", "--images", str(imgs), "--class-name", "x", "--out", str(tmp_path / "b"), "--threshold",
                 str(tmp_path / "t.json"), "--set", "alpha=0.2", "--force-threshold", *CLI]) == 0
    assert "calibrated on other scores" in capsys.readouterr().err
    release = hold_output_lock(tmp_path / "a", command="fiseclip predict (test holder)")
    try:
        code = main(["predict", "--images", str(imgs), "--class-name", "x", "--out", str(tmp_path / "a"), *CLI])
    finally:
        release()
    _one_line_error(capsys, code, "is in use by")
    # the predictions of the first run are intact
    assert len(pd.read_csv(tmp_path / "a" / "predictions.csv")) == 6
