"""LNAMD + MSM as the paper writes them: a short, slow reference implementation (the tests' oracle).

For every layer l and degree r, each patch token is layer-normalised per image, averaged over its r x r
neighbourhood and L2-normalised (LNAMD). A query patch's distance to a reference image is the distance to that
image's nearest (kept) patch, plus the patch's penalty; the score of a query patch is the mean of the K smallest
of these distances over all of its references, K = max(1, floor(topmin_max * number of references)) (MSM).
A_V is the mean of these scores over layers and degrees. Float64 throughout, one pair of images at a time, no
reordering, no GEMM tricks: `matching.match(..., engine="reference")`; the fast engines must agree with it.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F


def lnamd_plain(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """`[N, P, C]` -> LayerNorm over (P, C) per image, r x r mean (zero padding counted), L2 norm per patch."""
    n, p, c = tokens.shape
    x = F.layer_norm(tokens.double(), (p, c))
    img = x.transpose(1, 2).reshape(n, c, *grid)
    img = F.avg_pool2d(img, r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(img.reshape(n, c, p).transpose(1, 2), dim=-1)


def nearest_distance(query: torch.Tensor, ref: torch.Tensor, keep=None, penalty=None) -> torch.Tensor:
    """`[P, C]` query patches, `[P', C]` one reference -> `[P]` distance to its nearest kept patch (+ penalty).
    A reference with no kept patch is used through all of its patches."""
    d = torch.cdist(query[None].double(), ref[None].double(), compute_mode="donot_use_mm_for_euclid_dist")[0]
    if penalty is not None:
        d = d + penalty.double().cpu()[None]
    if keep is not None and bool(keep.any()):
        d = d[:, keep.cpu()]
    return d.min(dim=1).values


def _warn_empty(keep) -> None:
    for j in [] if keep is None else torch.nonzero(~keep.bool().any(dim=1)).flatten().tolist():
        warnings.warn(f"reference image {j} has no kept patch; all of its patches are used")


def reference_visual_map(layers, grid, degrees=(1, 3, 5), references=None, mutual=True, keep=None, penalty=None,
                         ref_keep=None, ref_penalty=None, topmin_max=0.3) -> torch.Tensor:
    """A_V with the arguments of `matching.match` (float32 `[N, P]`), computed one pair of images at a time.

    references: {(layer, r): `[R, P, C]` aggregated external references}; keep / penalty `[N, P]` filter the
    queries as references of each other (mutual), ref_keep / ref_penalty `[R, P]` the external references.
    No reference at all (one image, not mutual and no external set): zeros, with a warning.
    """
    first = next(iter(layers.values()))
    n, p, _ = first.shape
    n_refs = (len(next(iter(references.values()))) if references else 0) + (n - 1 if mutual else 0)
    if n_refs == 0:
        warnings.warn("no reference image: mutual scores are zero")
        return torch.zeros(n, p, dtype=torch.float32)
    _warn_empty(keep if mutual else None)
    _warn_empty(ref_keep if references else None)
    total = torch.zeros(n, p, dtype=torch.float64)
    for l, tokens in layers.items():
        for r in degrees:
            z = lnamd_plain(tokens.cpu(), grid, r)
            ext = references[(l, r)].cpu() if references else z[:0]
            for i in range(n):
                dists = [nearest_distance(z[i], ext[j], None if ref_keep is None else ref_keep[j],
                                          None if ref_penalty is None else ref_penalty[j]) for j in range(len(ext))]
                if mutual:
                    dists += [nearest_distance(z[i], z[j], None if keep is None else keep[j],
                                               None if penalty is None else penalty[j]) for j in range(n) if j != i]
                k = max(1, math.floor(topmin_max * len(dists)))
                total[i] += torch.stack(dists).sort(dim=0).values[:k].mean(dim=0)
    return (total / (len(layers) * len(degrees))).float()
