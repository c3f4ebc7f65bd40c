"""Batch referencing: local aggregation (LNAMD) and mutual scoring (MSM) inside one test batch.

Every image of a batch is scored against the other images of the same batch (paper). For a patch p of
image i and a reference image j != i, d_ij(p) is the distance to the nearest kept patch of j; the score
is the mean of the K smallest d_ij(p) over j, K = max(1, floor(topmin_max * (N - 1))) (METHOD.md step 7;
the max(1, .) avoids MuSc's empty interval for N <= 4).

Distances are computed as GEMMs on L2-normalised features, ||a - b|| = sqrt(max(0, 2 - 2 a.b)), one
reference image at a time and in query chunks, so extra memory grows linearly with N.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .errors import FiseclipError

QUERY_CHUNK = 16384  # rows of queries per GEMM; bounds the [chunk, P] similarity block


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Layer-normalised r x r neighbourhood mean of patch tokens (MuSc's LNAMD), L2-normalised per patch.

    tokens `[N, P, C]` with P = h * w row-major; LayerNorm over (C, H, W) per image without affine; mean over
    each r x r window (stride 1, zero padding counted in the mean). Returns `[N, P, C]`.
    """
    if r < 1 or r % 2 == 0:
        raise FiseclipError(f"aggregation degree r={r} must be a positive odd integer")
    n, p, c = tokens.shape
    h, w = grid
    if h * w != p:
        raise FiseclipError(f"grid {grid} does not match {p} patches")
    x = tokens.float().transpose(1, 2).reshape(n, c, h, w)
    x = F.layer_norm(x, x.shape[1:])
    if r > 1:
        x = F.avg_pool2d(x, kernel_size=r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


def interval_count(n_refs: int, topmin_max: float) -> int:
    """K: how many of the smallest per-reference distances are averaged."""
    return max(1, int(math.floor(topmin_max * n_refs)))


def reference_distances(Z: torch.Tensor, keep: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """d[j, i, p]: distance from patch p of image i to its nearest (kept) patch of reference image j.

    Z `[N, P, C]` L2-normalised; keep bool `[N, P]` (reference patches allowed); penalty `[N, P]` added to
    the distance of each reference patch. The diagonal j == i is computed too (callers exclude it).
    """
    n, p, c = Z.shape
    queries = Z.reshape(n * p, c).to(dtype)
    out = torch.empty(n, n * p, dtype=torch.float32, device=Z.device)
    for j in range(n):
        ref = Z[j].to(dtype)
        ref_keep = None
        if keep is not None:
            ref_keep = keep[j].to(Z.device)
            if not ref_keep.any():
                warnings.warn(f"reference image {j} has no kept patch; all of its patches are used")
                ref_keep = None
            else:
                ref = ref[ref_keep]
        pen = None if penalty is None else penalty[j].to(Z.device).float()
        if pen is not None and ref_keep is not None:
            pen = pen[ref_keep]
        for s in range(0, n * p, chunk):
            sim = (queries[s:s + chunk] @ ref.T).float()
            if pen is None:
                out[j, s:s + chunk] = torch.sqrt(torch.clamp(2.0 - 2.0 * sim.max(dim=1).values, min=0.0))
            else:
                d = torch.sqrt(torch.clamp(2.0 - 2.0 * sim, min=0.0)) + pen
                out[j, s:s + chunk] = d.min(dim=1).values
    return out.reshape(n, n, p)


def mutual_scores(Z: torch.Tensor, keep: torch.Tensor | None = None, topmin_max: float = 0.3,
                  penalty: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mutual scoring (MSM) inside a batch. Z `[N, P, C]` (L2-normalised), keep bool `[N, P]` or None -> `[N, P]`.

    keep[j, q] False removes patch q of image j from the references of every other image.
    N = 1 has no reference: zeros with a warning (the pipeline then falls back to the text map).
    """
    if Z.ndim != 3:
        raise FiseclipError(f"Z must be [N, P, C], got shape {tuple(Z.shape)}")
    n, p, _ = Z.shape
    if keep is not None and tuple(keep.shape) != (n, p):
        raise FiseclipError(f"keep must be [N, P] = {(n, p)}, got {tuple(keep.shape)}")
    if not torch.isfinite(Z).all():
        raise FiseclipError("features contain NaN or inf; check the input images and the encoder precision")
    if n == 1:
        warnings.warn("a batch of one image has no reference: mutual scores are zero")
        return torch.zeros(1, p, dtype=torch.float32, device=Z.device)
    d = reference_distances(Z, keep, penalty, dtype=dtype)  # [j, i, p]
    eye = torch.eye(n, dtype=torch.bool, device=Z.device)[:, :, None].expand(n, n, p)
    d = d.masked_fill(eye, float("inf"))
    k = interval_count(n - 1, topmin_max)
    smallest = torch.topk(d, k, dim=0, largest=False).values  # [k, i, p]
    return smallest.mean(dim=0)


def visual_map(layers: dict[int, torch.Tensor], grid: tuple[int, int], degrees=(1, 3, 5),
               keep: torch.Tensor | None = None, penalty: torch.Tensor | None = None, topmin_max: float = 0.3,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A_V: mutual scores averaged over layers and aggregation degrees. layers: {l: `[N, P, C]`} -> `[N, P]`."""
    total, count = None, 0
    for tokens in layers.values():
        for r in degrees:
            s = mutual_scores(lnamd(tokens, grid, r), keep=keep, topmin_max=topmin_max, penalty=penalty, dtype=dtype)
            total = s if total is None else total + s
            count += 1
    return total / count
