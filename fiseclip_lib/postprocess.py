"""Post-processing: patch maps to pixel maps, image scores, optional RsCIN re-scoring."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upsample(maps: torch.Tensor, grid: tuple[int, int], size: int | tuple[int, int]) -> torch.Tensor:
    """`[N, P]` patch maps -> `[N, H, W]`, bilinear with align_corners=True."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = maps.float().reshape(maps.shape[0], 1, *grid)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)[:, 0]


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = int(math.ceil(truncate * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_smooth(maps: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of `[N, H, W]` maps (reflect padding, truncated at 4 sigma like scipy)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device)
    r = (k.numel() - 1) // 2
    x = maps.float()[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


def image_scores(maps: torch.Tensor, text_scores: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """Max of each map, plus beta times the image text score."""
    s = maps.flatten(1).max(dim=1).values
    if text_scores is not None and beta:
        s = s + beta * text_scores.to(s.device)
    return s


def rscin(scores: torch.Tensor, embeddings: torch.Tensor, ks=(1, 2, 3)) -> torch.Tensor:
    """RsCIN-style re-scoring (reconstruction): for each k, average an image's score with those of its k most
    similar images in the batch (cosine similarity of global embeddings); the results are averaged over k."""
    n = scores.shape[0]
    if n < 2:
        return scores
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    out = torch.zeros_like(scores, dtype=torch.float32)
    for k in ks:
        k = min(int(k), n - 1)
        idx = torch.topk(sim, k, dim=1).indices
        out += (scores.float() + scores.float()[idx].sum(1)) / (k + 1)
    return out / len(ks)
