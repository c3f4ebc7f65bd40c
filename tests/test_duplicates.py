"""A reference is never the image it judges: a copy, a hard link, a symlink, the same file under another name or
an identical image among the images scored together is compared by content, never matched against itself; and a
known-good bank holding a defective image is named before use (leave-one-out audit)."""
import os
import shutil
import warnings

import numpy as np
import pytest

from fiseclip_lib import Detector, FiseConfig
from fiseclip_lib.core.pool import make_batches, score_pool
from fiseclip_lib.core.references import AUDIT_REL_SCALE, AUDIT_Z, ReferenceBank
from fiseclip_lib.decisions.predict import predict
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D

# The shipped CNN (ImageNet weights) on clearly visible defects: a detector whose scores mean something, so that a
# defect's score is high and a reference identical to it visibly lowers it.
CNN = dict(method="musc", model="efficientnet-lite0", pretrained="imagenet", image_size=128, device="cpu",
           rscin=False)
ROUTES = ("copy", "hard link", "symlink", "another name", "in-batch")


@pytest.fixture(scope="module")
def clear_demo(tmp_path_factory):
    from fiseclip_lib.evaluation.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("clear") / "demo", categories=("brick",), n_good=16, n_defect=4,
                      n_train=1, size=128, strength=(0.8, 0.9))


@pytest.fixture(scope="module")
def cnn():
    from fiseclip_lib.encoder import load_encoder

    return load_encoder("efficientnet-lite0", "imagenet", image_size=128, device="cpu")


def _split(root):
    samples = [s for s in D.load_mvtec(root) if s.category == "brick"]
    return [s.path for s in samples if s.label == 0], [s.path for s in samples if s.label == 1]


def _scores(rows, pool):
    return {pool[i]: v for i, v, _ in rows}


def _notes(caught, text):
    return [str(w.message) for w in caught if text in str(w.message)]


@pytest.mark.parametrize("route", ROUTES)
def test_a_reference_identical_to_a_scored_image_never_hides_its_defect(route, clear_demo, cnn, tmp_path):
    """Five ways the image to judge reaches its own references. Each time the defect's score stays what it is
    without the duplicate (and above every normal image's), one note names the two files, and predict refuses a
    reference that is an image to score. Without the content check the same duplicate lowers the score a lot
    (checked by scoring it naively), so the test fails if the check goes."""
    det = Detector(FiseConfig(**CNN), encoder=cnn)
    goods, bads = _split(clear_demo)
    imgs, refs = tmp_path / "imgs", tmp_path / "refs"
    imgs.mkdir(), refs.mkdir()
    defect = str(imgs / "defect.png")
    shutil.copy(bads[0], defect)
    pool = [defect] + [str(shutil.copy(g, imgs / f"good{i}.png")) for i, g in enumerate(goods[:5])]
    ref_paths = [str(shutil.copy(g, refs / f"ref{i}.png")) for i, g in enumerate(goods[5:10])]
    bank = ReferenceBank.from_images(det, ref_paths, "brick")
    before = _scores(score_pool(det, pool, "brick", references=bank, progress=False)[0], pool)
    assert before[defect] > max(before[p] for p in pool[1:])  # the defect is found without the duplicate

    twin = str(refs / "twin.png")
    if route == "copy":
        shutil.copy(defect, twin)
    elif route == "hard link":
        os.link(defect, twin)
    elif route == "symlink":
        os.symlink(defect, twin)
    elif route == "another name":
        twin = os.path.join(str(imgs), ".", "defect.png")  # the very file, spelled differently
    queries, twin_bank = pool, bank
    if route == "in-batch":
        twin = str(imgs / "defect copy.png")
        shutil.copy(defect, twin)
        queries = pool + [twin]  # the copy would be the defect's reference, and the defect the copy's
    else:
        twin_bank = ReferenceBank.from_images(det, ref_paths + [twin], "brick")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, maps = score_pool(det, queries, "brick", references=twin_bank, progress=False)
    after = _scores(rows, queries)
    assert after[defect] == pytest.approx(before[defect], abs=1e-6)
    for p in pool[1:]:
        assert after[p] == pytest.approx(before[p], abs=1e-6)
    notes = _notes(caught, "same content" if route != "in-batch" else "are identical")
    assert len(notes) == 1 and "defect.png" in notes[0] and os.path.basename(twin) in notes[0], notes
    # the naive scoring (no content check) lets the duplicate hide the defect
    naive = det.score(queries, "brick", references=twin_bank).scores[0]
    assert naive < before[defect] - 0.2 * (before[defect] - np.median(list(before.values()))), (naive, before)

    if route == "in-batch":  # the copy has its twin's score and map; predict says so and scores both alike
        order = sorted(queries)
        k_def, k_twin = order.index(defect), order.index(twin)
        assert after[twin] == after[defect] and np.array_equal(maps[k_def], maps[k_twin])
        with pytest.warns(UserWarning, match="are identical"):
            df = predict(queries, "brick", detector=det, reference_dir=ref_paths, progress=False)
        by = dict(zip(df.path, df.score))
        assert by[twin] == by[defect] == pytest.approx(before[defect], abs=1e-6)
        assert df.set_index("path").decision[defect] == "anomalous"
    else:
        with pytest.raises(FiseclipError, match="is also an image to score") as e:
            predict(pool, "brick", detector=det, reference_dir=ref_paths + [twin], progress=False)
        assert twin in str(e.value) and "defect.png" in str(e.value)


