"""Streams with tiles and alignment: each image cut and registered as a batch would be, scored against the units
of its references (decisions/stream.py `_Frames`)."""
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core import align
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.references import ReferenceBank
from fiseclip_lib.decisions.stream import Streamer
from fiseclip_lib.errors import FiseclipError

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu")
S = 112


def textured(n, side, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = ndimage.gaussian_filter(rng.normal(size=(side, side, 3)), (2, 2, 0))
        out.append(np.clip(128 + 60 * x / x.std(), 0, 255).astype(np.uint8))
    return out


def saved(arrays, folder):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(a).save(paths[-1])
    return paths


@pytest.mark.parametrize("tile_match, method", [("same", "musc"), ("all", "musc"), ("same", "fiseclip")])
def test_a_tiled_stream_scores_as_score_against_with_the_same_references(tiny_encoder, tmp_path, tile_match, method):
    refs = saved(textured(3, 2 * S, seed=1), tmp_path / "refs")
    ims = saved(textured(3, 2 * S, seed=2), tmp_path / "ims")
    cfg = FiseConfig(**TINY, method=method, tiles="2x2", tile_overlap=0.25, tile_match=tile_match, rscin=False)
    det = Detector(cfg, encoder=tiny_encoder)
    s = Streamer(det, "object", bank_size=4, references=refs, threshold=1e9, text_gate=None)
    first = s.push(ims[0], keep_map=True)
    bank = ReferenceBank.from_images(det, refs, "object", box_inputs=True)
    direct = det.score_against([ims[0]], "object", references=bank)
    assert first.map.shape == (2 * S, 2 * S)
    np.testing.assert_allclose(first.map, direct.maps[0], atol=1e-5)
    assert first.score == pytest.approx(float(direct.scores[0]), abs=1e-5)
    assert first.references == 3 and sorted(first.reference_paths) == sorted(map(str, refs))
    second = s.push(ims[1], keep_map=True)  # the first image is now a reference, with all of its tiles
    assert second.references == 4 and str(ims[0]) in second.reference_paths
    assert len(s.rolling) == 2 and all(len(g) == 4 for g in s.rolling)  # images, four tiles each
    # a copy of a reference is never its own reference, tile by tile
    copy = tmp_path / "copy.png"
    copy.write_bytes(refs[0].read_bytes())
    assert str(refs[0]) not in s.push(copy).reference_paths


def test_known_good_tiles_start_the_online_rule(tiny_encoder, tmp_path):
    refs = saved(textured(4, 2 * S, seed=3), tmp_path / "refs")
    det = Detector(FiseConfig(**TINY, method="musc", tiles="2x2", rscin=False), encoder=tiny_encoder)
    s = Streamer(det, "object", bank_size=2, references=refs, text_gate=None, min_history=4)
    assert len(s.normal_scores) == 4 and np.isfinite(list(s.normal_scores)).all()
    assert s.push(saved(textured(1, 2 * S, seed=4), tmp_path / "q")[0]).state == "warm"


def test_an_aligned_stream_registers_to_the_known_good_median_and_reports_the_shift(tiny_encoder, tmp_path):
    base = textured(1, S, seed=5)[0]
    refs = saved([align.shift_image(base, (0, 0))] * 1 + [align.shift_image(base, t) for t in [(1, 0), (0, -1)]],
                 tmp_path / "refs")
    moved = saved([align.shift_image(base, (4, -3))], tmp_path / "q")[0]
    cfg = FiseConfig(**TINY, method="musc", match_window=1, align="translation", rscin=False)
    det = Detector(cfg, encoder=tiny_encoder)
    s = Streamer(det, "object", bank_size=2, references=refs, threshold=1e9, text_gate=None)
    r = s.push(moved, keep_map=True)
    np.testing.assert_allclose(r.shift, (-4, 3), atol=0.75)  # onto the references' frame
    bank = ReferenceBank.from_images(det, refs, "object", box_inputs=True)
    direct = det.score_against([moved], "object", references=bank)
    np.testing.assert_allclose(direct.shifts[0], r.shift, atol=1e-9)
    np.testing.assert_allclose(r.map, direct.maps[0], atol=1e-5)
    assert r.score == pytest.approx(float(direct.scores[0]), abs=1e-5)
    # registered, the moved copy of the part scores like the part; unregistered, higher
    plain = Streamer(Detector(cfg.replace(align="none"), encoder=tiny_encoder), "object", bank_size=2,
                     references=refs, threshold=1e9, text_gate=None)
    assert r.score < plain.push(moved).score


def test_bad_tiled_and_aligned_streams_are_one_line_errors(tiny_encoder, tmp_path):
    cfg = FiseConfig(**TINY, method="musc", match_window=1, align="translation")
    with pytest.raises(FiseclipError, match="median of the known-good references") as e:
        Streamer(Detector(cfg, encoder=tiny_encoder), "object", bank_size=2)
    assert "\n" not in str(e.value)
    s = Streamer(Detector(FiseConfig(**TINY, method="musc", tiles="2x2"), encoder=tiny_encoder), "object",
                 bank_size=2, threshold=1e9)
    ims = saved(textured(1, 2 * S) + textured(1, 2 * S + 10), tmp_path / "ims")
    s.push(ims[0])
    with pytest.raises(FiseclipError, match="takes one size"):
        s.push(ims[1])


def test_predict_streams_tiles_with_maps_at_the_original_size(tiny_encoder, tmp_path):
    from fiseclip_lib.decisions.predict import predict

    ims = saved(textured(4, 2 * S, seed=6), tmp_path / "ims")
    det = Detector(FiseConfig(**TINY, method="musc", tiles="2x2", rscin=False), encoder=tiny_encoder)
    df = predict(ims, "object", detector=det, stream=True, bank_size=2, out=tmp_path / "out", save_maps=True,
                 overlays=True, progress=False)
    assert len(df) == 4 and np.isfinite(df["score"]).all()
    assert np.load(tmp_path / "out" / "maps.npz")["maps"].shape == (4, 2 * S, 2 * S)
    assert Image.open(tmp_path / "out" / df["overlay"][0]).size[0] >= 2 * S
