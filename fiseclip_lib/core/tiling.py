"""Tiling of large images: overlapping tiles scored at the encoder's input size, maps stitched back.

A large image (a board, a wafer, a textile at 2-5 Mpx) resized to the encoder's input side (~518 px) loses any
defect smaller than one patch. With `tiles` (config: `RxC` or `auto`) each image is cut into rows x cols tiles
that overlap by `tile_overlap` of their side; every tile goes through the encoder at the input size, so a patch
covers (tile side / input side) of the original pixels instead of (image side / input side).

Referencing (`tile_match`):
  same  tile t of an image is referenced by tile t of the other images (and tile t of each bank image): the
        scoring path runs once per tile position, on N tiles (aligned parts; memory: N tiles at a time);
  all   every tile of an image is referenced by every tile of the OTHER images (never by its own tiles, which
        share the overlaps): textures, where a defect-free tile anywhere is a valid reference. Each image's
        tiles are scored against a bank of the others' tiles (the text filter applied to them as it is to the
        queries of a batch), each tile fused on its own scale; all tiles' features are held at once.
Every call is `Detector.score_features` (the one scoring path); this module only cuts, references and stitches.
Tile maps (at the input size, smoothed there) are resized to their tile's box and blended with weights that fall
linearly towards the tile's edges (feathering), normalised by the summed weight, so a pixel covered by one tile
keeps that tile's value. The image score is taken on the stitched map (`postprocess.image_scores`); the text
score of an image is the highest of its tiles'. The feature cache keys tiles by their content like any image.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fiseclip_lib.config import tile_grid_spec
from fiseclip_lib.core.postprocess import image_scores
from fiseclip_lib.core.references import ReferenceBank
from fiseclip_lib.errors import FiseclipError
from fiseclip_lib.features import Features
from fiseclip_lib.plumbing.images import image_name, rgb_image


def as_array(image) -> np.ndarray:
    """A path, PIL image or array -> uint8 `[H, W, 3]` RGB array (`plumbing.images.rgb_image`)."""
    return np.asarray(rgb_image(image))


def resolve_grid(tiles: str | None, image_hw: tuple[int, int], input_size: int, overlap: float,
                 patch_grid: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The tile grid (rows, cols) for an image, or None when the image is scored whole.

    Args:
        tiles: the config's `tiles` (RxC, auto, 1, none or None).
        image_hw: (H, W) of the image in px.
        input_size: the encoder's input side in px.
        overlap: `tile_overlap`.
        patch_grid: the encoder's (h, w) patch grid; a tile grid finer than it (a tile holding less than one
            patch of the whole image) is an error.
    Returns:
        (rows, cols), or None for a single tile.
    """
    spec = tile_grid_spec(tiles)
    if spec is False:
        raise FiseclipError(f"tiles {tiles!r} must be RxC (e.g. 2x2), auto, 1 or none")
    if spec is None:
        return None
    h, w = image_hw
    if spec == "auto":
        # n tiles of side S overlapping by f cover S (n - (n - 1) f): the fewest that reach the image side, at most
        # one tile per patch of the grid (finer tiles hold less than a patch of the whole image)
        n = lambda side: max(1, math.ceil((side / input_size - overlap) / (1 - overlap) - 1e-9))  # noqa: E731
        spec = (n(h), n(w))
        if patch_grid is not None:
            spec = (min(spec[0], patch_grid[0]), min(spec[1], patch_grid[1]))
    rows, cols = spec
    if patch_grid is not None and (rows > patch_grid[0] or cols > patch_grid[1]):
        raise FiseclipError(f"tiles {rows}x{cols} is finer than the encoder's {patch_grid[0]}x{patch_grid[1]} patch "
                            f"grid (a tile would hold less than one patch of the whole image): use at most "
                            f"{patch_grid[0]}x{patch_grid[1]} tiles, or tiles=auto")
    if rows > h or cols > w:
        raise FiseclipError(f"tiles {rows}x{cols} is finer than the {w}x{h} px image: use fewer tiles")
    return None if (rows, cols) == (1, 1) else (rows, cols)


