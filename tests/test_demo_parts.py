"""The procedural demo categories (board: an aligned part; wafer: a large image with small defects)."""
import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.evaluation.demo import (ARRAY_SITES, BOARD_DEFECTS, BOARD_LAYOUT, LARGE_FACTOR, WAFER_DEFECTS,
                                          add_categories, board_footprints, board_images, build_demo, wafer_images)


def digest(root, sub=""):
    h = hashlib.sha256()
    for p in sorted((root / sub).rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


KW = dict(n_good=2, n_defect=5, n_train=1, size=64)


def test_part_categories_are_deterministic_and_leave_the_texture_categories_as_they_were(tmp_path):
    a = build_demo(tmp_path / "a", categories=("board", "wafer"), **KW)
    b = build_demo(tmp_path / "b", categories=("board", "wafer"), **KW)
    c = build_demo(tmp_path / "c", categories=("board", "wafer"), seed=1, **KW)
    assert digest(a) == digest(b) and digest(a) != digest(c)
    # a part category has its own random stream: the texture categories before it keep their bytes, and the
    # part category is the same wherever it stands in the list
    plain = build_demo(tmp_path / "plain", categories=("textile", "brick"), **KW)
    mixed = build_demo(tmp_path / "mixed", categories=("textile", "brick", "board"), **KW)
    for cat in ("textile", "brick"):
        assert digest(plain, cat) == digest(mixed, cat)
    assert digest(mixed, "board") == digest(a, "board")
    info = json.loads((mixed / "manifest.json").read_text())
    assert set(info["counts"]["board"]) == {"train", "good", *BOARD_DEFECTS}


def test_built_categories_load_with_every_defect_kind_and_a_mask_each(tmp_path):
    root = build_demo(tmp_path / "d", categories=("board", "wafer"), **KW)
    samples = D.load_mvtec(root)
    for cat, kinds, side in (("board", BOARD_DEFECTS, 64), ("wafer", WAFER_DEFECTS, 64 * LARGE_FACTOR)):
        cs = [s for s in samples if s.category == cat]
        assert {s.defect for s in cs} == set(kinds) | {"good"}
        for s in cs:
            assert D.image_size_of(s.path) == (side, side)
            if s.label:
                m = D.load_mask(s.mask)
                assert m.any() and m.shape == (side, side)


@pytest.mark.parametrize("make,kinds", [(board_images, BOARD_DEFECTS), (wafer_images, WAFER_DEFECTS)])
def test_masks_cover_every_changed_pixel(make, kinds):
    size = 128 if make is board_images else 256
    items = make(1, list(kinds) * 2, size=size, seed=3, with_clean=True)
    img, mask, kind, clean = items[0]
    assert kind == "good" and mask is None and img is clean
    for img, mask, kind, clean in items[1:]:
        changed = np.any(np.asarray(img) != np.asarray(clean), axis=-1)
        assert mask.shape == (size, size) and mask.any(), kind
        assert not (changed & ~mask).any(), f"{kind}: pixels outside the mask changed"
        assert changed.sum() >= 0.3 * mask.sum(), f"{kind}: the mask is mostly unchanged"


def test_board_images_differ_in_pose_and_light_only():
    items = board_images(6, [], size=128, seed=0)
    arrays = np.stack([np.asarray(im, np.float32) for im, _, _ in items])
    assert len({a.tobytes() for a in arrays}) == 6
    means = arrays.mean(axis=(1, 2, 3))
    assert means.max() - means.min() > 3  # lighting jitter
    # the same layout: every image registers onto the first by an integer shift of at most 2 x the jitter
    from skimage.registration import phase_cross_correlation

    gray = arrays.mean(-1)
    for g in gray[1:]:
        shift = phase_cross_correlation(gray[0], g, normalization=None)[0]
        assert np.all(np.abs(shift) <= 2 * 2 + 0.5)


def test_a_missing_component_looks_like_an_empty_site_where_a_component_was():
    size = 200  # site centres on whole pixels: a site moved to another is an integer shift
    feet = board_footprints(size)
    populated = [i for i, site in enumerate(ARRAY_SITES) if site in BOARD_LAYOUT]
    site_feet = {i: feet[BOARD_LAYOUT.index(ARRAY_SITES[i])] for i in populated}
    items = board_images(0, ["missing"] * 6, size=size, seed=5, jitter=0, with_clean=True)
    cols = len({s[1] for s in ARRAY_SITES})
    for img, mask, kind, clean in items:
        hit = [i for i, f in site_feet.items() if np.array_equal(mask, f)]
        assert len(hit) == 1, "the mask is not exactly one populated site's footprint"
        i = hit[0]
        # an empty site of the same row (same part, same orientation): the missing part's place looks like it
        j = next(k for k in range(i - i % cols, i - i % cols + cols) if k not in populated)
        dx = round((ARRAY_SITES[j][1] - ARRAY_SITES[i][1]) * size)
        a, c = np.asarray(img, np.float32), np.asarray(clean, np.float32)
        there = np.roll(mask, dx, axis=1)
        like_empty = np.abs(a[mask] - a[there]).mean()
        like_before = np.abs(a[mask] - c[mask]).mean()
        assert like_empty < 15 < like_before, (like_empty, like_before)


def test_wafer_is_large_and_its_defects_are_a_few_pixels_wide():
    items = wafer_images(1, list(WAFER_DEFECTS), seed=0)
    assert items[0][0].size == (1024, 1024)
    for img, mask, kind in items[1:]:
        assert mask.any(), kind
        # nowhere 25 px wide: below one patch of a 128 px input with stride 8 (one patch = 64 px of 1024)
        assert not ndimage.binary_erosion(mask, np.ones((25, 25), bool)).any(), kind
        labels, n = ndimage.label(mask)
        assert n >= 1


def test_add_categories_joins_an_existing_demo_set_without_touching_it(tmp_path):
    root = build_demo(tmp_path / "demo", categories=("textile",), **KW)
    before = digest(root, "textile")
    params = json.loads((root / "manifest.json").read_text())["params"]
    assert add_categories(root, ["textile", "board"]) == ["board"]
    assert add_categories(root, ["board"]) == []
    info = json.loads((root / "manifest.json").read_text())
    assert info["params"] == params and info["added"] == ["board"]
    assert digest(root, "textile") == before
    # the same parameters: build_demo still reuses the folder, and the added category equals a direct build
    assert build_demo(root, categories=("textile",), **KW) == root
    direct = build_demo(tmp_path / "direct", categories=("board",), **KW)
    assert digest(root, "board") == digest(direct, "board")
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_add_categories_refuses_a_folder_that_is_not_a_demo_set(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("not a demo set")
    with pytest.raises(FiseclipError, match="demo manifest .* rebuild"):
        add_categories(tmp_path / "x", ["board"])
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["mine.txt"]


def test_bad_part_settings_are_one_line_errors(tmp_path):
    with pytest.raises(FiseclipError, match="unknown demo category 'dent': choose from .*board, wafer"):
        build_demo(tmp_path / "x", categories=("board", "dent"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(FiseclipError, match="unknown board defect 'dent'"):
        board_images(1, ["dent"])
    with pytest.raises(FiseclipError, match="board jitter 40 px"):
        board_images(1, [], size=128, jitter=40)
    with pytest.raises(FiseclipError, match="unknown wafer defect 'missing'"):
        wafer_images(1, ["missing"], size=256)
