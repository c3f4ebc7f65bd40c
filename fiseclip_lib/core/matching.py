"""Batch referencing: local aggregation (LNAMD) and mutual scoring (MSM) inside one test batch.

Every image of a batch is scored against the other images of the same batch (paper). For a patch p of
image i and a reference image j != i, d_ij(p) is the distance to the nearest kept patch of j; the score
is the mean of the K smallest d_ij(p) over j, K = max(1, floor(topmin_max * (N - 1))) (METHOD.md step 7;
the max(1, .) avoids MuSc's empty interval for N <= 4).

Distances are computed as GEMMs on L2-normalised features, ||a - b|| = sqrt(max(0, 2 - 2 a.b)); each pair
of images is multiplied once (the block serves both directions) and references are grouped into GEMMs of
bounded width, so extra memory grows linearly with N (plus the [N, N, P] result).

Keep-masks cost no copy of a similarity block: every image's patches are reordered once (per batch) so that
its kept patches come first. "Nearest kept patch of i" is then a max over a row slice (a view) of the block;
"nearest kept patch of j" a max after the excluded trailing columns are set to -inf in place (only those
columns are written). Both maxima run in the block's own dtype (a max is exact in bf16) and write straight
into the result; only the `[N, N, P]` result is upcast. The reordering is undone on the final `[N, P]`
scores. lnamd works on the `[N, P, C]` layout (channels_last pooling), so no transpose copy is made, and
visual_map checks its inputs and prepares the keep-mask once per batch, not per layer and degree.

visual_map over several degrees (the pipeline: 4 layers x r in {1, 3, 5}) multiplies each pair of images once per
layer, not once per degree: with A = LN(X) (not unit), <boxmean_r(A_i)(p), boxmean_r(A_j)(q)> is a 4-D box filter
(r x r over p's grid, r x r over q's grid, zero padded) of S1 = A_i A_j^T, and the norms of boxmean_r(A) are cheap
per image. So one GEMM is followed by filtering the block per degree (`_box_filtered_distances`); the keep-mask
is applied after the filtering (filters need grid order), as -inf on excluded rows / columns. On the CPU the
filtering, scaling, masks and both maxima of a block run as ONE compiled pass (`_match_kernel`, numba: the block
is streamed through the cache once for all degrees); elsewhere (CUDA, or without numba) as ~15 torch passes per
degree. Same values as the per-degree route up to rounding (~1e-6 in fp32); in bf16 only the GEMM is bf16, the
filtering and maxima are float32.

Engines (one setting, `FiseConfig.match_engine`, passed as `engine` to `match` / `visual_map`; docs/matching.md):
    auto          the default: box-compiled on the CPU when numba works, box-torch otherwise, for two or more distinct
                  degrees and C >= BOX_FILTER_MIN_CHANNELS; per-degree below that
    per-degree    `_sorted_distances`: aggregate and match each degree separately
    box-torch     `_box_filtered_distances` with torch passes (any device)
    box-compiled  `_box_filtered_distances` with the numba kernel (CPU; an error where numba is missing)
    reference     `matching_reference.reference_visual_map`: short, slow, reads like the paper (the tests' oracle)
A soft penalty (filter `soft`), or a window whose mean is zero, takes the per-degree route whatever the box engine
(the box filters have no penalty term). With external references, `visual_map_against` runs the box route against
them (`_box_cross_distances`: one GEMM per query, layer and block of references) when the engine resolves to a box
engine (`_cross_route`: auto takes box-compiled on the CPU from 256 channels) and the references come with their
layer-normed tokens; else `cross_distances` per degree. The queries among themselves take the per-degree route.
"""
from __future__ import annotations

import math
import typing
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from fiseclip_lib.config import MatchEngine
from fiseclip_lib.core import _match_kernel
from fiseclip_lib.core.matching_reference import reference_visual_map
from fiseclip_lib.errors import FiseclipError

BF16_TOLERANCE = 0.03  # max |score(bf16) - score(fp32)| seen on unit-norm features: ~0.015 (tests assert 0.03)
QUERY_CHUNK = 4096  # reference columns per GEMM: bounds the [P, chunk] block, small enough to stay in cache for
# the reductions that follow each GEMM (P = 1369: 2 references, 15 MB fp32; 16384 columns measured slower)
AGG_ELEMENTS = 1 << 24  # elements per slice in lnamd (64 MB fp32): bounds its temporaries
UNIT_ATOL = 1e-5  # |z|^2 within this of 1: the unit-vector fast path (2 - 2 a.b) is used
ENGINES = typing.get_args(MatchEngine)  # the names the config accepts (config.py)
BOX_FILTER_MIN_CHANNELS = 512  # engine "auto" multiplies each pair once and box-filters the product for the degrees
# from this many channels on; below, the filter passes (O(P^2) per pair) cost more than the GEMMs they save (O(P^2 C)):
# break-even measured on 2 CPU cores at P = 1369 near C = 200 (fp32) and C = 500 (bf16)
BOX_CHUNK = 8192  # reference columns per block on that route (6 references at P = 1369, 45 MB fp32): with torch
# passes, each of ~40 ops per block costs a thread wake-up on a busy machine, so fewer, larger blocks beat
# cache-sized ones; the compiled pass is insensitive to it (1, 2, 3 or 6 references per block: within 10 %)


def _check_degree(r: int) -> None:
    if r < 1 or r % 2 == 0:
        raise FiseclipError(f"aggregation degree r={r} must be a positive odd integer")


def _check_grid(p: int, grid: tuple[int, int]) -> None:
    if grid[0] * grid[1] != p:
        raise FiseclipError(f"grid {tuple(grid)} does not match {p} patches")


