"""config.py: validation (one-line errors), the choices against the stages that implement them, the fields'
metadata against what scoring actually does, and `resolved()`."""
import dataclasses
import json
import typing

import numpy as np
import pytest
import torch

from fiseclip_lib.config import (BATCH_ONLY_FIELDS, SCORE_NEUTRAL_FIELDS, Filter, FiseConfig, Fusion, FusionNorm,
                                 Method, Restore, default_rscin_ks, field_help, scoring_fields)
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.filtering import FILTER_MODES, reference_keep
from fiseclip_lib.core.fusion import FUSION_MODES, FUSION_NORMS, fuse
from fiseclip_lib.decisions.stream import stream
from fiseclip_lib.encoder.restore import OPERATORS
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D
from fiseclip_lib.methods import METHODS

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=5)
HINTS = typing.get_type_hints(FiseConfig)
CHOICE_FIELDS = [f.name for f in dataclasses.fields(FiseConfig) if typing.get_origin(HINTS[f.name]) is typing.Literal]


def test_config_errors_are_one_line():
    with pytest.raises(FiseclipError, match="unknown restore 'foo'"):
        FiseConfig(restore="foo")
    with pytest.raises(FiseclipError, match="unknown option"):
        FiseConfig().with_overrides(["nonsense=1"])
    with pytest.raises(FiseclipError, match="not a valid float"):
        FiseConfig().with_overrides(["alpha=high"])
    with pytest.raises(FiseclipError, match="batch size 0"):
        FiseConfig(batch_size=0)
    cfg = FiseConfig().with_overrides(["degrees=1,3", "rscin=true", "filter_theta=0.4", "layers=2,4"])
    assert cfg.degrees == (1, 3) and cfg.rscin is True and cfg.filter_theta == 0.4 and cfg.layers == (2, 4)


@pytest.mark.parametrize("name", CHOICE_FIELDS)
def test_a_choice_outside_its_literal_is_one_line_naming_the_field_and_the_choices(name):
    choices = typing.get_args(HINTS[name])
    for make in (lambda v: FiseConfig(**{name: v}), lambda v: FiseConfig().with_overrides([f"{name}={v}"]),
                 lambda v: FiseConfig.from_dict({name: v})):
        for bad in ("bogus", 3):
            with pytest.raises(FiseclipError) as err:
                make(bad)
            msg = str(err.value)
            assert "\n" not in msg and name in msg and all(c in msg for c in choices), msg
    extra = ["match_window=1"] if name == "align" else []  # align needs position-aware matching
    for good in choices:  # and every choice is accepted (the names in the message are the valid ones)
        assert getattr(FiseConfig().with_overrides([f"{name}={good}"] + extra), name) == good


def test_choices_are_exactly_what_the_stages_implement():
    assert set(typing.get_args(Method)) == set(METHODS) and all(k == s.name for k, s in METHODS.items())
    assert set(typing.get_args(Restore)) == set(OPERATORS)
    assert set(FILTER_MODES) == set(typing.get_args(Filter))
    assert set(FUSION_MODES) == set(typing.get_args(Fusion)) and set(FUSION_NORMS) == set(typing.get_args(FusionNorm))
    a_t = torch.rand(2, 16)
    for mode in typing.get_args(Filter):
        keep, penalty = reference_keep(a_t, mode)
        assert keep is None or keep.shape == a_t.shape
    with pytest.raises(FiseclipError, match="unknown filter"):
        reference_keep(a_t, "bogus")
    for mode in typing.get_args(Fusion):
        for norm in typing.get_args(FusionNorm):
            assert torch.isfinite(fuse(torch.rand(2, 16), a_t, mode, norm=norm)).all()
    with pytest.raises(FiseclipError, match="unknown fusion"):
        fuse(a_t, a_t, "bogus")


def test_every_field_is_documented_with_its_source_and_choices():
    helps = field_help()
    for f in dataclasses.fields(FiseConfig):
        # the source vocabulary of the module docstring, optionally qualified: "paper (rule: reconstruction)"
        assert f.metadata["help"] and f.metadata["source"].split()[0] in {"paper", "reconstruction", "engineering"}, \
            f.name
    for name in CHOICE_FIELDS:
        assert all(c in helps[name] for c in typing.get_args(HINTS[name])), name


