"""integrations/anomalib_model.py: FiSeCLIP inside anomalib. `Engine().test` on anomalib's own MVTecAD
datamodule (a local MVTec-layout root, never downloaded) scores the same images in the same batches as
`fiseclip run --set shuffle=false` with the datamodule's batch size, and anomalib's own image and pixel AUROC
equal `fiseclip run`'s; the per-image scores and batches are the same too. Skipped without the extra."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("anomalib", reason="the anomalib extra is not installed (pip install 'fiseclip[anomalib]')")

from lightning.pytorch.callbacks import Callback  # noqa: E402  (anomalib's dependency)

from fiseclip_lib.cli import main  # noqa: E402
from fiseclip_lib.config import FiseConfig  # noqa: E402
from fiseclip_lib.errors import FiseclipError  # noqa: E402
from helpers import make_mvtec_tree  # noqa: E402

SIZE, BATCH = 56, 6  # images at the input size: anomalib's masks and ours need no resampling
TINY = dict(model="fiseclip-tiny", pretrained="none", method="fiseclip", image_size=SIZE, device="cpu",
            batch_size=BATCH, shuffle=False)


class Recorder(Callback):
    """Each test batch's image paths and scores, as the model returned them (scores are not normalised)."""

    def __init__(self):
        self.rows = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for path, score in zip(outputs.image_path, outputs.pred_score.tolist()):
            self.rows.append((str(path), float(score), batch_idx))


def test_engine_test_gives_fiseclip_runs_metrics_on_the_same_batches(tmp_path, no_network):
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    from fiseclip_lib.integrations.anomalib_model import FiseclipAnomalib

    # 12 test images in file order: crack x3, good x6, hole x3 -> two batches of 6 that mix the kinds
    root = make_mvtec_tree(tmp_path / "mv", categories=("bottle",), n_good=6, defects=(("crack", 3), ("hole", 3)),
                           size=SIZE)
    out = tmp_path / "run"
    assert main(["run", "--dataset", "mvtec", "--root", str(root), "--out", str(out), "--model", "fiseclip-tiny",
                 "--pretrained", "none", "--method", "fiseclip", "--image-size", str(SIZE), "--batch-size",
                 str(BATCH), "--device", "cpu", "--set", "shuffle=false", "--no-progress", "--no-feature-cache"]) == 0
    ours = json.loads((out / "categories" / "bottle.json").read_text())["metrics"]
    scores = pd.read_csv(out / "scores.csv")

    recorder = Recorder()
    datamodule = MVTecAD(root=root, category="bottle", eval_batch_size=BATCH, num_workers=0)
    engine = Engine(default_root_dir=tmp_path / "anomalib", accelerator="cpu", devices=1, logger=False,
                    callbacks=[recorder])
    [theirs] = engine.test(FiseclipAnomalib(FiseConfig(**TINY)), datamodule=datamodule)

    # the same images in the same batches with the same scores ...
    got = {str(Path(p).relative_to(root)): (s, b) for p, s, b in recorder.rows}
    assert set(got) == set(scores.path) and len(recorder.rows) == 12
    for path, score, batch in zip(scores.path, scores.score, scores.batch):
        assert got[path][1] == batch, path
        assert got[path][0] == pytest.approx(score, abs=1e-5), path
    # ... hence anomalib's own metrics equal ours (torchmetrics computes in float32)
    assert theirs["image_AUROC"] == pytest.approx(ours["image_auroc"], abs=1e-6)
    assert theirs["pixel_AUROC"] == pytest.approx(ours["pixel_auroc"], abs=1e-6)
    assert 0 < ours["pixel_auroc"] < 1 and 0 < ours["image_auroc"] < 1  # not a degenerate coincidence
    # anomalib's visualiser wrote an image per test image
    assert len(list((tmp_path / "anomalib").rglob("images/*/*.png"))) == 12


def test_a_method_that_rescores_a_whole_category_is_refused():
    from fiseclip_lib.integrations.anomalib_model import FiseclipAnomalib

    with pytest.raises(FiseclipError, match="RsCIN over a whole category.*rscin=False"):
        FiseclipAnomalib(FiseConfig(**{**TINY, "method": "musc"}))
    with pytest.raises(FiseclipError, match="whole category as one batch.*musc_pool='batch'"):
        FiseclipAnomalib({**TINY, "method": "musc", "rscin": False})  # MuSc's pool is the category, not a batch
    model = FiseclipAnomalib({**TINY, "method": "musc", "rscin": False, "musc_pool": "batch"})  # a mapping works
    assert model.learning_type.value == "zero_shot" and model.pre_processor.transform.size == [SIZE, SIZE]