def _check_engine(engine: str) -> None:
    """Unknown names, and box-compiled where its kernel cannot run, are errors (an explicit choice never falls back)."""
    if engine not in ENGINES:
        raise FiseclipError(f"unknown match_engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "box-compiled" and not _match_kernel.available():
        raise FiseclipError("match_engine 'box-compiled' needs numba (pip install numba, or the `fast` extra); "
                            "'auto' uses box-torch without it")


def _route(engine: str, degrees: list[int], channels: int, penalty, device) -> str:
    """The in-batch route of a fast engine: 'per-degree', 'box-torch' or 'box-compiled'."""
    if penalty is not None:  # the box filters have no penalty term
        return "per-degree"
    if engine == "auto":
        if len(set(degrees)) < 2 or channels < BOX_FILTER_MIN_CHANNELS:
            return "per-degree"
        return "box-compiled" if device.type == "cpu" and _match_kernel.available() else "box-torch"
    if engine == "box-compiled" and device.type != "cpu":
        raise FiseclipError(f"match_engine 'box-compiled' runs on the CPU, the features are on {device}: "
                            "choose auto or box-torch")
    return engine


CROSS_BOX_MIN_CHANNELS = 256  # engine "auto" against external references on the CPU: box-compiled from this many
# channels on. Measured (2 CPU cores, quiet, 1 query vs K = 16, 3 degrees, no mask; per-degree / box-compiled ms):
# P = 256: C = 40-112 17 / 24, C = 256 26 / 19, C = 512 63 / 31; P = 64: C = 64 5.1 / 4.9, C = 256 3.8 / 2.6;
# P = 576, C = 768: 236 / 96. box-torch only pays from about C = 512 (the in-batch rule).


def _cross_route(engine: str, degrees: list[int], channels: int, penalty, device) -> str:
    """`_route` against external references: "auto" on the CPU with numba takes box-compiled from
    CROSS_BOX_MIN_CHANNELS (one query against K references: no second direction shares a per-degree GEMM)."""
    if (engine == "auto" and penalty is None and device.type == "cpu" and len(set(degrees)) >= 2
            and channels >= CROSS_BOX_MIN_CHANNELS and _match_kernel.available()):
        return "box-compiled"
    return _route(engine, degrees, channels, penalty, device)


def _layer_norm(tokens: torch.Tensor) -> torch.Tensor:
    """LayerNorm over (C, H, W) per image, no affine: the same as over (P, C) of `[N, P, C]`, without a transpose."""
    x = tokens.float()
    return F.layer_norm(x, x.shape[1:])


def _aggregate(x: torch.Tensor, grid: tuple[int, int], r: int, order: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32, norms: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """r x r neighbourhood mean of layer-normed `[N, P, C]` and L2 normalisation -> (contiguous `[N, P, C]`, unit).

    order `[N, P]` (optional): return the patches of image i in the order order[i]. The result is allocated
    once, in `dtype`; slices of about AGG_ELEMENTS are pooled, reordered and normalised into it, so the
    temporaries stay bounded (few large ops: each op costs a thread wake-up on a busy machine). unit is False
    when some window mean is (almost) zero, so that its output is not a unit vector. norms `[N, P]` (optional,
    order None): receives the window norms (`_window_norms`, the same values).
    """
    n, p, c = x.shape
    h, w = grid
    out = torch.empty(n, p, c, dtype=dtype, device=x.device)
    step = max(1, AGG_ELEMENTS // (p * c))
    smallest = []
    for a in range(0, n, step):
        b = min(n, a + step)
        xs = x[a:b]
        if r > 1:
            # [N, P, C] is NHWC memory: pooling the channels_last view needs no transpose copy and is ~4x faster
            img = F.avg_pool2d(xs.view(b - a, h, w, c).permute(0, 3, 1, 2), kernel_size=r, stride=1,
                               padding=r // 2, count_include_pad=True)
            xs = img.permute(0, 2, 3, 1).reshape(b - a, p, c)  # a view when the pool kept channels_last
        norm = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
        smallest.append(norm.amin())
        if norms is not None:
            norms[a:b] = norm[..., 0]
        if order is not None:
            rows = torch.arange(b - a, device=x.device)[:, None]
            xs, norm = xs[rows, order[a:b]], norm[rows, order[a:b]]
        torch.div(xs, norm.clamp_min_(1e-12), out=out[a:b])  # = F.normalize(x, dim=-1)
    unit = bool(torch.stack(smallest).min() > 1e-6)
    return out, unit


def lnamd(tokens: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """Layer-normalised r x r neighbourhood mean of patch tokens (MuSc's LNAMD), L2-normalised per patch.

    Args:
        tokens: `[N, P, C]` patch tokens, P = h * w row-major.
        grid: (h, w).
        r: odd aggregation degree; mean over each r x r window (stride 1, zero padding counted in the mean),
            after a LayerNorm over (C, H, W) per image without affine.

    Returns:
        Contiguous float32 `[N, P, C]`.
    """
    _check_degree(r)
    _check_grid(tokens.shape[1], grid)
    return _aggregate(_layer_norm(tokens), grid, r)[0]


def reference_features(tokens: torch.Tensor, grid: tuple[int, int], degrees) -> tuple[dict, torch.Tensor, dict]:
    """What a reference bank keeps of an image, each step once: `lnamd` per degree, and for the box engines the
    layer-normed tokens and their window norms (`visual_map_against`'s ref_tokens / ref_norms).

    Args:
        tokens: `[N, P, C]` raw patch tokens of one layer; grid: (h, w); degrees: odd degrees r.
    Returns:
        ({r: `[N, P, C]` = lnamd(tokens, grid, r)}, `[N, P, C]` layer-normed tokens, {r: `[N, P]` window norms}).
    """
    _check_grid(tokens.shape[1], grid)
    x = _layer_norm(tokens)
    feats, norms = {}, {}
    for r in dict.fromkeys(degrees):
        _check_degree(r)
        norms[r] = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
        feats[r] = _aggregate(x, grid, r, norms=norms[r])[0]
    return feats, x, norms


def checked_unit(Z: torch.Tensor) -> bool | None:
    """Once per bank entry: None when Z holds NaN or inf (the per-call check then names the error), else whether
    its rows are unit vectors (`cross_distances`' ref_unit)."""
    if not bool(torch.isfinite(Z).all()):
        return None
    return _is_unit(Z)


def interval_count(n_refs: int, topmin_max: float) -> int:
    """K: how many of the smallest per-reference distances are averaged."""
    return max(1, int(math.floor(topmin_max * n_refs)))


def _usable_keep(keep: torch.Tensor | None, n: int, p: int, device) -> torch.Tensor | None:
    """Check the shape of keep; images with no kept patch use all of theirs (with a warning); None if all kept."""
    if keep is None:
        return None
    if tuple(keep.shape) != (n, p):
        raise FiseclipError(f"keep must be [N, P] = {(n, p)}, got {tuple(keep.shape)}")
    keep = torch.as_tensor(keep, dtype=torch.bool, device=device)
    empty = torch.nonzero(~keep.any(dim=1)).flatten().tolist()
    if empty:
        keep = keep.clone()
        for j in empty:
            warnings.warn(f"reference image {j} has no kept patch; all of its patches are used")
            keep[j] = True
    return None if bool(keep.all()) else keep


def _kept_first(keep: torch.Tensor | None, n: int, p: int, device) -> tuple[torch.Tensor | None, list[int]]:
    """Patch order with each image's kept patches first (stable), and how many each image keeps."""
    if keep is None:
        return None, [p] * n
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return order, keep.sum(dim=1).tolist()


def _unsort(x: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Undo `_kept_first` on the last axis of x `[..., N, P]` (the query image is the second-last axis)."""
    if order is None:
        return x
    return torch.empty_like(x).scatter_(-1, order.expand_as(x), x)


def _sorted_distances(Z: torch.Tensor, counts: list[int], penalty: torch.Tensor | None, unit: bool,
                      dtype: torch.dtype, chunk: int) -> torch.Tensor:
    """d[j, i, t] for features whose kept patches come first (image j keeps its first counts[j] patches).

    Masks are reductions over slices of the similarity block of image i against a group of references: rows
    of i's kept patches are `sim[:counts[i]]`; for the other direction, the excluded (trailing) columns of
    each reference are set to -inf in place (index_fill_ touches only them) after the column reduction. The
    reductions write straight into the result, in the block's dtype (a max is exact in bf16). Few, large ops.
    """
    n, p, c = Z.shape
    Zd = Z.to(dtype).contiguous()
    fast = unit and penalty is None  # the nearest patch is the most similar one: reduce sim directly
    group = max(1, chunk // p)
    if fast:
        out = torch.empty(n, n, p, dtype=Zd.dtype, device=Z.device)  # largest similarities, upcast at the end
        # excluded columns of the concatenated references, image by image: [k_j, p) + j * p
        excl = [torch.arange(counts[j], p, device=Z.device) + j * p for j in range(n)]
        starts = [0]
        for e in excl:
            starts.append(starts[-1] + len(e))
        excl = torch.cat(excl)
        for i in range(n - 1):
            ki = counts[i]
            for g0 in range(i + 1, n, group):
                g1 = min(n, g0 + group)
                sim = torch.mm(Zd[i], Zd[g0:g1].reshape(-1, c).T)  # [t_i, (j, t_j)], block dtype
                # j's patches against reference i: over i's kept patches (rows)
                torch.amax(sim[:ki].view(ki, g1 - g0, p), dim=0, out=out[i, g0:g1])
                # i's patches against each reference j: over j's kept patches (columns)
                if starts[g1] > starts[g0]:
                    sim.index_fill_(1, excl[starts[g0]:starts[g1]] - g0 * p, -math.inf)
                torch.amax(sim.view(p, g1 - g0, p), dim=2, out=out[g0:g1, i].T)
        out = _to_distance_(out.float())
    else:
        # ||a - b|| = sqrt(|a|^2 + |b|^2 - 2 a.b), in place on the (float) block, then + penalty, masked min
        sq = torch.linalg.vector_norm(Z.float(), dim=-1).pow(2)  # [n, p]
        pen = None if penalty is None else penalty.float()
        out = torch.empty(n, n, p, dtype=torch.float32, device=Z.device)
        for i in range(n - 1):
            ki = counts[i]
            for g0 in range(i + 1, n, group):
                g1 = min(n, g0 + group)
                g = g1 - g0
                d = torch.mm(Zd[i], Zd[g0:g1].reshape(g * p, c).T).view(p, g, p).float()
                d.mul_(-2.0).add_(sq[i][:, None, None]).add_(sq[g0:g1][None]).clamp_(min=0.0).sqrt_()
                for jj, j in enumerate(range(g0, g1)):
                    blk = d[:, jj, :counts[j]]
                    out[j, i] = (blk if pen is None else blk + pen[j, :counts[j]]).amin(dim=1)
                blk = d[:ki]
                out[i, g0:g1] = (blk if pen is None else blk + pen[i, :ki, None, None]).amin(dim=0)
    out.diagonal(dim1=0, dim2=1).fill_(float("inf"))  # an image is not its own reference
    return out


def _to_distance_(sim: torch.Tensor) -> torch.Tensor:
    """||a - b|| for unit vectors from their dot product, clamped against rounding (in place)."""
    return sim.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()


def _is_unit(Z: torch.Tensor) -> bool:
    sq = torch.linalg.vector_norm(Z.float(), dim=-1).pow(2)
    return bool(((sq - 1.0).abs() <= UNIT_ATOL).all())


def reference_distances(Z: torch.Tensor, keep: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
                        dtype: torch.dtype = torch.float32, chunk: int = QUERY_CHUNK) -> torch.Tensor:
    """d[j, i, p]: distance from patch p of image i to its nearest (kept) patch of reference image j.

    Args:
        Z: `[N, P, C]` features (L2-normalised features take a faster path; any features give Euclidean distances).
        keep: bool `[N, P]`, reference patches allowed (an image with none uses all, with a warning).
        penalty: `[N, P]` added to the distance of each reference patch.
        dtype: GEMM dtype (float32 or bfloat16).
        chunk: reference columns per GEMM; bounds the extra memory to O(P * chunk).

    Returns:
        float32 `[N, N, P]`, +inf on the diagonal j == i (an image is not its own reference).
    """
    n, p, _ = Z.shape
    keep = _usable_keep(keep, n, p, Z.device)
    order, counts = _kept_first(keep, n, p, Z.device)
    if order is not None:
        rows = torch.arange(n, device=Z.device)[:, None]
        Z = Z[rows, order]
        penalty = None if penalty is None else penalty.to(Z.device)[rows, order]
    elif penalty is not None:
        penalty = penalty.to(Z.device)
    d = _sorted_distances(Z, counts, penalty, _is_unit(Z), dtype, chunk)
    return _unsort(d, order)


def _interval_mean(d: torch.Tensor, topmin_max: float) -> torch.Tensor:
    """d `[N(j), N(i), P]` -> mean of the K smallest over the references j: `[N, P]`."""
    k = interval_count(d.shape[0] - 1, topmin_max)
    return torch.topk(d, k, dim=0, largest=False, sorted=False).values.mean(dim=0)


def _check_features(Z: torch.Tensor) -> None:
    if Z.ndim != 3:
        raise FiseclipError(f"Z must be [N, P, C], got shape {tuple(Z.shape)}")
    # a finite sum proves every element finite (inf and NaN propagate); only an overflowing sum needs the full test
    if not bool(torch.isfinite(Z.sum())) and not bool(torch.isfinite(Z).all()):
        raise FiseclipError("features contain NaN or inf; check the input images and the encoder precision")


def mutual_scores(Z: torch.Tensor, keep: torch.Tensor | None = None, topmin_max: float = 0.3,
                  penalty: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mutual scoring (MSM) inside a batch.

    Args:
        Z: `[N, P, C]` features (normally L2-normalised, as `lnamd` returns; any features give Euclidean distances).
        keep: bool `[N, P]` or None; keep[j, q] False removes patch q of image j from the references of every
            other image.
        topmin_max: fraction of the N - 1 references whose smallest distances are averaged.
        penalty: `[N, P]` or None, added to the distance of each reference patch.
        dtype: GEMM dtype.

    Returns:
        float32 `[N, P]`. N = 1 has no reference: zeros with a warning (the pipeline then falls back to the
        text map).
    """
    _check_features(Z)
    n, p, _ = Z.shape
    if n == 1:
        _usable_keep(keep, n, p, Z.device)
        warnings.warn("a batch of one image has no reference: mutual scores are zero")
        return torch.zeros(1, p, dtype=torch.float32, device=Z.device)
    return _interval_mean(reference_distances(Z, keep, penalty, dtype=dtype), topmin_max)


def visual_map(layers: dict[int, torch.Tensor], grid: tuple[int, int], degrees=(1, 3, 5),
               keep: torch.Tensor | None = None, penalty: torch.Tensor | None = None, topmin_max: float = 0.3,
               dtype: torch.dtype = torch.float32, chunk: int | None = None, engine: str = "auto") -> torch.Tensor:
    """A_V: mutual scores averaged over layers and aggregation degrees.

    Inputs are checked and the keep-mask prepared once per batch; each layer is layer-normed once. On the box
    routes (engine box-torch / box-compiled; auto with two or more distinct degrees and C >=
    BOX_FILTER_MIN_CHANNELS) each pair of images is multiplied ONCE per layer and the degrees are box filters of
    that product (`_box_filtered_distances`; equal to the per-degree route up to rounding); otherwise (engine
    per-degree, auto with one degree or few channels, a soft penalty, or a window whose mean is zero) each
    degree's features are aggregated and matched by `_sorted_distances`.

    Args:
        layers: {layer: `[N, P, C]` raw patch tokens}.
        grid: (h, w) with h * w = P.
        degrees: odd aggregation degrees r.
        keep, penalty, topmin_max, dtype: as in `mutual_scores`.
        chunk: reference columns per GEMM (None: BOX_CHUNK on the box-filtered route, QUERY_CHUNK otherwise).
        engine: one of ENGINES (see the module docstring).

    Returns:
        float32 `[N, P]`.
    """
    _check_engine(engine)
    degrees = _check_layers(layers, grid, degrees)
    if engine == "reference":
        return reference_visual_map(layers, grid, degrees, keep=keep, penalty=penalty, topmin_max=topmin_max)
    first = next(iter(layers.values()))
    n, p, _ = first.shape
    device = first.device
    if n == 1:
        return mutual_scores(lnamd(first, grid, degrees[0]), keep, topmin_max, penalty, dtype)
    keep = _usable_keep(keep, n, p, device)
    route = _route(engine, degrees, first.shape[2], penalty, device)
    sorted_route = None  # (order, counts, penalty) of the per-degree route, prepared on first use

    def per_degree(x, r):
        nonlocal sorted_route
        if sorted_route is None:
            order, counts = _kept_first(keep, n, p, device)
            pen = None if penalty is None else penalty.to(device)
            if pen is not None and order is not None:
                pen = pen[torch.arange(n, device=device)[:, None], order]
            sorted_route = (order, counts, pen)
        order, counts, pen = sorted_route
        Z, unit = _aggregate(x, grid, r, order, dtype)
        s = _interval_mean(_sorted_distances(Z, counts, pen, unit, dtype, chunk or QUERY_CHUNK), topmin_max)
        return _unsort(s, order)

    total = torch.zeros(n, p, dtype=torch.float32, device=device)
    for tokens in layers.values():
        x = _layer_norm(tokens)
        d = None if route == "per-degree" else _box_filtered_distances(
            x, grid, sorted(set(degrees)), keep, dtype, chunk or BOX_CHUNK, compiled=route == "box-compiled")
        for r in degrees:
            total.add_(per_degree(x, r) if d is None else _interval_mean(d[r], topmin_max))
        del x, d
    return total.div_(len(layers) * len(degrees))


def _check_layers(layers: dict, grid: tuple[int, int], degrees) -> list[int]:
    """Checks of the inputs of every engine, once per batch -> the degrees as a list."""
    degrees = list(degrees)
    for r in degrees:
        _check_degree(r)
    if not layers:
        raise FiseclipError("no feature layers to match")
    for tokens in layers.values():
        _check_features(tokens)
        _check_grid(tokens.shape[1], grid)
    return degrees


def _window_norms(x: torch.Tensor, grid: tuple[int, int], r: int) -> torch.Tensor:
    """||boxmean_r(x)(p)|| of layer-normed `[N, P, C]` x -> float32 `[N, P]` (the same pooling as `_aggregate`)."""
    n, p, c = x.shape
    h, w = grid
    if r == 1:
        return torch.linalg.vector_norm(x, dim=-1)
    out = torch.empty(n, p, dtype=torch.float32, device=x.device)
    step = max(1, AGG_ELEMENTS // (p * c))
    for a in range(0, n, step):
        b = min(n, a + step)
        img = F.avg_pool2d(x[a:b].view(b - a, h, w, c).permute(0, 3, 1, 2), kernel_size=r, stride=1,
                           padding=r // 2, count_include_pad=True)
        out[a:b] = torch.linalg.vector_norm(img.permute(0, 2, 3, 1), dim=-1).reshape(b - a, p)
    return out


def _box_filter_block(s1: torch.Tensor, hs: torch.Tensor, qs: torch.Tensor, grid: tuple[int, int], wide: list[int],
                      cols: dict):
    """The degrees r > 1 of one GEMM block, from the block itself (both box routes, `_box_filtered_distances`).

    Args:
        s1: float32 `[P, W]` block of inner products (rows: one image's patches; columns: W / P images' patches,
            each P columns in grid order).
        hs, qs: float32 workspaces of s1's shape (hs keeps the vertical sums from one degree to the next).
        grid: (h, w) with h w = P.
        wide: the degrees > 1, ascending.
        cols: {r: `[1, W]`} column factors (1 / (r^2 ||window mean||) of each column's patch).
    Yields:
        (r, y): y float32 `[P, W]`, the r x r box sums along the columns' grid axes times `cols[r]`, then the
        r x r box mean along the rows' grid axes (zero padding counted). y is a new tensor; s1 is not changed.
    """
    p = s1.shape[0]
    h, w = grid
    s1v, hsv, qsv = s1.view(-1, h, w), hs.view(-1, h, w), qs.view(-1, h, w)
    k_done = 0
    for r in wide:
        k = r // 2
        if k_done == 0:
            hs.copy_(s1)
        for d in range(k_done + 1, k + 1):  # vertical sums over the reference window, grown in place
            hsv[:, d:].add_(s1v[:, :-d])
            hsv[:, :-d].add_(s1v[:, d:])
        k_done = k
        qs.copy_(hs)
        for d in range(1, k + 1):  # horizontal sums
            qsv[:, :, d:].add_(hsv[:, :, :-d])
            qsv[:, :, :-d].add_(hsv[:, :, d:])
        qs.mul_(cols[r])
        # separable (r x 1 then 1 x r: ~1.5x faster than r x r at r = 3, 5), zero padding counted
        y = F.avg_pool2d(qs.view(1, h, w, -1).permute(0, 3, 1, 2), (r, 1), 1, (k, 0), count_include_pad=True)
        y = F.avg_pool2d(y, (1, r), 1, (0, k), count_include_pad=True).permute(0, 2, 3, 1).reshape(p, -1)
        yield r, y
        del y  # the caller's is its last reference: the next degree's block is not allocated beside it


def _box_filtered_distances(x: torch.Tensor, grid: tuple[int, int], degrees: list[int],
                            keep: torch.Tensor | None, dtype: torch.dtype, chunk: int,
                            compiled: bool = False) -> dict | None:
    """d_r[j, i, p] for every degree r from ONE GEMM per pair of images (grid order, keep-mask as in
    `reference_distances`); None when some window mean is (almost) zero (no unit vectors: use the per-degree route).

    With A = LN(X), <boxmean_r(A_i)(p), boxmean_r(A_j)(q)> is the r x r x r x r box mean of S1 = A_i A_j^T over
    the grid axes of p and q (zero outside the grid: the zero padding of the pooling). So S1 is computed once per
    block (rows: patches of image i; columns: patches of a group of images j > i), and each r > 1 costs a few
    memory-bound passes: box sums along the column grid axes (the block's inner axes: shifted in-place adds, the
    vertical sums shared between degrees), scaling by the column inverse norms (which commutes with the next
    filter), then separable avg_pool2d along the row grid axes on the channels_last view of the block (its rows
    are an NHWC image whose channels are the columns). The row inverse norms are positive per-row factors: for
    the maxima along rows they are applied to the [P] result only. Masks come after the filtering: excluded rows
    (columns) are set to -inf in separate buffers, so one direction's -inf never reaches the other.
    compiled: the filter, scaling, masks and maxima of each block in one numba pass (`_box_filtered_compiled`;
    CPU tensors, `_match_kernel.available()` checked by the caller) instead of the torch passes.
    """
    n, p, c = x.shape
    dev = x.device
    inv = {}
    for r in degrees:
        norm = _window_norms(x, grid, r)
        if not bool(norm.min() > 1e-6):
            return None
        # 1/||.|| for the rows (avg_pool: a mean over the window) and for the columns (the block holds sums over
        # the column window, hence the extra 1/r^2)
        inv[r] = (norm.reciprocal(), norm.mul(r * r).reciprocal())
    Ad = x.to(dtype).contiguous()
    group = max(1, chunk // p)
    if compiled:
        return _box_filtered_compiled(Ad, grid, degrees, inv, keep, group)
    width = min(group, n - 1) * p
    # workspaces, reused by every block (views of the first rows * width elements for a narrower last group)
    ws = [torch.empty(p * width, dtype=torch.float32, device=dev) for _ in range(4)]
    cos = {r: torch.empty(n, n, p, dtype=torch.float32, device=dev) for r in degrees}  # largest cosines
    rowmax = torch.empty(p * group, dtype=torch.float32, device=dev)
    excl = excl_starts = None
    if keep is not None:
        parts = [torch.nonzero(~keep[j]).flatten() for j in range(n)]
        excl_rows = parts
        cols = [e + j * p for j, e in enumerate(parts)]
        excl_starts = [0]
        for e in cols:
            excl_starts.append(excl_starts[-1] + len(e))
        excl = torch.cat(cols)
    wide = sorted(r for r in degrees if r > 1)
    for i in range(n - 1):
        for g0 in range(i + 1, n, group):
            g1 = min(n, g0 + group)
            g = g1 - g0
            s1, hs, qs, work = (b[:p * g * p].view(p, g * p) for b in ws)
            prod = torch.mm(Ad[i], Ad[g0:g1].reshape(g * p, c).T, out=s1 if dtype == torch.float32 else None)
            if prod is not s1:
                s1.copy_(prod)  # bf16 GEMM, box filters and maxima in float32
                del prod
            ex_r = None if keep is None else excl_rows[i]
            ex_c = None if keep is None else excl[excl_starts[g0]:excl_starts[g1]] - g0 * p
            cols = {r: inv[r][1][g0:g1].reshape(1, g * p) for r in wide}
            for r, y in _box_filter_block(s1, hs, qs, grid, wide, cols):
                _block_maxima(y, inv[r][0][i], ex_r, ex_c, work, rowmax, cos[r], i, g0, g1)
                del y
            if 1 in degrees:  # last: s1 is scaled in place
                s1.mul_(inv[1][1][g0:g1].reshape(1, g * p))
                _block_maxima(s1, inv[1][0][i], ex_r, ex_c, work, rowmax, cos[1], i, g0, g1)
    out = {}
    for r in degrees:
        d = _to_distance_(cos[r])
        d.diagonal(dim1=0, dim2=1).fill_(float("inf"))  # an image is not its own reference
        out[r] = d
    return out


def _box_filtered_compiled(Ad: torch.Tensor, grid: tuple[int, int], degrees: list[int], inv: dict,
                           keep: torch.Tensor | None, group: int) -> dict:
    """`_box_filtered_distances` after its checks, with the filter, scaling, masks and maxima of each block in
    one compiled pass (`_match_kernel`) instead of ~15 torch passes per degree. Same values up to rounding."""
    n, p, c = Ad.shape
    nd = len(degrees)
    ks = np.array([r // 2 for r in degrees], dtype=np.int64)
    # the kernel sums over both windows (r^2 x r^2 terms): both factors carry 1/r^2
    fac = torch.stack([inv[r][1] for r in degrees]).contiguous()  # [D, N, P]
    bias = None if keep is None else torch.where(keep, 0.0, float(_match_kernel.NEG)).to(torch.float32)
    all_rows = np.ones(p, dtype=np.bool_)
    keep_np = None if keep is None else keep.contiguous().numpy()
    # largest cosines, then distances: numpy (one thread, no wake-ups of torch's pool for these small passes)
    cos = np.zeros((nd, n, n, p), dtype=np.float32)  # the diagonal (j == i) is never written: zeros, then inf
    s1 = torch.empty(p * min(group, n - 1) * p, dtype=Ad.dtype)
    out_c = np.empty(nd * min(group, n - 1) * p, dtype=np.float32)
    out_r = np.empty_like(out_c)
    threads = torch.get_num_threads()
    for i in range(n - 1):
        a = fac[:, i].contiguous().numpy()
        for g0 in range(i + 1, n, group):
            g1 = min(n, g0 + group)
            g = g1 - g0
            blk = s1[:p * g * p].view(p, g * p)
            torch.mm(Ad[i], Ad[g0:g1].reshape(g * p, c).T, out=blk)  # bf16: the kernel converts while it reads
            oc, orow = out_c[:nd * g * p].reshape(nd, g, p), out_r[:nd * g * p].reshape(nd, g, p)
            b = fac[:, g0:g1].reshape(nd, g * p).contiguous().numpy()
            cb = np.zeros(g * p, dtype=np.float32) if bias is None else bias[g0:g1].reshape(-1).numpy()
            raw = blk.numpy() if blk.dtype == torch.float32 else blk.view(torch.uint16).numpy()
            _match_kernel.block_maxima(raw, grid, ks, a, b, all_rows if keep_np is None else keep_np[i], cb, oc, orow,
                                       threads)
            cos[:, i, g0:g1] = oc
            cos[:, g0:g1, i] = orow
    d = cos  # sqrt(max(0, 2 - 2 cos)) in place, as _to_distance_
    d *= -2.0
    d += 2.0
    np.maximum(d, 0.0, out=d)
    np.sqrt(d, out=d)
    out = {}
    for di, r in enumerate(degrees):
        dr = torch.from_numpy(d[di])
        dr.diagonal(dim1=0, dim2=1).fill_(float("inf"))  # an image is not its own reference
        out[r] = dr
    return out


def _block_maxima(y: torch.Tensor, u: torch.Tensor, ex_rows, ex_cols, work: torch.Tensor,
                  rowmax: torch.Tensor, cos: torch.Tensor, i: int, g0: int, g1: int) -> None:
    """Largest cosines of one block into cos `[N, N, P]`, both directions.

    y `[P, g * P]`: cosines of image i's patches (rows) against references g0..g1 (columns), divided by the row's
    u = inverse norm (a positive factor, so it is applied to the row maxima only); overwritten. work: scratch
    of y's size.
    """
    p = y.shape[0]
    g = g1 - g0
    full = torch.mul(y, u[:, None], out=work)
    if ex_rows is not None and len(ex_rows):
        full.index_fill_(0, ex_rows, -math.inf)
    # references g0..g1's patches (columns) against reference i: over i's kept patches (rows)
    torch.amax(full.view(p, g, p), dim=0, out=cos[i, g0:g1])
    if ex_cols is not None and len(ex_cols):
        y.index_fill_(1, ex_cols, -math.inf)
    # i's patches against each reference j: over j's kept patches (columns)
    rm = rowmax[:p * g].view(p, g)
    torch.amax(y.view(p, g, p), dim=2, out=rm)
    torch.mul(rm, u[:, None], out=cos[g0:g1, i].T)


# ------------------------------------------------------------------------------ references outside the batch
# (issue 13: reference bank and streaming). A query image is scored against images that are not scored
# themselves; these functions are self-contained so that the in-batch path above can change independently.

def cross_distances(Zq: torch.Tensor, Zr: torch.Tensor, keep: torch.Tensor | None = None,
                    penalty: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                    block: int = 1 << 22, ref_unit: bool | None = None) -> torch.Tensor:
    """d[j, i, p]: distance from patch p of query image i to its nearest (kept) patch of reference image j.

    All references are multiplied in one GEMM per block of query patches; patches that are not kept are masked
    (-inf similarity / +inf distance) before the per-reference reduction, which gives the same values as
    reducing over the kept patches only.

    Args:
        Zq: `[Nq, P, C]` query features; Zr: `[Nr, Pr, C]` reference features (as `lnamd` returns).
        keep: bool `[Nr, Pr]` or None, reference patches allowed (an image with none uses all, with a warning).
        penalty: `[Nr, Pr]` or None, added to the distance of each reference patch (the soft filter).
        dtype: GEMM dtype (float32 or bfloat16).
        block: elements of one similarity block (query patches x Nr * Pr); bounds the extra memory.
        ref_unit: None: Zr is checked here (finite) and tested for unit rows; True / False: the caller checked Zr
            once (a bank, when the entry was made: `BankEntry.unit`) and says whether its rows are unit vectors.

    Returns:
        float32 `[Nr, Nq, P]`; `[0, Nq, P]` when there is no reference.
    """
    _check_features(Zq)
    nq, p, c = Zq.shape
    nr = Zr.shape[0]
    if nr == 0:
        return torch.empty(0, nq, p, dtype=torch.float32, device=Zq.device)
    if ref_unit is None:
        _check_features(Zr)
    pr = Zr.shape[1]
    keep = _usable_keep(keep, nr, pr, Zr.device)
    q = Zq.reshape(nq * p, c)
    refs = Zr.reshape(nr * pr, c)
    # nearest patch = most similar one
    fast = penalty is None and _is_unit(Zq) and (_is_unit(Zr) if ref_unit is None else ref_unit)
    drop = None if keep is None else ~keep.reshape(1, nr * pr)
    pen = None if penalty is None else penalty.reshape(1, nr * pr).float().to(Zq.device)
    sq_q = None if fast else torch.linalg.vector_norm(q.float(), dim=-1).pow(2)
    sq_r = None if fast else torch.linalg.vector_norm(refs.float(), dim=-1).pow(2)
    refs_t = refs.to(dtype).T
    out = torch.empty(nr, nq * p, dtype=torch.float32, device=Zq.device)
    step = max(1, block // (nr * pr))
    for s in range(0, nq * p, step):
        sim = torch.mm(q[s:s + step].to(dtype), refs_t).float()
        rows = sim.shape[0]
        if fast:
            if drop is not None:
                sim.masked_fill_(drop, -math.inf)
            out[:, s:s + rows] = sim.view(rows, nr, pr).amax(dim=2).T
            continue
        d = sim.mul_(-2.0).add_(sq_q[s:s + rows, None]).add_(sq_r[None]).clamp_(min=0.0).sqrt_()
        if pen is not None:
            d.add_(pen)
        if drop is not None:
            d.masked_fill_(drop, math.inf)
        out[:, s:s + rows] = d.view(rows, nr, pr).amin(dim=2).T
    if fast:
        out = _to_distance_(out)
    return out.view(nr, nq, p)


def _box_cross_distances(xq: torch.Tensor, xr: torch.Tensor, norms_r: dict | None, grid: tuple[int, int],
                         degrees: list[int], keep: torch.Tensor | None, dtype: torch.dtype, chunk: int,
                         compiled: bool) -> dict | None:
    """d_r[j, i, p] of query patches against external references for every degree r from ONE GEMM per query and
    block of references (`_box_filtered_distances` for external references: the same filters, only the maxima
    over the references' kept columns); None when some window mean is (almost) zero (use `cross_distances`).

    Args:
        xq: `[Nq, P, C]` layer-normed query tokens; xr: `[Nr, P, C]` layer-normed reference tokens.
        norms_r: {r: `[Nr, P]`} window norms of xr (`reference_features`), or None (computed here).
        keep: bool `[Nr, P]` after `_usable_keep`, or None.
    Returns:
        {r: float32 `[Nr, Nq, P]`} or None.
    """
    nq, p, c = xq.shape
    nr = xr.shape[0]
    inv_q, inv_r = {}, {}
    for r in degrees:
        nq_r = _window_norms(xq, grid, r)
        nr_r = norms_r[r] if norms_r is not None and r in norms_r else _window_norms(xr, grid, r)
        if not (bool(nq_r.min() > 1e-6) and bool(nr_r.min() > 1e-6)):
            return None
        # as in _box_filtered_distances: rows 1/||.||, columns 1/(r^2 ||.||) (the block holds column window sums)
        inv_q[r] = (nq_r.reciprocal(), nq_r.mul(r * r).reciprocal())
        inv_r[r] = nr_r.mul(r * r).reciprocal()
    Aq = xq.to(dtype).contiguous()
    Ar = xr.to(dtype).contiguous()
    group = max(1, min(nr, chunk // p))
    if compiled:
        nd = len(degrees)
        ks = np.array([r // 2 for r in degrees], dtype=np.int64)
        fac_q = torch.stack([inv_q[r][1] for r in degrees]).contiguous()  # [D, Nq, P]
        fac_r = torch.stack([inv_r[r] for r in degrees]).contiguous()  # [D, Nr, P]
        bias = (torch.zeros(nr, p) if keep is None
                else torch.where(keep, 0.0, float(_match_kernel.NEG)).to(torch.float32))
        all_rows = np.ones(p, dtype=np.bool_)
        cos = np.empty((nd, nr, nq, p), dtype=np.float32)
        s1 = torch.empty(p * group * p, dtype=dtype)
        out_c = np.empty(nd * group * p, dtype=np.float32)  # the references' maxima: computed, not needed
        out_r = np.empty_like(out_c)
        threads = torch.get_num_threads()
        for i in range(nq):
            a = fac_q[:, i].contiguous().numpy()
            for g0 in range(0, nr, group):
                g1 = min(nr, g0 + group)
                g = g1 - g0
                blk = s1[:p * g * p].view(p, g * p)
                torch.mm(Aq[i], Ar[g0:g1].reshape(g * p, c).T, out=blk)
                oc, orow = out_c[:nd * g * p].reshape(nd, g, p), out_r[:nd * g * p].reshape(nd, g, p)
                b = fac_r[:, g0:g1].reshape(nd, g * p).contiguous().numpy()
                raw = blk.numpy() if blk.dtype == torch.float32 else blk.view(torch.uint16).numpy()
                _match_kernel.block_maxima(raw, grid, ks, a, b, all_rows, bias[g0:g1].reshape(-1).numpy(), oc, orow,
                                           threads)
                cos[:, g0:g1, i] = orow
        d = torch.from_numpy(cos)
        return {r: _to_distance_(d[di]) for di, r in enumerate(degrees)}
    width = group * p
    s1b, hsb, qsb = (torch.empty(p * width, dtype=torch.float32, device=xq.device) for _ in range(3))
    cos = {r: torch.empty(nr, nq, p, dtype=torch.float32, device=xq.device) for r in degrees}
    wide = sorted(r for r in degrees if r > 1)
    for i in range(nq):
        for g0 in range(0, nr, group):
            g1 = min(nr, g0 + group)
            g = g1 - g0
            s1, hs, qs = (b[:p * g * p].view(p, g * p) for b in (s1b, hsb, qsb))
            prod = torch.mm(Aq[i], Ar[g0:g1].reshape(g * p, c).T, out=s1 if dtype == torch.float32 else None)
            if prod is not s1:
                s1.copy_(prod)  # bf16 GEMM, box filters and maxima in float32
                del prod
            drop = None if keep is None else ~keep[g0:g1].reshape(1, g * p)

            def row_maxima(y, r):
                # i's patches against each reference j: over j's kept patches (columns), then the row factor
                if drop is not None:
                    y.masked_fill_(drop, -math.inf)
                rm = y.view(p, g, p).amax(dim=2)  # [P, g]
                cos[r][g0:g1, i] = (rm * inv_q[r][0][i][:, None]).T

            cols = {r: inv_r[r][g0:g1].reshape(1, g * p) for r in wide}
            for r, y in _box_filter_block(s1, hs, qs, grid, wide, cols):
                row_maxima(y, r)
                del y
            if 1 in degrees:  # last: s1 is scaled in place (inv_r[1] = 1 / ||.||)
                row_maxima(s1.mul_(inv_r[1][g0:g1].reshape(1, g * p)), 1)
    return {r: _to_distance_(cos[r]) for r in degrees}


def interval_mean(d: torch.Tensor, n_refs: int, topmin_max: float) -> torch.Tensor:
    """Mean of the K smallest of d `[R, Nq, P]` over the references (K = interval_count(n_refs)); entries that
    are +inf (an image as its own reference) are never among them as long as n_refs >= 1."""
    k = interval_count(n_refs, topmin_max)
    return torch.topk(d, k, dim=0, largest=False, sorted=False).values.mean(dim=0)


def visual_map_against(layers: dict[int, torch.Tensor], grid: tuple[int, int], references: dict,
                       degrees=(1, 3, 5), keep: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
                       mutual: bool = True, query_keep: torch.Tensor | None = None,
                       query_penalty: torch.Tensor | None = None, topmin_max: float = 0.3,
                       dtype: torch.dtype = torch.float32, engine: str = "auto", ref_tokens: dict | None = None,
                       ref_norms: dict | None = None, ref_unit: dict | None = None) -> torch.Tensor:
    """A_V of query images whose references are other images: an external set, and (mutual) each other.

    Args:
        layers: {layer: `[Nq, P, C]` raw patch tokens} of the queries.
        grid: (h, w).
        references: {(layer, r): `[Nr, P, C]` aggregated reference features (`lnamd`)}, one entry per layer of
            `layers` and degree; an empty or missing mapping means no external reference.
        degrees: odd aggregation degrees r.
        keep, penalty: `[Nr, P]` filter of the external references (None: every patch, no penalty).
        mutual: the queries are also references of each other (a batch plus a bank), filtered by
            query_keep / query_penalty `[Nq, P]` (as `reference_distances`).
        topmin_max: as in `mutual_scores`; K counts every reference of a query (Nr, plus Nq - 1 when mutual).
        engine: one of ENGINES, "reference" runs `reference_visual_map`. Against the external references, a box
            engine (as `_route` resolves it: no penalty) with ref_tokens runs `_box_cross_distances` (one GEMM per
            layer for all degrees); otherwise, and among the queries, each degree runs `cross_distances` /
            `reference_distances`.
        ref_tokens: {layer: `[Nr, P, C]` layer-normed reference tokens} (`ReferenceBank.stacked_tokens`) or None.
        ref_norms: {(layer, r): `[Nr, P]`} their window norms (`reference_features`) or None (computed here).
        ref_unit: {(layer, r): bool} the references' features were checked when they entered the bank and are unit
            vectors (`ReferenceBank.unit_flags`), or None: `cross_distances` checks them per call.

    Returns:
        float32 `[Nq, P]`; zeros with a warning when a query has no reference at all.
    """
    _check_engine(engine)
    if engine == "reference":
        return reference_visual_map(layers, grid, degrees, references, mutual, query_keep, query_penalty, keep,
                                    penalty, topmin_max)
    first = next(iter(layers.values()))
    nq, p, _ = first.shape
    nr = 0
    if references:
        nr = next(iter(references.values())).shape[0]
    n_refs = nr + (nq - 1 if mutual else 0)
    if n_refs == 0:
        warnings.warn("no reference image: mutual scores are zero")
        return torch.zeros(nq, p, dtype=torch.float32, device=first.device)
    degrees = list(degrees)
    route = "per-degree"
    if nr and ref_tokens and all(l in ref_tokens for l in layers):
        route = _cross_route(engine, degrees, first.shape[2], penalty, first.device)
    if route != "per-degree":
        keep = _usable_keep(keep, nr, p, first.device)  # once for every layer (cross_distances: per call)
    total, count = None, 0
    for l, tokens in layers.items():
        _check_grid(tokens.shape[1], grid)
        box = None
        if route != "per-degree":
            _check_features(tokens)  # the references were checked when they entered the bank
            norms = None if ref_norms is None else {r: ref_norms[(l, r)] for r in degrees if (l, r) in ref_norms}
            box = _box_cross_distances(_layer_norm(tokens), ref_tokens[l], norms, grid, sorted(set(degrees)), keep,
                                       dtype, BOX_CHUNK, compiled=route == "box-compiled")
        for r in degrees:
            Zq = lnamd(tokens, grid, r) if box is None or (mutual and nq > 1) else None
            parts = []
            if nr:
                unit = None if ref_unit is None else ref_unit.get((l, r))
                parts.append(box[r] if box is not None else cross_distances(Zq, references[(l, r)], keep, penalty,
                                                                             dtype, ref_unit=unit))
            if mutual and nq > 1:
                parts.append(reference_distances(Zq, query_keep, query_penalty, dtype=dtype))
            s = interval_mean(torch.cat(parts) if len(parts) > 1 else parts[0], n_refs, topmin_max)
            total = s if total is None else total.add_(s)
            count += 1
    return total / count


# ------------------------------------------------------------------------------ position-aware matching

def window_offsets(grid: tuple[int, int], window: int) -> list[tuple[int, int]]:
    """The grid offsets (dy, dx) of a Chebyshev window of radius `window` that land somewhere on the grid."""
    h, w = grid
    ry, rx = min(window, h - 1), min(window, w - 1)  # a larger window adds no reachable position
    return [(dy, dx) for dy in range(-ry, ry + 1) for dx in range(-rx, rx + 1)]


def windowed_distances(Zq: torch.Tensor, Zr: torch.Tensor, grid: tuple[int, int], window: int,
                       keep: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
                       exclude_self: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """d[j, i, p]: distance from patch p of query i to the nearest (kept) patch of reference j within `window`
    grid cells of p's position (Chebyshev: |dy| <= window and |dx| <= window).

    The P x P block is never formed: for each of the (2 window + 1)^2 offsets, the query patches at p and the
    reference patches at p + offset (contiguous slices of the row-major grid, no copy) are multiplied position
    by position (one batched GEMM of `[Nq, C] x [C, Nr]` per position), so a pair costs O(P window^2 C) instead
    of O(P^2 C). Distances are Euclidean whatever the norms
    (sqrt(|a|^2 + |b|^2 - 2 a.b)), plus the reference patch's penalty. keep follows `cross_distances` (a reference
    with no kept patch uses all of its patches, with a warning); a window holding no kept patch uses every patch
    of the window, so that an excluded region does not score as missing.

    Args:
        Zq: `[Nq, P, C]` query features; Zr: `[Nr, P, C]` reference features on the same grid (as `lnamd` returns).
        grid: (h, w) with h * w = P.
        window: radius r >= 0 in grid cells.
        keep: bool `[Nr, P]` or None; penalty: `[Nr, P]` or None.
        exclude_self: Zr is Zq (the queries reference each other): d[i, i] = +inf.
        dtype: GEMM dtype (float32 or bfloat16); the minima are float32.
    Returns:
        float32 `[Nr, Nq, P]`.
    """
    _check_features(Zq)
    _check_features(Zr)
    if window < 0:
        raise FiseclipError(f"match_window {window} must be >= 0 grid cells")
    nq, p, c = Zq.shape
    nr = Zr.shape[0]
    _check_grid(p, grid)
    if Zr.shape[1] != p:
        raise FiseclipError(f"position-aware matching needs references on the query grid {tuple(grid)}, got "
                            f"{Zr.shape[1]} patches")
    keep = _usable_keep(keep, nr, p, Zq.device)
    # unit features without a penalty (what lnamd gives): the nearest patch is the most similar one, so the loop
    # keeps similarities (one pass per offset) and converts once at the end, as cross_distances' fast path
    fast = penalty is None and _is_unit(Zq) and _is_unit(Zr)
    q_t = Zq.permute(1, 0, 2).to(dtype).contiguous()  # [P, Nq, C]: one small GEMM per position
    r_t = Zr.permute(1, 2, 0).to(dtype).contiguous()  # [P, C, Nr]: no transposed copy per offset in bmm
    sq_q = None if fast else torch.linalg.vector_norm(Zq.float(), dim=-1).pow(2).T[:, :, None]  # [P, Nq, 1]
    sq_r = None if fast else torch.linalg.vector_norm(Zr.float(), dim=-1).pow(2).T[:, None, :]  # [P, 1, Nr]
    pen = None if penalty is None else penalty.to(Zq.device).float().T[:, None, :]  # [P, 1, Nr]
    drop = None if keep is None else (~keep.T)[:, None, :]  # [P, 1, Nr]
    worst = -math.inf if fast else math.inf
    better = torch.maximum if fast else torch.minimum
    best = torch.full((p, nq, nr), worst, dtype=torch.float32, device=Zq.device)
    best_any = torch.full_like(best, worst) if drop is not None else None  # the window fallback
    h, w = grid
    col = torch.arange(p, device=Zq.device) % w
    for dy, dx in window_offsets(grid, window):
        # row-major: the reference patch at p + (dy, dx) is p + o, so both sides are contiguous slices along P
        # (no gather); positions whose column leaves the grid (a row wrap) are masked below
        o = dy * w + dx
        a, b = max(0, -o), min(p, p - o)
        if a >= b:
            continue
        d = torch.bmm(q_t[a:b], r_t[a + o:b + o]).float()  # [m, Nq, Nr] similarities
        if not fast:
            d.mul_(-2.0).add_(sq_q[a:b]).add_(sq_r[a + o:b + o]).clamp_(min=0.0).sqrt_()
            if pen is not None:
                d.add_(pen[a + o:b + o])
        if dx:
            d.masked_fill_(((col[a:b] + dx < 0) | (col[a:b] + dx >= w))[:, None, None], worst)
        if best_any is not None:
            better(best_any[a:b], d, out=best_any[a:b])
            d.masked_fill_(drop[a + o:b + o], worst)
        better(best[a:b], d, out=best[a:b])
    if best_any is not None:
        best = torch.where(torch.isinf(best), best_any, best)
    if fast:
        best = _to_distance_(best)
    out = best.permute(2, 1, 0).contiguous()  # [Nr, Nq, P]
    if exclude_self:
        out[torch.arange(min(nq, nr)), torch.arange(min(nq, nr))] = math.inf
    return out


def windowed_visual_map(layers: dict[int, torch.Tensor], grid: tuple[int, int], window: int, degrees=(1, 3, 5),
                        references: dict | None = None, mutual: bool = True, keep: torch.Tensor | None = None,
                        penalty: torch.Tensor | None = None, ref_keep: torch.Tensor | None = None,
                        ref_penalty: torch.Tensor | None = None, topmin_max: float = 0.3,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A_V with position-aware matching (`match_window`): MSM over `windowed_distances` instead of the nearest
    patch anywhere in a reference; the batch route (mutual) and the external-reference route, as `match`.

    Args:
        layers: {layer: `[N, P, C]` raw patch tokens} of the queries; grid: (h, w).
        window: radius r >= 0 in grid cells; r >= max(h, w) - 1 equals global matching.
        degrees: odd LNAMD degrees.
        references: {(layer, r): `[R, P, C]` aggregated external references (`lnamd`)} or None.
        mutual: the queries are references of each other, filtered by keep / penalty `[N, P]`.
        ref_keep, ref_penalty: `[R, P]` filter of the external references.
        topmin_max: MSM's interval (K counts every reference: R, plus N - 1 when mutual).
        dtype: GEMM dtype.
    Returns:
        float32 `[N, P]` on the CPU; zeros with a warning when a query has no reference.
    """
    degrees = _check_layers(layers, grid, degrees)
    first = next(iter(layers.values()))
    n, p, _ = first.shape
    nr = next(iter(references.values())).shape[0] if references else 0
    n_refs = nr + (n - 1 if mutual else 0)
    if n_refs == 0:
        warnings.warn("no reference image: mutual scores are zero")
        return torch.zeros(n, p, dtype=torch.float32)
    total = torch.zeros(n, p, dtype=torch.float32, device=first.device)
    for l, tokens in layers.items():
        for r in degrees:
            Zq = lnamd(tokens, grid, r)
            parts = []
            if nr:
                parts.append(windowed_distances(Zq, references[(l, r)].to(Zq.device), grid, window, ref_keep,
                                                ref_penalty, dtype=dtype))
            if mutual and n > 1:
                parts.append(windowed_distances(Zq, Zq, grid, window, keep, penalty, exclude_self=True, dtype=dtype))
            total.add_(interval_mean(torch.cat(parts) if len(parts) > 1 else parts[0], n_refs, topmin_max))
    return total.div_(len(layers) * len(degrees)).cpu()


# ------------------------------------------------------------------------------ the one entry point

def match(layers: dict[int, torch.Tensor], grid: tuple[int, int], degrees=(1, 3, 5), references: dict | None = None,
          mutual: bool = True, keep: torch.Tensor | None = None, penalty: torch.Tensor | None = None,
          ref_keep: torch.Tensor | None = None, ref_penalty: torch.Tensor | None = None, topmin_max: float = 0.3,
          dtype: torch.dtype = torch.float32, engine: str = "auto", ref_tokens: dict | None = None,
          ref_norms: dict | None = None, ref_unit: dict | None = None, window: int | None = None) -> torch.Tensor:
    """A_V of query images against their references: each other (mutual), an external set, or both.

    Args:
        layers: {layer: `[N, P, C]` raw patch tokens} of the queries.
        grid: (h, w) with h * w = P.
        degrees: odd LNAMD aggregation degrees r.
        references: {(layer, r): `[R, P, C]` aggregated external references (`lnamd`)} or None.
        mutual: the queries are references of each other.
        keep, penalty: `[N, P]` filter of the queries as references of each other (mutual only).
        ref_keep, ref_penalty: `[R, P]` filter of the external references.
        topmin_max: MSM's interval: the share of each query's references whose smallest distances are averaged.
        dtype: GEMM dtype (the reference engine computes in float64 whatever it is).
        engine: one of ENGINES (`FiseConfig.match_engine`; the module docstring and docs/matching.md): "auto",
            "per-degree", "box-torch", "box-compiled" (the fast engines: `visual_map` for a batch alone,
            `visual_map_against` with external references) or "reference" (`reference_visual_map`, short and
            slow, reads like the paper).
        ref_tokens, ref_norms: the external references' layer-normed tokens and window norms (`visual_map_against`:
            the box engines' route against them), or None.
        ref_unit: {(layer, r): bool} checked once per bank (`visual_map_against`), or None.
        window: position-aware matching (`FiseConfig.match_window`): each query patch against the reference
            patches within this many grid cells of its position (`windowed_visual_map`, whatever the engine);
            None: every patch.
    Returns:
        float32 `[N, P]` on the CPU.
    """
    _check_engine(engine)
    if window is not None:
        return windowed_visual_map(layers, grid, window, degrees, references, mutual, keep, penalty, ref_keep,
                                   ref_penalty, topmin_max, dtype)
    if engine == "reference":
        degrees = _check_layers(layers, grid, degrees)
        return reference_visual_map(layers, grid, degrees, references, mutual, keep, penalty, ref_keep, ref_penalty,
                                    topmin_max)
    if mutual and not references:
        return visual_map(layers, grid, degrees, keep=keep, penalty=penalty, topmin_max=topmin_max,
                          dtype=dtype, engine=engine).cpu()  # .cpu() waits for a GPU
    return visual_map_against({l: t.cpu() for l, t in layers.items()}, grid, references or {}, degrees, ref_keep,
                              ref_penalty, mutual=mutual, query_keep=keep, query_penalty=penalty,
                              topmin_max=topmin_max, dtype=dtype, engine=engine, ref_tokens=ref_tokens,
                              ref_norms=ref_norms, ref_unit=ref_unit).cpu()
