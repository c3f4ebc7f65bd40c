"""Streaming: exact against batch scoring with the same references, cold start, defects kept out of the bank."""
import math
import warnings

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


# ------------------------------------------------------------------ issue 20: policies over a shift, copies, speed
def _shifted(path, out):
    """A lighting / colour change of a normal image: darker (gamma 2.2), tinted; every pixel changes."""
    arr = 255 * (np.asarray(Image.open(path).convert("RGB")).astype(np.float32) / 255) ** 2.2
    arr = np.clip(arr * np.array([0.8, 0.9, 1.3]) + 10, 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(out)
    return str(out)


def _flipped(path, out):
    Image.open(path).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
    return str(out)


@pytest.fixture(scope="module")
def line(small_demo, tmp_path_factory):
    """Real ImageNet CNN features at 64 px, and a production line built from the demo's normal images:
    known-good references, normal images, a run of defects, a shifted (lighting / colour) version of normal ones."""
    tmp = tmp_path_factory.mktemp("line")
    cfg = FiseConfig(method="musc", model="efficientnet-lite0", pretrained="imagenet", image_size=64, device="cpu")
    det = Detector(cfg)
    good = sorted(str(p) for p in (small_demo / "textile" / "test" / "good").glob("*.png"))
    train = sorted(str(p) for p in (small_demo / "textile" / "train" / "good").glob("*.png"))
    flips = [_flipped(p, tmp / f"f{i}.png") for i, p in enumerate(good)]
    refs = train + flips[:3]
    normals = good + flips[3:]  # 13 images
    defects = [_defective(p, tmp / f"d{i}.png") for i, p in enumerate(normals[:4])]
    shifted = [_shifted(p, tmp / f"s{i}.png") for i, p in enumerate(normals[:8])]
    bank = ReferenceBank.from_images(det, refs, "textile")
    # a quarter above the highest score of held-out normal images (not in the sequence) against the references
    thr = 1.25 * max(det.score_against(normals[9:], "textile", bank).scores)
    return dict(det=det, refs=refs, bank=bank, thr=thr, normals=normals, defects=defects, shifted=shifted, tmp=tmp)


def _run(s, seq):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = [s.push(p) for p in seq]
    return res, [str(w.message) for w in caught]


def test_a_defect_run_while_calibrating_stays_out_of_the_bank_under_the_robust_policy(line):
    """No known-good bank, no threshold: the defects arrive while the stream calibrates. "open" (the old
    behaviour) lets them in; "robust" keeps them out by the bound of the scores seen so far."""
    normals, defects = line["normals"], line["defects"]
    seq = normals[:6] + defects[:4] + normals[6:10]
    got = {}
    for policy in ("open", "robust"):
        s = Streamer(line["det"], "textile", bank_size=4, admission=policy)
        res, _ = _run(s, seq)
        assert {r.state for r in res[6:10]} == {"calibrating"}, policy  # the defects come while calibrating
        got[policy] = {r.path: r for r in res}
    assert all(got["open"][d].admitted for d in defects)
    assert not any(got["robust"][d].admitted for d in defects)
    # the bound is median + 3.5 x 1.4826 MAD of the normal scores before each image (recomputed here)
    s = Streamer(line["det"], "textile", bank_size=4, admission="robust")
    for p in seq:
        before = list(s.normal_scores)
        r = s.push(p)
        if r.state == "calibrating" and len(before) >= 3:
            med = np.sort(before)[(len(before) - 1) // 2]
            mad = np.sort(np.abs(np.array(before) - med))[(len(before) - 1) // 2]
            assert r.admitted == (r.score <= med + 3.5 * 1.4826 * mad), r.index
    assert sum(got["robust"][p].admitted for p in normals[6:10]) >= 2  # normal images still get in


def _sequence(line):
    n, d, sh = line["normals"], line["defects"], line["shifted"]
    return n[:3] + d[:2] + n[3:6] + sh + n[6:9]  # normal, defect run, normal, shift, return


@pytest.mark.parametrize("policy", ["flag", "rebaseline", "confirm"])
def test_stream_policies_over_a_defect_run_a_shift_and_a_return(line, policy):
    seq = _sequence(line)
    defects, shifted, back = line["defects"][:2], line["shifted"], line["normals"][6:9]
    kw = dict(on_drift="flag") if policy != "rebaseline" else dict(on_drift="rebaseline")
    if policy == "confirm":
        kw["confirm"] = shifted[:3]  # the operator confirms the new normal when it starts
    s = Streamer(line["det"], "textile", bank_size=4, references=line["bank"], threshold=line["thr"],
                 drift_window=4, drift_rate=0.5, **kw)
    res, msgs = _run(s, seq)
    by = {r.path: r for r in res}
    assert all(by[p].decision == "anomalous" and not by[p].admitted for p in defects)  # always caught
    assert all(r.state != "drift" for r in res[:8])  # a run of 2 defects is no drift (2 of 4 is not > 0.5)
    flagged_shift = [by[p].decision == "anomalous" for p in shifted]
    drift_lines = [m for m in msgs if "drift" in m]
    if policy == "flag":
        assert all(flagged_shift)  # the shift is flagged for ever
        assert s.drift_events and len(drift_lines) == len(s.drift_events) == 1  # one line per episode
        assert {by[p].state for p in shifted[3:]} == {"drift"}
        assert not {e.path for e in s.rolling} & set(shifted)  # the bank never learnt the shift
    elif policy == "rebaseline":
        assert len(drift_lines) >= 1 and s.drift_events[0] == seq.index(shifted[2])  # 3 of 4 flagged
        assert sum(flagged_shift[3:]) <= 1  # adapted: the rest of the shift is normal
    else:
        assert not drift_lines and sum(flagged_shift) <= 1  # confirmed: the shift is the new normal
        assert by[shifted[0]].path not in by[shifted[0]].reference_paths  # never matched against itself
    assert [by[p].decision for p in back][-2:] == ["normal", "normal"]  # the return is normal again
    assert res[-1].state == "warm"


def test_an_image_is_never_matched_against_a_copy_of_itself(line):
    """A fixed reference byte-identical to the incoming image (a copy under another name) is left out for it."""
    det, refs = line["det"], line["refs"]
    query = line["defects"][0]
    twin = line["tmp"] / "twin.png"
    twin.write_bytes(open(query, "rb").read())
    bank = ReferenceBank.from_images(det, refs + [str(twin)], "textile")
    assert getattr(bank.entries[-1], "digest", None)
    r = Streamer(det, "textile", bank_size=4, references=bank, threshold=line["thr"]).push(query)
    assert str(twin) not in r.reference_paths and r.references == len(refs)
    expected = det.score_against([query], "textile", ReferenceBank.from_images(det, refs, "textile")).scores[0]
    assert abs(r.score - expected) <= 1e-6
    assert r.decision == "anomalous"  # with the copy, the defect would match itself and vanish
    assert det.score_against([query], "textile", bank).scores[0] < 0.5 * r.score


def test_conformal_rule_and_false_alarm_study(line):
    from fiseclip_lib.decisions.stream import false_alarm_study

    det, normals = line["det"], line["normals"]
    s = Streamer(det, "textile", bank_size=4, references=line["bank"], rule="conformal", false_alarm_rate=0.2,
                 min_history=3)
    for p in normals[:6]:
        s.push(p)
    sc = np.sort(np.array(s.normal_scores))
    k = math.ceil((len(sc) + 1) * 0.8)  # the ceil((n + 1)(1 - a))-th smallest
    assert s.current_threshold() == pytest.approx(sc[k - 1])
    df = false_alarm_study(det, normals, "textile", bank_size=4, references=line["refs"], false_alarm_rate=0.2,
                           min_history=3)
    assert list(df.rule) == ["robust_z", "conformal"]
    for _, row in df.iterrows():  # recount by hand from a stream of the same images
        res = list(stream(det, normals, "textile", bank_size=4, references=line["refs"], rule=row.rule,
                          false_alarm_rate=0.2, min_history=3, drift_window=None))
        warm = [r for r in res if r.state == "warm"]
        assert row.warm == len(warm) > 0 and row.false_alarms == sum(r.decision == "anomalous" for r in warm)
        assert row.ci_low <= row.rate <= row.ci_high


def test_a_stream_that_can_never_be_warm_says_so(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    with pytest.warns(UserWarning, match="can never be warm.*--bank-size 2"):
        Streamer(det, "textile", bank_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Streamer(det, "textile", bank_size=2)
    with pytest.raises(FiseclipError, match="on_drift"):
        Streamer(det, "textile", on_drift="stop")


def test_prefetched_encoding_gives_the_scores_of_one_image_at_a_time(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    paths = paths_of(small_demo)[:7]
    one = [r.score for r in stream(det, paths, "textile", bank_size=3, prefetch=1)]
    many = [r.score for r in stream(det, paths, "textile", bank_size=3, prefetch=4)]
    np.testing.assert_allclose(many, one, atol=1e-6)


def test_predict_stream_confirm_file_resets_the_bank_when_the_new_normal_arrives(small_demo, tmp_path, tiny_encoder):
    """CLI route: --confirm FILE; the listed images, named by another path form, are recognised by content."""
    import os

    from fiseclip_lib.cli import _confirm_paths

    paths = paths_of(small_demo)[:6]
    listed = tmp_path / "confirm.txt"
    listed.write_text("# new normal\n" + "\n".join(os.path.relpath(p) for p in paths[3:5]) + "\n\n")
    confirm = _confirm_paths(str(listed), stream=True)
    det = Detector(FiseConfig(**TINY, method="musc"), encoder=tiny_encoder)
    res = list(stream(det, [str(p) for p in paths], "textile", bank_size=4, threshold=1e9, confirm=confirm))
    # reset at paths[3]: the two confirmed images, less the image itself; they enter the bank once
    assert [r.references for r in res] == [0, 1, 2, 1, 1, 2]
    assert res[3].reference_paths == [os.path.relpath(paths[4])]
    for bad, msg in ((tmp_path / "none.txt", "cannot be read"), (tmp_path / "empty.txt", "lists no image")):
        if "empty" in bad.name:
            bad.write_text("\n# nothing\n")
        with pytest.raises(FiseclipError, match=msg):
            _confirm_paths(str(bad), stream=True)
    (tmp_path / "gone.txt").write_text("nowhere.png\n")
    with pytest.raises(FiseclipError, match="nowhere.png is not a file"):
        _confirm_paths(str(tmp_path / "gone.txt"), stream=True)
    with pytest.raises(FiseclipError, match="use it with --stream"):
        _confirm_paths(str(listed), stream=False)
