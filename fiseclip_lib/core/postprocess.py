"""Post-processing: patch maps to pixel maps, image scores, RsCIN re-scoring over a pool.

RsCIN (MuSc's "re-scoring with constrained image-level neighbourhood", as MuSc's code computes it):
  1. the image scores of the pool (a whole category in MuSc) are min-max normalised over the pool;
  2. W = E E^T, E the L2-normalised class embeddings (for CLIP: proj(ln_post(class token)) of the last block);
  3. for each k of a list, every row of W keeps its k largest entries - the image itself (similarity 1) and
     its k - 1 most similar other images - and is divided by its sum; the new score is that weighted mean of
     the normalised scores;
  4. the results are averaged over the k list.
So k = 1 returns the min-max normalised score (MuSc returns the normalised scores, not the raw ones). RsCIN
needs the whole pool, so the harness applies it after all batches of a category (`core.pool.score_pool`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# MuSc's RsCIN k lists (models/musc.py): VisA [1, 8, 9]; MVTec AD and every other dataset [1, 2, 3]
from fiseclip_lib.config import default_rscin_ks  # noqa: F401 - part of this stage's API
from fiseclip_lib.errors import FiseclipError


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


def pool_embedding(feats) -> torch.Tensor:
    """The class embedding RsCIN compares images with, `[N, D]`: the encoder's global embedding (CLIP: the
    L2-normalised proj(ln_post(class token)), as MuSc uses); encoders without one (the CNN) use the mean patch
    token of the deepest returned layer."""
    if feats.global_embedding is not None:
        return feats.global_embedding.float()
    return feats.layers[max(feats.layers)].float().mean(1)


def rscin(scores, embeddings, ks=(1, 2, 3)) -> torch.Tensor:
    """RsCIN re-scoring of a pool (see module doc), as MuSc computes it.

    Args:
        scores: `[N]` image scores of the whole pool (e.g. a category).
        embeddings: `[N, D]` class embeddings; L2-normalised here (a no-op for CLIP's, which MuSc normalises).
        ks: neighbourhood sizes, each counting the image itself; k larger than N is capped at N.
    Returns:
        `[N]` float32 scores on the min-max normalised scale of the pool (k = 1 gives exactly that scale).
        A pool whose scores are all equal returns zeros (MuSc would divide by zero).
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    e = torch.as_tensor(embeddings, dtype=torch.float64)
    n = s.shape[0]
    if e.ndim != 2 or e.shape[0] != n:
        raise FiseclipError(f"RsCIN needs one embedding per score: {n} scores, embeddings of shape {tuple(e.shape)}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise FiseclipError(f"RsCIN k list {ks} must hold integers >= 1 (use rscin=false to switch it off)")
    span = s.max() - s.min()
    s = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    e = F.normalize(e, dim=-1)
    sim = e @ e.T
    # the image itself first, whatever rounding does to its similarity of 1, then the most similar others
    others = sim.clone()
    others.fill_diagonal_(-math.inf)
    order = torch.cat([torch.arange(n)[:, None], torch.argsort(others, dim=1, descending=True)[:, : n - 1]], 1)
    out = torch.zeros(n, dtype=torch.float64)
    for k in ks:
        idx = order[:, : min(k, n)]
        w = torch.gather(sim, 1, idx)
        out += (w * s[idx]).sum(1) / w.sum(1)
    return (out / len(ks)).float()
