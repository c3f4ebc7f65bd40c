"""Fusion of the visual (matching) and text (alignment) maps: the paper's "mutual filtering".

Both branches are first brought to a scale that does not depend on the other images of the batch (metrics
pool all batches of a category, so a batch's scores must mean the same in every batch). Option `fusion_norm`
(reconstruction):
  robust [default]: z = (x - median) / (1.4826 MAD), median and MAD (lower medians: core/robust.py) over all
      patches of the batch. Defects cover few patches, so both statistics are those of normal patches whatever
      the batch's contamination: an all-normal batch is not stretched (its largest z stays a few units), a
      defect patch keeps a large z.
  minmax: (x - min) / (max - min) over the batch (the former default): an all-normal batch is stretched to
      [0, 1] and looks as anomalous as a defective one.
  none: the branches' own units (A_V a distance in [0, 2], A_T a probability in [0, 1]).
Modes (option `fusion`, reconstruction), on the normalised branches v, t:
  additive [default]: alpha v + (1 - alpha) t;
  multiplicative: v * t;
  gated: alpha v g(t) + (1 - alpha) t g(v), g(x) = min(1, x / tau): each branch is suppressed where the other
         is confidently normal (below tau).
Multiplicative and gated need non-negative values with a known range: under `robust` they use
u = 1/2 + z / (2 (1 + |z|)) in (0, 1) - monotone, 1/2 at the batch median, 0.75 at z = 1, 0.9 at z = 4, and
without the float32 saturation of a logistic (u still separates z = 1000 from z = 1001), so tau = 0.5 reads
"at or below the median of the batch". Under `minmax` they use [0, 1]; under `none` the raw values.
When a batch has no visual branch (one image, no references), `fuse_text_only` puts the text branch on the same
scale: the fused value the batch would get if the visual branch agreed with the text (fuse(t, t)).
"""
from __future__ import annotations

import typing

import torch

from fiseclip_lib.config import Fusion, FusionNorm
from fiseclip_lib.core.robust import MAD_TO_SIGMA, median_mad
from fiseclip_lib.errors import FiseclipError

FUSION_MODES = typing.get_args(Fusion)
FUSION_NORMS = typing.get_args(FusionNorm)
SCALE_FLOOR = 1e-6  # a constant branch (e.g. zeros) gives z = 0, not inf


def batch_minmax(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise over the whole batch tensor (all images together)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / torch.clamp(hi - lo, min=eps)


def robust_z(x: torch.Tensor) -> torch.Tensor:
    """(x - median) / (1.4826 MAD) over all elements of x (the batch's patches); lower median (core/robust.py)."""
    x = x.float()
    med, mad = median_mad(x)
    return (x - med) / torch.clamp(MAD_TO_SIGMA * mad, min=SCALE_FLOOR)


def squash(z: torch.Tensor) -> torch.Tensor:
    """z -> 1/2 + z / (2 (1 + |z|)), a monotone map of the real line onto (0, 1)."""
    return 0.5 + 0.5 * z / (1.0 + z.abs())


def normalise(x: torch.Tensor, norm: str = "robust", bounded: bool = False) -> torch.Tensor:
    """One branch `[N, P]` on the fusion scale. bounded: the (0, 1) form used by multiplicative and gated."""
    if norm not in FUSION_NORMS:
        raise FiseclipError(f"unknown fusion_norm {norm!r}: choose one of {', '.join(FUSION_NORMS)}")
    if norm == "minmax":
        return batch_minmax(x.float())
    if norm == "none":
        return x.float()
    z = robust_z(x)
    return squash(z) if bounded else z


def fuse(visual: torch.Tensor, text: torch.Tensor, mode: str = "additive", alpha: float = 0.5,
         tau: float = 0.5, norm: str = "robust") -> torch.Tensor:
    """Combine A_V and A_T of one batch (same shape `[N, P]`) after normalisation.

    Args:
        visual, text: the raw branch maps (mutual scores; text probabilities).
        mode: additive | multiplicative | gated. alpha: weight of the visual branch. tau: gate threshold.
        norm: robust | minmax | none (module doc).
    Returns:
        `[N, P]` fused map (robust additive: in robust z units; robust multiplicative/gated: in (0, 1)).
    """
    if mode not in FUSION_MODES:
        raise FiseclipError(f"unknown fusion {mode!r}: choose one of {', '.join(FUSION_MODES)}")
    bounded = mode != "additive"
    v, t = normalise(visual, norm, bounded), normalise(text, norm, bounded)
    if mode == "additive":
        return alpha * v + (1 - alpha) * t
    if mode == "multiplicative":
        return v * t
    if tau <= 0:
        raise FiseclipError(f"gate tau {tau} must be > 0")
    gate = lambda x: torch.clamp(x / tau, max=1.0)  # noqa: E731
    return alpha * v * gate(t) + (1 - alpha) * t * gate(v)


def fuse_text_only(text: torch.Tensor, mode: str = "additive", alpha: float = 0.5, tau: float = 0.5,
                   norm: str = "robust") -> torch.Tensor:
    """The fused map of a batch without visual branch: fuse(text, text), i.e. the text branch on the fusion's
    scale, as if the visual branch agreed with it."""
    return fuse(text, text, mode, alpha, tau, norm)
