import json
import time

import numpy as np
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
    with pytest.warns(UserWarning, match="not a multiple of its stride 8; images are resized to 520"):
        odd = load_encoder(EFFICIENTNET_MODEL, "imagenet", image_size=518, device="cpu")  # the paper size
    assert odd.image_size == 518 and odd.pixel_size == 520 and odd.grid == (65, 65)
    assert odd.preprocess([np.zeros((40, 50, 3), np.uint8)]).shape == (1, 3, 520, 520)
    f = odd(torch.randn(1, 3, 518, 518), layers=[3])  # a tensor of another size is resized the same way
    assert f.grid == (65, 65) and f.layers[3].shape == (1, 65 * 65, 40)


# ------------------------------------------------------------------ bad weights: one line, never a traceback

def _tiny_sd(seed=0):
    return load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", seed=seed).model.state_dict()


def _one_line_error(*args, match, **kw):
    with pytest.raises(FiseclipError, match=match) as info:
        load_encoder(*args, device="cpu", **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_files_that_are_not_what_their_suffix_says(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    msg = _one_line_error("fiseclip-tiny", str(junk), image_size=112, match="named .safetensors but is")
    assert str(junk) in msg
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    _one_line_error("fiseclip-tiny", str(text), image_size=112, match="not a torch checkpoint .it is a text file")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    _one_line_error("fiseclip-tiny", str(empty), image_size=112, match="it is empty")
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _tiny_sd().items()}
    truncated = tmp_path / "cut.safetensors"
    save_file(sd, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    _one_line_error("fiseclip-tiny", str(truncated), image_size=112, match="damaged safetensors|named .safetensors")
    misnamed = tmp_path / "real.pt"
    save_file(sd, str(misnamed))
    _one_line_error("fiseclip-tiny", str(misnamed), image_size=112, match="rename it to .safetensors")
    not_sd = tmp_path / "epoch.pt"
    torch.save({"epoch": 3}, not_sd)
    _one_line_error("fiseclip-tiny", str(not_sd), image_size=112, match="does not hold a state dict")


def test_state_dict_with_wrong_shapes_is_one_line(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in _tiny_sd().items()}
    sd["visual.proj"] = torch.zeros(64, 32)  # right key, wrong shape: load_state_dict would raise RuntimeError
    path = tmp_path / "shapes.safetensors"
    save_file(sd, str(path))
    msg = _one_line_error("fiseclip-tiny", str(path), image_size=112, match="wrong shape")
    assert "visual.proj" in msg and "(64, 32)" in msg and "(64, 64)" in msg


def test_efficientnet_typo_path_and_foreign_tag_are_errors(tmp_path):
    typo = tmp_path / "efficientnet_lite0.safetensros"
    msg = _one_line_error(EFFICIENTNET_MODEL, str(typo), image_size=64, match="no such weights file")
    assert str(typo) in msg and "'imagenet'" in msg
    _one_line_error(EFFICIENTNET_MODEL, "openai", image_size=64, match="no such tag")
    assert load_encoder(EFFICIENTNET_MODEL, "default", image_size=64, device="cpu").weights == "imagenet"
    with pytest.raises(FiseclipError, match="too small"):
        load_encoder(EFFICIENTNET_MODEL, "imagenet", image_size=24, device="cpu")


# ------------------------------------------------------------------ preprocessing and QuickGELU from the tag

def test_tag_preprocessing_and_quick_gelu_come_from_its_pretrained_config(tmp_path):
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    from fiseclip_lib.encoder import OPENAI_MEAN, pretrained_tag

    src = load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", seed=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    with pretrained_tag("fiseclip-tiny", "stats-test", file=str(path), mean=mean, std=std,
                        interpolation="bilinear", quick_gelu=True):
        enc = load_encoder("fiseclip-tiny", "stats-test", image_size=112, device="cpu")
    assert not open_clip.get_pretrained_cfg("fiseclip-tiny", "stats-test")  # nothing leaks
    assert enc.mean == mean and enc.std == std and enc.interpolation == "bilinear" and enc.quick_gelu
    assert type(enc.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    ref = np.asarray(img.resize((112, 112), resample=Image.BILINEAR), dtype=np.float32) / 255.0
    ref = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(enc.preprocess([img])[0], ref)
    # a local file: open_clip's defaults for the model; quick_gelu automatic from the name
    plain = load_encoder("fiseclip-tiny", str(path), image_size=112, device="cpu")
    assert plain.mean == OPENAI_MEAN and plain.interpolation == "bicubic" and not plain.quick_gelu
    named = tmp_path / "tiny-openai.safetensors"
    named.write_bytes(path.read_bytes())
    assert load_encoder("fiseclip-tiny", str(named), image_size=112, device="cpu").quick_gelu
    forced = load_encoder("fiseclip-tiny", str(named), image_size=112, device="cpu", quick_gelu=False)
    assert not forced.quick_gelu
    assert type(forced.model.visual.transformer.resblocks[0].mlp.gelu).__name__ != "QuickGELU"


def test_open_clip_tags_with_other_statistics_are_followed():
    import open_clip

    from fiseclip_lib.encoder import OPENAI_MEAN, preprocessing_from

    other = [(m, t) for m, t in open_clip.list_pretrained()
             if tuple(open_clip.get_pretrained_cfg(m, t).get("mean", OPENAI_MEAN)) != tuple(OPENAI_MEAN)]
    assert other, "open_clip ships tags with non-OpenAI statistics (SigLIP, CLIPA, ...)"
    for m, t in other[:5]:
        cfg = open_clip.get_pretrained_cfg(m, t)
        p = preprocessing_from(cfg)
        assert p.mean == tuple(cfg["mean"]) and p.std == tuple(cfg["std"]) and p.interpolation == cfg["interpolation"]


# ------------------------------------------------------------------ identity

def test_identity_follows_weights_content_and_every_feature_option(tmp_path):
    from safetensors.torch import save_file

    from fiseclip_lib.encoder import cache_root, file_sha256

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny_sd(1).items()}, str(path))
    a = load_encoder("fiseclip-tiny", str(path), image_size=112, device="cpu")
    import hashlib

    assert a.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    size = path.stat().st_size
    save_file({k: v.contiguous() for k, v in _tiny_sd(2).items()}, str(path))  # same name, same size
    assert path.stat().st_size == size
    b = load_encoder("fiseclip-tiny", str(path), image_size=112, device="cpu")
    assert a.weights_id != b.weights_id and a.identity() != b.identity()
    # memoised in a sidecar keyed by path + size + mtime + inode: a planted value is returned while the file
    # is untouched, and forgotten once it changes
    sidecar = cache_root() / "weights-sha256.json"
    memo = json.loads(sidecar.read_text())
    memo[str(path.resolve())]["sha256"] = "planted"
    sidecar.write_text(json.dumps(memo))
    assert file_sha256(path) == "planted"
    path.touch()
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    base = load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu").identity()
    variants = [dict(quick_gelu=True), dict(restore_depth=2), dict(precision="bf16"), dict(image_size=168),
                dict(seed=1)]
    for kw in variants:
        args = {"image_size": 112, **kw}
        assert load_encoder("fiseclip-tiny", "none", device="cpu", **args).identity() != base, kw
    for key in ("quick_gelu", "mean", "std", "interpolation", "precision", "image_size", "restore_depth"):
        assert key in base