def _starts(size: int, n: int, overlap: float) -> list[tuple[int, int]]:
    """n intervals [a, b) covering [0, size), each of side size / (n - (n - 1) overlap), evenly spaced."""
    side = size / (n - (n - 1) * overlap)
    stride = side * (1 - overlap)
    out = []
    for i in range(n):
        a = int(round(i * stride))
        b = size if i == n - 1 else int(round(i * stride + side))
        out.append((a, max(b, a + 1)))
    return out


def tile_boxes(image_hw: tuple[int, int], grid: tuple[int, int], overlap: float) -> list[tuple[int, int, int, int]]:
    """Boxes (y0, x0, y1, x1) of a rows x cols tiling of an (H, W) image, row-major, neighbours sharing `overlap`
    of a tile's side (up to rounding), the last row / column ending at the border.

    Args:
        image_hw: (H, W); grid: (rows, cols); overlap: in [0, 1).
    Returns:
        rows * cols boxes.
    """
    if not 0 <= overlap < 1:
        raise FiseclipError(f"tile_overlap {overlap} must be in [0, 1)")
    ys, xs = _starts(image_hw[0], grid[0], overlap), _starts(image_hw[1], grid[1], overlap)
    return [(y0, x0, y1, x1) for (y0, y1) in ys for (x0, x1) in xs]


def cut(image: np.ndarray, boxes) -> list[np.ndarray]:
    """The tiles of an `[H, W, 3]` array (contiguous copies: the feature cache hashes their bytes)."""
    return [np.ascontiguousarray(image[y0:y1, x0:x1]) for (y0, x0, y1, x1) in boxes]


