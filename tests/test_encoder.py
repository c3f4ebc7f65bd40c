import time

import pytest
import torch

from fiseclip_lib.encoder import EFFICIENTNET_MODEL, load_encoder
from fiseclip_lib.errors import FiseclipError, WeightsUnavailableError


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", [112, 168])
def test_tiny_encoder_shapes_at_two_input_sizes(tiny_encoder, size):
    x = torch.randn(3, 3, size, size)
    f = tiny_encoder(x, layers=[1, 2, 4], restore="clearclip")
    g = size // 14
    assert f.grid == (g, g)
    assert sorted(f.layers) == [1, 2, 4]
    for t in f.layers.values():
        assert t.shape == (3, g * g, 64)
    assert f.global_embedding.shape == (3, 64)
    assert f.dense.shape == (3, g * g, 64)
    assert torch.allclose(f.dense.norm(dim=-1), torch.ones(3, g * g), atol=1e-5)


def test_tokens_equal_open_clip_forward(tiny_encoder):
    """Every requested layer and the global embedding equal open_clip's own forward at the native size."""
    x = torch.randn(2, 3, 112, 112)
    f = tiny_encoder(x, layers=[1, 2, 3, 4], restore="vanilla")
    ref = tiny_encoder.model.visual.forward_intermediates(x, indices=[0, 1, 2, 3], output_fmt="NLC")
    for layer, expected in zip([1, 2, 3, 4], ref["image_intermediates"]):
        torch.testing.assert_close(f.layers[layer], expected, rtol=1e-5, atol=1e-5)
    emb = tiny_encoder.model.encode_image(x, normalize=True)
    torch.testing.assert_close(f.global_embedding, emb, rtol=1e-5, atol=1e-5)
    v = tiny_encoder.model.visual
    final = torch.nn.functional.normalize(v.ln_post(ref["image_intermediates"][-1]) @ v.proj, dim=-1)
    torch.testing.assert_close(f.dense, final, rtol=1e-5, atol=1e-5)


def test_forward_accepts_images_as_well_as_pixels(tiny_encoder, small_demo):
    paths = sorted(str(p) for p in (small_demo / "brick" / "test" / "good").glob("*.png"))[:2]
    a = tiny_encoder(paths, layers=[2])
    b = tiny_encoder(tiny_encoder.preprocess(paths), layers=[2])
    assert torch.equal(a.layers[2], b.layers[2]) and a.grid == (8, 8)


def test_layers_do_not_alias(tiny_encoder):
    f = tiny_encoder(torch.randn(2, 3, 112, 112), layers=[1, 2, 3, 4])
    ts = list(f.layers.values())
    for i in range(len(ts)):
        for j in range(i + 1, len(ts)):
            assert not torch.allclose(ts[i], ts[j])
            assert ts[i].data_ptr() != ts[j].data_ptr()


def test_forward_leaves_parameters_and_positional_embedding_unchanged(tiny_encoder):
    before = snapshot(tiny_encoder.model)
    tiny_encoder(torch.randn(2, 3, 168, 168), layers=[2, 4], restore="naclip")
    tiny_encoder(torch.randn(2, 3, 112, 112), layers=[2, 4], restore="sclip")
    after = snapshot(tiny_encoder.model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert tiny_encoder.model.visual.positional_embedding.shape[0] == 1 + 8 * 8


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_local_checkpoint_round_trip(tmp_path, fmt):
    src = load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", seed=123)
    sd = src.model.state_dict()
    path = tmp_path / f"tiny.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    loaded = load_encoder("fiseclip-tiny", str(path), image_size=112, device="cpu", seed=999)
    assert loaded.pretrained
    x = torch.randn(2, 3, 112, 112)
    a, b = src(x, layers=[4]), loaded(x, layers=[4])
    torch.testing.assert_close(a.layers[4], b.layers[4])
    other = load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", seed=999)
    assert not torch.allclose(other(x, layers=[4]).layers[4], a.layers[4])


def test_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(3)}, str(path))
    with pytest.raises(FiseclipError, match="does not fit"):
        load_encoder("fiseclip-tiny", str(path), image_size=112, device="cpu")


def test_offline_weights_error_is_fast_and_names_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(WeightsUnavailableError) as info:
        load_encoder("ViT-B-16", "openai", image_size=224, device="cpu", cache_dir=str(tmp_path))
    assert time.time() - t0 < 5
    msg = str(info.value)
    assert "ViT-B-16" in msg and "openai" in msg and str(tmp_path) in msg
    assert "fiseclip fetch-weights" in msg and "--pretrained /path/to/weights.safetensors" in msg
    assert "\n" not in msg


def test_bad_arguments_are_clear_errors():
    with pytest.raises(FiseclipError, match="unknown model"):
        load_encoder("ViT-Z-99", "none", image_size=64, device="cpu")
    with pytest.raises(FiseclipError, match="multiple of the patch size 14"):
        load_encoder("fiseclip-tiny", "none", image_size=60, device="cpu")
    with pytest.raises(FiseclipError, match="fp16 needs CUDA"):
        load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", precision="fp16")
    with pytest.raises(FiseclipError, match="known tag"):
        load_encoder("fiseclip-tiny", "openai", image_size=112, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FiseclipError, match="CUDA is not available"):
            load_encoder("fiseclip-tiny", "none", image_size=112, device="cuda")


def test_bf16_cast_close_to_fp32(tiny_encoder):
    bf = load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", precision="bf16")
    x = torch.randn(2, 3, 112, 112)
    a = tiny_encoder(x, layers=[4]).global_embedding
    b = bf(x, layers=[4]).global_embedding
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.98


def test_efficientnet_pretrained_features_load_and_differ_from_random():
    pre = load_encoder(EFFICIENTNET_MODEL, "imagenet", image_size=64, device="cpu")
    rnd = load_encoder(EFFICIENTNET_MODEL, "none", image_size=64, device="cpu")
    assert pre.pretrained and not rnd.pretrained and not pre.has_text
    x = torch.randn(2, 3, 64, 64)
    a, b = pre(x, layers=[3, 4, 5]), rnd(x, layers=[3, 4, 5])
    assert a.grid == (8, 8) and a.global_embedding is None
    assert [t.shape[-1] for t in a.layers.values()] == [40, 80, 112]
    for l in a.layers:
        assert not torch.allclose(a.layers[l], b.layers[l])
    # the packaged weights are the ImageNet ones: BatchNorm statistics are not the init values
    bn = pre.model.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    with pytest.raises(FiseclipError, match="no text tower"):
        pre.encode_text(["a photo"])
    odd = load_encoder(EFFICIENTNET_MODEL, "imagenet", image_size=518, device="cpu")  # the paper size works too
    assert odd(torch.randn(1, 3, 518, 518), layers=[3]).layers[3].shape == (1, 64 * 64, 40)
