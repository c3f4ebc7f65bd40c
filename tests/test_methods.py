"""methods.py: each method's spec, and nothing but its flags, decides what the scoring core computes.

The oracle below reads only the spec's flags (never a method name) and rebuilds the maps from the intermediates
the detector reports, through the stages (each tested against its own independent reference elsewhere)."""
import numpy as np
import pytest

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.filtering import reference_keep
from fiseclip_lib.core.fusion import fuse
from fiseclip_lib.core.matching import match
from fiseclip_lib.core.postprocess import gaussian_smooth, upsample
from fiseclip_lib.core.text import text_embeddings, text_map, text_score
from fiseclip_lib.encoder import load_encoder
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.methods import METHODS

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=5)


def batch_paths(root, category="textile", n=5):
    samples = [s for s in D.load_mvtec(root) if s.category == category]
    return [s.path for s in samples if s.label == 0][: n - 2] + [s.path for s in samples if s.label == 1][:2]


@pytest.fixture(scope="module")
def feats(small_demo, tiny_encoder):
    return Detector(FiseConfig(**TINY), encoder=tiny_encoder).encode(batch_paths(small_demo))


@pytest.mark.parametrize("name", sorted(m for m, s in METHODS.items() if not s.windows))  # winclip: test_winclip.py
def test_the_spec_flags_decide_the_branches_and_the_maps(name, feats, tiny_encoder):
    spec = METHODS[name]
    cfg = FiseConfig(**TINY, method=name)
    res = Detector(cfg, encoder=tiny_encoder).score_features(feats, "textile")
    n, grid = 5, tuple(feats.grid)
    assert (res.text_map is not None, res.text_scores is not None) == (spec.text, spec.text)
    assert (res.visual_map is not None) == spec.visual
    assert (res.keep is not None) == spec.text_filter
    a_t = s_t = keep = penalty = None
    if spec.text:
        t = text_embeddings(tiny_encoder, "textile")
        a_t, s_t = text_map(feats.dense, t), text_score(feats.global_embedding, t)
        np.testing.assert_allclose(res.text_map.reshape(n, -1), a_t.numpy(), atol=1e-6)
        np.testing.assert_allclose(res.text_scores, s_t.numpy(), atol=1e-6)
    if spec.text_filter:
        keep, penalty = reference_keep(a_t, cfg.filter, cfg.filter_theta, cfg.filter_ratio, cfg.filter_min_keep)
        np.testing.assert_array_equal(res.keep.reshape(n, -1), keep.numpy())
    if spec.visual:
        a_v = match(feats.layers, grid, cfg.degrees, keep=keep, penalty=penalty, topmin_max=cfg.topmin_max,
                    engine="reference")  # the short engine that reads like the paper
        np.testing.assert_allclose(res.visual_map.reshape(n, -1), a_v.numpy(), atol=1e-5)
    if spec.fused:
        patch = fuse(a_v, a_t, cfg.fusion, cfg.alpha, cfg.gate_tau, cfg.fusion_norm)
    else:
        patch = a_v if spec.visual else a_t
    maps = gaussian_smooth(upsample(patch, grid, 112), spec.sigma)  # the spec's default smoothing
    np.testing.assert_allclose(res.maps, maps.numpy(), atol=1e-4)
    np.testing.assert_allclose(res.scores, maps.flatten(1).amax(1).numpy(), atol=1e-4)


def test_without_the_text_filter_the_method_equals_its_filtered_twin_with_filter_none(feats, tiny_encoder):
    """fiseclip-nofilter is fiseclip with the filter off, and the filter changes the result."""
    twins = [(a, b) for a in METHODS.values() for b in METHODS.values()
             if a.text_filter and not b.text_filter and (a.text, a.visual) == (b.text, b.visual)]
    assert twins
    for filtered, plain in twins:
        score = lambda **kw: Detector(FiseConfig(**TINY, **kw), encoder=tiny_encoder).score_features(  # noqa: E731
            feats, "textile").maps
        np.testing.assert_allclose(score(method=plain.name), score(method=filtered.name, filter="none"))
        strict = score(method=filtered.name, filter="top_ratio", filter_ratio=0.5)
        assert not np.allclose(strict, score(method=plain.name))


@pytest.fixture(scope="module")
def cnn():
    return load_encoder("efficientnet-lite0", "none", image_size=64, device="cpu")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_an_encoder_without_text_tower_runs_exactly_the_methods_without_text(name, cnn):
    cfg = FiseConfig(method=name, model="efficientnet-lite0", pretrained="none", image_size=64, device="cpu")
    if METHODS[name].text:
        with pytest.raises(FiseclipError, match=f"method '{name}' needs a text tower"):
            Detector(cfg, encoder=cnn)
    else:
        res = Detector(cfg, encoder=cnn).score_batch([np.full((64, 64, 3), i * 40, np.uint8) for i in range(3)],
                                                     "textile")
        assert np.isfinite(res.scores).all() and res.text_map is None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_spec_gives_the_defaults_and_the_options_override_them(name):
    spec = METHODS[name]
    cfg = FiseConfig(method=name)
    assert cfg.spec is spec and spec.name == name
    assert (cfg.smoothing_sigma, cfg.use_rscin) == (spec.sigma, spec.rscin)
    assert FiseConfig(method=name, sigma=2).smoothing_sigma == 2.0
    assert cfg.with_overrides([f"rscin={not spec.rscin}"]).use_rscin is (not spec.rscin)
    # the whole category as one pool only where the spec says so, and only with musc_pool=category
    assert cfg.batch_size_for(100) == (100 if spec.category_pool else cfg.batch_size)
    assert FiseConfig(method=name, musc_pool="batch").batch_size_for(100) == cfg.batch_size
