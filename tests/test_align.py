"""core/align.py: registration by translation before position-aware matching."""
import numpy as np
import pytest
from scipy import ndimage

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core import align
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.errors import FiseclipError

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu")


def scene(size=112, seed=0):
    """A smooth random texture, uint8 RGB."""
    x = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(size, size, 3)), (3, 3, 0))
    return np.clip(128 + 50 * x / x.std(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("true", [(3.0, -5.0), (0.4, 1.7), (-6.0, 0.0)])
def test_a_known_shift_is_recovered_against_a_template(true):
    base = align.to_gray(scene())
    moved = ndimage.shift(base, true, order=1, mode="nearest")  # borders repeated, as a camera sees it
    est = align.estimate_shifts([moved], template=base)[0]
    np.testing.assert_allclose(est, -np.array(true), atol=0.25)  # the shift that moves it back


def test_shifts_within_a_batch_are_recovered_up_to_a_common_offset():
    base = align.to_gray(scene(seed=1))
    true = np.array([[0, 0], [2, -3], [-4, 1], [1, 5], [-2, -2]], float)
    est = align.estimate_shifts([ndimage.shift(base, t, order=1, mode="nearest") for t in true])
    rel = est + true  # = the common offset of the batch's template, the same for every image
    np.testing.assert_allclose(rel - rel.mean(0), 0, atol=0.25)


def test_maps_return_to_the_original_frame():
    m = np.zeros((1, 64, 64), np.float32)
    m[0, 30:34, 20:24] = 1.0
    s = np.array([[4.0, -6.0]])  # image px; the maps are at half the image's size
    registered = ndimage.shift(m[0], s[0] / 2, order=1, mode="nearest")[None]
    back = align.unshift_maps(registered, s, (128, 128))
    np.testing.assert_allclose(back, m, atol=1e-6)


def test_the_detector_reports_shifts_and_returns_maps_in_each_image_frame(tiny_encoder):
    base = scene(seed=2)
    true = [(0, 0), (3, -2), (-2, 4), (1, 1)]
    ims = [align.shift_image(base, t) for t in true]
    cfg = FiseConfig(**TINY, method="musc", match_window=1, align="translation")
    res = Detector(cfg, encoder=tiny_encoder).score(ims, "object")
    assert res.shifts.shape == (4, 2)
    rel = res.shifts + np.array(true)
    np.testing.assert_allclose(rel - rel.mean(0), 0, atol=0.6)  # borders are repeated, not wrapped: ~0.5 px
    assert res.maps.shape == (4, 112, 112) and np.isfinite(res.maps).all()
    # aligned, the same scene scores lower than misaligned with the same window
    off = Detector(cfg.replace(align="none"), encoder=tiny_encoder).score(ims, "object")
    assert res.scores[1:].mean() < off.scores[1:].mean()


def test_align_needs_a_window_and_images_of_one_size(tiny_encoder):
    with pytest.raises(FiseclipError, match="align=translation needs position-aware matching") as e:
        FiseConfig(**TINY, align="translation")
    assert "\n" not in str(e.value)
    det = Detector(FiseConfig(**TINY, match_window=1, align="translation"), encoder=tiny_encoder)
    with pytest.raises(FiseclipError, match="share one size"):
        det.score([scene(112), scene(100)], "object")


def test_runs_and_predictions_report_the_shift_of_each_image(tiny_encoder, tmp_path):
    from PIL import Image

    from fiseclip_lib.decisions.predict import predict
    from fiseclip_lib.evaluation.run import run_benchmark

    base = scene(seed=3)
    true = [(0, 0), (3, -2), (-2, 4), (1, 1), (2, 2), (-3, 0)]
    good = tmp_path / "data" / "part" / "test" / "good"
    good.mkdir(parents=True)
    for k, t in enumerate(true):
        Image.fromarray(align.shift_image(base, t)).save(good / f"{k:03d}.png")
    cfg = FiseConfig(**TINY, method="musc", rscin=False, match_window=1, align="translation")
    det = Detector(cfg, encoder=tiny_encoder)
    run_benchmark("mvtec", tmp_path / "data", cfg, tmp_path / "run", progress=False, detector=det)
    import pandas as pd

    scores = pd.read_csv(tmp_path / "run" / "scores.csv")
    rel = scores[["shift_y", "shift_x"]].to_numpy() + np.array(true)  # rows sorted by path = the order of `true`
    np.testing.assert_allclose(rel - rel.mean(0), 0, atol=0.6)
    df = predict(sorted(good.glob("*.png")), "part", detector=det, out=tmp_path / "pred", overlays=False,
                 progress=False)
    np.testing.assert_allclose(df[["shift_y", "shift_x"]].to_numpy(), scores[["shift_y", "shift_x"]].to_numpy())
    # without align the tables keep their columns
    plain = Detector(cfg.replace(align="none"), encoder=tiny_encoder)
    run_benchmark("mvtec", tmp_path / "data", plain.config, tmp_path / "run0", progress=False, detector=plain)
    assert "shift_y" not in pd.read_csv(tmp_path / "run0" / "scores.csv").columns


def test_a_featureless_or_far_off_image_is_scored_unregistered_with_a_warning(tiny_encoder, tmp_path):
    base = scene(seed=4)
    ims = [align.shift_image(base, t) for t in [(0, 0), (2, -1), (-1, 2), (1, 1)]] + [np.full_like(base, 128)]
    out: list = []
    shifts = align.estimate_shifts([align.to_gray(a) for a in ims], None, out)
    assert out == [4] and not shifts[4].any()  # the uniform image: no peak to trust
    assert np.abs(shifts[:4]).max() < 5
    cfg = FiseConfig(**TINY, method="musc", match_window=1, align="translation")
    with pytest.warns(UserWarning, match=r"no reliable shift for image #4"):
        res = Detector(cfg, encoder=tiny_encoder).score(ims, "object")
    assert not res.shifts[4].any()


def test_align_needs_a_bank_of_paths(tiny_encoder):
    from fiseclip_lib.core.references import ReferenceBank

    det = Detector(FiseConfig(**TINY, method="musc", match_window=1, align="translation"), encoder=tiny_encoder)
    bank = ReferenceBank.from_images(det, [scene(seed=5), scene(seed=6)], "object")  # arrays: no paths
    with pytest.raises(FiseclipError, match="must be built from image paths"):
        det.score([scene(seed=7)], "object", references=bank, mutual=False)