def feather(h: int, w: int) -> np.ndarray:
    """Blending weights `[h, w]` of one tile: 1 in the middle, falling linearly to 1 / (ramp + 1) at the edges
    (ramp = a quarter of the side), never 0, so every pixel has a weight."""
    def ramp(n):
        k = max(1, n // 4)
        i = np.arange(n, dtype=np.float64)
        return np.minimum(1.0, np.minimum(i + 1, n - i) / (k + 1))
    return np.outer(ramp(h), ramp(w))


def stitch(tile_maps: Sequence[np.ndarray], boxes, image_hw: tuple[int, int]) -> np.ndarray:
    """Tile maps (any size each) -> one `[H, W]` float32 map: each resized (bilinear, corners aligned, as
    `postprocess.upsample`) to its box, blended by `feather` weights normalised by their sum.

    Args:
        tile_maps: one 2-D map per box.
        boxes: (y0, x0, y1, x1) per tile (`tile_boxes`).
        image_hw: (H, W).
    Returns:
        float32 `[H, W]`.
    """
    acc = np.zeros(image_hw, dtype=np.float64)
    wsum = np.zeros(image_hw, dtype=np.float64)
    for m, (y0, x0, y1, x1) in zip(tile_maps, boxes):
        th, tw = y1 - y0, x1 - x0
        m = np.asarray(m, dtype=np.float32)
        if m.shape != (th, tw):
            m = F.interpolate(torch.from_numpy(m)[None, None], size=(th, tw), mode="bilinear",
                              align_corners=True)[0, 0].numpy()
        wt = feather(th, tw)
        acc[y0:y1, x0:x1] += wt * m
        wsum[y0:y1, x0:x1] += wt
    return (acc / wsum).astype(np.float32)


def common_size(images: Sequence[np.ndarray], names: Sequence | None = None, what: str = "tiles") -> tuple[int, int]:
    """(H, W) shared by `[H, W, 3]` arrays; different sizes are an error naming an image of each size.

    Args:
        images: the arrays; names: their paths or names (None: their positions); what: the setting, for the message.
    Returns:
        (H, W).
    """
    first: dict = {}
    for i, im in enumerate(images):
        first.setdefault(im.shape[:2], i)
    if len(first) > 1:
        label = lambda i: image_name(None if names is None else names[i], i)  # noqa: E731
        raise FiseclipError(f"{what}: the images scored together must share one size, got "
                            + ", ".join(f"{w}x{h} ({label(i)})" for (h, w), i in first.items())
                            + "; score each size apart or resize them")
    return next(iter(first))


def _bank_images(bank: ReferenceBank, hw: tuple[int, int] | None) -> list[np.ndarray]:
    missing = [i for i, e in enumerate(bank.entries) if e.path is None]
    if missing:
        raise FiseclipError("tiles: the reference bank must be built from image paths (ReferenceBank.from_images "
                            "with paths), so that its images can be cut into tiles")
    arrays = [as_array(e.path) for e in bank.entries]
    for e, a in zip(bank.entries, arrays):
        if hw is not None and a.shape[:2] != tuple(hw):  # tile t of another size is another part of the image
            raise FiseclipError(f"tiles: reference {e.path} is {a.shape[1]}x{a.shape[0]} px, the images "
                                f"{hw[1]}x{hw[0]}; give references of the images' size")
    return arrays


def tile_banks(detector, bank: ReferenceBank | None, class_name: str, grid, overlap: float,
               image_hw: tuple[int, int] | None = None):
    """One `ReferenceBank` per tile position of a bank's images (cut like the queries), or None.

    Args:
        detector: the `Detector`; bank: the whole-image bank (paths needed) or None.
        class_name: the prompt's class; grid: (rows, cols); overlap: `tile_overlap`.
        image_hw: the queries' (H, W); a reference of another size is an error (None: not checked).
    Returns:
        A list of rows * cols banks (filtered and with box inputs when the bank's entries are), or None.
    """
    if bank is None or not len(bank):
        return None
    filtered = any(e.keep is not None for e in bank.entries)
    box = all(e.tokens is not None for e in bank.entries)
    key = (tuple(e.digest or e.path for e in bank.entries), tuple(grid), overlap, class_name, image_hw, filtered, box)
    memo = getattr(detector, "_tile_bank_memo", None)
    if memo is not None and memo[0] == key:  # keyed by the references' content, not by the bank object
        return memo[1]
    per_image = [cut(im, tile_boxes(im.shape[:2], grid, overlap)) for im in _bank_images(bank, image_hw)]
    banks = []
    for t in range(grid[0] * grid[1]):
        crops = [tiles[t] for tiles in per_image]
        b = ReferenceBank.from_images(detector, crops, class_name, filtered=filtered, box_inputs=box)
        for e, src in zip(b.entries, bank.entries):
            e.path = f"{src.path}#tile{t}"
        banks.append(b)
    detector._tile_bank_memo = (key, banks)  # a bank is reused batch after batch (score_pool): cut it once
    return banks


def score_tiled(detector, images: Sequence, class_name: str, grid: tuple[int, int],
                references: ReferenceBank | None = None, mutual: bool = True):
    """Score images cut into tiles (module doc) through `Detector.score_features`; maps at the original size.

    Args:
        detector: the `Detector` (its config gives tile_overlap and tile_match).
        images: paths, PIL images or arrays of one size.
        class_name: the prompt's class.
        grid: (rows, cols) from `resolve_grid`.
        references: a whole-image `ReferenceBank` (built from paths) or None.
        mutual: the images reference each other.
    Returns:
        A `BatchResult` with maps `[N, H, W]` at the images' size, scores on the stitched maps, the text score
        of each image (its highest tile's), the mean tile embedding (for RsCIN), and no patch-level maps.
    """
    cfg = detector.config
    arrays = [as_array(im) for im in images]
    hw = common_size(arrays, images)
    boxes = tile_boxes(hw, grid, cfg.tile_overlap)
    n, t_count = len(arrays), len(boxes)
    banks = tile_banks(detector, references, class_name, grid, cfg.tile_overlap, hw)
    tile_maps = [[None] * t_count for _ in range(n)]
    t_scores = np.full((n, t_count), -np.inf)
    embs = [[None] * t_count for _ in range(n)]
    notes: list[str] = []
    first = None
    if cfg.tile_match == "same":
        for t in range(t_count):
            crops = [np.ascontiguousarray(a[boxes[t][0]:boxes[t][2], boxes[t][1]:boxes[t][3]]) for a in arrays]
            res = detector.score_untiled(crops, class_name, references=banks[t] if banks else None, mutual=mutual)
            first = first or res
            _collect(res, range(n), t, tile_maps, t_scores, embs, notes)
    else:
        per_image = [detector.encode(cut(a, boxes)) for a in arrays]  # encode_batch tiles through the encoder at once
        t0 = time.perf_counter()
        entries = [[detector.reference_entry(_one(f, k), class_name, filtered=cfg.spec.text_filter)
                    for k in range(t_count)] for f in per_image] if mutual else [[] for _ in arrays]
        extra = [e for b in banks for e in b.entries] if banks else []
        for i in range(n):
            others = [e for j in range(n) if j != i for e in entries[j]] + extra  # never the image's own tiles
            bank_i = ReferenceBank(others, grid=tuple(per_image[i].grid)) if others else None
            res = detector.score_features(per_image[i], class_name, references=bank_i, mutual=False)
            first = first or res
            for t in range(t_count):
                _collect(res, [i], t, tile_maps, t_scores, embs, notes, row=t)
        detector.costs["score_s"] += time.perf_counter() - t0
        detector.costs["images_scored"] += n * t_count  # costs count encoder inputs: tiles, as the `same` route
    maps, scores, s_t = stitch_scores(tile_maps, boxes, hw, t_scores, cfg.beta)
    # the scoring path's own result type, with the stitched maps and no patch-level maps (they live per tile)
    return dataclasses.replace(first, maps=maps, scores=scores, grid=tuple(grid), visual_map=None, text_map=None,
                               keep=None, text_scores=s_t,
                               embeddings=np.stack([np.mean(np.stack(e), axis=0) for e in embs]),
                               notes=list(dict.fromkeys(notes)))


def stitch_scores(tile_maps: Sequence[Sequence[np.ndarray]], boxes, image_hw: tuple[int, int],
                  tile_text: np.ndarray | None, beta: float):
    """Stitched maps, and image scores taken on them (`postprocess.image_scores`), of images scored tile by tile.

    Args:
        tile_maps: per image, one map per box; boxes: `tile_boxes`; image_hw: (H, W).
        tile_text: `[N, T]` text scores of the tiles (-inf or None where there is no text branch).
        beta: the config's weight of the text score in the image score.
    Returns:
        (maps float32 `[N, H, W]`, scores float64 `[N]`, text scores `[N]` (each image's highest tile's) or None).
    """
    maps = np.stack([stitch(m, boxes, image_hw) for m in tile_maps])
    s_t = (None if tile_text is None or not np.isfinite(tile_text).all()
           else torch.from_numpy(np.asarray(tile_text).max(axis=1)))
    scores = image_scores(torch.from_numpy(maps), s_t, beta).numpy().astype(np.float64)
    return maps, scores, None if s_t is None else s_t.numpy()


def _one(feats: Features, k: int) -> Features:
    """Image k of a batch of Features (views of every per-image field, whatever fields the encoder fills)."""
    def pick(x):
        if isinstance(x, dict):
            return {key: t[k:k + 1] for key, t in x.items()}
        return x[k:k + 1] if torch.is_tensor(x) else x
    return dataclasses.replace(feats, **{f.name: pick(getattr(feats, f.name)) for f in dataclasses.fields(feats)
                                         if f.name != "grid"})


def _collect(res, images, t, tile_maps, t_scores, embs, notes, row=None) -> None:
    """Store a tile result: rows of `res` are the images (same) or the tiles of one image (all, `row`)."""
    for k, i in enumerate(images):
        r = k if row is None else row
        tile_maps[i][t] = res.maps[r]
        if res.text_scores is not None:
            t_scores[i, t] = res.text_scores[r]
        embs[i][t] = res.embeddings[r]
    notes.extend(res.notes)
