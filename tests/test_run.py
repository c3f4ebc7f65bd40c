"""evaluation/run.py: the per-category task run and sweep share, and what config.json records."""
import json

import pandas as pd

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.decisions.calibrate import config_hash
from fiseclip_lib.evaluation.run import run_benchmark
from fiseclip_lib.evaluation.sweep import run_sweep

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", batch_size=8)


def test_config_json_records_the_resolved_values(small_demo, tmp_path):
    run_benchmark("demo", small_demo, FiseConfig(**TINY, method="musc"), tmp_path / "o", categories=["textile"],
                  progress=False)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["config"]
    assert (cfg["sigma"], cfg["rscin"], cfg["rscin_ks"]) == (0.0, True, [1, 2, 3])
    assert FiseConfig.from_dict(cfg).resolved("demo") == cfg  # a recorded config reads back as itself


def test_threshold_hash_sees_resolved_values_not_how_they_were_written():
    auto = FiseConfig(**TINY).to_dict()
    explicit = FiseConfig(**TINY, sigma=4.0, rscin=False, rscin_ks=(1, 2, 3)).to_dict()
    assert config_hash(auto) == config_hash(explicit)
    assert config_hash(auto) != config_hash(FiseConfig(**TINY, sigma=2.0).to_dict())
    # changes no score: ignored; batch-only fields are ignored for streamed scores only
    assert config_hash(auto) == config_hash(FiseConfig(**TINY, encode_batch=1, match_engine="reference").to_dict())
    other_batch = FiseConfig(**{**TINY, "batch_size": 4}).to_dict()
    assert config_hash(auto) != config_hash(other_batch)
    assert config_hash(auto, "stream") == config_hash(other_batch, "stream")


def test_run_and_sweep_write_the_same_results_through_one_task(small_demo, tmp_path):
    grid = {"dataset": "demo", "root": str(small_demo), "categories": ["brick", "textile"],
            **{k: v for k, v in TINY.items()}, "topmin_max": [0.3]}
    run_sweep(grid, tmp_path / "sweep", progress=False)
    run_benchmark("demo", small_demo, FiseConfig(**TINY), tmp_path / "run", progress=False)
    (folder,) = (tmp_path / "sweep" / "configs").iterdir()
    for name in ("metrics.csv", "scores.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(folder / name), pd.read_csv(tmp_path / "run" / name))
    for cat in ("textile", "brick"):
        a = json.loads((folder / "categories" / f"{cat}.json").read_text())
        b = json.loads((tmp_path / "run" / "categories" / f"{cat}.json").read_text())
        assert {k: a[k] for k in b} == b  # the sweep adds its encoder record, nothing else differs


def test_a_threshold_from_a_visa_run_applies_to_predict_unless_rscin_uses_visas_k_list():
    """config.json of a VisA run records MuSc's VisA k list; without RsCIN that list changes no score."""
    plain = FiseConfig(**TINY)
    assert config_hash(plain.resolved("visa")) == config_hash(plain.to_dict())
    musc = FiseConfig(**TINY, method="musc")
    assert config_hash(musc.resolved("visa")) != config_hash(musc.to_dict())
