"""Fusion of the visual (matching) and text (alignment) maps: the paper's "mutual filtering".

Each branch is first normalised over the whole batch (min-max over all patches of all images, never per
image: per-image stretching makes normal images look anomalous). Modes (option `fusion`, reconstruction):
  additive [default]: alpha A_V + (1 - alpha) A_T, alpha 0.5;
  multiplicative: A_V * A_T;
  gated: alpha A_V g(A_T) + (1 - alpha) A_T g(A_V), g(x) = min(1, x / tau): each branch is suppressed
         where the other is confidently normal (below tau).
"""
from __future__ import annotations

import torch

from .errors import FiseclipError

FUSION_MODES = ("additive", "multiplicative", "gated")


def batch_minmax(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise over the whole batch tensor (all images together)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / torch.clamp(hi - lo, min=eps)


def fuse(visual: torch.Tensor, text: torch.Tensor, mode: str = "additive", alpha: float = 0.5,
         tau: float = 0.5) -> torch.Tensor:
    """Combine A_V and A_T (same shape) after batch-level normalisation."""
    if mode not in FUSION_MODES:
        raise FiseclipError(f"unknown fusion {mode!r}: choose one of {', '.join(FUSION_MODES)}")
    v, t = batch_minmax(visual.float()), batch_minmax(text.float())
    if mode == "additive":
        return alpha * v + (1 - alpha) * t
    if mode == "multiplicative":
        return v * t
    if tau <= 0:
        raise FiseclipError(f"gate tau {tau} must be > 0")
    gate = lambda x: torch.clamp(x / tau, max=1.0)  # noqa: E731
    return alpha * v * gate(t) + (1 - alpha) * t * gate(v)
