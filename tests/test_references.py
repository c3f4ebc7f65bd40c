"""core/references.py: reference banks, hand-built entries, and scoring against them through the one path."""
import numpy as np
import pytest
import torch

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.matching import lnamd
from fiseclip_lib.core.references import BankEntry, ReferenceBank
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.evaluation import data as D

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", degrees=(1, 3))


def _paths(root, n):
    return [s.path for s in D.load_mvtec(root) if s.category == "textile"][:n]


def test_hand_built_entry_infers_its_square_grid_and_scores_like_a_built_one(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY, method="musc"), encoder=tiny_encoder)
    paths = _paths(small_demo, 6)
    built = ReferenceBank.from_images(det, paths[4:], "textile")
    by_hand = ReferenceBank()
    for one in det.encode_each(paths[4:]):
        z = {(l, r): lnamd(one.layers[l], one.grid, r) for l in one.layers for r in det.config.degrees}
        by_hand.add(BankEntry(features=z))  # no grid given: (8, 8) from its 64 patches
    assert by_hand.grid == built.grid == (8, 8)
    feats = det.encode(paths[:4])
    a = det.score_features(feats, "textile", references=built, mutual=False)
    b = det.score_features(feats, "textile", references=by_hand, mutual=False)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_entry_of_a_non_square_grid_must_say_its_grid():
    z = {(1, 1): torch.nn.functional.normalize(torch.randn(1, 6, 4), dim=-1)}
    with pytest.raises(FiseclipError, match="not a square grid"):
        ReferenceBank([BankEntry(features=z)])
    assert ReferenceBank([BankEntry(features=z, grid=(2, 3))]).grid == (2, 3)


def test_bank_of_another_grid_is_refused(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    paths = _paths(small_demo, 3)
    z = {(l, r): torch.nn.functional.normalize(torch.randn(1, 16, 64), dim=-1) for l in det.layers
         for r in det.config.degrees}
    with pytest.raises(FiseclipError, match="patch grid"):
        det.score(paths, "textile", references=ReferenceBank([BankEntry(features=z)]))


def test_one_image_against_a_bank_is_the_same_alone_or_among_others(small_demo, tiny_encoder):
    """mutual=False: each query is its own normalisation group, so the others scored with it do not matter."""
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    paths = _paths(small_demo, 7)
    bank = ReferenceBank.from_images(det, paths[4:], "textile")
    together = det.score_against(paths[:4], "textile", bank)
    alone = [det.score_against([p], "textile", bank).scores[0] for p in paths[:4]]
    np.testing.assert_allclose(together.scores, alone, rtol=1e-6, atol=1e-6)


def test_leave_one_out_scores_are_each_reference_against_the_others(small_demo, tiny_encoder):
    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    paths = _paths(small_demo, 4)
    bank = ReferenceBank.from_images(det, paths, "textile")
    loo = det.leave_one_out_scores(bank, "textile")
    direct = [det.score_against([p], "textile", ReferenceBank.from_images(det, [q for q in paths if q != p],
                                                                         "textile")).scores[0] for p in paths]
    np.testing.assert_allclose(loo, direct, rtol=1e-6, atol=1e-6)


def test_bank_entries_record_the_content_hash_of_their_image(small_demo, tiny_encoder, tmp_path):
    """`BankEntry.digest` is the feature cache's content hash: equal for a copy or a link, different for another
    image, and also filled for in-memory images (streaming compares it with the images it scores)."""
    import hashlib
    import os
    import shutil

    from PIL import Image

    from fiseclip_lib.plumbing.cache import image_hash

    det = Detector(FiseConfig(**TINY), encoder=tiny_encoder)
    paths = _paths(small_demo, 2)
    shutil.copy(paths[0], tmp_path / "copy.png")
    os.symlink(paths[0], tmp_path / "link.png")
    with Image.open(paths[1]) as im:
        pil = im.convert("RGB")
    bank = ReferenceBank.from_images(det, [*paths, str(tmp_path / "copy.png"), str(tmp_path / "link.png"), pil],
                                     "textile")
    with open(paths[0], "rb") as f:
        naive = hashlib.sha256(f.read()).hexdigest()  # the file's bytes, hashed independently
    assert [e.digest for e in bank.entries] == [naive, image_hash(paths[1]), naive, naive, image_hash(pil)]
    assert len({bank.entries[1].digest, bank.entries[4].digest}) == 2  # pixels and file bytes are hashed apart
    assert BankEntry(features={}).digest is None  # hand-built entries: unknown, never matched


def test_box_inputs_of_a_bank_score_like_the_aggregated_features(small_demo, tiny_encoder):
    """A bank that keeps the layer-normed tokens (box_inputs) is matched by the box engines with one GEMM per layer:
    the same scores as the bank without them (per-degree `cross_distances`) up to rounding; the tokens and
    window norms are those of the matching module (LayerNorm, `_window_norms`), bit for bit."""
    from fiseclip_lib.core.matching import _layer_norm, _window_norms
    for engine in ("auto", "box-torch"):
        det = Detector(FiseConfig(**TINY, method="musc", match_engine=engine), encoder=tiny_encoder)
        paths = _paths(small_demo, 7)
        plain = ReferenceBank.from_images(det, paths[4:], "textile")
        boxed = ReferenceBank.from_images(det, paths[4:], "textile", box_inputs=True)
        assert plain.stacked_tokens() == (None, None)
        tokens, norms = boxed.stacked_tokens()
        assert set(tokens) == set(boxed.entries[0].feats.layers) and set(norms) == set(boxed.entries[0].features)
        for e in boxed.entries:
            for l, t in e.feats.layers.items():
                torch.testing.assert_close(e.tokens[l], _layer_norm(t), rtol=0, atol=0)
                for r in det.config.degrees:
                    torch.testing.assert_close(e.norms[(l, r)], _window_norms(e.tokens[l], e.grid, r), rtol=0, atol=0)
        feats = det.encode(paths[:4])
        a = det.score_features(feats, "textile", references=plain, mutual=False)
        b = det.score_features(feats, "textile", references=boxed, mutual=False)
        np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.maps, a.maps, rtol=0, atol=1e-5)


