"""Text-guided reference filtering (paper: text filters out noisy, i.e. anomalous, reference features).

Which reference patches may serve as nearest neighbours is decided from the text map A_T of each reference
image. Modes (option `filter`; all reconstruction):
  threshold [default]: keep q where A_T(q) < theta (0.5: the text says 'normal' more than 'abnormal');
  top_ratio: drop the top rho fraction of A_T over the whole batch;
  soft: keep everything, but add a penalty 2 * A_T(q) = 2 * (1 - w) to distances (2 = largest distance
        between unit vectors, so a patch the text calls certainly abnormal is never nearer than any other);
  none: keep everything.
Guard: each image keeps at least `min_keep` of its patches (its least abnormal ones), so no image loses
all its references when the text is wrong about a whole image.
"""
from __future__ import annotations

import math
import typing

import torch

from fiseclip_lib.config import Filter
from fiseclip_lib.errors import FiseclipError

FILTER_MODES = typing.get_args(Filter)


def reference_keep(text_map: torch.Tensor, mode: str = "threshold", theta: float = 0.5, ratio: float = 0.1,
                   min_keep: float = 0.1) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """text_map `[N, P]` -> (keep bool `[N, P]` or None, penalty `[N, P]` or None)."""
    if mode not in FILTER_MODES:
        raise FiseclipError(f"unknown filter {mode!r}: choose one of {', '.join(FILTER_MODES)}")
    if mode == "none":
        return None, None
    if mode == "soft":
        return None, 2.0 * text_map.float()
    if mode == "threshold":
        keep = text_map < theta
    else:
        if not 0.0 <= ratio < 1.0:
            raise FiseclipError(f"filter ratio {ratio} must be in [0, 1)")
        n_drop = int(math.floor(ratio * text_map.numel()))
        keep = torch.ones_like(text_map, dtype=torch.bool)
        if n_drop:
            drop = torch.topk(text_map.flatten(), n_drop).indices
            keep.view(-1)[drop] = False
    return apply_min_keep(keep, text_map, min_keep), None


def apply_min_keep(keep: torch.Tensor, text_map: torch.Tensor, min_keep: float) -> torch.Tensor:
    """Give every image at least ceil(min_keep * P) kept patches: its least abnormal ones."""
    n, p = keep.shape
    need = max(1, math.ceil(min_keep * p))
    keep = keep.clone()
    for i in torch.nonzero(keep.sum(1) < need).flatten().tolist():
        keep[i, torch.topk(text_map[i], need, largest=False).indices] = True
    return keep


def oracle_keep(masks, grid: tuple[int, int]) -> torch.Tensor:
    """Keep-mask from ground truth (for studies, not for the method): a patch is kept when no defect pixel
    falls in it. masks `[N, H, W]` bool -> `[N, h * w]`."""
    m = torch.as_tensor(masks).float()[:, None]
    defect = torch.nn.functional.adaptive_max_pool2d(m, grid)[:, 0] > 0
    return (~defect).flatten(1)
