"""Notebook study helpers of the workbench, against independent references."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fiseclip_lib.evaluation import data as D
from fiseclip_lib.notebook import workbench as wb
from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.filtering import oracle_keep
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.evaluation.run import eval_masks


def test_defect_patch_is_the_most_covered_cell_of_a_naive_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w, grid = 48, 60, (4, 5)
        mask = rng.random((h, w)) > 0.97
        y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 10)
        mask[y0:y0 + 9, x0:x0 + 9] = True
        counts = np.array([[mask[r * 12:(r + 1) * 12, c * 12:(c + 1) * 12].sum() for c in range(5)] for r in range(4)])
        assert wb.defect_patch(mask, grid) == tuple(np.unravel_index(counts.argmax(), counts.shape))
    with pytest.raises(ValueError):
        wb.defect_patch(np.zeros((8, 8), bool), (2, 2))


def _twin_defect_tree(root: Path) -> Path:
    """A category whose 'spot' defects are the same red square (twins), on one smooth texture with noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    base = np.stack([90 + xx, 110 + yy, 140 + 0 * xx], -1).astype(float)

    def save(path, img):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)

    for i in range(12):
        save(root / "tex" / "test" / "good" / f"{i:03d}.png", base + rng.normal(0, 4, base.shape))
    for kind, n in (("spot", 4), ("line", 2)):
        for i in range(n):
            img = base + rng.normal(0, 4, base.shape)
            m = np.zeros((64, 64), np.uint8)
            y, x = rng.integers(4, 44, 2)
            if kind == "spot":
                img[y:y + 16, x:x + 16] = (230, 20, 20)
                m[y:y + 16, x:x + 16] = 255
            else:
                img[y:y + 3, 4:60] = (10, 10, 10)
                m[y:y + 3, 4:60] = 255
            save(root / "tex" / "test" / kind / f"{i:03d}.png", img)
            save(root / "tex" / "ground_truth" / kind / f"{i:03d}_mask.png", m)
    return root


def test_contamination_study_twins_hide_a_defect_and_the_oracle_gives_it_back(tmp_path, tiny_encoder):
    samples = D.load_dataset("mvtec", _twin_defect_tree(tmp_path / "mv"))
    det = Detector(FiseConfig(model="fiseclip-tiny", pretrained="none", image_size=112, method="musc", sigma=1),
                   encoder=tiny_encoder)
    study = wb.contamination_study(det, samples, counts=(0, 3), n_references=8, same_kind=True, max_probes=2,
                                   text_qualities=(0.95,))
    assert set(study.kind) == {"spot"}  # 'line' has too few images for 3 twins: skipped, not half-done
    assert set(study.variant) == {"no filter", "oracle filter", "text filter (simulated, AUROC 0.95)"}
    assert len(study) == 2 * 2 * 3
    m = study.groupby(["count", "variant"]).margin.mean()
    s = study.set_index(["probe", "count", "variant"]).defect_score
    for p in (0, 1):  # without defective references the oracle removes nothing the defect probe matches against
        assert s[(p, 0, "oracle filter")] == pytest.approx(s[(p, 0, "no filter")], rel=1e-6)
    assert m[(3, "no filter")] < m[(0, "no filter")]  # three twins in the references hide the defect
    assert m[(3, "oracle filter")] > m[(3, "no filter")]  # dropping the twins' defect patches gives it back
    # the study's shortcut (pool distances computed once, batches selected) equals scoring each batch in full
    by_path = {s.path: s for s in samples}
    for _, row in study[study.variant != "text filter (simulated, AUROC 0.95)"].iterrows():
        batch = [by_path[p] for p in row.batch.split("|")]
        assert len(batch) == 11 and sum(s.label for s in batch[3:]) == row["count"]
        assert all(s.defect == batch[0].defect for s in batch[3:] if s.label)
        feats = det.encode([s.path for s in batch])
        keep = (wb.window_oracle_keep(eval_masks(batch, 112), feats.grid, det.config.degrees)
                if row.variant == "oracle filter" else None)
        maps = det.score_features(feats, "tex", keep=keep).maps
        assert row.defect_score == pytest.approx(float(maps[0].max()), rel=1e-4, abs=1e-5)
        assert row.normal_score == pytest.approx(float(maps[1:3].max()), rel=1e-4, abs=1e-5)


def test_window_oracle_drops_every_patch_whose_window_reaches_a_defect():
    masks = np.zeros((1, 64, 64), bool)
    masks[0, 20:22, 40:42] = True  # one defect pixel block in patch (2, 5) of an 8 x 8 grid
    keep = wb.window_oracle_keep(masks, (8, 8), degrees=(1, 3, 5)).reshape(8, 8).numpy()
    expected = np.ones((8, 8), bool)
    for r in range(8):
        for c in range(8):
            if abs(r - 2) <= 2 and abs(c - 5) <= 2:  # the 5 x 5 window of (r, c) contains (2, 5)
                expected[r, c] = False
    assert (keep == expected).all()
    assert (wb.window_oracle_keep(masks, (8, 8), degrees=(1,)).reshape(8, 8).numpy()
            == oracle_keep(masks, (8, 8)).reshape(8, 8).numpy()).all()


