"""core/detector.py: the one scoring path (every option runs, inputs of every kind, the fallback without
references, the fusion's grouping rule, the encoder it is given). What each method's spec makes it compute:
tests/test_methods.py."""
import numpy as np
import pytest
import torch

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.fusion import fuse
from fiseclip_lib.core.postprocess import gaussian_smooth, upsample
from fiseclip_lib.core.references import ReferenceBank
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=5)


def batch_paths(root, category="textile", n=5):
    samples = [s for s in D.load_mvtec(root) if s.category == category]
    good = [s.path for s in samples if s.label == 0][: n - 2]
    bad = [s.path for s in samples if s.label == 1][:2]
    return good + bad


@pytest.mark.parametrize("option", [
    *[{"restore": r} for r in ("vanilla", "maskclip", "sclip", "clearclip", "naclip", "vv")],
    *[{"filter": f} for f in ("threshold", "top_ratio", "soft", "none")],
    *[{"fusion": f} for f in ("additive", "multiplicative", "gated")],
    {"rscin": True}, {"fusion_norm": "minmax"}, {"fusion_norm": "none"}, {"beta": 0.5}, {"degrees": (1,)},
    {"match_dtype": "bf16"}, {"shuffle": False}, {"layers": (2, 4)}, {"sigma": 0.0}, {"encode_batch": 2},
])
def test_detector_runs_with_every_option_on_tiny_clip(small_demo, tiny_encoder, option):
    cfg = FiseConfig(**{**TINY, **option})
    det = Detector(cfg, encoder=tiny_encoder)
    res = det.score_batch(batch_paths(small_demo), "textile")
    assert res.maps.shape == (5, 112, 112) and res.scores.shape == (5,)
    assert np.isfinite(res.maps).all() and np.isfinite(res.scores).all()
    assert res.visual_map.shape == (5, 8, 8)
    assert res.text_map.shape == (5, 8, 8) and ((res.text_map >= 0) & (res.text_map <= 1)).all()
    if cfg.filter in ("threshold", "top_ratio"):
        assert res.keep.dtype == bool and res.keep.reshape(5, -1).sum(1).min() >= 7  # min-keep guard (10%)


def test_paths_pil_images_and_arrays_give_the_same_result(small_demo, tiny_encoder):
    from PIL import Image

    paths = batch_paths(small_demo)[:3]
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    a = det.score_batch(paths, "textile")
    b = det.score_batch([Image.open(p) for p in paths], "textile")
    c = det.score_batch([np.asarray(Image.open(p).convert("RGB")) for p in paths], "textile")
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.maps, c.maps)


def test_single_image_falls_back_to_text_map_with_warning(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    with pytest.warns(UserWarning, match="no references"):
        res = det.score_batch(batch_paths(small_demo)[:1], "textile")
    assert np.isfinite(res.maps).all() and res.visual_map is None
    text_only = Detector(FiseConfig(**TINY, method="text"), encoder=tiny_encoder).score_batch(
        batch_paths(small_demo)[:1], "textile")
    # the text map on the fusion's scale (fuse(A_T, A_T)), smoothed like every map
    t = torch.as_tensor(text_only.text_map).reshape(1, -1)
    expected = gaussian_smooth(upsample(fuse(t, t), res.grid, 112), 4.0).numpy()
    np.testing.assert_allclose(res.maps, expected, rtol=1e-5, atol=1e-5)


def test_fusion_groups_a_batch_together_and_queries_against_a_bank_alone(small_demo, tiny_encoder):
    """The normalisation rule: images that reference each other are fused over the batch (a normal image is not
    stretched to [0, 1]); a query against references alone is its own group. Min-max written out here."""
    det = Detector(FiseConfig(**TINY, fusion_norm="minmax", sigma=0.0), encoder=tiny_encoder)
    paths = batch_paths(small_demo)

    def minmax(x):
        return (x - x.min()) / (x.max() - x.min())

    def expected_maps(res, groups):
        v, t = (torch.as_tensor(m).reshape(len(res.maps), -1).double() for m in (res.visual_map, res.text_map))
        patch = torch.cat([0.5 * minmax(v[g]) + 0.5 * minmax(t[g]) for g in groups])
        return upsample(patch, res.grid, 112).numpy()

    def together(n):
        return [slice(0, n)]

    def alone(n):
        return [slice(i, i + 1) for i in range(n)]

    batch = det.score_batch(paths, "textile")
    np.testing.assert_allclose(batch.maps, expected_maps(batch, together(5)), atol=1e-5)
    assert not np.allclose(batch.maps, expected_maps(batch, alone(5)), atol=1e-3)
    bank = ReferenceBank.from_images(det, paths[3:], "textile")
    queries = det.score_against(paths[:3], "textile", bank)
    np.testing.assert_allclose(queries.maps, expected_maps(queries, alone(3)), atol=1e-5)
    assert not np.allclose(queries.maps, expected_maps(queries, together(3)), atol=1e-3)


def test_an_encoder_of_another_size_is_an_error_naming_both(tiny_encoder):
    with pytest.raises(FiseclipError, match=r"takes 112 px images but the config says image_size 224") as err:
        Detector(FiseConfig(**{**TINY, "image_size": 224}), encoder=tiny_encoder)
    assert "\n" not in str(err.value)
    # no size in the config: the encoder's own is used
    assert Detector(FiseConfig(**{**TINY, "image_size": None}), encoder=tiny_encoder).encoder.image_size == 112
