"""core/matching.py position-aware matching (`match_window`): windowed_distances against a naive loop, a window
covering the grid equals global matching (the paper-like reference engine), and what it is for: a missing part."""
import numpy as np
import pytest
import torch

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.matching import lnamd, match, window_offsets, windowed_distances
from fiseclip_lib.errors import FiseclipError

GRID = (5, 6)
P = GRID[0] * GRID[1]


def naive_windowed(Zq, Zr, grid, r, keep=None, penalty=None):
    """d[j, i, p] by three loops: the nearest kept reference patch within r cells (Chebyshev) of p; a window with
    no kept patch uses all of its patches; a reference with no kept patch at all uses all of them."""
    h, w = grid
    nq, nr = Zq.shape[0], Zr.shape[0]
    out = torch.empty(nr, nq, h * w, dtype=torch.float64)
    for j in range(nr):
        kj = None if keep is None or not keep[j].any() else keep[j]
        for i in range(nq):
            for p in range(h * w):
                y, x = divmod(p, w)
                cand = [q for q in range(h * w) if abs(q // w - y) <= r and abs(q % w - x) <= r]
                kept = [q for q in cand if kj is None or kj[q]] or cand
                d = [float(torch.linalg.vector_norm(Zq[i, p].double() - Zr[j, q].double()))
                     + (0.0 if penalty is None else float(penalty[j, q])) for q in kept]
                out[j, i, p] = min(d)
    return out.float()


@pytest.mark.parametrize("r", [0, 1, 2])
def test_windowed_distances_match_a_naive_loop_with_keep_and_penalty(r):
    g = torch.Generator().manual_seed(r)
    Zq, Zr = torch.randn(3, P, 8, generator=g), torch.randn(4, P, 8, generator=g)
    keep = torch.rand(4, P, generator=g) > 0.6
    keep[2] = False  # no kept patch: every patch is used (with a warning)
    penalty = torch.rand(4, P, generator=g) * 0.3
    with pytest.warns(UserWarning, match="no kept patch"):
        got = windowed_distances(Zq, Zr, GRID, r, keep, penalty)
    assert torch.allclose(got, naive_windowed(Zq, Zr, GRID, r, keep, penalty), atol=1e-5)
    assert torch.allclose(windowed_distances(Zq, Zr, GRID, r), naive_windowed(Zq, Zr, GRID, r), atol=1e-5)
    Uq, Ur = torch.nn.functional.normalize(Zq, dim=-1), torch.nn.functional.normalize(Zr, dim=-1)  # unit: fast path
    with pytest.warns(UserWarning, match="no kept patch"):
        got = windowed_distances(Uq, Ur, GRID, r, keep)
    assert torch.allclose(got, naive_windowed(Uq, Ur, GRID, r, keep), atol=1e-5)


def test_window_offsets_stay_on_the_grid():
    assert len(window_offsets((5, 6), 1)) == 9
    assert len(window_offsets((5, 6), 100)) == 9 * 11  # dy in -4..4, dx in -5..5


def test_self_reference_is_excluded_in_a_batch():
    Z = torch.nn.functional.normalize(torch.randn(3, P, 8), dim=-1)
    d = windowed_distances(Z, Z, GRID, 1, exclude_self=True)
    assert torch.isinf(d[torch.arange(3), torch.arange(3)]).all()
    assert torch.isfinite(d[0, 1]).all()


@pytest.mark.parametrize("case", ["batch", "batch+keep", "bank", "bank+batch"])
def test_a_window_covering_the_grid_equals_global_matching(case):
    g = torch.Generator().manual_seed(7)
    layers = {2: torch.randn(4, P, 16, generator=g), 5: torch.randn(4, P, 16, generator=g)}
    degrees = (1, 3)
    kw = {}
    if "keep" in case:
        kw["keep"] = torch.rand(4, P, generator=g) > 0.5
    if "bank" in case:
        kw["references"] = {(l, r): lnamd(torch.randn(3, P, 16, generator=g), GRID, r) for l in layers for r in degrees}
        kw["ref_keep"] = torch.rand(3, P, generator=g) > 0.3
        kw["mutual"] = case == "bank+batch"
    whole = max(GRID) - 1
    windowed = match(layers, GRID, degrees, window=whole, **kw)
    for engine in ("reference", "auto"):
        assert torch.allclose(windowed, match(layers, GRID, degrees, engine=engine, **kw), atol=1e-5), engine
    # a small window is a different (larger or equal) score: each patch has fewer candidates
    assert (match(layers, GRID, degrees, window=1, **kw) >= windowed - 1e-5).all()


def test_position_aware_matching_sees_a_missing_part_that_global_matching_does_not():
    # a board: components (feature A) and bare board (B) in a fixed layout; image 0 misses the component at p0,
    # where it shows bare board, which every reference has elsewhere
    h, w = 6, 6
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    layout = torch.stack([a if (y + x) % 3 == 0 else b for y in range(h) for x in range(w)])
    imgs = layout.repeat(5, 1, 1) + 0.01 * torch.randn(5, h * w, 8, generator=torch.Generator().manual_seed(0))
    p0 = 2 * w + 1  # (2, 1): a component
    assert (2 + 1) % 3 == 0
    imgs[0, p0] = b
    glob = match({1: imgs}, (h, w), (1,))
    local = match({1: imgs}, (h, w), (1,), window=0)
    assert glob[0, p0] < 0.1  # bare board matches bare board elsewhere: invisible
    assert local[0, p0] > 1.0  # against the same place in the references: a component is expected
    assert local[0, p0] == local.max()


def test_detector_runs_position_aware_matching_on_a_batch_and_a_bank(tiny_encoder):
    from fiseclip_lib.core.detector import Detector
    from fiseclip_lib.core.references import ReferenceBank

    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(4)]
    cfg = FiseConfig(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", match_window=2)
    det = Detector(cfg, encoder=tiny_encoder)
    res = det.score(ims, "object")
    assert res.maps.shape == (4, 112, 112) and np.isfinite(res.scores).all()
    bank = ReferenceBank.from_images(det, ims[2:], "object")
    res = det.score(ims[:2], "object", references=bank, mutual=False)
    assert np.isfinite(res.scores).all()
    # the whole grid as window: the same numbers as global matching
    g = max(tiny_encoder.grid) - 1
    a = Detector(cfg.replace(match_window=g), encoder=tiny_encoder).score(ims, "object")
    b = Detector(cfg.replace(match_window=None), encoder=tiny_encoder).score(ims, "object")
    assert np.allclose(a.scores, b.scores, atol=1e-4) and np.allclose(a.maps, b.maps, atol=1e-4)


@pytest.mark.parametrize("setting, words", [
    ({"match_window": -1}, "match_window -1 must be >= 0"),
    ({"align": "translation"}, "align=translation needs position-aware matching"),
])
def test_bad_window_settings_are_one_line_errors(setting, words):
    with pytest.raises(FiseclipError, match=words) as e:
        FiseConfig(**setting)
    assert "\n" not in str(e.value)
    with pytest.raises(FiseclipError, match="must be >= 0"):
        windowed_distances(torch.randn(1, P, 4), torch.randn(1, P, 4), GRID, -1)
