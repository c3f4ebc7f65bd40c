"""Image preprocessing as the weights were trained with: mean/std and resize interpolation.

The statistics and the interpolation come from open_clip's pretrained config of the tag (e.g. SigLIP and
CLIPA tags use other statistics than OpenAI's), else from the model config's `preprocess_cfg`, else
open_clip's defaults (OpenAI statistics, bicubic). Images are always resized to the full square input
("squash"), never centre-cropped: anomaly maps must cover the whole image so that they align with the masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fiseclip_lib.errors import FiseclipError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling filters by open_clip's interpolation names
INTERPOLATIONS = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared: normalisation statistics and resize filter."""

    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise FiseclipError(f"unknown interpolation {self.interpolation!r}: use one of {sorted(INTERPOLATIONS)}")


def preprocessing_from(*cfgs: dict | None) -> Preprocessing:
    """The first config that names each of mean, std, interpolation wins; open_clip's defaults otherwise.

    Args:
        cfgs: open_clip pretrained configs or `preprocess_cfg` dicts, highest priority first (None skipped).
    Returns:
        The resolved Preprocessing.
    """
    def pick(name, default):
        for c in cfgs:
            if c and c.get(name) is not None:
                return c[name]
        return default

    as3 = lambda v: tuple(float(x) for x in v)  # noqa: E731
    return Preprocessing(mean=as3(pick("mean", OPENAI_MEAN)), std=as3(pick("std", OPENAI_STD)),
                         interpolation=str(pick("interpolation", "bicubic")))


def preprocess_images(images: Sequence, size: int, prep: Preprocessing) -> torch.Tensor:
    """PIL images, arrays or paths -> normalised `[N, 3, size, size]` float tensor on the CPU.

    Args:
        images: PIL images, HxWx3 arrays (uint8; wider ones as `plumbing.images.rgb_image` reads them), or paths.
        size: the square input side in pixels.
        prep: statistics and resize filter.
    Returns:
        The pixel tensor.
    """
    from fiseclip_lib.plumbing.images import rgb_image

    out = []
    for im in images:
        im = rgb_image(im).resize((size, size), resample=INTERPOLATIONS[prep.interpolation])
        out.append(torch.from_numpy(np.array(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return (x - mean) / std