def batch_paths(root, n=5):
    return [s.path for s in D.load_mvtec(root) if s.category == "textile"][:n]


def test_score_neutral_fields_change_no_score(small_demo, tmp_path):
    """Each field the metadata calls score-neutral, changed, gives the same scores (its encoder loaded from the
    config, so device and cache_dir are exercised too) and the same `scoring_fields`; a scoring field does not."""
    other = {"device": "auto", "cache_dir": str(tmp_path), "encode_batch": 1, "match_engine": "reference"}
    assert set(other) == SCORE_NEUTRAL_FIELDS, "give every score-neutral field a second value to check"
    paths = batch_paths(small_demo)
    base = FiseConfig(**TINY)
    scores = Detector(base).score_batch(paths, "textile").scores
    for name, value in other.items():
        changed = base.replace(**{name: value})
        assert scoring_fields(changed.to_dict()) == scoring_fields(base.to_dict()), name
        np.testing.assert_allclose(Detector(changed).score_batch(paths, "textile").scores, scores, atol=1e-5,
                                   err_msg=name)
    assert scoring_fields(base.replace(alpha=0.3).to_dict()) != scoring_fields(base.to_dict())


@pytest.mark.parametrize("method", [name for name, s in METHODS.items() if s.visual])
def test_batch_only_fields_change_no_streamed_score(small_demo, tiny_encoder, method):
    """Streaming ignores the fields the metadata calls batch-only (and `scoring_fields(stream=True)` drops
    them), while a scoring field changes the streamed scores."""
    other = {"batch_size": 3, "shuffle": False, "musc_pool": "batch", "rscin": not METHODS[method].rscin,
             "rscin_ks": (1, 8, 9)}
    assert set(other) == BATCH_ONLY_FIELDS, "give every batch-only field a second value to check"
    paths = batch_paths(small_demo)
    base = FiseConfig(**TINY, method=method)

    def streamed(cfg):
        return [r.score for r in stream(Detector(cfg, encoder=tiny_encoder), paths, "textile", bank_size=3,
                                        threshold=1e9)]

    scores = streamed(base)
    for name, value in other.items():
        changed = base.replace(**{name: value})
        assert scoring_fields(changed.to_dict(), stream=True) == scoring_fields(base.to_dict(), stream=True)
        assert scoring_fields(changed.to_dict()) != scoring_fields(base.to_dict()), name  # batches: it counts
        assert streamed(changed) == scores, name
    assert streamed(base.replace(topmin_max=1.0)) != scores


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dataset", [None, "mvtec", "visa"])
def test_resolved_replaces_every_auto_by_the_value_a_run_uses(method, dataset):
    spec = METHODS[method]
    auto = FiseConfig(method=method)
    r = auto.resolved(dataset)
    assert (r["sigma"], r["rscin"], r["rscin_ks"]) == (spec.sigma, spec.rscin, list(default_rscin_ks(dataset)))
    assert {k: v for k, v in r.items() if k not in ("sigma", "rscin", "rscin_ks")} == {
        k: v for k, v in auto.to_dict().items() if k not in ("sigma", "rscin", "rscin_ks")}
    assert json.loads(json.dumps(r)) == r and FiseConfig.from_dict(r).resolved(dataset) == r  # a fixed point
    explicit = FiseConfig(method=method, sigma=1.5, rscin=not spec.rscin, rscin_ks=(2, 3)).resolved(dataset)
    assert (explicit["sigma"], explicit["rscin"], explicit["rscin_ks"]) == (1.5, not spec.rscin, [2, 3])


def test_options_added_later_key_runs_only_when_set():
    # runs, thresholds and sweeps keyed before tiles / match_window / align existed keep their keys at the defaults
    base = scoring_fields(FiseConfig().to_dict())
    assert not {"tiles", "tile_overlap", "tile_match", "match_window", "align"} & set(base)
    set_ = scoring_fields(FiseConfig(tiles="2x2", match_window=2, align="translation").to_dict())
    assert {k: set_[k] for k in ("tiles", "match_window", "align")} == {"tiles": "2x2", "match_window": 2,
                                                                       "align": "translation"}