def test_a_pool_without_duplicates_is_scored_exactly_as_before(small_demo, tiny_encoder):
    """The content check changes nothing when no two images are identical: the same batches and the same numbers
    as scoring the batches by hand (an independent loop over make_batches), bank included."""
    cfg = FiseConfig(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=5)
    det = Detector(cfg, encoder=tiny_encoder)
    paths = [s.path for s in D.load_mvtec(small_demo) if s.category == "textile"]
    bank = ReferenceBank.from_images(det, paths[-2:], "textile")
    pool = paths[:-2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, maps = score_pool(det, pool, "textile", references=bank, progress=False)
    assert not _notes(caught, "identical") and not _notes(caught, "same content")
    expected = {}
    for b, batch in enumerate(make_batches(range(len(pool)), cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle)):
        res = det.score([pool[i] for i in batch], "textile", references=bank)
        expected.update({i: (float(s), b, m) for i, s, m in zip(batch, res.scores, res.maps)})
    assert [r[0] for r in rows] == sorted(range(len(pool)), key=lambda i: pool[i])
    for k, (i, s, b) in enumerate(rows):
        assert (s, b) == expected[i][:2]
        assert np.array_equal(maps[k], expected[i][2])


def test_identical_in_memory_images_are_found_too(tiny_encoder):
    """Content, not names: two equal arrays in one pool are one image scored once."""
    det = Detector(FiseConfig(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=8),
                   encoder=tiny_encoder)
    rng = np.random.default_rng(0)
    ims = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    with pytest.warns(UserWarning, match="image #1 and image #5 are identical"):
        rows, _ = score_pool(det, ims + [ims[1].copy()], "x", progress=False)
    scores = {i: s for i, s, _ in rows}
    assert scores[5] == scores[1] and len(set(scores.values())) == 5


def test_audit_names_the_one_defective_reference_of_a_known_good_bank(clear_demo, cnn, tmp_path):
    """Leave-one-out scores of the bank, robust z: each large defect (cut, stain: the audit does not promise small
    ones) put among ten normal references is the one flagged and no normal one is, predict warns naming it, and a
    clean bank passes silently."""
    det = Detector(FiseConfig(**CNN), encoder=cnn)
    goods, bads = _split(clear_demo)
    clean = ReferenceBank.from_images(det, goods[4:14], "brick")
    defects = ReferenceBank.from_images(det, bads, "brick")
    report = clean.audit(det, "brick")
    assert len(report) == 10 and not any(r["suspect"] for r in report)
    large = [d for d in defects.entries if "/cut/" in d.path or "/stain/" in d.path]
    assert len(large) == 2
    for d in defects.entries:
        bank = ReferenceBank(clean.entries + [d])
        report = bank.audit(det, "brick")
        # z recomputed naively from the leave-one-out scores
        s = np.array(det.leave_one_out_scores(bank, "brick"))
        med = sorted(s)[(len(s) - 1) // 2]
        mad = sorted(abs(s - med))[(len(s) - 1) // 2]
        scale = max(1.4826 * mad, AUDIT_REL_SCALE * abs(med))
        np.testing.assert_allclose([r["z"] for r in report], (s - med) / scale, rtol=1e-9)
        flagged = [r["path"] for r in report if r["suspect"]]
        assert flagged == ([d.path] if any(d is x for x in large) else flagged) and set(flagged) <= {d.path}, report
    assert ReferenceBank(clean.entries[:4]).audit(det, "brick") == []  # too few to tell
    with pytest.warns(UserWarning, match="score far above the other references") as rec:
        predict(goods[:4], "brick", detector=det, reference_dir=goods[4:14] + [large[0].path], progress=False)
    named = [str(w.message) for w in rec if "far above" in str(w.message)]
    assert len(named) == 1 and large[0].path in named[0] and not any(g in named[0] for g in goods)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(goods[:4], "brick", detector=det, reference_dir=goods[4:14], progress=False)
    assert not _notes(caught, "far above")
