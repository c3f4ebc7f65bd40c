"""Streaming: exact against batch scoring with the same references, cold start, defects kept out of the bank."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.core.matching import cross_distances, interval_count, lnamd, visual_map, visual_map_against
from fiseclip_lib.core.references import ReferenceBank
from fiseclip_lib.decisions.stream import Streamer, stream

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu")


def paths_of(root, category="textile"):
    return [s.path for s in D.load_mvtec(root) if s.category == category]


def naive_cross(Zq, Zr, keep=None, penalty=None):
    """Nearest kept reference patch by explicit loops (float64)."""
    nq, p, _ = Zq.shape
    nr, pr, _ = Zr.shape
    out = torch.zeros(nr, nq, p, dtype=torch.float64)
    for j in range(nr):
        for i in range(nq):
            for a in range(p):
                best = math.inf
                for q in range(pr):
                    if keep is not None and not keep[j, q]:
                        continue
                    d = torch.linalg.norm(Zq[i, a].double() - Zr[j, q].double()).item()
                    best = min(best, d + (0.0 if penalty is None else penalty[j, q].item()))
                out[j, i, a] = best
    return out


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_distances_match_naive_loops(unit, masked, soft):
    g = torch.Generator().manual_seed(0)
    Zq, Zr = torch.randn(2, 6, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    if unit:
        Zq, Zr = torch.nn.functional.normalize(Zq, dim=-1), torch.nn.functional.normalize(Zr, dim=-1)
    keep = (torch.rand(3, 7, generator=g) > 0.4) if masked else None
    pen = torch.rand(3, 7, generator=g) if soft else None
    got = cross_distances(Zq, Zr, keep, pen, block=20)  # small blocks: several GEMMs
    torch.testing.assert_close(got.double(), naive_cross(Zq, Zr, keep, pen), atol=2e-5, rtol=1e-5)


def test_visual_map_against_with_mutual_and_no_bank_equals_in_batch_visual_map():
    g = torch.Generator().manual_seed(1)
    layers = {2: torch.randn(5, 16, 8, generator=g), 4: torch.randn(5, 16, 8, generator=g)}
    ref = visual_map(layers, (4, 4), (1, 3))
    got = visual_map_against(layers, (4, 4), {}, (1, 3), mutual=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # queries without mutual referencing, against the other images as an external bank: image 0's row
    bank = {(l, r): lnamd(t[1:], (4, 4), r) for l, t in layers.items() for r in (1, 3)}
    one = visual_map_against({l: t[:1] for l, t in layers.items()}, (4, 4), bank, (1, 3), mutual=False)
    torch.testing.assert_close(one[0], ref[0], atol=1e-5, rtol=1e-5)
    assert interval_count(4, 0.3) == 1


@pytest.mark.parametrize("options", [{}, {"filter": "soft"}, {"method": "musc"}, {"fusion": "gated"},
                                     {"method": "text"}])
def test_streamed_scores_equal_scores_against_the_same_references(small_demo, tiny_encoder, options):
    det = Detector(FiseConfig(**TINY, **options), encoder=tiny_encoder)
    paths = paths_of(small_demo)
    known_good = [str(p) for p in (small_demo / "textile" / "train" / "good").glob("*.png")]
    refs = ReferenceBank.from_images(det, known_good, "textile")
    results = list(stream(det, paths[:9], "textile", bank_size=3, references=refs, threshold=1e9, keep_map=True))
    assert max(r.references for r in results) == 3 + len(known_good)  # cost bounded by K + R
    n_fixed = len(known_good)
    for r in results:
        bank = ReferenceBank(refs.entries + ReferenceBank.from_images(det, r.reference_paths[n_fixed:], "textile",
                                                                      filtered=True).entries)
        batch = det.score_against([r.path], "textile", bank)
        assert abs(batch.scores[0] - r.score) <= 1e-6, (options, r.index)
        np.testing.assert_allclose(batch.maps[0], r.map, atol=1e-6)


@pytest.mark.parametrize("options", [{"method": "musc"}, {"fusion_norm": "none"},
                                     {"fusion_norm": "none", "filter": "soft"}])
def test_streamed_scores_equal_in_batch_scores_when_the_scale_is_batch_independent(small_demo, tiny_encoder, options):
    """The image in the batch [image] + its references gets the streamed score (no batch statistics)."""
    det = Detector(FiseConfig(**TINY, **options), encoder=tiny_encoder)
    results = list(stream(det, paths_of(small_demo)[:8], "textile", bank_size=4, threshold=1e9))
    checked = 0
    for r in results:
        if r.references < 2:
            continue
        batch = det.score_batch([r.path] + r.reference_paths, "textile")
        assert abs(batch.scores[0] - r.score) <= 1e-5, (options, r.index, batch.scores[0], r.score)
        checked += 1
    assert checked >= 5


def test_cold_start_is_a_state_not_nan(small_demo, tiny_encoder):
    for method in ("fiseclip", "musc"):
        det = Detector(FiseConfig(**TINY, method=method), encoder=tiny_encoder)
        res = list(stream(det, paths_of(small_demo)[:4], "textile", bank_size=8))
        assert [r.state for r in res[:2]] == ["cold", "cold"]
        assert [r.references for r in res[:3]] == [0, 1, 2]
        assert all(np.isfinite(r.score) for r in res)
        assert {r.decision for r in res[:2]} == {"undecided"}
        assert res[2].state == "calibrating" and res[2].threshold is None  # no threshold given, no history yet


def test_online_threshold_starts_from_known_good_references(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY, method="musc"), encoder=tiny_encoder)
    good = [str(p) for p in (small_demo / "textile" / "test" / "good").glob("*.png")]
    s = Streamer(det, "textile", bank_size=4, references=good[:8], min_history=8)
    assert len(s.normal_scores) == 8 and s.current_threshold() is not None
    assert s.push(good[0]).state == "warm"


def _defective(path, out):
    """A normal image with a large saturated square: an obvious defect for any features."""
    arr = np.asarray(Image.open(path).convert("RGB")).copy()
    h, w = arr.shape[:2]
    arr[h // 4: h // 2 + 4, w // 4: w // 2 + 4] = (255, 0, 255)
    Image.fromarray(arr).save(out)
    return str(out)


def test_a_run_of_defects_does_not_enter_the_bank(small_demo, tmp_path):
    """Real ImageNet features; known-good references; five defects in a row, then normal images again."""
    cfg = FiseConfig(method="musc", model="efficientnet-lite0", pretrained="imagenet", image_size=64, device="cpu")
    det = Detector(cfg)
    good = sorted(str(p) for p in (small_demo / "textile" / "test" / "good").glob("*.png"))
    refs = [str(p) for p in (small_demo / "textile" / "train" / "good").glob("*.png")] + good[:3]
    normals = good[3:]
    defects = [_defective(p, tmp_path / f"d{i}.png") for i, p in enumerate(normals)]
    seq = normals[:3] + defects[:5] + normals[3:]
    bank_refs = ReferenceBank.from_images(det, refs, "textile")
    thr = max(det.leave_one_out_scores(bank_refs, "textile")) * 1.5  # well above every known-good score
    s = Streamer(det, "textile", bank_size=4, references=bank_refs, threshold=thr)
    res = [s.push(p) for p in seq]
    by_path = {r.path: r for r in res}
    assert all(by_path[d].decision == "anomalous" and not by_path[d].admitted for d in defects[:5])
    assert all(by_path[p].admitted for p in normals)
    assert not set(defects) & {e.path for e in s.rolling}
    # the fifth defect in a row is judged against normal images only: as anomalous as the first
    assert by_path[defects[4]].score >= 0.8 * by_path[defects[0]].score
    assert set(by_path[defects[4]].reference_paths) <= set(refs) | set(normals)


def test_stream_argument_errors(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    with pytest.raises(FiseclipError, match="bank size 0"):
        Streamer(det, "textile", bank_size=0)
    with pytest.raises(FiseclipError, match="finite"):
        Streamer(det, "textile", threshold=float("nan"))