# ------------------------------------------------------------------ restoration depth

def _naive_restored(enc, x, depth, op):
    """The restored path re-derived with per-head loops from the formulas (CLIP Surgery's dual path)."""
    v = enc.model.visual
    inter = v.forward_intermediates(x, indices=list(range(len(v.transformer.resblocks))), output_fmt="NLC",
                                    intermediates_only=True)
    # forward_intermediates drops the class token: recompute the full token sequence block by block instead
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.view(1, 1, -1).expand(t.shape[0], 1, -1), t], 1) + v.positional_embedding
        t = v.ln_pre(t)
        ins = []
        for blk in v.transformer.resblocks:
            ins.append(t)
            t = blk(t)
        assert torch.allclose(t[:, 1:], inter["image_intermediates"][-1], atol=1e-5)
        stream = ins[-depth]
        for blk, xin in zip(list(v.transformer.resblocks)[-depth:], ins[-depth:]):
            c = xin.shape[-1]
            heads = blk.attn.num_heads
            d = c // heads
            y = blk.ln_1(xin)
            W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            q, k, vv = (y @ W[i * c:(i + 1) * c].T + bias[i * c:(i + 1) * c] for i in range(3))
            outs = []
            for h in range(heads):
                qh, kh, vh = (z[..., h * d:(h + 1) * d] for z in (q, k, vv))
                if op == "vv":
                    a = torch.softmax(vh @ vh.transpose(-1, -2) * d ** -0.5, -1)
                elif op == "sclip":
                    a = (torch.softmax(qh @ qh.transpose(-1, -2) * d ** -0.5, -1)
                         + torch.softmax(kh @ kh.transpose(-1, -2) * d ** -0.5, -1))
                outs.append(a @ vh)
            o = torch.cat(outs, -1) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
            stream = stream + o
            if op == "sclip":  # MLP kept
                stream = stream + blk.mlp(blk.ln_2(stream))
        return torch.nn.functional.normalize(v.ln_post(stream[:, 1:]) @ v.proj, dim=-1)


