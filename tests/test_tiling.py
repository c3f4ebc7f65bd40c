"""core/tiling.py: tiles cut, referenced and stitched back on the one scoring path."""
import numpy as np
import pytest

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core import tiling
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.pool import score_pool
from fiseclip_lib.core.references import ReferenceBank
from fiseclip_lib.errors import FiseclipError

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu")
S = 112  # the tiny encoder's input side


def textured(n, size, seed=0):
    """Smooth random textures (a tile of one is not a tile of another)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = ndimage.gaussian_filter(rng.normal(size=(size[0], size[1], 3)), (2, 2, 0))
        out.append(np.clip(128 + 60 * x / x.std(), 0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("method", ["fiseclip", "musc"])
def test_stitched_maps_equal_direct_scores_of_images_that_are_exactly_one_tile(tiny_encoder, method):
    ims = textured(4, (2 * S, 2 * S))
    base = FiseConfig(**TINY, method=method)
    tiled = Detector(base.replace(tiles="2x2", tile_overlap=0.0), encoder=tiny_encoder).score(ims, "object")
    direct = Detector(base, encoder=tiny_encoder)
    assert tiled.maps.shape == (4, 2 * S, 2 * S)
    for (y0, x0, y1, x1) in tiling.tile_boxes((2 * S, 2 * S), (2, 2), 0.0):
        assert (y1 - y0, x1 - x0) == (S, S)
        res = direct.score([im[y0:y1, x0:x1] for im in ims], "object")
        np.testing.assert_allclose(tiled.maps[:, y0:y1, x0:x1], res.maps, atol=1e-6)
    np.testing.assert_allclose(tiled.scores, tiled.maps.reshape(4, -1).max(1), atol=1e-6)


def test_overlapping_tiles_keep_single_tile_pixels_and_blend_the_rest(tiny_encoder):
    ims = textured(3, (200, 200), seed=1)
    cfg = FiseConfig(**TINY, method="musc", tiles="2x2", tile_overlap=0.3)
    res = Detector(cfg, encoder=tiny_encoder).score(ims, "object")
    boxes = tiling.tile_boxes((200, 200), (2, 2), 0.3)
    direct = Detector(cfg.replace(tiles=None), encoder=tiny_encoder)
    own = []  # tiles 0 and 1 scored directly, resized to their boxes
    for (y0, x0, y1, x1) in boxes[:2]:
        m = direct.score([im[y0:y1, x0:x1] for im in ims], "object").maps[0]
        own.append(tiling.stitch([m], [(0, 0, y1 - y0, x1 - x0)], (y1 - y0, x1 - x0)))
    top = boxes[2][0]  # rows above tile 2 belong to tiles 0 and 1 only
    start1, end0 = boxes[1][1], boxes[0][3]
    np.testing.assert_allclose(res.maps[0, :top, :start1], own[0][:top, :start1], atol=1e-5)  # tile 0 alone
    a, b = own[0][:top, start1:end0], own[1][:top, :end0 - start1]  # the overlap of tiles 0 and 1
    blend = res.maps[0, :top, start1:end0]
    assert (blend >= np.minimum(a, b) - 1e-5).all() and (blend <= np.maximum(a, b) + 1e-5).all()
    assert not np.allclose(blend, a) and not np.allclose(blend, b)  # a blend, not one tile's value


def test_stitch_reassembles_a_function_sampled_per_tile():
    h, w = 97, 130
    f = np.add.outer(np.sin(np.arange(h) / 7.0), np.cos(np.arange(w) / 5.0)).astype(np.float32)
    for grid, ov in [((2, 3), 0.25), ((4, 4), 0.5), ((3, 1), 0.0)]:
        boxes = tiling.tile_boxes((h, w), grid, ov)
        cover = np.zeros((h, w), int)
        for (y0, x0, y1, x1) in boxes:
            cover[y0:y1, x0:x1] += 1
        assert cover.min() >= 1  # the tiles cover the image
        if ov > 0:
            assert cover.max() >= 2
        np.testing.assert_allclose(tiling.stitch([f[y0:y1, x0:x1] for (y0, x0, y1, x1) in boxes], boxes, (h, w)), f,
                                   atol=1e-6)


def test_auto_takes_the_fewest_tiles_no_larger_than_the_input():
    for side, ov in [(1000, 0.25), (2000, 0.0), (518, 0.25), (1500, 0.5)]:
        g = tiling.resolve_grid("auto", (side, side), 518, ov)
        n = 1 if g is None else g[0]
        boxes = tiling.tile_boxes((side, side), (n, n), ov)
        assert max(y1 - y0 for (y0, _, y1, _) in boxes) <= 518 + 1
        if n > 1:
            fewer = tiling.tile_boxes((side, side), (n - 1, n - 1), ov)
            assert max(y1 - y0 for (y0, _, y1, _) in fewer) > 518


def test_tile_match_all_never_references_an_image_by_its_own_tiles(tiny_encoder):
    ims = textured(1, (2 * S, 2 * S))
    det = Detector(FiseConfig(**TINY, method="musc", tiles="2x2", tile_match="all"), encoder=tiny_encoder)
    with pytest.warns(UserWarning, match="no reference"):
        res = det.score(ims, "object")
    assert not res.maps.any()  # its own 3 other tiles were not references
    res = Detector(det.config, encoder=tiny_encoder).score(textured(3, (2 * S, 2 * S)), "object")
    assert res.maps.shape == (3, 2 * S, 2 * S) and np.isfinite(res.scores).all()


def test_a_reference_bank_is_tiled_like_the_queries(tiny_encoder, tmp_path):
    from PIL import Image

    paths = []
    for i, im in enumerate(textured(5, (2 * S, 2 * S), seed=3)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    cfg = FiseConfig(**TINY, method="musc", tiles="2x2", tile_overlap=0.0)
    det = Detector(cfg, encoder=tiny_encoder)
    bank = ReferenceBank.from_images(det, paths[2:], "object")
    res = det.score(paths[:2], "object", references=bank, mutual=False)
    direct = Detector(cfg.replace(tiles=None), encoder=tiny_encoder)
    arrays = [tiling.as_array(p) for p in paths]
    for t, (y0, x0, y1, x1) in enumerate(tiling.tile_boxes((2 * S, 2 * S), (2, 2), 0.0)):
        crops = [a[y0:y1, x0:x1] for a in arrays]
        tbank = ReferenceBank.from_images(direct, crops[2:], "object")
        ref = direct.score(crops[:2], "object", references=tbank, mutual=False)
        np.testing.assert_allclose(res.maps[:, y0:y1, x0:x1], ref.maps, atol=1e-6)
    unnamed = ReferenceBank.from_images(det, arrays[2:], "object")
    with pytest.raises(FiseclipError, match="built from image paths"):
        det.score(paths[:2], "object", references=unnamed)


def test_score_pool_returns_maps_at_the_original_size(tiny_encoder):
    ims = textured(6, (150, 150), seed=4)
    det = Detector(FiseConfig(**TINY, tiles="auto", batch_size=3, shuffle=False), encoder=tiny_encoder)
    rows, maps = score_pool(det, ims, "object", progress=False)
    assert maps.shape == (6, 150, 150) and len(rows) == 6


def test_the_feature_cache_stores_tiles(tiny_encoder, tmp_path):
    from fiseclip_lib.plumbing.cache import FeatureCache

    ims = textured(3, (2 * S, 2 * S), seed=5)
    cfg = FiseConfig(**TINY, method="musc", tiles="2x2")
    det = Detector(cfg, encoder=tiny_encoder, cache=FeatureCache(tmp_path / "cache"))
    a = det.score(ims, "object")
    assert det.costs["images_encoded"] == 12
    b = det.score(ims, "object")
    assert det.costs["images_encoded"] == 12  # every tile read back from the cache
    np.testing.assert_allclose(a.maps, b.maps, atol=1e-6)


@pytest.mark.parametrize("setting, words", [
    ({"tiles": "2y2"}, "tiles '2y2' must be RxC"),
    ({"tiles": "0x2"}, "tiles '0x2' must be RxC"),
    ({"tile_overlap": 1.0}, r"tile_overlap 1.0 must be in \[0, 1\)"),
    ({"tile_overlap": -0.1}, "tile_overlap -0.1 must be in"),
])
def test_bad_tile_settings_are_one_line_errors(setting, words):
    with pytest.raises(FiseclipError, match=words) as e:
        FiseConfig(**setting)
    assert "\n" not in str(e.value)


def test_a_tile_grid_finer_than_the_patch_grid_is_an_error(tiny_encoder):
    g = tiny_encoder.grid
    det = Detector(FiseConfig(**TINY, tiles=f"{g[0] + 1}x{g[1] + 1}"), encoder=tiny_encoder)
    with pytest.raises(FiseclipError, match=r"tiles \d+x\d+ is finer than the encoder's") as e:
        det.score(textured(2, (400, 400)), "object")
    assert "\n" not in str(e.value)
    with pytest.raises(FiseclipError, match="share one size"):
        Detector(FiseConfig(**TINY, tiles="2x2"), encoder=tiny_encoder).score(
            textured(1, (200, 200)) + textured(1, (220, 200)), "object")


def test_untiled_default_is_unchanged(tiny_encoder):
    ims = textured(3, (S, S), seed=6)
    a = Detector(FiseConfig(**TINY), encoder=tiny_encoder).score(ims, "object")
    b = Detector(FiseConfig(**TINY, tiles="1"), encoder=tiny_encoder).score(ims, "object")
    np.testing.assert_array_equal(a.maps, b.maps)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_auto_never_cuts_finer_than_the_patch_grid_and_references_share_the_size(tiny_encoder, tmp_path):
    from PIL import Image

    assert tiling.resolve_grid("auto", (4000, 4000), 112, 0.25, (7, 7)) == (7, 7)  # capped, not an error
    paths = []
    for i, im in enumerate(textured(2, (2 * S, 2 * S), seed=8) + textured(1, (2 * S, S), seed=9)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    det = Detector(FiseConfig(**TINY, method="musc", tiles="2x2"), encoder=tiny_encoder)
    bank = ReferenceBank.from_images(det, paths[2:], "object")
    with pytest.raises(FiseclipError, match=f"reference {paths[2]} is {S}x{2 * S} px, the images"):
        det.score(paths[:2], "object", references=bank, mutual=False)
    with pytest.raises(FiseclipError, match=rf"{2 * S}x{2 * S} \({paths[0]}\), {S}x{2 * S} \({paths[2]}\)"):
        det.score([paths[0], paths[2]], "object")


def test_tile_settings_have_one_spelling_and_unset_shows_as_unset():
    from fiseclip_lib.config import field_help, scoring_fields
    from fiseclip_lib.evaluation.sweep import _display

    assert FiseConfig(tiles="2X2").tiles == "2x2" and FiseConfig(tiles="1x1").tiles is None
    assert FiseConfig.from_dict({"tiles": 1}).tiles is None  # YAML `tiles: 1`
    assert scoring_fields(FiseConfig(tiles="1").to_dict()) == scoring_fields(FiseConfig().to_dict())
    for bad in ("²x2", "0x2", "2x"):
        with pytest.raises(FiseclipError, match="tiles"):
            FiseConfig(tiles=bad)
    with pytest.raises(FiseclipError, match="method text matches no patches"):
        FiseConfig(method="text", match_window=2)
    assert _display(None, "tiles") == "unset" and _display(None, "image_size") == "auto"
    assert field_help()["match_window"].endswith("default unset")
