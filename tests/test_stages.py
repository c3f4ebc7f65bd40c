"""Small pure functions of the stages: text prompts and maps, post-processing, study helpers."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from fiseclip_lib import data as D
from fiseclip_lib.filtering import oracle_keep
from fiseclip_lib.postprocess import gaussian_smooth, image_scores, upsample
from fiseclip_lib.restore import mean_attention_distance
from fiseclip_lib.text import (ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, build_prompts, class_phrase,
                               text_embeddings, text_map, text_score)


def test_prompt_ensemble_sizes_and_class_phrases():
    assert len(TEMPLATES) == 35
    normal, abnormal = build_prompts("metal nut")
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert "a photo of a flawless metal nut." in normal and "a photo of a damaged metal nut." in abnormal
    assert len(set(normal)) == len(normal)
    assert class_phrase("metal_nut") == "metal nut"
    assert class_phrase("pcb1") == "printed circuit board"
    assert class_phrase("pcb1", {"pcb1": "circuit board"}) == "circuit board"
    assert NORMAL_STATES[0] == "{}" and len(ABNORMAL_STATES) == 5


def test_text_map_is_the_softmax_of_the_two_similarities():
    dense = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    a = text_map(dense, t, temperature=100.0)
    s_n, s_a = (dense @ t[0]).double(), (dense @ t[1]).double()
    expected = (torch.exp(100 * s_a) / (torch.exp(100 * s_n) + torch.exp(100 * s_a))).float()  # exact in float64
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    g = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    torch.testing.assert_close(text_score(g, t), text_map(g[:, None], t)[:, 0])


def test_text_embeddings_are_cached_per_class(tiny_encoder, monkeypatch, tmp_path):
    monkeypatch.setenv("FISECLIP_FEATURE_CACHE", str(tmp_path))  # an empty on-disk text cache
    calls = []
    real = tiny_encoder.encode_text
    monkeypatch.setattr(tiny_encoder, "encode_text", lambda prompts: calls.append(len(prompts)) or real(prompts))
    a = text_embeddings(tiny_encoder, "screw")
    b = text_embeddings(tiny_encoder, "screw")
    text_embeddings(tiny_encoder, "cable")
    assert torch.equal(a, b) and a.shape == (2, 64)
    assert calls == [245, 175, 245, 175]
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))


def test_gaussian_smooth_matches_scipy():
    x = torch.rand(2, 40, 33)
    ours = gaussian_smooth(x, sigma=2.0).numpy()
    for i in range(2):
        ref = ndimage.gaussian_filter(x[i].numpy().astype(np.float64), sigma=2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)
    assert torch.equal(gaussian_smooth(x, 0.0), x)


def test_upsample_uses_align_corners():
    m = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # one image, grid 2 x 2
    up = upsample(m, (2, 2), 3)
    assert up.shape == (1, 3, 3)
    assert up[0, 0, 0] == 0 and up[0, 2, 2] == 3 and up[0, 1, 1] == pytest.approx(1.5)


def test_image_scores_against_naive_max():  # RsCIN: tests/test_musc.py
    maps = torch.rand(5, 8, 8)
    st = torch.rand(5)
    torch.testing.assert_close(image_scores(maps, st, 0.5), maps.amax(dim=(1, 2)) + 0.5 * st)


def test_mean_attention_distance_of_uniform_identity_and_local_attention():
    grid = (3, 3)
    L = 10
    assert mean_attention_distance(None, grid) == 0.0
    eye = torch.eye(L)[None, None]
    assert mean_attention_distance(eye, grid) == pytest.approx(0.0)
    uniform = torch.full((1, 1, L, L), 1.0 / L)
    ys, xs = np.meshgrid(range(3), range(3), indexing="ij")
    pos = np.stack([ys.ravel(), xs.ravel()], 1)
    naive = np.mean([np.mean([np.linalg.norm(a - b) for b in pos]) for a in pos])
    assert mean_attention_distance(uniform, grid) == pytest.approx(naive, rel=1e-5)


def test_oracle_keep_drops_patches_touching_a_defect():
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 0:3, 0:2] = True  # touches patches (0,0) and (1,0) of a 4 x 4 grid
    keep = oracle_keep(masks, (4, 4))
    assert keep.shape == (2, 16)
    assert not keep[0, 0] and not keep[0, 4] and keep[0, 1] and keep[0].sum() == 14
    assert keep[1].all()


def test_compose_batch_share_and_errors():
    samples = [D.Sample(f"g{i}", "c", 0, "good") for i in range(10)] + [D.Sample(f"b{i}", "c", 1, "x") for i in range(4)]
    b = D.compose_batch(samples, 8, 0.25, seed=1)
    assert len(b) == 8 and sum(s.label for s in b) == 2
    assert b == D.compose_batch(samples, 8, 0.25, seed=1)
    with pytest.raises(Exception, match="needs more images"):
        D.compose_batch(samples, 8, 0.75)