def test_restore_depth_one_is_the_last_block_and_deeper_matches_a_naive_dual_path(tiny_encoder):
    from fiseclip_lib.encoder.restore import restore_block

    x = torch.randn(2, 3, 112, 112)
    # depth 1 = today's output: restore_block on the last block's input
    v = tiny_encoder.model.visual
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = v.ln_pre(torch.cat([v.class_embedding.view(1, 1, -1).expand(2, 1, -1), t], 1) + v.positional_embedding)
        for blk in list(v.transformer.resblocks)[:-1]:
            t = blk(t)
        old = restore_block(v.transformer.resblocks[-1], t, (8, 8), "clearclip")[0]
        old = torch.nn.functional.normalize(v.ln_post(old[:, 1:]) @ v.proj, dim=-1)
    one = tiny_encoder(x, layers=[2, 4], restore="clearclip")
    torch.testing.assert_close(one.dense, old, rtol=1e-5, atol=1e-5)
    for op in ("vv", "sclip"):
        for depth in (1, 3):
            enc = tiny_encoder.with_restore_depth(depth)
            f = enc(x, layers=[2, 4], restore=op)
            torch.testing.assert_close(f.dense, _naive_restored(tiny_encoder, x, depth, op), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(f.layers[4], one.layers[4])  # raw tokens for matching unchanged
            assert f.global_embedding is not None
    deep = tiny_encoder.with_restore_depth(4)
    assert tiny_encoder.restore_depth == 1  # the copy does not change the original
    torch.testing.assert_close(deep(x, layers=[4], restore="vanilla").dense,
                               tiny_encoder(x, layers=[4], restore="vanilla").dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(deep(x, layers=[4], restore="vv").dense, tiny_encoder(x, layers=[4], restore="vv").dense)
    # without a residual only the last rewritten block survives: depth changes nothing (documented in restore.py)
    torch.testing.assert_close(deep(x, layers=[4], restore="clearclip").dense, one.dense, rtol=1e-5, atol=1e-5)
    for bad in (0, 5):
        with pytest.raises(FiseclipError, match="restore_depth"):
            load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu", restore_depth=bad)


def test_bpe_tokenizer_is_shared_and_a_hugging_face_one_is_not(monkeypatch):
    """The BPE tokenizer is built once per model and text config; a Hugging Face (Rust) tokenizer, which two
    threads must not share, once per encoder."""
    import open_clip

    from fiseclip_lib.encoder import factory

    built = []
    monkeypatch.setattr(open_clip, "get_tokenizer", lambda model: built.append(model) or object())
    factory._bpe_tokenizer.cache_clear()
    try:
        bpe = [factory._tokenizer("m-bpe", {"context_length": 77}) for _ in range(2)]
        other_cfg = factory._tokenizer("m-bpe", {"context_length": 64})
        hf = [factory._tokenizer("m-hf", {"hf_tokenizer_name": "x"}) for _ in range(2)]
    finally:
        factory._bpe_tokenizer.cache_clear()  # no fake tokenizer for later tests
    assert bpe[0] is bpe[1] and other_cfg is not bpe[0]
    assert hf[0] is not hf[1]
    assert built == ["m-bpe", "m-bpe", "m-hf", "m-hf"]


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_average_pooled_global_embedding_equals_open_clip(tmp_path, monkeypatch, final_ln_after_pool):
    """For `avg` pooling the global embedding is open_clip's own: ln_post on the tokens, then the mean (or the
    mean, then ln_post, with final_ln_after_pool), at the native size and at a resized grid."""
    import open_clip
    import open_clip.factory as oc_factory

    from fiseclip_lib.encoder.registry import _CONFIG_DIR, register_model_configs

    register_model_configs()  # before the snapshot below, so the tiny config survives the restore
    # add_model_config is global: restore open_clip's registry afterwards so no test config leaks
    monkeypatch.setattr(oc_factory, "_MODEL_CONFIG_PATHS", list(oc_factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(oc_factory, "_MODEL_CONFIGS", dict(oc_factory._MODEL_CONFIGS))
    cfg = json.loads((_CONFIG_DIR / "fiseclip-tiny.json").read_text())
    cfg["vision_cfg"].update(pool_type="avg", final_ln_after_pool=final_ln_after_pool)
    name = f"fiseclip-tiny-avg-test-{int(final_ln_after_pool)}"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    enc = load_encoder(name, "none", image_size=112, device="cpu", seed=3)
    v = enc.model.visual
    assert v.pool_type == "avg" and v.final_ln_after_pool is final_ln_after_pool
    # a non-zero ln_post shift makes "LayerNorm then mean" and "mean then LayerNorm" differ clearly
    with torch.no_grad():
        v.ln_post.weight.uniform_(0.5, 1.5)
        v.ln_post.bias.normal_(0.0, 1.0)
    x = torch.randn(2, 3, 112, 112)
    f = enc(x, layers=[4])
    emb = enc.model.encode_image(x, normalize=True)
    torch.testing.assert_close(f.global_embedding, emb, rtol=1e-5, atol=1e-5)
    # the other order is measurably different, so the comparison above can tell them apart
    tokens = v.transformer(v._embeds(x))
    other = (v.ln_post(tokens[:, 1:]).mean(1) if final_ln_after_pool else v.ln_post(tokens[:, 1:].mean(1)))
    other = torch.nn.functional.normalize(other @ v.proj, dim=-1)
    assert (other - emb).abs().max() > 1e-3
    # features cached before the fix (other pooling order) are not reused: the identity names the pooling
    assert enc.identity()["global_pool"].startswith("avg:")
    assert "global_pool" not in load_encoder("fiseclip-tiny", "none", image_size=112, device="cpu").identity()
    # a single image gives the same embedding as in the batch
    torch.testing.assert_close(enc(x[:1], layers=[4]).global_embedding, emb[:1], rtol=1e-5, atol=1e-5)


def test_pool_type_none_is_a_clear_error(tmp_path, monkeypatch):
    import open_clip
    import open_clip.factory as oc_factory

    from fiseclip_lib.encoder.registry import _CONFIG_DIR, register_model_configs

    register_model_configs()
    monkeypatch.setattr(oc_factory, "_MODEL_CONFIG_PATHS", list(oc_factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(oc_factory, "_MODEL_CONFIGS", dict(oc_factory._MODEL_CONFIGS))
    cfg = json.loads((_CONFIG_DIR / "fiseclip-tiny.json").read_text())
    cfg["vision_cfg"]["pool_type"] = "none"
    (tmp_path / "fiseclip-tiny-nopool-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    with pytest.raises(FiseclipError, match="pool_type 'none' is not supported") as e:
        load_encoder("fiseclip-tiny-nopool-test", "none", image_size=112, device="cpu")
    assert "\n" not in str(e.value)