def test_set_threads_respects_the_cpu_affinity():
    import os

    before = torch.get_num_threads()
    try:
        n = wb.set_threads()
        assert 1 <= n <= len(os.sched_getaffinity(0)) and torch.get_num_threads() == n
        assert wb.set_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_explore_returns_nothing_so_the_widget_shows_once(monkeypatch):
    import ipywidgets as W

    shown = []
    monkeypatch.delenv(wb.HEADLESS_ENV, raising=False)
    monkeypatch.setattr(wb, "_display", lambda obj, **kw: shown.append(obj))
    calls = []
    assert wb.explore(lambda row=1, col=2: calls.append((row, col)), row=W.IntSlider(value=3), col=4) is None
    assert calls[0] == (3, 4) and sum(isinstance(o, W.Widget) for o in shown) == 1


def test_result_is_one_display_with_the_record(monkeypatch):
    shown = []
    monkeypatch.setattr(wb, "_display", lambda obj, **kw: shown.append((obj, kw)))
    assert wb.result("a  $b$\nc", numbers_from=["SIMULATED text map"], tables={"t": "/x/t.csv"}, notebook="07") is None
    (bundle, kw), = shown
    assert kw == {"raw": True} and bundle["text/markdown"] == r"**What we saw.** a \$b\$ c"
    rec = bundle[wb.RESULT_MIME]
    assert rec["text"] == "a $b$ c" and rec["tables"] == {"t": "/x/t.csv"} and rec["notebook"] == "07"
    assert rec["numbers_from"][0]["kind"] == "simulated"


def test_setup_loads_the_baseline_at_its_own_size_and_names_it_in_the_provenance(small_demo, tmp_path):
    S = wb.setup("t", root=small_demo, model="fiseclip-tiny", pretrained="none", image_size=112,
                 baseline_model="efficientnet-lite0", baseline_pretrained="none", baseline_image_size=64,
                 run_dir=tmp_path, show=False)
    assert (S.encoder.image_size, S.baseline.image_size) == (112, 64)
    assert [e.image_size for e in S.encoders] == [112, 64]
    default = wb.setup("t", root=small_demo, model="fiseclip-tiny", pretrained="none", image_size=112,
                       baseline_model="efficientnet-lite0", baseline_pretrained="none", run_dir=tmp_path, show=False)
    assert default.baseline.image_size == 112


class _Enc:
    def __init__(self, pretrained):
        self.pretrained = pretrained

    def identity(self):
        return {"model": "m", "pretrained": self.pretrained}


def test_provenance_shows_one_block_and_leaves_the_banner_to_the_report_header(monkeypatch):
    shown, updated = [], []
    monkeypatch.setattr(wb, "_display", lambda obj, **kw: shown.append((obj.data, kw)))
    monkeypatch.setattr("IPython.display.update_display", lambda obj, **kw: updated.append((obj.data, kw)))
    monkeypatch.setattr(wb, "_PROVENANCE_SHOWN", False)
    monkeypatch.delenv(wb.HEADLESS_ENV, raising=False)
    wb.show_provenance("demo", "/d", 0, [_Enc(False)])  # JupyterLab: no report header, the banner shows here
    assert "RANDOM WEIGHTS" in shown[0][0] and wb.PROVENANCE_CLASS in shown[0][0]
    wb.show_provenance("demo", "/d", 0, [_Enc(False)])  # a rerun cell in JupyterLab shows its own block
    assert len(shown) == 2 and not updated
    shown.clear()
    monkeypatch.setenv(wb.HEADLESS_ENV, "1")
    monkeypatch.setattr(wb, "_PROVENANCE_SHOWN", False)
    wb.show_provenance("demo", "/d", 0, [_Enc(False)])
    wb.show_provenance("demo2", "/d", 0, [_Enc(True), _Enc(False)])
    (first, kw), = shown  # a report page: one block, the second call replaces it, no banner in it
    assert "RANDOM WEIGHTS" not in first and kw["display_id"] == wb.PROVENANCE_DISPLAY_ID
    (second, kw2), = updated
    assert "demo2" in second and "RANDOM WEIGHTS" not in second and kw2["display_id"] == wb.PROVENANCE_DISPLAY_ID


def test_table_caption_is_tagged_when_its_numbers_come_from_random_weights(monkeypatch):
    shown = []
    monkeypatch.setattr(wb, "_display", lambda obj, **kw: shown.append(obj.data))
    df = pd.DataFrame({"category": ["a$b"], "auroc": [0.51234]})
    wb.table(df, caption="per category", numbers_from=[_Enc(True), "SIMULATED text map"])
    wb.table(df, caption="per category", numbers_from=[_Enc(True), _Enc(False)])
    assert "per category (random weights)" not in shown[0] and "per category (random weights)" in shown[1]
    assert "0.512" in shown[0] and "a$b" in shown[0]


def test_figure_texts_are_recorded_only_inside_reports(monkeypatch):
    monkeypatch.delenv(wb.HEADLESS_ENV, raising=False)
    assert wb.record_figure_texts() is False  # JupyterLab never gets the extra output
