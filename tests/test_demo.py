import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from fiseclip_lib.evaluation import data as D
from fiseclip_lib.evaluation.demo import DEFECTS, build_demo, synthesize_defect


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(n_good=3, n_defect=5, n_train=1, size=64)
    a = build_demo(tmp_path / "a", seed=0, **kw)
    b = build_demo(tmp_path / "b", seed=0, **kw)
    c = build_demo(tmp_path / "c", seed=1, **kw)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


@pytest.mark.slow  # builds the default demo set (README command 1's)
def test_default_demo_has_enough_images_and_anomalies(default_demo):
    root = default_demo
    samples = D.load_mvtec(root)
    cats = D.categories_of(samples)
    assert len(cats) >= 2
    for cat in cats:
        cs = [s for s in samples if s.category == cat]
        assert len(cs) >= 60
        assert sum(s.label for s in cs) / len(cs) >= 0.25
        assert {s.defect for s in cs} == set(DEFECTS) | {"good"}
        for s in cs:
            if s.label:
                m = D.load_mask(s.mask)
                assert m.any() and m.shape == (256, 256)
    assert json.loads((root / "manifest.json").read_text())["params"]["seed"] == 0


@pytest.mark.parametrize("kind", DEFECTS)
@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_defect_changes_exactly_its_mask(kind, strength):
    rng = np.random.default_rng(7)
    arr = np.random.default_rng(0).integers(40, 200, (96, 96, 3), dtype=np.uint8)
    clean = Image.fromarray(arr)
    bad, mask = synthesize_defect(clean, kind, rng, strength=strength)
    changed = np.any(np.asarray(bad) != arr, axis=-1)
    assert mask.any()
    assert not (changed & ~mask).any(), "pixels outside the mask changed"
    assert (changed & mask).sum() == mask.sum(), "masked pixels left unchanged"


def test_rebuilding_into_a_foreign_folder_needs_force(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "other.txt").write_text("mine")
    with pytest.raises(Exception, match="--force"):
        build_demo(tmp_path / "x", n_good=1, n_defect=1, n_train=0, size=64)
