"""WinCLIP (core/winclip.py, encoder/windows.py, the `winclip` method spec): the pure functions against naive
loops on tiny tensors, the window embeddings against open_clip's own forward, the method on the scoring path, and
the whole method against anomalib's `WinClipModel` on identical pixels and weights (maps and image scores within
1e-4, zero-shot and few-shot).

anomalib 2.7 with open_clip 3.x embeds the windows otherwise than WinCLIP defines them: its
`_get_window_embeddings` turns the window sequences to (token, window, width) for a sequence-first transformer,
but open_clip's transformer is batch-first, so each block attends across the windows (and images) at each token
position instead of across the tokens of one window. The class tokens then only ever see each other, all equal,
so every window embedding is the same vector and the maps are flat (the anomalib test checks this first).
The reference here is anomalib's own model with its transformer told, for that one call, that the sequences are
sequence-first (it then turns them back), so that each window is a sequence of its own; every other step (prompt
ensemble, text embeddings, scores, harmonic aggregation, few-shot association, resizing) is anomalib's code.
"""
import itertools

import numpy as np
import pytest
import torch

from fiseclip_lib.config import FiseConfig
from fiseclip_lib.core import winclip as W
from fiseclip_lib.core.detector import Detector
from fiseclip_lib.core.references import ReferenceBank
from fiseclip_lib.encoder import load_encoder
from fiseclip_lib.encoder.windows import window_embeddings, window_index
from fiseclip_lib.errors import FiseclipError

TINY = dict(model="fiseclip-tiny", pretrained="none", image_size=112, device="cpu", method="winclip")


def images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]


# ---------------------------------------------------------------- pure functions against naive loops
@pytest.mark.parametrize("grid,scale", [((3, 3), 2), ((4, 5), 2), ((5, 4), 3), ((3, 3), 3), ((2, 6), 1)])
def test_window_index_lists_each_window_patches_row_major(grid, scale):
    h, w = grid
    naive = [[(r + i) * w + (c + j) for i in range(scale) for j in range(scale)]
             for r in range(h - scale + 1) for c in range(w - scale + 1)]
    assert window_index(grid, scale).tolist() == naive


def test_window_index_refuses_a_window_larger_than_the_grid():
    with pytest.raises(FiseclipError, match="does not fit the 2x5 patch grid"):
        window_index((2, 5), 3)


def test_harmonic_aggregation_equals_a_loop_over_the_windows_covering_each_patch():
    grid = (4, 5)
    index = window_index(grid, 2)
    scores = torch.rand(3, len(index)) * 0.9 + 0.05
    scores[1, 4] = 0.0  # a zero window score makes the patches it covers 0 (1/0 in the harmonic mean)
    out = W.harmonic_aggregation(scores, index, grid)
    for b, p in itertools.product(range(3), range(grid[0] * grid[1])):
        covering = [scores[b, k].item() for k in range(len(index)) if p in index[k].tolist()]
        expected = 0.0 if 0.0 in covering else len(covering) / sum(1 / s for s in covering)
        assert out[b].flatten()[p].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert out[1].flatten()[index[4]].eq(0).all() and out[1].gt(0).sum() == grid[0] * grid[1] - 4


def test_visual_association_is_the_smallest_halved_cosine_distance_to_any_reference_position():
    emb, refs = torch.randn(2, 5, 7), torch.randn(3, 4, 7)
    out = W.visual_association(emb, refs)
    for b, m in itertools.product(range(2), range(5)):
        dists = [(1 - torch.cosine_similarity(emb[b, m], refs[k, j], dim=0).item()) / 2
                 for k in range(3) for j in range(4)]
        assert out[b, m].item() == pytest.approx(min(dists), abs=1e-6)
    assert W.visual_association(refs[:1], refs).abs().max() < 1e-6  # a reference is at distance 0 from itself


def test_abnormal_probability_and_harmonic_mean_follow_their_formulas():
    emb, text = torch.randn(4, 6), torch.randn(2, 6)
    cos = [[torch.cosine_similarity(e, t, dim=0).item() for t in text] for e in emb]
    naive = [np.exp(c[1] / 0.07) / (np.exp(c[0] / 0.07) + np.exp(c[1] / 0.07)) for c in cos]
    np.testing.assert_allclose(W.abnormal_probability(emb, text).numpy(), naive, rtol=1e-5)
    a, b = torch.tensor([0.2, 0.5, 0.0]), torch.tensor([0.4, 0.5, 0.3])
    np.testing.assert_allclose(W.harmonic_mean([a, b]).numpy(), [2 / (5 + 2.5), 0.5, 0.0], rtol=1e-6)


