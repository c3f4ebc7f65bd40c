"""Lesson helpers (notebook/lessons.py) against independent paths: score_pool, the detector's own batches."""
import matplotlib.pyplot as plt
import numpy as np
import pytest

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.pool import make_batches
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.evaluation.run import prepare_dataset
from fiseclip_lib.notebook import lessons as L
from fiseclip_lib.notebook import workbench as wb

METRICS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"]


@pytest.fixture(scope="module")
def samples(small_demo):
    return prepare_dataset("demo", small_demo)


def _det(encoder, **kw):
    cfg = FiseConfig(model="fiseclip-tiny", pretrained="none", image_size=112, batch_size=8, musc_pool="batch",
                     device="cpu").replace(**kw)
    return Detector(cfg, encoder=encoder)


def test_simulated_benchmark_musc_rows_equal_the_benchmark_and_no_removal_means_no_change(tiny_encoder, samples):
    det = _det(tiny_encoder, method="musc")
    cats = D.categories_of(samples)
    sim = L.simulated_benchmark(det, samples, cats, text_auroc=0.8)
    ref = wb.evaluate(det, samples, cats, progress_bar=False).set_index("category")
    musc = sim[sim.method == "musc"].set_index("category")
    np.testing.assert_allclose(musc.loc[cats, METRICS].to_numpy(float), ref.loc[cats, METRICS].to_numpy(float),
                               rtol=1e-6, atol=1e-9)
    assert set(sim.method) == set(L.SIMULATED_METHODS)
    filtered = sim.method == "fiseclip [SIMULATED text]"
    assert (sim[filtered].removed_share > 0).all() and sim[~filtered].removed_share.isna().all()
    # a threshold no probability reaches keeps every reference: filtered and unfiltered fusion coincide
    off = L.simulated_benchmark(_det(tiny_encoder, method="musc", filter_theta=1.0), samples, cats[:1], 0.8)
    assert (off[off.method == "fiseclip [SIMULATED text]"].removed_share == 0).all()
    a = off[off.method == "fiseclip [SIMULATED text]"][METRICS].to_numpy(float)
    b = off[off.method == "fiseclip-nofilter [SIMULATED text]"][METRICS].to_numpy(float)
    np.testing.assert_allclose(a, b)


def test_filter_audit_counts_what_the_detector_batches_drop(tiny_encoder, samples):
    cats = D.categories_of(samples)
    det, plain = _det(tiny_encoder, method="fiseclip"), _det(tiny_encoder, method="fiseclip-nofilter")
    audit = L.filter_audit(det, samples, cats).set_index("category")
    for cat in cats:
        cs = [s for s in samples if s.category == cat]
        removed, change = 0, 0.0
        for batch in make_batches(cs, 8, seed=0):
            r = det.score_batch([s.path for s in batch], cat)
            r0 = plain.score_batch([s.path for s in batch], cat)
            removed += int((~r.keep).sum())
            change = max(change, float(np.abs(r.visual_map - r0.visual_map).max()))
        assert audit.loc[cat, "removed"] == removed
        assert audit.loc[cat, "max_av_change"] == pytest.approx(change, abs=1e-6)
        assert audit.loc[cat, "why"] == L.why_identical(removed, change)
    none = L.filter_audit(_det(tiny_encoder, method="fiseclip", filter_theta=1.0, filter_min_keep=0.0), samples,
                          cats[:1])
    assert none.loc[0, "removed"] == 0 and none.loc[0, "why"] == "the filter removed no reference patch"
    with pytest.raises(FiseclipError, match="no text filter"):
        L.filter_audit(plain, samples, cats)


def test_why_identical_names_each_case():
    assert L.why_identical(0, 0.0) == "the filter removed no reference patch"
    assert "never among the K nearest" in L.why_identical(5, 0.0)
    assert L.why_identical(5, 0.25) == "the filter changed A_V by up to 0.25"


def test_dot_ranking_puts_the_best_on_top_and_states_the_spread():
    fig = L.dot_ranking(["a", "b$x$", "c"], [0.901, 0.907, 0.903], "mean pixel AUROC (fraction)", "best 3")
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = {round(t): lab.get_text() for t, lab in zip(ax.get_yticks(), ax.get_yticklabels())}
    assert [ticks[k] for k in sorted(ticks, reverse=True)] == ["b$x$", "c", "a"]
    assert "spread 0.006" in ax.get_title()
    plt.close(fig)
    with pytest.raises(FiseclipError, match="one value per label"):
        L.dot_ranking(["a"], [0.1, 0.2], "x")


def test_real_weights_box_names_the_classroom_command():
    box = L.real_weights_box("Per-method bar charts.", "04")
    assert box.startswith("> **Needs real weights.** Per-method bar charts.")
    assert "--params params/classroom.yaml --only 04" in box


def test_simulated_benchmark_refuses_batches_without_references(tiny_encoder, samples):
    with pytest.raises(FiseclipError, match="batch_size >= 2"):
        L.simulated_benchmark(_det(tiny_encoder, method="musc", batch_size=1), samples)
