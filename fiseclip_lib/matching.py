"""Batch referencing: local aggregation (LNAMD) and mutual scoring (MSM) inside one test batch.

Every image of a batch is scored against the other images of the same batch (paper). For a patch p of
image i and a reference image j != i, d_ij(p) is the distance to the nearest kept patch of j; the score
is the mean of the K smallest d_ij(p) over j, K = max(1, floor(topmin_max * (N - 1))) (METHOD.md step 7;
the max(1, .) avoids MuSc's empty interval for N <= 4).

Distances are computed as GEMMs on L2-normalised features, ||a - b|| = sqrt(max(0, 2 - 2 a.b)); each pair
of images is multiplied once (the block serves both directions) and references are grouped into GEMMs of
bounded width, so extra memory grows linearly with N (plus the [N, N, P] result).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from .errors import FiseclipError

BF16_TOLERANCE = 0.03  # max |score(bf16) - score(fp32)| seen on unit-norm features: ~0.015 (tests assert 0.03)
QUERY_CHUNK = 16384  # reference columns per GEMM; bounds the [P, chunk] similarity block


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

    Z `[N, P, C]` (L2-normalised features take a faster path; any features give Euclidean distances); keep bool
    `[N, P]` (reference patches allowed); penalty `[N, P]` added to the distance of each reference patch. The
    diagonal j == i is +inf (an image is not its own reference).

    Each pair of images is multiplied once: the similarity block S = Z_i Z_j^T gives image i's nearest
    patches in j (max over columns) and image j's nearest patches in i (max over rows). Reference images are
    grouped so that each GEMM has about `chunk` columns, which bounds the extra memory to O(P * chunk).
    """
    n, p, c = Z.shape
    Zd = Z.to(dtype)
    out = torch.full((n, n, p), float("inf"), dtype=torch.float32, device=Z.device)
    if keep is not None:
        keep = keep.to(Z.device).clone()
        for j in torch.nonzero(~keep.any(dim=1)).flatten().tolist():
            warnings.warn(f"reference image {j} has no kept patch; all of its patches are used")
            keep[j] = True
    pen = None if penalty is None else penalty.to(Z.device).float()
    sq = torch.linalg.vector_norm(Z.float(), dim=-1).pow(2)  # [n, p]; 1 for L2-normalised features
    unit = bool(torch.allclose(sq, torch.ones_like(sq), atol=2e-3))
    group = max(1, chunk // p)
    for i in range(n - 1):
        for g0 in range(i + 1, n, group):
            js = slice(g0, min(n, g0 + group))
            g = js.stop - js.start
            sim = (Zd[i] @ Zd[js].reshape(g * p, c).T).float().reshape(p, g, p)  # [p_i, j, p_j]
            if unit and pen is None:  # fast path: the nearest patch is the most similar one
                row = sim if keep is None else sim.masked_fill(~keep[js][None], -float("inf"))
                col = sim if keep is None else sim.masked_fill(~keep[i][:, None, None], -float("inf"))
                out[js, i] = _to_distance(row.amax(dim=2)).T  # i's patches vs references j
                out[i, js] = _to_distance(col.amax(dim=0))  # j's patches vs reference i
                continue
            # general path: ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b, then the penalty of the reference patch
            d = torch.sqrt(torch.clamp(sq[i][:, None, None] + sq[js][None] - 2.0 * sim, min=0.0))
            row = d if pen is None else d + pen[js][None]
            col = d if pen is None else d + pen[i][:, None, None]
            if keep is not None:
                row = row.masked_fill(~keep[js][None], float("inf"))
                col = col.masked_fill(~keep[i][:, None, None], float("inf"))
            out[js, i] = row.amin(dim=2).T
            out[i, js] = col.amin(dim=0)
    return out


def _to_distance(sim: torch.Tensor) -> torch.Tensor:
    """||a - b|| for unit vectors from their dot product, clamped against rounding."""
    return torch.sqrt(torch.clamp(2.0 - 2.0 * sim, min=0.0))


def mutual_scores(Z: torch.Tensor, keep: torch.Tensor | None = None, topmin_max: float = 0.3,
                  penalty: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mutual scoring (MSM) inside a batch. Z `[N, P, C]` (normally L2-normalised, as `lnamd` returns; any features
    give Euclidean distances), keep bool `[N, P]` or None -> `[N, P]`.

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
    d = reference_distances(Z, keep, penalty, dtype=dtype)  # [j, i, p], +inf on the diagonal
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