def test_prompt_ensemble_puts_every_state_in_every_template():
    normal, anomalous = W.prompt_ensemble("metal nut")
    assert (len(normal), len(anomalous)) == (7 * 21, 4 * 21) == (len(W.NORMAL_STATES) * len(W.TEMPLATES),
                                                                 len(W.ANOMALOUS_STATES) * len(W.TEMPLATES))
    assert normal[0] == "a cropped photo of the metal nut."
    assert anomalous[21] == "a cropped photo of the metal nut with flaw."
    assert all("metal nut" in p for p in normal + anomalous)


# ---------------------------------------------------------------- window embeddings (tiny random ViT)
@pytest.fixture(scope="module")
def tiny():
    return load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu")


def test_a_window_embedding_is_open_clips_forward_of_the_class_token_and_that_window_alone(tiny):
    pixels = tiny.preprocess(images(2, 112))
    got = window_embeddings(tiny, pixels, (2, 3))
    grid = tiny.grid
    v = tiny.model.visual
    with torch.no_grad():
        tokens = tiny.embed_tokens(pixels)
        for s in (2, 3):
            index = window_index(grid, s)
            assert got[s].shape == (2, len(index), tiny.model.text_projection.shape[1])
            for b, k in [(0, 0), (1, len(index) - 1), (1, len(index) // 2)]:
                seq = torch.cat([tokens[b, :1], tokens[b, 1 + index[k]]])[None]
                x = v.transformer(v.ln_pre(seq))  # open_clip's own transformer call, not our block loop
                expected = v.ln_post(x[:, 0]) @ v.proj
                torch.testing.assert_close(got[s][b, k], expected[0], atol=1e-5, rtol=1e-5)


def test_a_window_embedding_depends_on_its_own_patches_only(tiny):
    pixels = tiny.preprocess(images(1, 112))
    changed = pixels.clone()
    changed[..., -14:, -14:] += 1.0  # the last patch of the 8 x 8 grid
    a, b = window_embeddings(tiny, pixels, (2,))[2][0], window_embeddings(tiny, changed, (2,))[2][0]
    covers = (window_index(tiny.grid, 2) == 63).any(1)
    assert covers.sum() == 1
    torch.testing.assert_close(a[~covers], b[~covers])
    assert not torch.allclose(a[covers], b[covers])


# ---------------------------------------------------------------- the method on the scoring path
def test_batch_mode_is_zero_shot_each_image_alone(tiny):
    det = Detector(FiseConfig(**TINY), encoder=tiny)
    ims = images(3, 112, seed=1)
    together = det.score(ims, "bottle")
    alone = [det.score([im], "bottle") for im in ims]
    np.testing.assert_allclose(together.scores, [r.scores[0] for r in alone], atol=1e-6)
    np.testing.assert_allclose(together.maps, np.concatenate([r.maps for r in alone]), atol=1e-6)
    assert together.maps.shape == (3, 112, 112) and np.isfinite(together.maps).all()
    assert together.maps.std(axis=(1, 2)).min() > 0  # windows differ, so the map is not flat


def test_few_shot_scores_the_queries_against_the_bank_with_winclips_formulas(tiny):
    det = Detector(FiseConfig(**TINY), encoder=tiny)
    refs, queries = images(2, 112, seed=2), images(2, 112, seed=3)
    bank = ReferenceBank.from_images(det, refs, "bottle")
    res = det.score(queries, "bottle", references=bank, mutual=True)  # the bank alone: queries never each other
    assert np.allclose(res.scores, det.score(queries, "bottle", references=bank, mutual=False).scores, atol=1e-6)
    q, r = det.encode(queries), det.encode(refs)
    last = tiny.num_layers
    patch = torch.no_grad()(lambda f: tiny.model.visual.ln_post(f.layers[last]))
    text = W.class_text(tiny, "bottle")
    zero, s0 = W.winclip_scores(q.global_embedding, q.windows, text, tiny.grid)
    few = torch.stack([W.visual_association(patch(q), patch(r)).reshape(-1, *tiny.grid)]
                      + [W.harmonic_aggregation(W.visual_association(q.windows[s], r.windows[s]),
                                                window_index(tiny.grid, s), tiny.grid) for s in (2, 3)]).mean(0)
    np.testing.assert_allclose(res.scores, ((s0 + few.flatten(1).amax(1)) / 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(res.maps, W.upsample((zero + few) / 2, 112).numpy(), atol=1e-5)
    assert not np.allclose(res.scores, det.score(queries, "bottle").scores)  # the references count


def test_winclip_refuses_references_without_window_embeddings(tiny):
    plain = Detector(FiseConfig(**{**TINY, "method": "fiseclip"}), encoder=tiny)
    bank = ReferenceBank.from_images(plain, images(1, 112), "bottle")
    with pytest.raises(FiseclipError, match="reference #0 has no WinCLIP window embeddings"):
        Detector(FiseConfig(**TINY), encoder=tiny).score(images(1, 112, seed=5), "bottle", references=bank)


# ---------------------------------------------------------------- against anomalib's WinClipModel
ANOMALIB_REASON = "anomalib is not installed (pip install 'fiseclip[anomalib]')"


def one_sequence_per_window(model):
    """Wrap anomalib's window pass so that its transformer turns the (token, window, width) sequences back to
    one sequence per window (module doc)."""
    windows, transformer = model._get_window_embeddings, model.clip.visual.transformer

    def fixed(feature_map, masks):
        transformer.batch_first = False
        try:
            return windows(feature_map, masks)
        finally:
            transformer.batch_first = True

    model._get_window_embeddings = fixed


def test_the_prompt_ensemble_is_anomalibs():
    prompting = pytest.importorskip("anomalib.models.image.winclip.prompting", reason=ANOMALIB_REASON)
    assert W.prompt_ensemble("metal nut") == tuple(prompting.create_prompt_ensemble("metal nut"))


@pytest.mark.slow
def test_equals_anomalibs_winclip_zero_shot_and_few_shot(tmp_path, monkeypatch):
    """One test, one model on each side (minutes on 2 busy cores: the 231 prompts and the 365 windows per image
    dominate): anomalib as installed is flat; with its window pass set right it equals ours within 1e-4,
    zero-shot on 2 images and few-shot with 1 reference image."""
    tm = pytest.importorskip("anomalib.models.image.winclip.torch_model", reason=ANOMALIB_REASON)
    from safetensors.torch import save_file

    size = 240
    weights = tmp_path / "vit-b-16-plus-240-random.safetensors"
    random_vit = load_encoder("ViT-B-16-plus-240", "none", image_size=size, device="cpu", seed=0).model
    save_file({k: t.contiguous() for k, t in random_vit.state_dict().items()}, str(weights))
    del random_vit
    ours = Detector(FiseConfig(method="winclip", model="ViT-B-16-plus-240", pretrained=str(weights),
                               image_size=size, device="cpu"))
    monkeypatch.setattr(tm, "PRETRAINED", str(weights))  # open_clip takes a local file as `pretrained`
    model = tm.WinClipModel(class_name="bottle").eval()
    refs, queries = images(1, size, seed=12), images(2, size, seed=13)
    pixels = ours.encoder.preprocess(queries)  # the very pixels our encoder sees
    feats = ours.encode(queries)

    _, windows, _ = model.encode_image(pixels[:1])
    assert all(torch.allclose(w, w[:, :1].expand_as(w)) for w in windows), (
        "anomalib now embeds each window apart: compare with it as installed (drop one_sequence_per_window)")
    assert all(w[:1].std(dim=1).max() > 1e-3 for w in feats.windows.values())

    one_sequence_per_window(model)
    res = ours.score_features(feats, "bottle")
    with torch.no_grad():
        ref = model(pixels)
    np.testing.assert_allclose(res.scores, ref.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(res.maps, ref.anomaly_map.numpy(), atol=1e-4)
    assert ref.anomaly_map.std() > 1e-3  # not flat: the windows count

    bank = ReferenceBank.from_images(ours, refs, "bottle")
    res = ours.score_features(feats, "bottle", references=bank, mutual=False)
    model.class_name = None  # its text embeddings stay: setup then only collects the reference image
    model.setup(reference_images=ours.encoder.preprocess(refs))
    with torch.no_grad():
        ref = model(pixels)
    assert model.k_shot == 1
    np.testing.assert_allclose(res.scores, ref.pred_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(res.maps, ref.anomaly_map.numpy(), atol=1e-4)


def test_a_winclip_stream_needs_known_good_references(tiny):
    # without them its first image would be scored zero-shot and the next ones few-shot: two scales
    from fiseclip_lib.decisions.stream import Streamer

    det = Detector(FiseConfig(**TINY), encoder=tiny)
    with pytest.raises(FiseclipError, match="needs known-good references") as e:
        Streamer(det, "object", bank_size=4)
    assert "\n" not in str(e.value)


def test_predict_counts_only_the_bank_as_winclips_references(tiny, tmp_path):
    from PIL import Image

    from fiseclip_lib.decisions.predict import predict

    paths = []
    for i, im in enumerate(images(5, 112, seed=7)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    det = Detector(FiseConfig(**TINY), encoder=tiny)
    zero = predict(paths[:3], "object", detector=det, overlays=False, progress=False)
    assert (zero["references"] == 0).all()  # zero-shot: the batch's other images are not references
    few = predict(paths[:3], "object", detector=det, reference_dir=[str(p) for p in paths[3:]], overlays=False,
                  progress=False)
    assert (few["references"] == 2).all()