def test_non_finite_reference_tokens_are_refused_once_when_stacked():
    z = {(1, 1): torch.nn.functional.normalize(torch.randn(1, 4, 3), dim=-1)}
    tok = torch.randn(1, 4, 3)
    good = BankEntry(features=z, tokens={1: tok}, norms={(1, 1): tok.norm(dim=-1)}, path="good.png")
    bad_tok = tok.clone()
    bad_tok[0, 2, 1] = float("inf")
    bad = BankEntry(features=z, tokens={1: bad_tok}, norms={(1, 1): tok.norm(dim=-1)}, path="bad.png")
    assert ReferenceBank([good]).stacked_tokens()[0][1].shape == (1, 4, 3)
    with pytest.raises(FiseclipError, match="bad.png"):
        ReferenceBank([good, bad]).stacked_tokens()
    assert ReferenceBank([good, BankEntry(features=z)]).stacked_tokens() == (None, None)  # hand-built: no box route


def test_unit_flags_are_checked_once_per_entry(small_demo, tiny_encoder):
    """Entries made by `reference_entry` record, per (layer, degree), that their features are finite unit vectors
    (no per-query check); a hand-built entry has none, so the bank's features are checked at every query."""
    det = Detector(FiseConfig(**TINY, method="musc"), encoder=tiny_encoder)
    bank = ReferenceBank.from_images(det, _paths(small_demo, 3), "textile")
    flags = bank.unit_flags()
    assert flags is not None and set(flags) == set(bank.entries[0].features) and all(flags.values())
    z = {k: v.clone() for k, v in bank.entries[0].features.items()}
    assert ReferenceBank(bank.entries + [BankEntry(features=z)]).unit_flags() is None
